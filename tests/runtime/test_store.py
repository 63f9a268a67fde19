"""DiskStore: round trips of any layout, and damaged files are errors, not data."""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch
from forked import ran_in_a_forked_child

from planner.runtime.store import DiskStore, StoreError, empty_like_entry


@pytest.fixture
def store(tmp_path):
    s = DiskStore(tmp_path)
    yield s
    s.close()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(17, 33),
        lambda: torch.randn(8, 8).t(),
        lambda: torch.arange(100, dtype=torch.int64)[10:50:3],
        lambda: torch.randn(4, 4).to(torch.bfloat16),
    ],
)
def test_round_trip_keeps_layout(store: DiskStore, make) -> None:
    x = make()
    store.write("x", x)
    out = empty_like_entry(store.entries["x"])
    store.read_into("x", out)
    assert out.shape == x.shape and out.stride() == x.stride() and torch.equal(out, x)


def test_missing_truncated_and_corrupted_files(store: DiskStore) -> None:
    x = torch.randn(1000)
    store.write("x", x)
    path = store.path("x")
    out = empty_like_entry(store.entries["x"])
    store.read_into("x", out)  # verified once
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    time.sleep(0.01)
    path.write_bytes(bytes(data))  # same size, new mtime: verified again
    with pytest.raises(StoreError, match="corrupted"):
        store.read_into("x", empty_like_entry(store.entries["x"]))
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(StoreError, match="wrong size"):
        store.read_into("x", empty_like_entry(store.entries["x"]))
    path.unlink()
    with pytest.raises(StoreError, match="missing"):
        store.read_into("x", empty_like_entry(store.entries["x"]))


def test_offload_dir_errors(tmp_path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        DiskStore(tmp_path / "nope")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        DiskStore(f)


def test_a_relative_offload_dir_survives_a_change_of_directory(tmp_path, monkeypatch) -> None:
    """The root was relative: after os.chdir every read said its file was missing,
    and close() left the files behind."""
    (tmp_path / "od").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    store = DiskStore("od")
    assert store.root.is_absolute()
    store.write("w", torch.arange(4.0))
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert torch.equal(store.read_into("w", torch.empty(4)), torch.arange(4.0))
    store.close()
    assert list((tmp_path / "od").iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_closing_its_copy_leaves_the_parents_files(tmp_path) -> None:
    """A child's normal exit collected its inherited store and removed the
    parent's directory: the parent's next read found its weights gone."""
    store = DiskStore(tmp_path)
    store.write("w", torch.arange(4.0))
    assert ran_in_a_forked_child(store.close)  # as the child's exit would
    assert torch.equal(store.read_into("w", torch.empty(4)), torch.arange(4.0))
    store.close()
    assert not store.root.exists()


def test_read_now_equals_prefetch_then_wait(store: DiskStore) -> None:
    """A read waited for at once runs on the calling thread: same tensor, same
    layout, and the same checks as a prefetch through the reader thread."""
    from planner.runtime.copy_engine import ThreadCopyEngine

    engine = ThreadCopyEngine(store)
    try:
        x = torch.randn(64, 48).t()  # a non-contiguous layout
        engine.wait(engine.offload("x", "disk", x))
        now = engine.read_now("x", "disk")
        later = engine.wait(engine.prefetch("x", "disk"))
        assert torch.equal(now, x) and torch.equal(later, x)
        assert now.stride() == later.stride() == x.stride()
        store.path("x").write_bytes(b"short")
        with pytest.raises(StoreError, match="wrong size"):
            engine.read_now("x", "disk")
    finally:
        engine.close()


def test_map_shared_writes_through_and_create_mapped_starts_at_zero(store: DiskStore) -> None:
    """A trained parameter's home: writes through the map reach the file (and the
    next read), and the entry stops checking a checksum the writes would break."""
    w = torch.randn(8, 16)
    store.write("w", w)
    mapped = store.map_shared("w")
    assert torch.equal(mapped, w) and mapped.untyped_storage().filename
    mapped.mul_(3)
    back = empty_like_entry(store.entries["w"])
    assert torch.equal(store.read_into("w", back), w * 3)
    grad = store.create_mapped("g", w.t())
    assert grad.shape == (16, 8) and grad.stride() == w.t().stride()
    assert not grad.any() and grad.untyped_storage().filename


def test_transient_copy_has_no_checksum_and_a_touched_file_is_an_error(store: DiskStore) -> None:
    """A copy read back within one call skips the checksum's passes; its stamp,
    taken at the write, still makes any later change to the file an error."""
    x = torch.randn(1000)
    entry = store.write("x", x, checksum=False)
    assert entry.crc32 is None and entry.stamp is not None
    assert torch.equal(store.read_into("x", empty_like_entry(entry)), x)
    assert torch.equal(store.read_into("x", empty_like_entry(entry)), x)  # still unchanged
    path = store.path("x")
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    time.sleep(0.01)
    path.write_bytes(bytes(data))  # same size: only the stamp tells
    with pytest.raises(StoreError, match="changed after the planner wrote it"):
        store.read_into("x", empty_like_entry(entry))


@pytest.mark.parametrize("how", ["deleted", "replaced", "truncated", "extended"])
@pytest.mark.parametrize("kind", ["transient", "mapped"])
def test_reads_through_a_kept_open_file_check_it_like_a_fresh_open(
    store: DiskStore, kind: str, how: str
) -> None:
    """Transient copies and files mapped for writing through are read through a
    file kept open (no open per read): a file deleted, replaced by another, cut
    short or made longer since is still an error, never a silent read."""
    x = torch.randn(1000)
    if kind == "transient":
        entry = store.write("x", x, checksum=False)
    else:
        store.write("x", x)
        store.map_shared("x")
        entry = store.entries["x"]
    assert "x" in store._open_files  # the path under test
    assert torch.equal(store.read_into("x", empty_like_entry(entry)), x)
    path = store.path("x")
    if how == "deleted":
        path.unlink()
    elif how == "replaced":
        other = path.with_name("other.bin")
        other.write_bytes(path.read_bytes())
        os.replace(other, path)
    else:
        size = entry.nbytes - 4 if how == "truncated" else entry.nbytes + 4
        os.truncate(path, size)
    with pytest.raises(StoreError, match="missing|wrong size|changed"):
        store.read_into("x", empty_like_entry(entry))


def test_keys_past_the_open_file_limit_open_their_file_per_copy(store: DiskStore) -> None:
    """At most ``max_open_files`` stay open; copies of other keys open and close
    their file each time, with the same results and checks."""
    store.max_open_files = 1
    xs = {k: torch.randn(100) for k in "abc"}
    for k, x in xs.items():
        store.write(k, x, checksum=False)
    store.write("w", torch.randn(10))
    store.map_shared("w")
    assert list(store._open_files) == ["a"]
    for k, x in xs.items():
        assert torch.equal(store.read_into(k, empty_like_entry(store.entries[k])), x)
    store.path("c").unlink()
    with pytest.raises(StoreError, match="missing"):
        store.read_into("c", empty_like_entry(store.entries["c"]))


def test_engine_offloads_are_transient_copies(store: DiskStore) -> None:
    from planner.runtime.copy_engine import ThreadCopyEngine

    engine = ThreadCopyEngine(store)
    try:
        engine.wait(engine.offload("a", "disk", torch.randn(10)))
        engine.store_now("w", "disk", torch.randn(10))
        assert store.entries["a"].crc32 is None and store.entries["a"].stamp is not None
        assert store.entries["w"].crc32 is not None  # long-lived: checksummed
    finally:
        engine.close()


def test_transient_copies_overwrite_their_file_in_place(store: DiskStore) -> None:
    """The next transient write of a key reuses its file (same inode), resized when
    the storage changes size; a long-lived write of the key replaces it."""
    store.write("x", torch.randn(256), checksum=False)
    inode = store.path("x").stat().st_ino
    y = torch.randn(64)
    entry = store.write("x", y, checksum=False)
    assert store.path("x").stat().st_ino == inode
    assert store.path("x").stat().st_size == y.numel() * 4
    assert torch.equal(store.read_into("x", empty_like_entry(entry)), y)
    z = torch.randn(32)
    store.write("x", z)  # checksummed: a new file renamed over the old one
    assert torch.equal(store.read_into("x", empty_like_entry(store.entries["x"])), z)
    store.write("t", torch.randn(8), checksum=False)
    store.discard("t")
    assert not store.path("t").exists()


def test_kept_open_files_are_copied_through_a_map(store: DiskStore) -> None:
    """A transient copy of a key whose file is kept open goes through a shared map
    of it (the file holds the bytes, its blocks allocated); a file cut short
    between calls is resized by the next write before the map is touched (no
    SIGBUS); a key past the open-file limit is written without one."""
    assert store._maps_allowed, "the test's directory is not on ext4, xfs or tmpfs"
    x = torch.randn(64, 32)
    entry = store.write("x", x, checksum=False)
    assert "x" in store._maps
    path = store.path("x")
    assert path.read_bytes() == x.numpy().tobytes()
    assert torch.equal(store.read_into("x", empty_like_entry(entry)), x)
    os.truncate(path, 100)  # between calls
    y = torch.randn(64, 32)
    entry = store.write("x", y, checksum=False)
    assert path.stat().st_size == entry.nbytes
    assert torch.equal(store.read_into("x", empty_like_entry(entry)), y)
    os.truncate(path, 4 * 100)  # to the size of the next write: a new map, not the old one
    z = torch.randn(100)
    entry = store.write("x", z, checksum=False)
    assert store._maps["x"].size == entry.nbytes
    assert torch.equal(store.read_into("x", empty_like_entry(entry)), z)
    store.max_open_files = len(store._open_files)
    z = torch.randn(10)
    store.write("z", z, checksum=False)
    assert "z" not in store._maps
    assert torch.equal(store.read_into("z", empty_like_entry(store.entries["z"])), z)


def test_where_a_file_cannot_be_mapped_copies_go_through_pwrite(
    store: DiskStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A map that cannot be made (no mmap on that file system, no memory for more
    maps) leaves the copy to ``pwrite``/``preadv``; a file system that does not
    overwrite blocks in place is never mapped."""
    import errno
    import mmap

    from planner.runtime import store as store_module

    def no_mmap(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENODEV, "no mmap here")

    monkeypatch.setattr(store_module.mmap, "mmap", no_mmap)
    x = torch.randn(1000)
    entry = store.write("x", x, checksum=False)
    assert "x" not in store._maps
    assert torch.equal(store.read_into("x", empty_like_entry(entry)), x)
    monkeypatch.setattr(store_module.mmap, "mmap", mmap.mmap)
    store._maps_allowed = False  # as on btrfs or ZFS
    entry = store.write("y", x, checksum=False)
    assert "y" not in store._maps
    assert torch.equal(store.read_into("y", empty_like_entry(entry)), x)


def _is_mapped(path) -> bool:
    """Whether this process maps ``path`` now (Linux: /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        return str(path) in f.read()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_map_private_is_checked_like_a_read_and_never_writes_the_file(store: DiskStore) -> None:
    """A weight read by mapping its file: equal to what was stored, file-backed,
    verified once (a corrupted file is an error), and writes through the map stay
    private to it."""
    w = torch.randn(64, 32).t()
    store.write("w", w)
    mapped = store.map_private("w")
    assert torch.equal(mapped, w) and mapped.stride() == w.stride()
    assert _is_mapped(store.path("w"))  # the page cache's bytes, not a copy
    mapped.mul_(2)
    assert torch.equal(store.map_private("w"), w)  # the file is unchanged
    path = store.path("w")
    data = bytearray(path.read_bytes())
    data[7] ^= 0xFF
    time.sleep(0.01)
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="corrupted"):
        store.map_private("w")
    path.write_bytes(bytes(data[:10]))
    with pytest.raises(StoreError, match="wrong size"):
        store.map_private("w")
    path.unlink()
    with pytest.raises(StoreError, match="missing"):
        store.map_private("w")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_engine_maps_large_mappable_keys_and_copies_small_ones(
    store: DiskStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from planner.runtime import copy_engine
    from planner.runtime.copy_engine import ThreadCopyEngine

    monkeypatch.setattr(copy_engine, "MAP_MIN_BYTES", 4096)
    engine = ThreadCopyEngine(store)
    try:
        large, small = torch.randn(128, 16), torch.randn(8)
        engine.store_now("large", "disk", large)
        engine.store_now("small", "disk", small)
        engine.mappable.update({"large", "small"})
        prefetched = engine.wait(engine.prefetch("large", "disk"))
        for got in (prefetched, engine.read_now("large", "disk")):
            assert torch.equal(got, large) and _is_mapped(store.path("large"))
            del got
        got = engine.read_now("small", "disk")
        assert torch.equal(got, small) and not _is_mapped(store.path("small"))
    finally:
        engine.close()


def test_engine_copies_small_tensors_in_place_and_large_ones_on_its_threads(
    store: DiskStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small copy is done when ``offload`` or ``prefetch`` returns (nothing left to
    wait for); a large one is handed to the channel's thread."""
    from planner.runtime import copy_engine
    from planner.runtime.copy_engine import ThreadCopyEngine

    monkeypatch.setattr(copy_engine, "SYNC_MAX_BYTES", 4096)
    engine = ThreadCopyEngine(store)
    try:
        small, large = torch.randn(16, 64).t(), torch.randn(64, 64)  # 4 KiB, 16 KiB
        written = engine.offload("small", "disk", small)
        assert written.future is None and store.entries["small"].stamp is not None
        pending = engine.offload("large", "disk", large)
        assert pending.future is not None
        engine.wait(pending)
        back = engine.prefetch("small", "disk")
        assert back.future is None
        assert torch.equal(back.tensor, small) and back.tensor.stride() == small.stride()
        pending = engine.prefetch("large", "disk")
        assert pending.future is not None and torch.equal(engine.wait(pending), large)
        # the generated code reads and writes at once what the engine copies in place
        assert copy_engine.completes_at_issue(torch.device("cpu"), small.nbytes)
        assert not copy_engine.completes_at_issue(torch.device("cpu"), large.nbytes)
        assert not copy_engine.completes_at_issue(torch.device("cuda"), small.nbytes)
        engine.write_now("large", "disk", 2 * large)  # through the thread, waited for
        assert torch.equal(engine.read_now("large", "disk"), 2 * large)
    finally:
        engine.close()


def test_fault_in_leaves_a_mapped_tensor_unchanged(store: DiskStore) -> None:
    from planner.runtime.store import fault_in

    w = torch.randn(3, 5000)  # several pages
    store.write("w", w)
    mapped = store.map_private("w")
    fault_in(mapped)
    assert torch.equal(mapped, w)


def _read(store: DiskStore, key: str) -> torch.Tensor:
    return store.read_into(key, empty_like_entry(store.entries[key]))


@pytest.mark.parametrize("dim", [2, -1])
@pytest.mark.parametrize("positions", [[5], [3, 4, 5, 9], [0, 63], 7])
def test_write_rows_writes_just_those_rows_in_place(store: DiskStore, positions, dim) -> None:
    """A cache (batch, heads, positions, dims) read from its file, new tokens written
    in at ``positions`` along dim 2: the file then holds the updated cache, though
    only those rows were written (the rest of the file is left as it was). Also the
    last dim as the op may give it, -1: its rows were sized as the whole tensor and
    the file was garbled. And a 0-dim position, as ``index_copy_`` takes one
    (``torch.tensor(7)``): every call of a disk-homed cache failed on it."""
    cache = torch.randn(1, 4, 64, 8) if dim == 2 else torch.randn(1, 4, 8, 64)
    store.write("cache", cache)  # a weight-like entry, checksummed
    assert torch.equal(_read(store, "cache"), cache)
    updated = cache.clone()
    index = torch.tensor(positions)
    if isinstance(positions, int):
        positions = [positions]
    rows = torch.randn(1, 4, len(positions), 8)
    updated.index_copy_(dim, index, rows if dim == 2 else rows.transpose(2, 3))
    stale = updated.clone()
    stale.index_fill_(dim, torch.tensor([p for p in range(64) if p not in positions]), 0)
    path = store.path("cache")
    store.write_rows("cache", updated, dim, index)
    assert torch.equal(_read(store, "cache"), updated)
    written = store.entries["cache"]
    assert written.crc32 is None and written.stamp is not None  # checked by stamp now
    # the other rows came from the file, not from ``updated``: writing the rows of
    # a tensor zero elsewhere changes only those rows
    store.write_rows("cache", stale, dim, index)
    assert torch.equal(_read(store, "cache"), updated)
    assert path == store.path("cache") and path.exists()


def test_write_rows_of_another_layout_writes_the_whole_tensor(store: DiskStore) -> None:
    cache = torch.randn(1, 4, 16, 8)
    store.write("cache", cache)
    other = torch.randn(1, 16, 4, 8).transpose(1, 2)  # same shape, another layout
    store.write_rows("cache", other, 2, torch.tensor([1]))
    assert torch.equal(_read(store, "cache"), other)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_device_view_is_written_with_its_whole_storage(store) -> None:
    """The entry describes a view within its storage, so the file holds the whole
    storage, copied from the device (not the view's elements alone)."""
    view = torch.arange(64.0, device="cuda")[8:24]
    store.write("v", view)
    assert torch.equal(store.read_into("v", empty_like_entry(store.entries["v"])), view.cpu())


def test_stores_share_one_budget_of_kept_descriptors(tmp_path) -> None:
    """The quarter of the open-file limit a store keeps open is the process's, not
    each store's, and a file's map counts too (``mmap`` holds a duplicate of its
    descriptor): each store kept up to a quarter, twice that with its maps, so two
    training modules alive at once (216 spilled tensors each) held 872 of 1,024
    descriptors and a third one's first step failed with EMFILE."""

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = fds()
    stores = [DiskStore(tmp_path) for _ in range(3)]
    opened = fds() - before  # each store's lock on its directory
    limit = 8
    xs = {f"k{i}": torch.randn(256) for i in range(12)}
    for store in stores:
        store.max_open_files = limit
        for key, x in xs.items():
            store.write(key, x, checksum=False)
    assert fds() - before - opened <= limit
    for store in stores:  # every key reads back, kept open or not
        for key, x in xs.items():
            assert torch.equal(store.read_into(key, empty_like_entry(store.entries[key])), x)
    for store in stores:
        store.close()
    assert fds() == before


def test_no_descriptor_left_is_said_so(store: DiskStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from planner.runtime import store as store_module

    def no_fd(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(store_module.os, "open", no_fd)
    with pytest.raises(StoreError, match=r"no file descriptor left.*pm\.close\(\)"):
        store.write("x", torch.randn(10), checksum=False)


def test_no_descriptor_left_on_a_read_or_a_map_is_said_so(
    store: DiskStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read (an inference step reading its weights) or a map that finds no
    descriptor left says what to do, as a write does: it was a bare OSError
    (errno 24) from the copy thread."""
    import errno

    from planner.runtime import store as store_module

    entry = store.write("w", torch.randn(64))  # a checksummed write: not kept open
    store.write("g", torch.randn(64))
    real_open = os.open

    def no_fd(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(store.root) in str(path):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(store_module.os, "open", no_fd)
    with pytest.raises(StoreError, match=r"no file descriptor left.*pm\.close\(\)"):
        store.read_into("w", empty_like_entry(entry))
    with pytest.raises(StoreError, match=r"no file descriptor left.*pm\.close\(\)"):
        store.map_shared("g")
    monkeypatch.undo()
    assert store.read_into("w", empty_like_entry(entry)).shape == (64,)  # reads again


def test_a_child_forked_while_a_thread_holds_the_descriptor_lock_can_close(tmp_path) -> None:
    """The process-wide count of kept descriptors has a lock, which a copy thread
    takes at each file it keeps: a fork at that moment left the child's copy of it
    held, and the child's close (at its exit) blocked forever."""
    import signal
    import threading

    from planner.runtime import store as store_module

    store = DiskStore(tmp_path)
    store.write("k", torch.randn(64), checksum=False)  # kept open: its close gives back
    held, release = threading.Event(), threading.Event()

    def copy_thread() -> None:
        with store_module._KEPT._lock:
            held.set()
            release.wait(10)

    thread = threading.Thread(target=copy_thread)
    thread.start()
    held.wait()
    pid = os.fork()
    if pid == 0:
        signal.alarm(5)  # a blocked child dies instead of hanging the test
        try:
            store.close()
        finally:
            os._exit(0)
    release.set()
    thread.join()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "the child's close blocked"
    store.close()


def _descriptors_into(root) -> list[str]:
    import gc

    gc.collect()
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(root) + os.sep):  # its files (the directory is held open)
            found.append(target)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_an_interrupt_anywhere_in_a_read_leaves_no_descriptor_open(store: DiskStore) -> None:
    """A Ctrl-C lands between any two lines: one just after a read opened its file,
    before the ``try`` that closes it, left the descriptor open for good (a planned
    module interrupted 300 times held 11-24 descriptors to its deleted offload files
    after ``close()``, their disk space with them). The interrupt is raised here by a
    trace function at each line the read runs in the store, in turn."""
    store.write("w", torch.randn(64, 64))  # a weight: read by opening its file
    out = empty_like_entry(store.entries["w"])
    store.read_into("w", out)
    here = sys.modules[DiskStore.__module__].__file__
    lines = 0

    def count(frame, event, arg):  # noqa: ANN001
        nonlocal lines
        if frame.f_code.co_filename == here and event == "line":
            lines += 1
        return count

    sys.settrace(count)
    try:
        store.read_into("w", out)
    finally:
        sys.settrace(None)
    assert lines > 3
    for k in range(1, lines + 1):
        seen = 0

        def interrupt(frame, event, arg, at=k):  # noqa: ANN001
            nonlocal seen
            if frame.f_code.co_filename == here and event == "line":
                seen += 1
                if seen == at:
                    raise KeyboardInterrupt
            return interrupt

        sys.settrace(interrupt)
        try:
            store.read_into("w", out)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        assert _descriptors_into(store.root) == [], f"interrupted at line event {k}"
    assert torch.equal(store.read_into("w", empty_like_entry(store.entries["w"])), out)


def _signal_points(here: str):  # noqa: ANN202
    """A trace function factory: ``tracer(on_point)`` calls ``on_point()`` at each
    moment CPython handles a pending signal in the frames of file ``here``: at a
    function's start (RESUME), and after each call returns or loop jumps back
    (the eval breaker's checks), before the next instruction runs. Raising
    KeyboardInterrupt there is a Ctrl-C landing at that moment (raising at every
    instruction is more than a signal can do: between a ``with`` block's last
    line and its ``__exit__`` call, no signal is handled)."""
    import dis

    names: dict[object, dict[int, str]] = {}

    def opname(code, offset: int) -> str:  # noqa: ANN001
        table = names.get(code)
        if table is None:
            table = names[code] = {i.offset: i.opname for i in dis.get_instructions(code)}
        return table.get(offset, "")

    def tracer(on_point):  # noqa: ANN001, ANN202
        last: dict[int, str] = {}  # per frame, the instruction it ran last

        def trace(frame, event, arg):  # noqa: ANN001
            if frame.f_code.co_filename != here:
                return None
            frame.f_trace_opcodes = True
            if event == "opcode":
                current = opname(frame.f_code, frame.f_lasti)
                before = last.get(id(frame), "")
                last[id(frame)] = current
                if current == "RESUME" or before in ("CALL", "JUMP_BACKWARD"):
                    on_point()
            elif event == "return":
                last.pop(id(frame), None)
            return trace

        return trace

    return tracer


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_an_interrupt_at_any_moment_of_a_first_write_leaves_no_descriptor_open(
    store: DiskStore,
) -> None:
    """A spill's first write opens its file and keeps it for later copies. A
    Ctrl-C is handled after a call returns, before its result is stored: landing
    right after ``os.open``, it dropped the descriptor's number and the descriptor
    stayed open for good. Here the interrupt is raised by a trace function at each
    instruction the write runs in the store, in turn; after each, every descriptor
    into the store is one it holds (open, on the key's file), and none is left once
    the key is discarded (``_signal_points``: where CPython handles signals).
    Before: 1 of N points left a descriptor open."""
    tensor = torch.randn(16, 64)
    tracer = _signal_points(sys.modules[DiskStore.__module__].__file__)
    points = 0

    def count() -> None:
        nonlocal points
        points += 1

    store.write("s", tensor, checksum=False)  # first: names its file (cached after)
    store.discard("s")
    sys.settrace(tracer(count))
    try:
        store.write("s", tensor, checksum=False)
    finally:
        sys.settrace(None)
    store.discard("s")
    assert points > 20
    for k in range(1, points + 1):
        seen = 0

        def interrupt(at: int = k) -> None:
            nonlocal seen
            seen += 1
            if seen == at:
                raise KeyboardInterrupt

        sys.settrace(tracer(interrupt))
        try:
            store.write("s", tensor, checksum=False)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        for key, file in store._open_files.items():  # held ones are open, on their file
            held = f"/proc/self/fd/{file.fileno()}"
            assert os.path.exists(held), f"interrupted at point {k}: {key} closed, still held"
            assert os.readlink(held) == str(store.path(key))
        store.discard("s")
        assert _descriptors_into(store.root) == [], f"interrupted at point {k}"
    store.write("s", tensor, checksum=False)
    assert torch.equal(store.read_into("s", empty_like_entry(store.entries["s"])), tensor)

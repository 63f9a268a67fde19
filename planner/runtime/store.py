"""Tier stores: where tensors live when they are not on the device.

``DiskStore`` keeps one file per tensor under a directory it owns. A file holds
the tensor's whole storage (views are rebuilt from storage, offset, shape and
stride). Every entry records its size and the file's stamp (inode, mtime, ctime),
checked on read, so a deleted, truncated or rewritten file is an error, never
silently wrong data. Long-lived copies (weights written at plan time) also record a
CRC32 checksum, verified on the first read and whenever the stamp changes, and are
written to a new file renamed into place. A transient copy (written and read back
within one call) has neither: on a CPU the checksum's two passes (2.9 GB/s here)
cost more than the copy itself (a page-cache read: 15-19 GB/s), and it overwrites
its key's file, kept open, in place; reads of it go through that open file too,
as do reads of a file mapped for writing through (``map_shared``).

A small file kept open is also mapped (shared, its blocks allocated up front so a
full disk is an error at the write, never a SIGBUS inside one): its copies go
through the map instead of a ``pwrite`` or ``preadv`` (512 KiB through the store:
written in 24 us against 32 and read in 18 against 27 here; right after a
convolution 45 against 51 and 35 against 41, where the rest of a copy's cost
lies: the CNN's training steps at 30-50% of its peak ran 2-3% faster). Only on
file systems that overwrite blocks in place (ext4, xfs, tmpfs; elsewhere, and
past ``MAX_MAPS``, copies stay ``pwrite``/``preadv``). The checks are the same:
``fstat`` of the open file before each copy (size, links, stamp), so a file cut
short is resized, or an error, before the map is touched. Writes through the map
leave the stamp alone until the next write (ext4: unchanged through ``fsync``);
another writer's do not. What the checks cannot catch: another process cutting a
file short between that ``fstat`` and the copy a few microseconds later, which
kills the process with SIGBUS where a ``preadv`` would have come back short.

Reads fill a tensor the caller allocated: on the CPU that keeps every allocation
on the calling thread, where the memory meter sees it, and it mirrors the CUDA
path, where the destination is allocated when the prefetch is issued.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import io
import math
import mmap
import os
import shutil
import tempfile
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from planner.errors import PlannerError
from planner.runtime.linked import LinkedRegions
from planner.runtime.offload_dirs import hold, owner_prefix, remove_stale


class StoreError(PlannerError):
    """An offloaded tensor could not be written or read back intact."""


#: What a lost or damaged offload file leaves to do. The file held the only copy:
#: an inference plan took the weights it moved off the device out of the model, and
#: a training plan's parameter homed there was a map of its file (so "plan the
#: model again" failed: the model no longer had those weights).
REPLAN = (
    "the weights this module moved off the device lived only in its offload files, so "
    "load them into the model again (from your checkpoint) and plan it again"
)


@dataclass(frozen=True)
class Entry:
    """What is needed to rebuild a tensor from its stored bytes."""

    nbytes: int  # bytes of the whole storage
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    # None: not computed (a transient copy, or a write still in flight), or not
    # fixed (a file mapped for writing through, see ``DiskStore.map_shared``)
    crc32: int | None
    # (inode, mtime, ctime) of the file when written or last verified; ctime
    # changes on every write and on any metadata change (even one that restores
    # mtime). None: reads check the size only (a mapped file changes by design).
    stamp: tuple[int, int, int] | None = None

    def laid_out_as(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` has this entry's layout over a storage of its size, so
        that its slices map to the stored copy's (``write_rows``)."""
        return (self.dtype, self.shape, self.stride, self.offset, self.nbytes) == (
            tensor.dtype,
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.storage_offset(),
            tensor.untyped_storage().nbytes(),
        )


def describe(
    tensor: torch.Tensor, crc32: int | None = None, stamp: tuple[int, int, int] | None = None
) -> Entry:
    return Entry(
        nbytes=tensor.untyped_storage().nbytes(),
        dtype=tensor.dtype,
        shape=tuple(tensor.shape),
        stride=tuple(tensor.stride()),
        offset=tensor.storage_offset(),
        crc32=crc32,
        stamp=stamp,
    )


def empty_like_entry(entry: Entry, device: torch.device | str = "cpu") -> torch.Tensor:
    """A tensor with the entry's layout over a fresh storage (contents undefined)."""
    return with_layout(torch.empty(entry.nbytes, dtype=torch.uint8, device=device), entry)


def empty_for_read(entry: Entry) -> tuple[torch.Tensor, memoryview]:
    """``empty_like_entry`` on the CPU, and the bytes of its storage (what
    ``_storage_bytes`` of it gives), from the one allocation: a read's second
    uint8 view of the storage cost 2.3 of the 13.5 us of a 4 KiB weight's
    ``read_now``. ``DiskStore.read_into(key, out, view)`` fills both."""
    raw = torch.empty(entry.nbytes, dtype=torch.uint8)
    return with_layout(raw, entry), memoryview(raw.numpy()).cast("B")


def with_layout(raw: torch.Tensor, entry: Entry) -> torch.Tensor:
    """The entry's tensor over the bytes of ``raw`` (a uint8 storage)."""
    out = torch.empty(0, dtype=entry.dtype, device=raw.device)
    out.set_(raw.untyped_storage(), entry.offset, entry.shape, entry.stride)
    return out


def _open_file_limit() -> int:
    """The process's soft limit on open files (1024 where it cannot be read)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 1024
    return soft if soft != resource.RLIM_INFINITY else 1 << 16


def _maps_in_place(path: Path) -> bool:
    """Whether ``path`` lies on a file system of ``_IN_PLACE_FILE_SYSTEMS``, by
    the longest mount point above it in ``/proc/self/mountinfo`` (False if unknown)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    target, best, fs_type = os.path.realpath(path), "", ""
    for line in lines:
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or not rest:
            continue
        mount = parts[4].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, fs_type = mount, rest.split()[0]
    return fs_type in _IN_PLACE_FILE_SYSTEMS


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def _map_shared(path: Path, entry: Entry) -> torch.Tensor:
    """The entry's tensor over a shared map of ``path``: writes reach the file."""
    raw = torch.from_file(str(path), shared=True, size=entry.nbytes, dtype=torch.uint8)
    return with_layout(raw, entry)


#: Largest file copied through a map. Measured gains are for small copies (the
#: CNN's 64-512 KiB activations: steps 2-3% faster); on GPT-2's spills of several
#: MiB side-by-side runs differed by +-2% either way, and a large map's pages,
#: write-protected again after each writeback, fault on the next write.
MAP_COPY_MAX_BYTES = 2**20
#: Most files mapped at once: well under the kernel's default limit on a process's
#: maps (``vm.max_map_count``, 65530), whatever the open-file limit allows.
MAX_MAPS = 4096
#: File systems that overwrite a file's allocated blocks in place, so a write
#: through the map never needs new room: on copy-on-write ones (btrfs, ZFS) a full
#: disk would surface as a SIGBUS inside a copy, where ``pwrite`` says ENOSPC.
_IN_PLACE_FILE_SYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "tmpfs"})

_THREAD = threading.local()


def mark_copy_thread() -> None:
    """Initializer of a copy engine's threads: copies through a map made there are
    one memcpy on that thread (see ``_copy_bytes``)."""
    _THREAD.copies_alone = True


#: Largest copy ``_copy_bytes`` makes with numpy's memcpy on the thread that runs
#: the ops: below it, starting torch's copy costs more than the memcpy takes (two
#: cores here: 4 KiB 1.4 us against 0.26, 128 KiB 3.0 against 1.3, 512 KiB 4.7
#: against 6.1). A small spill's write and its read each make one such copy.
SMALL_COPY_BYTES = 128 * 2**10


def _copy_bytes(dst: np.ndarray, src: np.ndarray) -> None:
    """Copy bytes between a file's map and a tensor's storage. On the thread that
    runs the ops, torch's copy, which splits it over the ops' intra-op threads
    (512 KiB: 12 us against 29 for one memcpy here), unless it is small
    (``SMALL_COPY_BYTES``); on a copy thread, numpy's memcpy without the GIL,
    since a torch copy there would start a second team of OpenMP threads beside
    the ops'."""
    if dst.nbytes <= SMALL_COPY_BYTES or getattr(_THREAD, "copies_alone", False):
        np.copyto(dst, src)
    else:
        torch.from_numpy(dst).copy_(torch.from_numpy(src))


def _on_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or for a device tensor a host copy of its whole storage: the
    entry describes the view within the storage, so the file holds all of it
    (``.cpu()`` of a view would copy the view's elements alone)."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.untyped_storage().nbytes(), dtype=torch.uint8)
    host.untyped_storage().copy_(tensor.untyped_storage())
    return host


def _storage_bytes(tensor: torch.Tensor) -> memoryview:
    storage = tensor.untyped_storage()
    raw = torch.empty(0, dtype=torch.uint8, device=tensor.device)
    raw.set_(storage, 0, (storage.nbytes(),), (1,))
    return memoryview(raw.numpy()).cast("B")


def check_offload_dir(parent: str | os.PathLike[str]) -> None:
    """Fail early, with what to do, if ``parent`` cannot hold offload files.

    Writability is probed by creating (and removing) a directory there:
    permission bits do not tell for root, read-only mounts or pseudo file systems."""
    os.rmdir(_make_root(parent))


def _make_root(parent: str | os.PathLike[str] | None) -> str:
    """A fresh directory under ``parent`` (None: the system's temporary directory),
    named for this process (``offload_dirs``)."""
    if parent is not None and not isinstance(parent, (str, os.PathLike)):
        raise StoreError(  # Path()'s bare TypeError before (an int, bytes)
            f"offload_dir must be a directory path (a str or os.PathLike) or None, got "
            f"{type(parent).__name__}"
        )
    if parent is not None and not Path(parent).is_dir():
        raise StoreError(
            f"offload_dir {str(parent)!r} does not exist or is not a directory: "
            f"create it first, or pass offload_dir=None for a temporary directory"
        )
    try:
        # absolute: the caller may change the working directory while it lives
        return os.path.abspath(tempfile.mkdtemp(prefix=owner_prefix(), dir=parent))
    except OSError as exc:
        why = exc.strerror or str(exc)
        if parent is None:
            raise StoreError(
                f"cannot create offload files in the temporary directory ({why}): "
                f"pass offload_dir= a directory you can write to"
            ) from exc
        raise StoreError(
            f"offload_dir {str(parent)!r} is not writable ({why}): choose a directory "
            f"you can write to, or pass offload_dir=None for a temporary directory"
        ) from exc


def _no_descriptor_left() -> str:
    """What to do when opening a file fails with EMFILE or ENFILE."""
    return (
        f"the process has no file descriptor left (its limit, `ulimit -n`, is "
        f"{_open_file_limit():,}): close the planned modules it no longer uses "
        "(pm.close()), or raise the limit"
    )


def _out_of_descriptors(exc: OSError) -> bool:
    return exc.errno in (errno.EMFILE, errno.ENFILE)


class _KeptDescriptors:
    """The descriptors all of this process's stores keep open, together: each file
    kept open, and each map of one (Python's ``mmap`` holds a duplicate of the
    file's descriptor while it lives). Each store kept up to a quarter of the
    process's open-file limit, and twice that with its maps: two training modules
    alive at once, 216 spilled tensors each, held 872 of 1,024 descriptors and a
    third one's first step failed with EMFILE. Now at most a quarter of the limit
    is kept, whatever the number of stores; copies of keys past it open their file
    each time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def take(self, limit: int) -> bool:
        with self._lock:
            if self.count >= limit:
                return False
            self.count += 1
            return True

    def give(self) -> None:
        with self._lock:
            self.count -= 1

    def after_fork_in_child(self) -> None:
        """A lock of its own: a fork while a copy thread held the parent's left the
        child's copy held for good, and the child's close (its exit) waited forever."""
        self._lock = threading.Lock()


_KEPT = _KeptDescriptors()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_KEPT.after_fork_in_child)


class DiskStore:
    """Files under ``root`` (created here; removed by ``close``)."""

    def __init__(self, parent: str | os.PathLike[str] | None = None) -> None:
        # the directories processes that no longer exist left there go first
        remove_stale(tempfile.gettempdir() if parent is None else parent)
        self.root = Path(_make_root(parent))
        #: the owner's lock on ``root`` while this store lives (``offload_dirs``)
        self._owner_lock = hold(self.root)
        #: the process that made it: a forked child inherits this object and, at
        #: its exit, collects it; its files are still the parent's
        self._pid = os.getpid()
        self.entries: dict[str, Entry] = {}
        # a transient copy's file stays open, and its next write overwrites it in
        # place: no create, rename or unlink, and no page-cache pages to allocate
        # and free (512 KiB: 0.05 ms here, against 0.84 ms for a fresh file)
        #: files kept open for later copies; file objects, not bare descriptors, so
        #: that an interrupt landing anywhere around an open cannot drop a number
        #: whose descriptor stays open (see ``_open_file``)
        self._open_files: dict[str, io.FileIO] = {}
        #: a shared map (bytes) of each file kept open, at its size (module docstring)
        self._maps: dict[str, np.ndarray] = {}
        self._maps_allowed = _maps_in_place(self.root)
        self._paths: dict[str, Path] = {}
        #: most descriptors kept open at once, files and their maps: a quarter of
        #: the process's limit (1024 by default on Linux), so a model with thousands
        #: of offloaded tensors leaves descriptors for everything else; copies of
        #: keys past it open their file. The quarter is the process's, shared by
        #: all its stores (``_KeptDescriptors``)
        self.max_open_files = max(0, _open_file_limit() // 4)
        #: keys read from files this store does not own (``link``)
        self.linked = LinkedRegions()

    def path(self, key: str) -> Path:
        # kept per key: building it costs more than a small copy (26 us inside a
        # training step here, against 16 us for copying 512 KiB)
        path = self._paths.get(key)
        if path is None:
            safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in key)
            path = self._paths[key] = self.root / f"{safe}-{zlib.crc32(key.encode()):08x}.bin"
        return path

    def link(self, key: str, tensor: torch.Tensor) -> bool:
        """Read ``key`` from where ``tensor`` lies, a file this store does not own
        (a checkpoint's map), instead of writing a copy: ``planner.runtime.linked``.
        False, and nothing done, where it cannot be; the caller writes it then.
        Its file is only read from then on."""
        if not self.linked.link(key, tensor):
            return False
        self._close_file(key)  # a copy written before: replaced, as by a write
        self.path(key).unlink(missing_ok=True)
        self.entries[key] = Entry(  # its layout over a storage of its own bytes
            nbytes=tensor.numel() * tensor.element_size(),
            dtype=tensor.dtype,
            shape=tuple(tensor.shape),
            stride=tuple(tensor.stride()),
            offset=0,
            crc32=None,
        )
        return True

    def write(self, key: str, tensor: torch.Tensor, checksum: bool = True) -> Entry:
        """Write the tensor's storage; returns its entry. ``checksum=False`` for a
        transient copy: its stamp alone guards it (see the module docstring), and
        it overwrites the key's file in place."""
        self.linked.forget(key)  # a linked key written is the store's own from now on
        data = _storage_bytes(_on_host(tensor))
        if not checksum:
            entry = describe(tensor, stamp=self._overwrite(key, data))
            self.entries[key] = entry
            return entry
        self._close_file(key)  # the file is replaced: an open one would be stale
        path = self.path(key)
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)  # no half-written file, and no stale one
            path.unlink(missing_ok=True)
            if not isinstance(exc, OSError):
                raise
            raise self._write_error(key, len(data), exc) from exc
        entry = describe(tensor, zlib.crc32(data))  # stamp None: verify on first read
        self.entries[key] = entry
        return entry

    @contextlib.contextmanager
    def _writing(self, key: str, nbytes: int, create: bool) -> Iterator[tuple[int, bool]]:
        """(fd, kept) of the key's file opened for writing in place (``create``: made
        if missing): kept open for later copies unless ``max_open_files`` are open
        (then closed after). A failed write removes the file (no half-written one)
        and is raised as a ``StoreError``. Whether the file is closed after is read
        from ``_open_files``, not from a flag set after the keep: an interrupt
        between the two closed a file the store still held."""
        file = self._open_files.get(key)
        try:
            if file is None:
                path = self.path(key)
                if create:
                    with io.FileIO(path, "a", opener=_private_open):
                        pass  # made if missing, as it is: "r+" does not create
                file = io.FileIO(path, "r+", opener=os.open)
                self._keep_open(key, file)
            yield file.fileno(), self._open_files.get(key) is file
        except OSError as exc:
            self.discard(key)
            raise self._write_error(key, nbytes, exc) from exc
        finally:
            if file is not None and self._open_files.get(key) is not file:
                file.close()

    def _overwrite(self, key: str, data: memoryview) -> tuple[int, int, int]:
        """Write ``data`` over the key's open file (created on first use), through
        its map when kept open; its stamp."""
        with self._writing(key, len(data), create=True) as (fd, kept):
            if os.fstat(fd).st_size != len(data):
                self._drop_map(key)  # the resize frees blocks: allocate and map again
                os.ftruncate(fd, len(data))
            mapped = self._map_of(key, fd, len(data)) if kept else None
            if mapped is not None:
                _copy_bytes(mapped, np.frombuffer(data, dtype=np.uint8))
            else:
                _pwrite_all(fd, data, 0)
            return _stamp(os.fstat(fd))

    def write_rows(self, key: str, tensor: torch.Tensor, dim: int, index: torch.Tensor) -> None:
        """Write ``tensor``'s slices at ``index`` along ``dim`` over ``key``'s file,
        in place: the rest of the file holds the rest of ``tensor`` already (a key/
        value cache read from it, then one token's rows written in). A few small
        ``pwrite`` calls where the whole tensor would be megabytes; the whole
        tensor where its layout is not the file's, or not dense."""
        entry = self.entries.get(key)
        linked = key in self.linked  # its file is not the store's: write all of it
        if entry is None or linked or not entry.laid_out_as(tensor) or not tensor.is_contiguous():
            self.write(key, tensor, checksum=False)
            return
        dim %= tensor.dim()  # the op's own dim: index_copy_(-1, ...) counts from the end
        data = _storage_bytes(tensor)
        item = tensor.element_size()
        inner = item * math.prod(tensor.shape[dim + 1 :])  # bytes of one row
        length = tensor.shape[dim]
        offset = int(tensor.storage_offset()) * item
        runs = _runs(index.reshape(-1).tolist())  # index_copy_ takes a 0-dim position too
        with self._writing(key, len(data), create=False) as (fd, _):
            for outer in range(math.prod(tensor.shape[:dim])):
                for first, count in runs:
                    start = offset + (outer * length + first) * inner
                    _pwrite_all(fd, data[start : start + count * inner], start)
            self.entries[key] = dataclasses.replace(entry, crc32=None, stamp=_stamp(os.fstat(fd)))

    def _map_of(self, key: str, fd: int, nbytes: int) -> np.ndarray | None:
        """The shared map of ``key``'s open file ``fd`` at ``nbytes``, made (its
        blocks allocated first) unless there; None where copies go through
        ``pwrite``/``preadv`` instead: an empty file (it cannot be mapped), one over
        ``MAP_COPY_MAX_BYTES``, past ``MAX_MAPS``, on a file system whose blocks are
        not overwritten in place (``_maps_in_place``), or where the map cannot be
        made. No room on the disk raises."""
        mapped = self._maps.get(key)
        if mapped is not None and mapped.size == nbytes:
            return mapped
        self._drop_map(key)  # resized since: never copy through a stale map
        if not (0 < nbytes <= MAP_COPY_MAX_BYTES and self._maps_allowed):
            return None
        if len(self._maps) >= MAX_MAPS or not self._take_descriptor():  # the map's own fd
            return None
        try:
            os.posix_fallocate(fd, 0, nbytes)  # a full disk fails here, not in a copy
            buffer = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            _KEPT.give()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            return None  # no fallocate or mmap here (ENODEV, EOPNOTSUPP, ENOMEM): pwrite
        mapped = self._maps[key] = np.frombuffer(buffer, dtype=np.uint8)
        return mapped

    def _take_descriptor(self) -> bool:
        """One more descriptor kept open, if the process's count of them, which
        includes this store's, is under ``max_open_files`` (``_KeptDescriptors``)."""
        return _KEPT.take(self.max_open_files)

    def _drop_map(self, key: str) -> None:
        if self._maps.pop(key, None) is not None:
            _KEPT.give()  # the map's descriptor closes with it

    def _keep_open(self, key: str, file: io.FileIO) -> bool:
        """Keep ``file`` open for ``key``'s later copies, unless ``max_open_files``
        are open already (then the caller closes it, and reads open the file)."""
        if not self._take_descriptor():
            return False
        self._open_files[key] = file
        return True

    def _write_error(self, key: str, nbytes: int, exc: OSError) -> StoreError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            what = (
                "the disk is full: free space on it, or plan again with offload_dir= "
                "a directory on a disk with more room"
            )
        elif exc.errno in (errno.EMFILE, errno.ENFILE):
            what = _no_descriptor_left()
        else:
            what = (
                "check that the directory is writable and its disk healthy, or plan "
                "again with offload_dir= another directory"
            )
        return StoreError(
            f"writing {key!r} ({nbytes:,} bytes) to the offload directory "
            f"{self.root} failed: {exc.strerror or exc}; {what}"
        )

    def _close_file(self, key: str) -> None:
        self._drop_map(key)
        file = self._open_files.pop(key, None)
        if file is not None:
            file.close()
            _KEPT.give()

    def read_into(
        self, key: str, out: torch.Tensor, view: memoryview | None = None
    ) -> torch.Tensor:
        """Fill ``out`` (allocated by ``empty_like_entry``) from the file; verify size,
        stamp and checksum. ``view``: the bytes of ``out``'s storage where the caller
        has them (``empty_for_read``)."""
        entry, path = self._stored(key)
        if view is None:
            view = _storage_bytes(out)
        if key in self.linked:
            self.linked.read_into(key, view)
            return out
        kept = self._open_files.get(key)
        if kept is not None:  # kept open: no open and close per read (see ``_read_fd``)
            return self._read_fd(key, kept.fileno(), entry, path, view, out)
        # A file object, not a bare descriptor: a Ctrl-C landing after the open and
        # before the close (the interpreter checks for signals after each call
        # returns) dropped the number, and the descriptor stayed open for good,
        # holding the file's disk space after close() removed it. The object
        # closes its descriptor when dropped, wherever the interrupt lands.
        try:
            file = self._open_file(key, path)
        except FileNotFoundError as exc:
            raise self._missing(key, path) from exc
        with file:
            return self._read_fd(key, file.fileno(), entry, path, view, out)

    def _read_fd(
        self, key: str, fd: int, entry: Entry, path: Path, view: memoryview, out: torch.Tensor
    ) -> torch.Tensor:
        """``read_into`` through an open file of the key: its stamp, then its bytes if
        the size is right, then the checks. Keys with a file kept open read through
        it (inside a CNN's training step, 144 KiB weights read in 24-54 us opened per
        read, 20-28 us through the open file). A file deleted or replaced since it was
        opened has no link left."""
        st = os.fstat(fd)
        if st.st_nlink == 0:
            raise self._missing(key, path)
        size = st.st_size
        mapped = self._maps.get(key)
        if size == len(view) and mapped is not None and mapped.size == size:
            _copy_bytes(np.frombuffer(view, dtype=np.uint8), mapped)
        elif size == len(view):
            done = 0
            while done < size:
                got = os.preadv(fd, [view[done:]], done)
                if got == 0:  # shrunk since the fstat
                    break
                done += got
            size = done
        self._verify(key, entry, path, size, _stamp(st), view)
        return out

    def map_private(self, key: str) -> torch.Tensor:
        """The tensor stored under ``key`` as a private (copy-on-write) map of its
        file, after the same checks as a read: its bytes are the page cache's, read
        in by the kernel as they are touched, never copied into process memory, and
        writes through the map would not reach the file."""
        entry, path = self._stored(key)
        if key in self.linked:
            return self.linked.map_private(key)
        try:
            st = os.stat(path)
        except FileNotFoundError as exc:
            raise self._missing(key, path) from exc
        size = st.st_size
        raw = None  # mapped only at the right size; a wrong one fails the check first
        if size == entry.nbytes:
            raw = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
        self._verify(key, entry, path, size, _stamp(st), raw.numpy() if raw is not None else None)
        assert raw is not None
        return with_layout(raw, entry)

    def _stored(self, key: str) -> tuple[Entry, Path]:
        entry = self.entries.get(key)
        if entry is None:
            raise StoreError(f"nothing stored under {key!r}")
        return entry, self.path(key)

    def _open_file(self, key: str, path: Path, mode: str = "r") -> io.FileIO:
        """The key's file opened (``_opening``), in an object that closes it when
        dropped. ``os.open`` is called from FileIO's C code: no signal is handled
        between the open and the object taking the descriptor."""
        with self._opening(key, path):
            return io.FileIO(path, mode, opener=os.open)

    @contextlib.contextmanager
    def _opening(self, key: str, path: Path) -> Iterator[None]:
        """Around an open of the key's file: no descriptor left (EMFILE, ENFILE) is
        a StoreError saying what to do, any other failure is raised as it is."""
        try:
            yield
        except OSError as exc:
            if not _out_of_descriptors(exc):
                raise
            raise StoreError(
                f"opening the offload file for {key!r} ({path}) failed: "
                f"{exc.strerror or exc}; {_no_descriptor_left()}"
            ) from exc

    def _missing(self, key: str, path: Path) -> StoreError:
        return StoreError(
            f"offload file for {key!r} is missing ({path}): it was deleted or replaced "
            f"while the planned module still needs it; {REPLAN}"
        )

    def _verify(
        self, key: str, entry: Entry, path: Path, size: int, stamp: tuple[int, int, int], data: Any
    ) -> None:
        """The checks a read and a map share: the file's size, then its stamp or,
        with a checksum, its bytes (``data``)."""
        if size != entry.nbytes:
            raise StoreError(
                f"offload file for {key!r} has the wrong size ({path}): "
                f"expected {entry.nbytes} bytes; {REPLAN}"
            )
        # The checksum costs a pass over the bytes: verify once per write, and again
        # whenever the file was replaced or touched since (another writer, a
        # corrupting tool, even one that puts the old mtime back). Without one, a
        # touched file cannot be verified: it is an error.
        if entry.crc32 is None and entry.stamp is not None and entry.stamp != stamp:
            raise StoreError(
                f"offload file for {key!r} was changed after the planner wrote it "
                f"({path}); nothing else may write to the offload directory: {REPLAN}"
            )
        if entry.crc32 is not None and entry.stamp != stamp:
            if zlib.crc32(data) != entry.crc32:
                raise StoreError(
                    f"offload file for {key!r} is corrupted (checksum mismatch, {path}); {REPLAN}"
                )
            self.entries[key] = dataclasses.replace(entry, stamp=stamp)

    def map_shared(self, key: str) -> torch.Tensor:
        """The tensor stored under ``key`` as a shared map of its file: writes
        through it (an optimizer updating a trained parameter in place) change the
        file, and reads see them. Its bytes are file-backed (the page cache), not
        process memory. The entry keeps no checksum from now on."""
        entry = self.entries.get(key)
        if entry is None:
            raise StoreError(f"nothing stored under {key!r}")
        if key in self.linked:  # writes through the map would reach another's file
            raise StoreError(f"{key!r} is read in place from a file the store does not own")
        self.entries[key] = dataclasses.replace(entry, crc32=None, stamp=None)
        path = self.path(key)
        if key not in self._open_files:  # reads of it go through an open file too
            file = self._open_file(key, path, "r+")
            if not self._keep_open(key, file):
                file.close()
            else:
                try:
                    self._map_of(key, file.fileno(), entry.nbytes)  # copies through a map
                except OSError:
                    pass  # no room to allocate (its blocks exist: it was written): pwrite

        return _map_shared(path, entry)

    def create_mapped(self, key: str, like: torch.Tensor) -> torch.Tensor:
        """A new zero-filled file the size of ``like``'s storage, mapped shared, as a
        tensor with ``like``'s layout (a gradient's home: see ``map_shared``)."""
        entry = describe(like)
        path = self.path(key)
        self.linked.forget(key)
        try:
            with open(path, "wb") as f:
                f.truncate(entry.nbytes)
                if entry.nbytes:  # blocks allocated now: a full disk fails here, not in a copy
                    os.posix_fallocate(f.fileno(), 0, entry.nbytes)
        except OSError as exc:
            path.unlink(missing_ok=True)
            what = (
                _no_descriptor_left()
                if _out_of_descriptors(exc)
                else "plan again with offload_dir= a writable directory with room"
            )
            raise StoreError(
                f"creating {key!r} ({entry.nbytes:,} bytes) in the offload directory "
                f"{self.root} failed: {exc.strerror or exc}; {what}"
            ) from exc
        self.entries[key] = entry
        return _map_shared(path, entry)

    def discard(self, key: str) -> None:
        """Forget ``key`` and remove its file (and any half-written one)."""
        self._close_file(key)
        self.linked.forget(key)
        self.entries.pop(key, None)
        path = self.path(key)
        path.with_suffix(".tmp").unlink(missing_ok=True)
        path.unlink(missing_ok=True)

    def close(self) -> None:
        """Remove the files, in the process that made them; in a forked child,
        which only inherited this object, close its copies of the descriptors and
        leave the files to the parent (a child's normal exit removed them, and
        the parent's next call found its weights gone)."""
        for key in list(self._open_files):
            self._close_file(key)
        self.linked.close()
        if os.getpid() == self._pid:
            shutil.rmtree(self.root, ignore_errors=True)
        self.entries.clear()
        if self._owner_lock is not None:  # a child's copy: the parent's still holds it
            os.close(self._owner_lock)
            self._owner_lock = None


#: ``os.open`` with the store's file mode, as a FileIO opener: all C, so no signal
#: is handled between the open and the file object taking its descriptor
_private_open = functools.partial(os.open, mode=0o600)

_PAGE_BYTES = 4096


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``pwrite`` may write less per call)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """(first, count) of each run of consecutive positions, in order: one write
    per run (a prompt's tokens are consecutive)."""
    runs: list[tuple[int, int]] = []
    for p in sorted(set(positions)):
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return runs


def fault_in(mapped: torch.Tensor) -> None:
    """Touch one byte of every page of a mapped tensor's storage, so the disk reads
    (and the page-table entries) happen on the calling thread, not inside the op
    that reads the tensor. ``POSIX_FADV_WILLNEED`` did not do it here: a 64 MiB
    file read as slowly 0.2 s after the advice as with none (58-64 ms). Only the
    tensor's own bytes, should its storage be larger."""
    if mapped.numel() == 0:
        return
    item = mapped.element_size()
    extent = 1 + sum((n - 1) * s for n, s in zip(mapped.shape, mapped.stride()))
    raw = torch.empty(0, dtype=torch.uint8).set_(
        mapped.untyped_storage(), int(mapped.storage_offset()) * item, (extent * item,), (1,)
    )
    raw[::_PAGE_BYTES].sum()  # the sum is discarded; the reads are the point

"""Async copies between the device and the tiers, behind one interface.

``ThreadCopyEngine`` (CPU device): one background thread per channel (disk read,
disk write), so copies run in issue order on each channel, as the cost model
assumes, and overlap compute (file I/O and torch kernels release the GIL). Copies
of ``SYNC_MAX_BYTES`` or less are made on the calling thread when issued: for them
the hand-off to a thread costs more than the copy.
``CudaCopyEngine`` (GPU device): side streams and events for host<->device copies
through pinned host buffers that are reused across calls (the host tier); disk goes
through a pinned bounce buffer per copy, filled or emptied by the channel's thread.

A copy returns a ``Pending`` handle; ``wait`` blocks until it is done and returns
the device tensor (for reads). Destinations are allocated at issue time on the
calling thread, so the budget and the meter see them when the plan says.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from planner.runtime.store import (
    DiskStore,
    Entry,
    describe,
    empty_for_read,
    empty_like_entry,
    fault_in,
    mark_copy_thread,
    with_layout,
)


@dataclass
class Pending:
    """An issued copy. ``tensor``: the destination (reads) or source (writes)."""

    tensor: torch.Tensor
    future: Future | None = None
    event: Any = None
    extra: list = field(default_factory=list)
    #: set on the tensor once the read completes (a parameter comes back as one)
    requires_grad: bool = False


class CopyEngine:
    """Interface the generated code's runtime calls."""

    #: the disk tier
    disk: DiskStore

    def prefetch(self, key: str, tier: str) -> Pending:
        raise NotImplementedError

    def offload(self, key: str, tier: str, tensor: torch.Tensor) -> Pending:
        raise NotImplementedError

    def wait(self, pending: Pending) -> torch.Tensor:
        raise NotImplementedError

    def store_now(self, key: str, tier: str, tensor: torch.Tensor) -> None:
        """Synchronous write (weights at plan time)."""
        raise NotImplementedError

    def link_now(self, key: str, tier: str, tensor: torch.Tensor) -> bool:
        """Instead of ``store_now``: read ``key`` from where ``tensor`` lies in
        ``tier`` already (a checkpoint's map, on disk: ``DiskStore.link``), where
        it can (True); nothing may write it then."""
        return tier == "disk" and self.disk.link(key, tensor)

    def read_now(self, key: str, tier: str) -> torch.Tensor:
        """A read the caller waits for at once (``prefetch`` then ``wait``)."""
        return self.wait(self.prefetch(key, tier))

    def write_now(self, key: str, tier: str, tensor: torch.Tensor) -> None:
        """A write the caller waits for at once (``offload`` then ``wait``)."""
        self.wait(self.offload(key, tier, tensor))

    def write_rows(
        self, key: str, tier: str, tensor: torch.Tensor, dim: int, index: torch.Tensor
    ) -> None:
        """Write the slices of ``tensor`` at ``index`` along ``dim`` over ``key``'s
        copy in ``tier``, whose other slices hold ``tensor``'s already (a cache's
        new token); here the whole tensor, at once."""
        self.write_now(key, tier, tensor)

    def home_tensor(self, key: str, tier: str) -> torch.Tensor:
        """The tensor that holds ``key``'s copy in ``tier`` (stored by ``store_now``)
        and that later reads of ``key`` read: a trained parameter's data becomes
        it, so the optimizer's in-place updates reach the next step."""
        raise NotImplementedError

    def copy_to_host(self, key: str, tensor: torch.Tensor) -> tuple[torch.Tensor, Pending]:
        """Start copying a device tensor into ``key``'s host buffer, in its layout
        (a gradient delivered to its host-homed parameter): (the host tensor, valid
        until ``key``'s next copy; the pending write, which ``wait`` orders before
        later ops and ``synchronize`` completes for the host)."""
        raise NotImplementedError(f"{type(self).__name__} has no host tier")

    def synchronize(self, pending: Pending) -> None:
        """Block the calling thread until ``pending``'s copy is complete."""
        self.wait(pending)

    def settle(self) -> None:
        """At the end of a call: block until no copy still reads memory the caller
        may write before the next call (a trained parameter's host home, which the
        optimizer updates in place). Nothing to wait for where copies are made on
        the host's own threads and waited for within the call."""

    def drain(self) -> None:
        """Block until every copy issued so far has finished (successfully or not);
        their errors are dropped. For a run that stopped half-way: afterwards no
        copy is still touching its tensors or files."""

    def close(self) -> None:
        pass


CPU = torch.device("cpu")


def _noop() -> None:
    pass


def _copy_thread(name: str) -> ThreadPoolExecutor:
    """One worker thread for a copy channel, marked as such (``mark_copy_thread``)."""
    return ThreadPoolExecutor(1, thread_name_prefix=name, initializer=mark_copy_thread)


#: Smallest copy read by mapping (see ``ThreadCopyEngine.mappable``): glibc serves
#: allocations this large (its largest mmap threshold) from fresh pages every time.
#: Below it a copy lands in recycled heap memory, and a map, whose pages fault in
#: as the op reads them, is the slower: the MLP example's 1 MiB weights ran a
#: forward in 3.3-3.7 ms mapped against 2.3-2.6 ms copied.
MAP_MIN_BYTES = 32 * 2**20

#: Largest copy made on the calling thread instead of a copy thread (CPU device).
#: Handing a copy to a thread and waiting for it costs more than a small copy
#: itself: 512 KiB written then waited took 0.25 ms through the writer thread
#: against 0.05 ms written in place, and read 0.31 ms against 0.05 ms (page cache,
#: this machine). On a CPU the thread's copy also runs on the cores the ops use
#: (the cost model charges it to them: ``copy_compute_share`` 1), so the thread
#: buys no overlap for a copy this small; only larger ones, and reads of maps, whose
#: pages may have to come from the disk, go to the threads.
SYNC_MAX_BYTES = 2**20


def completes_at_issue(device: torch.device, nbytes: int) -> bool:
    """Whether a copy of ``nbytes`` between ``device`` and its disk tier is made
    on the calling thread when issued (``SYNC_MAX_BYTES``): the generated code then
    reads or writes it at once (``read_now``, ``write_now``) and has no wait to
    make later, a wait that would split a compiled run of ops in two."""
    return device.type == "cpu" and nbytes <= SYNC_MAX_BYTES


class ThreadCopyEngine(CopyEngine):
    def __init__(self, disk: DiskStore) -> None:
        self.disk = disk
        self._read = _copy_thread("planner-disk-read")
        self._write = _copy_thread("planner-disk-write")
        #: keys nothing writes (weights, in inference): those of ``MAP_MIN_BYTES``
        #: or more are read back as private maps of their files, not copies. A copy
        #: of a 64 MiB weight costs the cores a memcpy and 16k page faults of a
        #: fresh buffer (~25 ms here, 0.38 s per forward of the Accelerate
        #: benchmark's model); a map costs neither, and the reader thread faults its
        #: pages in (``fault_in``), so the disk's reads overlap compute.
        self.mappable: set[str] = set()

    def _check_tier(self, tier: str) -> None:
        if tier != "disk":
            raise ValueError(f"tier {tier!r} is not available on the CPU (only 'disk')")

    def prefetch(self, key: str, tier: str) -> Pending:
        self._check_tier(tier)
        if self._maps(key):
            mapped = self.disk.map_private(key)  # checked like a read
            # its pages read in on the reader thread, not inside the op
            return Pending(mapped, self._read.submit(fault_in, mapped))
        entry = self.disk.entries[key]
        if completes_at_issue(CPU, entry.nbytes):
            return Pending(self.read_now(key, tier))  # done when issued
        out = empty_like_entry(entry)
        return Pending(out, self._read.submit(self.disk.read_into, key, out))

    def home_tensor(self, key: str, tier: str) -> torch.Tensor:
        self._check_tier(tier)
        return self.disk.map_shared(key)

    def _maps(self, key: str) -> bool:
        return key in self.mappable and self.disk.entries[key].nbytes >= MAP_MIN_BYTES

    def read_now(self, key: str, tier: str) -> torch.Tensor:
        # on the calling thread: handing a read to the reader thread and waiting
        # for it costs ~70 us more per copy (measured here), for no overlap
        self._check_tier(tier)
        if self._maps(key):
            return self.disk.map_private(key)
        out, view = empty_for_read(self.disk.entries[key])  # one allocation for both
        return self.disk.read_into(key, out, view)

    def write_rows(
        self, key: str, tier: str, tensor: torch.Tensor, dim: int, index: torch.Tensor
    ) -> None:
        self._check_tier(tier)
        self.disk.write_rows(key, tensor, dim, index)

    def offload(self, key: str, tier: str, tensor: torch.Tensor) -> Pending:
        self._check_tier(tier)
        # a transient copy, read back this call: no checksum (see store.py)
        if completes_at_issue(CPU, tensor.untyped_storage().nbytes()):
            self.disk.write(key, tensor, checksum=False)
            return Pending(tensor)
        # record the layout now so a prefetch issued before this write ends can
        # allocate its destination; the file's stamp arrives with the write
        self.disk.entries[key] = describe(tensor)
        return Pending(tensor, self._write.submit(self.disk.write, key, tensor, checksum=False))

    def wait(self, pending: Pending) -> torch.Tensor:
        if pending.future is not None:
            pending.future.result()
        return pending.tensor

    def store_now(self, key: str, tier: str, tensor: torch.Tensor) -> None:
        self._check_tier(tier)
        self.disk.write(key, tensor)

    def drain(self) -> None:
        # one worker per channel, first in first out: a no-op queued now runs last
        for channel in (self._read, self._write):
            channel.submit(_noop).result()

    def close(self) -> None:
        self._read.shutdown(wait=True, cancel_futures=True)
        self._write.shutdown(wait=True, cancel_futures=True)


class CudaCopyEngine(CopyEngine):
    """Host tier: pinned CPU buffers (one per key, reused every call). Disk tier:
    a reader thread reads the file into a pinned bounce buffer, then a side stream
    copies it up; a writer thread writes what a side stream copied down into one.
    Every copy is ordered after the compute that produced its source by making the
    side stream wait on the compute stream, and the compute stream waits on the
    copy's event before the tensor is read (``wait``).

    A disk copy's bounce buffer is its own, dropped once the copy is issued: torch's
    pinned-memory cache takes it back only when the copy recorded on it is done,
    and hands it to a later copy. So the pinned memory held is that of the copies
    in flight, not of every key the disk tier holds (per-key buffers pinned a host
    copy of the whole tier: a model offloaded to disk because the host cannot hold
    it could not run), and no copy reuses a buffer another still reads (the host
    runs ahead of the GPU). Reads and writes have a thread each, as on the CPU
    (``ThreadCopyEngine``): a write waits for the GPU to reach its copy, and reads
    queued behind it would wait too; the generated code waits for a key's write
    before it reads the key back."""

    def __init__(self, disk: DiskStore, device: torch.device) -> None:
        self.disk = disk
        self.device = device
        self.h2d = torch.cuda.Stream(device)
        self.d2h = torch.cuda.Stream(device)
        self.host: dict[str, torch.Tensor] = {}
        self.host_entries: dict[str, Entry] = {}
        self._read = _copy_thread("planner-disk-read")
        self._write = _copy_thread("planner-disk-write")
        #: per host key, rows still being written into its pinned home (``write_rows``)
        self._rows_pending: dict[str, Future] = {}
        #: host keys whose pinned home is handed out (``home_tensor``: a trained
        #: parameter's data), and the last upload issued from one (``settle``)
        self._handed_out: set[str] = set()
        self._home_upload: torch.cuda.Event | None = None
        #: per host key, the last copy out of its pinned buffer (an upload) and the
        #: last copy into it (a download). A copy the other way waits for it on its
        #: own stream: the generated code orders them through the compute stream,
        #: which holds only for calls made on one stream (two threads with a stream
        #: each, or a caller switching streams between calls: a call's write into
        #: a buffer overtook the previous call's read of it)
        self._last_upload: dict[str, torch.cuda.Event] = {}
        self._last_download: dict[str, torch.cuda.Event] = {}

    def _pinned(self, key: str, entry: Entry) -> torch.Tensor:
        buf = self.host.get(key)
        if buf is None or buf.untyped_storage().nbytes() != entry.nbytes:
            buf = self.host[key] = _new_pinned(entry)
        elif (buf.shape, buf.stride(), buf.storage_offset()) != (
            entry.shape,
            entry.stride,
            entry.offset,
        ):
            buf = with_layout(buf, entry)  # same bytes, this copy's layout
        return buf

    def _download(self, buf: torch.Tensor, tensor: torch.Tensor) -> torch.cuda.Event:
        """Copy ``tensor``'s storage into pinned ``buf`` on the d2h stream, after
        the compute that made it; ``tensor`` stays allocated until the copy is done.
        The event blocks a host thread that waits for it rather than spinning a core."""
        compute = torch.cuda.current_stream(self.device)
        self.d2h.wait_stream(compute)
        with torch.cuda.stream(self.d2h):
            buf.untyped_storage().copy_(tensor.untyped_storage(), non_blocking=True)
            event = torch.cuda.Event(blocking=True)
            event.record(self.d2h)
        tensor.record_stream(self.d2h)
        return event

    def _after_reads_of(self, key: str) -> None:
        """Order d2h's next copy after the last upload from ``key``'s pinned buffer."""
        read = self._last_upload.get(key)
        if read is not None:
            self.d2h.wait_event(read)

    def _after_writes_of(self, key: str) -> None:
        """Order h2d's next copy after the last download into ``key``'s pinned buffer."""
        written = self._last_download.get(key)
        if written is not None:
            self.h2d.wait_event(written)

    def _rows_written(self, key: str) -> None:
        """Wait until the rows last written into ``key``'s host home are there
        (before anything reads or overwrites it)."""
        pending = self._rows_pending.pop(key, None)
        if pending is not None:
            pending.result()

    def write_rows(
        self, key: str, tier: str, tensor: torch.Tensor, dim: int, index: torch.Tensor
    ) -> None:
        """Only the new rows go down (a token's keys or values: kilobytes of a
        cache of megabytes): gathered on the device, copied with their positions
        into small pinned buffers on the d2h stream, then put into the host home's
        rows on the I/O thread once that copy is done. The next read of the home
        waits for them (``_rows_written``). Anything else (a disk home, a layout
        that is not the home's): the whole tensor, at once."""
        entry = self.host_entries.get(key)
        if tier != "host" or entry is None or not entry.laid_out_as(tensor):
            self.write_now(key, tier, tensor)
            return
        self._rows_written(key)  # last call's (long done): its buffers are reused
        home = self._pinned(key, entry)
        self._after_reads_of(key)  # put_rows writes the home once d2h gets here
        rows = tensor.index_select(dim, index)
        # a copy: the caller may advance its own index in place before d2h reads it
        positions = index.to(device=tensor.device, dtype=torch.int64, copy=True)
        rows_host = self._pinned("rows:" + key, describe(rows))
        positions_host = self._pinned("rows-index:" + key, describe(positions))
        self.d2h.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.d2h):
            rows_host.copy_(rows, non_blocking=True)
            positions_host.copy_(positions, non_blocking=True)
            event = torch.cuda.Event(blocking=True)
            event.record(self.d2h)
        rows.record_stream(self.d2h)
        positions.record_stream(self.d2h)

        def put_rows() -> None:
            event.synchronize()
            home.index_copy_(dim, positions_host, rows_host)

        self._rows_pending[key] = self._write.submit(put_rows)

    def prefetch(self, key: str, tier: str) -> Pending:
        if tier == "host":
            self._rows_written(key)
            entry = self.host_entries[key]
            src = self.host[key]
            handed_out = key in self._handed_out
            self._after_writes_of(key)
            pending = self._upload(src, entry, blocking=handed_out)
            self._last_upload[key] = pending.event
            if handed_out:  # settle waits for it on the host
                self._home_upload = pending.event
            return pending
        entry = self.disk.entries[key]
        out = self._destination(entry)

        def read_then_upload() -> torch.cuda.Event:
            staging = _new_pinned(entry)  # its own (see the class docstring)
            self.disk.read_into(key, staging)
            with torch.cuda.stream(self.h2d):
                out.untyped_storage().copy_(staging.untyped_storage(), non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.h2d)
            return event

        return Pending(out, future=self._read.submit(read_then_upload))

    def _destination(self, entry: Entry) -> torch.Tensor:
        """A read's device tensor, from the compute stream's pool (where the ops
        that read it and every other tensor of the plan allocate: blocks a side
        stream allocated would be held apart for that stream's allocations alone,
        so the memory reserved could approach both pools' peaks), marked as
        written on h2d so the allocator does not reuse it before the copy is done.
        h2d waits for the compute stream as far as it is now, so the copy cannot
        overtake an earlier op still using the block."""
        self.h2d.wait_stream(torch.cuda.current_stream(self.device))
        out = empty_like_entry(entry, self.device)
        out.record_stream(self.h2d)
        return out

    def _upload(self, src: torch.Tensor, entry: Entry, blocking: bool = False) -> Pending:
        """``blocking``: the event is one a host thread will wait for, which then
        sleeps rather than spinning a core (as ``_download``'s)."""
        out = self._destination(entry)
        with torch.cuda.stream(self.h2d):
            out.untyped_storage().copy_(src.untyped_storage(), non_blocking=True)
            event = torch.cuda.Event(blocking=blocking)
            event.record(self.h2d)
        return Pending(out, event=event)

    def offload(self, key: str, tier: str, tensor: torch.Tensor) -> Pending:
        entry = describe(tensor)
        if tier == "host":
            self._rows_written(key)
        # the host tier's buffer is the key's own; a disk write's bounce buffer is
        # this copy's (see the class docstring)
        buf = self._pinned(key, entry) if tier == "host" else _new_pinned(entry)
        if tier == "host":
            self._after_reads_of(key)
        event = self._download(buf, tensor)
        if tier == "host":
            self.host_entries[key] = entry
            self._last_download[key] = event
            return Pending(tensor, event=event)
        self.disk.entries[key] = entry

        def write_when_copied() -> None:
            event.synchronize()
            self.disk.write(key, buf, checksum=False)  # transient: read back this call

        return Pending(tensor, future=self._write.submit(write_when_copied), event=event)

    def copy_to_host(self, key: str, tensor: torch.Tensor) -> tuple[torch.Tensor, Pending]:
        # one pinned buffer per key, reused each step: the .grad is made from it
        # (Runtime.finish_deliveries), so pinned memory does not grow with the
        # gradients the user keeps (the pinned allocator also rounds up to powers of 2)
        host = self._pinned("deliver:" + key, describe(tensor))
        return host, Pending(tensor, event=self._download(host, tensor))

    def synchronize(self, pending: Pending) -> None:
        if pending.event is not None:
            pending.event.synchronize()

    def wait(self, pending: Pending) -> torch.Tensor:
        if pending.future is not None:
            result = pending.future.result()
            if isinstance(result, torch.cuda.Event):
                pending.event = result
        if pending.event is not None:
            torch.cuda.current_stream(self.device).wait_event(pending.event)
            if pending.tensor.device.type == "cuda":
                pending.tensor.record_stream(torch.cuda.current_stream(self.device))
        return pending.tensor

    def home_tensor(self, key: str, tier: str) -> torch.Tensor:
        # the pinned buffer a host prefetch uploads from, or the disk file's map
        # (a disk prefetch reads the file, which sees writes through the map)
        if tier == "host":
            self._rows_written(key)
            self._handed_out.add(key)
            return self.host[key]
        return self.disk.map_shared(key)

    def settle(self) -> None:
        # The host runs ahead of the GPU: an upload from a trained parameter's
        # pinned home may not have run when the call returns, and the optimizer's
        # step (or a validation forward's, then the step's) writes that home in
        # place. One stream, in order: its last upload done, all are.
        event, self._home_upload = self._home_upload, None
        if event is not None:
            event.synchronize()

    def store_now(self, key: str, tier: str, tensor: torch.Tensor) -> None:
        if tier == "host":
            self._rows_written(key)
            for copy in (self._last_upload.pop(key, None), self._last_download.pop(key, None)):
                if copy is not None:  # the host writes the buffer: no copy may touch it
                    copy.synchronize()
            entry = describe(tensor)
            buf = self._pinned(key, entry)
            buf.untyped_storage().copy_(tensor.untyped_storage())
            self.host_entries[key] = entry
        else:
            self.disk.write(key, tensor)

    def drain(self) -> None:
        # one worker per channel, first in first out: a no-op queued now runs last
        for channel in (self._read, self._write):
            channel.submit(_noop).result()
        self.h2d.synchronize()
        self.d2h.synchronize()
        self._home_upload = None
        self._last_upload.clear()
        self._last_download.clear()
        # done or failed: a failed one's error is dropped, not raised at next call
        self._rows_pending.clear()

    def close(self) -> None:
        self._read.shutdown(wait=True, cancel_futures=True)
        self._write.shutdown(wait=True, cancel_futures=True)
        self.host.clear()


def _new_pinned(entry: Entry) -> torch.Tensor:
    """Pinned host memory of ``entry``'s storage bytes, viewed in its layout."""
    return with_layout(torch.empty(entry.nbytes, dtype=torch.uint8, pin_memory=True), entry)


def make_engine(device: torch.device, disk: DiskStore) -> CopyEngine:
    if device.type == "cuda":
        return CudaCopyEngine(disk, device)
    return ThreadCopyEngine(disk)

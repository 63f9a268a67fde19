"""Runs the real ``CudaCopyEngine`` on the CPU, on simulated streams, and reports
the copies that a GPU could run in the wrong order (a happens-before checker).

What it models. ``copy_engine`` sees a fake ``torch.cuda``: streams, events,
``current_stream``, ``stream(...)`` and ``synchronize``. Copies still move their
data at once (so results stay right); what is recorded is the order a GPU would
need. Each copy made while a side stream is current becomes an op queued on that
stream, and so do ``wait_stream`` and ``wait_event``. Host threads (the caller's,
the engine's copy threads) are tracked too, and everything carries a vector clock
with one component per stream and per host thread, so whether one thing must be
done before another starts is a comparison of clocks. What orders them:

* a stream runs its ops in order; ``wait_stream`` and ``wait_event`` order a
  stream's later ops after another stream's ops up to then;
* an op runs after whatever the host thread that queued it had done or learned;
* ``Event.synchronize``, ``Stream.synchronize`` and ``torch.cuda.synchronize``
  tell the calling thread that the ops up to there are done;
* a copy thread's task runs after what its submitter had done when it submitted
  it, and ``Future.result()`` tells the caller what the task did and learned.

Pinned host buffers (``copy_engine._new_pinned``) are ordinary tensors kept alive
for the whole test, as the caching host allocator keeps a block until the copies
recorded on it are done (a freed buffer's address reused by another tensor would
otherwise be taken for the old buffer). A hazard is two accesses to the same pinned
buffer, at least one a write, neither ordered before the other, by two stream ops,
a stream op and a host thread, or two host threads. Host accesses seen:
``Tensor.copy_``, ``UntypedStorage.copy_`` and ``Tensor.index_copy_`` made outside
a side stream (``finish_deliveries``, ``put_rows``, ``store_now``), the disk store's
``write`` and ``read_into`` of a pinned buffer (a disk copy's bounce buffer), and an
optimizer's step over parameters whose data is a pinned host home
(``CopyOrderSimulator.watch_optimizer``).

What it does not model. The device is the CPU: the compute stream runs no ops of
its own here, so a device tensor read before its upload is done, or a device block
reused before a side stream's copy of it is done (``record_stream``, a no-op here),
goes unseen; only the pinned host buffers are checked. The compute stream's
kernels are not ops here: a wait for the compute stream orders the waiting stream
after the compute stream's last wait and after all that the calling thread had done,
which covers the kernels where, as here, one thread runs a planned call and queues
its kernels. Host accesses other than those listed above (``param.grad += host``,
for one) are not seen.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import traceback
import types
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

import planner
from planner import api, planned_module
from planner.codegen import assemble
from planner.runtime import copy_engine, store

#: per stream or host thread (by name), how many of its steps are known done
Clock = dict[str, int]

_ORIGINAL_STORAGE_COPY = torch.UntypedStorage.copy_
_ORIGINAL_TENSOR_COPY = torch.Tensor.copy_
_ORIGINAL_INDEX_COPY = torch.Tensor.index_copy_
_ORIGINAL_DISK_WRITE = store.DiskStore.write
_ORIGINAL_DISK_READ_INTO = store.DiskStore.read_into
_PLANNER_SOURCES = (str(Path(planner.__file__).parent), "<planner")  # its files, generated code


def _call_site() -> str:
    """The innermost frames of planner's code and of the code it generated."""
    frames = [
        f"{frame.name}:{frame.lineno}"
        for frame in traceback.extract_stack()
        if frame.filename.startswith(_PLANNER_SOURCES)
    ]
    return " <- ".join(reversed(frames[-4:])) or "outside planner"


def _merge(into: Clock, other: Clock) -> None:
    for name, count in other.items():
        into[name] = max(into.get(name, 0), count)


def _storage_address(tensor: Any) -> int | None:
    """The address of ``tensor``'s storage; None for one without data (a fake
    tensor while tracing)."""
    try:
        storage = tensor if isinstance(tensor, torch.UntypedStorage) else tensor.untyped_storage()
        return storage.data_ptr()
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


class Access:
    """One step of a stream or host thread (``actor``): its clock, and the pinned
    buffers it reads ("r") or writes ("w") by address (none for a wait)."""

    def __init__(self, actor: str, clock: Clock, what: str, touches: list[tuple[int, str]]):
        self.actor, self.clock, self.what, self.touches = actor, clock, what, touches
        self.call_site = _call_site()

    def ordered_before(self, other: Access) -> bool:
        """Whether ``other`` cannot start before this step is done."""
        return self.clock[self.actor] <= other.clock.get(self.actor, 0)

    def describe(self) -> str:
        return f"{self.actor} {self.what} [{self.call_site}]"


class FakeStream:
    def __init__(self, simulator: CopyOrderSimulator, name: str) -> None:
        self.simulator, self.name = simulator, name
        self.ops_queued = 0
        self.last: Access | None = None

    def queue(self, what: str, after: Access | None, touches: list[tuple[int, str]]) -> None:
        """Queue an op after this stream's last, ``after`` (a wait's) and what the
        calling thread knows."""
        with self.simulator.lock:
            clock = dict(self.simulator.thread_clock())
            for earlier in (self.last, after):
                if earlier is not None:
                    _merge(clock, earlier.clock)
            self.ops_queued += 1
            clock[self.name] = self.ops_queued
            self.last = Access(self.name, clock, what, touches)
            self.simulator.check(self.last)

    def wait_stream(self, other: FakeStream) -> None:
        self.queue(f"wait_stream({other.name})", other.last, [])

    def wait_event(self, event: FakeEvent) -> None:
        self.queue("wait_event", event.op, [])

    def synchronize(self) -> None:
        self.simulator.host_waits_for(self.last)

    def __repr__(self) -> str:
        return f"<FakeStream {self.name}>"


class FakeEvent:
    """``torch.cuda.Event``: ``record`` marks a stream's last op, ``synchronize``
    tells the calling thread it is done. Each simulator has its subclass, which
    sets ``simulator`` (``copy_engine`` makes events as ``torch.cuda.Event(...)``)."""

    simulator: CopyOrderSimulator

    def __init__(self, blocking: bool = False, **_: Any) -> None:
        self.op: Access | None = None

    def record(self, stream: FakeStream | None = None) -> None:
        self.op = (stream or self.simulator.current_stream()).last

    def synchronize(self) -> None:
        self.simulator.host_waits_for(self.op)


class JoinableFuture:
    """A copy thread's ``Future``, whose ``result()`` tells the caller's thread
    what the task did and learned (``CopyOrderSimulator.copy_thread``)."""

    def __init__(self, future: Future, clock_at_end: Clock, simulator: CopyOrderSimulator):
        self.future, self.clock_at_end, self.simulator = future, clock_at_end, simulator

    def result(self, timeout: float | None = None) -> Any:
        value = self.future.result(timeout)
        with self.simulator.lock:
            _merge(self.simulator.thread_clock(), self.clock_at_end)
        return value

    def __getattr__(self, name: str) -> Any:
        return getattr(self.future, name)


class CopyOrderSimulator:
    """The simulated streams, host threads and pinned buffers of one test, and the
    hazards seen."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.streams = [FakeStream(self, "compute")]
        self._side_stream_numbers = itertools.count(1)
        self._host_thread_numbers = itertools.count(1)
        self._engine_numbers = itertools.count(1)
        self._per_thread = threading.local()
        #: steps that touched a pinned buffer, of streams and host threads
        self.accesses: list[Access] = []
        #: pinned buffers by storage address: a label, and the buffer (kept alive)
        self.pinned: dict[int, tuple[str, torch.Tensor]] = {}
        self.hazards: list[str] = []

    # -- host threads --------------------------------------------------------

    def thread_clock(self) -> Clock:
        """The calling host thread's clock (what it did and knows is done)."""
        state = self._per_thread
        if not hasattr(state, "clock"):
            name = f"host{next(self._host_thread_numbers)}({threading.current_thread().name})"
            state.name, state.clock = name, {name: 0}
        return state.clock

    def host_waits_for(self, op: Access | None) -> None:
        if op is not None:
            with self.lock:
                _merge(self.thread_clock(), op.clock)

    def host_access(self, tensor: Any, mode: str, why: str) -> None:
        """The calling host thread reads ("r") or writes ("w") ``tensor`` now."""
        address = _storage_address(tensor)
        if address not in self.pinned:
            return
        with self.lock:
            clock = self.thread_clock()
            clock[self._per_thread.name] += 1
            self.check(Access(self._per_thread.name, dict(clock), why, [(address, mode)]))

    def copy_thread(self, name: str) -> Any:
        """Stands in for ``copy_engine._copy_thread``: the real thread pool, whose
        tasks carry their submitter's clock in and their own out."""
        pool = ThreadPoolExecutor(1, thread_name_prefix=name, initializer=store.mark_copy_thread)
        simulator = self

        class ClockedPool:
            def submit(self, fn: Callable[..., Any], *args: Any) -> JoinableFuture:
                with simulator.lock:
                    clock_at_submit = dict(simulator.thread_clock())
                clock_at_end: Clock = {}

                def task() -> Any:
                    with simulator.lock:
                        _merge(simulator.thread_clock(), clock_at_submit)
                    try:
                        return fn(*args)
                    finally:
                        with simulator.lock:
                            clock_at_end.update(simulator.thread_clock())

                return JoinableFuture(pool.submit(task), clock_at_end, simulator)

            def __getattr__(self, attribute: str) -> Any:  # shutdown
                return getattr(pool, attribute)

        return ClockedPool()

    # -- the fake torch.cuda -------------------------------------------------

    def current_stream(self) -> FakeStream:
        return getattr(self._per_thread, "stream", None) or self.streams[0]

    def _new_stream(self, device: Any = None) -> FakeStream:
        stream = FakeStream(self, f"side{next(self._side_stream_numbers)}")
        self.streams.append(stream)
        return stream

    @contextlib.contextmanager
    def _using_stream(self, stream: FakeStream) -> Iterator[None]:
        previous = getattr(self._per_thread, "stream", None)
        self._per_thread.stream = stream
        try:
            yield
        finally:
            self._per_thread.stream = previous

    def _synchronize_all(self, device: Any = None) -> None:
        for stream in self.streams:
            self.host_waits_for(stream.last)

    def fake_torch_cuda(self) -> types.SimpleNamespace:
        return types.SimpleNamespace(
            Stream=self._new_stream,
            Event=type("Event", (FakeEvent,), {"simulator": self}),
            current_stream=lambda device=None: self.current_stream(),
            stream=self._using_stream,
            synchronize=self._synchronize_all,
        )

    # -- pinned buffers and the check ----------------------------------------

    def new_pinned(self, entry: store.Entry) -> torch.Tensor:
        """Stands in for ``copy_engine._new_pinned``."""
        raw = torch.empty(entry.nbytes, dtype=torch.uint8)
        label = f"{entry.dtype}{list(entry.shape)}#{len(self.pinned)}"
        self.pinned[raw.untyped_storage().data_ptr()] = (label, raw)
        return copy_engine.with_layout(raw, entry)

    def check(self, access: Access) -> None:
        """Report each earlier access that conflicts with ``access`` and is not
        ordered before it; then record it."""
        for address, mode in access.touches:
            for earlier in self.accesses:
                conflicts = any(a == address and "w" in mode + m for a, m in earlier.touches)
                if conflicts and not earlier.ordered_before(access):
                    self.hazards.append(
                        f"race on pinned {self.pinned[address][0]}: {earlier.describe()} "
                        f"unordered with {access.describe()}"
                    )
        if access.touches:
            self.accesses.append(access)

    def watch_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Check each ``optimizer.step()``'s in-place writes of its parameters'
        data (a trained parameter's data is its pinned host home)."""

        def before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    self.host_access(param.data, "w", "optimizer.step()")

        optimizer.register_step_pre_hook(before_step)

    # -- installing ----------------------------------------------------------

    def _copy(self, dst: Any, src: Any, what: str) -> None:
        """A copy: queued on the current side stream, else made by the host now."""
        stream = self.current_stream()
        if stream is not self.streams[0]:
            touches = []
            for tensor, mode in ((dst, "w"), (src, "r")):
                address = _storage_address(tensor)
                if address in self.pinned:
                    touches.append((address, mode))
            stream.queue(what, None, touches)
        else:
            self.host_access(dst, "w", f"{what} destination")
            self.host_access(src, "r", f"{what} source")

    def _make_engine(self, device: torch.device, disk: store.DiskStore) -> copy_engine.CopyEngine:
        engine = copy_engine.CudaCopyEngine(disk, torch.device("cpu"))
        number = next(self._engine_numbers)  # its streams renamed for the reports
        engine.h2d.name, engine.d2h.name = f"h2d-{number}", f"d2h-{number}"
        return engine

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Make ``copy_engine`` run on this simulator's streams and threads, and
        ``planner.plan`` build modules as for a CUDA device (GPU profile accepted,
        executor emitted for CUDA, ``CudaCopyEngine``) that run on the CPU."""
        simulator = self
        torch_with_fake_cuda = types.ModuleType("torch_with_fake_cuda")
        torch_with_fake_cuda.__getattr__ = lambda name: getattr(torch, name)  # type: ignore[method-assign]
        torch_with_fake_cuda.cuda = self.fake_torch_cuda()
        monkeypatch.setattr(copy_engine, "torch", torch_with_fake_cuda)
        monkeypatch.setattr(copy_engine, "_new_pinned", self.new_pinned)
        monkeypatch.setattr(copy_engine, "_copy_thread", self.copy_thread)

        def storage_copy(self: torch.UntypedStorage, src: Any, non_blocking: Any = None) -> Any:
            simulator._copy(self, src, "storage copy")
            return _ORIGINAL_STORAGE_COPY(self, src, non_blocking)

        def tensor_copy(self: torch.Tensor, src: Any, non_blocking: bool = False) -> Any:
            simulator._copy(self, src, "tensor copy")
            return _ORIGINAL_TENSOR_COPY(self, src, non_blocking)

        def index_copy(self: torch.Tensor, dim: int, index: Any, source: Any) -> Any:
            simulator.host_access(self, "w", "index_copy_ destination")
            simulator.host_access(index, "r", "index_copy_ index")
            simulator.host_access(source, "r", "index_copy_ source")
            return _ORIGINAL_INDEX_COPY(self, dim, index, source)

        def disk_write(self: store.DiskStore, key: str, tensor: torch.Tensor, **kw: Any) -> Any:
            simulator.host_access(tensor, "r", f"disk write of {key}")
            return _ORIGINAL_DISK_WRITE(self, key, tensor, **kw)

        def disk_read_into(self: store.DiskStore, key: str, out: torch.Tensor) -> Any:
            simulator.host_access(out, "w", f"disk read of {key}")
            return _ORIGINAL_DISK_READ_INTO(self, key, out)

        monkeypatch.setattr(torch.UntypedStorage, "copy_", storage_copy)
        monkeypatch.setattr(torch.Tensor, "copy_", tensor_copy)
        monkeypatch.setattr(torch.Tensor, "index_copy_", index_copy)
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
        monkeypatch.setattr(store.DiskStore, "write", disk_write)
        monkeypatch.setattr(store.DiskStore, "read_into", disk_read_into)

        monkeypatch.setattr(planned_module, "make_engine", self._make_engine)
        monkeypatch.setattr(
            api, "_profile_for_device", lambda spec, device: planner.get_profile(spec)
        )
        emit = assemble.emit_executor
        monkeypatch.setattr(
            assemble,
            "emit_executor",
            lambda program, gm, problem, plan, kernels, device: emit(
                program, gm, problem, plan, kernels, torch.device("cuda")
            ),
        )


@pytest.fixture(name="fake_cuda")
def fake_cuda_fixture(monkeypatch: pytest.MonkeyPatch) -> CopyOrderSimulator:
    """A ``CopyOrderSimulator`` installed for the test (``install``), undone after."""
    simulator = CopyOrderSimulator()
    simulator.install(monkeypatch)
    return simulator

"""The memory meter measures what the allocator did, independently of any plan."""

from __future__ import annotations

import torch

from planner.runtime import meter
from planner.runtime.meter import measure, measure_inference, measure_training_step, resident_bytes

MB = 1_000_000


def test_peak_of_known_allocations() -> None:
    x = torch.randn(1000, 1000)  # 4 MB resident

    def work() -> torch.Tensor:
        a = x @ x  # +4
        b = a.relu()  # +4 -> 8 live
        del a  # 4 live
        c = torch.empty(1000, 1000)  # 8 live
        return b + c  # 12 live at the peak

    out, m = measure(work, x)
    assert out.shape == (1000, 1000)
    assert m.resident_bytes == 4 * MB
    assert m.peak_allocated_bytes == 12 * MB
    assert m.peak_bytes == 16 * MB


def test_resident_bytes_dedupes_storages_and_skips_files(tmp_path) -> None:
    model = torch.nn.Linear(100, 100)
    x = torch.randn(10, 100)
    view = x[:5]
    n = resident_bytes(model, (x, view))
    assert n == (100 * 100 + 100) * 4 + 10 * 100 * 4
    path = tmp_path / "w.bin"
    torch.zeros(1000).numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=True, size=1000)
    assert resident_bytes(mapped) == 0


def test_an_input_view_counts_the_bytes_it_spans_not_its_callers_storage() -> None:
    """``data[64:128]`` of a 2 MiB batch was counted at 2 MiB: the rest of the
    storage is the caller's, held whatever the call does."""
    data = torch.randn(512, 1024)  # 2 MiB
    rows = data[64:128]
    assert resident_bytes((rows,)) == 64 * 1024 * 4
    # overlapping views of one storage: their union, once
    assert resident_bytes((data[0:100], data[50:150])) == 150 * 1024 * 4
    assert resident_bytes((data[:, ::2],)) == (511 * 1024 + 1023) * 4  # spans its rows
    # a module's tensor holds its whole storage, which then counts once
    module = torch.nn.Module()
    module.register_buffer("part", data[:10])
    assert resident_bytes(module, (rows,)) == data.nbytes


def test_inference_and_training_step() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256)
    )
    x = torch.randn(128, 256)
    _, infer = measure_inference(model, (x,))
    _, train = measure_training_step(model, (x,))
    # training allocates every gradient (alive at the end, with the output) and
    # keeps activations for backward
    grads = sum(p.numel() * 4 for p in model.parameters())
    output = 128 * 256 * 4
    assert train.peak_allocated_bytes >= grads + output
    assert train.peak_bytes > infer.peak_bytes
    assert all(p.grad is None for p in model.parameters()), "meter must restore .grad"


_TWO_THREADS = """
import threading, torch
from planner.runtime.meter import measure

def work(results, k):
    def call():
        x = torch.ones(1 << 18)
        return (x * 2).sum()
    for _ in range(5):
        results.append(measure(call, None, ((), {}))[1].peak_bytes)

results = []
threads = [threading.Thread(target=work, args=(results, k)) for k in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert len(results) == 10, results
assert min(results) >= (1 << 20), results
print(max(results))
"""


def test_two_threads_measuring_at_once_take_turns() -> None:
    """Two profiler sessions at once crashed the process (two run_measured calls
    in two threads: a segfault in torch's profiler); run in a child process, so
    that a crash fails this test instead of ending the run."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _TWO_THREADS], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # each measurement counts its own call only: the other thread's 1 MiB is not in it
    assert int(done.stdout.strip().splitlines()[-1]) < 2 * (1 << 20) + (1 << 19)


def test_resident_bytes_count_only_the_measured_gpus_tensors() -> None:
    """A plan measured on ``cuda:1`` counted the module's and inputs' tensors on
    ``cuda:0`` as resident too (only the device's type was compared)."""
    gpu = torch.device
    assert not meter._on(gpu("cuda", 0), gpu("cuda", 1))
    assert meter._on(gpu("cuda", 1), gpu("cuda", 1))
    assert meter._on(gpu("cuda", 0), gpu("cuda"))  # no index: every GPU's
    assert not meter._on(gpu("cpu"), gpu("cuda", 0))
    assert meter._on(gpu("cpu"), gpu("cpu"))

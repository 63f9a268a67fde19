"""The runtime's quantized storage: torch reference on the CPU, Triton on CUDA,
and the two agree."""

from __future__ import annotations

import pytest
import torch

from planner.runtime.quant import dequantize, quantize, round_tripped
from planner.runtime.runtime import Runtime


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_cpu_uses_the_reference(fmt: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(33, 130)
    rt = Runtime(engine=None)  # type: ignore[arg-type]
    q = rt.quantize(x, fmt)
    ref = quantize(x, fmt)
    assert torch.equal(q.codes, ref.codes) and torch.equal(q.scale, ref.scale)
    assert torch.equal(rt.dequantize(q), dequantize(ref))
    step = (x.abs().amax() / 127) if fmt == "int8" else (x.amax() - x.amin()) / 15
    assert (rt.dequantize(q) - x).abs().max() <= step


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_cuda_triton_path_matches_the_reference(fmt: str) -> None:
    x = torch.randn(257, 1000, device="cuda")
    rt = Runtime(engine=None)  # type: ignore[arg-type]
    q = rt.quantize(x, fmt)
    ref = quantize(x.cpu(), fmt)
    assert torch.equal(q.codes.cpu(), ref.codes)
    assert torch.equal(rt.dequantize(q).cpu(), dequantize(ref))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_weight_read_quantized_from_disk(fmt: str, tmp_path: object) -> None:
    """A weight written to disk as codes at plan time comes back as the same
    ``Quantized`` (only its parts' bytes read); with a full copy registered for
    lookups, an embedding through it gathers the original rows exactly."""
    import torch.nn.functional as F

    from planner.runtime import fused
    from planner.runtime.copy_engine import ThreadCopyEngine
    from planner.runtime.store import DiskStore

    store = DiskStore(tmp_path)  # type: ignore[arg-type]
    rt = Runtime(ThreadCopyEngine(store))
    try:
        w = torch.randn(40, 128, generator=torch.Generator().manual_seed(1))
        q = rt.quantize(w, fmt)
        keys = rt.store_quantized_now("w", "disk", q)
        assert sorted(keys) == sorted(f"w#{part}" for part in q.parts())
        assert sum(store.path(k).stat().st_size for k in keys) == sum(
            t.numel() * t.element_size() for t in q.parts().values()
        )
        back = rt.wait(rt.prefetch("w", "disk"))
        assert torch.equal(back.codes, q.codes) and torch.equal(rt.dequantize(back), dequantize(q))
        assert back.exact_rows is None
        store.write("rows:w", w)
        rt.exact_rows["w"] = store.map_shared("rows:w")
        ids = torch.tensor([[0, 39, 7]])
        looked_up = fused.embedding(rt.wait(rt.prefetch("w", "disk")), ids)
        assert torch.equal(looked_up, F.embedding(ids, w))
    finally:
        rt.engine.close()
        store.close()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_a_permuted_tensor_comes_back_in_its_own_layout(
    fmt: str, layout: str, tmp_path: object
) -> None:
    """Compiled runs assert the strides of what they read: a channels-last
    activation (or a transpose's base) is quantized in memory order and
    dequantized with its own strides, also after a round trip through the disk."""
    from planner.runtime.copy_engine import ThreadCopyEngine
    from planner.runtime.store import DiskStore

    torch.manual_seed(0)
    if layout == "channels_last":
        x = torch.randn(2, 16, 5, 7).contiguous(memory_format=torch.channels_last)
    else:
        x = torch.randn(64, 48).t()
    store = DiskStore(tmp_path)  # type: ignore[arg-type]
    rt = Runtime(ThreadCopyEngine(store))
    try:
        q = rt.quantize(x, fmt)
        assert q.order is not None
        out = rt.dequantize(q)
        assert out.shape == x.shape and out.stride() == x.stride()
        step = (x.abs().amax() / 127) if fmt == "int8" else (x.amax() - x.amin()) / 15
        assert (out - x).abs().max() <= step
        rt.store_quantized_now("x", "disk", q)
        back = rt.dequantize(rt.wait(rt.prefetch("x", "disk")))
        assert back.stride() == x.stride() and torch.equal(back, out)
    finally:
        rt.engine.close()
        store.close()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("magnitude", [1e-9, 1e-6, 1.0, 1e4])
def test_small_and_large_values_keep_their_precision(fmt: str, magnitude: float) -> None:
    """A training step's gradients are 1e-6 per element and less. With scales
    stored in float16, a scale under 6e-8 became 0 (every value came back 0) and
    one under 6e-5 kept a few bits; in float32 every magnitude keeps the format's
    own step: half of it per value (int8: a row's max / 254; int4: a group's range
    / 30), up to float32 rounding."""
    torch.manual_seed(0)
    x = torch.randn(16, 64) * magnitude
    back = dequantize(quantize(x, fmt))
    if fmt == "int8":
        step = x.abs().amax(dim=1, keepdim=True) / 127
    else:
        groups = x.reshape(-1, 64)
        step = ((groups.amax(1) - groups.amin(1)) / 15).reshape(16, 1)
    assert ((back - x).abs() <= step * (0.5 + 1e-5)).all()


def test_round_tripped_unties_a_weight_whose_lookups_are_exact() -> None:
    """The eager reference of a plan storing a tied weight quantized: its embedding
    keeps the exact weight, the head beside it gets the round trip (what the plan
    computes with), and the original model is left as it was."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(64, 32), torch.nn.Linear(32, 64, bias=False))
    model[1].weight = model[0].weight  # tied, as GPT-2's head and embedding
    original = model[0].weight.detach().clone()
    trip = dequantize(quantize(original, "int4"))
    name = "0.weight"

    twin = round_tripped(model, {name}, "int4", exact_lookups={name})
    assert torch.equal(twin[0].weight, original) and torch.equal(twin[1].weight, trip)
    assert twin[1].weight is not twin[0].weight

    rounded = round_tripped(model, {name}, "int4")  # every read rounded, still tied
    assert rounded[1].weight is rounded[0].weight and torch.equal(rounded[0].weight, trip)
    assert torch.equal(model[0].weight, original) and model[1].weight is model[0].weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_an_int8_row_at_the_ends_of_the_range_comes_back_finite(dtype: torch.dtype) -> None:
    """[fp32 max, -fp32 max] came back as +-inf (127 * scale overflowed) on a row of
    finite inputs; now finite, within half a step and the output's rounding."""
    top = torch.finfo(dtype).max
    x = torch.zeros(3, 128, dtype=torch.float64)
    x[0, :2] = torch.tensor([top, -top], dtype=torch.float64)
    x[1, :3] = torch.tensor([0.9 * top, -0.9 * top, 0.1 * top], dtype=torch.float64)
    x[2] = torch.randn(128, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x.to(dtype)
    back = dequantize(quantize(x, "int8"))
    assert torch.isfinite(back).all()
    xd, bd = x.double(), back.double()
    step = xd.abs().amax(dim=1, keepdim=True) / 127
    assert ((bd - xd).abs() <= step * (0.5 + 1e-5) + bd.abs() * torch.finfo(dtype).eps).all()


def test_round_trip_error_of_huge_values_is_not_zero() -> None:
    """The report's relative L2 of an int8 row holding 3e38 was 0.0: its norm
    overflowed fp32 (computed in float64 now)."""
    from planner.runtime.runtime import round_trip_error

    torch.manual_seed(0)
    x = torch.randn(4, 64) * 0.05
    x[0, 0] = 3e38
    error = round_trip_error(x, dequantize(quantize(x, "int8")))
    assert 0 < error["relative_l2"] < 1 and error["max_abs"] > 0


def test_round_trip_error_makes_no_wide_copy() -> None:
    """A float64 round trip copied the weight (and the difference) at twice their
    bytes each, on the device, while a plan that saves its memory was made; the
    norm of values near float32's largest still does not overflow."""
    from planner.runtime.meter import measure
    from planner.runtime.runtime import round_trip_error

    torch.manual_seed(0)
    x = torch.randn(512, 1024)
    back = dequantize(quantize(x, "int8"))
    _, m = measure(lambda: round_trip_error(x, back), device="cpu")
    assert m.peak_allocated_bytes <= x.nbytes + 4096  # the difference, float32
    x[0, 0] = 3e38
    back = dequantize(quantize(x, "int8"))
    error, m = measure(lambda: round_trip_error(x, back), device="cpu")
    assert m.peak_allocated_bytes <= 3 * x.nbytes + 4096  # float64: 6x
    xd, bd = x.double(), back.double()
    assert error["relative_l2"] == pytest.approx(float((bd - xd).norm() / xd.norm()), rel=1e-5)
    assert error["max_abs"] == float((bd - xd).abs().max())

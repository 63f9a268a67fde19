"""Fused ops on weights stored quantized: they compute the op on the dequantized
weight, and allocate no more than ``temp_bytes`` beyond their output (measured by
the independent meter), so the full-precision weight never exists."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from planner.runtime import fused
from planner.runtime.meter import measure
from planner.runtime.quant import dequantize, quantize
from planner.solver.problem import quantize_scratch_bytes, quantized_bytes

FORMATS = ["int8", "int4"]


def _data(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("out_features", [1, 64, 200])  # below, at and across the block
def test_linear_matches_dequantized_weight(fmt: str, out_features: int) -> None:
    x, w, b = _data(3, 5, 128), _data(out_features, 128, seed=1), _data(out_features, seed=2)
    q = quantize(w, fmt)
    expected = F.linear(x, dequantize(q), b)
    torch.testing.assert_close(fused.linear(x, q, b), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.linear(x, q), F.linear(x, dequantize(q)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_addmm_and_mm_match_dequantized_weight(fmt: str) -> None:
    x, w, b = _data(9, 64), _data(64, 192, seed=1), _data(192, seed=2)
    q = quantize(w, fmt)
    wd = dequantize(q)
    torch.testing.assert_close(fused.mm(x, q), x @ wd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        fused.addmm(b, x, q, beta=0.5, alpha=2.0),
        torch.addmm(b, x, wd, beta=0.5, alpha=2.0),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_embedding_is_exact_on_the_dequantized_rows(fmt: str) -> None:
    w, ids = _data(50, 128), torch.randint(0, 50, (4, 7))
    q = quantize(w, fmt)
    assert torch.equal(fused.embedding(q, ids), F.embedding(ids, dequantize(q)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_embedding_reads_exact_rows_from_a_full_copy_off_the_device(
    fmt: str, tmp_path: object
) -> None:
    """A stored weight with its full-precision copy in a file: the lookup gathers
    the original rows bit for bit, allocating only the rows (the dequantize path
    allocates an fp32 block per row and differs from the original)."""
    from planner.runtime.store import DiskStore

    w, ids = (
        _data(50, 128),
        torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(3)),
    )
    store = DiskStore(tmp_path)  # type: ignore[arg-type]
    try:
        q = quantize(w, fmt)
        lossy = fused.embedding(q, ids)
        store.write("rows", w)
        q.exact_rows = store.map_shared("rows")
        exact = fused.embedding(q, ids)
        assert torch.equal(exact, F.embedding(ids, w)) and not torch.equal(lossy, exact)
        assert "rows" not in q.parts()  # not a stored part: it lives in the file
        _, m = measure(lambda: fused.embedding(q, ids), device="cpu")
        assert m.peak_allocated_bytes <= ids.numel() * 128 * 4 + ids.numel() * 8 + 4096
    finally:
        store.close()


def test_only_lookups_read_exact_rows_and_only_with_a_disk() -> None:
    assert fused.reads_exact_rows("aten.embedding.default", ("disk",))
    assert not fused.reads_exact_rows("aten.embedding.default", ())
    assert not fused.reads_exact_rows("aten.linear.default", ("disk",))


def test_fusable_needs_a_2d_weight_and_whole_int4_groups() -> None:
    assert fused.fusable("aten.linear.default", (10, 128), "int4")
    assert not fused.fusable("aten.linear.default", (10, 100), "int4")  # groups span rows
    assert fused.fusable("aten.linear.default", (10, 100), "int8")
    assert not fused.fusable("aten.conv2d.default", (10, 128), "int8")
    assert not fused.fusable("aten.linear.default", (10, 4, 32), "int8")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "target, weight_shape, rows",
    [
        ("aten.linear.default", (1024, 256), 64),
        ("aten.addmm.default", (256, 1024), 64),
        ("aten.embedding.default", (1024, 256), 64),
    ],
)
def test_scratch_stays_within_temp_bytes(
    fmt: str, target: str, weight_shape: tuple[int, int], rows: int
) -> None:
    w = _data(*weight_shape)
    q = quantize(w, fmt)
    if target == "aten.linear.default":
        x = _data(rows, weight_shape[1])
        args: tuple = (x, q)
    elif target == "aten.addmm.default":
        x = _data(rows, weight_shape[0])
        args = (_data(weight_shape[1]), x, q)
    else:
        args = (q, torch.randint(0, weight_shape[0], (rows,)))
    out, m = measure(lambda: fused.call(target, *args))
    scratch = m.peak_allocated_bytes - out.numel() * out.element_size()
    bound = fused.temp_bytes(target, weight_shape, rows, 4, fmt)
    assert 0 <= scratch <= bound
    assert bound < w.numel() * w.element_size() / 2  # far below materializing the weight


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(64, 16, 16), (3, 70000), (200_001,), (5, 3)])
def test_blocked_quantizers_allocate_only_their_result_and_scratch(
    fmt: str, shape: tuple[int, ...]
) -> None:
    x = _data(*shape)
    q, m = measure(lambda: quantize(x, fmt))
    stored = quantized_bytes(x.numel() * 4, 4, fmt, shape[-1])
    assert (
        sum(t.numel() * t.element_size() for t in (q.codes, q.scale, q.zero) if t is not None)
        == stored
    )
    scratch = quantize_scratch_bytes(x.numel() * 4, 4)
    assert m.peak_allocated_bytes <= stored + scratch
    back, m = measure(lambda: dequantize(q))
    assert m.peak_allocated_bytes <= back.numel() * 4 + scratch


def test_a_weight_quantized_from_a_transposed_parameter_is_used_dequantized() -> None:
    """Its codes follow memory order, not the rows the blocked kernels walk: the op
    gets the dequantized weight, in its own layout. (Plans do not fuse such a
    weight's uses and charge its full dequantized copy; this is the fallback.)"""
    from planner.runtime.quant import restore
    from planner.runtime.runtime import Runtime

    torch.manual_seed(0)
    w = torch.randn(128, 64).t()  # (64, 128), a transposed layout
    x = torch.randn(5, 128)
    q = Runtime(engine=None).quantize(w, "int8")  # type: ignore[arg-type]
    assert q.order is not None
    expected = torch.nn.functional.linear(x, restore(q, dequantize(q)))
    torch.testing.assert_close(fused.call("aten.linear.default", x, q), expected)

"""Triton quantization kernels vs the torch references in planner.runtime.quant.

On a CUDA machine the kernels run compiled on the GPU; elsewhere on the CPU through
the Triton interpreter, which tests/conftest.py enables (TRITON_INTERPRET must be
set before triton is imported: triton.jit picks the interpreter at decoration time).
Inputs are made and results compared on the CPU either way.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the kernels cannot be tested")

from planner.codegen import kernels  # noqa: E402
from planner.runtime.quant import GROUP, MIN_SCALE, Quantized, dequantize, quantize  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _to(x: torch.Tensor | Quantized, device: torch.device | str) -> torch.Tensor | Quantized:
    if isinstance(x, Quantized):
        zero = None if x.zero is None else x.zero.to(device)
        return dataclasses.replace(x, codes=x.codes.to(device), scale=x.scale.to(device), zero=zero)
    return x.to(device)


class _OnDevice:
    """``kernels``' entry points run on ``DEVICE``, taking and returning CPU data
    (tensors and ``Quantized``)."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        kernel = getattr(kernels, name)
        return lambda *args: _to(kernel(*(_to(a, DEVICE) for a in args)), "cpu")


on_device = _OnDevice()

SHAPES = [(1, 1), (3, 5), (7, 64), (33, 130), (2, 3, 65), (4, 600), ()]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _data(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    if x.dim() >= 2:
        x[0] *= 0.01  # one row / group with a much smaller range
    return x.to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """View a float tensor as integers, so equality is bit-exact (signs of zero too)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _fp32_step(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """The reference's fp32 scale, broadcast to x's layout."""
    if fmt == "int8":
        rows = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
        return (
            (rows.abs().amax(dim=1, keepdim=True).float() / 127)
            .clamp_min(MIN_SCALE)
            .expand(rows.shape)
            .reshape(-1)
        )
    flat = x.reshape(-1).float()
    groups = torch.nn.functional.pad(flat, (0, (-flat.numel()) % GROUP)).reshape(-1, GROUP)
    lo = groups.amin(dim=1, keepdim=True)
    scale = ((groups.amax(dim=1, keepdim=True) - lo) / 15).clamp_min(MIN_SCALE)
    return scale.expand(groups.shape).reshape(-1)[: flat.numel()]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int8_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = _data(shape, dtype)
    ref = quantize(x, "int8")
    got = on_device.quantize_int8(x)
    assert got.codes.dtype == torch.int8 and got.codes.shape == ref.codes.shape
    assert torch.equal(got.codes, ref.codes)
    assert torch.equal(_bits(got.scale), _bits(ref.scale))
    assert (got.zero, got.fmt, got.shape, got.dtype) == (None, "int8", ref.shape, ref.dtype)

    deq = on_device.dequantize_int8(got)
    assert deq.dtype == dtype and deq.shape == x.shape
    assert torch.equal(_bits(deq), _bits(dequantize(ref)))

    # codes are the nearest multiple of the fp32 step: within half a step exactly
    step = _fp32_step(x, "int8")
    xf = x.float().reshape(-1)
    codes = ref.codes.float().reshape(-1)
    # x / step is itself rounded in fp32 (a near-tie can round onto .5): one ulp of slack
    half = 0.5 * step + (codes.abs() + 1) * step * 2**-23
    assert ((xf - codes * step).abs() <= half).all()
    # the stored value uses the stored (fp32) step and is rounded to `dtype`
    s16 = ref.scale.float().expand(ref.codes.shape).reshape(-1)
    bound = half + codes.abs() * (step - s16).abs()
    bound = bound + xf.abs() * torch.finfo(dtype).eps + 1e-30
    assert ((xf - deq.float().reshape(-1)).abs() <= bound * (1 + 1e-5)).all()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_tiny_values_match_the_reference(fmt: str) -> None:
    """Gradient-sized values (1e-9): the scales, stored in fp32, are those the
    reference computes, bit for bit (in fp16 they were 0)."""
    torch.manual_seed(0)
    x = torch.randn(8, 128) * 1e-9
    ref = quantize(x, fmt)
    got = on_device.quantize_int8(x) if fmt == "int8" else on_device.quantize_int4(x)
    assert got.scale.dtype == ref.scale.dtype == torch.float32
    assert torch.equal(got.codes, ref.codes) and torch.equal(_bits(got.scale), _bits(ref.scale))
    back = on_device.dequantize_int8(got) if fmt == "int8" else on_device.dequantize_int4(got)
    assert torch.equal(_bits(back), _bits(dequantize(ref)))
    assert back.abs().max() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int4_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = _data(shape, dtype)
    ref = quantize(x, "int4")
    got = on_device.quantize_int4(x)
    assert got.codes.dtype == torch.uint8 and got.codes.shape == ref.codes.shape
    assert torch.equal(got.codes, ref.codes)
    assert torch.equal(_bits(got.scale), _bits(ref.scale))
    assert got.zero is not None and ref.zero is not None
    assert torch.equal(_bits(got.zero), _bits(ref.zero))
    assert (got.fmt, got.shape, got.dtype) == ("int4", ref.shape, ref.dtype)

    deq = on_device.dequantize_int4(got)
    assert deq.dtype == dtype and deq.shape == x.shape
    assert torch.equal(_bits(deq), _bits(dequantize(ref)))

    n = x.numel()
    codes = torch.stack((ref.codes & 0xF, ref.codes >> 4), dim=1).reshape(-1)[:n].float()
    step = _fp32_step(x, "int4")
    flat = x.float().reshape(-1)
    groups = torch.nn.functional.pad(flat, (0, (-n) % GROUP)).reshape(-1, GROUP)
    lo32 = groups.amin(dim=1, keepdim=True).expand(groups.shape).reshape(-1)[:n]
    half = 0.5 * step + (codes + 1) * step * 2**-23 + lo32.abs() * 2**-23
    assert ((flat - (codes * step + lo32)).abs() <= half * (1 + 1e-6)).all()
    # stored: the fp32 step and minimum (equal to those above), then rounded to `dtype`
    s16 = ref.scale.float().expand(-1, GROUP).reshape(-1)[:n]
    z16 = ref.zero.float().expand(-1, GROUP).reshape(-1)[:n]
    bound = half + codes * (step - s16).abs() + (lo32 - z16).abs()
    bound = bound + flat.abs() * torch.finfo(dtype).eps + 1e-30
    assert ((flat - deq.float().reshape(-1)).abs() <= bound * (1 + 1e-5)).all()


def test_rounding_is_half_to_even() -> None:
    # scale is exactly 1.0 (127 / 127 and 15 / 15): codes are round(x) on exact ties
    ties = [0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, 126.5]
    x8 = torch.tensor([[127.0, *ties]])
    got8 = on_device.quantize_int8(x8)
    assert torch.equal(got8.codes, quantize(x8, "int8").codes)
    assert got8.codes.tolist() == [[127, 0, 2, 2, 0, -2, 0, 126]]

    x4 = torch.zeros(GROUP)
    x4[:7] = torch.tensor([15.0, 0.5, 1.5, 2.5, 14.5, 0.49999997, 3.5])
    got4 = on_device.quantize_int4(x4)
    assert torch.equal(got4.codes, quantize(x4, "int4").codes)
    assert got4.codes[:4].tolist() == [15 | 0 << 4, 2 | 2 << 4, 14 | 0 << 4, 4]


def test_constant_and_zero_inputs() -> None:
    for x in (torch.zeros(3, 70), torch.full((2, 65), -1.25), torch.tensor(2.0)):
        for fmt, qf in (("int8", on_device.quantize_int8), ("int4", on_device.quantize_int4)):
            ref, got = quantize(x, fmt), qf(x)
            assert torch.equal(got.codes, ref.codes)
            assert torch.equal(_bits(got.scale), _bits(ref.scale))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_nan_or_infinity_makes_its_row_or_group_nan_on_both_paths(fmt: str, bad: float) -> None:
    """Triton's max and min may skip a NaN where torch's propagate it: the kernel
    returned a finite row (int8: the NaN came back as -amax; int4: the group's
    minimum) where the reference returned NaN, hiding a diverging step on CUDA."""
    torch.manual_seed(0)
    x = torch.randn(4, 2 * GROUP)
    x[1, 5] = bad  # int8: row 1; int4: group 2 (row 1's first half)
    ref = quantize(x, fmt)
    got = on_device.quantize_int8(x) if fmt == "int8" else on_device.quantize_int4(x)
    assert torch.equal(got.codes, ref.codes)
    assert torch.equal(got.scale.isnan(), ref.scale.isnan()) and int(ref.scale.isnan().sum()) == 1
    assert torch.equal(got.scale.nan_to_num(), ref.scale.nan_to_num())
    back = on_device.dequantize_int8(got) if fmt == "int8" else on_device.dequantize_int4(got)
    expected = dequantize(ref)
    nan_part = slice(None) if fmt == "int8" else slice(0, GROUP)
    assert back[1, nan_part].isnan().all() and expected[1, nan_part].isnan().all()
    assert torch.equal(back.isnan(), expected.isnan())
    assert torch.equal(back.nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_nan_row_or_group_stays_nan_in_bfloat16(fmt: str) -> None:
    """bf16 is rounded by hand on the bits: the NaN an NVIDIA GPU computes
    (0x7FFFFFFF, its one NaN) carried into the sign bit and came back -0.0, so a
    NaN row (and a matmul's column over it) read back as zeros. Made here by
    storing that NaN as the scale (and minimum), as the GPU's arithmetic yields it."""
    gpu_nan = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)
    x = torch.randn(4, 2 * GROUP).to(torch.bfloat16)
    q = quantize(x, fmt)
    q.scale.view(-1)[0] = gpu_nan
    if q.zero is not None:
        q.zero.view(-1)[0] = gpu_nan
    dequant = on_device.dequantize_int8 if fmt == "int8" else on_device.dequantize_int4
    back = dequant(q)
    nan_part = slice(None) if fmt == "int8" else slice(0, GROUP)
    assert back[0, nan_part].isnan().all() and not back[1:].isnan().any()
    matmul = on_device.dequant_matmul_int8 if fmt == "int8" else on_device.dequant_matmul_int4
    out = matmul(torch.randn(3, 2 * GROUP).to(torch.bfloat16), q)
    assert out[:, 0].isnan().all() and not out[:, 1:].isnan().any()


MATMUL_SHAPES = [(5, 7, 64), (17, 33, 128), (3, 4, 70), (1, 40, 192)]
TOL = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 1e-2, "rtol": 1e-2},
    torch.bfloat16: {"atol": 5e-2, "rtol": 3e-2},
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mnk", MATMUL_SHAPES, ids=str)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_dequant_matmul(fmt: str, mnk: tuple[int, int, int], dtype: torch.dtype) -> None:
    m, n, k = mnk
    g = torch.Generator().manual_seed(m * 1000 + n)
    a = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    q = quantize(w, fmt)
    matmul = on_device.dequant_matmul_int8 if fmt == "int8" else on_device.dequant_matmul_int4
    got = matmul(a, q)
    expected = a @ dequantize(q).T
    assert got.dtype == dtype and got.shape == (m, n)
    torch.testing.assert_close(got, expected, **TOL[dtype])


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_dequant_matmul_batched_activations(fmt: str) -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 3, 64, generator=g)
    q = quantize(torch.randn(9, 64, generator=g), fmt)
    matmul = on_device.dequant_matmul_int8 if fmt == "int8" else on_device.dequant_matmul_int4
    got = matmul(a, q)
    assert got.shape == (2, 3, 9)
    torch.testing.assert_close(got, a @ dequantize(q).T, atol=1e-4, rtol=1e-4)


def test_dequant_matmul_rejects_bad_inputs() -> None:
    q = quantize(torch.randn(4, 64), "int8")
    with pytest.raises(ValueError, match="features"):
        on_device.dequant_matmul_int8(torch.randn(2, 32), q)
    with pytest.raises(ValueError, match="int4"):
        on_device.dequant_matmul_int4(torch.randn(2, 64), q)
    with pytest.raises(ValueError, match="2-D"):
        on_device.dequant_matmul_int8(torch.randn(2, 64), quantize(torch.randn(2, 2, 64), "int8"))


def test_use_triton_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    assert kernels.HAS_TRITON
    assert kernels.use_triton("cpu") == (os.environ.get("TRITON_INTERPRET") == "1")
    assert kernels.use_triton(torch.device("cuda"))
    assert not kernels.use_triton("meta")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not kernels.use_triton("cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.quantize_int8(torch.randn(2, 3))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_an_int8_row_at_the_ends_of_the_range_matches_the_reference(dtype: torch.dtype) -> None:
    """An int8 row [max, -max]: its scale (amax / 127, rounded up) made 127 * scale
    overflow, so it came back as +-inf; now finite, bit for bit the reference's,
    and the dequant-matmul reads the same weights."""
    top = torch.finfo(dtype).max
    x = torch.zeros(3, 2 * GROUP, dtype=torch.float64)
    x[0, :2] = torch.tensor([top, -top], dtype=torch.float64)
    x[1, :3] = torch.tensor([0.9 * top, -0.9 * top, 0.1 * top], dtype=torch.float64)
    x[2] = torch.linspace(-top, top, 2 * GROUP, dtype=torch.float64)
    x = x.to(dtype)
    ref = quantize(x, "int8")
    got = on_device.quantize_int8(x)
    assert torch.equal(got.codes, ref.codes) and torch.equal(_bits(got.scale), _bits(ref.scale))
    back = on_device.dequantize_int8(got)
    assert torch.isfinite(back).all()
    assert torch.equal(_bits(back), _bits(dequantize(ref)))
    # a one-hot activation reads the weight's values: out[:, r] = W[r, :3]
    out = on_device.dequant_matmul_int8(torch.eye(2 * GROUP, dtype=dtype)[:3], got)
    assert torch.equal(_bits(out.T.contiguous()), _bits(back[:, :3].contiguous()))


@pytest.mark.parametrize("m, n", [(1, 3_000_000), (2_000_000, 64), (17, 33)])
def test_the_matmul_grid_launches_for_any_layer_width(m: int, n: int) -> None:
    """A CUDA grid's axes past the first hold at most 65,535 programs: a (rows,
    columns) grid of tiles could not launch for a layer of more than 2,097,120
    output features. Every tile still gets one program (``test_dequant_matmul``
    checks the values over several tiles each way)."""
    grid = kernels._tile_grid(m, n, 16, 32)
    assert all(axis <= 65_535 for axis in grid[1:])
    assert grid[0] < 2**31
    assert math.prod(grid) == -(-m // 16) * -(-n // 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dots_ask_for_ieee_precision_on_a_gpu(dtype: torch.dtype) -> None:
    """TF32 changes only fp32 inputs and is refused by targets without it (Triton's
    AMD backend before CDNA3): 16-bit inputs asked for it and would not compile there."""
    a = torch.empty(0, dtype=dtype, device="meta")  # a GPU's options: no interpreter upcast
    assert kernels._dot_options(a) == {"PRECISION": "ieee", "UPCAST": False}

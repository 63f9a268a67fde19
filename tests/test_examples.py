"""Every example factory builds, runs, and is capturable by ``torch.export``.

The examples are what the CLI, benchmarks and end-to-end tests feed the planner,
so a broken factory would surface as a confusing failure far downstream.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"

# (file, factory name): every factory the examples directory offers.
FACTORIES = [
    ("mlp.py", "make_mlp"),
    ("resnet_cnn.py", "make_resnet"),
    ("unet.py", "make_unet"),
    ("gpt2.py", "make_gpt2"),
    ("gpt2.py", "make_gpt2_full"),
    ("llama.py", "make_llama"),
]


def _load(filename: str) -> ModuleType:
    """Import an example by path, as the CLI's ``FILE.py:FACTORY`` form does."""
    path = EXAMPLES_DIR / filename
    spec = importlib.util.spec_from_file_location(f"examples_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _factory(filename: str, name: str) -> Callable[[], tuple[torch.nn.Module, tuple]]:
    return getattr(_load(filename), name)


def _tensors(output: object) -> list[torch.Tensor]:
    """The tensors in a model's output (a tensor, a ModelOutput, or a pytree)."""
    leaves, _ = torch.utils._pytree.tree_flatten(output)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def _first_tensor(output: object) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return _tensors(output)[0]


@pytest.mark.parametrize(("filename", "name"), FACTORIES, ids=[n for _, n in FACTORIES])
def test_factory_runs_forward(filename: str, name: str) -> None:
    model, inputs = _factory(filename, name)()
    assert isinstance(model, torch.nn.Module)
    assert isinstance(inputs, tuple) and inputs
    with torch.no_grad():
        output = model(*inputs)
    tensors = _tensors(output)
    assert tensors, "the model returned no tensors"
    for tensor in tensors:
        assert torch.isfinite(tensor).all()


@pytest.mark.parametrize(("filename", "name"), FACTORIES, ids=[n for _, n in FACTORIES])
def test_factory_is_deterministic(filename: str, name: str) -> None:
    """Two calls build the same weights and inputs, so outputs match exactly."""
    factory = _factory(filename, name)
    (model_a, inputs_a), (model_b, inputs_b) = factory(), factory()
    for a, b in zip(inputs_a, inputs_b, strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        out_a, out_b = _first_tensor(model_a(*inputs_a)), _first_tensor(model_b(*inputs_b))
    assert torch.equal(out_a, out_b)


@pytest.mark.parametrize(("filename", "name"), FACTORIES, ids=[n for _, n in FACTORIES])
def test_factory_exports(filename: str, name: str) -> None:
    """``torch.export`` (non-strict) captures the model and reproduces its output."""
    model, inputs = _factory(filename, name)()
    model.eval()  # BatchNorm: compare in inference mode so running stats don't move
    exported = torch.export.export(model, inputs, strict=False)
    with torch.no_grad():
        expected = _first_tensor(model(*inputs))
        actual = _first_tensor(exported.module()(*inputs))
    torch.testing.assert_close(actual, expected)


def test_factory_trains() -> None:
    """A forward+backward on each tensor-returning factory fills every parameter's grad."""
    for filename, name in FACTORIES:
        if name == "make_gpt2_full":
            continue
        model, inputs = _factory(filename, name)()
        model(*inputs).float().pow(2).mean().backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"{name}: no grad for {missing[:3]}"


def test_gpt2_uses_sdpa_and_no_dropout() -> None:
    model, _ = _factory("gpt2.py", "make_gpt2_full")()
    config = model.config
    assert config._attn_implementation == "sdpa"
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.0
    assert config.use_cache is False

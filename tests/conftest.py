"""Shared test helpers: toy model factories and the example loader.

Toy graphs are small nn.Modules built by factories parametrised over sizes:
chain, diamond, residual, MLP. They are small enough that every property (peaks,
lifetimes, kinds) can be checked by hand-derivable rules.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import torch  # importing torch does not import triton

# Without CUDA, Triton kernels run in its interpreter on the CPU. The variable must
# be set before anything imports triton (torch.utils.flop_counter does, via
# planner), whichever test file runs first. With CUDA it stays unset: the kernels
# (ours and Inductor's) then compile for the GPU, which the interpreter cannot run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import property_cases  # noqa: E402
import pytest
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

warnings.filterwarnings("ignore", category=FutureWarning)


class Chain(nn.Module):
    """x -> tanh(Linear) -> ... : each activation is read only by the next op."""

    def __init__(self, depth: int, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


class Diamond(nn.Module):
    """Two branches from one input joined by an add: the input lives across both."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.left = nn.Linear(width, width)
        self.right = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x)
        return self.left(h) + torch.sigmoid(self.right(h))


class Residual(nn.Module):
    """Blocks with skip connections: the skip lives across the whole block."""

    def __init__(self, blocks: int, width: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
            for _ in range(blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


class MLP(nn.Module):
    def __init__(self, depth: int, width: int, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def toy(kind: str, size: int, batch: int = 16) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A toy model of ``kind`` whose depth or width scales with ``size``."""
    torch.manual_seed(0)
    width = 32 * size
    model: nn.Module
    if kind == "chain":
        model = Chain(depth=2 + size, width=width)
    elif kind == "diamond":
        model = Diamond(width=width)
    elif kind == "residual":
        model = Residual(blocks=size, width=width)
    elif kind == "mlp":
        model = MLP(depth=size, width=width)
    else:
        raise ValueError(kind)
    return model, (torch.randn(batch, width),)


TOY_KINDS = ("chain", "diamond", "residual", "mlp")
TOY_SIZES = (1, 3)

EXAMPLE_FACTORIES = {
    "mlp": ("mlp.py", "make_mlp"),
    "resnet": ("resnet_cnn.py", "make_resnet"),
    "unet": ("unet.py", "make_unet"),
    "gpt2": ("gpt2.py", "make_gpt2"),
    "gpt2_full": ("gpt2.py", "make_gpt2_full"),
    "gpt2_train": ("gpt2.py", "make_gpt2_train"),
    "llama": ("llama.py", "make_llama"),
}


class CachedLayer(nn.Module):
    """A decoder layer's key/value cache as its memory sees it: each call writes its
    row into the cache in place (``index_copy_``, as transformers' static cache
    does) and reads the whole cache."""

    def __init__(self, width: int = 32, positions: int = 2048) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.register_buffer("cache", torch.zeros(positions, width), persistent=False)

    def forward(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        self.cache.index_copy_(0, position, self.lin(x))
        return self.cache.sum(0, keepdim=True)


class TwoCaches(nn.Module):
    """Two ``CachedLayer``s one after the other: two buffers updated in place."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CachedLayer() for _ in range(2))

    def forward(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, position)
        return x


class WithLoss(nn.Module):
    """A model plus a scalar loss, so that a planned training step is the whole step."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.model(*args).float().pow(2).mean()


def assert_same_adamw_steps(planned: nn.Module, reference: nn.Module, batches: list) -> None:
    """AdamW over both modules' parameters in lockstep, a step per batch (each a
    tuple of inputs): every step's loss bit for bit."""
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (planned, reference)]
    for batch in batches:
        losses = []
        for opt, module in zip(optimizers, (planned, reference)):
            opt.zero_grad()
            losses.append(module(*batch))
            losses[-1].backward()
            opt.step()
        assert torch.equal(*losses), batch


def assert_step_within(pm: nn.Module, inputs: tuple, budget: int) -> None:
    """One training step of the planned module ``pm`` under the meter (its
    gradients cleared first) holds ``budget``."""
    for p in pm.parameters():
        p.grad = None
    pm.run_measured_step(*inputs)
    assert pm.measured is not None and pm.measured.peak_bytes <= budget, pm.measured


def load_example(name: str) -> tuple[nn.Module, tuple]:
    filename, factory = EXAMPLE_FACTORIES[name]
    path = EXAMPLES / filename
    spec = importlib.util.spec_from_file_location(f"planner_example_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return getattr(module, factory)()


@pytest.fixture
def toy_factory():
    return toy


# ---- property-case counter (see property_cases.py) ----------------------------------


def _counting(test):
    """``test`` (a @given test's inner function) counting each example it runs."""

    @functools.wraps(test)
    def counted(*args, **kwargs):
        property_cases.count_case()
        return test(*args, **kwargs)

    counted.counts_property_cases = True
    return counted


def pytest_collection_modifyitems(items):
    # Every @given test counts its examples: hypothesis runs each one through the
    # reassignable ``.hypothesis.inner_test``, so no test needs to call count_case().
    for item in items:
        handle = getattr(getattr(item, "obj", None), "hypothesis", None)
        inner = getattr(handle, "inner_test", None)
        if inner is not None and not getattr(inner, "counts_property_cases", False):
            handle.inner_test = _counting(inner)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    property_cases.CURRENT[0] = item.nodeid
    try:
        yield
    finally:
        property_cases.CURRENT[0] = ""


def pytest_runtest_logreport(report):
    if report.failed and report.nodeid in property_cases.GENERATED:
        property_cases.VIOLATIONS.add(report.nodeid)


def pytest_terminal_summary(terminalreporter):
    if not property_cases.GENERATED:
        return
    terminalreporter.write_line(
        f"property cases: {property_cases.total()} generated, "
        f"{len(property_cases.VIOLATIONS)} violations "
        f"(in {len(property_cases.GENERATED)} property tests)"
    )


def planned_as_eager(make: type[nn.Module], x: torch.Tensor, mode: str) -> None:
    """Plan ``make()`` at 100% and check it against another ``make()`` with the
    same state: outputs equal in inference, every gradient equal in training."""
    import planner

    torch.manual_seed(0)
    model, reference = make(), make()
    reference.load_state_dict(model.state_dict())
    pm = planner.plan(model, "100%", (x,), mode=mode, profile="cpu", time_limit=5)
    if mode == "infer":
        with torch.no_grad():
            assert torch.equal(pm(x), reference(x))
        return
    pm(x).backward()
    reference(x).backward()
    for name, p in reference.named_parameters():
        assert torch.equal(model.get_parameter(name).grad, p.grad), name

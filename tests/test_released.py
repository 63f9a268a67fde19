"""planner/released.py: the weights an inference plan takes out of the model."""

from __future__ import annotations

import copy
import gc
import types
import warnings
import weakref

import pytest
import torch
from torch import nn

import planner
from planner.errors import PlannerError
from planner.runtime.meter import resident_bytes


def test_the_model_after_an_inference_plan_raises_instead_of_reading_garbage() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    x = torch.randn(128, 256)
    with torch.no_grad():
        expected = model(x)
    pm = planner.plan(model, "80%", (x,), mode="infer", profile="cpu")
    released = [n for n, p in model.named_parameters() if p.is_meta]
    assert released, "nothing released: the test proves nothing"
    # before: a meta weight, which torch's CPU linear read as uninitialized memory
    with pytest.raises(PlannerError, match=rf"'{released[0]}' of the Sequential was moved"):
        with torch.no_grad():
            model(x)
    with pytest.raises(PlannerError, match="plan a copy of the model"):
        copy.deepcopy(model)
    with pytest.raises(PlannerError, match=rf"'{released[0]}' of the Sequential"):
        torch.cat([dict(model.named_parameters())[released[0]]] * 2)  # was: StopIteration
    assert set(model.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert sum(p.numel() for p in model.parameters()) == 256 * 512 * 2 + 512 + 256
    with torch.no_grad():
        assert torch.equal(pm(x), expected)


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    return model, torch.randn(128, 256)


def test_the_weights_an_inference_plan_moves_off_the_device_are_freed() -> None:
    """The planned module held every weight it was given (as autograd's primals,
    which only training needs), so a weight homed in a tier kept its memory too."""
    model, x = _mlp()
    refs = {n: weakref.ref(p) for n, p in model.named_parameters()}
    pm = planner.plan(model, "80%", (x,), mode="infer", profile="cpu")
    moved = [t.name for t in pm.plan.tensors if t.kind == "param" and t.home != "device"]
    assert moved, "nothing moved: the test proves nothing"
    gc.collect()
    assert [n for n in moved if refs[n]() is not None] == []
    assert [n for n in refs if n not in moved and refs[n]() is None] == []  # kept: in use
    pm.close()


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(1024, 64)
        self.mid = nn.Linear(64, 64)
        self.head = nn.Linear(64, 1024, bias=False)
        self.head.weight = self.emb.weight  # GPT-2's tied embedding and head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.emb(ids)).relu())


def test_a_tied_weight_moved_off_the_device_is_freed_under_both_names() -> None:
    """The trace names a tied weight once (emb.weight): released by that name,
    the head kept the full copy, in memory the budget never counted (GPT-2
    quantized to int8: 8 MiB beside a 21 MB budget), and the warning blamed a
    reference of the caller's."""
    torch.manual_seed(0)
    model = _Tied().eval()
    ids = torch.randint(0, 1024, (4, 16))
    with torch.no_grad():
        expected = model(ids)
    full = weakref.ref(model.emb.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is held outside the model
        pm = planner.plan(model, "75%", (ids,), profile="cpu", quantize="int8", time_limit=5)
    homes = {t.name: t.home for t in pm.plan.tensors}
    assert homes["emb.weight"] != "device", "not moved: the test proves nothing"
    gc.collect()
    assert full() is None
    assert model.head.weight is model.emb.weight and model.head.weight.is_meta
    torch.testing.assert_close(pm(ids), expected, rtol=0.1, atol=0.1)  # int8
    pm.close()


def test_a_moved_weight_held_elsewhere_is_named() -> None:
    model, x = _mlp()
    held = model[0].weight  # noqa: F841  # the caller's own reference
    with pytest.warns(UserWarning, match=r"\(0\.weight\) are still held outside the model"):
        pm = planner.plan(model, "80%", (x,), mode="infer", profile="cpu")
    assert pm.plan.tensors[0].home != "device"
    pm.close()


def _reachable_bytes(root: object) -> int:
    """Bytes of the distinct in-memory CPU storages reachable from ``root`` through
    attributes, containers and closures: what it holds, whatever the meter counts."""
    seen: set[int] = set()
    storages: dict[int, int] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.device.type == "cpu" and not obj.is_meta:
                storage = obj.untyped_storage()
                if storage.data_ptr() and not getattr(storage, "filename", None):
                    storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, dict):
            stack += [*obj.keys(), *obj.values()]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack += list(obj)
        elif isinstance(obj, types.FunctionType):
            stack += [c.cell_contents for c in obj.__closure__ or ()]
        elif isinstance(obj, types.MethodType):
            stack.append(obj.__self__)
        elif hasattr(obj, "__dict__") and not isinstance(obj, types.ModuleType):
            stack.append(vars(obj))
    return sum(storages.values())


@pytest.mark.parametrize(("mode", "budget"), [("infer", "80%"), ("train", "60%")])
def test_a_plan_holds_no_memory_its_meter_does_not_count(mode: str, budget: str) -> None:
    """The meter counts a planned module's parameters and buffers as resident; a
    tensor it holds elsewhere (the released weights were, as autograd's primals)
    is memory in use that no measurement saw."""
    model, x = _mlp()
    if mode == "infer":
        model.eval()
    pm = planner.plan(model, budget, (x,), mode=mode, profile="cpu")
    if mode == "train":
        pm(x).sum().backward()
    assert any(t.home != "device" for t in pm.plan.tensors), "nothing moved: proves nothing"
    assert _reachable_bytes(pm) == resident_bytes(pm)
    pm.close()

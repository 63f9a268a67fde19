"""Meta-device model + safetensors checkpoint: planned without loading the weights
into RAM, outputs equal the eager model's."""

from __future__ import annotations

import gc
from typing import Any

import pytest
import torch
from conftest import assert_same_adamw_steps, assert_step_within
from safetensors.torch import save_file
from torch import nn

import planner
from planner.errors import PlannerError
from planner.runtime.checkpoint import attach_checkpoint, open_checkpoint, open_safetensors
from planner.runtime.meter import resident_bytes


def _blocks(device: str = "cpu") -> nn.Module:
    with torch.device(device):
        return nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.GELU()) for _ in range(8)])


def test_meta_model_with_checkpoint_matches_eager(tmp_path) -> None:
    torch.manual_seed(0)
    eager = _blocks()
    path = tmp_path / "model.safetensors"
    save_file(eager.state_dict(), str(path))
    x = torch.randn(64, 256)
    with torch.no_grad():
        expected = eager(x)
    meta = _blocks("meta")
    pm = planner.plan(meta, "40%", (x,), profile="cpu", time_limit=5, checkpoint=str(path))
    try:
        out = pm.run_measured(x)
        assert torch.equal(out, expected)
        assert pm.measured.peak_bytes <= pm.plan.budget_bytes
        weights = sum(p.numel() * 4 for p in eager.parameters())
        # the model's weights are not in RAM: only the plan's device-home share is
        assert resident_bytes(meta) + resident_bytes(pm) < weights
    finally:
        pm.close()
    del pm
    gc.collect()


def test_checkpoint_is_memory_mapped_and_checked(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"weight": torch.randn(4, 4), "bias": torch.randn(4)}, str(path))
    tensors = open_safetensors(path)
    assert resident_bytes(tensors) == 0  # file-backed: not counted as RAM
    meta = nn.Linear(4, 5, device="meta")
    with pytest.raises(PlannerError, match="model expects"):
        attach_checkpoint(meta, path)
    with pytest.raises(PlannerError, match="cannot read"):
        open_safetensors(tmp_path / "missing.safetensors")


class _Scaled(nn.Module):
    """A layer with a non-persistent buffer its constructor computes (as a rotary
    embedding's ``inv_freq``): never in a state_dict, so never in a checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 64)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale


class _WithScaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _Scaled()
        self.head = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.inner(x))


def test_a_non_persistent_meta_buffer_is_an_error_that_says_what_to_do(tmp_path) -> None:
    torch.manual_seed(0)
    eager = _WithScaled()
    path = tmp_path / "model.safetensors"
    save_file(eager.state_dict(), str(path))
    x = torch.randn(8, 64)
    with torch.no_grad():
        expected = eager(x)
    with torch.device("meta"):
        meta = _WithScaled()
    with pytest.raises(PlannerError) as err:
        planner.plan(meta, "100%", (x,), profile="cpu", checkpoint=str(path))
    message = str(err.value)
    assert "'inner.scale' is a non-persistent buffer" in message
    assert "model.inner = _Scaled(...)" in message
    assert all(t.is_meta for t in meta.state_dict().values())  # nothing half-attached
    # what it says to do: that module made outside the meta device
    with torch.device("meta"):
        meta = _WithScaled()
    real = _Scaled()
    meta.inner = real
    meta.inner.linear = nn.Linear(64, 64, device="meta")  # its weights still from the file
    pm = planner.plan(meta, "100%", (x,), profile="cpu", time_limit=5, checkpoint=str(path))
    try:
        assert torch.equal(pm(x), expected)
    finally:
        pm.close()


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


class _BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(256, 256), nn.BatchNorm1d(256), nn.GELU(),
            nn.Linear(256, 256), nn.BatchNorm1d(256), nn.GELU(), nn.Linear(256, 8),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).pow(2).mean()


@pytest.mark.parametrize("net", [_blocks, _BatchNormNet], ids=["mlp", "batchnorm"])
def test_training_from_a_checkpoint_matches_eager_and_never_writes_it(tmp_path, net) -> None:
    """Full fine-tuning of a meta model from its checkpoint: three SGD steps give
    eager's losses, parameters and BatchNorm statistics, within the budget by the
    meter, with the weights not in RAM but for what the plan keeps there; and the
    checkpoint's bytes are unchanged (its map is shared: a step writing through
    it would overwrite the user's file)."""

    def fresh(device: str) -> nn.Module:
        torch.manual_seed(0)
        with torch.device(device):
            model = net() if net is _BatchNormNet else nn.Sequential(net(), _Mean())
        return model

    eager = fresh("cpu")
    path = tmp_path / "model.safetensors"
    save_file(eager.state_dict(), str(path))
    digest = _sha256(path)
    x = torch.randn(64, 256)
    meta = fresh("meta")
    pm = planner.plan(
        meta, "40%", (x,), mode="train", profile="cpu", time_limit=5, checkpoint=str(path)
    )
    try:
        assert "disk" in {d.home for d in pm.plan.tensors if d.kind == "param"}
        weights = sum(p.numel() * 4 for p in eager.parameters())
        assert resident_bytes(meta) + resident_bytes(pm) < weights
        assert _sgd_losses(pm, x) == _sgd_losses(eager, x)
        for (name, a), (_, b) in zip(meta.state_dict().items(), eager.state_dict().items()):
            assert torch.equal(a, b), name
        for p in pm.parameters():
            p.grad = None
        pm.run_measured_step(x)
        assert pm.measured is not None and pm.measured.peak_bytes <= pm.plan.budget_bytes
    finally:
        pm.close()
    assert _sha256(path) == digest, "training wrote into the checkpoint"


def _sgd_losses(module: nn.Module, x: torch.Tensor) -> list[float]:
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = module(x)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def lora_over_a_saved_base(tmp_path) -> tuple[nn.Module, nn.Module, torch.Tensor, Any]:
    """A ``LoRANet``, its frozen base saved to ``base.safetensors`` under
    ``tmp_path``: (the eager net, the same net on the meta device with the
    adapters made in memory, an input, the file's path)."""
    from test_frozen_quantized import LoRANet

    torch.manual_seed(0)
    eager = LoRANet()
    x = torch.randn(64, 512)
    path = tmp_path / "base.safetensors"
    save_file({k: v for k, v in eager.state_dict().items() if ".base." in k}, str(path))
    with torch.device("meta"):
        meta = LoRANet()
    for mine, theirs in zip(meta.layers, eager.layers):  # the adapters: made, not loaded
        mine.a = nn.Parameter(theirs.a.detach().clone())
        mine.b = nn.Parameter(theirs.b.detach().clone())
    return eager, meta, x, path


def test_lora_over_a_frozen_base_streamed_from_its_checkpoint_and_stored_int8(tmp_path) -> None:
    """QLoRA from a checkpoint: the frozen base comes from its file (built on the
    meta device, never in RAM whole), the plan stores some of it int8, and three
    AdamW steps over the adapters are eager's over the round-tripped base, bit for
    bit; the checkpoint is unchanged."""
    from test_frozen_quantized import QUANTIZE_OVER_DISK, _frozen_bytes

    from planner.runtime import quant

    eager, meta, x, path = lora_over_a_saved_base(tmp_path)
    digest = _sha256(path)
    budget = int(0.65 * _frozen_bytes(eager))
    pm = planner.plan(
        meta, budget, (x,), mode="train", quantize={"weights": "int8"},
        profile=QUANTIZE_OVER_DISK, time_limit=20, checkpoint=str(path),
    )  # fmt: skip
    try:
        homes = {d.name for d in pm.plan.tensors if d.home.endswith("int8")}
        assert homes, "nothing stored int8"
        assert_same_adamw_steps(pm, quant.round_tripped(eager, homes, "int8"), [(x,)] * 3)
        assert_step_within(pm, (x,), budget)
    finally:
        pm.close()
    assert _sha256(path) == digest, "training wrote into the checkpoint"


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_several_input_shapes_from_a_checkpoint(tmp_path, mode: str) -> None:
    """extra_example_inputs with checkpoint=: each shape's output is eager's, the
    weights are in RAM only where the plans keep them, each once (both shapes'
    modules held its own copy of every device-home weight in inference, each
    exported program holding the map), and the checkpoint is unchanged."""
    torch.manual_seed(0)
    eager = _blocks()
    path = tmp_path / "model.safetensors"
    save_file(eager.state_dict(), str(path))
    digest = _sha256(path)
    shapes = [torch.randn(64, 256), torch.randn(5, 256)]
    meta = _blocks("meta")
    pm = planner.plan(
        meta, "40%", (shapes[0],), mode=mode, profile="cpu", time_limit=5,
        checkpoint=str(path), extra_example_inputs=[(shapes[1],)],
    )  # fmt: skip
    try:
        homes = {d.name: d.home for d in pm.plan.tensors}
        kept = sum(p.numel() * 4 for n, p in eager.named_parameters() if homes[n] == "device")
        assert 0 < kept < sum(p.numel() * 4 for p in eager.parameters())
        assert resident_bytes(meta, pm) == kept
        with torch.set_grad_enabled(mode == "train"):
            for x in shapes:
                assert torch.equal(pm(x), eager(x))
    finally:
        pm.close()
    assert _sha256(path) == digest


class _TiedLM(nn.Module):
    """An embedding and an output head sharing one weight, as GPT-2's do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(512, 128)
        self.body = nn.Sequential(nn.Linear(128, 128), nn.GELU())
        self.head = nn.Linear(128, 512, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(ids))).logsumexp(-1).mean()


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_tied_weights_saved_once_attach_under_both_names(tmp_path, mode: str) -> None:
    """safetensors saves a tied weight once (save_model keeps one name): both of
    the meta model's names get the one tensor, still tied, and the planned model
    computes eager's loss (training: the same SGD steps, which a weight untied
    into two would not give)."""
    from safetensors.torch import save_model

    torch.manual_seed(0)
    eager = _TiedLM()
    path = tmp_path / "tied.safetensors"
    save_model(eager, str(path))
    assert len(open_safetensors(path)) == 3  # embed (= head), body weight and bias
    with torch.device("meta"):
        attached = _TiedLM()
    assert sorted(attach_checkpoint(attached, path)) == [
        "body.0.bias", "body.0.weight", "embed.weight", "head.weight",
    ]  # fmt: skip
    assert attached.head.weight is attached.embed.weight
    with torch.device("meta"):
        meta = _TiedLM()
    ids = torch.randint(0, 512, (16, 32))
    pm = planner.plan(
        meta, "100%", (ids,), mode=mode, profile="cpu", time_limit=5, checkpoint=str(path)
    )
    try:
        if mode == "infer":
            with torch.no_grad():
                assert torch.equal(pm(ids), eager(ids))
        else:
            assert _sgd_losses(pm, ids) == _sgd_losses(eager, ids)
            torch.testing.assert_close(meta.embed.weight, eager.embed.weight, rtol=0, atol=0)
    finally:
        pm.close()


def test_a_tensor_missing_under_every_name_is_named(tmp_path) -> None:
    path = tmp_path / "body.safetensors"
    save_file({"body.0.weight": torch.randn(128, 128), "body.0.bias": torch.randn(128)}, str(path))
    with torch.device("meta"):
        meta = _TiedLM()
    with pytest.raises(PlannerError, match="no tensor 'embed.weight' or 'head.weight'"):
        attach_checkpoint(meta, path)
    assert meta.body[0].weight.is_meta, "an error must leave the model as it was"


class _Mean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.pow(2).mean()


@pytest.mark.parametrize("given", ["index", "directory"])
def test_a_sharded_checkpoint_is_read_through_its_index(tmp_path, given) -> None:
    """A checkpoint in shards, as Hugging Face saves models over a few GB
    (``save_torch_state_dict``: shard files and ``model.safetensors.index.json``):
    ``checkpoint=`` its index or its directory gives eager's outputs, and the
    weights homed on disk are read in place from several shards."""
    from huggingface_hub import save_torch_state_dict

    torch.manual_seed(0)
    eager = _blocks()
    shards = tmp_path / "sharded"
    shards.mkdir()
    save_torch_state_dict(eager.state_dict(), shards, max_shard_size=600_000)
    assert len(list(shards.glob("*.safetensors"))) > 2
    x = torch.randn(64, 256)
    with torch.no_grad():
        expected = eager(x)
    where = shards / "model.safetensors.index.json" if given == "index" else shards
    pm = planner.plan(_blocks("meta"), "40%", (x,), profile="cpu", time_limit=5, checkpoint=where)
    try:
        assert torch.equal(pm(x), expected)
        assert len(pm.report.read_in_place["files"]) > 1
    finally:
        pm.close()


def test_a_sharded_checkpoint_that_does_not_match_its_index_is_an_error(tmp_path) -> None:
    save_file({"0.weight": torch.randn(4, 4)}, tmp_path / "a.safetensors")
    save_file({"0.weight": torch.randn(4, 4), "0.bias": torch.randn(4)}, tmp_path / "b.safetensors")
    with pytest.raises(PlannerError, match="'0.weight' is in two shards, a.safetensors and b"):
        open_checkpoint(tmp_path)  # no index: which one is meant?
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"0.weight": "a.safetensors", "0.bias": "a.safetensors"}}')
    with pytest.raises(
        PlannerError, match=r"names 1 tensor\(s\) its shards do not have \(0.bias\)"
    ):
        open_checkpoint(tmp_path)
    index.write_text('{"weight_map": {"0.weight": "a.safetensors", "0.bias": "b.safetensors"}}')
    assert set(open_checkpoint(tmp_path)) == {"0.weight", "0.bias"}
    index.write_text("{}")
    with pytest.raises(PlannerError, match="cannot read the sharded checkpoint index"):
        open_checkpoint(index)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PlannerError, match="no \\*.safetensors file"):
        open_checkpoint(empty)


def _planned_with_four_frozen_blocks(path, x: torch.Tensor):  # type: ignore[no-untyped-def]
    """A meta model attached to ``path`` whose first four blocks are frozen (read
    from the checkpoint in place at 40%), planned for training: (model, pm)."""
    meta = nn.Sequential(_blocks("meta"), _Mean())
    for p in meta[0][:4].parameters():
        p.requires_grad_(False)
    pm = planner.plan(
        meta, "40%", (x,), mode="train", profile="cpu", time_limit=5, checkpoint=str(path)
    )
    return meta, pm


def test_load_state_dict_never_writes_the_checkpoint_a_frozen_weight_is_read_from(
    tmp_path,
) -> None:
    """A frozen weight the plan reads from its checkpoint in place views the file's
    shared map: ``pm.load_state_dict`` copied into it, writing the user's file (the
    next step then failed with LinkedFileChanged, even for the same values). Loading
    the module's own state dict (a resume) skips them and trains on; other values
    for them are refused before anything is loaded, the file untouched."""
    torch.manual_seed(0)
    eager = nn.Sequential(_blocks(), _Mean())
    path = tmp_path / "model.safetensors"
    save_file(eager.state_dict(), str(path))
    digest, mtime = _sha256(path), path.stat().st_mtime_ns
    x = torch.randn(64, 256)
    meta, pm = _planned_with_four_frozen_blocks(path, x)
    try:
        from planner.runtime.checkpoint import is_checkpoint_view

        linked = [n for n, p in meta.named_parameters() if is_checkpoint_view(p)]
        assert linked, "no frozen weight read from the checkpoint in place"
        pm(x).backward()
        state = {k: v.clone() for k, v in pm.state_dict().items()}
        pm.load_state_dict(state)  # a resume: the same values
        assert path.stat().st_mtime_ns == mtime
        pm(x).backward()  # before: LinkedFileChanged
        state[linked[0]] += 1.0
        before = {k: v.clone() for k, v in meta.state_dict().items()}
        with pytest.raises(PlannerError, match="would write into that file") as info:
            pm.load_state_dict(state)
        for k, v in meta.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} loaded though the load was refused"
        meta_value = dict(state, **{linked[0]: torch.empty_like(state[linked[0]], device="meta")})
        with pytest.raises(PlannerError, match="would write into that file"):
            pm.load_state_dict(meta_value)  # before: "Cannot copy out of meta tensor"
        # as the message advises: left out, the others load (strict=True: "Missing key")
        assert "strict=False" in str(info.value)
        del state[linked[0]]
        assert pm.load_state_dict(state, strict=False).missing_keys == [linked[0]]
        pm(x).backward()
    finally:
        pm.close()
    assert _sha256(path) == digest, "load_state_dict wrote into the checkpoint"


def test_a_resume_is_not_refused_for_a_frozen_weight_holding_a_nan(tmp_path) -> None:
    """A frozen weight read from the checkpoint in place that holds a NaN equals its
    own copy (a resume from a saved ``pm.state_dict()``): torch.equal said it did
    not, and the load was refused as if it held other values."""
    torch.manual_seed(0)
    eager = nn.Sequential(_blocks(), _Mean())
    state = eager.state_dict()
    state["0.0.0.weight"][0, 0] = float("nan")  # a row no input reaches, say
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    digest = _sha256(path)
    x = torch.randn(64, 256)
    meta, pm = _planned_with_four_frozen_blocks(path, x)
    try:
        from planner.runtime.checkpoint import is_checkpoint_view

        assert is_checkpoint_view(meta[0][0][0].weight), "not read from the checkpoint"
        saved = {k: v.clone() for k, v in pm.state_dict().items()}
        pm.load_state_dict(saved)  # the same values, NaN included
        saved["0.0.0.weight"][0, 1] += 1.0
        with pytest.raises(PlannerError, match="would write into that file"):
            pm.load_state_dict(saved)
    finally:
        pm.close()
    assert _sha256(path) == digest

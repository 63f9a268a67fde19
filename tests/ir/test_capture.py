"""Capture: inputs and outputs of every shape a user hands us; clear errors."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import TOY_KINDS, TOY_SIZES, load_example, toy
from torch import nn

from planner.errors import CaptureError
from planner.ir import ValueKind, build_program, capture


class DictInOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, batch: dict, scale: float = 2.0) -> dict:
        h = self.a(batch["x"]) * scale
        return {"h": h, "pair": (self.b(h), batch["y"].sum())}


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.out = nn.Linear(16, 50, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(ids))


class InPlaceViews(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        h.relu_()
        flat = h.view(-1)
        flat.mul_(2.0)
        self.count.add_(1)
        return h.transpose(0, 1).reshape(16, -1)[:, :4]


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # the offending line
            return x * 2
        return x


@pytest.mark.parametrize("mode", ["infer", "train"])
@pytest.mark.parametrize("kind", TOY_KINDS)
@pytest.mark.parametrize("size", TOY_SIZES)
def test_toys_capture_and_build(kind: str, size: int, mode: str) -> None:
    model, inputs = toy(kind, size)
    program = build_program(capture(model, inputs, mode))
    params = [
        program.values[i] for i in program.inputs if program.values[i].kind is ValueKind.PARAM
    ]
    assert len(params) == len(list(model.parameters()))
    assert sum(p.nbytes for p in params) == sum(p.numel() * 4 for p in model.parameters())
    assert program.ops, "no ops captured"
    # schedule order: every input of an op is produced earlier (or is a graph input)
    for op in program.ops:
        for v in op.inputs:
            producer = program.values[v].producer
            assert producer is None or producer < op.index
    if mode == "train":
        grads = list(program.values_of_kind(ValueKind.GRAD))
        assert len({program.values[g].storage for g in (v.index for v in grads)}) == len(params)
        # the forward region comes first
        phases = [op.phase.value for op in program.ops]
        assert phases == sorted(phases, key=lambda p: p == "backward")


def test_pytree_inputs_and_outputs() -> None:
    model = DictInOut()
    batch = {"x": torch.randn(4, 8), "y": torch.randn(3)}
    captured = capture(model, ((batch,), {"scale": 3.0}), "infer")
    program = build_program(captured)
    sources = {
        program.values[i].source
        for i in program.inputs
        if program.values[i].kind is ValueKind.INPUT
    }
    assert sources == {"input[0][0]['x']", "input[0][0]['y']"}
    assert len(program.outputs) == 3


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_transformers_model_output(mode: str) -> None:
    model, inputs = load_example("gpt2_full")  # returns a CausalLMOutput
    captured = capture(model, inputs, mode)
    assert captured.out_spec is not None and "CausalLMOutput" in str(captured.out_spec)
    program = build_program(captured)
    logits = program.values[program.outputs[program.num_forward_outputs - 1]]
    assert logits.shape[-1] == model.config.vocab_size


class _Flagged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x, flag, y, scale=1.0):  # type: ignore[no-untyped-def]
        return (self.a(x) + (self.b(y) if flag else 0)) * scale


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_inputs_are_named_by_their_paths_with_flags_among_them(mode, caplog) -> None:  # type: ignore[no-untyped-def]
    """Flags beside the tensors (``use_cache=False``) are inputs of the exported
    program and primals of the joint graph too: each input is named by its own
    path (a flag before a tensor once shifted the names, and in training warned
    of a primal count mismatch)."""
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    with caplog.at_level("WARNING", logger="planner.ir.capture"):
        captured = capture(_Flagged(), ((x, True, y), {"scale": 2.0}), mode)
    inputs = [r.source for r in captured.input_roles if r.kind is ValueKind.INPUT]
    assert inputs == ["input[0][0]", "input[0][1]", "input[0][2]", "input[1]['scale']"]
    assert "primals" not in caplog.text


def test_tied_weights_counted_once() -> None:
    model = Tied()
    ids = torch.randint(0, 50, (2, 5))
    for mode in ("infer", "train"):
        program = build_program(capture(model, (ids,), mode))
        params = [
            program.values[i] for i in program.inputs if program.values[i].kind is ValueKind.PARAM
        ]
        storages = {p.storage for p in params}
        assert len(storages) == 1, f"{mode}: tied weight appears as {len(storages)} storages"


def test_views_share_storage_and_inplace_is_functionalized() -> None:
    model = InPlaceViews()
    x = torch.randn(16, 16)
    program = build_program(capture(model, (x,), "infer"))
    views = [v for v in program.values if v.is_view]
    assert views, "expected views (view, transpose, slice)"
    for v in views:
        base = program.values[program.storages[v.storage].base]
        assert base.index != v.index
    buffers = list(program.values_of_kind(ValueKind.BUFFER))
    assert [b.source for b in buffers] == ["count"]
    updated = [program.values[o] for o in program.outputs]
    assert any(v.kind is ValueKind.OUTPUT and v.shape == () for v in updated)


def test_data_dependent_control_flow_names_the_line(capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CaptureError) as info:
        capture(DataDependent(), (torch.randn(3),), "infer")
    message = str(info.value)
    assert "test_capture.py" in message
    assert "x.sum() > 0" in message
    assert "torch.where" in message or "torch.cond" in message
    # torch.export's partial graph is kept on the error, not printed (it was: a
    # thousand lines of stderr for a Longformer)
    assert info.value.partial_graph and "def forward" in info.value.partial_graph
    assert ".partial_graph" in message
    assert "def forward" not in capsys.readouterr().err


def test_the_data_dependent_hint_does_not_suggest_torch_cond() -> None:
    """The hint named torch.cond as a rewrite, which planner then refuses
    (planner.ir.control_flow): it must point at what plans."""
    with pytest.raises(CaptureError) as info:
        capture(DataDependent(), (torch.randn(3),), "infer")
    message = str(info.value)
    assert "torch.where" in message
    assert "rewrite it with torch.where / torch.cond" not in message
    assert "torch.cond is refused" in message


class _Seq2Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Transformer(
            d_model=32, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
            dim_feedforward=64, dropout=0.0, batch_first=True,
        )  # fmt: skip

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return self.transformer(src, tgt, **kwargs)


def test_a_torch_nn_line_is_named_and_nn_transformer_told_how_to_avoid_it() -> None:
    src, tgt = torch.randn(2, 12, 32), torch.randn(2, 8, 32)
    mask = nn.Transformer.generate_square_subsequent_mask(8)
    with pytest.raises(CaptureError) as info:
        capture(_Seq2Seq(), ((src, tgt), {"tgt_mask": mask}), "infer")
    message = str(info.value)
    # before: only the user's call into nn.Transformer, and the generic hint
    assert "test_capture.py" in message and "self.transformer(src, tgt" in message
    assert "inside torch/nn/modules/transformer.py" in message
    assert "_detect_is_causal_mask" in message and "tgt_is_causal=True" in message
    captured = capture(_Seq2Seq(), ((src, tgt), {"tgt_mask": mask, "tgt_is_causal": True}), "infer")
    assert captured.graph_module is not None


def test_a_cumulative_batch_norm_is_told_to_take_a_float_momentum() -> None:
    """momentum=None reads num_batches_tracked into Python: torch.export cannot
    trace it, and the generic hint (rewrite with torch.where) cannot be applied to
    torch's own module."""
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8, momentum=None))
    with pytest.raises(CaptureError, match=r"(?s)batchnorm\.py.*float momentum"):
        capture(model, (torch.randn(4, 8),), "train")
    model[1].momentum = 0.1
    capture(model, (torch.randn(4, 8),), "train")


class _PackedLstm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 16, batch_first=True)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(
            x, lengths, batch_first=True, enforce_sorted=False
        )
        out, _ = nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0], batch_first=True)
        return out


def test_an_rnn_given_a_packed_sequence_is_told_to_take_padded_batches() -> None:
    """The generic hint (make forward traceable) said nothing of the cause: a
    packed sequence's batch sizes are the lengths' values."""
    example = (torch.randn(4, 5, 8), torch.tensor([5, 3, 2, 4]))
    with pytest.raises(CaptureError, match=r"(?s)rnn\.py.*PackedSequence.*padded batches"):
        capture(_PackedLstm(), example, "infer")


class _Nested(nn.Module):
    """The failing line is also a caller of itself, further up the stack."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.inner = _Nested(depth - 1) if depth else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) if self.inner is not None else (x if x.sum() > 0 else -x)


def test_a_failure_in_user_code_names_no_torch_nn_line() -> None:
    with pytest.raises(CaptureError) as info:
        capture(_Nested(2), (torch.randn(2, 4),), "infer")
    # before: "inside torch/nn/modules/module.py ... _call_impl", the dispatch
    # between two calls of the same user line
    assert "inside torch/nn" not in str(info.value)
    assert "x.sum() > 0" in str(info.value)


_FAKE_CALLS = {"n": 0}


@torch.library.custom_op("planner_tests::doubled_once", mutates_args=())
def _doubled_once(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_doubled_once.register_fake
def _doubled_once_fake(x: torch.Tensor) -> torch.Tensor:
    _FAKE_CALLS["n"] += 1
    if _FAKE_CALLS["n"] > 1:  # traced by export, then failing in the joint trace
        raise KeyError("no entry for this shape")
    return torch.empty_like(x)


_doubled_once.register_autograd(lambda ctx, grad: grad * 2)


class _DoubledOnce(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _doubled_once(self.linear(x)).sum()


def test_an_error_in_the_joint_trace_is_described_as_raised() -> None:
    """An op failing while AOTAutograd runs the exported graph (which export ran
    without failing) is named as it raised: a KeyError, at the line that raised it,
    not the FX Interpreter's RuntimeError with neither."""
    _FAKE_CALLS["n"] = 0
    with pytest.raises(CaptureError) as info:
        capture(_DoubledOnce(), (torch.randn(2, 4),), "train")
    message = str(info.value)
    assert "KeyError: 'no entry for this shape'" in message, message
    assert 'raise KeyError("no entry for this shape")' in message, message
    assert "While executing" not in message, message


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        ("not a tensor", "example_inputs must be"),
        ((1, 2), "contain no tensor"),
        ((torch.randn(2), object()), "found a object"),
    ],
)
def test_bad_example_inputs(inputs: object, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        capture(nn.Linear(2, 2), inputs, "infer")


def test_unknown_mode() -> None:
    with pytest.raises(ValueError, match="unknown mode 'training'"):
        capture(nn.Linear(2, 2), (torch.randn(1, 2),), "training")


class _FloatHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x).float().log_softmax(-1).mean()


def test_metadata_asserts_are_dropped_so_they_hold_no_tensor_into_the_backward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A no-op ``.float()`` traces to ``_assert_tensor_metadata``, which the joint
    graph places in the backward, where it would keep the logits alive."""
    target = torch.ops.aten._assert_tensor_metadata.default
    x = torch.randn(4, 8)

    def targets() -> list:
        gm = capture(_FloatHead(), (x,), "train").graph_module
        return [n.target for n in gm.graph.nodes if n.op == "call_function"]

    # planner.ir.capture is also the name of the function planner.ir exports
    capture_module = importlib.import_module("planner.ir.capture")
    with monkeypatch.context() as patch:
        patch.setattr(capture_module, "drop_metadata_asserts", lambda gm: 0)
        assert target in targets()  # what the trace has
    assert target not in targets()


@pytest.mark.parametrize(
    "add_norm",
    [nn.utils.parametrizations.spectral_norm, nn.utils.spectral_norm],
    ids=["parametrization", "hook"],
)
def test_a_buffer_written_in_a_no_grad_region_is_a_buffer_update(add_norm) -> None:  # type: ignore[no-untyped-def]
    """Spectral norm's power iteration writes its ``_u``/``_v`` buffers under
    no_grad, where the export signature does not see the write: the new ``_u`` was
    taken for the model's output (a 1-D tensor came back from the planned module)."""
    import copy

    import planner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 8))
    add_norm(model[2])
    reference, x = copy.deepcopy(model), torch.randn(16, 32)
    captured = capture(model, (x,), mode="train")
    updated = [r.source for r in captured.output_roles[: captured.num_forward_outputs]]
    assert len(updated) == 3 and updated[2] == "output"
    assert all(source.endswith(("_u (updated)", "_v (updated)")) for source in updated[:2])
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu")
    for _ in range(2):  # the buffers move on each step, as in eager
        pm(x).pow(2).mean().backward()
        reference(x).pow(2).mean().backward()
    for p, r in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, r.grad)
    for b, r in zip(model.buffers(), reference.buffers()):
        assert torch.equal(b, r)


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.utils.checkpoint.checkpoint(self.a, x, use_reentrant=self.reentrant)
        return self.b(torch.relu(h))


def test_a_graph_cut_before_the_parameters_names_the_likely_causes() -> None:
    """Reentrant checkpointing runs under no_grad: the old message said only to
    check that parameters require grad, which they did."""
    x = torch.randn(4, 8)
    cut = r"though 4 parameters require grad.*use_reentrant=False"
    with pytest.raises(CaptureError, match=cut):
        capture(_Checkpointed(reentrant=True), (x,), mode="train")
    # an input that requires grad takes the checkpoint's Function's own backward:
    # refused as such (planner/ir/custom_backward.py), with the same way out
    function = r"torch\.utils\.checkpoint\.CheckpointFunction\..*use_reentrant=False"
    with pytest.raises(CaptureError, match=function):
        capture(_Checkpointed(reentrant=True), (x.requires_grad_(),), mode="train")
    capture(_Checkpointed(reentrant=False), (x,), mode="train")  # traced through
    frozen = _Checkpointed(reentrant=False).requires_grad_(False)
    with pytest.raises(CaptureError, match="no parameter requires grad"):
        capture(frozen, (torch.randn(4, 8),), mode="train")


class _PlainTensorAttribute(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(32, 32)
        self.table = torch.randn(1, 8, 32)  # neither parameter nor buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x + self.table.type_as(x).clone().detach())


def test_a_plain_tensor_attribute_is_traced_for_training() -> None:
    """VideoMAE keeps its sinusoidal position table as a plain attribute: training
    capture failed inside AOTAutograd ('Please convert all Tensors to FakeTensors')."""
    import copy

    import planner

    torch.manual_seed(0)
    model, x = _PlainTensorAttribute(), torch.randn(4, 8, 32)
    reference = copy.deepcopy(model)
    pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu")
    model.extra = nn.Linear(2, 2)  # a registration: the state watch looks again
    pm(x).pow(2).mean().backward()  # and does not take the table for a replaced buffer
    reference(x).pow(2).mean().backward()
    for p, r in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, r.grad)


class _WithConstantOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> tuple:
        # nn.MultiheadAttention returns (output, None) without weights
        out, weights = self.attention(x, x, x, need_weights=False)
        return out, weights, x.shape[0], "tag", 2.5


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_non_tensor_outputs_come_back_in_place(mode: str) -> None:
    """The executor returns tensors only: a None, int, string or float output made
    the planned module fail to unflatten its outputs (training: an IndexError)."""
    import copy

    import planner

    torch.manual_seed(0)
    model, x = _WithConstantOutputs(), torch.randn(2, 8, 16)
    reference = copy.deepcopy(model)
    pm = planner.plan(model, "100%", (x,), mode=mode, profile="cpu")
    with torch.set_grad_enabled(mode == "train"):
        got, expected = pm(x), reference(x)
    assert got[1:] == (None, 2, "tag", 2.5) == expected[1:]
    assert torch.equal(got[0], expected[0])
    if mode == "train":
        got[0].pow(2).mean().backward()
        expected[0].pow(2).mean().backward()
        for p, r in zip(model.parameters(), reference.parameters()):
            assert torch.equal(p.grad, r.grad)


class _WithScripted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.jit.script(nn.Linear(8, 8))
        self.b = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_a_torchscript_submodule_is_named() -> None:
    """Before: "Linear.forward() takes 2 positional arguments but 3 were given"."""
    with pytest.raises(CaptureError, match=r"TorchScript modules \(a; .*before scripting"):
        capture(_WithScripted(), (torch.randn(2, 8),), "infer")


def test_a_sparse_gradient_is_a_clear_error() -> None:
    """Before: NotImplementedError 'Cannot access storage of SparseTensorImpl'."""
    model = nn.Sequential(nn.Embedding(100, 8, sparse=True), nn.Linear(8, 2))
    captured = capture(model, (torch.randint(0, 100, (4, 3)),), "train")
    with pytest.raises(CaptureError, match=r"sparse_coo tensor .*use sparse=False"):
        build_program(captured)


def test_a_transformers_cache_in_the_outputs_says_to_turn_it_off() -> None:
    """Before: torch's advice to register a pytree, naming nothing of use_cache,
    and a frame of torch's own generated code as the user's line."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config).eval()
    with pytest.raises(CaptureError, match=r"returns a DynamicCache .*use_cache = False") as info:
        capture(model, (torch.randint(0, 64, (1, 8)),), "infer")
    assert "<string>" not in str(info.value)


class _ReturnsAnObject(nn.Module):
    class Result:
        pass

    def forward(self, x: torch.Tensor) -> object:
        result = self.Result()
        result.y = x * 2  # type: ignore[attr-defined]
        return result


def test_an_unflattenable_output_is_named() -> None:
    with pytest.raises(CaptureError, match=r"instance of Result, .*register_pytree_node"):
        capture(_ReturnsAnObject(), (torch.randn(2),), "infer")


def test_a_model_an_earlier_plan_took_weights_from_is_named() -> None:
    """Before: FakeTensorDeviceMismatchError, 'found at least two devices, cpu and
    meta'."""
    import planner

    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    x = torch.randn(8, 256)
    planned = planner.plan(model, "60%", (x,), profile="cpu", time_limit=5)
    try:
        assert any(type(p).__name__ == "ReleasedWeight" for p in model.parameters())
        with pytest.raises(CaptureError, match=r"moved into a planned module .*copy.deepcopy"):
            capture(model, (x,), "infer")
    finally:
        planned.close()


class _ClipsInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.a.weight.clamp_(-0.05, 0.05)
        return self.a(x).sum()


def test_training_a_model_that_writes_its_parameters_says_what_to_do() -> None:
    """The write is under no_grad (its value requires no grad): the message names
    the parameter and the ways out, not a value that requires grad."""
    with pytest.raises(CaptureError, match=r"writes in place into a\.weight, which requires grad"):
        capture(_ClipsInForward(), (torch.randn(2, 8),), "train")
    with pytest.raises(CaptureError, match=r"after optimizer\.step\(\).*mode='infer'"):
        capture(_ClipsInForward(), (torch.randn(2, 8),), "train")
    capture(_ClipsInForward().requires_grad_(False), (torch.randn(2, 8),), "infer")


def test_two_threads_capturing_at_once_take_turns() -> None:
    """torch.export is not thread-safe: two threads planning at once both failed
    ("ProxyTorchDispatchMode slot already occupied"), told to make their
    forward() traceable."""
    import threading

    models = [nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)) for _ in range(2)]
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for mode in ("infer", "train", "infer"):
                capture(models[k], (torch.randn(8, 32),), mode)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_a_weight_wrapping_other_tensors_is_refused_by_name(mode: str) -> None:
    """A wrapper tensor subclass (torchao's and NF4 weights are; torch's TwoTensor
    here) has no storage of its own to place: the state checks failed on it with a
    raw "invalid python storage" RuntimeError."""
    from torch.testing._internal.two_tensor import TwoTensor

    model = nn.Linear(8, 8)
    w = model.weight.detach()
    model.weight = nn.Parameter(TwoTensor(w.clone(), w.clone()), requires_grad=False)
    with pytest.raises(CaptureError, match=r"weight \(TwoTensor\) is a tensor subclass"):
        capture(model, (torch.randn(4, 8),), mode)


def test_a_buffer_updated_in_place_then_read_by_a_saved_op_trains() -> None:
    """``self.count += 1; return h * self.count``: unlifting the exported program
    copied ``count`` into itself after ``mul`` saved it, and AOTAutograd's trace
    failed with "modified by an inplace operation" where eager (and aot_eager)
    train."""
    import planner

    class Counts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.register_buffer("count", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.count += 1
            return self.lin(x) / self.count

    torch.manual_seed(0)
    model, reference = Counts(), Counts()
    reference.load_state_dict(model.state_dict())
    pm = planner.plan(
        model, "100%", (torch.randn(4, 8),), mode="train", profile="cpu", time_limit=5
    )
    for _ in range(2):
        x = torch.randn(4, 8)
        for p in [*model.parameters(), *reference.parameters()]:
            p.grad = None
        pm(x).pow(2).sum().backward()
        reference(x).pow(2).sum().backward()
        for name, p in reference.named_parameters():
            assert torch.equal(model.get_parameter(name).grad, p.grad), name
        assert torch.equal(model.count, reference.count)


def test_a_ddp_wrapper_is_told_to_plan_the_model_then_wrap_the_planned_module() -> None:
    """planner.plan(DistributedDataParallel(model), ...) failed inside torch.export
    ("Non-recursive torch.compiler.disable is not supported") with the advice to
    make forward() traceable; the order that works, DDP of the planned module,
    gives eager DDP's gradients."""
    import copy

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import planner

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model, x = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)), torch.randn(8, 16)
        eager = copy.deepcopy(model)
        with pytest.raises(
            CaptureError, match=r"DistributedDataParallel wrapper.*Plan the model it wraps"
        ):
            planner.plan(DDP(model), "100%", (x,), mode="train", profile="cpu", time_limit=3)
        pm = planner.plan(model, "100%", (x,), mode="train", profile="cpu", time_limit=3)
        DDP(pm)(x).square().mean().backward()
        DDP(eager)(x).square().mean().backward()
        for p, q in zip(model.parameters(), eager.parameters()):
            assert torch.equal(p.grad, q.grad)
        pm.close()
    finally:
        dist.destroy_process_group()


class _DoubledOnceWithoutGrad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("ema", torch.zeros(2, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        with torch.no_grad():
            self.ema.copy_(_doubled_once(h))
        return (h * self.ema).sum()


def test_an_error_in_a_no_grad_region_of_the_joint_trace_leaves_grad_mode_on() -> None:
    """torch's op for a ``no_grad`` region sets the grad mode back only when its body
    returns: an op failing inside one during the joint trace left the caller's
    process with gradients off after the CaptureError."""
    _FAKE_CALLS["n"] = 0
    assert torch.is_grad_enabled()
    with pytest.raises(CaptureError, match="no entry for this shape"):
        capture(_DoubledOnceWithoutGrad(), (torch.randn(2, 4),), "train")
    try:
        assert torch.is_grad_enabled(), "the failed capture left gradients off"
    finally:
        torch.set_grad_enabled(True)

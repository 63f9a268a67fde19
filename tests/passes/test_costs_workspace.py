"""Costs (FLOPs, bytes, seconds on a profile) and measured op workspaces."""

from __future__ import annotations

import pytest
import torch
from conftest import toy

import planner
from planner.ir import build_program, capture
from planner.passes import annotate_costs, get_profile
from planner.passes.workspace import annotate_workspace


def test_linear_flops_match_formula() -> None:
    model, (x,) = toy("chain", 1, batch=8)  # 3 linears 32->32 plus tanh
    captured = capture(model, (x,), "infer")
    program = build_program(captured)
    annotate_costs(program, captured.graph_module, get_profile("cpu"))
    linears = [op for op in program.ops if op.target.startswith("aten.linear")]
    assert len(linears) == 3
    for op in linears:
        assert op.cost.flops == 2 * 8 * 32 * 32
    tanh = [op for op in program.ops if "tanh" in op.target]
    assert all(op.cost.flops == 0 and op.cost.bytes_read == 8 * 32 * 4 for op in tanh)


def test_train_graph_flops_are_three_times_forward() -> None:
    """A linear's backward costs two matmuls of the forward's size."""
    model, inputs = toy("chain", 2, batch=16)
    for_mode = {}
    for mode in ("infer", "train"):
        captured = capture(model, inputs, mode)
        program = build_program(captured)
        annotate_costs(program, captured.graph_module, get_profile("cpu"))
        for_mode[mode] = sum(op.cost.flops for op in program.ops)
    # the first layer needs no grad of its input, so slightly under 3x
    assert 2.5 * for_mode["infer"] <= for_mode["train"] <= 3.0 * for_mode["infer"]


def test_seconds_follow_the_profile() -> None:
    model, inputs = toy("mlp", 2, batch=64)
    captured = capture(model, inputs, "infer")
    totals = {}
    for name in ("t4", "h100"):
        program = build_program(captured)
        annotate_costs(program, captured.graph_module, get_profile(name))
        assert all(op.cost.seconds > 0 for op in program.ops)
        totals[name] = sum(op.cost.seconds for op in program.ops)
    assert totals["h100"] < totals["t4"]


def test_views_cost_no_bytes() -> None:
    class V(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.t().unsqueeze(0)[:, 1:]

    captured = capture(V(), (torch.randn(8, 8),), "infer")
    program = build_program(captured)
    annotate_costs(program, captured.graph_module, get_profile("cpu"))
    for op in program.ops:
        assert op.cost.bytes_read == 0 and op.cost.bytes_written == 0


def test_conv_workspace_is_measured() -> None:
    """A CPU convolution allocates scratch beyond its output; a linear does not
    allocate a temporary as large as its output."""
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.Linear(32, 32))
    x = torch.randn(4, 16, 32, 32)
    captured = capture(model, (x,), "infer")
    program = build_program(captured)
    annotate_workspace(program, captured.graph_module)
    conv = next(op for op in program.ops if "conv" in op.target)
    linear = next(op for op in program.ops if "linear" in op.target)
    assert conv.workspace_bytes > 0
    out_bytes = sum(program.values[v].nbytes for v in linear.outputs)
    assert linear.workspace_bytes < out_bytes


class _MultiQueryAttention(torch.nn.Module):
    def forward(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # one key/value head broadcast over the query heads (Falcon's multi-query
        # attention), and the mask: inputs with a zero stride
        kv = kv.expand(2, 2, 16, 16)
        return torch.nn.functional.scaled_dot_product_attention(
            q, kv, kv, attn_mask=mask.expand(2, 2, 16, 16)
        )


def test_workspace_of_an_op_reading_an_expanded_input_is_measured() -> None:
    """Random inputs with a zero stride could not be filled in place, so the op was
    never run and taken to need no workspace (Falcon's attention scratch went
    unbudgeted: its plan measured 3 KB over an 84 KB budget)."""
    q, kv = torch.randn(2, 2, 16, 16), torch.randn(2, 1, 16, 16)
    mask = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    captured = capture(_MultiQueryAttention(), (q, kv, mask), "infer")
    program = build_program(captured)
    annotate_workspace(program, captured.graph_module)
    attention = next(op for op in program.ops if "scaled_dot_product" in op.target)
    assert attention.workspace_bytes > 0


class _Bag(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bag = torch.nn.EmbeddingBag(128, 32, mode="mean")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bag(ids)


def test_an_output_larger_than_its_traced_shape_is_planned_at_its_allocated_size() -> None:
    """On a CPU, ``embedding_bag``'s ``offset2bag`` holds 33 elements for 32
    indices where the fake kernel says 32: planned at its traced size, a plan at
    its smallest budget measured 8 bytes over it."""
    ids = torch.randint(0, 128, (2, 16))
    captured = capture(_Bag(), (ids,), "infer")
    program = build_program(captured)
    (op,) = [op for op in program.ops if op.target.startswith("aten.embedding_bag")]
    traced = [program.storages[program.values[v].storage].nbytes for v in op.outputs]
    annotate_workspace(program, captured.graph_module)
    planned = [program.storages[program.values[v].storage].nbytes for v in op.outputs]
    outputs = torch.ops.aten.embedding_bag.padding_idx(
        _Bag().bag.weight,
        ids.flatten(),
        torch.arange(0, 32, 16),
        False,
        1,
        False,
        None,
        False,
        None,
    )
    real = [t.untyped_storage().nbytes() for t in outputs]
    assert planned == real and planned != traced, (traced, planned, real)

    model = _Bag().eval()
    floor = planner.plan(model, "100%", (ids,), profile="cpu")
    budget = floor.plan.predicted_peak_bytes
    floor.close()
    pm = planner.plan(_Bag().eval(), budget, (ids,), profile="cpu", time_limit=5)
    try:
        out = pm.run_measured(ids)
        assert pm.measured.peak_bytes <= budget, (pm.measured.peak_bytes, budget)
        torch.testing.assert_close(out, model(ids), rtol=0, atol=0)
    finally:
        pm.close()


class _Lstm(torch.nn.Module):
    """An LSTM over float features (its input does not require grad): on a CPU
    with oneDNN, training takes ``mkldnn_rnn_layer`` and its backward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = torch.nn.LSTM(32, 32, num_layers=2, batch_first=True)
        self.head = torch.nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0]).pow(2).mean()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN's LSTM path")
def test_an_lstm_workspace_and_its_bias_gradients_are_planned_at_their_real_bytes() -> None:
    """The fake kernels trace the forward's workspace as 0 bytes and the backward's
    two bias gradients as one tensor; the kernels allocate a workspace of
    kilobytes (with grad mode on, as the executor runs it) and two gradients. The
    backward is measured on the forward's real workspace: on a made-up empty one
    it read past it and crashed the process."""
    x = torch.randn(2, 16, 32)
    captured = capture(_Lstm(), (x,), "train")
    program = build_program(captured)
    forwards = [op for op in program.ops if op.target == "aten.mkldnn_rnn_layer.default"]
    backwards = [op for op in program.ops if op.target == "aten.mkldnn_rnn_layer_backward.default"]
    assert len(forwards) == len(backwards) == 2
    workspaces = [program.storages[program.values[op.outputs[3]].storage] for op in forwards]
    assert [s.nbytes for s in workspaces] == [0, 0]
    # one storage for both bias gradients (once Inductor is imported, its meta
    # kernel traces them apart: then each is planned at its own 512 bytes)
    bias_grads = [
        {
            program.values[v].storage: program.storages[program.values[v].storage]
            for v in op.outputs[3:5]
        }
        for op in backwards
    ]
    annotate_workspace(program, captured.graph_module)
    assert all(s.nbytes > 10_000 and s.kernel_sized for s in workspaces), workspaces
    assert [sum(s.nbytes for s in both.values()) for both in bias_grads] == [1024, 1024]
    assert all(op.workspace_bytes > 0 for op in backwards)


class _Sampler(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return h.gather(1, torch.multinomial(torch.softmax(h, -1), 3))


def test_workspace_of_an_op_refusing_negative_inputs_is_measured_whole() -> None:
    """``multinomial`` refuses normal random probabilities; its failed run's partial
    allocations (214 bytes) were taken for its workspace (618), and its plan at the
    smallest budget measured 404 bytes over (3434 against 3030)."""
    x = torch.randn(8, 16)
    captured = capture(_Sampler().eval(), (x,), "infer")
    program = build_program(captured)
    annotate_workspace(program, captured.graph_module)
    op = next(op for op in program.ops if "multinomial" in op.target)
    probs = torch.softmax(torch.randn(8, 16), -1)
    from planner.alloc_trace import allocations, find_events, peak_and_final, profile_allocations

    def run() -> None:
        with torch.profiler.record_function("sampler#0"):
            out = torch.multinomial(probs, 3)  # noqa: F841 (held at the block's end)

    _, events = profile_allocations(run)
    peak, final = peak_and_final(allocations(find_events(events, "sampler#"), "cpu"))
    assert op.workspace_bytes == peak - final > 0


def test_a_plan_with_multinomial_keeps_its_budget() -> None:
    x = torch.randn(8, 16)
    try:
        planner.plan(_Sampler().eval(), 1, (x,), time_limit=3)
    except planner.BudgetTooSmall as e:
        budget = e.min_budget
    pm = planner.plan(_Sampler().eval(), budget, (x,), time_limit=3)
    with torch.no_grad():
        pm.run_measured(x)
    assert pm.measured.peak_bytes <= pm.plan.budget_bytes


class _MaxBag(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bag = torch.nn.EmbeddingBag(20, 16, mode="max")

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.bag(ids, offsets)


def test_a_max_embedding_bag_training_step_keeps_its_budget() -> None:
    """Its backward copies the non-empty bags' rows; measured on made-up zero
    ``bag_size`` (every bag empty) it took no scratch, and the step measured 600
    bytes over its 3512-byte smallest budget."""
    args = (torch.tensor([1, 2, 4, 5, 4, 3, 2, 9]), torch.tensor([0, 4, 6]))
    try:
        planner.plan(_MaxBag(), 1, args, mode="train", time_limit=3)
    except planner.BudgetTooSmall as e:
        budget = e.min_budget
    pm = planner.plan(_MaxBag(), budget, args, mode="train", time_limit=3)
    pm.run_measured_step(*args)
    assert pm.measured.peak_bytes <= pm.plan.budget_bytes


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))


@pytest.mark.parametrize(
    ("mode", "x", "extra"),
    [
        ("infer", torch.randn(8, 32, dtype=torch.float64), None),
        ("train", torch.randn(8, 32, dtype=torch.float64), None),
        ("infer", torch.zeros(8, 32, dtype=torch.int64), None),
        ("infer", torch.randn(8, 32), [(torch.randn(4, 32, dtype=torch.float64),)]),
    ],
    ids=["float64", "float64-train", "int64", "extra-float64"],
)
def test_example_inputs_of_a_dtype_the_model_cannot_take_are_refused(
    mode: str, x: torch.Tensor, extra: list | None
) -> None:
    """torch's trace does not check dtypes (a float64 batch through float32
    linears traces a float64 output): such inputs planned, even reported
    BudgetTooSmall, and every call of the plan raised torch's bare "mat1 and mat2
    must have the same dtype". The workspace pass runs the op for real and fails on
    every try: refused at planning time, the model left as it was."""
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(planner.CaptureError) as caught:
        planner.plan(model, "60%", (x,), mode=mode, extra_example_inputs=extra, time_limit=2)
    message = str(caught.value)
    dtype = str((extra[0][0] if extra else x).dtype).removeprefix("torch.")
    assert "does not run on these example inputs" in message
    assert "must have the same dtype" in message  # torch's own words
    assert f"here {dtype}; the model's parameters are float32" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and all(p.device.type == "cpu" for p in model.parameters())


class _MixesDtypes(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(32, 32)
        self.b = torch.nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).double())  # the line named


def test_a_forward_mixing_dtypes_is_refused_at_its_line() -> None:
    x = torch.randn(8, 32)
    with pytest.raises(planner.CaptureError, match=r"test_costs_workspace\.py:\d+ in forward"):
        planner.analyze(_MixesDtypes().eval(), (x,))


def _one_op_graph(error: Exception) -> torch.fx.Node:
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    node = graph.call_function(torch.ops.aten.add.Tensor, (x, x))
    graph.output(node)
    x.meta["val"] = torch.empty(4)

    class Failing:
        __name__ = "failing"

        def __call__(self, *args: object) -> None:
            raise error

    node.target = Failing()  # type: ignore[assignment]
    return node


def test_an_op_failing_on_made_up_values_is_left_unmeasured() -> None:
    """Made-up values may be ones an op refuses (an index out of range, a matrix
    not positive-definite): its workspace is unmeasured, planning goes on. Only
    torch's checks of dtypes and devices say the program cannot run."""
    from planner.passes.made_up_inputs import MadeUpInputs, OpCannotRun
    from planner.passes.workspace import _run_marked

    node = _one_op_graph(RuntimeError("index 7 is out of bounds for dimension 0 with size 4"))
    assert _run_marked(node, "m#0", "cpu", MadeUpInputs()) == []
    node = _one_op_graph(RuntimeError("expected scalar type Double but found Float"))
    with pytest.raises(OpCannotRun):
        _run_marked(node, "m#0", "cpu", MadeUpInputs())


def test_the_refusal_names_the_parameters_dtypes_not_an_integer_buffers() -> None:
    """A BatchNorm's num_batches_tracked (int64) is a buffer: listed among "the
    model's parameters", the message sent users looking for an int64 parameter."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.BatchNorm1d(16))
    x = torch.randn(8, 32, dtype=torch.float64)
    with pytest.raises(planner.CaptureError) as caught:
        planner.analyze(model, (x,), mode="train")
    assert "here float64; the model's parameters are float32)" in str(caught.value)

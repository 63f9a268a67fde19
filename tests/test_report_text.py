"""The text report reads as it should: names whole, summary lines unbroken, the
solver's line saying what happened."""

from __future__ import annotations

from planner.report import Report, TensorRow, render_text

LONG = "model.model.layers.0.post_attention_layernorm.weight"  # a Llama's, 52 characters


def _report(**changes) -> Report:  # type: ignore[no-untyped-def]
    rows = [
        TensorRow(LONG, 512, "param", (0, 180), None, (128,), "float32"),
        TensorRow(
            "model.model.layers.0.self_attn.q_proj.weight",
            65536,
            "param",
            (0, 180),
            None,
            (128, 128),
            "float32",
            decision="offload:disk+quantize:int8",
        ),
        TensorRow(
            "getitem_6",
            1 << 20,
            "saved-for-backward",
            (56, 461),
            "_scaled_dot_product_flash_attention_for_cpu "
            "(aten._scaled_dot_product_flash_attention_for_cpu.default)",
            (8, 4, 64, 64),
            "float32",
        ),
    ]
    fields = dict(
        mode="train",
        num_ops=483,
        budget_bytes=None,
        unplanned_peak_bytes=25_000_000,
        unplanned_peak_step=80,
        planned_peak_bytes=25_000_000,
        estimated_seconds=0.045,
        unplanned_estimated_seconds=0.045,
        solver={"name": None, "status": "not run (no budget)", "seconds": 0.0},
        tensors=rows,
        profile="cpu",
        # unet's training peak: the line is longer than the table's 140 columns
        peak_by_kind={
            "param": 1_887_436,
            "buffer": 5_734,
            "input": 196_608,
            "tangent": 131_072,
            "activation": 1_048_576,
            "saved-for-backward": 20_237_516,
            "grad": 136,
            "output": 136_806,
            "workspace": 2_097_152,
        },
    )
    fields.update(changes)
    return Report(**fields)  # type: ignore[arg-type]


def test_long_tensor_names_are_never_broken_across_lines() -> None:
    text = str(_report())
    lines = text.splitlines()
    for row in _report().tensors:
        # was split: "...self_attn.q_p" on one line, "roj.weight" on the next
        assert any(row.name in line for line in lines), row.name


def test_summary_lines_are_not_wrapped_mid_item() -> None:
    text = str(_report())
    resident = [line for line in text.splitlines() if line.startswith("  resident then:")]
    assert len(resident) == 1
    assert "grad 136 B, output" in resident[0]  # was "grad" at a line's end, "136 B" next
    assert resident[0].rstrip().endswith("workspace 2.0 MiB")


def test_a_kept_baseline_is_not_reported_as_infeasible() -> None:
    solver = {
        "name": "cp-sat (kept baseline greedy)",
        "status": "INFEASIBLE",
        "seconds": 0.01,
        "objective": None,
        "bound": None,
        "gap": None,
    }
    text = str(_report(budget_bytes=25_000_000, solver=solver))
    line = next(line for line in text.splitlines() if line.startswith("solver:"))
    assert "found no plan" in line and "baseline greedy's" in line, line


def test_the_objective_is_not_read_as_the_added_estimate() -> None:
    # MLP training at 10%: "objective 37.175 ms added" with an estimate only 27 ms
    # above the unplanned one
    solver = {
        "name": "cp-sat",
        "status": "OPTIMAL",
        "seconds": 0.04,
        "objective": 0.037175,
        "bound": 0.037175,
        "gap": 0.0,
    }
    text = str(
        _report(
            budget_bytes=1_700_000,
            solver=solver,
            estimated_seconds=0.03613,
            unplanned_estimated_seconds=0.00891,
        )
    )
    line = next(line for line in text.splitlines() if line.startswith("solver:"))
    assert "ms added" not in line and "cost model" in line, line


def test_a_gradient_row_names_its_parameter() -> None:
    import json

    from conftest import toy

    import planner

    model, inputs = toy("chain", 1)
    report = planner.report(model, inputs, mode="train", profile="cpu")
    grads = [row for row in report.tensors if row.kind == "grad"]
    names = {name for name, _ in model.named_parameters()}
    assert grads and {row.grad_of for row in grads} == names  # was "mm_3": whose?
    text = str(report)
    for row in grads:
        assert f"grad of {row.grad_of}" in text
    rows = json.loads(report.to_json())["tensors"]
    assert {r["grad_of"] for r in rows if r["kind"] == "grad"} == names


def test_a_planned_report_totals_its_decisions() -> None:
    text = str(_report(budget_bytes=2_000_000))
    line = next(line for line in text.splitlines() if line.startswith("decisions:"))
    assert "keep 2 tensors (1.0 MiB), offload:disk+quantize:int8 1 (64.0 KiB)" in line, line
    assert not any(line.startswith("decisions:") for line in str(_report()).splitlines())


def test_the_measured_time_says_how_many_calls_it_is_the_median_of() -> None:
    """It was a median of 3 calls, stated as "median": on a busy machine it came out
    10-60x the estimate, with nothing saying how little it rests on."""
    measured = {"peak_bytes": 20_000_000, "seconds": 0.05, "wall_seconds": 0.05, "wall_calls": 3}
    text = render_text(_report(budget_bytes=24_000_000, measured=measured))
    (line,) = [line for line in text.splitlines() if line.startswith("measured time:")]
    assert "median of 3 calls after a warm-up" in line and "rough" in line


def test_a_storage_holding_two_gradients_names_both_parameters() -> None:
    """The gradient of torch.cat([a, b]) is one buffer, a's and b's gradients its
    two halves: the row named only b."""
    import torch

    import planner

    class Cat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Parameter(torch.randn(8, 16))
            self.b = torch.nn.Parameter(torch.randn(8, 16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x @ torch.cat([self.a, self.b]).t()).sum()

    report = planner.report(Cat(), (torch.randn(4, 16),), mode="train", profile="cpu")
    named = [row.grad_of for row in report.tensors if row.grad_of]
    assert named == ["a, b"], named


def test_a_long_name_beside_a_long_decision_leaves_every_column_whole() -> None:
    """A 53-character name held whole beside "offload:disk:late+quantize:int4" left
    the producer column no room: rich cropped the table at 140 columns, the
    producers (and the right border) were gone."""
    name = "model.model.layers.10.post_attention_layernorm.weight"
    row = TensorRow(
        name,
        123_456_789,
        "saved-for-backward",
        (12345, 23456),
        "_scaled_dot_product_flash_attention_for_cpu "
        "(aten._scaled_dot_product_flash_attention_for_cpu.default)",
        (8,),
        "float32",
        decision="offload:disk:late+quantize:int4",
    )
    text = render_text(_report(tensors=[row], budget_bytes=2_000_000))
    table = text.split("\n\n")[0].splitlines()[1:]
    table = [line for line in table if line.strip() and line[0] in "┏┃┡│└"]
    assert "producer" in table[1], table[1]
    assert all(len(line) <= 140 and line.rstrip()[-1] in "┓┃┩│┘" for line in table), table
    assert any("offload:disk:late+quantize:int4" in line for line in table)


def test_a_lossy_option_that_quantized_nothing_is_said() -> None:
    """quantize= given and no tensor quantized printed nothing about it: a user
    could not tell the option was read and not needed from it being ignored."""
    allowed = {"format": "int8", "uses": ["activations", "transfers", "weights"]}
    text = render_text(_report(budget_bytes=24_000_000, lossy_allowed=allowed))
    (line,) = [line for line in text.splitlines() if line.startswith("lossy storage:")]
    assert "int8 allowed (activations, transfers, weights)" in line
    assert "none chosen" in line and "lossless" in line
    row = {"tensor": LONG, "format": "int8", "bytes": 512, "saved_bytes": 380}
    text = render_text(_report(budget_bytes=24_000_000, lossy_allowed=allowed, quantized=[row]))
    (line,) = [line for line in text.splitlines() if line.startswith("lossy storage:")]
    assert line.endswith("; 1 tensor quantized (below)"), line
    assert not any(line.startswith("lossy storage:") for line in str(_report()).splitlines())


def test_a_measured_peak_of_zero_is_rendered() -> None:
    """Zero-size inputs hold nothing: the predicted/measured ratio divided by 0."""
    measured = {"peak_bytes": 0, "seconds": 0.0, "wall_seconds": None, "wall_calls": 0}
    text = render_text(_report(budget_bytes=1024, planned_peak_bytes=0, measured=measured))
    (line,) = [line for line in text.splitlines() if line.startswith("measured peak:")]
    assert "predicted/measured -" in line and "within budget" in line


def test_a_delivered_gradient_is_not_reported_as_kept() -> None:
    """A gradient the plan delivers (written to its parameter's .grad as soon as it
    is made, off the device) was listed as ``keep`` on the device: the report's
    rows are named by their op (``mm_3``), the plan's ``grad of <parameter>``, and
    the lookup by name missed every gradient (the decisions line undercounted
    what moved: "offload:disk 30 tensors (10.6 MiB)" for the plan's 38, 17.7 MiB)."""
    from collections import Counter

    import torch
    from torch import nn

    import planner

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256)
    )
    pm = planner.plan(model, "45%", (torch.randn(128, 256),), mode="train", profile="cpu")
    try:
        delivered = {a.tensor for a in pm.plan.actions if a.kind == "deliver"}
        assert delivered, "nothing delivered: the test proves nothing"
        report = pm.report
        rows = {f"grad of {row.grad_of}": row for row in report.tensors if row.grad_of}
        for name in delivered:
            assert rows[name].decision.startswith("offload:"), (name, rows[name].decision)
            assert rows[name].home != "device" or rows[name].decision != "keep"
        # every row carries its storage's decision: the totals are the plan's
        assert Counter(r.decision for r in report.tensors) == Counter(
            d.decision for d in pm.plan.tensors
        )
    finally:
        pm.close()


def test_a_tied_weight_is_listed_under_both_names() -> None:
    """GPT-2's head shares its embedding's storage: the row is named by one, and
    the other name appeared nowhere in the text (JSON listed the trace's name for
    it, ``p_model_lm_head_weight``)."""
    import torch
    from torch import nn

    import planner

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(ids))

    ids = torch.randint(0, 50, (2, 8))
    for mode in ("infer", "train"):
        report = planner.report(Tied(), (ids,), mode=mode, profile="cpu")
        (row,) = [r for r in report.tensors if r.name == "embed.weight"]
        assert row.tied == ["head.weight"], (mode, row)
        assert not any(r.name == "head.weight" for r in report.tensors)
        assert "tied: head.weight" in render_text(report)

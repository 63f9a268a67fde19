"""Placement solver: quality and time vs graph size and budget, against the baselines.

Run ``python benchmarks/solver_bench.py --quick`` (a few minutes) or without --quick
for synthetic graphs up to 5000 nodes and every captured example at four budgets;
``--out BENCHMARKS_solver.md`` writes the markdown table. Every plan is replayed by
the independent validator; times are the replay's estimated seconds as a ratio to
the unplanned (keep-all) run's, so 1.000 = no added time; "-" = does not fit.

"default" is ``solve`` as the API calls it (20 s); "exact" is the same CP-SAT model,
warm-started the same way, with a long limit and a relative gap of 0. "vs exact" is
how much slower the default plan is than the exact one (when the exact one is
proven optimal, else "(limit)").
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from planner.errors import BudgetTooSmall  # noqa: E402
from planner.solver import Problem, from_program, solve  # noqa: E402
from planner.solver.baselines import BASELINES, greedy  # noqa: E402
from planner.solver.candidates import build_candidates  # noqa: E402
from planner.solver.model import PlacementModel  # noqa: E402
from planner.solver.remat_graphs import chain_graph, layered_dag, unet_of_size  # noqa: E402
from planner.solver.solve import DEFAULT_TIME_LIMIT, _evaluate  # noqa: E402
from planner.solver.synthetic import (  # noqa: E402
    problem_from_dag,
    unplanned_peak,
    unplanned_seconds,
    with_budget,
)

log = logging.getLogger("solver_bench")

#: Synthetic graphs with about n nodes; chains and U-Nets are training graphs
#: (forward + backward), layered DAGs inference-like. Every node reads a weight.
KINDS: dict[str, Callable[[int], nx.DiGraph]] = {
    "chain": lambda n: chain_graph(max(1, n // 2)),
    "unet": lambda n: unet_of_size(n),
    "layered": lambda n: layered_dag(n, seed=n),
}
EXAMPLES = ("mlp", "resnet", "unet", "gpt2", "gpt2_train")
BASELINE_NAMES = tuple(BASELINES)


def synthetic_problem(kind: str, n: int) -> Problem:
    return problem_from_dag(KINDS[kind](n), 1, seed=n)


def example_problem(name: str) -> Problem:
    """The captured example in train mode on the built-in ``cpu`` profile."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import load_example

    import planner

    model, inputs = load_example(name)
    analysis = planner.analyze(model, inputs, mode="train", profile="cpu")
    return from_program(analysis.program, analysis.unplanned_peak_bytes, analysis.profile)


def exact_solve(problem: Problem, time_limit: float) -> tuple[str, float | None, float]:
    """The same model as ``solve``'s, same warm start, gap 0: (status, plan seconds, wall)."""
    start = time.perf_counter()
    cands = build_candidates(problem)
    fitting = [_evaluate(cands, name, fn(cands), None) for name, fn in BASELINES.items()]
    fitting = [c for c in fitting if c.replay is not None]
    hint = (
        min(fitting, key=lambda c: c.replay.seconds).choices  # type: ignore[union-attr]
        if fitting
        else greedy(cands, budget=0)
    )
    result = PlacementModel(cands).solve(time_limit, hint=hint, relative_gap=0.0)
    seconds = None
    if result.choices is not None:
        evaluated = _evaluate(cands, "exact", result.choices, None)
        if evaluated.replay is not None:
            seconds = evaluated.replay.seconds
    return result.status, seconds, time.perf_counter() - start


def run_case(
    name: str, base: Problem, fraction: float, time_limit: float, exact_limit: float | None
) -> dict:
    peak, plain = unplanned_peak(base), unplanned_seconds(base)
    problem = with_budget(base, int(peak * fraction))
    cands_gaps = len(build_candidates(problem).gaps)
    row: dict[str, str] = {
        "graph": name,
        "steps": str(problem.num_steps),
        "gaps": str(cands_gaps),
        "budget": f"{fraction:.0%}",
    }
    start = time.perf_counter()
    try:
        plan = solve(problem, time_limit=time_limit)
    except BudgetTooSmall as exc:
        wall = time.perf_counter() - start
        for b in BASELINE_NAMES:
            row[b] = "-"
        row.update(
            {
                "plan": f"too small (min {exc.min_budget / peak:.0%})",
                "kept": "",
                "status": "",
                "objective": "",
                "bound": "",
                "gap": "",
                "wall s": f"{wall:.1f}",
                "exact": "",
                "vs exact": "",
            }
        )
        return row
    wall = time.perf_counter() - start
    for b in BASELINE_NAMES:
        entry = plan.baselines.get(b, {"fits": False})
        row[b] = f"{entry['seconds'] / plain:.3f}" if entry["fits"] else "-"
    s = plan.solver
    row["plan"] = f"{plan.estimated_seconds / plain:.3f}"
    row["kept"] = (
        "cp-sat"
        if s.name == "cp-sat"
        else s.name.split("kept baseline ")[-1].rstrip(")")
        if "kept" in s.name
        else s.name
    )
    row["status"] = s.status
    row["objective"] = "" if s.objective is None else f"{s.objective * 1e3:.3f}ms"
    row["bound"] = "" if s.bound is None else f"{s.bound * 1e3:.3f}ms"
    row["gap"] = "" if s.gap is None else f"{s.gap:.1%}"
    row["wall s"] = f"{wall:.1f}"
    row["exact"], row["vs exact"] = "skipped", ""
    if exact_limit is not None and s.status != "FITS_UNPLANNED":
        status, seconds, ewall = exact_solve(problem, exact_limit)
        if seconds is None:
            row["exact"] = f"{status} ({ewall:.0f}s)"
        else:
            row["exact"] = f"{seconds / plain:.3f} {status} ({ewall:.0f}s)"
            if status == "OPTIMAL":
                row["vs exact"] = f"{plan.estimated_seconds / seconds - 1:+.2%}"
            else:
                row["vs exact"] = "(limit)"
    elif s.status == "FITS_UNPLANNED":
        row["exact"] = "n/a"
    return row


def to_markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def cases(quick: bool) -> list[tuple[str, Callable[[], Problem], float, bool]]:
    """(name, problem factory, budget fraction, give it an exact solve?)."""
    out: list[tuple[str, Callable[[], Problem], float, bool]] = []
    sizes = (100, 500) if quick else (100, 500, 1000, 2000, 5000)
    budgets = (0.9, 0.7, 0.5) if quick else (0.9, 0.8, 0.7, 0.5)
    for n in sizes:
        for kind in KINDS:
            fractions = budgets if n <= 500 else (0.7,)
            for f in fractions:
                out.append(
                    (
                        f"{kind} {n}",
                        lambda k=kind, m=n: synthetic_problem(k, m),
                        f,
                        n <= (100 if quick else 1000),
                    )
                )
    for name in EXAMPLES:
        for f in (0.7, 0.5) if quick else budgets:
            out.append((f"{name} train", lambda e=name: example_problem(e), f, True))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="sizes 100 and 500, fewer budgets")
    ap.add_argument("--out", type=Path, help="also write the markdown table here")
    ap.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT)
    ap.add_argument(
        "--exact-limit",
        type=float,
        default=None,
        help="seconds for the exact solve (default 30 with --quick, else 120)",
    )
    ap.add_argument("--only", default="", help="run only cases whose name contains this")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    exact_limit = args.exact_limit or (30.0 if args.quick else 120.0)
    rows: list[dict] = []
    built: dict[str, Problem] = {}
    for name, factory, fraction, exact in cases(args.quick):
        if args.only and args.only not in name:
            continue
        if name not in built:
            built[name] = factory()
        row = run_case(name, built[name], fraction, args.time_limit, exact_limit if exact else None)
        rows.append(row)
        print(" | ".join(f"{k}={v}" for k, v in row.items()), file=sys.stderr, flush=True)
        if args.out:  # rewrite as we go, so a long run leaves its finished rows
            args.out.write_text(to_markdown(rows) + "\n")
    table = to_markdown(rows)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The greedy baseline keeps each gap's best move between moves and re-evaluates
only the gaps a move can have changed (``baselines._MoveCache``). These tests
check, at every move of the descent, that the kept best move is the one a
from-scratch evaluation of every gap finds: a missed dependency would make the
greedy take a move that is no longer allowed, or priced at a stale added time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TwoCaches
from torch import nn

import planner
from planner.solver import Problem, baselines, from_program
from planner.solver.baselines import greedy
from planner.solver.candidates import Candidates, build_candidates
from planner.solver.remat_graphs import chain_graph, layered_dag, unet_of_size
from planner.solver.synthetic import problem_from_dag, unplanned_peak, with_budget


def _from_scratch(state: baselines._GreedyState, t: int, minimize_memory: bool):  # type: ignore[no-untyped-def]
    best = None
    for gi in np.nonzero((state.gap_lo <= t) & (state.gap_hi >= t))[0].tolist():
        found = state.gap_best(gi, t, minimize_memory, {})
        if found is not None and (best is None or found[0] > best[0]):
            best = (found[0], gi, found[1])
    return None if best is None else (best[1], best[2])


def _descend_checking_every_move(cands: Candidates, budget: int | None) -> int:
    """Run the greedy, asserting each move against the from-scratch one; returns
    the number of moves."""
    moves = 0
    original = baselines._MoveCache.best

    def checked(self, t, minimize_memory):  # type: ignore[no-untyped-def]
        nonlocal moves
        kept = original(self, t, minimize_memory)
        assert kept == _from_scratch(self.state, t, minimize_memory), f"move {moves}"
        moves += 1
        return kept

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(baselines._MoveCache, "best", checked)
        greedy(cands, budget=budget)
    return moves


GRAPHS = {
    "chain": lambda: chain_graph(60),
    "unet": lambda: unet_of_size(120),
    "layered": lambda: layered_dag(120, seed=3),
}


@pytest.mark.parametrize("kind", sorted(GRAPHS))
@pytest.mark.parametrize("share", [0.7, 0.4])
def test_kept_moves_match_a_from_scratch_evaluation(kind: str, share: float) -> None:
    problem = problem_from_dag(GRAPHS[kind](), 1, seed=7)
    cands = build_candidates(with_budget(problem, int(share * unplanned_peak(problem))))
    assert _descend_checking_every_move(cands, None) > 5
    assert _descend_checking_every_move(cands, 0) > 5  # the peak step moves here


def _captured(model: nn.Module, inputs: tuple, mode: str, share: float) -> Problem:
    analysis = planner.analyze(model, inputs, mode=mode)
    return from_program(
        analysis.program, int(analysis.unplanned_peak_bytes * share), analysis.profile
    )


def test_a_cache_and_its_update_are_re_evaluated_together() -> None:
    """Partners (a buffer updated in place and its update's last gap) read each
    other's choice."""
    torch.manual_seed(0)
    problem = _captured(TwoCaches().eval(), (torch.randn(1, 32), torch.tensor([3])), "infer", 0.4)
    cands = build_candidates(problem)
    assert cands.partners
    assert _descend_checking_every_move(cands, 0) > 0


def test_recomputes_are_re_evaluated_when_their_inputs_move() -> None:
    """A recompute is allowed only while the gaps holding its inputs keep them."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )
    cands = build_candidates(_captured(model, (torch.randn(2, 3, 8, 8),), "train", 0.5))
    assert any(o.choice == "recompute" for g in cands.gaps for o in g.options)
    assert _descend_checking_every_move(cands, 0) > 0

"""The optimization side: plain-data problems in, plain-data plans out.

``solve`` places every tensor of a ``Problem`` (built from the IR by
``from_program``) under a budget; ``validate`` replays a Plan independently;
``remat_schedule`` is the pure-graph rematerialization entry point for the
literature's benchmarks.
"""

from planner.solver.plan import Action, Plan, SolverStats, TensorDecision
from planner.solver.problem import Problem
from planner.solver.remat import remat_schedule
from planner.solver.solve import DEFAULT_TIME_LIMIT, solve
from planner.solver.translate import from_program
from planner.solver.validate import Replay, validate

__all__ = [
    "DEFAULT_TIME_LIMIT",
    "Action",
    "Plan",
    "Problem",
    "Replay",
    "SolverStats",
    "TensorDecision",
    "from_program",
    "remat_schedule",
    "solve",
    "validate",
]

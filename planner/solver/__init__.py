from planner.solver.remat import remat_schedule

__all__ = ["remat_schedule"]

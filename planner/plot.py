"""Residency over the steps against the budget, as a PNG (matplotlib)."""

from __future__ import annotations

from pathlib import Path

from planner.passes.pipeline import Analysis
from planner.solver.plan import Plan


def unwritable_format(path: str | Path) -> str | None:
    """Why ``plot_timeline`` could not write ``path``'s format (its suffix; none
    is PNG), or None: asked before planning, so that a typo in the suffix is not
    found after minutes of solving."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:  # pragma: no cover - matplotlib is a test dependency
        return "it needs matplotlib: pip install 'planner[plot]'"
    suffix = Path(path).suffix.lstrip(".").lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix == "pgf":  # its text is laid out by a TeX system, run when saving
        import shutil

        from matplotlib import rcParams

        tex = rcParams["pgf.texsystem"]
        if shutil.which(tex) is None:
            return f"matplotlib writes .pgf files with {tex}, which is not installed here"
    if not suffix or suffix in formats:
        return None
    return f"matplotlib cannot write .{suffix} files; end the path in one of: " + ", ".join(
        f".{name}" for name in sorted(formats)
    )


def plot_timeline(
    analysis: Analysis, plan: Plan | None, path: str | Path, measured_peak: int | None = None
) -> Path:
    """Unplanned and planned resident bytes per step, the budget, and the peak the
    independent meter measured (a line: the meter sees the whole call, not steps)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - matplotlib is a test dependency
        raise RuntimeError("--plot needs matplotlib: pip install 'planner[plot]'") from exc
    mib = 2**20
    fig, ax = plt.subplots(figsize=(10, 4.5))
    steps = range(len(analysis.timeline.resident_bytes))
    ax.plot(
        steps, [b / mib for b in analysis.timeline.resident_bytes], color="0.6", label="unplanned"
    )
    if plan is not None and plan.timeline:
        ax.plot(
            range(len(plan.timeline)), [b / mib for b in plan.timeline], color="C0", label="planned"
        )
        ax.axhline(plan.budget_bytes / mib, color="C3", linestyle="--", label="budget")
    if measured_peak is not None:
        ax.axhline(measured_peak / mib, color="C2", linestyle=":", label="measured peak")
    ax.set_ylim(bottom=0)  # from zero: an unplanned MLP's 1.5% dip filled the whole axis
    backward = analysis.program.backward_start()
    if backward < analysis.program.num_steps:
        ax.axvline(backward, color="0.8", linewidth=0.8)
        ax.text(backward, ax.get_ylim()[1] * 0.97, " backward", va="top", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("resident MiB")
    ax.set_title(f"planner: {analysis.program.mode}, {analysis.program.num_steps} steps")
    ax.legend(loc="upper left")
    fig.tight_layout()
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        # /dev/stdout, a pipe: written in place (matplotlib would add ".png" to the
        # name and write a new file beside it, /dev/stdout.png)
        import io

        buffer = io.BytesIO()  # matplotlib seeks in what it writes; a pipe cannot
        fig.savefig(buffer, dpi=110, format=path.suffix.lstrip(".").lower() or "png")
        plt.close(fig)
        with open(path, "wb") as out:
            out.write(buffer.getvalue())
        return path
    if not path.suffix:  # matplotlib would add it: say the name it is written under
        # "plot." is "plot.png" to matplotlib, not "plot..png"
        path = path.with_name(path.name.rstrip(".") + ".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

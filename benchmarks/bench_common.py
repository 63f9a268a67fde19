"""Pieces every benchmark script shares: the machine's load line, a short error
for a table cell, and writing a report that keeps its hand-written analysis.

The scripts run as ``python benchmarks/NAME.py``, which puts this directory on
``sys.path``; they import this module by its plain name."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def uptime() -> str:
    """``uptime``'s line (load averages), to print beside timings taken on a shared machine."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def short_error(exc: BaseException) -> str:
    """An exception as one line for a table cell (type, first lines, at most 300 chars)."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return " ".join(line.strip() for line in text[:3])[:300]


def write_report(path: Path, text: str) -> str:
    """Write ``text`` to ``path``; a hand-written ``## Analysis`` section already
    below the tables there survives the re-run. Returns what was written."""
    if path.exists():
        old = path.read_text()
        marker = old.find("\n## Analysis")
        if marker >= 0:
            text += old[marker:]
    path.write_text(text)
    return text

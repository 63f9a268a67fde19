"""Regenerate every benchmark table: ``python benchmarks/run_all.py [--quick]``.

Each benchmark writes its own BENCHMARKS_<name>.md at the repository root;
BENCHMARKS.md indexes them. Run on a quiet machine: timings are side by side within
each run, but a loaded 2-core machine makes every number noisy.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BENCHES = {
    "remat": ["benchmarks/remat_bench.py", "--out", "BENCHMARKS_remat.md"],
    "solver": ["benchmarks/solver_bench.py", "--out", "BENCHMARKS_solver.md"],
    "accelerate": ["benchmarks/accelerate_bench.py", "--out", "BENCHMARKS_accelerate.md"],
    "training": ["benchmarks/training_bench.py", "--out", "BENCHMARKS_training.md"],
    "quantize": ["benchmarks/quantize_bench.py", "--out", "BENCHMARKS_quantize.md"],
    "estimates": ["benchmarks/estimate_bench.py", "--out", "BENCHMARKS_estimates.md"],
    "generate": ["benchmarks/generate_bench.py", "--out", "BENCHMARKS_generate.md"],
    "generate_long": [
        "benchmarks/generate_bench.py",
        *("--max-cache-len", "4096", "--budgets", "100%", "50%", "30%", "20%"),
        *("--systems", "compile", "planner", "inductor", "accelerate", "--repeats", "10"),
        *("--out", "BENCHMARKS_generate_long.md"),
    ],
    "prefill": ["benchmarks/prefill_bench.py", "--repeats", "5", "--out", "BENCHMARKS_prefill.md"],
    "last_batch": ["benchmarks/last_batch_bench.py", "--out", "BENCHMARKS_last_batch.md"],
    "checkpoint": ["benchmarks/checkpoint_bench.py", "--out", "BENCHMARKS_checkpoint.md"],
}
QUICK = {"remat", "solver"}  # the ones with a --quick mode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small subsets")
    parser.add_argument("--only", choices=sorted(BENCHES), nargs="*")
    args = parser.parse_args()
    failed = []
    for name in args.only or BENCHES:
        script = BENCHES[name]
        if not (ROOT / script[0]).exists():
            print(f"skip {name}: {script[0]} not present")
            continue
        cmd = [sys.executable, *script] + (["--quick"] if args.quick and name in QUICK else [])
        print("$", " ".join(cmd), flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            failed.append(name)
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

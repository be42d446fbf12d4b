"""Evaluations saved by checking a move's end only where the move could still be accepted.

An SMC move's end is searched from its parent's radius, so its segment is checked for an
earlier exit (about eight more evaluations per ray). The library checks only the ends whose
move could still be accepted (``smc_paths._CHECK_MARGIN``); the baseline, run in the same
process on the same problems and seeds, checks every end with a finite acceptance ratio
(``_CHECK_MARGIN = inf``), which decides every move the same way (up to the rounding of
batched evaluations). Both run with accuracy.py's defaults; each prints its error against the
problem's truth, whether its 95% interval covers it, fn evaluations and seconds.

Run: python benchmarks/move_checks.py [--names a,b] [--seeds 1]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import accuracy  # noqa: E402
import problems  # noqa: E402

from basin_volume import smc_paths  # noqa: E402

# accuracy.py's defaults: 256 particles x 4 replicas, moves until decorrelated
SETTINGS = argparse.Namespace(particles=256, replicas=4, moves=None, budget=None,
                              bidirectional=None, batch=64, is_samples=1000)


def run(problem, seed: int, margin: float) -> dict:
    """accuracy.py's SMC row (default settings) with ``_CHECK_MARGIN = margin``."""
    saved = smc_paths._CHECK_MARGIN
    smc_paths._CHECK_MARGIN = margin
    try:
        return accuracy.run(problem, "smc", seed, SETTINGS)
    finally:
        smc_paths._CHECK_MARGIN = saved


def _cells(row: dict, width: int) -> str:
    cover = "-" if row["covered"] is None else "yes" if row["covered"] else "NO"
    return f"{row['error']:+{width}.3f} {cover:>5} {row['evals']:9d} {row['seconds']:6.1f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--names", default="ellipsoid-rotated-singular-gaussian-d200,mlp52-kl-c1.5")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--first-seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    head = (f"{'problem':42} {'seed':>4} {'truth':>10} | {'every end: error':>16} {'cover':>5} "
            f"{'evals':>9} {'s':>6} | {'could-accept: error':>19} {'cover':>5} {'evals':>9} "
            f"{'s':>6} | {'evals saved':>11}")
    print(head)
    print("-" * len(head))
    for name in args.names.split(","):
        problem = problems.get(name)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            rows = [run(problem, seed, math.inf), run(problem, seed, smc_paths._CHECK_MARGIN)]
            print(f"{name:42} {seed:4d} {problem.truth:10.4f} | {_cells(rows[0], 16)} | "
                  f"{_cells(rows[1], 19)} | "
                  f"{1 - rows[1]['evals'] / rows[0]['evals']:10.0%}", flush=True)


if __name__ == "__main__":
    main()

"""Evaluations saved by checking a move's end only where the move could still be accepted.

An SMC move's end is searched from its parent's radius, so its segment is checked for an
earlier exit (about eight more evaluations per ray). The library checks only the ends whose
move could still be accepted (``smc_paths._CHECK_MARGIN``); the baseline, run in the same
process on the same problems and seeds, checks every end with a finite acceptance ratio
(``_CHECK_MARGIN = inf``), which decides every move the same way. Both columns are printed:
estimate, error against the problem's truth, fn evaluations and seconds.

Run: python benchmarks/move_checks.py [--names a,b] [--seeds 1]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import problems  # noqa: E402

import basin_volume as bv  # noqa: E402
from basin_volume import smc_paths  # noqa: E402


def run(problem, seed: int, margin: float) -> tuple[float, int, float]:
    """(estimate, evaluations, seconds) of the default SMC run with ``_CHECK_MARGIN = margin``."""
    saved = smc_paths._CHECK_MARGIN
    smc_paths._CHECK_MARGIN = margin
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = bv.estimate(problem.fn, problem.center, cutoff=problem.cutoff,
                              measure=problem.measure, sigma=problem.sigma,
                              preconditioner=problem.preconditioner, seed=seed,
                              progress=False, method="smc")
    finally:
        smc_paths._CHECK_MARGIN = saved
    return res.log_volume, res.meta["total_evals"], time.perf_counter() - started


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--names", default="ellipsoid-rotated-singular-gaussian-d200,mlp52-kl-c1.5")
    p.add_argument("--seeds", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    head = (f"{'problem':42} {'seed':>4} {'truth':>10} | {'every end: estimate':>20} "
            f"{'error':>7} {'evals':>9} {'s':>6} | {'could-accept: estimate':>22} "
            f"{'error':>7} {'evals':>9} {'s':>6} | {'evals saved':>11}")
    print(head)
    print("-" * len(head))
    for name in args.names.split(","):
        problem = problems.get(name)
        for seed in range(args.seeds):
            base = run(problem, seed, math.inf)
            ours = run(problem, seed, smc_paths._CHECK_MARGIN)
            print(f"{name:42} {seed:4d} {problem.truth:10.4f} | {base[0]:20.4f} "
                  f"{base[0] - problem.truth:7.3f} {base[1]:9d} {base[2]:6.1f} | "
                  f"{ours[0]:22.4f} {ours[0] - problem.truth:7.3f} {ours[1]:9d} "
                  f"{ours[2]:6.1f} | {1 - ours[1] / base[1]:10.0%}", flush=True)


if __name__ == "__main__":
    main()

"""Ground-truth accuracy suite: every method against problems whose answer is known.

For each problem of ``benchmarks/problems.py`` (closed forms, mpmath, deterministic quadrature
or converged direct sampling; never a method's own output) and each method, prints

    problem | truth | method | estimate | 95% interval | covered | error | evaluations | seconds

Run ``python benchmarks/accuracy.py`` (the quick problems), ``--all`` for every problem,
``--held-out`` for the held-out ones only, ``--names a,b`` for a selection, ``--seeds 3`` for
several seeds of the methods. ``--particles``, ``--replicas``, ``--moves`` set the SMC run and
``--is-samples`` the importance sampler's directions; ``--no-bidirectional`` leaves out SMC's
walk back along tempering's levels (on by default without ``--budget``, as in the library),
whose estimate is printed as "backward" (the interval reaches up to it). A row ends with the
checks that warned about it (``warned: stuck,spread,passes,floor,ess``: see
``VolumeResult.warn_if_unreliable``), and the tally counts the misses none warned about.
``--methods`` takes
``smc``, ``is`` and
``smc-cooling`` (SMC without the curvature proposal, a second method to compare with where
no truth is known).
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


def run(problem, method: str, seed: int, args) -> dict:
    kwargs = dict(
        cutoff=problem.cutoff,
        measure=problem.measure,
        sigma=problem.sigma,
        preconditioner=problem.preconditioner,
        seed=seed,
        progress=False,
        model_batch_size=args.batch,
        method="smc" if method == "smc-cooling" else method,
    )
    if method == "smc-cooling":  # SMC without the curvature proposal: a second method
        kwargs.update(curvature="none")
    if method.startswith("smc"):
        kwargs.update(n_samples=args.particles, replicas=args.replicas, n_moves=args.moves,
                      budget=args.budget, bidirectional=args.bidirectional)
    else:
        kwargs.update(n_samples=args.is_samples)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = bv.estimate(problem.fn, problem.center, **kwargs)
        lo, hi = res.interval(0.95)
    evals = res.meta.get("total_evals", int(res.n_evals.sum()))
    err = res.log_volume - problem.truth
    # the truth's own uncertainty, and float rounding for intervals of zero width
    slack = 2 * problem.truth_se + 1e-6 + 1e-12 * abs(problem.truth)
    covered = lo - slack <= problem.truth <= hi + slack if math.isfinite(problem.truth) else None
    return dict(
        estimate=res.log_volume, lo=lo, hi=hi, covered=covered, error=err, evals=evals,
        seconds=time.perf_counter() - started,
        reverse=res.log_volume_reverse if method.startswith("smc") else math.nan,
        warned=[flag for flag, on in WARNINGS.items() if getattr(res, on)],
    )


# the result's checks that warn (VolumeResult.warn_if_unreliable), as printed
WARNINGS = {"stuck": "moves_stuck", "spread": "replicas_disagree", "passes": "passes_disagree",
            "floor": "below_importance", "ess": "low_ess"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--all", action="store_true", help="every problem, not only the quick ones")
    p.add_argument("--held-out", action="store_true", help="held-out problems only")
    p.add_argument("--names", default=None, help="comma-separated problem names")
    p.add_argument("--methods", default="smc,is")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first..first+seeds-1")
    p.add_argument("--particles", type=int, default=256)
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--moves", type=int, default=None,
                   help="SMC moves per level (default: until the particles decorrelate)")
    p.add_argument("--budget", type=int, default=None,
                   help="fn evaluations each SMC estimate may spend (moves: 3 per level)")
    p.add_argument("--bidirectional", action=argparse.BooleanOptionalAction, default=None,
                   help="SMC: walk the particles back too (default: without --budget)")
    p.add_argument("--is-samples", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64, help="points per batched fn call")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    if args.names:
        names = args.names.split(",")
    else:
        names = problems.names(held_out=True if args.held_out else None,
                               quick=None if args.all else True)
    head = (f"{'problem':34} {'truth':>12} {'method':6} {'estimate':>12} "
            f"{'95% interval':>26} {'cover':>5} {'error':>9} {'evals':>9} {'s':>6}")
    print(head)
    print("-" * len(head))
    covered, total, silent = 0, 0, 0
    for name in names:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            problem = problems.get(name)
            for method in args.methods.split(","):
                r = run(problem, method, seed, args)
                cov = "-" if r["covered"] is None else ("yes" if r["covered"] else "NO")
                if method.startswith("smc") and r["covered"] is not None:
                    covered, total = covered + bool(r["covered"]), total + 1
                print(f"{name:34} {problem.truth:12.4f} {method:6} {r['estimate']:12.4f} "
                      f"[{r['lo']:11.4f}, {r['hi']:11.4f}] {cov:>5} {r['error']:9.3f} "
                      f"{r['evals']:9d} {r['seconds']:6.1f}"
                      + (f"  backward {r['reverse']:.4f}" if math.isfinite(r["reverse"])
                         else "")
                      + (f"  warned: {','.join(r['warned'])}" if r["warned"] else ""),
                      flush=True)
                if method.startswith("smc") and r["covered"] is False and not r["warned"]:
                    silent += 1
    if total:
        print(f"\nSMC intervals covering the truth: {covered} of {total}; "
              f"missed without a warning: {silent}")


if __name__ == "__main__":
    main()

"""Evaluations per direction: Tyche's log-log secant search against doubling-then-bisection.

Both searches run on the same directions of the digits MLP's KL basin (cutoff 1e-2 nats,
rtol 1e-2) in one process. The baseline starts each direction from the previous direction's
radius (as ours does), doubles until it leaves the basin, then bisects until
|delta - cutoff| <= rtol * cutoff.

Run: python benchmarks/radius_search.py [--n-samples 200]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import torch

import basin_volume as bv
from basin_volume.digits import train_digits_mlp
from basin_volume.directions import sample_direction
from basin_volume.objectives import ClassifierKL

sys.path.insert(0, os.path.dirname(__file__))
from _baseline import doubling_bisection  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=200)
    parser.add_argument("--cutoff", type=float, default=1e-2)
    parser.add_argument("--rtol", type=float, default=1e-2)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    torch.manual_seed(0)
    run = train_digits_mlp(seed=0)
    fn = ClassifierKL(run.model, run.train_inputs)
    center = fn.center

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        ours = bv.estimate(
            fn,
            center,
            n_samples=args.n_samples,
            cutoff=args.cutoff,
            rtol=args.rtol,
            seed=0,
            progress=False,
        )
    ours_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        batched = bv.estimate(
            fn,
            center,
            n_samples=args.n_samples,
            cutoff=args.cutoff,
            rtol=args.rtol,
            seed=0,
            progress=False,
            model_batch_size=8,
        )
    batched_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    evals, log_r = [], []
    guess = 1e-2 * float(center.norm())
    for k in range(args.n_samples):
        omega = sample_direction(k, center.numel(), seed=0).omega.to(center.dtype)

        def delta_at(t, omega=omega):
            with torch.no_grad():
                return float(fn(center + t * omega))

        r, _, n = doubling_bisection(delta_at, args.cutoff, args.rtol, guess)
        evals.append(n)
        log_r.append(math.log(r))
        guess = r
    base_s = time.perf_counter() - t0
    agree = max(abs(a - b) for a, b in zip(log_r, ours.radii.log().tolist(), strict=True))

    rows = {
        "tyche": {
            "evals_per_direction": ours.n_evals.double().mean().item(),
            "seconds_per_direction": ours_s / args.n_samples,
        },
        "tyche_batched_8": {
            "evals_per_direction": batched.n_evals.double().mean().item(),
            "seconds_per_direction": batched_s / args.n_samples,
        },
        "doubling_bisection": {
            "evals_per_direction": sum(evals) / len(evals),
            "seconds_per_direction": base_s / args.n_samples,
        },
    }
    print(
        f"digits MLP, D = {center.numel()}, {args.n_samples} directions, cutoff "
        f"{args.cutoff:g}, rtol {args.rtol:g}"
    )
    print(f"{'search':<20} {'evals/direction':>16} {'ms/direction':>14}")
    for name, row in rows.items():
        print(
            f"{name:<20} {row['evals_per_direction']:>16.2f} "
            f"{1e3 * row['seconds_per_direction']:>14.2f}"
        )
    print(f"max |log r_tyche - log r_bisection| = {agree:.4f} (both within rtol of the cutoff)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()

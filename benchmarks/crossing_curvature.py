"""How much log delta bends in log t where prior rays leave a problem's basin.

Between two evaluated points around a crossing, the log-log chord's root is off by at most
M/2 (x - x_a)(x_b - x)/k (k the slope, M a bound on |d^2 log delta / d(log t)^2|), and where
log delta is concave the chord's root is long. For each problem, this draws prior rays
(theta from the measure, omega the direction of theta - theta0), finds each ray's first
crossing of the cutoff (a 400-point log grid from 1e-3 to 100 times sigma, then brentq), and
prints quantiles of the slope and of the curvature there (central differences, step 0.01 in
log t).

Run: python benchmarks/crossing_curvature.py [--names mlp52-kl-c1.5] [--rays 60]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import scipy.optimize
import torch

sys.path.insert(0, str(Path(__file__).parent))

import problems  # noqa: E402


def crossing_shape(problem, omega: torch.Tensor) -> tuple[float, float] | None:
    """(slope, curvature) of log delta in log t at the ray's first crossing, or None."""
    center = problem.center.double()
    f0 = float(problem.fn(center))

    def delta(t: float) -> float:
        return float(problem.fn(center + t * omega)) - f0

    inside = None
    for t in np.geomspace(1e-3, 100.0, 400) * problem.sigma:
        if delta(t) > problem.cutoff:
            break
        inside = t
    else:
        return None
    if inside is None:
        return None
    r = scipy.optimize.brentq(lambda s: delta(s) - problem.cutoff, inside, t, xtol=1e-14,
                              rtol=1e-14)
    h = 0.01
    y = [math.log(delta(r * math.exp(j * h))) for j in (-1, 0, 1)]
    return (y[2] - y[0]) / (2 * h), (y[2] - 2 * y[1] + y[0]) / h**2


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--names", default="mlp52-kl-c1.5")
    p.add_argument("--rays", type=int, default=60)
    p.add_argument("--seed", type=int, default=5)
    args = p.parse_args(argv)
    q = (0.0, 0.1, 0.5, 0.9, 1.0)
    print(f"{'problem':24} {'rays':>5}  quantiles {q} of slope | of curvature")
    for name in args.names.split(","):
        problem = problems.get(name)
        if problem.sigma is None:
            raise SystemExit(f"--names: {name} has no prior to draw rays from (uniform "
                             "measure); pick a Gaussian-measure problem")
        gen = torch.Generator().manual_seed(args.seed)
        center = problem.center.double()
        shapes = []
        for _ in range(args.rays):
            theta = problem.sigma * torch.randn(center.numel(), generator=gen,
                                                dtype=torch.float64)
            found = crossing_shape(problem, (theta - center) / (theta - center).norm())
            if found is not None:
                shapes.append(found)
        slope, curv = np.quantile(np.array(shapes), q, axis=0).T
        print(f"{name:24} {len(shapes):5d}  {np.round(slope, 2).tolist()} | "
              f"{np.round(curv, 2).tolist()}")


if __name__ == "__main__":
    main()

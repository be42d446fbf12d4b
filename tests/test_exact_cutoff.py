"""Per-direction estimates at the exact cutoff (estimator.py with radius.exact_cutoff): exact
on exact basins at the default rtol, and the recorded bound holds the true error."""

import math
import warnings

import pytest
import torch

import basin_volume as bv
from basin_volume.directions import sample_direction
from basin_volume.integrals import log_sphere_area
from basin_volume.preconditioners import DiagonalPreconditioner


def _ellipsoid(dim):
    gen = torch.Generator().manual_seed(3)
    h = torch.exp(torch.empty(dim, dtype=torch.float64).uniform_(-3, 3, generator=gen))
    return h, lambda th: 0.5 * (h * th * th).sum()


@pytest.mark.parametrize("dim", [50, 2000])
def test_matched_ellipsoid_is_exact_at_the_default_rtol(dim):
    """With scales diag(H)^-1/2 every direction's estimate is the closed form; the checked
    radii are only within rtol = 1e-2 (worth D * rtol / 2 nats), the estimates to 1e-8."""
    h, fn = _ellipsoid(dim)
    eps = 1e-2
    log_ball = log_sphere_area(dim) - math.log(dim)
    exact = log_ball + dim / 2 * math.log(2 * eps) - 0.5 * float(h.log().sum())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = bv.estimate(fn, torch.zeros(dim, dtype=torch.float64), n_samples=24, cutoff=eps,
                          measure="uniform", preconditioner=h.rsqrt(), progress=False,
                          method="is")  # fmt: skip
    assert (res.estimates - exact).abs().max().item() < 1e-8 * max(1.0, abs(exact))
    # what was evaluated is kept: the deltas are the checked ones, within rtol, not the cutoff
    assert ((res.deltas - eps).abs() <= 1e-2 * eps).all()
    bounds = res.meta["cutoff_bound"]["per_direction"]
    assert len(bounds) == 24 and all(b is not None and b >= 0 for b in bounds)


def test_bound_holds_the_true_error_on_a_cubic_basin():
    """delta = 1/2 th'H th + sum w th^3 along each ray is a t^2 + b t^3: its exact root is
    known per direction; the estimate's error D |log r - log r_true| stays within the bound."""
    dim = 400
    h, _ = _ellipsoid(dim)
    w = 0.5 * torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def fn(th):
        return 0.5 * (h * th * th).sum() + (w * th**3).sum()

    eps = 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = bv.estimate(fn, torch.zeros(dim, dtype=torch.float64), n_samples=40, cutoff=eps,
                          measure="uniform", preconditioner=h.rsqrt(), seed=2,
                          progress=False, method="is")  # fmt: skip
    bounds = res.meta["cutoff_bound"]["per_direction"]
    checked = 0
    for k in range(res.n_samples):
        if res.status[k] != "converged":
            continue
        pre = DiagonalPreconditioner(h.rsqrt())
        omega = sample_direction(k, dim, seed=2, preconditioner=pre).omega
        a, b = 0.5 * float((h * omega * omega).sum()), float((w * omega**3).sum())
        f = lambda t, a=a, b=b: a * t * t + b * t**3  # noqa: E731
        lo, hi = 0.0, float(res.radii[k]) * 2
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if f(mid) < eps else (lo, mid)
        r_true = 0.5 * (lo + hi)
        # uniform measure: the estimate is D log r + terms that do not depend on r
        err_true = dim * abs(math.log(float(res.radii[k]) / r_true))  # at the checked radius
        err = abs(float(res.logabsint[k]) - (dim * math.log(r_true) - math.log(dim)))
        assert err <= bounds[k] + 1e-9, (k, err, bounds[k])
        assert err < 1e-2 * max(err_true, 1e-6) or err < 1e-6
        checked += 1
    assert checked >= 30
    assert res.meta["cutoff_bound"]["mean"] < 0.1

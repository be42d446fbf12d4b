"""The SMC sampler and its parts, against exact answers (closed forms, mpmath, quadrature)."""

from __future__ import annotations

import dataclasses
import math
import warnings

import mpmath
import pytest
import torch

import basin_volume as bv
from basin_volume import smc_paths
from basin_volume.integrals import log_ball_volume, log_radial_integral
from basin_volume.projected_normal import ProjectedNormal
from basin_volume.result import VolumeResult
from basin_volume.smc import GradientRequest, Radii, smc_sampler
from basin_volume.smc_estimate import _cutoff_radius

torch.set_default_dtype(torch.float32)


def _ellipsoid(dim, decades, seed=1000, eps=1e-2):
    g = torch.Generator().manual_seed(seed)
    semi = 10 ** (decades * torch.rand(dim, generator=g, dtype=torch.float64))
    h = 2 * eps / semi**2
    c = torch.randn(dim, generator=g, dtype=torch.float64)
    truth = log_ball_volume(dim) + 0.5 * dim * math.log(2 * eps) - 0.5 * float(h.log().sum())
    return h, c, truth


def _drive(sampler, radius_of, gradient_of=None):
    """Run a sampler with exact radii from ``radius_of(omegas)`` (or ``radius_of(omegas,
    level)`` when it takes the cutoff multiplier too) and wall gradients from
    ``gradient_of(points)``."""
    import inspect

    with_level = len(inspect.signature(radius_of).parameters) == 2
    request = next(sampler)
    while True:
        if isinstance(request, GradientRequest):
            reply = gradient_of(request.radii[:, None] * request.omegas)
        else:
            r = radius_of(request.omegas, request.level) if with_level else radius_of(
                request.omegas)
            reply = Radii(r, torch.full_like(r, 2.0))
        try:
            request = sampler.send(reply)
        except StopIteration as stop:
            return stop.value


@pytest.mark.parametrize("mean", [False, True])
def test_projected_normal_density_matches_quadrature(mean):
    """q(omega) in D = 2 against direct integration of the normal density along the ray."""
    cov = torch.tensor([0.3, 2.0], dtype=torch.float64)
    m = torch.tensor([0.4, -0.7], dtype=torch.float64) if mean else None
    pn = ProjectedNormal(cov, m)
    for phi in (0.1, 1.3, 2.9, 4.4):
        omega = torch.tensor([[math.cos(phi), math.sin(phi)]], dtype=torch.float64)
        mm = (0.0, 0.0) if m is None else (float(m[0]), float(m[1]))

        def density(t, phi=phi, mm=mm):
            x, y = t * mpmath.cos(phi) - mm[0], t * mpmath.sin(phi) - mm[1]
            return t * mpmath.exp(-x * x / 0.6 - y * y / 4.0) / (2 * mpmath.pi * mpmath.sqrt(0.6))

        # relative to the uniform law on the circle: 2 pi times the density on the circle
        exact = math.log(2 * math.pi * float(mpmath.quad(density, [0, mpmath.inf])))
        assert float(pn.log_density(omega)) == pytest.approx(exact, abs=1e-9)


def test_projected_normal_radial_law_exact_for_zero_mean():
    """R | omega of N(0, C) is chi_D / sqrt(omega' C^-1 omega): check its mean of R^2."""
    d = 40
    pn = ProjectedNormal(torch.linspace(0.5, 3.0, d, dtype=torch.float64))
    omega = torch.nn.functional.normalize(torch.ones(1, d, dtype=torch.float64), dim=1)
    omega = omega.expand(20000, d)
    r = pn.radial(omega, torch.Generator().manual_seed(0))
    a, _ = pn.quadratic(omega[:1])
    assert float((r**2).mean()) == pytest.approx(d / float(a), rel=0.01)


def test_projected_normal_radial_mh_matches_moments():
    """With a mean, the MH radial draws match the moments of R^{D-1} e^{-aR^2/2+bR}."""
    d = 6
    pn = ProjectedNormal(torch.ones(d, dtype=torch.float64), torch.full((d,), 0.8,
                                                                       dtype=torch.float64))
    omega = torch.nn.functional.normalize(torch.ones(1, d, dtype=torch.float64), dim=1)
    r = pn.radial(omega.expand(40000, d), torch.Generator().manual_seed(1), steps=30)
    a, b = (float(v) for v in pn.quadratic(omega))
    m1 = float(log_radial_integral(math.inf, d, a, b) - log_radial_integral(math.inf, d - 1, a, b))
    assert float(r.mean()) == pytest.approx(math.exp(m1), rel=0.01)


def test_cutoff_radius_is_exact_for_a_power_law():
    """delta = t^k: interpolation between bracket ends and extrapolation are both exact."""
    cutoff, k = 1e-2, 2.0
    exact = cutoff ** (1 / k)
    hist = [(0.05, 0.05**k), (0.2, 0.2**k), (0.101, 0.101**k)]
    assert _cutoff_radius(hist, cutoff, 0.101, 0.101**k, k) == pytest.approx(exact, rel=1e-14)
    one_sided = [(0.1005, 0.1005**k)]
    assert _cutoff_radius(one_sided, cutoff, 0.1005, 0.1005**k, k) == pytest.approx(
        exact, rel=1e-14
    )


@pytest.mark.parametrize("dim,sigma_factor", [(1000, 1.0), (1000, 0.1), (20000, 0.1)])
def test_whole_space_basin_is_exact(dim, sigma_factor):
    """A constant fn: every ray is unbounded and the probability is exactly 1."""
    c = torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = sigma_factor * float(c.norm()) / math.sqrt(dim)
    res = bv.estimate(lambda th: th.sum() * 0.0, c, n_samples=32, cutoff=1e-2, sigma=sigma,
                      progress=False, replicas=2, model_batch_size=32, method="auto")
    assert res.method == "smc"
    assert abs(res.log_volume) <= 1e-6


@pytest.mark.parametrize("dim", [1000, 10000])
def test_exact_proposal_ellipsoid_with_defaults(dim):
    """Given the matching proposal, the default method is exact to float precision."""
    g = torch.Generator().manual_seed(5)
    h = 10 ** (8 * torch.rand(dim, generator=g, dtype=torch.float64))
    c = torch.randn(dim, dtype=torch.float64, generator=g)
    truth = log_ball_volume(dim) + 0.5 * dim * math.log(2e-2) - 0.5 * float(h.log().sum())
    res = bv.estimate(lambda th: 0.5 * (h * (th - c) ** 2).sum(), c, n_samples=32,
                      measure="uniform", preconditioner=h**-0.5, progress=False, replicas=2,
                      model_batch_size=32, method="auto")
    assert abs(res.log_volume - truth) <= 1e-3


def test_sampler_ellipsoid_beats_importance_sampling():
    """D = 100, axes over 3 decades: isotropic IS is tens of nats low, SMC within a few."""
    h, c, truth = _ellipsoid(100, 3)
    runs = [
        _drive(
            smc_sampler(c, sigma=None, n_particles=200, n_moves=3, seed=s),
            lambda om: torch.sqrt(2e-2 / (om**2 * h).sum(1)),
        )
        for s in range(2)
    ]
    assert all(r.kind == "smc" for r in runs)
    for r in runs:
        assert abs(r.log_z - truth) <= 4.0
    is_est = bv.estimate(lambda th: 0.5 * (h * (th - c) ** 2).sum(), c, n_samples=400,
                         measure="uniform", progress=False, method="is")
    assert truth - is_est.log_volume > 15.0


def test_cooling_with_hamiltonian_moves_meets_the_closed_form():
    """The same ellipsoid along the cooling path with wall gradients (delta = x^T H x / 2, so
    grad delta = H x), moving until decorrelated: within 2.5 nats on both seeds, where pCN
    moves are allowed 4. At 200 particles log Z-hat is biased low by about a nat here (half
    its variance), which leaves 2 nats too little room on a bad seed."""
    h, c, truth = _ellipsoid(100, 3)
    for s in range(2):
        run = _drive(smc_sampler(c, sigma=None, n_particles=200, n_moves=None, seed=s,
                                 gradients=True),
                     lambda om: torch.sqrt(2e-2 / (om**2 * h).sum(1)), lambda x: x * h)
        assert run.kind == "smc"
        assert abs(run.log_z - truth) <= 2.5


def test_sampler_gaussian_measure_small_dimension():
    """D = 3 ball around theta0 under N(0, sigma^2 I): compare with a 2-D quadrature."""
    c = torch.tensor([0.9, -0.4, 0.3], dtype=torch.float64)
    sigma, radius = 0.5, 0.08
    # P(|theta - c| <= radius) for theta ~ N(0, sigma^2 I): noncentral chi-square CDF
    nc = float(c @ c) / sigma**2
    x = (radius / sigma) ** 2
    exact = math.log(float(mpmath.quad(
        lambda t: mpmath.exp(-(t + nc) / 2) / 2 * (t / nc) ** 0.25
        * mpmath.besseli(0.5, mpmath.sqrt(nc * t)), [0, x])))
    runs = [
        _drive(
            # 1,500 particles: the prior rays' weights are below 1e-3 here, so they do not
            # settle the estimate by the bounded-weight rule and the cutoff is annealed
            smc_sampler(c, sigma=sigma, n_particles=1500, n_moves=3, seed=s),
            # a quadratic basin: at level * cutoff the radius grows like sqrt(level)
            lambda om, level: torch.full((om.shape[0],), radius * level**0.5,
                                         dtype=torch.float64),
        )
        for s in range(12)  # one run scatters by several hundredths of a nat: average 12
    ]
    est = math.log(sum(math.exp(r.log_z) for r in runs) / len(runs))
    assert est == pytest.approx(exact, abs=0.05)


def test_smc_result_round_trips_and_old_files_load(tmp_path):
    h, c, _ = _ellipsoid(10, 1)
    res = bv.estimate(lambda th: 0.5 * (h * (th - c) ** 2).sum(), c, n_samples=32,
                      measure="uniform", progress=False, replicas=2, method="smc")
    res.save(tmp_path / "r.json")
    back = VolumeResult.load(tmp_path / "r.json")
    assert back.method == "smc" and back.replicas == res.replicas
    assert back.log_volume == res.log_volume
    assert math.isnan(back.log_volume_reverse)
    both = dataclasses.replace(res, meta={**res.meta, "smc": {
        **res.meta["smc"], "reverse": [r + 3.0 for r in res.replicas]}})
    both.save(tmp_path / "b.json")
    loaded = VolumeResult.load(tmp_path / "b.json")
    assert loaded.log_volume_reverse == pytest.approx(both.log_volume_reverse)
    assert loaded.interval() == pytest.approx(both.interval()) and loaded.passes_disagree
    data = bv.estimate(lambda th: 0.5 * (h * (th - c) ** 2).sum(), c, n_samples=8,
                       measure="uniform", progress=False, method="is").to_dict()
    del data["method"], data["replicas"]
    old = VolumeResult.from_dict(data)  # a file written before SMC existed
    assert old.method == "is" and old.replicas == ()


def test_method_errors_name_the_field():
    c = torch.ones(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="method"):
        bv.estimate(lambda th: th.sum(), c, method="mcmc", progress=False)
    with pytest.raises(ValueError, match="resume_from or callback"):
        bv.estimate(lambda th: th.sum(), c, method="smc", callback=print, progress=False)
    with pytest.raises(ValueError, match="rtol"):
        bv.estimate(lambda th: th.sum(), c, method="smc", rtol=2.0, progress=False)
    with pytest.raises(ValueError, match="budget"):
        bv.estimate(lambda th: th.sum(), c, method="smc", budget=0, progress=False)


def test_budget_caps_the_evaluations():
    """A budget far below what the basin needs stops the run with BudgetExhausted."""
    h, c, _ = _ellipsoid(50, 3)
    calls = []

    def fn(th):
        calls.append(1)
        return 0.5 * (h * (th - c) ** 2).sum()

    with pytest.raises(bv.BudgetExhausted, match="budget=500"):
        bv.estimate(fn, c, n_samples=32, measure="uniform", progress=False, method="smc",
                    budget=500)
    assert len(calls) <= 500 + 32 * 40 + 1  # at most one batch of searches past the cap


def _counted_ellipsoid(dim):
    h, c, truth = _ellipsoid(dim, 2)
    calls = []

    def fn(th):
        calls.append(1)
        return 0.5 * (h * (th - c) ** 2).sum()

    return fn, c, truth, calls


def _budgeted(fn, c, budget, **kwargs):
    return bv.estimate(fn, c, n_samples=256, measure="uniform", progress=False, method="smc",
                       curvature="none", seed=3, budget=budget, **kwargs)


def test_a_budget_sizes_the_particles_to_fit():
    """A 16-particle pilot prices a particle; the replicas get as many as the budget affords
    (fewer than the 256 asked for), the evaluations stay within it, and the estimate meets the
    closed form. Where the pilot's price proves low, the replicas that finished are pooled."""
    fn, c, truth, calls = _counted_ellipsoid(10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = _budgeted(fn, c, 100_000)
    sizing = res.meta["budget_sizing"]
    assert 16 < sizing["particles"] < 256
    assert sizing["particles"] * len(res.replicas) == res.n_samples
    assert len(res.replicas) == sizing.get("replicas_finished", 4) >= 2
    assert len(calls) - 1 <= res.meta["total_evals"] <= 100_000 + 64 * 40
    assert abs(res.log_volume - truth) <= 2.0
    lo, hi = res.interval()
    assert math.isfinite(lo) and math.isfinite(hi)


def test_a_budget_too_small_for_the_replicas_says_what_they_need():
    """Not even 4 replicas of 16 particles fit: the run stops after the pilot (not when the
    budget is gone) and names the budget they would need."""
    fn, c, _, calls = _counted_ellipsoid(10)
    with pytest.raises(bv.BudgetExhausted, match=r"budget=20000 .* need a budget of about \d+"):
        _budgeted(fn, c, 20_000)
    assert len(calls) < 10_000


def test_auto_spends_a_budget_too_small_for_smc_on_directions():
    """method="auto": where the pilot shows that 16 particles per replica do not fit, what it
    left goes to importance sampling, and the whole run stays within the budget."""
    fn, c, _, calls = _counted_ellipsoid(10)
    res = bv.estimate(fn, c, n_samples=20_000, measure="uniform", progress=False,
                      curvature="none", seed=3, budget=20_000)
    assert res.method == "is" and "do not fit 4 SMC replicas" in res.meta["auto"]
    assert res.meta["smc_pilot_evals"] + res.meta["budget"]["evals"] >= 20_000
    assert res.n_samples < 20_000
    assert len(calls) <= 20_000 + 64 * 40 + 1


def test_a_budget_stops_importance_sampling_without_changing_its_directions():
    """method="is" stops once the budget is spent; direction k depends on (seed, k) only,
    so the directions done are those of an unbudgeted run of as many."""
    h, c, _ = _ellipsoid(30, 2)
    calls = []

    def fn(th):
        calls.append(1)
        return 0.5 * (h * (th - c) ** 2).sum()

    capped = bv.estimate(fn, c, n_samples=1000, measure="uniform", progress=False,
                         method="is", budget=500)
    done = capped.n_samples
    assert done < 1000 and capped.meta["budget"] == {
        "budget": 500, "evals": int(capped.n_evals.sum()), "directions": done}
    assert 500 <= int(capped.n_evals.sum()) <= 500 + 64 * 40
    full = bv.estimate(fn, c, n_samples=done, measure="uniform", progress=False, method="is")
    assert torch.equal(capped.estimates, full.estimates)


def test_a_replica_cut_off_by_the_budget_leaves_the_finished_ones(monkeypatch):
    """Sizing that overplans (all of what is left) runs out in a late replica: the
    estimate pools those that finished, and says so."""
    from basin_volume import smc_estimate

    monkeypatch.setattr(smc_estimate, "_BUDGET_SHARE", 1.0)
    fn, c, truth, _ = _counted_ellipsoid(10)
    with pytest.warns(RuntimeWarning, match="pools the [23] that finished"):
        res = _budgeted(fn, c, 60_000)
    assert 2 <= len(res.replicas) < 4
    assert res.meta["budget_sizing"]["replicas_finished"] == len(res.replicas)
    assert res.meta["total_evals"] > 60_000
    assert abs(res.log_volume - truth) <= 3.0


@pytest.mark.parametrize("measure", ["uniform", "gaussian"])
def test_nan_everywhere_but_the_centre_is_minus_inf_with_a_warning(measure):
    """As for importance sampling: no ray is known to hold mass, so log P = -inf."""
    c = torch.ones(10, dtype=torch.float64)

    def fn(th):
        nan = torch.tensor(math.nan, dtype=torch.float64)
        return torch.where((th == c).all(), th.sum() * 0, nan)

    with pytest.warns(bv.RadiusSearchWarning, match="nonfinite"):
        res = bv.estimate(fn, c, method="smc", n_samples=32, progress=False, measure=measure)
    assert res.log_volume == -math.inf


def test_warnings_from_code_run_by_python_c():
    """A warning issued for a result made by `python -c` code must not crash."""
    import subprocess
    import sys

    code = (
        "import torch, basin_volume as bv\n"
        "c = torch.ones(10, dtype=torch.float64)\n"
        "nan = torch.tensor(float('nan'), dtype=torch.float64)\n"
        "fn = lambda th: torch.where((th == c).all(), th.sum() * 0, nan)\n"
        "r = bv.estimate(fn, c, method='smc', n_samples=32, progress=False)\n"
        "print(r.log_volume)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "-inf"
    assert "RadiusSearchWarning" in out.stderr


def _rotation(dim, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return q


def test_curvature_proposal_makes_a_rotated_ellipsoid_exact():
    """Rotated D = 60 ellipsoid, axes over 4 decades: the Hessian's proposal is the basin's
    own direction law, so every importance weight is equal and the volume is the closed form."""
    h, c, truth = _ellipsoid(60, 4, seed=7)
    q = _rotation(60, 8)
    a = q @ torch.diag(h) @ q.T
    res = bv.estimate(lambda th: 0.5 * (th - c) @ a @ (th - c), c, n_samples=32,
                      measure="uniform", progress=False, replicas=2, method="smc",
                      model_batch_size=32, curvature="hessian")
    assert res.meta["smc"]["kinds"] == ["is", "is"]
    assert res.log_volume == pytest.approx(truth, abs=1e-6)
    assert res.meta["total_evals"] >= 60 * 4  # the Hessian's rows are counted


def _rotated_ellipsoid_and_a_wrong_proposal():
    """A rotated D = 40 ellipsoid (axes over 3 decades, delta = x^T A x / 2) and the proposal
    of a Hessian whose eigenvalues are each off by a factor e^{0.5 z}: ``(centre, closed form,
    A, proposal, radius function)``."""
    h, c, truth = _ellipsoid(40, 3, seed=3)
    q = _rotation(40, 4)
    a = q @ torch.diag(h) @ q.T
    g = torch.Generator().manual_seed(5)
    wrong = h * torch.exp(0.5 * torch.randn(40, generator=g, dtype=torch.float64))
    start = ProjectedNormal(q @ torch.diag(1 / wrong) @ q.T)

    def radius_of(om):
        return torch.sqrt(2e-2 / ((om @ a) * om).sum(1))

    return c, truth, a, start, radius_of


def test_tempering_from_an_imperfect_proposal_reaches_the_closed_form():
    """A rotated D = 40 ellipsoid (axes over 3 decades) from the proposal of a Hessian whose
    eigenvalues are each off by a factor e^{0.5 z}: importance sampling from it has an ESS of
    a few percent, tempering from it lands within 0.25 nats of the closed form."""
    c, truth, a, start, radius_of = _rotated_ellipsoid_and_a_wrong_proposal()

    for s in range(3):
        run = _drive(smc_sampler(c, sigma=None, n_particles=300, n_moves=4, seed=s,
                                 start=start), radius_of)
        assert run.kind == "tempered" and run.ess_start < 0.2 * 300
        assert run.log_z == pytest.approx(truth, abs=0.25)


def test_backward_passes_meet_the_closed_form_and_leave_the_forward_run_alone():
    """The same ellipsoid and proposal with ``bidirectional``: each run walks its particles
    back to the proposal, and that estimate of 1/mu meets the closed form too; the forward
    estimate is bit for bit the one without the backward pass (which runs after it)."""
    c, truth, a, start, radius_of = _rotated_ellipsoid_and_a_wrong_proposal()
    for s in range(2):
        both = _drive(smc_sampler(c, sigma=None, n_particles=300, n_moves=4, seed=s,
                                  start=start, bidirectional=True), radius_of)
        plain = _drive(smc_sampler(c, sigma=None, n_particles=300, n_moves=4, seed=s,
                                   start=start), radius_of)
        assert both.kind == "tempered" and both.log_z == plain.log_z
        assert math.isnan(plain.log_z_reverse)
        assert both.log_z_reverse == pytest.approx(truth, abs=0.5)


def test_backward_passes_run_by_default_without_a_budget_only():
    """``bidirectional=None`` (the default) walks back where SMC tempers, unless a budget is
    given; the forward estimate is the same with or without the walk back."""
    h = torch.logspace(0, 2, 12, dtype=torch.float64)
    c = torch.zeros(12, dtype=torch.float64)

    def fn(th):  # quartic walls far from the isotropic curvature at the centre: it tempers
        return 0.5 * th.square().sum() + (h.square() * th**4).sum()

    kw = dict(n_samples=16, measure="uniform", cutoff=1.0, progress=False, replicas=2,
              method="smc", n_moves=1)
    default = bv.estimate(fn, c, **kw)
    assert default.meta["smc"]["kinds"] == ["tempered", "tempered"]
    assert default.meta["bidirectional"] is True
    assert all(math.isfinite(v) for v in default.meta["smc"]["reverse"])
    plain = bv.estimate(fn, c, bidirectional=False, **kw)
    assert plain.replicas == default.replicas and math.isnan(plain.log_volume_reverse)
    budgeted = bv.estimate(fn, c, budget=10**6, **kw)
    assert budgeted.meta["bidirectional"] is False
    assert all(math.isnan(v) for v in budgeted.meta["smc"]["reverse"])
    with pytest.raises(ValueError, match="bidirectional must be True, False or None"):
        bv.estimate(fn, c, bidirectional="yes", **kw)


def test_backward_passes_widen_the_interval_and_warn_when_they_disagree():
    """A result's interval reaches up to the backward passes' Student-t bound; passes far
    above the forward ones are said by the summary and warned about."""
    h, c, _ = _ellipsoid(10, 1)
    res = bv.estimate(lambda th: 0.5 * (h * (th - c) ** 2).sum(), c, n_samples=32,
                      measure="uniform", progress=False, replicas=3, method="smc")
    lo, hi = res.interval()
    assert math.isnan(res.log_volume_reverse) and not res.passes_disagree
    back = [r + 5.0 + k for k, r in enumerate(res.replicas)]
    up = dataclasses.replace(res, meta={**res.meta, "smc": {**res.meta["smc"], "reverse": back}})
    pooled = -float(torch.logsumexp(-torch.tensor(back), 0)) + math.log(3)
    assert up.log_volume_reverse == pytest.approx(pooled)
    t = 4.302652729911275  # Student t, 2 degrees of freedom, 97.5%
    spread = float(torch.tensor(back, dtype=torch.float64).std())
    assert up.interval() == pytest.approx((lo, pooled + t * spread / math.sqrt(3)))
    assert up.passes_disagree and "backward passes estimate" in up.summary()
    with pytest.warns(bv.LowESSWarning, match="moves did not mix"):
        up.warn_if_unreliable()
    close = dataclasses.replace(res, meta={**res.meta, "smc": {
        **res.meta["smc"], "reverse": [r - 1.0 for r in res.replicas]}})
    assert close.interval() == pytest.approx((lo, hi)) and not close.passes_disagree


def test_segment_check_finds_the_first_crossing_past_a_bump():
    """delta(rho) along every ray: a bump over the cutoff at rho = 1, then a valley, then
    growth. The basin is the ball up to the first crossing, which a doubling search from a
    small guess steps over; the radius found must be the first crossing (to 1e-6)."""
    import scipy.optimize

    from basin_volume.rays import DenseRays
    from basin_volume.smc_estimate import search_radii

    eps = 0.5

    def profile(rho):
        return 1.6 * eps * math.exp(-((rho - 1.0) ** 2) / 0.02) + eps * (rho / 3.0) ** 4

    def fn(th):
        rho = torch.linalg.vector_norm(th)
        return 1.6 * eps * torch.exp(-((rho - 1.0) ** 2) / 0.02) + eps * (rho / 3.0) ** 4

    first = scipy.optimize.brentq(lambda r: profile(r) - eps, 0.5, 1.0)
    c = torch.zeros(5, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    om = torch.randn(6, 5, generator=g, dtype=torch.float64)
    om = om / om.norm(dim=1, keepdim=True)
    rays = DenseRays(fn, c, seed=0, preconditioner=None, batch_fn=torch.func.vmap(fn))
    found = search_radii(rays, om, torch.full((6,), 0.05), torch.full((6,), math.nan),
                         f0=float(fn(c)), cutoff=eps, rtol=1e-3, max_radius=100.0,
                         max_evals=60, batch_size=8)
    assert found["radius"].tolist() == pytest.approx([first] * 6, rel=1e-3)


def test_annealing_the_cutoff_matches_the_noncentral_chi_square():
    """delta = |x|^4 / 4 around theta0 under N(0, sigma^2 I), D = 10: the basin is a ball of
    radius (4 eps)^(1/4) whose probability (about e^-7, too small for prior rays alone, large
    enough to anneal to) is a noncentral chi-square CDF (mpmath quadrature)."""
    dim, sigma, eps = 10, 1.0, 1.0
    c = torch.full((dim,), 0.5, dtype=torch.float64)
    radius = (4 * eps) ** 0.25
    nc, df = float(c @ c) / sigma**2, dim
    x = (radius / sigma) ** 2
    v = df / 2 - 1
    exact = math.log(float(mpmath.quad(
        lambda t: mpmath.exp(-(t + nc) / 2) / 2 * (t / nc) ** (v / 2)
        * mpmath.besseli(v, mpmath.sqrt(nc * t)), [0, x])))
    assert -8 < exact < -5

    def radius_of(om, level):
        return torch.full((om.shape[0],), (4 * eps * level) ** 0.25, dtype=torch.float64)

    runs = [
        _drive(smc_sampler(c, sigma=sigma, n_particles=300, n_moves=3, seed=s), radius_of)
        for s in range(3)
    ]
    assert all(r.kind == "annealed" for r in runs)
    for r in runs:
        assert r.log_z == pytest.approx(exact, abs=0.35)


def test_curvature_proposal_on_the_wall_of_a_gaussian_ellipsoid():
    """D = 200 ellipsoid under a prior whose bulk lies outside it (sigma = RMS/10): the basin's
    mass crowds against the wall; the estimate meets the generalised chi-square truth
    (Bromwich inversion of benchmarks/problems.py, checked there against mpmath)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import problems

    dim, eps = 200, 1e-2
    g = torch.Generator().manual_seed(21)
    h = 10 ** (4 * torch.rand(dim, generator=g, dtype=torch.float64))
    c = torch.randn(dim, generator=g, dtype=torch.float64)
    sigma = float(c.norm()) / math.sqrt(dim) / 10
    truth = problems.gchisq_logcdf((h * sigma**2).numpy(), (c / sigma).square().numpy(),
                                   2 * eps)
    res = bv.estimate(lambda th: 0.5 * (h * (th - c) ** 2).sum(), c, n_samples=256,
                      sigma=sigma, cutoff=eps, progress=False, replicas=2, method="smc",
                      model_batch_size=64, curvature="hessian")
    assert truth < -500  # far beyond what prior rays reach
    assert res.log_volume == pytest.approx(truth, abs=1.0)


def test_summary_of_smc_names_replicas_and_flags_disagreement():
    h, c, _ = _ellipsoid(10, 1)
    res = bv.estimate(lambda th: 0.5 * (h * (th - c) ** 2).sum(), c, n_samples=32,
                      measure="uniform", progress=False, replicas=2, method="smc")
    text = res.summary()
    assert "2 replicas of 32 particles" in text and "ESS" not in text
    assert "replicas: " + ", ".join(f"{r:.6g}" for r in res.replicas) in text
    assert not res.replicas_disagree and "disagree" not in text
    far = dataclasses.replace(res, replicas=(res.replicas[0], res.replicas[1] - 10.0))
    assert far.replicas_disagree and "disagree" in far.summary()
    with pytest.warns(bv.LowESSWarning, match="disagree"):
        far.warn_if_unreliable()


def test_auto_picks_smc_only_where_it_applies():
    h, c, _ = _ellipsoid(10, 1)
    fn = lambda th: 0.5 * (h * (th - c) ** 2).sum()  # noqa: E731
    assert bv.estimate(fn, c, n_samples=32, measure="uniform", progress=False).method == "smc"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        few = bv.estimate(fn, c, n_samples=8, measure="uniform", progress=False)
        logged = bv.estimate(fn, c, n_samples=32, measure="uniform", progress=False,
                             callback=lambda record: None)
    assert few.method == "is" and logged.method == "is"
    cfg = bv.VolumeConfig(model_type="mlp", n_samples=32, low_memory=True, progress=False)
    assert not bv.VolumeEstimator.from_config(cfg).runs_smc()


def test_an_estimate_below_the_importance_floor_is_flagged():
    """Markov's inequality: a plain importance-sampling estimate made on the way bounds the
    truth from below (95%); an SMC interval wholly below that bound is said to be wrong."""
    h, c, _ = _ellipsoid(10, 1)
    res = bv.estimate(lambda th: 0.5 * (h * (th - c) ** 2).sum(), c, n_samples=32,
                      measure="uniform", progress=False, replicas=2, method="smc")
    assert not res.below_importance
    smc = {**res.meta["smc"], "importance_floor": res.log_volume + 50.0}
    low = dataclasses.replace(res, meta={**res.meta, "smc": smc})
    assert low.below_importance and "Markov" in low.summary()
    with pytest.warns(bv.LowESSWarning, match="Markov"):
        low.warn_if_unreliable()


def test_curvature_proposal_moves_its_mean_to_the_real_wall():
    """A basin shorter than its Hessian says (a quartic term): the mean goes to the most
    probable point found on the real wall; on a quadratic basin it stays where it was."""
    from basin_volume.curvature import CurvatureProposal, curvature_proposal, hessian, wall_scale

    dim, eps = 30, 1e-2
    g = torch.Generator().manual_seed(3)
    h = 10 ** (2 * torch.rand(dim, generator=g, dtype=torch.float64))
    c = torch.randn(dim, generator=g, dtype=torch.float64)
    sigma = float(c.norm()) / math.sqrt(dim) / 10  # the prior's bulk outside the basin

    def quadratic(th):
        return 0.5 * (h * (th - c) ** 2).sum()

    def quartic(th):
        return quadratic(th) + 50.0 * ((th - c) ** 2).sum() ** 2

    plain = curvature_proposal(hessian(quadratic, c, dense=False), c, cutoff=eps, sigma=sigma)
    kept = CurvatureProposal(quadratic, c, cutoff=eps, sigma=sigma)()
    torch.testing.assert_close(kept.mean, plain.mean, rtol=1e-4, atol=0)
    moved = CurvatureProposal(quartic, c, cutoff=eps, sigma=sigma)()
    unit = plain.mean / plain.mean.norm()
    a, b = float(unit @ (h * unit)), 50.0  # delta(t) = a t^2 / 2 + b t^4 along the mean
    radius = math.sqrt((-a / 2 + math.sqrt(a * a / 4 + 4 * b * eps)) / (2 * b))
    assert radius < 0.9 * float(plain.mean.norm())  # the quartic term matters here
    # on the real wall, and at least as probable as the real wall's point along the mean
    assert float(quartic(c + moved.mean)) == pytest.approx(eps, rel=1e-3)

    def log_prior(x):
        return -float((c + x).square().sum()) / (2 * sigma**2)

    assert log_prior(moved.mean) >= log_prior(radius * unit) - 1e-6
    # never past the point of the ray closest to the origin, where the prior is densest
    assert wall_scale(-c, c, 10 * float(c.norm())) == pytest.approx(1.0)
    assert wall_scale(-c, c, 0.5 * float(c.norm())) == pytest.approx(0.5)


def _tangent_derivative(f, omega, v, h=1e-6):
    """Central difference of f along the great circles through the rows of omega towards v."""
    def at(s):
        x = omega + s * v
        return f(x / x.norm(dim=1, keepdim=True))

    return (at(h) - at(-h)) / (2 * h)


@pytest.mark.parametrize("kind", ["central", "diagonal", "dense"])
def test_projected_normal_gradient_matches_finite_differences(kind):
    """grad_log_density's tangent part against central differences of log_density."""
    g = torch.Generator().manual_seed(11)
    d = 7
    cov = torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    pn = {
        "central": ProjectedNormal(cov),
        "diagonal": ProjectedNormal(cov, mean),
        "dense": ProjectedNormal(torch.diag(cov) + 0.3 * torch.ones(d, d, dtype=torch.float64),
                                 mean),
    }[kind]
    omega = torch.randn(5, d, generator=g, dtype=torch.float64)
    omega = omega / omega.norm(dim=1, keepdim=True)
    v = torch.randn(5, d, generator=g, dtype=torch.float64)
    v = v - (v * omega).sum(1, keepdim=True) * omega
    numeric = _tangent_derivative(pn.log_density, omega, v)
    exact = (pn.grad_log_density(omega) * v).sum(1)
    assert torch.allclose(exact, numeric, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("sigma", "a"), [(None, 0.0), (0.7, None), (0.7, 0.3)])
def test_target_gradient_matches_finite_differences(sigma, a):
    """_Path.grad_log_mass (Lebesgue; the prior; a cooling level) for an ellipsoid, whose
    radius r(omega) = sqrt(2 eps / w^T H w) and wall gradient g = H r omega are known, against
    central differences of log I(omega)."""
    from basin_volume.smc_base import _Path

    g = torch.Generator().manual_seed(12)
    d, eps = 7, 0.3
    h = torch.diag(torch.rand(d, generator=g, dtype=torch.float64) + 0.2)
    c = torch.randn(d, generator=g, dtype=torch.float64)
    path = _Path(d, 0.0 if sigma is None else sigma**-2, float(c @ c))

    def radius(om):
        return torch.sqrt(2 * eps / ((om @ h) * om).sum(1))

    omega = torch.randn(5, d, generator=g, dtype=torch.float64)
    omega = omega / omega.norm(dim=1, keepdim=True)
    v = torch.randn(5, d, generator=g, dtype=torch.float64)
    v = v - (v * omega).sum(1, keepdim=True) * omega
    a = path.end if a is None else a  # the target (a = a1) or a cooling level
    numeric = _tangent_derivative(lambda om: path.log_mass(a, radius(om), om @ c), omega, v)
    r = radius(omega)
    exact = (path.grad_log_mass(a, r, omega, (r[:, None] * omega) @ h, c) * v).sum(1)
    assert torch.allclose(exact, numeric, rtol=1e-6, atol=1e-6)


def test_hamiltonian_moves_reach_the_closed_form():
    """The tempering test's rotated ellipsoid with gradients at the walls (Hamiltonian moves):
    within 0.25 nats of the closed form on three seeds."""
    c, truth, a, start, radius_of = _rotated_ellipsoid_and_a_wrong_proposal()

    errors = []
    for s in range(3):
        run = _drive(smc_sampler(c, sigma=None, n_particles=300, n_moves=4, seed=s, start=start,
                                 gradients=True), radius_of, lambda x: x @ a)
        assert run.kind == "tempered"
        errors.append(run.log_z - truth)
    assert max(abs(e) for e in errors) < 0.25


def test_gradients_steer_the_moves_of_estimate_and_are_counted():
    """estimate() tempering from a wrong diagonal preconditioner asks for wall gradients,
    counts them, and meets the closed form; on an objective torch.func cannot differentiate
    (its gradients come back all zero) it goes without them and still meets it."""
    dim, eps = 30, 1e-2
    h, c, truth = _ellipsoid(dim, 2, seed=21)
    g = torch.Generator().manual_seed(22)
    wrong = h.rsqrt() * torch.exp(0.7 * torch.randn(dim, generator=g, dtype=torch.float64))

    def smooth(theta):
        x = theta - c
        return 0.5 * (h * x * x).sum()

    def opaque(theta):  # .item() breaks torch.func's transforms
        return torch.tensor(float(smooth(theta)), dtype=torch.float64)

    kw = dict(cutoff=eps, measure="uniform", method="smc", n_samples=128, seed=0, progress=False,
              preconditioner=wrong)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steered = bv.estimate(smooth, c.clone(), **kw)
        blind = bv.estimate(opaque, c.clone(), **kw)
    assert steered.meta["smc"]["kinds"] == ["tempered"] * 4
    assert steered.meta["gradients"] > 0
    assert steered.meta["total_evals"] >= 2 * steered.meta["gradients"]
    smc = steered.meta["smc"]  # n_moves=None: moves per level recorded, within the cap
    assert [len(m) for m in smc["moves"]] == [len(p) for p in smc["path"]]
    assert all(1 <= k <= smc_paths._MAX_MOVES for m in smc["moves"] for k in m)
    assert abs(steered.log_volume - truth) < 0.75
    assert abs(steered.log_volume_reverse - truth) < 0.75  # the default's backward pass
    assert blind.meta["gradients"] == 0
    assert abs(blind.log_volume - truth) < 1.5


def _mixed(n_moves, move):
    """Drive :func:`basin_volume.smc_paths._mix` with ``move(state) -> state`` (no requests);
    returns the final state, the mean rate, the number of moves made and the correlation
    they left."""
    from basin_volume.smc_paths import _mix, _State

    g = torch.Generator().manual_seed(3)
    n = 4000  # sample correlations of independent statistics within 0.05 (3 sd)
    omega = torch.nn.functional.normalize(torch.randn(n, 10, generator=g, dtype=torch.float64))
    state = _State(omega, torch.ones(n), torch.ones(n), torch.randn(n, generator=g,
                                                                       dtype=torch.float64))
    made = []

    def one(k, st):
        made.append(k)
        return move(st), 1.0
        yield  # a generator, like _move

    runner = _mix(state, n_moves, one)
    try:
        next(runner)
    except StopIteration as stop:
        assert stop.value[2] == len(made)  # the count it reports is the count it made
        return stop.value
    raise AssertionError("_mix asked for something although the moves ask for nothing")


def _movers(seed: int):
    """Two moves for :func:`_mixed`, drawing from one generator: ``fresh`` (independent new
    particles) and ``drift`` (an AR(1) step of the log target, correlation 0.9 with the last,
    with fresh directions)."""
    from basin_volume.smc_paths import _State

    g = torch.Generator().manual_seed(seed)

    def fresh(st):
        n, d = st.omega.shape
        return _State(torch.nn.functional.normalize(torch.randn(n, d, generator=g,
                                                                dtype=torch.float64)),
                      st.r, st.slope, torch.randn(n, generator=g, dtype=torch.float64))

    def drift(st):
        z = torch.randn(st.log_p.shape, generator=g, dtype=torch.float64)
        return dataclasses.replace(st, log_p=0.9 * st.log_p + math.sqrt(1 - 0.81) * z,
                                   omega=fresh(st).omega)

    return fresh, drift


def test_adaptive_moves_stop_when_the_particles_have_decorrelated():
    """n_moves=None: fresh independent particles stop the level after one move, particles
    that never move run to the cap, and a slow drift (correlation 0.9 per move) stops at the
    first move whose correlation with the start is below 0.1 (0.9^k < 0.1: k = 22)."""
    fresh, drift = _movers(4)
    assert _mixed(None, fresh)[2] == 1
    assert _mixed(None, lambda st: st)[2] == smc_paths._MAX_MOVES
    assert _mixed(5, fresh)[2] == 5  # a fixed count is kept whatever happens
    made = _mixed(None, drift)[2]
    expected = math.ceil(math.log(smc_paths._DECORRELATED) / math.log(0.9))
    assert abs(made - expected) <= 3, (made, expected)


def test_a_particle_moves_with_a_law_fitted_without_it(monkeypatch):
    """Each fitted reference of a move comes from the other half of the particles: the rows
    that move with it are not among the points it was fitted to (a law fitted to a particle
    itself is denser where that particle is, which biased log Z up by O(D/N))."""
    from basin_volume.smc_base import _Path
    from basin_volume.smc_paths import _move, _State

    d, n, eps = 20, 40, 1e-2
    g = torch.Generator().manual_seed(0)
    h = 10 ** (2 * torch.rand(d, generator=g, dtype=torch.float64))
    omega = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64))
    omega[:, 0] += torch.arange(n, dtype=torch.float64)  # every particle distinct in x_0
    omega = torch.nn.functional.normalize(omega)
    r = torch.sqrt(2 * eps / (omega**2 * h).sum(1))
    path = _Path(d, 0.0, 1.0)
    state = _State(omega, r, torch.full_like(r, 2.0), path.log_mass(0.0, r, omega[:, 0]))
    fitted, moved = [], []
    real_fit, real_step = smc_paths.ProjectedNormal.fit, smc_paths._metropolis

    def fit(x, **kw):
        fitted.append(x / torch.linalg.vector_norm(x, dim=1, keepdim=True))  # their directions
        return real_fit(x, **kw)

    def step(ref, rho, st, **kw):
        moved.append(st.omega)
        return (yield from real_step(ref, rho, st, **kw))

    monkeypatch.setattr(smc_paths.ProjectedNormal, "fit", staticmethod(fit))
    monkeypatch.setattr(smc_paths, "_metropolis", step)
    mover = _move(1, None, state, lambda rr, oo: path.log_mass(0.0, rr, oo[:, 0]),
                  weight=(1.0, 0.0), rho={"fitted": 0.5}, path=path,
                  theta0=torch.eye(d, dtype=torch.float64)[0], gen=g, gradients=False, a=0.0)
    request = next(mover)
    while True:
        radius = torch.sqrt(2 * eps / (request.omegas**2 * h).sum(1))
        try:
            request = mover.send(Radii(radius, torch.full_like(radius, 2.0)))
        except StopIteration:
            break
    assert len(fitted) == len(moved) == 2
    for points, rows in zip(fitted, moved, strict=True):
        same = torch.cdist(points, rows) < 1e-12  # a moved row among the fitted points
        assert not bool(same.any())
        assert points.shape[0] + rows.shape[0] == n  # and together they are everyone


def test_halves_keep_each_family_on_one_side():
    """After resampling, copies of a parent share a family; the split fit's halves hold whole
    families, about half the particles each, and fall back to a random split when one family
    is most of the population."""
    from basin_volume.smc_paths import _halves, _State

    n, d = 64, 5
    g = torch.Generator().manual_seed(3)
    omega = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64))
    ones = torch.ones(n, dtype=torch.float64)
    parents = torch.sort(torch.randint(0, n, (n,), generator=g)).values
    state = _State(omega, ones, ones, ones).resampled(parents)
    assert torch.equal(state.family, parents)
    mine, other = _halves(state, g)
    assert sorted(mine.tolist() + other.tolist()) == list(range(n))
    assert not set(state.family[mine].tolist()) & set(state.family[other].tolist())
    assert n // 4 <= mine.numel() <= n // 2 + 1
    one_big = _State(omega, ones, ones, ones).resampled(torch.zeros(n, dtype=torch.int64))
    mine, other = _halves(one_big, g)
    assert mine.numel() == other.numel() == n // 2


def _flat_search(profile, torch_profile, *, rtol, d=5, guess=0.05):
    from basin_volume.rays import DenseRays
    from basin_volume.smc_estimate import search_radii

    def fn(th):
        return torch_profile(torch.linalg.vector_norm(th))

    c = torch.zeros(d, dtype=torch.float64)
    om = torch.nn.functional.normalize(
        torch.randn(4, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    rays = DenseRays(fn, c, seed=0, preconditioner=None, batch_fn=torch.func.vmap(fn))
    return search_radii(rays, om, torch.full((4,), guess), torch.full((4,), math.nan),
                        f0=0.0, cutoff=1.0, rtol=rtol, max_radius=100.0, max_evals=60,
                        batch_size=8, check=True)


@pytest.mark.parametrize("guess", [0.05, 0.5, 3.0])
def test_a_flat_crossing_is_placed_to_a_hundredth_of_a_nat(guess):
    """delta saturates, (1 - exp(-1.44 rho^2)) / (1 - exp(-1.44)): its log-log slope at the
    crossing rho = 1 is 0.89 and falling, as the KL of a network does near saturation. In
    D = 500 a radius error moves a direction's log-mass by 500 times the error in log r, and
    stopping within rtol = 1e-2 of the cutoff leaves up to 1e-2 / 0.89 there. The radius
    returned must be within 0.01 nats: |log r| <= 0.01 / 500."""
    d = 500

    def sat(r):
        e = torch.exp if isinstance(r, torch.Tensor) else math.exp
        return (1 - e(-1.44 * r * r)) / (1 - math.exp(-1.44))

    found = _flat_search(sat, sat, rtol=1e-2, d=d, guess=guess)
    assert d * float(found["radius"].log().abs().max()) <= 0.01


@pytest.mark.parametrize("guess", [0.05, 0.5, 0.98, 1.02, 3.0])
@pytest.mark.parametrize("m", [4, 8, 16])
def test_a_sharply_saturating_crossing_is_placed_to_a_hundredth_of_a_nat(m, guess):
    """delta = (1 - exp(-2 rho^m)) / (1 - exp(-2)), crossing the cutoff 1 at rho = 1 with a
    log-log slope of 1.3 to 5 and a curvature d^2 log delta / d(log rho)^2 of -6.6 to -105:
    the chord between bracket ends lies below the curve, so the root it gives is long. A bound
    that takes the curvature to be 1 stopped with errors up to 0.23 nats in D = 500; the
    radius returned must be within 0.01 nats: |log r| <= 0.01 / 500."""
    d = 500

    def sat(r):
        e = torch.exp if isinstance(r, torch.Tensor) else math.exp
        return (1 - e(-2.0 * r**m)) / (1 - math.exp(-2.0))

    found = _flat_search(sat, sat, rtol=1e-2, d=d, guess=guess)
    assert d * float(found["radius"].log().abs().max()) <= 0.01


def _plateau(r, exp, bump):
    """delta flat at 0.95 of the cutoff 1 from r = 0.3 on, a bump over it of width 0.02 at
    ``bump``, then growing past it (crossing near 2.2)."""
    return (0.95 * (1 - exp(-((r / 0.1) ** 2))) + 0.2 * exp(-(((r - bump) / 0.02) ** 2))
            + (r / 2.2) ** 8)


@pytest.mark.parametrize("bump", [0.9, 1.1])
def test_a_bump_in_a_flat_stretch_is_found(bump):
    """delta runs flat at 0.95 * cutoff from rho = 0.3 on, with a narrow bump over the cutoff
    (width 0.02: between the points of the 8-point segment grid, and no local maximum of
    them), then grows past it, crossing near 2.2. A search from a small guess steps over the
    bump; the radius must be the bump's first crossing."""
    import scipy.optimize

    first = scipy.optimize.brentq(lambda r: _plateau(r, math.exp, bump) - 1.0, bump - 0.1,
                                  bump)
    found = _flat_search(lambda r: _plateau(r, math.exp, bump),
                         lambda r: _plateau(r, torch.exp, bump), rtol=1e-3, guess=0.05)
    assert found["radius"].tolist() == pytest.approx([first] * 4, rel=1e-4)


def test_the_heaviest_rays_are_checked_for_an_earlier_exit():
    """Prior rays' searches start at the drawn point's distance (here 2.0, next to the
    crossing at 2.2) and see only its neighbourhood. delta has a bump over the cutoff at
    rho = 1 on the plateau of the test above. Given per-ray weight offsets, the rays that
    hold all but 5% of the weight must come back with the bump's first crossing; the light
    ones, whose error could move the estimate by at most that share, are left as searched."""
    import scipy.optimize

    from basin_volume.rays import DenseRays
    from basin_volume.smc_estimate import search_radii

    def fn(th):
        return _plateau(torch.linalg.vector_norm(th), torch.exp, 1.0)

    first = scipy.optimize.brentq(lambda r: _plateau(r, math.exp, 1.0) - 1.0, 0.9, 1.0)
    later = scipy.optimize.brentq(lambda r: _plateau(r, math.exp, 1.0) - 1.0, 1.5, 2.5)
    d = 5
    om = torch.nn.functional.normalize(
        torch.randn(4, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    rays = DenseRays(fn, torch.zeros(d, dtype=torch.float64), seed=0, preconditioner=None,
                     batch_fn=torch.func.vmap(fn))
    found = search_radii(rays, om, torch.full((4,), 2.0), torch.full((4,), math.nan),
                         f0=0.0, cutoff=1.0, rtol=1e-3, max_radius=100.0, max_evals=60,
                         batch_size=8, weights=torch.tensor([0.0, -50.0, 0.0, -50.0],
                                                            dtype=torch.float64))
    assert found["radius"].tolist() == pytest.approx([first, later, first, later], rel=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_heaviest_leaves_at_most_the_share_unchecked(seed):
    """_heaviest picks the fewest rays, heaviest first, that leave at most _UNCHECKED_SHARE
    of the weight to the rest: counted here by adding up sorted weights one at a time."""
    from basin_volume.smc_estimate import _UNCHECKED_SHARE, _heaviest

    g = torch.Generator().manual_seed(seed)
    log_w = 3.0 * torch.randn(200, generator=g, dtype=torch.float64)
    log_w[:20] = -math.inf  # rays of radius 0
    w = sorted(math.exp(v) for v in log_w.tolist())[::-1]
    total, kept, n = sum(w), 0.0, 0
    while (total - kept) / total > _UNCHECKED_SHARE:
        kept += w[n]
        n += 1
    picked = _heaviest(log_w)
    assert len(picked) == n
    assert min(log_w[sorted(picked)].tolist()) >= max(
        (v for i, v in enumerate(log_w.tolist()) if i not in picked), default=-math.inf)


@pytest.mark.parametrize("seed", range(3))
def test_a_move_checks_only_the_ends_it_could_accept(seed):
    """A move's end is searched from its parent's radius, so its search can miss an earlier
    exit. Here half the rays (omega_0 > 0) have one: an unchecked search returns the later
    crossing, 1.5 times the first (the ellipsoid's). The move must decide exactly as if every
    end had been checked (the same generator, a radius oracle that always gives the first
    crossing), while checking only the ends it might accept."""
    from basin_volume.smc_base import _Path
    from basin_volume.smc_paths import _move, _State

    d, n, eps = 12, 200, 1e-2
    g = torch.Generator().manual_seed(seed)
    h = 10 ** (3 * torch.rand(d, generator=g, dtype=torch.float64))
    omega = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64))

    def first(om):
        return torch.sqrt(2 * eps / (om**2 * h).sum(1))

    path = _Path(d, 0.0, 1.0)
    r = first(omega)
    state = _State(omega, r, torch.full_like(r, 2.0), path.log_mass(0.0, r, omega[:, 0]))

    def run(radius_of):
        checked = []
        mover = _move(0, ProjectedNormal(torch.eye(d, dtype=torch.float64)), state,
                      lambda rr, oo: path.log_mass(0.0, rr, oo[:, 0]), weight=(1.0, 0.0),
                      rho={"proposal": 0.9}, path=path,
                      theta0=torch.eye(d, dtype=torch.float64)[0],
                      gen=torch.Generator().manual_seed(100 + seed), gradients=False, a=0.0)
        request = next(mover)
        while True:
            checked += [len(request.omegas)] if request.check else []
            radius = radius_of(request)
            try:
                request = mover.send(Radii(radius, torch.full_like(radius, 2.0)))
            except StopIteration as stop:
                return stop.value[0], sum(checked)

    def missed_exit(request):
        late = (request.omegas[:, 0] > 0) & (not request.check)
        return first(request.omegas) * torch.where(late, 1.5, 1.0)

    ideal, _ = run(lambda request: first(request.omegas))
    moved, n_checked = run(missed_exit)
    assert torch.equal(moved.omega, ideal.omega)
    assert torch.equal(moved.r, ideal.r)
    assert 0 < n_checked < n  # checking every end would check all n

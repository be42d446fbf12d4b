r"""``bv.estimate`` on quadratic basins whose measure is known exactly.

For :math:`\delta(\theta) = \tfrac12 (\theta-\theta_0)^\top H (\theta-\theta_0)` the basin
:math:`\{\delta \le \varepsilon\}` is an ellipsoid, and the radius along a unit direction
:math:`\omega` is :math:`R(\omega) = \sqrt{2\varepsilon / \omega^\top H\omega}`. Exact facts:

* uniform measure: :math:`\log\mathrm{vol} = \log V_D + \tfrac D2 \log 2\varepsilon -
  \tfrac12\sum_i\log h_i`. Directions drawn as :math:`Pu/\lVert Pu\rVert` with
  :math:`P = \mathrm{diag}(h^{-1/2})` have importance weight :math:`\det P\,\lVert
  P^{-1}\omega\rVert^{D}` and :math:`R(\omega)^D \propto \lVert P^{-1}\omega\rVert^{-D}`, so
  every direction gives the exact value (so does :math:`H = hI` with no preconditioner);
* Gaussian measure :math:`N(0, \sigma^2 I)`, :math:`H = hI`, :math:`\theta_0 = 0`: the
  probability is :math:`P(D/2,\ \varepsilon/(h\sigma^2))` (regularised lower incomplete
  gamma), again from every direction;
* Gaussian, :math:`H = hI`, :math:`\lVert\theta_0\rVert^2/\sigma^2 = \lambda`: the CDF of the
  noncentral :math:`\chi^2_D(\lambda)` at :math:`2\varepsilon/(h\sigma^2)`, a Poisson mixture
  of regularised gammas. Directions now differ, and the per-direction value is known exactly
  as a function of :math:`\omega\cdot\theta_0`;
* Gaussian, anisotropic :math:`H`, :math:`\theta_0 = 0`, :math:`D = 2` (and :math:`D = 3`
  with an axis of symmetry): a one-dimensional integral over the direction of
  :math:`P(D/2, R(\omega)^2/2\sigma^2)`.

All expected values are computed with mpmath (``mp.dps = 50``) or ``math.fsum``, never with
the library. Radii are found to ``rtol = 1e-12``, so
:math:`|\log R_{\mathrm{returned}} - \log R| \le \mathrm{rtol}` and a per-direction log value
may be off by at most :math:`D \cdot \mathrm{rtol}` from the search, plus float64 rounding of
terms of size :math:`\sim D\log D` that cancel.
"""

from __future__ import annotations

import math
import warnings

import mpmath as mp
import numpy as np
import pytest
import torch

import basin_volume as bv

RTOL = 1e-12
DPS = 50
F64 = torch.float64


# ------------------------------------------------------------------------ helpers


def quadratic(h, center):
    """delta(theta) = 1/2 sum h_i (theta_i - center_i)^2 (fn(center) = 0)."""

    def fn(theta):
        return 0.5 * (h * (theta - center).square()).sum()

    return fn


def recording(fn, center, calls):
    """Wrap fn so that every unit direction it is evaluated along is appended to ``calls``."""

    def wrapped(theta):
        step = (theta - center).double()
        norm = float(torch.linalg.vector_norm(step))
        if norm > 0:
            calls.append((step / norm).numpy().copy())
        return fn(theta)

    return wrapped


def run(fn, center, **kwargs):
    kwargs.setdefault("rtol", RTOL)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("seed", 0)
    kwargs.setdefault("method", "is")  # these are exactness tests of importance sampling
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        return bv.estimate(fn, center, **kwargs)


def float_tol(exact: float, dim: int) -> float:
    """Allowed |error| of a log value: search tolerance D*rtol, plus float64 rounding of
    terms of size ~ D log D (log V_D, (D/2) log 2 eps, ...) that cancel in the result."""
    return 1e-12 * max(1.0, abs(exact)) + dim * RTOL + 1e-14 * dim * (1.0 + math.log(dim))


def check_common(res, *, n_samples: int, cutoff: float, max_evals: int | None = 2):
    assert res.estimates.shape == (n_samples,)
    assert res.estimates.dtype == F64
    assert bool(torch.isfinite(res.estimates).all())
    # the returned radius is where delta was evaluated, within rtol * eps of eps
    assert res.deltas.shape == (n_samples,)
    assert bool(((res.deltas - cutoff).abs() <= RTOL * cutoff).all()), res.deltas
    assert bool((res.n_evals >= 1).all())
    if max_evals is not None:  # an exactly quadratic ray: the log-log secant is exact
        assert int(res.n_evals.max()) <= max_evals, res.n_evals
    # log_volume is the log-mean-exp of the per-direction estimates
    with mp.workdps(DPS):
        lme = mp.log(mp.fsum(mp.exp(mp.mpf(float(x))) for x in res.estimates)) - mp.log(n_samples)
    assert res.log_volume == pytest.approx(float(lme), rel=1e-13, abs=1e-13)


def check_zero_variance(res, exact: float, dim: int):
    """Every direction gives ``exact``: the spread is rounding, and so is the error."""
    tol = float_tol(exact, dim)
    est = res.estimates
    assert float(est.max() - est.min()) <= tol, f"spread {float(est.max() - est.min()):.3e}"
    err = float((est - exact).abs().max())
    assert err <= tol, f"max |estimate - exact| = {err:.3e} > {tol:.3e} (exact {exact!r})"
    assert abs(res.log_volume - exact) <= tol
    assert res.ess == pytest.approx(res.estimates.numel(), rel=1e-6)
    if res.estimates.numel() >= 2:
        low, high = res.interval(0.95)
        assert exact - tol <= low <= high <= exact + tol


def ref_log_ball_volume(dim: int):
    with mp.workdps(DPS):
        d = mp.mpf(dim)
        return d / 2 * mp.log(mp.pi) - mp.loggamma(d / 2 + 1)


def ref_log_sphere_area(dim: int):
    with mp.workdps(DPS):
        d = mp.mpf(dim)
        return mp.log(2) + d / 2 * mp.log(mp.pi) - mp.loggamma(d / 2)


def log_uniform(dim: int, low: float, high: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.empty(dim, dtype=F64).uniform_(math.log(low), math.log(high), generator=gen).exp()


def normal(dim: int, seed: int) -> torch.Tensor:
    return torch.randn(dim, dtype=F64, generator=torch.Generator().manual_seed(seed))


def sum_log(x: torch.Tensor) -> float:
    """sum(log x) in float64 with numpy's pairwise summation (error ~1e-16 log2(D) |sum|)."""
    return float(np.sum(np.log(x.numpy()), dtype=np.float64))


def ref_uniform_log_volume(dim: int, eps: float, sum_log_h: float) -> float:
    with mp.workdps(DPS):
        return float(
            ref_log_ball_volume(dim) + mp.mpf(dim) / 2 * mp.log(2 * mp.mpf(eps)) - sum_log_h / 2
        )


# ------------------------------------------------------------------------ mpmath references


def mp_log_radial(r, n, a, b):
    r"""log \int_0^r t^n exp(-a t^2/2 + b t) dt by quadrature of exp(g - g(m)), m = min(t*, r).

    Split at m and at m +- k w for a local width w; g is concave, so the integrand is below
    exp(-400) of its maximum beyond the outermost break points.
    """
    n, a, b = mp.mpf(n), mp.mpf(a), mp.mpf(b)
    r = mp.inf if r == mp.inf or (isinstance(r, float) and math.isinf(r)) else mp.mpf(r)

    def g(t):
        return n * mp.log(t) - a * t * t / 2 + b * t

    m = min((b + mp.sqrt(b * b + 4 * a * n)) / (2 * a), r)
    slope = n / m - a * m + b
    scale = 1 / mp.sqrt(n / m**2 + a + slope**2)
    g_m = g(m)
    points = [mp.mpf(0)]
    for k in (243, 81, 27, 9, 3, 1):
        t = m - k * scale
        if t > 0 and g(t) - g_m > -400:
            points.append(t)
    points.append(m)
    if r > m:
        for k in (1, 3, 9, 27, 81, 243):
            t = m + k * scale
            if t >= r:
                break
            points.append(t)
            if g(t) - g_m < -400:
                break
        points.append(r)
    value, error = mp.quad(lambda t: mp.exp(g(t) - g_m) if t > 0 else mp.mpf(0), points, error=True)
    assert error < mp.mpf(10) ** -30 * value
    return g_m + mp.log(value)


def ref_log_gamma_p(s, x):
    """log P(s, x), the regularised lower incomplete gamma, at mp.dps = 50.

    mpmath's series converges for moderate s or for x well below s; near x ~ s with huge s
    it does not, and there P(s, x) = J(sqrt(2x); 2s-1, 1, 0) / J(inf; 2s-1, 1, 0) with J by
    quadrature (J(inf) = 2^(s-1) Gamma(s)).
    """
    with mp.workdps(DPS):
        s, x = mp.mpf(s), mp.mpf(x)
        if s < 2e4 or x < s / 2:
            return mp.log(mp.gammainc(s, 0, x, regularized=True))
        log_j = mp_log_radial(mp.sqrt(2 * x), 2 * s - 1, 1, 0)
        return log_j - (s - 1) * mp.log(2) - mp.loggamma(s)


def ref_log_ncx2_cdf(dim: int, lam: float, y: float):
    """log CDF of the noncentral chi-square(dim, lam) at y: Poisson(lam/2) mixture of P."""
    with mp.workdps(DPS):
        half = mp.mpf(lam) / 2
        x = mp.mpf(y) / 2
        terms = []
        j = 0
        while True:
            log_w = -half + j * mp.log(half) - mp.loggamma(j + 1) if half > 0 else mp.mpf(0)
            terms.append(log_w + ref_log_gamma_p(mp.mpf(dim) / 2 + j, x))
            # terms decrease once j > lam/2 and P decreases in j: stop when negligible
            if half == 0 or (j > half and terms[-1] < max(terms) - 150):
                break
            j += 1
        top = max(terms)
        return top + mp.log(mp.fsum(mp.exp(t - top) for t in terms))


def ref_log_ray_gaussian(dim, sigma, norm_c, dot, radius):
    r"""Exact per-direction log value under N(0, sigma^2 I) for the uniform proposal:

    log A_D - (D/2) log 2 pi - |theta0|^2/(2 sigma^2) + log J(R/sigma; D-1, 1, -dot/sigma).
    """
    with mp.workdps(DPS):
        sigma = mp.mpf(sigma)
        return (
            ref_log_sphere_area(dim)
            - mp.mpf(dim) / 2 * mp.log(2 * mp.pi)
            - (mp.mpf(norm_c) / sigma) ** 2 / 2
            + mp_log_radial(mp.mpf(radius) / sigma, dim - 1, 1, -mp.mpf(dot) / sigma)
        )


def mp_curvature(h, w):
    """w' diag(h) w in mpmath (h, w: float sequences)."""
    return mp.fsum(mp.mpf(float(hi)) * mp.mpf(float(wi)) ** 2 for hi, wi in zip(h, w, strict=True))


def mp_log_importance_weight(p, w):
    """log(1/q(w)) = log det P + D log |P^-1 w| for the proposal w = Pu/|Pu|, P = diag(p)."""
    scaled = [mp.mpf(float(wi)) / mp.mpf(float(pi)) for wi, pi in zip(w, p, strict=True)]
    return mp.fsum(mp.log(float(pi)) for pi in p) + len(p) * mp.log(mp.norm(scaled))


def distinct_directions(calls) -> np.ndarray:
    """The distinct unit vectors among the recorded evaluation directions."""
    out: list[np.ndarray] = []
    for w in calls:
        if not any(abs(float(w @ u) - 1.0) < 1e-9 for u in out):
            out.append(w)
    return np.array(out)


def test_reference_gamma_p_agrees_across_methods():
    # the quadrature branch of ref_log_gamma_p against mpmath's series where both work
    with mp.workdps(DPS):
        for s, x in [(2.5e4, 2.4e4), (2.5e4, 2.5e4), (5e4, 5.2e4), (1e3, 1e3)]:
            series = mp.log(mp.gammainc(mp.mpf(s), 0, mp.mpf(x), regularized=True))
            quad = mp_log_radial(mp.sqrt(2 * mp.mpf(x)), 2 * mp.mpf(s) - 1, 1, 0) - (
                (mp.mpf(s) - 1) * mp.log(2) + mp.loggamma(mp.mpf(s))
            )
            assert abs(series - quad) < mp.mpf(10) ** -30


@pytest.mark.parametrize(("dim", "lam", "y"), [(2, 1.0, 1.44), (5, 4.0, 2.0), (30, 10.0, 25.0)])
def test_reference_noncentral_chi2_matches_scipy(dim, lam, y):
    from scipy.stats import ncx2

    assert math.exp(ref_log_ncx2_cdf(dim, lam, y)) == pytest.approx(ncx2.cdf(y, dim, lam), rel=1e-9)


# ------------------------------------------------------------------------ uniform measure


@pytest.mark.parametrize(
    ("dim", "n_samples"),
    [(2, 16), (3, 16), (10, 16), (1000, 12), (10**5, 6), (10**7, 2)],
)
def test_uniform_diagonal_quadratic_preconditioned_is_exact_for_every_direction(dim, n_samples):
    h = log_uniform(dim, 1e-2, 1e2, seed=dim)
    center = 0.5 * normal(dim, seed=dim + 1)
    eps = 0.3
    exact = ref_uniform_log_volume(dim, eps, sum_log(h))
    res = run(
        quadratic(h, center),
        center,
        n_samples=n_samples,
        cutoff=eps,
        measure="uniform",
        preconditioner=3.7 * h.rsqrt(),  # any overall multiple of h^(-1/2)
    )
    check_common(res, n_samples=n_samples, cutoff=eps)
    check_zero_variance(res, exact, dim)


@pytest.mark.parametrize(
    ("dim", "h"),
    [(d, h) for d in (2, 3, 10, 1000) for h in (1e-3, 1.0, 250.0)] + [(10**5, 0.7)],
)
def test_uniform_isotropic_quadratic_is_exact_without_preconditioner(dim, h):
    center = normal(dim, seed=dim)
    eps = 0.02
    exact = ref_uniform_log_volume(dim, eps, dim * math.log(h))
    res = run(quadratic(h, center), center, n_samples=8, cutoff=eps, measure="uniform")
    check_common(res, n_samples=8, cutoff=eps)
    check_zero_variance(res, exact, dim)


@pytest.mark.parametrize("dim", [3, 50])
@pytest.mark.parametrize("matching", [True, False])
def test_rescaling_the_preconditioner_changes_nothing(dim, matching):
    h = log_uniform(dim, 1e-2, 1e2, seed=7)
    center = normal(dim, seed=8)
    p = h.rsqrt() if matching else log_uniform(dim, 0.1, 10.0, seed=9)
    eps = 0.1
    results = [
        run(
            quadratic(h, center),
            center,
            n_samples=12,
            cutoff=eps,
            measure=measure,
            sigma=1.0 if measure == "gaussian" else None,
            preconditioner=c * p,
        )
        for measure in ("uniform", "gaussian")
        for c in (1.0, 1e-3, 7.5, 1e4)
    ]
    for i, group in enumerate((results[:4], results[4:])):
        base = group[0].estimates
        if not matching or i == 1:
            assert float(base.max() - base.min()) > 1e-3  # not a vacuous comparison
        for other in group[1:]:
            tol = 1e-12 * max(1.0, float(base.abs().max()))
            assert float((other.estimates - base).abs().max()) <= tol
    if matching:
        exact = ref_uniform_log_volume(dim, eps, sum_log(h))
        for res in results[:4]:
            check_zero_variance(res, exact, dim)


def test_uniform_diagonal_quadratic_unpreconditioned_directions_are_exact():
    # Without a preconditioner each direction's value is log A_D + D log R(w) - log D with
    # R(w) = sqrt(2 eps / w'Hw): check every direction exactly, reading w off the calls.
    dim, eps = 6, 0.05
    h = log_uniform(dim, 0.1, 10.0, seed=3)
    center = normal(dim, seed=4)
    calls: list[np.ndarray] = []
    res = run(
        recording(quadratic(h, center), center, calls),
        center,
        n_samples=40,
        cutoff=eps,
        measure="uniform",
    )
    check_common(res, n_samples=40, cutoff=eps)
    omegas = distinct_directions(calls)
    assert len(omegas) == 40
    with mp.workdps(DPS):
        expected = []
        for w in omegas:
            curv = mp_curvature(h, w)
            expected.append(
                float(ref_log_sphere_area(dim) + dim * mp.log(mp.sqrt(2 * eps / curv)))
                - math.log(dim)
            )
    got = np.sort(res.estimates.numpy())
    expected = np.sort(np.array(expected))
    tol = 1e-12 * max(1.0, float(np.abs(expected).max())) + dim * RTOL
    # directions are recovered from theta - theta0 in float64: ~1e-15 relative error
    assert np.max(np.abs(got - expected)) <= tol + 1e-12


# ------------------------------------------------------------------------ Gaussian, centred


GAUSSIAN_CENTRED = [
    # (D, x = eps / (h sigma^2)): log P(D/2, x) from ~ -0.5 down to ~ -1.1e8
    (2, 1.0),
    (2, 1e-3),
    (10, 5.0),
    (10, 1e-2),
    (1000, 500.0),
    (1000, 1.0),
    (10**5, 5e4 - 300.0),
    (10**5, 5e-6),
    (10**7, 5e6),
    (10**7, 5e-4),
]


@pytest.mark.parametrize(("dim", "x"), GAUSSIAN_CENTRED)
def test_gaussian_isotropic_centred_is_regularised_gamma(dim, x):
    sigma, h = 0.5, 3.0
    eps = x * h * sigma**2
    exact = float(ref_log_gamma_p(dim / 2, x))
    n_samples = 3 if dim >= 10**7 else 8
    center = torch.zeros(dim, dtype=F64)
    res = run(
        quadratic(h, center),
        center,
        n_samples=n_samples,
        cutoff=eps,
        measure="gaussian",
        sigma=sigma,
    )
    check_common(res, n_samples=n_samples, cutoff=eps)
    check_zero_variance(res, exact, dim)


def test_gaussian_centred_log_probabilities_span_the_required_range():
    # the parameter table above really covers log P from about -1 to below -1e6 (and -1e8)
    cases = [p.values if hasattr(p, "values") else p for p in GAUSSIAN_CENTRED]
    values = [float(ref_log_gamma_p(dim / 2, x)) for dim, x in cases]
    assert max(values) > -1.0
    assert min(values) < -1e8
    assert any(-1e7 < v < -1e6 for v in values)


# ------------------------------------------------------------------------ Gaussian, off-centre


def make_center(dim: int, norm: float, seed: int) -> torch.Tensor:
    c = normal(dim, seed)
    return c * (norm / torch.linalg.vector_norm(c))


NONCENTRAL = [
    # (D, |theta0|, sigma or None, radius / sigma, n_samples)
    (2, 1.0, 1.0, 1.2, 800),
    (2, 1.5, None, 0.8, 800),
    (2, 3.0, 1.0, 1e-3, 200),
    (5, 1.4, 0.7, 1.4, 800),
    (5, 2.0, None, 0.5, 600),
    (1000, 20.0, 1.0, 0.02, 60),
    (1000, 31.6, None, 0.02, 60),
    # more samples: a 5-standard-error test with a ~40x smaller standard error
    pytest.param(2, 1.0, 1.0, 1.2, 40000, marks=pytest.mark.slow),
    pytest.param(5, 1.4, 0.7, 1.4, 40000, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("dim", "norm_c", "sigma", "rho", "n_samples"), NONCENTRAL)
def test_gaussian_isotropic_off_centre_is_noncentral_chi2(dim, norm_c, sigma, rho, n_samples):
    center = make_center(dim, norm_c, seed=dim)
    sig = norm_c / math.sqrt(dim) if sigma is None else sigma  # sigma=None: RMS of the centre
    h = 2.0
    radius = rho * sig
    eps = h * radius**2 / 2
    lam = (norm_c / sig) ** 2
    exact = float(ref_log_ncx2_cdf(dim, lam, radius**2 / sig**2))
    res = run(
        quadratic(h, center),
        center,
        n_samples=n_samples,
        cutoff=eps,
        measure="gaussian",
        sigma=sigma,
    )
    check_common(res, n_samples=n_samples, cutoff=eps)

    # Each direction's value is a strictly increasing function of -w.theta0 in
    # [-|theta0|, |theta0|] (it is log A_D + log of the prior mass on the segment of length R).
    lo = float(ref_log_ray_gaussian(dim, sig, norm_c, norm_c, radius))
    hi = float(ref_log_ray_gaussian(dim, sig, norm_c, -norm_c, radius))
    tol = float_tol(hi, dim)
    assert float(res.estimates.min()) >= lo - tol
    assert float(res.estimates.max()) <= hi + tol

    # Unbiasedness: exp(estimate - exact) has mean 1 over uniform directions. The weights are
    # bounded (between exp(lo - exact) and exp(hi - exact)), so the sample mean is close to
    # normal with standard error std/sqrt(n); 5 standard errors is a ~6e-7 false-alarm rate
    # for this fixed seed (and the seed is fixed, so the test is deterministic).
    w = torch.exp(res.estimates - exact)
    se = float(w.std()) / math.sqrt(n_samples)
    assert abs(float(w.mean()) - 1.0) <= 5.0 * se + 1e-9, (float(w.mean()), se)
    # the spread is genuinely non-zero here, so the statistical test is not vacuous
    assert float(w.std()) > 0


@pytest.mark.parametrize(
    ("dim", "norm_c", "sigma"), [(2, 1.0, 1.0), (5, 2.0, None), (40, 6.0, 1.5)]
)
def test_gaussian_off_centre_every_direction_is_exact(dim, norm_c, sigma):
    # Read each direction w off the evaluations and compare the multiset of exact
    # per-direction values with res.estimates.
    center = make_center(dim, norm_c, seed=11)
    sig = norm_c / math.sqrt(dim) if sigma is None else sigma
    h, n_samples = 1.5, 25
    radius = 0.9 * sig
    eps = h * radius**2 / 2
    calls: list[np.ndarray] = []
    res = run(
        recording(quadratic(h, center), center, calls),
        center,
        n_samples=n_samples,
        cutoff=eps,
        measure="gaussian",
        sigma=sigma,
    )
    check_common(res, n_samples=n_samples, cutoff=eps)
    omegas = distinct_directions(calls)
    assert len(omegas) == n_samples
    c = center.numpy()
    expected = np.sort(
        [float(ref_log_ray_gaussian(dim, sig, norm_c, float(w @ c), radius)) for w in omegas]
    )
    got = np.sort(res.estimates.numpy())
    tol = float_tol(float(np.abs(expected).max()), dim) + 1e-12
    assert np.max(np.abs(got - expected)) <= tol


# ------------------------------------------------------------------------ Gaussian, anisotropic


def ref_log_prob_anisotropic_2d(h1, h2, eps, sigma):
    r"""D = 2, theta0 = 0: P = (1/2pi) \int_0^{2pi} (1 - exp(-R(phi)^2 / 2 sigma^2)) dphi."""
    with mp.workdps(DPS):
        h1, h2, eps, sigma = (mp.mpf(v) for v in (h1, h2, eps, sigma))

        def f(phi):
            r2 = 2 * eps / (h1 * mp.cos(phi) ** 2 + h2 * mp.sin(phi) ** 2)
            return -mp.expm1(-r2 / (2 * sigma**2))

        return mp.log(mp.quad(f, mp.linspace(0, mp.pi / 2, 5)) * 4 / (2 * mp.pi))


def ref_log_prob_axisymmetric_3d(h1, h3, eps, sigma):
    r"""D = 3, H = diag(h1, h1, h3), theta0 = 0; u = w_3 is uniform on [-1, 1]:

    P = \int_0^1 P(3/2, R(u)^2 / 2 sigma^2) du, P(3/2, x) = erf(sqrt x) - 2 sqrt(x/pi) e^-x.
    """
    with mp.workdps(DPS):
        h1, h3, eps, sigma = (mp.mpf(v) for v in (h1, h3, eps, sigma))

        def f(u):
            x = eps / ((h1 * (1 - u * u) + h3 * u * u) * sigma**2)
            return mp.erf(mp.sqrt(x)) - 2 * mp.sqrt(x / mp.pi) * mp.exp(-x)

        return mp.log(mp.quad(f, [0, 0.5, 1]))


ANISOTROPIC = [
    # (h, eps, sigma, preconditioned, n_samples)
    ((1.0, 25.0), 0.5, 1.0, False, 600),
    ((1.0, 25.0), 0.5, 1.0, True, 600),
    ((0.2, 3.0), 2e-3, 2.0, True, 300),
    ((1.0, 1.0, 16.0), 0.8, 1.0, False, 600),
    ((1.0, 1.0, 16.0), 0.8, 1.0, True, 600),
    ((4.0, 4.0, 0.05), 0.01, 0.5, True, 600),
    pytest.param((0.2, 3.0), 2e-3, 2.0, False, 30000, marks=pytest.mark.slow),
    pytest.param((1.0, 25.0), 0.5, 1.0, True, 30000, marks=pytest.mark.slow),
    pytest.param((1.0, 1.0, 16.0), 0.8, 1.0, False, 30000, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("h", "eps", "sigma", "preconditioned", "n_samples"), ANISOTROPIC)
def test_gaussian_anisotropic_centred_matches_direction_integral(
    h, eps, sigma, preconditioned, n_samples
):
    dim = len(h)
    if dim == 2:
        exact = float(ref_log_prob_anisotropic_2d(h[0], h[1], eps, sigma))
    else:
        exact = float(ref_log_prob_axisymmetric_3d(h[0], h[2], eps, sigma))
    h_t = torch.tensor(h, dtype=F64)
    center = torch.zeros(dim, dtype=F64)
    calls: list[np.ndarray] = []
    pre = h_t.rsqrt() if preconditioned else None
    res = run(
        recording(quadratic(h_t, center), center, calls),
        center,
        n_samples=n_samples,
        cutoff=eps,
        measure="gaussian",
        sigma=sigma,
        preconditioner=pre,
    )
    check_common(res, n_samples=n_samples, cutoff=eps, max_evals=None)

    # Per direction (checked on a subset): log P(D/2, R(w)^2/2 sigma^2) plus the importance
    # weight log(det P) + D log |P^-1 w| of the angular central Gaussian proposal.
    omegas = distinct_directions(calls[: 6 * 40])[:30]
    p = np.ones(dim) if pre is None else pre.numpy()
    estimates = res.estimates.numpy()
    with mp.workdps(DPS):
        for w in omegas:
            curv = mp_curvature(h, w)
            x = eps / (curv * sigma**2)
            value = ref_log_gamma_p(mp.mpf(dim) / 2, x)
            value += mp_log_importance_weight(p, w)
            tol = 1e-12 * max(1.0, abs(float(value))) + dim * RTOL
            assert np.min(np.abs(estimates - float(value))) <= tol

    # Unbiasedness of the aggregate (weights bounded, as the proposal density is bounded below
    # and the ray mass above): within 5 standard errors of the exp-space mean.
    wts = torch.exp(res.estimates - exact)
    se = float(wts.std()) / math.sqrt(n_samples)
    assert abs(float(wts.mean()) - 1.0) <= 5.0 * se, (float(wts.mean()), se)

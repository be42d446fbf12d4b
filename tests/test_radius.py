import math

import pytest

from basin_volume.radius import RayStatus, find_radius


def counted(f):
    calls = []

    def g(t):
        calls.append(t)
        return f(t)

    return g, calls


@pytest.mark.parametrize("power", [1.0, 2.0, 3.0, 4.5])
@pytest.mark.parametrize("guess_factor", [1e-4, 0.3, 1.0, 7.0, 1e5])
def test_power_law_converges_to_exact_root(power, guess_factor):
    c, eps = 3.7, 1e-2
    root = (eps / c) ** (1 / power)
    f, calls = counted(lambda t: c * t**power)
    res = find_radius(f, eps, guess=root * guess_factor, rtol=1e-10)
    assert res.status is RayStatus.CONVERGED
    assert res.radius == pytest.approx(root, rel=1e-9)
    # the returned value is the one that was checked
    assert res.radius == calls[-1] and res.delta == c * res.radius**power
    assert res.n_evals == len(calls)
    assert res.n_evals <= 12


def test_quadratic_from_slope_two_needs_two_evaluations():
    f, calls = counted(lambda t: 0.5 * 9.0 * t * t)
    res = find_radius(f, 0.02, guess=1.0, rtol=1e-12)
    assert res.n_evals == 2
    assert res.radius == pytest.approx(math.sqrt(2 * 0.02 / 9.0), rel=1e-14)


def test_linear_minus_term_finds_first_crossing_after_dip():
    # delta = -t + t^2/2 dips below zero first (a loss basin off the minimum)
    f, _ = counted(lambda t: -t + 0.5 * t * t)
    res = find_radius(f, 0.01, guess=1e-3, rtol=1e-12)
    assert res.status is RayStatus.CONVERGED
    assert res.radius == pytest.approx(1 + math.sqrt(1 + 2 * 0.01), rel=1e-10)


def test_unbounded_ray_is_reported_at_max_radius():
    res = find_radius(lambda t: 1e-3 * (1 - math.exp(-t)), 1e-2, guess=1.0, max_radius=1e4)
    assert res.status is RayStatus.UNBOUNDED
    assert res.radius == math.inf


def test_nan_beyond_a_radius_is_outside():
    f = lambda t: t * t if t < 0.5 else math.nan  # noqa: E731
    res = find_radius(f, 0.01, guess=10.0, rtol=1e-8)
    assert res.status is RayStatus.CONVERGED
    assert res.radius == pytest.approx(0.1, rel=1e-7)


def test_always_nan_is_nonfinite_not_a_crash():
    res = find_radius(lambda t: math.nan, 0.01, guess=1.0, max_evals=15)
    assert res.status is RayStatus.NONFINITE
    assert res.n_evals == 15


def test_jump_across_cutoff_is_discontinuous():
    res = find_radius(lambda t: 0.0 if t < 1.0 else 1.0, 0.01, guess=0.3, max_evals=200)
    assert res.status is RayStatus.DISCONTINUOUS
    assert res.radius == pytest.approx(1.0, rel=1e-12) and res.radius < 1.0


def test_budget_exhaustion_returns_a_checked_point():
    seen = {}

    def f(t):
        seen[t] = math.exp(t) - 1
        return seen[t]

    res = find_radius(f, 1.0, guess=1e-6, rtol=1e-15, max_evals=3)
    assert res.status is RayStatus.MAX_EVALS
    assert seen[res.radius] == res.delta


# ----------------------------------------------------------------------------- exact cutoff


def _search_points(f, eps, guess, rtol=1e-2, slope=2.0):
    from basin_volume.radius import find_radius

    res = find_radius(f, eps, guess=guess, rtol=rtol, slope=slope)
    assert res.status is RayStatus.CONVERGED
    assert [p[0] for p in res.points][-1] == res.radius and len(res.points) == res.n_evals
    return res


@pytest.mark.parametrize("guess_factor", [0.5, 0.97, 1.004, 1.3, 20.0])
def test_exact_cutoff_on_a_power_law_is_the_closed_form_root(guess_factor):
    """delta = c t^2 is a line in log-log space: interpolating or extrapolating it with its
    own slope gives the root to float precision, whatever the search stopped at."""
    from basin_volume.radius import exact_cutoff

    c, eps = 9.0 / 2, 0.02
    root = math.sqrt(eps / c)
    res = _search_points(lambda t: c * t * t, eps, root * guess_factor)
    cut = exact_cutoff(res.points, eps, slope=2.0, slope_spread=0.0, curvature=0.0)
    assert cut.radius == pytest.approx(root, rel=1e-13)
    assert cut.low <= cut.radius <= cut.high
    if guess_factor == 1.004:  # one evaluation, within rtol but not at the root
        assert res.n_evals == 1 and abs(res.radius / root - 1) > 1e-3


@pytest.mark.parametrize("b", [0.0, 0.3, 3.0, 30.0])
@pytest.mark.parametrize("guess_factor", [0.3, 0.9, 1.02, 4.0])
def test_exact_cutoff_interval_holds_the_true_root(b, guess_factor):
    """delta = t^2 + b t^3 (|g''| <= 1/4 <= M): the interval always holds the exact root, and
    is far narrower than the radius tolerance alone would give."""
    from basin_volume.radius import exact_cutoff

    eps = 1e-2
    f = lambda t: t * t + b * t**3  # noqa: E731
    lo, hi = 0.0, 1.0  # the exact root by bisection
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) < eps else (lo, mid)
    root = 0.5 * (lo + hi)
    res = _search_points(f, eps, root * guess_factor)
    cut = exact_cutoff(res.points, eps, slope=2.0 + b * root / (1 + b * root), slope_spread=0.5)
    assert cut.low * (1 - 1e-14) <= root <= cut.high * (1 + 1e-14)
    assert abs(math.log(cut.radius / root)) <= abs(math.log(res.radius / root)) + 1e-15
    if cut.bracketed:
        assert math.log(cut.high / cut.low) < 1e-3


def test_exact_cutoff_single_point_uses_the_learned_slope():
    from basin_volume.radius import exact_cutoff

    cut = exact_cutoff([(2.0, 0.0101)], 0.01, slope=3.0, slope_spread=0.1)
    assert not cut.bracketed
    assert cut.radius == pytest.approx(2.0 * (0.01 / 0.0101) ** (1 / 3), rel=1e-14)
    assert cut.low == pytest.approx(2.0 * (0.01 / 0.0101) ** (1 / 2.7), rel=1e-14)
    assert cut.high == pytest.approx(2.0 * (0.01 / 0.0101) ** (1 / 3.3), rel=1e-14)


def test_exact_cutoff_ignores_nonfinite_points_and_needs_one_finite():
    from basin_volume.radius import exact_cutoff

    assert exact_cutoff([(1.0, math.nan), (2.0, math.inf)], 0.01) is None
    cut = exact_cutoff([(1.0, 0.005), (3.0, math.nan), (2.0, 0.02)], 0.01, curvature=0.0)
    assert cut.bracketed and cut.radius == pytest.approx(math.sqrt(2.0), rel=1e-14)

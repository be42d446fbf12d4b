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

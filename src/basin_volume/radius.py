r"""Finding where a ray leaves the basin.

Along a unit direction :math:`\omega` the excess :math:`\delta(t) = f(\theta_0 + t\omega) -
f(\theta_0)` is close to quadratic near the centre, so :math:`\log\delta` is nearly linear in
:math:`\log t` with slope 2. :func:`find_radius` solves :math:`\delta(r) = \varepsilon` by
secant steps in log-log space (the slope re-estimated from the last two evaluations), kept
inside a bracket ``inside < r < outside``, and stops at the first evaluated radius with
:math:`|\delta(r) - \varepsilon| \le \mathrm{rtol}\cdot\varepsilon`. The radius it returns is
always one whose :math:`\delta` was evaluated, and that :math:`\delta` is returned with it, with
every point evaluated along the ray.

:func:`exact_cutoff` then places the radius where :math:`\delta` equals the cutoff *exactly*,
from those points, with an interval that contains it under a stated assumption: write
:math:`g(x) = \log\delta(e^x)`. Between two evaluated points on either side of the cutoff
(both checked) the root is found by linear interpolation of :math:`g` (log-log
interpolation); the error of a linear interpolant of a function with :math:`|g''| \le M` is at
most :math:`\tfrac M2 (x - x_a)(x_b - x)`, so the root moves by at most that over the slope
:math:`g'`, and never out of the bracket (which holds a crossing whenever :math:`\delta` is
continuous). From two points on one side the same formula bounds the secant's extrapolation.
From a single point the root is extrapolated with the slope learned from earlier directions,
and the bound is the distance to the cutoff times the relative uncertainty of that slope.
For :math:`\delta = \sum_p c_p t^p` with :math:`c_p \ge 0` (a quadratic basin with
higher-order terms), :math:`g''` is the variance of the exponent :math:`p` under weights
:math:`c_p t^p`, at most :math:`(p_{max} - p_{min})^2 / 4`: the default :math:`M = 1` covers
exponents from 2 to 4.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

__all__ = [
    "CutoffRadius",
    "RayResult",
    "RayStatus",
    "exact_cutoff",
    "find_radius",
    "log_log_curvature",
    "radius_search",
]

_MIN_SLOPE, _MAX_SLOPE = 0.1, 20.0  # range of the slope assumed before one is measured
_MAX_STEP = 1e3  # largest factor by which one step may grow or shrink the radius
_GROW_BLIND = 10.0  # growth factor when delta carries no scale information (delta <= 0)


class RayStatus(enum.StrEnum):
    """How the search along one direction ended."""

    CONVERGED = "converged"
    """|delta(r) - cutoff| <= rtol * cutoff at the returned radius."""
    UNBOUNDED = "unbounded"
    """delta stayed below the cutoff up to ``max_radius``: the returned radius is ``inf``
    (finite mass under the Gaussian measure; infinite volume under the uniform one)."""
    MAX_EVALS = "max_evals"
    """The evaluation budget ran out; the returned radius is the best bracket end."""
    DISCONTINUOUS = "discontinuous"
    """delta jumps across the cutoff between two radii equal to float precision; the inner
    one is returned."""
    NONFINITE = "nonfinite"
    """delta was never finite and below the cutoff at any radius tried. A radius at which
    theta0 + t*omega rounds to theta0 carries no information and counts as non-finite (the
    estimator's ray evaluators return NaN there), so a basin narrower than the float
    resolution of the centre ends here too; ``delta`` is then the last finite value seen
    (above the cutoff), and NaN when there was none."""


@dataclass(frozen=True)
class RayResult:
    """Outcome of :func:`find_radius` for one direction.

    Attributes
    ----------
    radius : float
        The radius returned (``inf`` when unbounded).
    delta : float
        delta evaluated at ``radius`` (the largest value seen below the cutoff when unbounded).
    n_evals : int
        Evaluations of delta spent on this direction.
    status : RayStatus
        How the search ended.
    slope : float
        Log-log slope d log delta / d log t measured near the end (``nan`` if unknown); a good
        starting slope for the next direction.
    points : tuple of (float, float)
        Every ``(t, delta)`` evaluated, in order (for :func:`exact_cutoff`).
    """

    radius: float
    delta: float
    n_evals: int
    status: RayStatus
    slope: float
    points: tuple[tuple[float, float], ...] = ()


def _finite_positive(d: float) -> bool:
    return math.isfinite(d) and d > 0


def _power_step(cutoff: float, d: float, k: float) -> float:
    """(cutoff / d) ** (1 / k), the step of the power-law model, limited to _MAX_STEP."""
    log_step = math.log(cutoff / d) / k
    return math.exp(min(max(log_step, -math.log(_MAX_STEP)), math.log(_MAX_STEP)))


def _linear_quadratic_root(p1, p2, cutoff: float) -> float:
    """Root of a t + b t^2 = cutoff for the model through (0, 0), p1 and p2; nan if none."""
    (t1, d1), (t2, d2) = p1, p2
    if t1 == t2:
        return math.nan
    b = (d2 / t2 - d1 / t1) / (t2 - t1)
    a = d1 / t1 - b * t1
    disc = a * a + 4.0 * b * cutoff
    if not (math.isfinite(disc) and disc >= 0):
        return math.nan
    if a > 0:
        return 2.0 * cutoff / (a + math.sqrt(disc))
    return (math.sqrt(disc) - a) / (2.0 * b) if b > 0 else math.nan


def find_radius(
    delta_at: Callable[[float], float],
    cutoff: float,
    *,
    guess: float,
    rtol: float = 1e-2,
    slope: float = 2.0,
    max_radius: float = math.inf,
    max_evals: int = 40,
) -> RayResult:
    r"""Find :math:`r > 0` with :math:`|\delta(r) - \varepsilon| \le \mathrm{rtol}\,\varepsilon`.

    Parameters
    ----------
    delta_at : callable
        ``delta_at(t) -> float``, the excess of the objective at distance ``t`` along the ray.
        Non-finite values are treated as outside the basin.
    cutoff, guess, rtol, slope, max_radius, max_evals
        As in :func:`radius_search`.

    Returns
    -------
    RayResult
    """
    search = radius_search(
        cutoff, guess=guess, rtol=rtol, slope=slope, max_radius=max_radius, max_evals=max_evals
    )
    t = next(search)
    while True:
        try:
            t = search.send(float(delta_at(t)))
        except StopIteration as stop:
            return stop.value


def radius_search(
    cutoff: float,
    *,
    guess: float,
    rtol: float = 1e-2,
    slope: float = 2.0,
    max_radius: float = math.inf,
    max_evals: int = 40,
) -> Generator[float, float, RayResult]:
    r"""The search of :func:`find_radius` as a generator, for evaluating many rays together.

    It yields each radius to evaluate and is sent back delta there; it returns (through
    ``StopIteration.value``) the :class:`RayResult`.

    Parameters
    ----------
    cutoff : float
        :math:`\varepsilon > 0`.
    guess : float
        First radius to evaluate (from earlier directions or from curvature).
    rtol : float
        Relative tolerance on delta at the returned radius.
    slope : float
        Assumed log-log slope until two evaluations measure it (2 for a quadratic basin).
    max_radius : float
        Radii beyond this are not tried; a ray still inside at ``max_radius`` is
        :attr:`RayStatus.UNBOUNDED`.
    max_evals : int
        Evaluation budget for this direction.

    Returns
    -------
    RayResult
    """
    lo_t, lo_d = 0.0, math.nan  # largest radius known inside (delta < cutoff)
    hi_t, hi_d = math.inf, math.nan  # smallest radius known outside (delta > cutoff or nan)
    last: tuple[float, float] | None = None  # previous evaluation with finite delta
    measured_slope = math.nan
    same_side, was_inside = 0, False  # consecutive evaluations on one side of the root
    widths: list[float] = []  # log widths of the bracket since the last bisection
    points: list[tuple[float, float]] = []
    t = min(max(guess, math.ulp(0.0)), max_radius)
    for n in range(1, max_evals + 1):
        d = float((yield t))
        points.append((t, d))
        if math.isfinite(d) and abs(d - cutoff) <= rtol * cutoff:
            if last is not None and _finite_positive(d) and _finite_positive(last[1]):
                k = math.log(d / last[1]) / math.log(t / last[0])  # the slope is learned
                measured_slope = k if math.isfinite(k) and k > 0 else measured_slope
            return RayResult(t, d, n, RayStatus.CONVERGED, measured_slope, tuple(points))
        inside = math.isfinite(d) and d < cutoff
        if inside and t >= max_radius:
            return RayResult(math.inf, d, n, RayStatus.UNBOUNDED, measured_slope, tuple(points))
        same_side = same_side + 1 if n > 1 and inside == was_inside else 0
        was_inside = inside
        if inside:
            lo_t, lo_d = t, d
        else:
            hi_t, hi_d = t, d
        if hi_t <= lo_t * (1.0 + 4.0 * math.ulp(1.0)):
            return RayResult(lo_t, lo_d, n, RayStatus.DISCONTINUOUS, measured_slope, tuple(points))

        if not math.isfinite(d):  # certainly outside, and no scale information: shrink
            factor = 1.0 / _GROW_BLIND
        elif last is not None and _finite_positive(d) and _finite_positive(last[1]):
            k = math.log(d / last[1]) / math.log(t / last[0])
            if math.isfinite(k) and k > 0:
                measured_slope = slope = k
                factor = _power_step(cutoff, d, k)
            else:
                factor = _power_step(cutoff, d, min(max(slope, _MIN_SLOPE), _MAX_SLOPE))
        elif last is not None:  # some delta <= 0: model delta = a t + b t^2 instead
            factor = _linear_quadratic_root(last, (t, d), cutoff) / t
        elif d > 0:
            factor = _power_step(cutoff, d, min(max(slope, _MIN_SLOPE), _MAX_SLOPE))
        else:
            factor = math.nan
        if not factor > 0:  # no usable model (delta <= 0 so far): grow
            factor = _GROW_BLIND
        last = (t, d) if math.isfinite(d) else last
        t_new = t * min(max(factor, 1.0 / _MAX_STEP), _MAX_STEP)
        if math.isfinite(hi_t) and lo_t > 0:
            # Stay strictly inside the bracket; bisect (in log space) when the model steps
            # out of it, keeps landing on one side (regula falsi stagnation), or has not
            # halved the bracket in two steps.
            widths.append(math.log(hi_t / lo_t))
            slow = len(widths) >= 3 and widths[-1] > 0.5 * widths[-3]
            if not lo_t < t_new < hi_t or same_side >= 2 or slow:
                t_new = math.sqrt(lo_t) * math.sqrt(hi_t)
                same_side = 0
                widths.clear()
        t = min(t_new, max_radius)
    if lo_t > 0 and math.isfinite(lo_d):
        best_t, best_d = lo_t, lo_d
        if math.isfinite(hi_d) and math.isfinite(hi_t) and abs(hi_d - cutoff) < abs(lo_d - cutoff):
            best_t, best_d = hi_t, hi_d
        return RayResult(
            best_t, best_d, max_evals, RayStatus.MAX_EVALS, measured_slope, tuple(points)
        )
    if math.isfinite(hi_d):
        return RayResult(hi_t, hi_d, max_evals, RayStatus.MAX_EVALS, measured_slope, tuple(points))
    seen = last[1] if last is not None else hi_d  # the last finite delta, all above the cutoff
    return RayResult(hi_t, seen, max_evals, RayStatus.NONFINITE, measured_slope, tuple(points))


@dataclass(frozen=True)
class CutoffRadius:
    """Where delta equals the cutoff along one ray, from :func:`exact_cutoff`.

    Attributes
    ----------
    radius : float
        The interpolated (or extrapolated) radius at which delta equals the cutoff.
    low, high : float
        An interval around ``radius`` that holds the crossing under the stated assumption
        (see the module docstring); never wider than an evaluated bracket.
    bracketed : bool
        Whether evaluated points on both sides of the cutoff were used.
    """

    radius: float
    low: float
    high: float
    bracketed: bool


def exact_cutoff(
    points: Sequence[tuple[float, float]],
    cutoff: float,
    *,
    slope: float = 2.0,
    slope_spread: float = 0.1,
    curvature: float = 1.0,
) -> CutoffRadius | None:
    r"""The radius where :math:`\delta` equals ``cutoff``, from a ray's evaluated points.

    Parameters
    ----------
    points : sequence of (float, float)
        Evaluated ``(t, delta)`` pairs (:attr:`RayResult.points`); non-finite and
        non-positive deltas are ignored.
    cutoff : float
        :math:`\varepsilon > 0`.
    slope : float
        Log-log slope assumed when a single point is known (learned from earlier directions).
    slope_spread : float
        Relative uncertainty of ``slope``: the slope between that point and the crossing is
        taken to lie within ``slope * (1 ± slope_spread)``.
    curvature : float
        :math:`M`, a bound on :math:`|d^2 \log\delta / d(\log t)^2|` near the crossing.

    Returns
    -------
    CutoffRadius or None
        ``None`` when no point has a finite positive delta.
    """
    pts = sorted((t, d) for t, d in points if t > 0 and math.isfinite(t) and _finite_positive(d))
    if not pts:
        return None
    outside = [(t, d) for t, d in pts if d > cutoff]
    inside = [(t, d) for t, d in pts if d <= cutoff and (not outside or t < outside[0][0])]
    y = math.log(cutoff)
    if inside and outside:  # a checked bracket: interpolate, within it
        (ta, da), (tb, db) = inside[-1], outside[0]
        xa, xb, ya, yb = math.log(ta), math.log(tb), math.log(da), math.log(db)
        if da == cutoff:
            return CutoffRadius(ta, ta, ta, True)
        k = (yb - ya) / (xb - xa)
        x = xa + (y - ya) / k
        err = 0.5 * curvature * (x - xa) * (xb - x) / k
        return CutoffRadius(math.exp(x), math.exp(max(xa, x - err)), math.exp(min(xb, x + err)),
                            True)  # fmt: skip
    side = inside if inside else outside
    near = sorted(side, key=lambda p: abs(math.log(p[1]) - y))[:2]
    if len(near) == 2 and near[0][1] != near[1][1] and near[0][0] != near[1][0]:
        (ta, da), (tb, db) = near
        xa, xb, ya, yb = math.log(ta), math.log(tb), math.log(da), math.log(db)
        k = (yb - ya) / (xb - xa)
        if math.isfinite(k) and k > 0:
            x = xa + (y - ya) / k
            err = 0.5 * curvature * abs((x - xa) * (x - xb)) / k
            return CutoffRadius(math.exp(x), math.exp(x - err), math.exp(x + err), False)
    t1, d1 = near[0]
    k = slope if math.isfinite(slope) and slope > 0 else 2.0
    step = (y - math.log(d1)) / k
    x = math.log(t1) + step
    ends = (math.log(t1) + step / (1 + slope_spread), math.log(t1) + step / (1 - slope_spread))
    lo, hi = min(ends), max(ends)
    return CutoffRadius(math.exp(x), math.exp(min(lo, x)), math.exp(max(hi, x)), False)


def log_log_curvature(points: Sequence[tuple[float, float]], cutoff: float) -> float:
    """:math:`d^2\\log\\delta / d(\\log t)^2` from the three evaluated points nearest the
    cutoff (a divided difference); ``nan`` with fewer than three finite positive points."""
    pts = [(t, d) for t, d in points if t > 0 and math.isfinite(t) and _finite_positive(d)]
    y = math.log(cutoff)
    near = sorted(sorted(pts, key=lambda p: abs(math.log(p[1]) - y))[:3])
    if len(near) < 3:
        return math.nan
    (x0, y0), (x1, y1), (x2, y2) = ((math.log(t), math.log(d)) for t, d in near)
    if not x0 < x1 < x2:
        return math.nan
    return 2.0 * ((y2 - y1) / (x2 - x1) - (y1 - y0) / (x1 - x0)) / (x2 - x0)

r"""Running the SMC sampler of :mod:`basin_volume.smc` on an objective: ``estimate(method="smc")``.

The sampler asks for the radii of batches of directions; :func:`search_radii` finds them with
the lockstep searches of :func:`basin_volume.radius.radius_search` (several points per call of
``batch_fn``) and returns, for each direction, the radius where :math:`\delta` equals the cutoff
*exactly*: the search stops within ``rtol`` of the cutoff, and the first crossing is then
probed from both sides until the log-log interpolation between the evaluated points is sure
to 0.01 nats of the ray's mass (:func:`_polish`). A relative radius error :math:`\Delta r/r`
moves a direction's log-estimate by up to :math:`D\,\Delta r/r`, so this matters: at
:math:`D = 10^5`, ``rtol = 1e-2`` alone would be worth hundreds of nats, and where
:math:`\delta` runs flat near the cutoff (a network's KL near saturation) a radius
extrapolated from one side came out long often enough to bias the estimate up.

:func:`estimate_smc` runs independent replicas (seeds ``(seed, k)``) and pools them into one
:class:`~basin_volume.result.VolumeResult` whose interval comes from the replicas' spread.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .curvature import EVALS_PER_GRADIENT, CurvatureProposal, gradients
from .directions import direction_seed
from .integrals import log_sphere_area
from .preconditioners import DiagonalPreconditioner, as_preconditioner
from .projected_normal import ProjectedNormal
from .radius import RayStatus, log_log_curvature, radius_search
from .rays import DenseRays
from .result import VolumeResult, warn_every_time
from .smc import GradientRequest, Radii, smc_sampler
from .smc_base import SMCRun, _Path

__all__ = ["BudgetExhausted", "BudgetTooSmall", "estimate_smc", "search_radii"]


_SEGMENT_POINTS = 8  # points checked inside a flattening ray's radius
_CHECK_SLOPE = 1.5  # rays whose delta grows slower than t^1.5 somewhere are checked
_CHECK_GAP = 2.0  # and rays whose evaluated points leave a wider gap than this factor
_GRAZE = 0.9  # local maxima of delta above this fraction of the cutoff are refined
_GOLDEN_STEPS = 8
_BISECTIONS = 40
_SUBDIVIDE = 3  # halvings of a flat stretch of the segment near the cutoff
_RADIUS_NATS = 0.01  # a crossing is placed to this much of its ray's log-mass
_UNCHECKED_SHARE = 0.05  # of a batch's importance weight, left to rays not checked
_POLISH_ROUNDS = 8
_CURVATURE_SPAN = 0.2  # log radii around a root whose points measure log delta's curvature
_CURVATURE_GAP = 1e-3  # least spacing of those points (closer ones measure rounding)
_PILOT = 16  # particles of the run that measures a replica's cost under a budget
_BUDGET_SHARE = 0.7  # of the budget left after the pilot, planned for the replicas


class BudgetExhausted(RuntimeError):
    """The evaluation budget ran out before the sampler finished."""


class BudgetTooSmall(BudgetExhausted):
    """The pilot run showed that the budget cannot fit the replicas; ``spent`` is what the
    run used up to then (``method="auto"`` goes on with importance sampling)."""

    def __init__(self, message: str, spent: int):
        super().__init__(message)
        self.spent = spent


def _fit_to_budget(replica, spent, moved, *, budget: int, replicas: int, n_particles: int,
                   seed: int) -> tuple[SMCRun, dict]:
    r"""Particles per replica that fit ``budget``: a pilot run of :data:`_PILOT` particles
    measures the evaluations one particle costs over a whole run, :math:`c`, and the replicas
    get :math:`n = \min(n_\text{particles}, \lfloor s\,(B - \text{spent}) / (R c)\rfloor)`,
    :math:`s` = :data:`_BUDGET_SHARE` (a run's cost varies with its number of levels).

    A run's cost grows with its particles a little faster than in proportion (a small run's
    effective sample sizes miss some of the weights' spread and it takes fewer levels), hence
    the share; where it still runs out, :func:`estimate_smc` pools the replicas that
    finished. ``moved()`` counts the evaluations that grow with the particles (``spent()``
    also holds one-off costs such as the curvature proposal's, which the pilot may pay).
    Returns the pilot run and the sizing record (``meta["budget_sizing"]``); raises
    :class:`BudgetTooSmall` when not even :data:`_PILOT` particles per replica fit.
    """
    before, scaling = spent(), moved()
    pilot = replica(_PILOT, direction_seed(seed, 0, 1),
                    f"the pilot run of {_PILOT} particles that sizes the replicas to it")
    cost = max(moved() - scaling, 1) / _PILOT
    left = budget - spent()
    n = min(n_particles, int(_BUDGET_SHARE * left / (replicas * cost)))
    if n < _PILOT:
        need = math.ceil(replicas * _PILOT * cost / _BUDGET_SHARE) + spent() - before
        raise BudgetTooSmall(
            f"budget={budget} evaluations do not fit {replicas} SMC replicas of {_PILOT} "
            f"particles: a particle costs about {cost:.0f} evaluations over a run here (a "
            f"pilot run of {_PILOT} particles spent {spent() - before}), so they need a budget "
            f"of about {need}; raise budget, lower replicas, or use method='is'",
            spent(),
        )
    return pilot, {"particles": n, "pilot_evals": spent() - before,
                   "evals_per_particle": cost}


def _cutoff_radius(history: list[tuple[float, float]], cutoff: float, t: float, d: float,
                   slope: float) -> float:
    """The radius where delta = cutoff, from the evaluated ``(t, delta)`` pairs of one ray."""
    inside = [(ti, di) for ti, di in history if math.isfinite(di) and 0 < di <= cutoff]
    outside = [(ti, di) for ti, di in history if math.isfinite(di) and di > cutoff]
    if inside and outside:
        (t_lo, d_lo), (t_hi, d_hi) = max(inside), min(outside)
        if t_lo < t_hi and d_lo < d_hi:
            frac = math.log(cutoff / d_lo) / math.log(d_hi / d_lo)
            return t_lo * math.exp(frac * math.log(t_hi / t_lo))
    if not (math.isfinite(d) and d > 0):
        return t
    k = slope if math.isfinite(slope) and slope > 0 else 2.0
    return t * math.exp(math.log(cutoff / d) / k)


def search_radii(
    rays: DenseRays,
    omegas: torch.Tensor,
    guesses: torch.Tensor,
    slopes: torch.Tensor,
    *,
    f0: float,
    cutoff: float,
    rtol: float,
    max_radius: float,
    max_evals: int,
    batch_size: int,
    check: bool = False,
    log_mass: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    weights: torch.Tensor | None = None,
) -> dict:
    r"""Radius searches for every row of ``omegas`` in lockstep.

    The pending radii are evaluated through ``rays`` (:meth:`DenseRays.values_at_many`),
    ``batch_size`` points per call. With ``check`` every converged ray's segment is checked
    for an earlier crossing (:func:`_first_crossings`), else only those :func:`_unchecked`
    flags and, with ``weights`` (per-ray offsets of the log importance weight
    :math:`\log w = \mathrm{log\_mass}(\omega, r) + \text{offset}`), those
    :func:`_heaviest` picks; then every converged crossing is probed from both sides until
    its log-log root is sure to :data:`_RADIUS_NATS` of the ray's log-mass (:func:`_polish`),
    and it is the radius returned. With ``check`` or ``weights`` flat stretches near the
    cutoff are also subdivided (moves seek out long radii, and the heaviest rays are the long
    ones). ``log_mass(omegas, t)`` is the log of
    each ray's mass up to ``t`` (up to a constant per ray; default Lebesgue,
    :math:`D\log t`): the evaluations go where the mass is. Returns a dict of per-direction
    tensors: ``radius`` (where delta equals the cutoff; ``inf`` if unbounded), ``slope``,
    ``n_evals`` and the list ``status``.
    """
    if log_mass is None:
        def log_mass(om, t):
            return om.shape[1] * torch.log(t)

    def mass(rows: list[int], t: list[float]) -> list[float]:
        if not rows:
            return []
        return log_mass(omegas[rows], torch.tensor(t, dtype=torch.float64)).tolist()

    rays.aim(omegas)
    searches = [
        radius_search(
            cutoff,
            guess=float(guesses[k]),
            rtol=rtol,
            slope=float(slopes[k]) if math.isfinite(float(slopes[k])) else 2.0,
            max_radius=max_radius,
            max_evals=max_evals,
        )
        for k in range(omegas.shape[0])
    ]
    pending = {k: next(s) for k, s in enumerate(searches)}
    results: list = [None] * len(searches)
    history: list[list[tuple[float, float]]] = [[] for _ in searches]
    while pending:
        pairs = list(pending.items())
        values = _values(rays, pairs, batch_size)
        for (k, t), v in zip(pairs, values, strict=True):
            d = v - f0
            history[k].append((t, d))
            try:
                pending[k] = searches[k].send(d)
            except StopIteration as stop:
                results[k] = stop.value
                del pending[k]
    radius = [
        _cutoff_radius(history[k], cutoff, res.radius, res.delta, res.slope)
        if res.status == RayStatus.CONVERGED
        else 0.0  # no point of the ray is known to be inside: no mass, as in estimate()
        if res.status == RayStatus.NONFINITE
        else res.radius
        for k, res in enumerate(results)
    ]
    n_evals = [r.n_evals for r in results]
    heavy = set() if weights is None else _heaviest(
        log_mass(omegas, torch.tensor(radius, dtype=torch.float64)) + weights)
    suspect = [
        k for k, res in enumerate(results)
        if res.status == RayStatus.CONVERGED
        and (check or k in heavy or _unchecked(history[k], res.radius))
    ]
    if suspect:
        found = _first_crossings(rays, {k: radius[k] for k in suspect}, history, f0=f0,
                                 cutoff=cutoff, rtol=rtol,
                                 mass=mass if check or heavy else None, batch_size=batch_size)
        for k, (r, spent) in found.items():
            radius[k] = r
            n_evals[k] += spent
    converged = [k for k, res in enumerate(results) if res.status == RayStatus.CONVERGED]
    polished = _polish(rays, converged, history, f0=f0, cutoff=cutoff, mass=mass,
                       batch_size=batch_size)
    for k, (r, spent) in polished.items():
        radius[k] = r
        n_evals[k] += spent
    rays.restore()
    return {
        "radius": torch.tensor(radius, dtype=torch.float64),
        "slope": torch.tensor([r.slope for r in results], dtype=torch.float64),
        "n_evals": torch.tensor(n_evals, dtype=torch.int64),
        "status": [str(r.status) for r in results],
    }


def _first_crossings(rays, radius: dict[int, float], history, *, f0, cutoff, rtol, mass,
                     batch_size) -> dict[int, tuple[float, int]]:
    r"""Check that the crossings found are the first ones; move them back where not.

    A search that stepped over a bump of :math:`\delta` (it rises above the cutoff, then falls
    back) has found a later crossing, and the basin is star-shaped only up to the first. The
    rays checked here are those where a bump could hide (:func:`_unchecked`). Each is
    evaluated at :data:`_SEGMENT_POINTS` evenly spaced points inside its radius. With
    ``mass(rows, t)`` (the rays' log-masses), stretches where :math:`\delta` runs flat within
    :data:`_GRAZE` of the cutoff (:func:`_flat_stretches`) and that hold over
    :data:`_RADIUS_NATS` of the ray's mass are halved, :data:`_SUBDIVIDE` times. Every local
    maximum of :math:`\delta` within :data:`_GRAZE` of the cutoff is refined by golden
    sections; where a point is outside, the crossing is searched again by bisection below the
    first such point. Returns ``{ray: (radius, evaluations spent)}``.
    """
    m = _SEGMENT_POINTS
    pairs = [(k, r * j / (m + 1)) for k, r in radius.items() for j in range(1, m + 1)]
    values = _values(rays, pairs, batch_size)
    out = {k: (r, m) for k, r in radius.items()}
    for (k, t), v in zip(pairs, values, strict=True):
        history[k].append((t, v - f0))
    # Where delta runs flat close to the cutoff, a bump can cross it between grid points
    # without showing as a local maximum: halve such stretches (_SUBDIVIDE times).
    # Only where a crossing would matter (the ray's mass along the stretch is over
    # _RADIUS_NATS) and only for rays that moves proposed (``mass`` given): a move seeks out
    # the rays whose radius came out long and keeps them.
    for _ in range(_SUBDIVIDE if mass is not None else 0):
        flat = [(k, ta, tb) for k, r in radius.items()
                for ta, tb in _flat_stretches(history[k], r, cutoff)]
        ks = [k for k, _, _ in flat]
        heavy = zip(flat, mass(ks, [tb for *_, tb in flat]), mass(ks, [ta for _, ta, _ in flat]),
                    strict=True)
        mids = [(k, 0.5 * (ta + tb)) for (k, ta, tb), m_b, m_a in heavy
                if m_b - m_a > _RADIUS_NATS]
        for (k, t), v in zip(mids, _values(rays, mids, batch_size), strict=True):
            history[k].append((t, v - f0))
            out[k] = (out[k][0], out[k][1] + 1)
    # A bump that only grazes the cutoff falls between grid points: refine every local
    # maximum of the points seen that comes within _GRAZE of the cutoff (golden sections).
    peaks = {}
    for k, r in radius.items():
        pts = sorted((t, d) for t, d in history[k] if t < r and math.isfinite(d))
        for i in range(1, len(pts) - 1):
            (t0, d0), (t1, d1), (t2, d2) = pts[i - 1], pts[i], pts[i + 1]
            if d1 >= d0 and d1 >= d2 and _GRAZE * cutoff <= d1 <= cutoff:
                peaks[(k, i)] = (t0, t1, t2, d1)  # bracket, and delta at its middle
    for _ in range(_GOLDEN_STEPS):
        if not peaks:
            break
        probes = []
        for key, (a, b, c, _) in peaks.items():
            probes.append((key, b + 0.382 * (c - b) if c - b > b - a else b - 0.382 * (b - a)))
        values = _values(rays, [(key[0], t) for key, t in probes], batch_size)
        for (key, t), v in zip(probes, values, strict=True):
            k, d = key[0], v - f0
            history[k].append((t, d))
            out[k] = (out[k][0], out[k][1] + 1)
            a, b, c, d_b = peaks[key]
            if d > cutoff or not math.isfinite(d):
                del peaks[key]  # outside: found what we looked for
            elif d > d_b:
                peaks[key] = (b, t, c, d) if t > b else (a, t, b, d)
            else:
                peaks[key] = (a, b, t, d_b) if t > b else (t, b, c, d_b)
    brackets = {}
    for k in radius:
        for t, d in sorted(history[k]):
            if t < radius[k] and not d <= cutoff:  # nan counts as outside
                below = [ti for ti, di in history[k] if ti < t and 0 <= di <= cutoff]
                brackets[k] = [max(below, default=0.0), t]
                break
    for _ in range(_BISECTIONS):
        if not brackets:
            break
        pairs = [(k, 0.5 * (lo + hi)) for k, (lo, hi) in brackets.items()]
        for (k, t), v in zip(pairs, _values(rays, pairs, batch_size), strict=True):
            d = v - f0
            history[k].append((t, d))
            out[k] = (out[k][0], out[k][1] + 1)
            brackets[k][0 if d <= cutoff else 1] = t
            if abs(d - cutoff) <= rtol * cutoff or brackets[k][1] - brackets[k][0] < 1e-9 * t:
                hi = brackets.pop(k)[1]
                below = [(ti, di) for ti, di in history[k] if ti <= hi]
                out[k] = (_cutoff_radius(below, cutoff, t, d, 2.0), out[k][1])
    for k, (lo, _hi) in brackets.items():  # not converged: the inner bracket end
        out[k] = (lo, out[k][1])
    return out


def _ray_log_mass(center: torch.Tensor, sigma: float | None):
    r"""``log_mass(omegas, t)`` of :func:`search_radii` for the target measure: Lebesgue, or
    :math:`N(0, \sigma^2 I)` (:meth:`basin_volume.smc_base._Path.log_mass`)."""
    theta0 = center.detach().to("cpu", torch.float64)
    a1 = 0.0 if sigma is None else 1.0 / sigma**2
    path = _Path(theta0.numel(), a1, float(theta0 @ theta0))
    return lambda om, t: path.log_mass(a1, t, om @ theta0)


def _first_bracket(history: list[tuple[float, float]], cutoff: float):
    """``(t_in, t_out)`` around the first crossing among the evaluated points: the last point
    inside before the first one outside (NaN counts as outside), and that one (``None`` if
    there is none). ``t_in`` is 0 when no point before it is inside."""
    t_in = 0.0
    for t, d in sorted(history):
        if not d <= cutoff:
            return t_in, t
        if d > 0:
            t_in = t
    return t_in, None


def _polish(rays, rays_left: list[int], history, *, f0, cutoff, mass,
            batch_size) -> dict[int, tuple[float, int]]:
    r"""Evaluate each ray near its first crossing until the log-log root is sure to
    :data:`_RADIUS_NATS` of the ray's log-mass, from both sides.

    A search stops once :math:`|\delta - \varepsilon| \le \mathrm{rtol}\cdot\varepsilon`,
    and where :math:`\delta` is flat near the cutoff (log-log slope k well below 2) that leaves
    the radius uncertain by :math:`\mathrm{rtol}/k`, which moves a direction's log-mass by
    :math:`s\,\mathrm{rtol}/k` nats, :math:`s = d\log I/d\log r` (D for Lebesgue measure).
    Extrapolation from one side does not remove it, and a sampler that prefers long radii
    turns it into an upward bias. Between bracket ends :math:`x_a < x < x_b` (log radii) the
    interpolated root is off by at most :math:`\tfrac M2 (x - x_a)(x_b - x)/k`
    (:func:`basin_volume.radius.exact_cutoff`), :math:`M` a bound on
    :math:`|d^2\log\delta/d(\log t)^2|` there, measured from the ray's own points
    (:func:`_curvature`): a KL that saturates bends its log-log curve by tens, and with
    M = 1 the root came out up to 0.2 nats long in D = 500, always long where
    :math:`\delta` is concave. Each round, a ray whose bound is over
    :math:`\tau = ` :data:`_RADIUS_NATS`:math:`/s` (at most 0.1) is probed at
    :math:`x \pm \tau/3` on the side of its farther end (the open side when it has none),
    which shrinks one factor of the bound to :math:`\tau/3`. ``mass(rows, t)`` gives the
    rays' log-masses. Returns ``{ray: (radius, evaluations spent)}``: the root from all the
    points evaluated, the segment check's included.
    """
    spent = {}
    h = 1e-3
    for _ in range(_POLISH_ROUNDS):
        open_ = []
        for k in rays_left:
            t_in, t_out = _first_bracket(history[k], cutoff)
            if t_in > 0:
                open_.append((k, t_in, t_out, math.log(_root(history[k], cutoff))))
        ks = [k for k, *_ in open_]
        up = mass(ks, [math.exp(x + h) for *_, x in open_])
        down = mass(ks, [math.exp(x - h) for *_, x in open_])
        probes = []
        for (k, t_in, t_out, x), m_up, m_down in zip(open_, up, down, strict=True):
            tau = min(_RADIUS_NATS * 2 * h / max(m_up - m_down, 1e-300), 0.1)
            xa = math.log(t_in)
            d = dict(history[k])
            if t_out is None or not math.isfinite(d[t_out]):
                far = x + tau / 3 if t_out is None else 0.5 * (x + math.log(t_out))
                probes.append((k, math.exp(far)))
                continue
            xb = math.log(t_out)
            slope = math.log(d[t_out] / d[t_in]) / (xb - xa)
            if 0.5 * _curvature(history[k], x, cutoff) * (x - xa) * (xb - x) / slope <= tau:
                continue
            far = x + tau / 3 if xb - x > x - xa else x - tau / 3
            probes.append((k, math.exp(min(max(far, xa + 0.5 * (x - xa)), xb - 0.5 * (xb - x)))))
        if not probes:
            break
        for (k, t), v in zip(probes, _values(rays, probes, batch_size), strict=True):
            history[k].append((t, v - f0))
            spent[k] = spent.get(k, 0) + 1
    return {k: (_root(history[k], cutoff), spent.get(k, 0)) for k in rays_left
            if _first_bracket(history[k], cutoff)[0] > 0}


def _curvature(history: list[tuple[float, float]], x: float, cutoff: float) -> float:
    r"""A bound :math:`M \ge 1` on :math:`|d^2\log\delta/d(\log t)^2|` near the log root
    ``x``: twice the second divided difference of :math:`\log\delta`
    (:func:`basin_volume.radius.log_log_curvature`) over three evaluated points within
    :data:`_CURVATURE_SPAN` of it (the outermost two and the one nearest the root, each pair
    at least :data:`_CURVATURE_GAP` apart: closer ones measure rounding), or 1 without such
    points."""
    pts = sorted((t, v) for t, v in history if t > 0 and math.isfinite(v) and v > 0
                 and abs(math.log(t) - x) <= _CURVATURE_SPAN)
    if len(pts) < 3:
        return 1.0
    middle = min(pts[1:-1], key=lambda p: abs(math.log(p[0]) - x))
    three = [pts[0], middle, pts[-1]]
    if min(math.log(b[0] / a[0]) for a, b in zip(three, three[1:], strict=False)) < _CURVATURE_GAP:
        return 1.0
    return max(1.0, 2 * abs(log_log_curvature(three, cutoff)))


def _root(history: list[tuple[float, float]], cutoff: float) -> float:
    """The log-log root of the first crossing: interpolated between its bracket ends, or,
    without a finite outer end, extrapolated from the inner end with the slope of the last two
    inside points (clamped to [0.1, 20], never past the outer end)."""
    t_in, t_out = _first_bracket(history, cutoff)
    d = dict(history)
    d_in = d[t_in]
    if t_out is not None and math.isfinite(d[t_out]):
        frac = math.log(cutoff / d_in) / math.log(d[t_out] / d_in)
        return t_in * math.exp(frac * math.log(t_out / t_in))
    prev = [(t, v) for t, v in history if t < t_in and math.isfinite(v) and v > 0]
    k = 2.0
    if prev:
        t_p, d_p = max(prev)
        if d_p < d_in:
            k = min(max(math.log(d_in / d_p) / math.log(t_in / t_p), 0.1), 20.0)
    x = math.log(t_in) + min(math.log(cutoff / d_in) / k, math.log(1e3))
    return math.exp(x if t_out is None else min(x, math.log(t_out)))


def _heaviest(log_w: torch.Tensor) -> set[int]:
    r"""The rays, heaviest first, that leave at most :data:`_UNCHECKED_SHARE` of the total
    weight :math:`\sum_k e^{\log w_k}` to the others.

    A missed earlier crossing can only lower a ray's weight, so whatever the unchecked rays
    miss lowers the estimate by at most :math:`-\log(1 - s)` nats, :math:`s` the share;
    and only the few rays whose :math:`\delta` has a bump miss anything."""
    log_w = torch.nan_to_num(log_w, nan=-math.inf)
    if not torch.isfinite(log_w).any():
        return set()
    order = torch.argsort(log_w, descending=True)
    share = torch.softmax(log_w[order], 0)
    left = 1.0 - torch.cumsum(share, 0)  # weight outside the first i + 1 rays
    n = int((left > _UNCHECKED_SHARE).sum()) + 1
    return set(order[:n].tolist())


def _flat_stretches(history: list[tuple[float, float]], radius: float, cutoff: float):
    """Intervals between consecutive evaluated points below ``radius`` (its crossing counted
    as a point at the cutoff) that come within :data:`_GRAZE` of the cutoff and along which
    delta grows slower than :math:`t^{1.5}` (:data:`_CHECK_SLOPE`)."""
    pts = sorted((t, d) for t, d in history if 0 < t < radius and math.isfinite(d) and d > 0)
    pts.append((radius, cutoff))
    return [
        (ta, tb) for (ta, da), (tb, db) in zip(pts, pts[1:], strict=False)
        if max(da, db) >= _GRAZE * cutoff
        and math.log(db / da) < _CHECK_SLOPE * math.log(tb / ta)
    ]


def _unchecked(history: list[tuple[float, float]], radius: float) -> bool:
    """Whether the evaluated points hint at a bump below ``radius``: two of them leave a gap
    wider than a factor :data:`_CHECK_GAP` (a search that jumped), or delta grows slower than
    :math:`t^{1.5}` between two of them (:data:`_CHECK_SLOPE`; a quadratic basin grows like
    :math:`t^2`). A ray evaluated only near its crossing is not checked: the check is a
    heuristic, not a guarantee of the first crossing."""
    pts = sorted((t, d) for t, d in history if 0 < t <= radius and math.isfinite(d) and d > 0)
    for (t1, d1), (t2, d2) in zip(pts, pts[1:], strict=False):
        too_flat = t2 > t1 and math.log(d2 / d1) < _CHECK_SLOPE * math.log(t2 / t1)
        if t2 > _CHECK_GAP * t1 or too_flat:
            return True
    return False


def _values(rays, pairs, batch_size: int) -> list[float]:
    return [
        v
        for i in range(0, len(pairs), batch_size)
        for v in rays.values_at_many(pairs[i : i + batch_size])
    ]


def estimate_smc(
    rays: DenseRays,
    *,
    n_particles: int,
    replicas: int,
    n_moves: int | None,
    cutoff: float,
    sigma: float,
    measure: str,
    preconditioner,
    rtol: float,
    seed: int,
    progress: bool,
    max_evals: int,
    max_radius: float,
    budget: int | None,
    batch_size: int,
    first_guess: float,
    meta: dict,
    start: ProjectedNormal | CurvatureProposal | None = None,
    fn=None,
    bidirectional: bool = False,
) -> VolumeResult:
    """:func:`basin_volume.estimate` with ``method="smc"``; the arguments are documented there.

    ``rays`` evaluates the objective around the centre; the settings are already validated
    and resolved (``sigma`` is ``nan`` for the uniform measure). ``start`` is the informed proposal
    the sampler may temper from (default: the preconditioner's); a
    :class:`~basin_volume.curvature.CurvatureProposal`'s evaluations count against ``budget``.
    With ``fn`` (the objective, differentiable by :mod:`torch.func`) the moves are steered by
    its gradient at the rays' walls, each counted as
    :data:`~basin_volume.curvature.EVALS_PER_GRADIENT` evaluations; where it turns out not to
    be differentiable they go without.
    """
    pre = as_preconditioner(preconditioner, rays.dim)
    if pre is not None and not isinstance(pre, DiagonalPreconditioner):
        raise ValueError(
            "method='smc' takes a preconditioner of per-parameter scales (a 1-D tensor); "
            f"got {type(pre).__name__}; use method='is' for dense or stretched proposals"
        )
    if pre is not None:
        start = ProjectedNormal(pre.scales.square())
    f0 = rays.value_at_center()
    if not math.isfinite(f0):
        raise ValueError(f"fn(center) is {f0}; the objective must be finite at the centre")
    started = time.perf_counter()
    searched = 0
    failures = {}
    wall_gradients = _WallGradients(fn, rays, batch_size)
    log_mass = _ray_log_mass(rays.center, sigma if measure == "gaussian" else None)

    def moved() -> int:  # evaluations that grow with the particles
        return searched + EVALS_PER_GRADIENT * wall_gradients.count

    def spent() -> int:
        return moved() + getattr(start, "evals", 0)

    def replica(n: int, run_seed: int, what: str) -> SMCRun:
        """One SMC run of ``n`` particles, its requests answered; raises
        :class:`BudgetExhausted` once the evaluations pass ``budget``."""
        nonlocal searched
        sampler = smc_sampler(
            rays.center,
            sigma=sigma if measure == "gaussian" else None,
            n_particles=n,
            n_moves=n_moves,
            seed=run_seed,
            start=start,
            gradients=fn is not None,
            bidirectional=bidirectional,
        )
        request = next(sampler)
        while True:
            if isinstance(request, GradientRequest):
                reply = wall_gradients(request)
            else:
                known = torch.isfinite(request.guesses) & (request.guesses > 0)
                guesses = torch.where(known, request.guesses, first_guess)
                found = search_radii(
                    rays, request.omegas, guesses, request.slopes, f0=f0,
                    cutoff=cutoff * request.level,
                    rtol=rtol, max_radius=max_radius, max_evals=max_evals,
                    batch_size=batch_size, check=request.check, log_mass=log_mass,
                    weights=request.weights,
                )
                searched += int(found["n_evals"].sum())
                for st in found["status"]:
                    if st not in ("converged", "unbounded"):
                        failures[st] = failures.get(st, 0) + 1
                reply = Radii(found["radius"], found["slope"])
            if budget is not None and spent() > budget:
                raise BudgetExhausted(
                    f"budget={budget} evaluations ran out in {what}; raise budget, or lower "
                    "n_samples (particles per replica) or replicas"
                )
            bar.set_postfix(evals=spent())
            try:
                request = sampler.send(reply)
            except StopIteration as stop:
                return stop.value

    bar = tqdm(total=replicas, disable=not progress, desc="SMC replicas", unit="replica")
    runs, sizing = [], None
    try:
        if budget is not None and n_particles > _PILOT:
            pilot, sizing = _fit_to_budget(replica, spent, moved, budget=budget,
                                           replicas=replicas, n_particles=n_particles, seed=seed)
            n_particles = sizing["particles"]
            if n_particles == _PILOT:  # the pilot is then a replica like the others
                runs.append(pilot)
                bar.update(1)
        for rep in range(len(runs), replicas):
            try:
                runs.append(replica(n_particles, direction_seed(seed, rep),
                                    f"SMC replica {rep + 1} of {replicas}"))
            except BudgetExhausted:
                if len(runs) < 2:
                    raise
                warn_every_time(
                    f"budget={budget} evaluations ran out in SMC replica {rep + 1} of "
                    f"{replicas}; the estimate pools the {len(runs)} that finished (its "
                    "interval is wider); raise budget for all of them",
                    RuntimeWarning, stacklevel=4,
                )
                sizing = {**(sizing or {}), "replicas_finished": len(runs)}
                break
            bar.update(1)
    finally:
        bar.close()
        rays.restore()
    meta = {**meta, "curvature_evals": getattr(start, "evals", 0),
            "gradients": wall_gradients.count}
    if sizing is not None:
        meta["budget_sizing"] = sizing
    return _assemble(runs, failures, spent(), dim=rays.dim, measure=measure, cutoff=cutoff,
                     sigma=sigma, rtol=rtol, seed=seed, f0=f0, started=started, meta=meta)


class _WallGradients:
    """Answers :class:`GradientRequest`: the objective's gradient at
    :math:`\\theta_0 + r\\omega` (zero rows for unbounded rays), or ``None`` from the first time
    it proves not differentiable by :mod:`torch.func` (an error, or gradients that are all
    zero). ``count`` is how many it computed."""

    def __init__(self, fn, rays: DenseRays, batch_size: int):
        self.fn, self.rays, self.batch_size, self.count = fn, rays, batch_size, 0

    def __call__(self, request: GradientRequest) -> torch.Tensor | None:
        if self.fn is None:
            return None
        r = torch.where(torch.isfinite(request.radii), request.radii, 0.0)
        points = self.rays.center + (r[:, None] * request.omegas).to(self.rays.center)
        try:
            out = gradients(self.fn, points, chunk=self.batch_size)
        except Exception:  # noqa: BLE001 - not differentiable by torch.func: moves go without
            out = None
        # delta rises through the cutoff at a wall, so its gradient there is not zero; all
        # zeros is what torch.func gives for an objective computed outside torch (.item()).
        if out is None or not bool(out[torch.isfinite(request.radii)].any()):
            self.fn = None
            return None
        self.count += len(r)
        return out


def _assemble(runs, failures, spent, *, dim, measure, cutoff, sigma, rtol, seed, f0, started,
              meta) -> VolumeResult:
    """One :class:`VolumeResult` from the replicas: their final particles as rows.

    The rows' radii are where delta equals the cutoff (interpolated), so ``deltas`` is the
    cutoff (``nan`` for unbounded rays).
    """
    log_area = log_sphere_area(dim)
    # Each plain importance-sampling estimate made on the way exceeds the truth by x nats with
    # probability at most e^-x (Markov); with k of them, all stay below their largest minus
    # log(20 k) with probability at least 95%.
    seen = [v for run in runs for v in run.importance if math.isfinite(v)]
    floor = max(seen) - math.log(20 * len(seen)) if seen else None
    estimates = torch.cat([log_area + run.log_integrals for run in runs])
    radii = torch.cat([run.radii for run in runs])
    n = estimates.numel()
    # Each replica's evaluations are spread over its final rows so that n_evals sums to the
    # run's total cost.
    per_row = torch.full((n,), spent // n, dtype=torch.int64)
    per_row[: spent - int(per_row.sum())] += 1
    status = tuple("unbounded" if math.isinf(r) else "converged" for r in radii.tolist())
    return VolumeResult(
        estimates=estimates,
        deltas=torch.where(torch.isinf(radii), torch.nan, cutoff).to(torch.float64),
        props=torch.ones(n, dtype=torch.float64),
        mults=radii,
        logabsint=estimates - log_area,
        n_evals=per_row,
        radii=radii,
        slopes=torch.full((n,), math.nan, dtype=torch.float64),
        status=status,
        dim=dim,
        measure=measure,
        cutoff=float(cutoff),
        sigma=sigma,
        rtol=float(rtol),
        seed=seed,
        meta={
            **meta,
            "f0": f0,
            "seconds": time.perf_counter() - started,
            "total_evals": spent,
            "failed_searches": failures,
            "smc": {
                "kinds": [run.kind for run in runs],
                "levels": [run.levels for run in runs],
                "ess_start": [run.ess_start for run in runs],
                "acceptance": [list(run.acceptance) for run in runs],
                "moves": [list(run.moves) for run in runs],
                "correlation": [list(run.correlation) for run in runs],
                "path": [list(run.path) for run in runs],
                "importance": [list(run.importance) for run in runs],
                "importance_floor": floor,
                "reverse": [run.log_z_reverse for run in runs],
            },
        },
        method="smc",
        replicas=tuple(run.log_z for run in runs),
    )


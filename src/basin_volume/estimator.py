r"""The estimator: log-volume or log-probability of a star-shaped basin around a centre.

For a centre :math:`\theta_0 \in \mathbb{R}^D`, an objective :math:`f` and a cutoff
:math:`\varepsilon`, the basin is :math:`\{\theta: f(\theta) - f(\theta_0) \le \varepsilon\}`,
taken to be star-shaped around :math:`\theta_0` with radius :math:`r(\omega)` along each unit
direction. In polar coordinates its measure is

.. math::

    \mu = A_D\, \mathbb{E}_{\omega \sim \mathrm{Unif}(S^{D-1})}[I(\omega)],\qquad
    I(\omega) = \int_0^{r(\omega)} \rho(\theta_0 + t\omega)\, t^{D-1}\, dt,

with :math:`A_D` the area of the unit sphere. Under the Gaussian prior
:math:`N(0, \sigma^2 I)` (``measure="gaussian"``, :math:`\mu` is the probability that a random
initialisation lands in the basin)

.. math::

    I(\omega) = (2\pi)^{-D/2}\, e^{-\lVert\theta_0\rVert^2 / 2\sigma^2}\,
        K\!\left(r/\sigma;\ D-1,\ -\omega\cdot\theta_0/\sigma\right),\qquad
    K(\rho; n, \beta) = \int_0^\rho \tau^n e^{-\tau^2/2 + \beta\tau}\, d\tau,

and under the uniform measure (``measure="uniform"``, the Lebesgue volume)
:math:`I(\omega) = r(\omega)^D / D`. Directions are drawn from the proposal of
:mod:`basin_volume.directions` and reweighted by :math:`\lVert Pu\rVert^{-D}`, giving per
direction

.. math:: \ell_k = \log A_D + \log I(\omega_k) - D \log \lVert P u_k\rVert,

whose log-mean-exp is the estimate of :math:`\log\mu`.
"""

from __future__ import annotations

import enum
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checks
from .distributed import gather_records, init_from_env, world
from .integrals import log_radial_integral, log_sphere_area
from .preconditioners import DiagonalPreconditioner, Preconditioner, as_preconditioner
from .radius import RayResult, RayStatus, exact_cutoff, log_log_curvature, radius_search
from .rays import DenseRays, InPlaceRays, RayStart
from .result import DirectionRecord, VolumeResult, recorded_center, warn_every_time

__all__ = ["Measure", "Method", "RadiusSearchWarning", "estimate", "run_rays"]


WARMUP = 16
"""Directions whose radii seed the first guess of every later direction."""


class Measure(enum.StrEnum):
    """The measure of parameter space whose basin mass is estimated."""

    GAUSSIAN = "gaussian"
    """Probability under the prior N(0, sigma^2 I): where a random initialisation lands."""
    UNIFORM = "uniform"
    """Lebesgue volume of the basin."""


class Method(enum.StrEnum):
    """How the basin's measure is estimated."""

    AUTO = "auto"
    """``"smc"`` where it applies, else ``"is"`` (see :func:`estimate`)."""
    SMC = "smc"
    """Sequential Monte Carlo along a Gaussian-cooling path (:mod:`basin_volume.smc`)."""
    IS = "is"
    """Importance sampling from one proposal: fast, but a lower bound unless its ESS is high."""


def _resolve_method(method, pre, *, resume_from, callback) -> Method:
    try:
        method = Method(method)
    except ValueError:
        raise ValueError(f"method must be 'auto', 'smc' or 'is', got {method!r}") from None
    if method is not Method.AUTO:
        if method is Method.SMC and (resume_from is not None or callback is not None):
            raise ValueError(
                "method='smc' does not take resume_from or callback (an SMC run is not a "
                "sequence of independent directions); use method='is' for those"
            )
        return method
    simple = pre is None or isinstance(pre, DiagonalPreconditioner)
    if resume_from is not None or callback is not None or not simple:
        return Method.IS
    return Method.SMC


def _default_max_radius(measure: Measure, norm_c: float, sigma: float, dim: int) -> float:
    if measure is Measure.GAUSSIAN:
        return norm_c + sigma * (math.sqrt(dim) + 50.0)
    return 1e6 * max(norm_c, 1.0)


def _checked_settings(*, measure, n_samples, cutoff, rtol, max_evals, seed, sigma, max_radius,
                      dim: int, norm_c: float) -> tuple:
    """The settings every method shares, validated, with sigma and max_radius resolved.

    Returns ``(measure, n_samples, cutoff, rtol, max_evals, seed, sigma, max_radius)``.
    """
    try:
        measure = Measure(measure)
    except ValueError:
        raise ValueError(f"measure must be 'gaussian' or 'uniform', got {measure!r}") from None
    n_samples = _check_positive("n_samples", n_samples, integer=True)
    cutoff = _check_positive("cutoff", cutoff)
    rtol = checks.check_rtol(rtol)
    max_evals = _check_positive("max_evals", max_evals, integer=True)
    seed = _check_seed(seed)
    sigma = _resolve_sigma(sigma, norm_c, dim, measure)
    if max_radius is None:
        max_radius = _default_max_radius(measure, norm_c, sigma, dim)
    max_radius = _check_positive("max_radius", max_radius)
    return measure, n_samples, cutoff, rtol, max_evals, seed, sigma, max_radius


def first_guess(measure: Measure, sigma: float, dim: int, norm_c: float) -> float:
    """First radius tried before any direction has measured one: 1% of the prior's scale."""
    scale = sigma * math.sqrt(dim) if measure is Measure.GAUSSIAN else None
    return 1e-2 * (scale or max(norm_c, 1.0))


def _estimate_smc(fn, center, pre, *, n_samples, cutoff, measure, sigma, rtol, seed, progress,
                  max_evals, max_radius, budget, replicas, n_moves, batch_fn, model_batch_size):
    from .smc_estimate import estimate_smc

    replicas = _check_positive("replicas", replicas, integer=True)
    n_moves = _check_positive("n_moves", n_moves, integer=True)
    if budget is not None:
        budget = _check_positive("budget", budget, integer=True)
    rays = DenseRays(fn, center, seed=seed, preconditioner=None, batch_fn=batch_fn)
    measure, n_samples, cutoff, rtol, max_evals, seed, sigma, max_radius = _checked_settings(
        measure=measure, n_samples=n_samples, cutoff=cutoff, rtol=rtol, max_evals=max_evals,
        seed=seed, sigma=sigma, max_radius=max_radius, dim=rays.dim, norm_c=rays.center_norm,
    )
    if n_samples < 16:
        raise ValueError(f"method='smc' needs n_samples >= 16 particles, got {n_samples}")
    if model_batch_size > 1 and batch_fn is None:
        rays.batch_fn = _vmapped_or_none(fn, center)
    result = estimate_smc(
        rays, n_particles=n_samples, replicas=replicas, n_moves=n_moves, cutoff=cutoff,
        sigma=sigma, measure=measure.value, preconditioner=pre, rtol=rtol, seed=seed,
        progress=progress, max_evals=max_evals, max_radius=max_radius, budget=budget,
        batch_size=model_batch_size,
        first_guess=first_guess(measure, sigma, rays.dim, rays.center_norm),
        meta={
            "center_sha256": rays.center_sha256(),
            "device": str(center.device),
            "dtype": str(center.dtype).removeprefix("torch."),
            "preconditioner": None if pre is None else type(pre).__name__,
            "max_radius": max_radius,
            "torch_version": torch.__version__,
            "basin_volume_version": _version(),
            "n_moves": n_moves,
        },
    )
    result.warn_if_unreliable(stacklevel=4)
    failed = result.meta["failed_searches"]
    if failed:
        warn_every_time(
            f"{sum(failed.values())} radius searches did not converge ({failed}); rays with "
            "status nonfinite count as radius 0 (no mass), others at their best bracket end",
            RadiusSearchWarning,
            stacklevel=3,
        )
    return result


@dataclass(frozen=True)
class _CutoffRecord(DirectionRecord):
    """A :class:`DirectionRecord` whose estimate is at the exact cutoff, with the bound (nats)
    on how far the interpolation of :func:`basin_volume.radius.exact_cutoff` could be from
    the crossing (``nan`` where no radius was interpolated)."""

    bound: float = dataclass_field(default=math.nan, compare=False)
    curvature: float = dataclass_field(default=math.nan, compare=False)


def cutoff_bounds(records: list[DirectionRecord]) -> dict:
    """``meta["cutoff_bound"]``: the per-direction bounds (nats) of the exact-cutoff estimates
    and their mean over the directions that have one (``None`` where a direction has none,
    e.g. one resumed from a file, or one that did not converge)."""
    bounds = [getattr(r, "bound", math.nan) for r in records]
    known = [b for b in bounds if math.isfinite(b)]
    return {
        "mean": statistics.fmean(known) if known else None,
        "max": max(known) if known else None,
        "per_direction": [b if math.isfinite(b) else None for b in bounds],
    }


class RadiusSearchWarning(RuntimeWarning):
    """Some directions' radius searches did not converge; see ``VolumeResult.status``."""


def _check_center(center) -> torch.Tensor:
    if not isinstance(center, torch.Tensor):
        raise TypeError(f"center must be a 1-D torch.Tensor of parameters, got {type(center)}")
    if center.ndim != 1:
        raise ValueError(
            f"center must be 1-D (flatten it, e.g. with "
            f"torch.nn.utils.parameters_to_vector); got shape {tuple(center.shape)}"
        )
    if not center.is_floating_point():
        raise TypeError(f"center must be a floating-point tensor, got {center.dtype}")
    if center.device.type == "meta":
        raise ValueError(
            "center is on the meta device, which holds shapes but no values (a model built "
            "with device='meta' or init_empty_weights); load its weights first, e.g. "
            "model.to_empty(device='cpu') then model.load_state_dict(...)"
        )
    if center.numel() < 2:
        raise ValueError(f"center must have at least 2 parameters, got {center.numel()}")
    finite = torch.isfinite(center)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0])
        raise ValueError(
            f"center has a non-finite entry ({center[bad].item()}) at index {bad}; the basin "
            "of a network with NaN/inf parameters is undefined"
        )
    return center.detach()


def _check_positive(name: str, value, *, integer: bool = False) -> int | float:
    """``value`` as a Python number (numpy and 0-d torch scalars accepted), positive."""
    return checks.check_positive(name, value, integer=integer)


def _resolve_sigma(sigma, norm_c: float, dim: int, measure: Measure) -> float:
    if measure is Measure.UNIFORM:
        return math.nan
    rms = norm_c / math.sqrt(dim)
    if sigma is None:
        if rms == 0:
            raise ValueError(
                "sigma is missing and cannot be derived: the centre is all zeros, so its RMS "
                "(the default prior scale) is 0; pass sigma=<the initialisation scale>"
            )
        return rms
    sigma = _check_positive("sigma", sigma)
    if rms > 0 and not 1e-2 <= sigma / rms <= 1e2:
        warnings.warn(
            f"sigma={sigma:g} is {sigma / rms:.3g} times the RMS of the centre ({rms:.3g}); "
            "the prior is then far from the parameters' scale (did you pass a variance, or "
            "the wrong units?)",
            UserWarning,
            stacklevel=4,
        )
    return float(sigma)


def estimate(
    fn: Callable[[torch.Tensor], torch.Tensor | float],
    center: torch.Tensor,
    *,
    n_samples: int = 100,
    cutoff: float = 1e-2,
    measure: Measure | str = Measure.GAUSSIAN,
    sigma: float | None = None,
    preconditioner: torch.Tensor | Preconditioner | None = None,
    rtol: float = 1e-2,
    seed: int = 0,
    progress: bool = True,
    max_evals: int = 40,
    max_radius: float | None = None,
    callback: Callable[[DirectionRecord], None] | None = None,
    resume_from: VolumeResult | None = None,
    model_batch_size: int = 1,
    batch_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    method: Method | str = "is",
    budget: int | None = None,
    replicas: int = 4,
    n_moves: int = 3,
) -> VolumeResult:
    r"""Estimate the log-probability (or log-volume) of the basin of ``fn`` around ``center``.

    Parameters
    ----------
    fn : callable
        ``fn(theta) -> scalar``, with ``theta`` a 1-D tensor like ``center``. The basin is
        :math:`\{\theta : fn(\theta) - fn(center) \le cutoff\}`. Called without gradients.
    center : torch.Tensor
        The trained parameters :math:`\theta_0`, 1-D, finite, on any device.
    n_samples : int
        Number of random directions (``method="is"``), or particles per replica
        (``method="smc"``).
    cutoff : float
        :math:`\varepsilon > 0`, in the units of ``fn`` (nats for a KL basin).
    measure : {"gaussian", "uniform"}
        ``"gaussian"``: log probability under :math:`N(0, \sigma^2 I)`. ``"uniform"``: log
        Lebesgue volume.
    sigma : float, optional
        Prior scale. Default: the RMS of ``center``, :math:`\lVert\theta_0\rVert/\sqrt D`.
    preconditioner : tensor or Preconditioner, optional
        Positive per-parameter scales :math:`p` (any overall scale; normalised to
        :math:`\sum\log p_i = 0`) or a :class:`~basin_volume.preconditioners.Preconditioner`.
        Directions are drawn as :math:`Pu/\lVert Pu\rVert` and importance-reweighted.
    rtol : float
        Each radius satisfies :math:`|\delta(r) - \varepsilon| \le \mathrm{rtol}\cdot
        \varepsilon`; at most 0.5 (with ``rtol >= 1`` points deep inside the basin would
        count as its edge).
    seed : int
        Direction ``k`` depends only on ``(seed, k)``; ``0 <= seed < 2**63``.
    progress : bool
        Show a progress bar.
    max_evals : int
        Evaluation budget per direction.
    max_radius : float, optional
        Largest radius tried. A ray still inside there is recorded as unbounded (radius
        ``inf``). Default: :math:`\lVert\theta_0\rVert + \sigma(\sqrt D + 50)` for the Gaussian
        measure (the prior mass beyond is negligible, so the full ray integral is exact), and
        :math:`10^6 \max(\lVert\theta_0\rVert, 1)` for the uniform measure.
    callback : callable, optional
        Called with each finished direction's :class:`DirectionRecord`, in index order (for
        incremental saving). Under torchrun it is called on every rank with every
        direction, as each round of directions is shared.
    resume_from : VolumeResult, optional
        A partial result of the same run (same settings and seed): its directions are kept
        and the run continues with the next index, giving exactly the result an
        uninterrupted run would.
    model_batch_size : int
        Directions searched together after the first :data:`WARMUP`: their pending radii are
        evaluated in one call of ``batch_fn``. Pays off for small models and on GPUs. The
        per-direction results are those of a sequential run (up to the float rounding of
        batched arithmetic). With ``method="smc"``: points per call of ``batch_fn``.
    batch_fn : callable, optional
        ``batch_fn(thetas) -> values`` for ``thetas`` of shape ``[B, D]``. Default with
        ``model_batch_size > 1``: ``torch.func.vmap(fn)``, falling back to one call per
        point (with a warning) if ``fn`` cannot be vmapped.
    method : {"auto", "smc", "is"}
        ``"smc"``: sequential Monte Carlo along a Gaussian-cooling path
        (:mod:`basin_volume.smc`), right where importance sampling is a lower bound, with an
        interval from independent replicas. ``"is"``: importance sampling from one proposal
        (fast; trustworthy only when the ESS is high; the default for now, while run logs,
        resume and torchrun support only it). ``"auto"``: ``"smc"``, except with
        ``resume_from`` or ``callback`` or a non-diagonal preconditioner, where it is ``"is"``.
    budget : int, optional
        Cap on the total number of evaluations of ``fn`` (``method="smc"``), checked after
        each batch of radius searches (so a run may pass it by one batch);
        :class:`~basin_volume.smc_estimate.BudgetExhausted` is raised when it runs out.
    replicas : int
        Independent SMC runs pooled into the estimate; their spread gives the interval.
    n_moves : int
        Metropolis-Hastings moves per particle and level (``method="smc"``).

    Numbers may be Python, numpy or 0-d torch scalars.

    Returns
    -------
    VolumeResult
        ``meta["center_sha256"]`` fingerprints the centre, so a result is never resumed
        (``resume_from``) or merged with another basin's. With ``method="is"`` a converged
        direction's estimate is taken where delta equals the cutoff exactly
        (:func:`~basin_volume.radius.exact_cutoff`; ``radii`` and ``deltas`` stay the
        evaluated point), and ``meta["cutoff_bound"]`` holds each direction's bound in nats
        on that interpolation and their mean.

    Warns
    -----
    LowESSWarning
        When a few directions carry almost all of the importance weight.
    RadiusSearchWarning
        When some directions' radius searches did not converge, naming them and why (a
        direction whose basin is narrower than the centre's float resolution is
        ``nonfinite``: points that round to the centre are not evaluated).

    Examples
    --------
    A quadratic basin :math:`\tfrac12\lVert\theta-\theta_0\rVert^2 \le \varepsilon` is a ball of
    radius :math:`\sqrt{2\varepsilon}`:

    >>> import math, torch, basin_volume as bv
    >>> c = torch.zeros(3, dtype=torch.float64)
    >>> res = bv.estimate(lambda th: 0.5 * th.square().sum(), c, n_samples=4, cutoff=0.5,
    ...                   measure="uniform", rtol=1e-12, progress=False)
    >>> round(res.log_volume, 10) == round(math.log(4 / 3 * math.pi), 10)
    True
    """
    center = _check_center(center)
    seed = _check_seed(seed)
    pre = as_preconditioner(preconditioner, center.numel())
    model_batch_size = _check_positive("model_batch_size", model_batch_size, integer=True)
    method = _resolve_method(method, pre, resume_from=resume_from, callback=callback)
    if method is Method.SMC:
        return _estimate_smc(
            fn, center, pre, n_samples=n_samples, cutoff=cutoff, measure=measure, sigma=sigma,
            rtol=rtol, seed=seed, progress=progress, max_evals=max_evals,
            max_radius=max_radius, budget=budget, replicas=replicas, n_moves=n_moves,
            batch_fn=batch_fn, model_batch_size=model_batch_size,
        )
    if model_batch_size > 1 and batch_fn is None:
        batch_fn = _vmapped_or_none(fn, center)
    rays = DenseRays(fn, center, seed=seed, preconditioner=pre, batch_fn=batch_fn)
    return run_rays(
        rays,
        n_samples=n_samples,
        cutoff=cutoff,
        measure=measure,
        sigma=sigma,
        rtol=rtol,
        seed=seed,
        progress=progress,
        max_evals=max_evals,
        max_radius=max_radius,
        callback=callback,
        resume_from=resume_from,
        batch_size=model_batch_size,
        meta={
            "device": str(center.device),
            "dtype": str(center.dtype).removeprefix("torch."),
            "preconditioner": None if pre is None else type(pre).__name__,
        },
    )


def _vmapped_or_none(fn: Callable, center: torch.Tensor) -> Callable | None:
    """``torch.func.vmap(fn)`` if it works on two copies of the centre, else ``None``."""
    batched = torch.func.vmap(fn)
    try:
        with torch.no_grad():
            out = batched(torch.stack([center, center]))
        if isinstance(out, torch.Tensor) and out.shape == (2,):
            return batched
    except Exception as err:  # noqa: BLE001 - any failure means "cannot vmap this fn"
        reason = f"{type(err).__name__}: {err}"
    else:
        reason = f"it returned {getattr(out, 'shape', type(out))} for 2 points"
    warnings.warn(
        f"fn cannot be vmapped ({reason}); directions are evaluated one point at a time. "
        "Pass batch_fn to evaluate several parameter vectors in one call.",
        UserWarning,
        stacklevel=3,
    )
    return None


def _check_seed(seed) -> int:
    """``seed`` as an int in ``0 ... 2**63 - 1`` (see :func:`basin_volume.checks.check_seed`)."""
    return checks.check_seed(seed)


def run_rays(
    rays: DenseRays | InPlaceRays,
    *,
    n_samples: int,
    cutoff: float,
    measure: Measure | str,
    sigma: float | None,
    rtol: float,
    seed: int,
    progress: bool,
    max_evals: int,
    max_radius: float | None,
    callback: Callable[[DirectionRecord], None] | None,
    resume_from: VolumeResult | None,
    meta: dict,
    batch_size: int = 1,
) -> VolumeResult:
    """The estimator proper, for any ray evaluator of :mod:`basin_volume.rays`.

    :func:`estimate` documents the arguments. The evaluator is restored to the centre after
    every group of directions and on any exception.
    """
    dim, norm_c = rays.dim, rays.center_norm
    measure, n_samples, cutoff, rtol, max_evals, seed, sigma, max_radius = _checked_settings(
        measure=measure, n_samples=n_samples, cutoff=cutoff, rtol=rtol, max_evals=max_evals,
        seed=seed, sigma=sigma, max_radius=max_radius, dim=dim, norm_c=norm_c,
    )
    batch_size = _check_positive("batch_size", batch_size, integer=True)
    center_sha256 = rays.center_sha256()
    if resume_from is not None:
        _check_resumable(resume_from, dim, measure, sigma, cutoff, rtol, seed, n_samples)
        _check_same_center(resume_from, center_sha256)

    started = time.perf_counter()
    records: list[DirectionRecord] = list(resume_from.records() if resume_from else [])
    init_from_env()
    rank, size = world()
    bar = tqdm(
        total=n_samples,
        initial=len(records),
        disable=not progress or rank != 0,
        desc="directions",
        unit="dir",
    )
    try:
        f0 = rays.value_at_center()
        if not math.isfinite(f0):
            raise ValueError(f"fn(center) is {f0}; the objective must be finite at the centre")
        problem = _Problem(
            rays, f0, dim, measure, sigma, norm_c, cutoff, rtol, max_radius, max_evals
        )
        for group, shared in _groups(len(records), n_samples, rank, size, batch_size):
            state = _search_state(records[:WARMUP], problem.first_guess)
            problem.slope_spread = _slope_spread(records[:WARMUP])
            problem.curvature = _curvature_bound(records[:WARMUP])
            new = list(problem.run_group(group, *state))
            if shared and size > 1:
                new = gather_records(new)
            for record in new:
                records.append(record)
                if callback is not None:
                    callback(record)
            bar.update(len(new))
            if progress and rank == 0:
                ests = torch.tensor([r.estimate for r in records], dtype=torch.float64)
                bar.set_postfix(
                    log_vol=f"{float(torch.logsumexp(ests, 0)) - math.log(len(ests)):.5g}",
                    evals=f"{sum(r.n_evals for r in records) / len(records):.2f}",
                )
    finally:
        bar.close()
        rays.restore()
        rays.release()

    result = VolumeResult.from_records(
        records,
        dim=dim,
        measure=measure.value,
        cutoff=float(cutoff),
        sigma=sigma,
        rtol=float(rtol),
        seed=seed,
        meta={
            "f0": f0,
            "center_sha256": center_sha256,
            "cutoff_bound": cutoff_bounds(records),
            **meta,
            "max_radius": max_radius,
            "seconds": time.perf_counter() - started,
            "torch_version": torch.__version__,
            "basin_volume_version": _version(),
        },
    )
    if rank == 0:  # once per job, not once per process
        _warn_about(result)
    return result


def _groups(done: int, n_samples: int, rank: int, size: int, batch_size: int):
    """Yield ``(indices, shared)``: the directions this rank searches together, in order.

    Every rank runs the warm-up directions itself, one at a time (they fix the search state);
    the rest go in rounds of ``size * batch_size`` directions, rank ``r`` taking every
    ``size``-th one, and each round's records are shared with every rank (``shared``) before
    the next round starts. Generated lazily: nothing is allocated per direction up front.
    """
    for k in range(done, min(WARMUP, n_samples)):
        yield [k], False
    step = size * batch_size
    for start in range(max(done, WARMUP), n_samples, step):
        yield list(range(start + rank, min(start + step, n_samples), size)), True


def _search_state(records: list[DirectionRecord], first_guess: float) -> tuple[float, float]:
    """First radius and log-log slope for the next direction, from earlier ones.

    The median radius of the converged directions among ``records`` (radii concentrate in
    high dimension) and their median measured slope. The estimator passes the first
    :data:`WARMUP` directions only, so direction ``k``'s search depends on nothing but ``k``
    and those: resumed, reordered and sharded runs give the same result for every direction.
    """
    log_radii = [math.log(r.radius) for r in records if r.status == RayStatus.CONVERGED]
    slopes = [r.slope for r in records if math.isfinite(r.slope)]
    guess = math.exp(statistics.median(log_radii)) if log_radii else first_guess
    return guess, statistics.median(slopes) if slopes else 2.0


def _slope_spread(records: list[DirectionRecord]) -> float:
    """Relative uncertainty of the learned slope, for directions whose search stops after one
    evaluation: twice the largest relative deviation of a measured slope from their median
    (at least 0.05; 0.25 while fewer than three slopes are known)."""
    slopes = [r.slope for r in records if math.isfinite(r.slope) and r.slope > 0]
    if len(slopes) < 3:
        return 0.25
    mid = statistics.median(slopes)
    return min(0.9, max(0.05, 2 * max(abs(k - mid) for k in slopes) / mid))


def _curvature_bound(records: list[DirectionRecord]) -> float:
    """:math:`M` of :func:`~basin_volume.radius.exact_cutoff`: twice the largest
    :math:`|d^2\\log\\delta/d(\\log t)^2|` measured on ``records`` (from directions with three
    or more evaluations), and at least 1."""
    seen = [abs(c) for r in records if math.isfinite(c := getattr(r, "curvature", math.nan))]
    return max([1.0] + [2.0 * c for c in seen])


def _check_resumable(prev: VolumeResult, dim, measure, sigma, cutoff, rtol, seed, n_samples):
    if "merged_seeds" in prev.meta:
        raise ValueError("resume_from is a merged result; resume one of its parts instead")
    mine = {
        "dim": dim,
        "measure": measure.value,
        "cutoff": float(cutoff),
        "rtol": float(rtol),
        "seed": seed,
    }
    for name, value in mine.items():
        if getattr(prev, name) != value:
            raise ValueError(
                f"resume_from was made with {name}={getattr(prev, name)!r} but this run has "
                f"{name}={value!r}; resume with the same settings or start a new run"
            )
    if measure is Measure.GAUSSIAN and not math.isclose(prev.sigma, sigma, rel_tol=1e-12):
        raise ValueError(f"resume_from has sigma={prev.sigma!r}, this run sigma={sigma!r}")
    if prev.n_samples > n_samples:
        raise ValueError(
            f"resume_from already has {prev.n_samples} directions, more than n_samples={n_samples}"
        )


def _check_same_center(prev: VolumeResult, center_sha256: str) -> None:
    """Refuse to continue a result made around another centre (another basin)."""
    theirs = recorded_center(prev)
    if theirs is not None and theirs != center_sha256:
        raise ValueError(
            f"resume_from was made around another centre: its center_sha256 is "
            f"{theirs[:16]}..., this run's is {center_sha256[:16]}...; it is the partial "
            "result of another basin (another model, checkpoint or dtype): resume it with "
            "its own centre, or start a new run"
        )


@dataclass
class _Problem:
    """Everything fixed during a run; :meth:`run_direction` does one direction."""

    rays: DenseRays | InPlaceRays
    f0: float
    dim: int
    measure: Measure
    sigma: float
    norm_c: float
    cutoff: float
    rtol: float
    max_radius: float
    max_evals: int
    slope_spread: float = 0.25
    curvature: float = 1.0

    @property
    def first_guess(self) -> float:
        return first_guess(self.measure, self.sigma, self.dim, self.norm_c)

    def log_integral(self, radius: float, dot: float) -> float:
        """log I(omega) for a ray of length ``radius`` with omega . theta0 = ``dot``."""
        return self.log_integrals([radius], [dot])[0]

    def log_integrals(self, radii: list[float], dots: list[float]) -> list[float]:
        """:meth:`log_integral` for many rays in one vectorised call (the Gaussian radial
        integral costs the same for one ray as for hundreds)."""
        if not radii:
            return []
        if self.measure is Measure.GAUSSIAN:
            const = -0.5 * self.dim * math.log(2 * math.pi) - 0.5 * (self.norm_c / self.sigma) ** 2
            rho = np.asarray(radii, dtype=np.float64) / self.sigma
            beta = -np.asarray(dots, dtype=np.float64) / self.sigma
            values = np.atleast_1d(log_radial_integral(rho, self.dim - 1.0, 1.0, beta))
            return [const + float(v) for v in values]
        return [
            self.dim * math.log(r) - math.log(self.dim) if r > 0 else -math.inf for r in radii
        ]

    def run_group(self, ks: list[int], guess: float, slope: float) -> list[DirectionRecord]:
        """Search directions ``ks`` together, evaluating their pending radii in one call."""
        starts = self.rays.start_many(ks)
        searches = [
            radius_search(
                self.cutoff,
                guess=guess,
                rtol=self.rtol,
                slope=slope,
                max_radius=self.max_radius,
                max_evals=self.max_evals,
            )
            for _ in ks
        ]
        pending = {i: next(search) for i, search in enumerate(searches)}
        rays_done: dict[int, RayResult] = {}
        while pending:
            slots = list(pending)
            values = self.rays.values_at_many([(i, pending[i]) for i in slots])
            for i, value in zip(slots, values, strict=True):
                try:
                    pending[i] = searches[i].send(value - self.f0)
                except StopIteration as stop:
                    rays_done[i] = stop.value
                    del pending[i]
        self.rays.restore()
        # Every radius whose integral is needed (the estimate's, and the ends of the exact
        # cutoff's interval), for all the group's directions in one vectorised call.
        plans = [self._radii(rays_done[i], slope) for i in range(len(ks))]
        flat = [r for plan in plans for r in plan]
        dots = [starts[i].dot for i, plan in enumerate(plans) for _ in plan]
        values = iter(self.log_integrals(flat, dots))
        return [
            self._record(k, starts[i], rays_done[i], [next(values) for _ in plans[i]])
            for i, k in enumerate(ks)
        ]

    def _radii(self, ray: RayResult, slope: float) -> list[float]:
        """``[radius]`` to integrate to, or ``[cutoff radius, low, high]`` for a converged ray
        (:func:`~basin_volume.radius.exact_cutoff`)."""
        if ray.status is RayStatus.CONVERGED:
            own = abs(log_log_curvature(ray.points, self.cutoff))  # this ray's, if measured
            curvature = max(self.curvature, 2.0 * own) if math.isfinite(own) else self.curvature
            cut = exact_cutoff(ray.points, self.cutoff, slope=slope,
                               slope_spread=self.slope_spread, curvature=curvature)  # fmt: skip
            if cut is not None:
                return [cut.radius, cut.low, cut.high]
        return [ray.radius if ray.status is not RayStatus.NONFINITE else 0.0]

    def _record(
        self, k: int, ray_start: RayStart, ray: RayResult, lais: list[float]
    ) -> DirectionRecord:
        """The direction's record; a converged ray's estimate is taken where delta equals the
        cutoff exactly, with the bound (nats) from the ends of its interval; ``radius`` and
        ``delta`` stay the evaluated ones."""
        radius = ray.radius if ray.status is not RayStatus.NONFINITE else 0.0
        lai, bound = lais[0], math.nan
        if len(lais) == 3:
            bound = max(abs(lais[1] - lai), abs(lais[2] - lai))
        return _CutoffRecord(
            index=k,
            estimate=log_sphere_area(self.dim) + lai - self.dim * math.log(ray_start.prop),
            delta=ray.delta,
            prop=ray_start.prop,
            radius=radius,
            logabsint=lai,
            n_evals=ray.n_evals,
            status=ray.status.value,
            slope=ray.slope,
            bound=bound,
            curvature=log_log_curvature(ray.points, self.cutoff),
        )


def _version() -> str:
    from . import __version__

    return __version__


_WHY = {
    "nonfinite": "nonfinite (radius 0, no mass): delta was NaN or inf at every radius tried",
    "narrow": "nonfinite (radius 0, no mass): delta stayed above the cutoff down to radii "
    "where theta0 + t*omega rounds to theta0 in the centre's dtype, so the basin is narrower "
    "than float resolution along them (raise the cutoff, or use float64)",
    "unbounded": "unbounded: delta stayed below the cutoff up to max_radius (radius inf)",
    "max_evals": "max_evals: the evaluation budget ran out (the best bracket end is kept)",
    "discontinuous": "discontinuous: delta jumps across the cutoff within float resolution "
    "(the inner radius is kept)",
}


def _failures(result: VolumeResult) -> list[str]:
    """One line per way directions failed: why, and which directions."""
    groups: dict[str, list[int]] = {}
    for k, status in enumerate(result.status):
        if status == RayStatus.CONVERGED:
            continue
        if status == RayStatus.NONFINITE and math.isfinite(float(result.deltas[k])):
            status = "narrow"  # the last finite delta was above the cutoff
        groups.setdefault(status, []).append(k)
    lines = []
    for status, ks in groups.items():
        shown = ", ".join(map(str, ks[:10])) + (f", ... ({len(ks)} in all)" if len(ks) > 10 else "")
        lines.append(f"{_WHY.get(status, status)} [directions {shown}]")
    return lines


def _warn_about(result: VolumeResult) -> None:
    if result.n_failed:
        counts = {s: result.status.count(s) for s in set(result.status) if s != "converged"}
        hint = (
            "; unbounded rays make the uniform volume infinite"
            if result.measure == "uniform" and "unbounded" in counts
            else ""
        )
        warn_every_time(
            f"{result.n_failed} of {result.n_samples} directions did not converge {counts}; "
            f"they are included with the radius found (see result.status){hint}: "
            + "; ".join(_failures(result)),
            RadiusSearchWarning,
            stacklevel=3,
        )
    result.warn_if_unreliable(stacklevel=3)

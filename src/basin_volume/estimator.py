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

:func:`estimate` checks its arguments, picks the method and hands over to the loop of
:mod:`basin_volume.ray_loop` (importance sampling) or to :mod:`basin_volume.smc_estimate`;
the settings are resolved once by :class:`basin_volume.settings.Settings`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from . import checks
from .curvature import MAX_DIM, CurvatureProposal
from .distributed import init_from_env, world
from .preconditioners import DiagonalPreconditioner, Preconditioner, as_preconditioner
from .ray_loop import RadiusSearchWarning, _version, run_directions, run_rays
from .rays import DenseRays
from .result import DirectionRecord, VolumeResult, warn_every_time
from .settings import Measure, Method, Settings
from .smc_estimate import BudgetTooSmall

__all__ = ["Measure", "Method", "RadiusSearchWarning", "estimate", "run_rays"]


SMC_MIN_PARTICLES = 16  # fewer particles than this cannot resample meaningfully
SMC_MAX_PARTICLES = 2**20  # SMC holds every particle's direction in memory
BUDGET_MOVES = 3  # moves per level under a budget when n_moves is None


def resolve_method(method, pre, *, n_samples: int, resume_from, callback) -> Method:
    """``method`` as a :class:`Method`, with ``"auto"`` resolved (see :func:`estimate`)."""
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
    if not SMC_MIN_PARTICLES <= n_samples <= SMC_MAX_PARTICLES:
        return Method.IS
    init_from_env()
    if world()[1] > 1:  # SMC does not shard its particles across ranks
        return Method.IS
    return Method.SMC


def _estimate_smc(fn, rays: DenseRays, pre, s: Settings, *, progress: bool, budget,
                  replicas: int, n_moves: int | None, batch_size: int,
                  curvature: str, bidirectional: bool) -> VolumeResult:
    """``method="smc"``: :func:`basin_volume.smc_estimate.estimate_smc` on dense rays."""
    from .smc_estimate import estimate_smc

    if not SMC_MIN_PARTICLES <= s.n_samples <= SMC_MAX_PARTICLES:
        raise ValueError(
            f"method='smc' needs n_samples from {SMC_MIN_PARTICLES} to {SMC_MAX_PARTICLES} "
            f"particles (every particle is held in memory), got {s.n_samples}; use method='is' "
            "for more directions"
        )
    init_from_env()
    if world()[1] > 1:
        raise ValueError(
            "method='smc' does not shard its particles across torchrun ranks yet; run it in "
            "one process, or use method='is' under torchrun"
        )
    start = None
    if pre is None and curvature != "none":
        start = CurvatureProposal(
            fn, rays.center, cutoff=s.cutoff, required=curvature == "hessian",
            sigma=s.sigma if s.measure is Measure.GAUSSIAN else None,
        )
    result = estimate_smc(
        rays, n_particles=s.n_samples, replicas=replicas, n_moves=n_moves, cutoff=s.cutoff,
        sigma=s.sigma, measure=s.measure.value, preconditioner=pre, rtol=s.rtol, seed=s.seed,
        progress=progress, max_evals=s.max_evals, max_radius=s.max_radius, budget=budget,
        batch_size=batch_size,
        first_guess=s.first_guess(rays.dim, rays.center_norm),
        meta={
            "center_sha256": rays.center_sha256(),
            "device": str(rays.center.device),
            "dtype": str(rays.center.dtype).removeprefix("torch."),
            "preconditioner": None if pre is None else type(pre).__name__,
            "max_radius": s.max_radius,
            "torch_version": torch.__version__,
            "basin_volume_version": _version(),
            "n_moves": n_moves,
            "bidirectional": bidirectional,
            "curvature": curvature,
        },
        start=start,
        fn=fn if rays.dim <= MAX_DIM else None,
        bidirectional=bidirectional,
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
    method: Method | str = "auto",
    budget: int | None = None,
    replicas: int = 4,
    n_moves: int | None = None,
    curvature: str = "auto",
    bidirectional: bool | None = None,
) -> VolumeResult:
    r"""Estimate the log-probability (or log-volume) of the basin of ``fn`` around ``center``.

    Numbers may be Python, numpy or 0-d torch scalars.

    Parameters
    ----------
    fn : callable
        ``fn(theta) -> scalar``, with ``theta`` a 1-D tensor like ``center``. The basin is
        :math:`\{\theta : fn(\theta) - fn(center) \le cutoff\}`. Called without gradients.
    center : torch.Tensor
        The trained parameters :math:`\theta_0`, 1-D, finite, on any device.
    n_samples : int
        Number of random directions (``method="is"``), or particles per replica
        (``method="smc"``; under a ``budget``, at most this many).
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
        ``"smc"``: sequential Monte Carlo over directions (:mod:`basin_volume.smc`: prior
        rays, the curvature proposal, annealing the cutoff, tempering or Gaussian cooling,
        whichever the basin calls for), right where importance sampling is a lower bound,
        with an interval from independent replicas (``docs/accuracy.md``). ``"is"``:
        importance sampling from one proposal (fast; trustworthy only when the ESS is high;
        the method of run logs, resume and torchrun). ``"auto"`` (default): ``"smc"``, except
        with ``resume_from`` or ``callback``, a non-diagonal preconditioner, ``n_samples``
        outside 16 to 2^20 particles, or under torchrun with several processes, where it is
        ``"is"``.
    budget : int, optional
        Cap on the total number of evaluations of ``fn``, checked after each batch of
        radius searches (so a run may pass it by one batch).

        * ``"smc"``: with more than 16 particles asked for, a pilot run of 16 prices one
          particle and each replica gets as many as 70% of what is left affords (at most
          ``n_samples``; ``meta["budget_sizing"]`` says how many). If a late replica still
          runs out, the estimate pools the two or more that finished, with a
          ``RuntimeWarning``. :class:`~basin_volume.smc_estimate.BudgetExhausted` is raised
          when fewer than two would finish, or, right after the pilot, when 16 particles per
          replica do not fit (naming the budget they need).
        * ``"auto"``: as ``"smc"``, except that where 16 particles per replica do not fit,
          what the pilot left goes to importance sampling (``meta["auto"]`` says why).
        * ``"is"``: directions stop once they have spent it (``meta["budget"]``; the result
          holds the directions done, at most ``n_samples``).
    replicas : int
        Independent SMC runs pooled into the estimate; their spread gives the interval.
    n_moves : int or None
        Metropolis-Hastings moves per particle and level (``method="smc"``). ``None`` moves
        each level's particles until they have decorrelated from where the level found them
        (log target and leading principal directions, correlation below 0.1; at most 30
        moves), so hard levels get more moves than easy ones; an integer fixes the count,
        cheaper and, where it is too small for the basin, biased low. Under a ``budget``,
        whose use decorrelation could not foresee, ``None`` is :data:`BUDGET_MOVES`.
    curvature : {"auto", "hessian", "none"}
        ``method="smc"`` without a preconditioner, when prior rays do not settle the basin:
        start from the proposal built from the Hessian of ``fn`` at the centre
        (:mod:`basin_volume.curvature`) and temper from it to the target. ``"auto"`` does so
        when ``fn`` has at most :data:`~basin_volume.curvature.MAX_DIM` parameters and
        :mod:`torch.func` can differentiate it twice, else follows the Gaussian-cooling path;
        ``"hessian"`` requires it; ``"none"`` never uses it. Independently of this, SMC's
        moves along either path are Hamiltonian, steered by the gradient of ``fn`` at the
        basin's wall, whenever ``fn`` has at most that many parameters and :mod:`torch.func`
        can differentiate it once (``meta["gradients"]`` counts the gradients taken, each
        charged as 2 evaluations); otherwise they are Crank-Nicolson steps.
    bidirectional : bool or None
        ``method="smc"``, where it tempers from a proposal: walk each replica's final
        particles back along its levels (about twice the moves; bidirectional Monte Carlo).
        Where the moves fail to mix the two passes move apart, the forward estimate low and
        the backward one usually higher: a check that needs no truth, not a bound
        (``log_volume_reverse``, ``passes_disagree``, ``meta["smc"]["reverse"]``). The
        interval's upper end reaches up to the backward passes' (``docs/accuracy.md``).
        ``None`` (default): on without a ``budget``, off under one (a budget's evaluations
        go to the forward particles). The forward estimate is the same either way.

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
        When a few directions carry almost all of the importance weight; for SMC, when its
        replicas disagree, its backward passes lie far above it, its interval lies below the
        importance floor, or its moves left most levels unmixed
        (:meth:`VolumeResult.warn_if_unreliable`).
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
    chosen = method
    method = resolve_method(method, pre, n_samples=n_samples, resume_from=resume_from,
                            callback=callback)
    smc = method is Method.SMC
    if budget is not None:
        budget = _check_positive("budget", budget, integer=True)
    if checks.check_bidirectional(bidirectional) is None:
        bidirectional = budget is None
    if smc:
        replicas = _check_positive("replicas", replicas, integer=True)
        if n_moves is not None:
            n_moves = _check_positive("n_moves", n_moves, integer=True)
        if curvature not in ("auto", "hessian", "none"):
            raise ValueError(f"curvature must be 'auto', 'hessian' or 'none', got {curvature!r}")
        if budget is not None:
            n_moves = BUDGET_MOVES if n_moves is None else n_moves
    if model_batch_size > 1 and batch_fn is None:
        batch_fn = _vmapped_or_none(fn, center)
    rays = DenseRays(fn, center, seed=seed, preconditioner=None if smc else pre, batch_fn=batch_fn)
    settings = Settings.resolve(
        measure=measure, n_samples=n_samples, cutoff=cutoff, rtol=rtol, max_evals=max_evals,
        seed=seed, sigma=sigma, max_radius=max_radius, dim=rays.dim, norm_c=rays.center_norm,
    )  # fmt: skip
    meta = {}
    if smc:
        try:
            return _estimate_smc(
                fn, rays, pre, settings, progress=progress, budget=budget, replicas=replicas,
                n_moves=n_moves, batch_size=model_batch_size, curvature=curvature,
                bidirectional=bidirectional,
            )  # fmt: skip
        except BudgetTooSmall as err:
            if Method(chosen) is not Method.AUTO:
                raise
            # "auto": the most accurate method that fits; what is left goes to directions
            budget -= err.spent
            if budget <= 0:
                raise
            meta = {"auto": f"importance sampling: {err}", "smc_pilot_evals": err.spent}
            rays = DenseRays(fn, center, seed=seed, preconditioner=pre, batch_fn=batch_fn)
    return run_directions(
        rays,
        settings,
        progress=progress,
        callback=callback,
        resume_from=resume_from,
        batch_size=model_batch_size,
        budget=budget,
        meta={
            "device": str(center.device),
            "dtype": str(center.dtype).removeprefix("torch."),
            "preconditioner": None if pre is None else type(pre).__name__,
            **meta,
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

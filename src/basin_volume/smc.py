r"""Sequential Monte Carlo over directions: which path, and the paths themselves.

The basin's measure is :math:`\mu(K) = A_D\,\mathbb{E}_{\omega}[I(\omega)]` (see
:mod:`basin_volume.estimator`). Importance sampling draws :math:`\omega` from one fixed proposal
and fails when :math:`\log I(\omega)/q(\omega)` varies by more than a few nats; this sampler
instead follows a path of measures along which every step is easy, and picks the path from
what cheap first looks at the basin show:

1. **Prior rays** (Gaussian measure). A ray's weight is the prior mass of that ray inside the
   basin, in [0, 1], so with :math:`P` the basin's probability the relative standard error
   of :math:`m` of them is at most :math:`1/\sqrt{mP}`. A pilot (a quarter of a batch)
   estimates :math:`P`; if at most :data:`_MAX_RAY_BATCHES` batches of rays bring that bound
   to :data:`_BOUNDED_RSE`, as many rays as do are drawn afresh and their mean is the answer
   (exact for a basin that is the whole space). A ray's search starts at the drawn point's
   distance, so the heaviest rays' segments are checked for an earlier crossing
   (``RadiusRequest.weights``).
2. **An informed proposal** (the Hessian's, :mod:`basin_volume.curvature`, or the user's
   diagonal preconditioner): importance sampling from it when its ESS is at least half the
   particles (exact for a quadratic basin).
3. **Annealing the cutoff** (:func:`_annealed`, Gaussian measure) when either estimate puts
   :math:`\log P` above :data:`_ANNEAL_FROM`: from a multiple of the cutoff where prior rays
   settle it down to the cutoff, through nested basins.
4. **Tempering from the proposal** (:func:`_tempered`) when there is one: deep basins whose
   shape the curvature describes roughly.
5. **Gaussian cooling** otherwise, described next.

**The path.** For a precision :math:`a` let :math:`G_a = N(m_a, I/a)` with
:math:`m_a = \theta_0(1 - a_1/a)`, where :math:`a_1 = 1/\sigma^2` for the Gaussian prior and
:math:`a_1 = 0` for the uniform measure. At large :math:`a`, :math:`G_a` is a tiny Gaussian at
:math:`\theta_0` lying almost entirely inside the basin; at :math:`a = a_1` it is the prior;
for the uniform measure the path ends, past :math:`a \to 0`, at Lebesgue measure. Along any
ray from :math:`\theta_0` (with :math:`c = \omega\cdot\theta_0`)

.. math::

    I_a(\omega, r) = \int_0^r G_a(\theta_0 + t\omega)\, t^{D-1} dt
      = \left(\tfrac{a}{2\pi}\right)^{D/2} e^{-\lVert\theta_0\rVert^2 a_1^2 / 2a}\,
        J(r;\ D-1,\ a,\ -a_1 c),

so :math:`Z_a = G_a(K) = A_D\,\mathbb{E}_\omega[I_a(\omega, r(\omega))]` and the radius
:math:`r(\omega)` of the basin never changes along the path: moving from :math:`a` to
:math:`a'` reweights every particle by :math:`I_{a'}/I_a` *without evaluating the objective*.
This is Gaussian cooling (Lovász & Vempala; Cousins & Vempala) in polar coordinates.

**The sampler.** Particles are directions with their radii. It starts from :math:`N` draws of
the uniform law, weighted to :math:`\pi_{a_0} \propto I_{a_0}` by the fraction of
:math:`G_{a_0}`'s ray mass inside the basin (:math:`a_0` chosen so that the effective sample
size, ESS, stays above 90%), then repeats: pick the next :math:`a` by bisection so the ESS of
the incremental weights is half the particles; multiply the estimate by their mean; resample;
move every particle with Metropolis-Hastings steps that leave
:math:`\pi_a(\omega) \propto I_a(\omega, r(\omega))` invariant. The product of the mean
incremental weights is an unbiased estimate of :math:`\mu(K)` (Del Moral, Doucet & Jasra 2006),
whose logarithm :func:`smc_sampler` returns.

**The moves** learn the basin's shape. Each move fits a normal law :math:`N(m, C)` to the
particles' points :math:`\theta - \theta_0 = R\omega` (with :math:`R` drawn along each ray from
:math:`G_a` restricted to :math:`[0, r]`), diagonal or dense; each half of the particles moves
with the law fitted to the other half, so that no particle's move depends on where it is
through the fit (a shared fit biased :math:`\log\hat Z` up by :math:`O(D/N)`). The
particles are lifted to :math:`x = R\omega` with :math:`R` from the normal's law given the direction
(:meth:`~basin_volume.projected_normal.ProjectedNormal.radial`), which makes
:math:`\pi_a(\hat x)/q(\hat x)\cdot N(x; m, C)` the lifted target (:math:`q` the projected
normal density, :math:`\hat x = x/\lVert x\rVert`). A preconditioned Crank-Nicolson proposal
:math:`x' = m + \sqrt{1-\rho^2}(x - m) + \rho\, C^{1/2} z` preserves :math:`N(m, C)`, so it is
accepted with probability :math:`\min(1, w(\hat x')/w(\hat x))`, :math:`w = \pi_a/q`: when the
fit is good every move is accepted, whatever the dimension. :math:`\rho` adapts to an
acceptance rate near 30%. Where the objective has a gradient (``gradients``), the moves of
this path and of tempering are Hamiltonian instead, steered by :math:`\nabla w`, which the
gradient of :math:`\delta` at each ray's wall gives (:func:`basin_volume.smc_paths._move`).
A move's end is checked for an earlier crossing only where the move could still be accepted:
a check can only shorten the ray, so a move rejected before it stays rejected.
A level's moves go on until the particles have decorrelated from where the level found them
(:func:`basin_volume.smc_paths._mix`), or for ``n_moves`` moves.

The sampler is a generator, like :func:`basin_volume.radius.radius_search`: it yields batches
of directions whose radii it needs and is sent back their :class:`Radii` (and, with
``gradients``, wall points whose gradients it needs); evaluating the objective (batched, on
any device) is the caller's business.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Generator

import numpy as np
import torch

from .integrals import log_sphere_area
from .projected_normal import ProjectedNormal
from .smc_base import (
    GradientRequest,
    Radii,
    RadiusRequest,
    SMCRun,
    _ess,
    _log_mean_exp,
    _Path,
    _step,
    _systematic,
    _unit,
)
from .smc_paths import _annealed, _mix, _move, _State, _tempered

__all__ = ["GradientRequest", "Radii", "RadiusRequest", "SMCRun", "smc_sampler"]

_START_ESS = 0.9  # ESS fraction required of the cooling path's first weighting
_MAX_RAY_BATCHES = 8  # batches of prior rays (of n_particles) drawn at most after the pilot
_MIN_PILOT = 16  # prior rays in the pilot at least (else a quarter of the particles)
_BOUNDED_RSE = 0.1  # relative standard error of bounded weights' mean that settles a run
_ANNEAL_FROM = -25.0  # log estimate above which the cutoff is annealed (about 36 levels)


def smc_sampler(
    center: torch.Tensor,
    *,
    sigma: float | None,
    n_particles: int,
    n_moves: int | None,
    seed: int,
    start: ProjectedNormal | Callable[[], ProjectedNormal | None] | None = None,
    dense: bool = False,
    ess_target: float = 0.5,
    gradients: bool = False,
    bidirectional: bool = False,
) -> Generator[RadiusRequest | GradientRequest, Radii | torch.Tensor | None, SMCRun]:
    r"""Estimate :math:`\log\mu(K)` by SMC along the Gaussian-cooling path.

    Parameters
    ----------
    center : torch.Tensor
        :math:`\theta_0` (float64 on the CPU is used internally).
    sigma : float or None
        Prior scale; ``None`` for the uniform measure (Lebesgue volume).
    n_particles : int
        Particles :math:`N`.
    n_moves : int or None
        Metropolis-Hastings moves of every particle at each level; ``None``: until the
        particles decorrelate from the level's start (:func:`basin_volume.smc_paths._mix`).
    seed : int
        Seed of every random choice of the run.
    start : ProjectedNormal or callable, optional
        An informed proposal (or a function that builds one when first needed, or gives
        ``None``): importance sampling from it when its weights are even enough, else
        tempering from it to the target (``kind="tempered"``). Without one the sampler
        follows the Gaussian-cooling path. For the Gaussian measure, prior rays are tried
        first either way.
    dense : bool
        Fit dense (``True``) or diagonal (default) reference laws for the moves. Dense
        references are experimental: fitted from a few hundred particles they overfit them
        and biased the estimate in tests (docs/accuracy.md).
    ess_target : float
        Fraction of :math:`N` the ESS of each level's incremental weights is held to.
    gradients : bool
        Ask for the gradient of :math:`\delta` at the rays' walls (:class:`GradientRequest`)
        to steer the moves of tempering and Gaussian cooling (Hamiltonian Monte Carlo, see
        :func:`basin_volume.smc_paths._move`).
    bidirectional : bool
        Along the tempering path, walk the final particles back to the proposal too
        (``SMCRun.log_z_reverse``, :func:`basin_volume.smc_paths._tempered`); about twice
        the moves.

    Yields
    ------
    RadiusRequest or GradientRequest
        Directions whose radii are needed next (send back :class:`Radii`), or wall points
        whose gradients are (send back a ``[B, D]`` tensor, or ``None``).

    Returns
    -------
    SMCRun
    """
    theta0 = center.detach().to("cpu", torch.float64)
    d = theta0.numel()
    n = n_particles
    gen = torch.Generator().manual_seed(seed)
    path = _Path(d, 0.0 if sigma is None else 1.0 / sigma**2, float(theta0 @ theta0))

    def normals(k: int) -> torch.Tensor:
        return torch.randn(k, d, generator=gen, dtype=torch.float64)

    def weigh(q: ProjectedNormal, k: int = n, check: bool = True):
        """k draws of q with their radii and log importance weights (log pi - log q).

        Each search starts at the drawn point's own distance: for a prior ray, whether the
        basin reaches the prior's draw is what its weight mostly turns on. Such a search sees
        only the neighbourhood of the draw, and a ray that left the basin closer in and came
        back would count its mass up to a later crossing: with ``check``, the heaviest rays'
        segments are checked (``RadiusRequest.weights``)."""
        x = q.sample(normals(k))
        omega = _unit(x)
        guess = torch.linalg.vector_norm(x, dim=1)
        offset = log_sphere_area(d) - q.log_density(omega)
        radii = yield RadiusRequest(omega, guess, torch.full((k,), math.nan),
                                    weights=offset if check else None)
        return x, radii, path.log_mass(path.end, radii.radius, omega @ theta0) + offset

    def probe():
        """Isotropic directions (importance sampling's classic proposal), a quarter of a
        batch, for the importance floor alone; drawn from their own generator, so that they
        leave the path's draws as they were."""
        k = max(_MIN_PILOT, n // 4)
        gen_probe = torch.Generator().manual_seed((seed + 1) % 2**63)
        omega = _unit(torch.randn(k, d, generator=gen_probe, dtype=torch.float64))
        radii = yield RadiusRequest(omega, torch.full((k,), math.nan), torch.full((k,), math.nan))
        return _log_mean_exp(log_sphere_area(d) + path.log_mass(path.end, radii.radius,
                                                                omega @ theta0))

    ess_start = math.nan
    importance = []  # plain importance-sampling estimates on the way (SMCRun.importance)
    if sigma is not None:
        # Prior rays first. Their weights w lie in [0, 1], so Var w <= E w = P and the relative
        # standard error of a mean of m of them is at most 1/sqrt(mP): a pilot's estimate of
        # P tells how many rays settle it to _BOUNDED_RSE. (The pilot's own sample error is no
        # guide: it misses the rare large weights of a small basin.) The rays are drawn
        # afresh, in batches of at most n, so that their number does not depend on them; the
        # pilot, which only sizes them, is a quarter of a batch, and its rays go unchecked.
        prior = ProjectedNormal(torch.full((d,), sigma**2, dtype=torch.float64), -theta0)
        x, radii, ell = yield from weigh(prior, max(_MIN_PILOT, n // 4), check=False)
        p_hat = math.exp(_log_mean_exp(ell))
        need = math.ceil(1.0 / (p_hat * _BOUNDED_RSE**2)) if p_hat > 0 else math.inf
        if need <= _MAX_RAY_BATCHES * n:
            log_w, r = [], []
            for first in range(0, need, n):
                _, found, new = yield from weigh(prior, min(n, need - first))
                log_w.append(new)
                r.append(found.radius)
            log_w, r = torch.cat(log_w), torch.cat(r)
            return SMCRun(_log_mean_exp(log_w), "is", 0, _ess(log_w), (), (), r, log_w)
        ess_start, slope, r = _ess(ell), radii.slope, radii.radius
        pilot = _log_mean_exp(ell)
        importance.append(pilot)
    if callable(start):
        start = start()
    reach = -math.inf  # the informed proposal's estimate (low when its weights are uneven)
    if start is not None:
        # An informed proposal: importance sampling if its weights are even enough.
        xs, radii_s, ell_s = yield from weigh(start)
        ess_start = _ess(ell_s)
        if ess_start >= ess_target * n:
            return SMCRun(_log_mean_exp(ell_s), "is", 0, ess_start, (), (), radii_s.radius, ell_s)
        reach = _log_mean_exp(ell_s)
        importance.append(reach)
    importance.insert(0, (yield from probe()))
    if sigma is not None and max(pilot, reach) > _ANNEAL_FROM:
        # The basin holds a part of the prior that annealing the cutoff reaches in a few tens
        # of levels: the path that needs no proposal to be right. It starts from N prior rays.
        x, radii, _ = yield from weigh(prior)
        run = yield from _annealed(
            prior, x, radii, theta0, path, n_moves=n_moves, ess_target=ess_target,
            gen=gen, ess_start=ess_start,
        )
        return dataclasses.replace(run, importance=tuple(importance))
    if start is not None:
        run = yield from _tempered(
            start, xs, radii_s, ell_s, theta0, path, n_moves=n_moves, ess_target=ess_target,
            gen=gen, ess_start=ess_start, gradients=gradients, reverse=bidirectional,
        )
        return dataclasses.replace(run, importance=tuple(importance))

    # The cooling path's start: uniform directions, weighted to pi_{a0}.
    omega = _unit(normals(n))
    if sigma is not None:  # the pilot's typical radius and slope as every search's start
        guess, slope = r.nanmedian().expand(n).clone(), slope.nanmedian().expand(n).clone()
    else:
        guess = slope = torch.full((n,), math.nan)
    radii = yield RadiusRequest(omega, guess, slope)
    r, slope, c = radii.radius, radii.slope, omega @ theta0
    if sigma is None:
        with np.errstate(divide="ignore"):
            ess_start = _ess(d * torch.log(r))

    def start_weights(a: float) -> torch.Tensor:
        whole_ray = path.log_mass(a, torch.full_like(r, math.inf), c)
        return path.log_density(a, c) + path.log_mass(a, r, c) - whole_ray

    finite = r[torch.isfinite(r) & (r > 0)]
    if finite.numel() == 0:  # no ray holds any mass: the basin is empty as far as seen
        return SMCRun(-math.inf, "is", 0, ess_start, (), (), r, torch.full_like(r, -math.inf))
    # Rays of radius 0 weigh nothing at any a; the ESS asked of the start counts the others.
    log_a = math.log(d) - 2 * math.log(float(finite.median()))
    while _ess(start_weights(math.exp(log_a))) < _START_ESS * int((r > 0).sum()):
        log_a += 1.0
    a = math.exp(log_a)
    log_w = start_weights(a)
    log_z = _log_mean_exp(log_w)
    keep = _systematic(log_w, gen)
    omega, r, slope, c = omega[keep], r[keep], slope[keep], c[keep]
    levels, acceptance, moves, correlation, rho = [], [], [], [], {"fitted": 0.5}
    state = _State(omega, r, slope, path.log_mass(a, r, c), family=keep)
    while a != path.end:
        c = state.omega @ theta0
        a_next = _next_level(path, a, state.r, c, state.log_p, ess_target * n)
        log_i_next = path.log_mass(a_next, state.r, c)
        inc = log_i_next - state.log_p
        log_z += _log_mean_exp(inc)
        # the walls stay where they are along the path: so do their gradients
        state = dataclasses.replace(state, log_p=log_i_next).resampled(_systematic(inc, gen))
        a = a_next
        levels.append(a)
        state, rate, made, left = yield from _mix(state, n_moves, lambda move, st, a=a: _move(
            1, None, st, lambda rr, oo: path.log_mass(a, rr, oo @ theta0),
            weight=(1.0, 0.0), rho=rho, path=path, theta0=theta0, gen=gen,
            gradients=gradients, a=a, dense=dense,
        ))
        acceptance.append(rate)
        moves.append(made)
        correlation.append(left)
    return SMCRun(log_z, "smc", len(levels), ess_start, tuple(levels), tuple(acceptance),
                  state.r, state.log_p, tuple(importance), tuple(moves),
                  correlation=tuple(correlation))


def _next_level(path: _Path, a: float, r, c, log_i, target: float) -> float:
    """The next precision: as far towards the path's end as keeps the ESS at ``target``
    (bisection in log a; the uniform measure's end a = 0 is tried first, then e^-60 a)."""
    if _ess(path.log_mass(path.end, r, c) - log_i) >= target:
        return path.end
    far = math.log(path.end) if path.end > 0 else math.log(a) - 60.0
    return math.exp(_step(
        lambda log_a: _ess(path.log_mass(math.exp(log_a), r, c) - log_i) >= target,
        math.log(a), far,
    ))

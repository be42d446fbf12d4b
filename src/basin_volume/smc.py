r"""Sequential Monte Carlo over directions along a Gaussian-cooling path.

The basin's measure is :math:`\mu(K) = A_D\,\mathbb{E}_{\omega}[I(\omega)]` (see
:mod:`basin_volume.estimator`). Importance sampling draws :math:`\omega` from one fixed proposal
and fails when :math:`\log I(\omega)/q(\omega)` varies by more than a few nats; this sampler
instead follows a path of measures along which every step is easy.

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

**The moves** learn the basin's shape. Each level fits a normal law :math:`N(m, C)` to the
particles' points :math:`\theta - \theta_0 = R\omega` (with :math:`R` drawn along each ray from
:math:`G_a` restricted to :math:`[0, r]`), diagonal or dense. The particles are lifted to
:math:`x = R\omega` with :math:`R` from the normal's law given the direction
(:meth:`~basin_volume.projected_normal.ProjectedNormal.radial`), which makes
:math:`\pi_a(\hat x)/q(\hat x)\cdot N(x; m, C)` the lifted target (:math:`q` the projected
normal density, :math:`\hat x = x/\lVert x\rVert`). A preconditioned Crank-Nicolson proposal
:math:`x' = m + \sqrt{1-\rho^2}(x - m) + \rho\, C^{1/2} z` preserves :math:`N(m, C)`, so it is
accepted with probability :math:`\min(1, w(\hat x')/w(\hat x))`, :math:`w = \pi_a/q`: when the
fit is good every move is accepted, whatever the dimension. :math:`\rho` adapts to an
acceptance rate near 30%.

**A shortcut.** Before any of this, :math:`N` directions from a *start proposal*
(the user's preconditioner, else the prior-ray law for the Gaussian measure, else uniform)
are importance-weighted to the target; if their ESS is at least half of :math:`N` the plain
importance-sampling estimate is returned (a one-level SMC). Prior-ray weights are the prior
mass of each ray inside the basin, bounded by 1, so their sample variance can be trusted:
up to eight batches of them are drawn, and the estimate is kept once its relative standard
error is at most 10%. This is exact for a basin that is the whole space (every prior-ray
weight is 1), quick for basins that hold a sizeable part of the prior, and exact for a
proposal matched to the basin.

The sampler is a generator, like :func:`basin_volume.radius.radius_search`: it yields batches
of directions whose radii it needs and is sent back their :class:`Radii`; evaluating the
objective (batched, on any device) is the caller's business.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np
import torch

from .integrals import log_radial_integral, log_sphere_area
from .projected_normal import ProjectedNormal

__all__ = ["Radii", "RadiusRequest", "SMCRun", "smc_sampler"]

_START_ESS = 0.9  # ESS fraction required of the cooling path's first weighting
_BISECTIONS = 50
_ACCEPT_TARGET = 0.3
_MAX_RAY_BATCHES = 8  # batches of prior rays drawn at most after the pilot
_BOUNDED_RSE = 0.1  # relative standard error of bounded weights' mean that settles a run
_ANNEAL_FROM = -25.0  # log estimate above which the cutoff is annealed (about 36 levels)
_MAX_LEVEL = 2.0**20  # largest cutoff multiplier the annealing starts from


@dataclass(frozen=True)
class RadiusRequest:
    """Directions whose basin radii the sampler needs, with first guesses."""

    omegas: torch.Tensor  # [B, D] float64 unit rows
    guesses: torch.Tensor  # [B] first radius to try
    slopes: torch.Tensor  # [B] log-log slope to assume (nan: unknown)
    level: float = 1.0  # the radii are wanted where delta = level * cutoff


@dataclass(frozen=True)
class Radii:
    """The answer to a :class:`RadiusRequest`."""

    radius: torch.Tensor  # [B] radius where delta = cutoff (inf: unbounded)
    slope: torch.Tensor  # [B] measured log-log slope (nan: unknown)


@dataclass(frozen=True)
class SMCRun:
    """One run (replica) of :func:`smc_sampler`.

    Attributes
    ----------
    log_z : float
        The estimate of :math:`\\log\\mu(K)`.
    kind : str
        ``"is"`` when the start proposal's importance weights were good enough on their own,
        else ``"smc"``.
    levels : int
        Cooling levels (0 for ``"is"``).
    ess_start : float
        ESS of the start proposal's weights (a diagnostic of how hard the basin is).
    path : tuple of float
        The precisions :math:`a` of the levels (0 for the uniform measure's last one).
    acceptance : tuple of float
        Mean acceptance rate of the moves at each level.
    radii : torch.Tensor
        The final particles' radii.
    log_integrals : torch.Tensor
        The final particles' :math:`\\log I(\\omega)` under the target measure.
    """

    log_z: float
    kind: str
    levels: int
    ess_start: float
    path: tuple[float, ...] = ()
    acceptance: tuple[float, ...] = ()
    radii: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    log_integrals: torch.Tensor = field(default_factory=lambda: torch.empty(0))


def _log_j(r: torch.Tensor, n: int, a: float, b: torch.Tensor) -> torch.Tensor:
    out = log_radial_integral(r.numpy(), n, a, b.numpy())
    return torch.from_numpy(np.asarray(out, dtype=np.float64)).reshape(r.shape)


def _ess(log_w: torch.Tensor) -> float:
    if not bool(torch.isfinite(log_w).any()):
        return 0.0
    w = torch.exp(log_w - log_w.max())
    return float(w.sum() ** 2 / (w * w).sum())


def _relative_error(log_w: torch.Tensor) -> float:
    """Standard error of the mean of :math:`e^{\\ell}` relative to the mean."""
    if not bool(torch.isfinite(log_w).any()):
        return math.inf
    w = torch.exp(log_w - log_w.max())
    return float(w.std() / (w.mean() * math.sqrt(w.numel())))


def _log_mean_exp(x: torch.Tensor) -> float:
    return float(torch.logsumexp(x, 0)) - math.log(x.numel())


@dataclass(frozen=True)
class _Path:
    """The cooling path's ray masses :math:`\\log I_a(\\omega, r)`; ``a = 0`` is Lebesgue."""

    dim: int
    a1: float  # 1/sigma^2, or 0 for the uniform measure
    norm2: float  # |theta0|^2

    def log_mass(self, a: float, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        d = self.dim
        if a == 0.0:
            with np.errstate(divide="ignore"):
                return d * torch.log(r) - math.log(d)
        const = 0.5 * d * math.log(a / (2 * math.pi)) - 0.5 * self.norm2 * self.a1**2 / a
        return const + _log_j(r, d - 1, a, -self.a1 * c)

    def log_density(self, a: float, c: torch.Tensor) -> torch.Tensor:
        """Log density, relative to uniform, of the direction of :math:`G_a` about theta0."""
        return log_sphere_area(self.dim) + self.log_mass(a, torch.full_like(c, math.inf), c)

    @property
    def end(self) -> float:
        return self.a1


def _systematic(log_w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    w = torch.exp(log_w - log_w.max())
    cdf = torch.cumsum(w / w.sum(), 0)
    n = log_w.numel()
    u = (torch.rand(1, generator=gen, dtype=torch.float64) + torch.arange(n)) / n
    return torch.searchsorted(cdf, u).clamp_max(n - 1)


def _truncated_radius(r, c, a: float, path: _Path, gen: torch.Generator) -> torch.Tensor:
    """Approximate draws of t in [0, r] with density ∝ t^{D-1} exp(-a t^2/2 - a1 c t).

    Used only to fit the moves' reference law, so a 256-point grid suffices.
    """
    n, grid = path.dim - 1, 256
    b = -path.a1 * c
    if a > 0:
        mode = (b + torch.sqrt(b * b + 4 * a * n)) / (2 * a)
        sd = 1.0 / torch.sqrt(n / mode**2 + a)
        hi = torch.minimum(r, mode + 10 * sd)
        lo = torch.where(r < mode - 10 * sd, r * max(0.0, 1 - 40 / path.dim), mode - 10 * sd)
    else:
        hi, lo = r, r * max(0.0, 1 - 40 / path.dim)
    lo = lo.clamp_min(0.0)
    hi = torch.where(torch.isfinite(hi), hi, lo + 1.0)
    t = lo[:, None] + (hi - lo)[:, None] * torch.linspace(0, 1, grid, dtype=torch.float64)
    log_p = n * t.clamp_min(1e-300).log() - 0.5 * a * t * t + b[:, None] * t
    pick = torch.multinomial(torch.softmax(log_p, 1), 1, generator=gen)[:, 0]
    jitter = (torch.rand(r.shape, generator=gen, dtype=torch.float64) - 0.5) * (hi - lo) / grid
    return (t[torch.arange(len(r)), pick] + jitter).clamp(min=lo, max=hi)


def smc_sampler(
    center: torch.Tensor,
    *,
    sigma: float | None,
    n_particles: int,
    n_moves: int,
    seed: int,
    start: ProjectedNormal | Callable[[], ProjectedNormal | None] | None = None,
    dense: bool = False,
    ess_target: float = 0.5,
) -> Generator[RadiusRequest, Radii, SMCRun]:
    r"""Estimate :math:`\log\mu(K)` by SMC along the Gaussian-cooling path.

    Parameters
    ----------
    center : torch.Tensor
        :math:`\theta_0` (float64 on the CPU is used internally).
    sigma : float or None
        Prior scale; ``None`` for the uniform measure (Lebesgue volume).
    n_particles : int
        Particles :math:`N`.
    n_moves : int
        Metropolis-Hastings moves of every particle at each level.
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

    Yields
    ------
    RadiusRequest
        Directions whose radii are needed next; send back :class:`Radii`.

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

    def weigh(q: ProjectedNormal):
        """N draws of q with their radii and log importance weights (log pi - log q)."""
        x = q.sample(normals(n))
        omega = _unit(x)
        radii = yield RadiusRequest(omega, torch.full((n,), math.nan), torch.full((n,), math.nan))
        ell = log_sphere_area(d) + path.log_mass(path.end, radii.radius, omega @ theta0)
        return x, radii, ell - q.log_density(omega)

    ess_start = math.nan
    if sigma is not None:
        # Prior rays first. Their weights w lie in [0, 1], so Var w <= E w = P and the relative
        # standard error of a mean of n of them is at most 1/sqrt(nP): a pilot batch's estimate
        # of P tells how many batches settle it to _BOUNDED_RSE. (The pilot's own sample
        # error is no guide: it misses the rare large weights of a small basin.) The batches
        # are drawn afresh, so that their number does not depend on them.
        prior = ProjectedNormal(torch.full((d,), sigma**2, dtype=torch.float64), -theta0)
        x, radii, ell = yield from weigh(prior)
        p_hat = math.exp(_log_mean_exp(ell))
        need = math.ceil(1.0 / (n * p_hat * _BOUNDED_RSE**2)) if p_hat > 0 else math.inf
        if need <= _MAX_RAY_BATCHES:
            log_w, r = [], []
            for _ in range(need):
                _, found, new = yield from weigh(prior)
                log_w.append(new)
                r.append(found.radius)
            log_w, r = torch.cat(log_w), torch.cat(r)
            return SMCRun(_log_mean_exp(log_w), "is", 0, _ess(log_w), (), (), r, log_w)
        ess_start, slope, r = _ess(ell), radii.slope, radii.radius
        pilot = (x, radii, _log_mean_exp(ell))
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
    if sigma is not None and max(pilot[2], reach) > _ANNEAL_FROM:
        # The basin holds a part of the prior that annealing the cutoff reaches in a few tens
        # of levels: the path that needs no proposal to be right.
        return (yield from _annealed(
            prior, pilot[0], pilot[1], theta0, path, n_moves=n_moves, ess_target=ess_target,
            gen=gen, ess_start=ess_start,
        ))
    if start is not None:
        return (yield from _tempered(
            start, xs, radii_s, ell_s, theta0, path, n_moves=n_moves, ess_target=ess_target,
            gen=gen, ess_start=ess_start,
        ))

    # The cooling path's start: uniform directions, weighted to pi_{a0}.
    omega = _unit(normals(n))
    guess = r.nanmedian().expand(n).clone() if sigma is not None else torch.full((n,), math.nan)
    radii = yield RadiusRequest(omega, guess, slope if sigma is not None else guess.clone())
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
    log_i = path.log_mass(a, r, c)
    levels, rho = [], 0.5
    acceptance = []
    while a != path.end:
        a_next = _next_level(path, a, r, c, log_i, ess_target * n)
        log_i_next = path.log_mass(a_next, r, c)
        inc = log_i_next - log_i
        log_z += _log_mean_exp(inc)
        keep = _systematic(inc, gen)
        omega, r, slope, c, log_i = omega[keep], r[keep], slope[keep], c[keep], log_i_next[keep]
        a = a_next
        levels.append(a)

        # Fit the reference law to the particles' points, then lift them to x = R omega.
        t = _truncated_radius(r, c, a, path, gen)
        ref = ProjectedNormal.fit(omega * t[:, None], dense=dense, with_mean=sigma is not None)
        x = omega * ref.radial(omega, gen)[:, None]
        phi = log_i - ref.log_density(omega)
        accepted = []
        for _ in range(n_moves):
            x_new = ref.crank_nicolson(x, rho, normals(n))
            omega_new = _unit(x_new)
            radii = yield RadiusRequest(omega_new, r.clone(), slope.clone())
            r_new, c_new = radii.radius, omega_new @ theta0
            log_i_new = path.log_mass(a, r_new, c_new)
            phi_new = log_i_new - ref.log_density(omega_new)
            u = torch.rand(n, generator=gen, dtype=torch.float64).log()
            acc = u < torch.nan_to_num(phi_new - phi, nan=-math.inf)
            rate = float(acc.double().mean())
            accepted.append(rate)
            x = torch.where(acc[:, None], x_new, x)
            omega = torch.where(acc[:, None], omega_new, omega)
            r = torch.where(acc, r_new, r)
            slope = torch.where(acc, radii.slope, slope)
            c = torch.where(acc, c_new, c)
            log_i = torch.where(acc, log_i_new, log_i)
            phi = torch.where(acc, phi_new, phi)
            rho = min(1.0, max(1e-3, rho * math.exp(rate - _ACCEPT_TARGET)))
        acceptance.append(sum(accepted) / max(len(accepted), 1))
    return SMCRun(log_z, "smc", len(levels), ess_start, tuple(levels), tuple(acceptance), r, log_i)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True)


def _tempered(q: ProjectedNormal, x, radii: Radii, ell, theta0, path: _Path, *, n_moves: int,
              ess_target: float, gen: torch.Generator, ess_start: float):
    r"""SMC from the proposal :math:`q` to the target along :math:`\pi_\beta \propto
    q^{1-\beta}\pi^\beta`.

    Reweighting from :math:`\beta` to :math:`\beta'` multiplies by
    :math:`e^{(\beta'-\beta)\ell}`, :math:`\ell = \log\pi - \log q` (no evaluation); the
    moves (:func:`_move`) alternate between :math:`q` itself as the reference (good where the
    proposal is) and a diagonal normal law fitted to the particles at each level (which
    learns some of what :math:`q` misses).
    """
    n, d = x.shape
    r, slope = radii.radius, radii.slope
    omega = _unit(x)
    log_p = ell + q.log_density(omega)
    log_z, beta = 0.0, 0.0
    rho = {"proposal": 0.5, "fitted": 0.5}
    levels, acceptance = [], []
    if not bool(torch.isfinite(ell).any()):
        return SMCRun(-math.inf, "smc", 0, ess_start, (), (), r, ell)

    def log_target(rr, oo):
        return log_sphere_area(d) + path.log_mass(path.end, rr, oo @ theta0)

    while beta < 1.0:
        beta_next = _next_beta(ell, beta, ess_target * n)
        inc = (beta_next - beta) * ell
        log_z += _log_mean_exp(inc)
        keep = _systematic(inc, gen)
        omega, r, slope, log_p = omega[keep], r[keep], slope[keep], log_p[keep]
        beta = beta_next
        levels.append(beta)
        rates = []
        for move in range(n_moves):
            omega, r, slope, log_p, rate = yield from _move(
                move, q, omega, r, slope, log_p, log_target, weight=(beta, 1.0 - beta),
                rho=rho, path=path, theta0=theta0, gen=gen,
            )
            rates.append(rate)
        ell = log_p - q.log_density(omega)
        acceptance.append(sum(rates) / max(len(rates), 1))
    return SMCRun(log_z, "tempered", len(levels), ess_start, tuple(levels), tuple(acceptance),
                  r, log_p - log_sphere_area(d))


def _annealed(prior: ProjectedNormal, x, radii: Radii, theta0, path: _Path, *, n_moves: int,
              ess_target: float, gen: torch.Generator, ess_start: float):
    r"""SMC over prior rays with the cutoff annealed down: :math:`\lambda_0\varepsilon > \dots >
    \varepsilon`.

    The target at level :math:`\lambda` is the prior-ray law weighted by each ray's prior mass
    inside the basin of cutoff :math:`\lambda\varepsilon`, :math:`\pi_\lambda(\omega) = A_D
    I(\omega; r_\lambda(\omega))`, whose total is that basin's probability. Basins of a
    star-shaped family are nested (:math:`r_{\lambda'} \le r_\lambda` for
    :math:`\lambda' < \lambda`), so every incremental weight :math:`I(\omega;
    r_{\lambda'})/I(\omega; r_\lambda)` lies in [0, 1]. The start :math:`\lambda_0` is the
    smallest power of 4 at which the prior rays' weights have an ESS of half the particles;
    each next level is chosen so that the ESS of the incremental weights *predicted* from
    each ray's log-log slope is half the particles, then the radii there are searched (from
    the predicted ones). The moves are those of :func:`_tempered` with the prior's normal law
    as the first reference; its lifted points are the prior draws themselves.
    """
    n, d = x.shape
    omega = _unit(x)
    c = omega @ theta0

    def log_target(r, cc):
        return log_sphere_area(d) + path.log_mass(path.end, r, cc)

    level = 1.0
    while True:
        level *= 4.0
        guess = _predicted(radii.radius, radii.slope, 4.0)
        found = yield RadiusRequest(omega, guess, radii.slope, level=level)
        log_p = log_target(found.radius, c)
        if _ess(log_p - prior.log_density(omega)) >= ess_target * n or level >= _MAX_LEVEL:
            break
        radii = found
    ell = log_p - prior.log_density(omega)
    log_z = _log_mean_exp(ell)
    keep = _systematic(ell, gen)
    omega, x, c, r, slope = omega[keep], x[keep], c[keep], found.radius[keep], found.slope[keep]
    log_p = log_p[keep]
    levels, acceptance, rho = [level], [], {"proposal": 0.5, "fitted": 0.5}
    while True:
        rates = []
        for move in range(n_moves):
            state = yield from _move(
                move, prior, omega, r, slope, log_p, lambda rr, oo: log_target(rr, oo @ theta0),
                weight=(1.0, 0.0), rho=rho, path=path, theta0=theta0, gen=gen, level=level,
            )
            omega, r, slope, log_p, rate = state
            rates.append(rate)
        acceptance.append(sum(rates) / max(len(rates), 1))
        if level == 1.0:
            break
        c = omega @ theta0
        nxt = _next_cutoff(level, r, slope, c, log_p, log_target, ess_target * n)
        found = yield RadiusRequest(omega, _predicted(r, slope, level / nxt), slope, level=nxt)
        log_p_next = log_target(found.radius, c)
        inc = log_p_next - log_p
        log_z += _log_mean_exp(inc)
        keep = _systematic(inc, gen)
        omega, r, slope = omega[keep], found.radius[keep], found.slope[keep]
        log_p = log_p_next[keep]
        level = nxt
        levels.append(level)
    return SMCRun(log_z, "annealed", len(levels), ess_start, tuple(levels), tuple(acceptance),
                  r, log_p - log_sphere_area(d))


def _predicted(r: torch.Tensor, slope: torch.Tensor, factor: float) -> torch.Tensor:
    """Radii at ``factor`` times the cutoff, from each ray's log-log slope (2 if unknown)."""
    k = torch.where(torch.isfinite(slope) & (slope > 0), slope, torch.full_like(slope, 2.0))
    return r * factor ** (1.0 / k)


def _next_cutoff(level: float, r, slope, c, log_p, log_target, target: float) -> float:
    """The next cutoff multiplier: 1 if the predicted ESS allows, else by bisection."""

    def ess_to(nxt: float) -> float:
        return _ess(log_target(_predicted(r, slope, nxt / level), c) - log_p)

    if ess_to(1.0) >= target:
        return 1.0
    lo, hi = 0.0, math.log(level)  # log multipliers: lo too far, hi fine
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        if ess_to(math.exp(mid)) >= target:
            hi = mid
        else:
            lo = mid
    return math.exp(hi) if hi < math.log(level) else math.exp(lo)


def _move(move: int, q: ProjectedNormal, omega, r, slope, log_p, log_target, *, weight, rho,
          path: _Path, theta0, gen: torch.Generator, level: float = 1.0):
    r"""One Metropolis-Hastings move of every particle, for the target
    :math:`\pi^{w_0} q^{w_1}` (``weight``), alternating references (even moves: ``q``; odd:
    a diagonal normal law fitted to points of the basin along the particles' rays).

    The particles are lifted to :math:`x = \omega R`, :math:`R` from the reference's radial law;
    a Crank-Nicolson proposal preserves the reference's normal law, so it is accepted with
    probability :math:`\min(1, w(\hat x')/w(\hat x))`, :math:`w` = target / reference density.
    Returns the new ``(omega, r, slope, log_p, acceptance rate)``.
    """
    n, d = omega.shape
    kind = "proposal" if move % 2 == 0 else "fitted"
    if kind == "proposal":
        ref = q
    else:
        # Points of the basin along the particles' rays (uniform in it when the particles
        # follow pi), whose covariance is the basin's shape.
        t = _truncated_radius(r.clamp_max(1e300), omega @ theta0, path.end, path, gen)
        ref = ProjectedNormal.fit(omega * t[:, None], dense=False, with_mean=q.mean is not None)
    w_p, w_q = weight
    log_q = q.log_density(omega)
    x = omega * ref.radial(omega, gen)[:, None]
    phi = w_p * log_p + w_q * log_q - ref.log_density(omega)
    x_new = ref.crank_nicolson(x, rho[kind], torch.randn(n, d, generator=gen, dtype=torch.float64))
    omega_new = _unit(x_new)
    found = yield RadiusRequest(omega_new, r.clone(), slope.clone(), level=level)
    log_p_new = log_target(found.radius, omega_new)
    phi_new = w_p * log_p_new + w_q * q.log_density(omega_new) - ref.log_density(omega_new)
    u = torch.rand(n, generator=gen, dtype=torch.float64).log()
    acc = u < torch.nan_to_num(phi_new - phi, nan=-math.inf)
    rate = float(acc.double().mean())
    rho[kind] = min(1.0, max(1e-3, rho[kind] * math.exp(rate - _ACCEPT_TARGET)))
    return (
        torch.where(acc[:, None], omega_new, omega),
        torch.where(acc, found.radius, r),
        torch.where(acc, found.slope, slope),
        torch.where(acc, log_p_new, log_p),
        rate,
    )


def _next_beta(ell: torch.Tensor, beta: float, target: float) -> float:
    """The next inverse temperature: 1 if the ESS allows, else by bisection."""
    if _ess((1.0 - beta) * ell) >= target:
        return 1.0
    lo, hi = beta, 1.0  # lo: fine; hi: too far
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        if _ess((mid - beta) * ell) >= target:
            lo = mid
        else:
            hi = mid
    return lo if lo > beta else hi


def _next_level(path: _Path, a: float, r, c, log_i, target: float) -> float:
    """The next precision: the path's end if the ESS allows, else by bisection in log a."""

    def ess_to(a_next: float) -> float:
        return _ess(path.log_mass(a_next, r, c) - log_i)

    if ess_to(path.end) >= target:
        return path.end
    far = math.log(path.end) if path.end > 0 else math.log(a) - 60.0
    lo, hi = far, math.log(a)  # lo: too far (ESS too small); hi: fine
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        if ess_to(math.exp(mid)) >= target:
            hi = mid
        else:
            lo = mid
    return math.exp(hi) if hi < math.log(a) else math.exp(lo)

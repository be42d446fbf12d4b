r"""The SMC paths that start from a proposal: tempering from it (:func:`_tempered`) and
annealing the cutoff over prior rays (:func:`_annealed`), with the Metropolis-Hastings move both
use (:func:`_move`). :func:`basin_volume.smc.smc_sampler` picks among them; see its module.
"""

from __future__ import annotations

import math

import torch

from . import smc_base as base
from .integrals import log_sphere_area
from .projected_normal import ProjectedNormal
from .smc_base import Radii, RadiusRequest, SMCRun, _Path

_MAX_LEVEL = 2.0**20  # largest cutoff multiplier the annealing starts from


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
    omega = base._unit(x)
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
        log_z += base._log_mean_exp(inc)
        keep = base._systematic(inc, gen)
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
    the predicted ones). The moves are those of :func:`_tempered`, with the prior's normal law
    as the first reference.
    """
    n, d = x.shape
    omega = base._unit(x)
    c = omega @ theta0

    def log_target(r, cc):
        return log_sphere_area(d) + path.log_mass(path.end, r, cc)

    level = 1.0
    while True:
        level *= 4.0
        guess = _predicted(radii.radius, radii.slope, 4.0)
        found = yield RadiusRequest(omega, guess, radii.slope, level=level)
        log_p = log_target(found.radius, c)
        if base._ess(log_p - prior.log_density(omega)) >= ess_target * n or level >= _MAX_LEVEL:
            break
        radii = found
    ell = log_p - prior.log_density(omega)
    log_z = base._log_mean_exp(ell)
    keep = base._systematic(ell, gen)
    omega, c, r, slope = omega[keep], c[keep], found.radius[keep], found.slope[keep]
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
        found = yield RadiusRequest(omega, _predicted(r, slope, nxt / level), slope, level=nxt)
        log_p_next = log_target(found.radius, c)
        inc = log_p_next - log_p
        log_z += base._log_mean_exp(inc)
        keep = base._systematic(inc, gen)
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
    """The next cutoff multiplier: as far towards 1 as keeps the predicted ESS at ``target``
    (bisection in the log of the multiplier)."""

    def ok(log_next: float) -> bool:
        predicted = _predicted(r, slope, math.exp(log_next) / level)
        return base._ess(log_target(predicted, c) - log_p) >= target

    return math.exp(base._step(ok, math.log(level), 0.0))


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
        t = base._truncated_radius(r.clamp_max(1e300), omega @ theta0, path.end, path, gen)
        ref = ProjectedNormal.fit(omega * t[:, None], dense=False, with_mean=q.mean is not None)
    w_p, w_q = weight
    log_q = q.log_density(omega)
    x = omega * ref.radial(omega, gen)[:, None]
    phi = w_p * log_p + w_q * log_q - ref.log_density(omega)
    x_new = ref.crank_nicolson(x, rho[kind], torch.randn(n, d, generator=gen, dtype=torch.float64))
    omega_new = base._unit(x_new)
    found = yield RadiusRequest(omega_new, r.clone(), slope.clone(), level=level)
    log_p_new = log_target(found.radius, omega_new)
    phi_new = w_p * log_p_new + w_q * q.log_density(omega_new) - ref.log_density(omega_new)
    u = torch.rand(n, generator=gen, dtype=torch.float64).log()
    acc = u < torch.nan_to_num(phi_new - phi, nan=-math.inf)
    rate = float(acc.double().mean())
    rho[kind] = min(1.0, max(1e-3, rho[kind] * math.exp(rate - base._ACCEPT_TARGET)))
    return (
        torch.where(acc[:, None], omega_new, omega),
        torch.where(acc, found.radius, r),
        torch.where(acc, found.slope, slope),
        torch.where(acc, log_p_new, log_p),
        rate,
    )


def _next_beta(ell: torch.Tensor, beta: float, target: float) -> float:
    """The next inverse temperature: as far towards 1 as keeps the ESS at ``target``."""
    return base._step(lambda b: base._ess((b - beta) * ell) >= target, beta, 1.0)




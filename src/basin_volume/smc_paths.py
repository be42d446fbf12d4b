r"""The SMC paths that start from a proposal: tempering from it (:func:`_tempered`) and
annealing the cutoff over prior rays (:func:`_annealed`), with the Metropolis-Hastings move both
use (:func:`_move`). :func:`basin_volume.smc.smc_sampler` picks among them; see its module.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from . import smc_base as base
from .integrals import log_sphere_area
from .projected_normal import ProjectedNormal
from .smc_base import GradientRequest, Radii, RadiusRequest, SMCRun, _Path

_MAX_LEVEL = 2.0**20  # largest cutoff multiplier the annealing starts from
_LEAPFROG = 4  # leapfrog steps of a gradient-steered move
_HMC_ACCEPT = 0.6  # acceptance rate its step is adapted to
_DECORRELATED = 0.1  # a level's moves stop once no statistic correlates more with its start
_MAX_MOVES = 30  # moves per level at most, decorrelated or not
_COMPONENTS = 3  # principal directions of the particles watched for decorrelation
_CHECK_MARGIN = 0.05  # nats of log acceptance a move's end may lose in its segment's check


@dataclass(frozen=True)
class _State:
    r"""The particles: directions, radii, log-log slopes, log target, the gradient of
    :math:`\delta` at each ray's wall (``None`` until asked for), and each particle's family:
    the index of its parent at the last resampling (``None`` before any)."""

    omega: torch.Tensor
    r: torch.Tensor
    slope: torch.Tensor
    log_p: torch.Tensor
    grad: torch.Tensor | None = None
    family: torch.Tensor | None = None

    def __getitem__(self, keep: torch.Tensor) -> _State:
        def pick(v):
            return None if v is None else v[keep]

        return _State(self.omega[keep], self.r[keep], self.slope[keep], self.log_p[keep],
                      pick(self.grad), pick(self.family))

    def resampled(self, parents: torch.Tensor) -> _State:
        """The rows ``parents`` (a resampling's draw), each in the family of its parent."""
        return dataclasses.replace(self[parents], family=parents.clone())

    def put(self, rows: torch.Tensor, part: _State) -> _State:
        """A copy with the particles ``rows`` replaced by ``part``'s."""
        def merged(mine, theirs):
            if mine is None:
                return None
            out = mine.clone()
            out[rows] = theirs
            return out

        return _State(merged(self.omega, part.omega), merged(self.r, part.r),
                      merged(self.slope, part.slope), merged(self.log_p, part.log_p),
                      merged(self.grad, part.grad), merged(self.family, part.family))


def _halves(state: _State, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two halves of the particles for the split fit of :func:`_move`, whole families on each
    side: right after resampling, copies of one parent sit at one point, and a law fitted to
    a copy of a particle is as dependent on it as one fitted to the particle itself. Families
    are taken in random order until half the particles; where families are so large that a
    side would hold under a quarter of them, the particles are split at random instead."""
    n = state.omega.shape[0]
    random = torch.randperm(n, generator=gen)
    if state.family is None:
        return random.chunk(2)
    ids, family, counts = torch.unique(state.family, return_inverse=True, return_counts=True)
    order = torch.randperm(ids.numel(), generator=gen)
    first = torch.zeros(ids.numel(), dtype=torch.bool)
    first[order[counts[order].cumsum(0) <= n // 2]] = True
    side = first[family]
    mine, other = side.nonzero().squeeze(1), (~side).nonzero().squeeze(1)
    if min(mine.numel(), other.numel()) < n // 4:
        return random.chunk(2)
    return mine, other


def _tempered(q: ProjectedNormal, x, radii: Radii, ell, theta0, path: _Path, *, n_moves: int | None,
              ess_target: float, gen: torch.Generator, ess_start: float, gradients: bool,
              reverse: bool = False):
    r"""SMC from the proposal :math:`q` to the target along :math:`\pi_\beta \propto
    q^{1-\beta}\pi^\beta`.

    Reweighting from :math:`\beta` to :math:`\beta'` multiplies by
    :math:`e^{(\beta'-\beta)\ell}`, :math:`\ell = \log\pi - \log q` (no evaluation); the
    moves (:func:`_move`) alternate between :math:`q` itself as the reference (good where the
    proposal is) and a diagonal normal law fitted to the particles at each level (which
    learns some of what :math:`q` misses).

    With ``reverse`` the final particles then walk the same levels back to :math:`q`
    (bidirectional Monte Carlo; Grosse, Ghahramani & Adams 2015): reweighting from
    :math:`\beta` down to :math:`\beta'` multiplies by :math:`e^{(\beta'-\beta)\ell}`, and
    the product of the mean weights estimates :math:`Z_0/Z_1 = 1/\mu(K)`. Started from exact
    draws of :math:`\pi` it would be unbiased for :math:`1/\mu`, so minus its logarithm
    would lie above :math:`\log\mu` on average, as the forward estimate lies below; started
    from the forward run's particles it is not guaranteed to, but where the moves fail to mix
    the two move apart, and their gap measures how far (``SMCRun.log_z_reverse``).
    """
    n, d = x.shape
    omega = base._unit(x)
    state = _State(omega, radii.radius, radii.slope, ell + q.log_density(omega))
    log_z, beta = 0.0, 0.0
    rho = {"proposal": 0.5, "fitted": 0.5}
    levels, acceptance, moves, correlation = [], [], [], []
    if not bool(torch.isfinite(ell).any()):
        return SMCRun(-math.inf, "smc", 0, ess_start, (), (), state.r, ell)

    def log_target(rr, oo):
        return log_sphere_area(d) + path.log_mass(path.end, rr, oo @ theta0)

    def mixed(st: _State, beta: float):
        return (yield from _mix(st, n_moves, lambda move, st: _move(
            move, q, st, log_target, weight=(beta, 1.0 - beta), rho=rho, path=path,
            theta0=theta0, gen=gen, gradients=gradients,
        )))

    while beta < 1.0:
        beta_next = _next_beta(ell, beta, ess_target * n)
        inc = (beta_next - beta) * ell
        log_z += base._log_mean_exp(inc)
        state = state.resampled(base._systematic(inc, gen))
        beta = beta_next
        levels.append(beta)
        state, rate, made, left = yield from mixed(state, beta)
        ell = state.log_p - q.log_density(state.omega)
        acceptance.append(rate)
        moves.append(made)
        correlation.append(left)
    final = state
    log_z_reverse = math.nan
    if reverse:
        log_inverse = 0.0
        for beta_back in [*levels[-2::-1], 0.0]:
            inc = (beta_back - beta) * ell
            log_inverse += base._log_mean_exp(inc)
            beta = beta_back
            if beta > 0.0:  # at the proposal itself nothing is left to move
                state = state.resampled(base._systematic(inc, gen))
                state = (yield from mixed(state, beta))[0]
                ell = state.log_p - q.log_density(state.omega)
        log_z_reverse = -log_inverse
    return SMCRun(log_z, "tempered", len(levels), ess_start, tuple(levels), tuple(acceptance),
                  final.r, final.log_p - log_sphere_area(d), moves=tuple(moves),
                  log_z_reverse=log_z_reverse, correlation=tuple(correlation))


def _annealed(prior: ProjectedNormal, x, radii: Radii, theta0, path: _Path, *, n_moves: int | None,
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
    the predicted ones). The first level's searches start next to the crossings, so the
    heaviest rays there are checked for an earlier exit (``RadiusRequest.weights``). The
    moves are those of :func:`_tempered`, with the prior's normal law as the first reference.
    """
    n, d = x.shape
    omega = base._unit(x)
    c = omega @ theta0

    def log_target(r, cc):
        return log_sphere_area(d) + path.log_mass(path.end, r, cc)

    level = 1.0
    log_q = prior.log_density(omega)
    offset = log_sphere_area(d) - log_q  # log w = log mass + offset
    while True:
        level *= 4.0
        guess = _predicted(radii.radius, radii.slope, 4.0)
        found = yield RadiusRequest(omega, guess, radii.slope, level=level, weights=offset)
        log_p = log_target(found.radius, c)
        if base._ess(log_p - log_q) >= ess_target * n or level >= _MAX_LEVEL:
            break
        radii = found
    ell = log_p - log_q
    log_z = base._log_mean_exp(ell)
    state = _State(omega, found.radius, found.slope, log_p).resampled(base._systematic(ell, gen))
    levels, acceptance, moves, correlation = [level], [], [], []
    rho = {"proposal": 0.5, "fitted": 0.5}
    while True:
        state, rate, made, left = yield from _mix(
            state, n_moves, lambda move, st, level=level: _move(
                move, prior, st, lambda rr, oo: log_target(rr, oo @ theta0),
                weight=(1.0, 0.0), rho=rho, path=path, theta0=theta0, gen=gen,
                gradients=False, level=level,
            ))
        acceptance.append(rate)
        moves.append(made)
        correlation.append(left)
        if level == 1.0:
            break
        omega, r, slope = state.omega, state.r, state.slope
        c = omega @ theta0
        nxt = _next_cutoff(level, r, slope, c, state.log_p, log_target, ess_target * n)
        found = yield RadiusRequest(omega, _predicted(r, slope, nxt / level), slope, level=nxt,
                                    check=True)
        log_p_next = log_target(found.radius, c)
        inc = log_p_next - state.log_p
        log_z += base._log_mean_exp(inc)
        state = _State(omega, found.radius, found.slope, log_p_next).resampled(
            base._systematic(inc, gen))
        level = nxt
        levels.append(level)
    return SMCRun(log_z, "annealed", len(levels), ess_start, tuple(levels), tuple(acceptance),
                  r, log_p - log_sphere_area(d), moves=tuple(moves),
                  correlation=tuple(correlation))


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


def _mix(state: _State, n_moves: int | None, move):
    r"""One level's moves, ``move(k, state)`` for k = 0, 1, ... (generators of
    :func:`_move`): ``n_moves`` of them, or with ``None`` as many as it takes for the
    particles to forget where the level found them, at most :data:`_MAX_MOVES`.

    Forgetting is measured by the correlation, across particles, between the level's start
    and now of the log target and of the projections on the start's :data:`_COMPONENTS`
    leading principal directions (the slow ones for moves that are blind to them); the moves
    stop when none exceeds :data:`_DECORRELATED`. A fixed count does not know how hard the
    level is: where the moves are short, particles would still sit near their parents, copies
    of one parent would stay alike, and the next reweighting would count them as independent,
    which biases :math:`\log\hat Z` down.
    Returns the state, the mean acceptance rate, the number of moves and the correlation
    left after them (:attr:`~basin_volume.smc_base.SMCRun.correlation`).
    """
    start, axes = _statistics(state, None)
    rates = []
    for k in range(_MAX_MOVES if n_moves is None else n_moves):
        state, rate = yield from move(k, state)
        rates.append(rate)
        left = _correlation(start, _statistics(state, axes)[0])
        if n_moves is None and left < _DECORRELATED:
            break
    return state, sum(rates) / len(rates), len(rates), left


def _statistics(state: _State, axes: torch.Tensor | None):
    """``([n, 1 + k] statistics, axes)``: the log target and the directions' projections on
    ``axes`` (the leading principal directions of ``state`` when ``None``)."""
    omega = state.omega
    if axes is None:
        centred = omega - omega.mean(0)
        axes = torch.linalg.svd(centred, full_matrices=False)[2][:_COMPONENTS].T
    return torch.cat([state.log_p[:, None], omega @ axes], 1), axes


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest Pearson correlation across rows between matching columns of ``a`` and
    ``b``, over the rows finite in both (constant columns count as decorrelated)."""
    ok = (torch.isfinite(a) & torch.isfinite(b)).all(1)
    if int(ok.sum()) < 3:
        return 0.0
    a, b = a[ok] - a[ok].mean(0), b[ok] - b[ok].mean(0)
    den = torch.linalg.vector_norm(a, dim=0) * torch.linalg.vector_norm(b, dim=0)
    r = (a * b).sum(0) / den
    return float(torch.nan_to_num(r, nan=0.0).max())


def _move(move: int, q: ProjectedNormal | None, state: _State, log_target, *, weight, rho,
          path: _Path, theta0, gen: torch.Generator, gradients: bool, level: float = 1.0,
          a: float | None = None, dense: bool = False):
    r"""One Metropolis-Hastings move of every particle, for the target
    :math:`\pi^{w_0} q^{w_1}` (``weight``; :math:`\pi \propto I_a`, ``a`` the path's end by
    default), alternating references (even moves: ``q``; odd moves, and all without ``q``: a
    normal law fitted to points of the basin along the particles' rays, diagonal unless
    ``dense``, each half of the particles with the law of the other half, :func:`_halves`).

    The particles are lifted to :math:`x = \omega R`, :math:`R` from the reference's radial law
    given :math:`\omega`, which makes :math:`p(x) = N(x; m, C)\,e^{w(\hat x)}` the lifted
    target, :math:`w = \log(\text{target}/\text{reference density})` on the sphere.

    Without ``gradients`` the proposal is preconditioned Crank-Nicolson,
    :math:`x' = m + \sqrt{1-\rho^2}(x - m) + \rho\,C^{1/2}z`, which preserves
    :math:`N(m, C)` and is accepted with probability :math:`\min(1, e^{w(\hat x') -
    w(\hat x)})`: enough where the reference fits, blind where the basin bends away from it.
    With them it is Hamiltonian Monte Carlo split around the reference (Beskos et al. 2011;
    Shahbaba et al. 2014): momentum :math:`P \sim N(0, C)`, :data:`_LEAPFROG` steps of a kick
    :math:`P \mathrel{+}= \tfrac\epsilon2 C\nabla w`, the reference's own flow (a rotation
    by the angle :math:`\epsilon` in :math:`(x - m, P)`, exact for :math:`N(m, C)`) and a
    second kick, accepted with :math:`e^{-\Delta H}`, :math:`H = \tfrac12 |x - m|^2_{C^{-1}}
    + \tfrac12 |P|^2_{C^{-1}} - w`. :math:`\nabla w` needs :math:`\nabla\delta` at each
    ray's wall (:meth:`_Path.grad_log_mass`), asked for with a :class:`GradientRequest`; the
    objective's answer ``None`` leaves the kicks out. ``rho`` holds the step (:math:`\rho`
    or :math:`\sin\epsilon`) of each reference, adapted to an acceptance rate near 30%
    (Crank-Nicolson) or :data:`_HMC_ACCEPT` (Hamiltonian).
    Returns the new state and the acceptance rate.
    """
    n, d = state.omega.shape
    a = path.end if a is None else a
    if gradients and state.grad is None:
        state = dataclasses.replace(state, grad=(yield GradientRequest(state.omega, state.r)))
    kind = "proposal" if move % 2 == 0 and q is not None else "fitted"
    step = dict(q=q, log_target=log_target, weight=weight, path=path, theta0=theta0, gen=gen,
                a=a, level=level)
    if kind == "proposal":
        new, accept = yield from _metropolis(q, rho[kind], state, **step)
    else:
        # Points of the basin along the particles' rays (uniform in it when the particles
        # follow pi), whose covariance is the basin's shape. Each half of the particles moves
        # with the law fitted to the other half: a law fitted to a particle itself would be
        # denser where that particle is, and the moves would push it away, a bias of order
        # D/N. The same holds for a copy of it, so families stay on one side (_halves).
        t = base._truncated_radius(state.r.clamp_max(1e300), state.omega @ theta0, a, path, gen)
        points = state.omega * t[:, None]
        halves = _halves(state, gen)
        with_mean = path.a1 > 0 if q is None else q.mean is not None
        new, accept = state, torch.zeros(n, dtype=torch.bool)
        for mine, other in ((halves[0], halves[1]), (halves[1], halves[0])):
            ref = ProjectedNormal.fit(points[other], dense=dense, with_mean=with_mean)
            moved, ok = yield from _metropolis(ref, rho[kind], state[mine], **step)
            new = new.put(mine, moved)
            accept[mine] = ok
    rate = float(accept.double().mean())
    target = base._ACCEPT_TARGET if state.grad is None else _HMC_ACCEPT
    rho[kind] = min(1.0, max(1e-3, rho[kind] * math.exp(rate - target)))
    return new, rate


def _metropolis(ref: ProjectedNormal, rho: float, state: _State, *, q, log_target, weight,
                path: _Path, theta0, gen: torch.Generator, a: float, level: float):
    """One move of :func:`_move` with the reference ``ref`` and step ``rho``: the new state
    and which particles accepted."""
    n, d = state.omega.shape
    w_p, w_q = weight

    def log_w(omega, log_p):
        out = w_p * log_p - ref.log_density(omega)
        return out + w_q * q.log_density(omega) if w_q else out

    x = state.omega * ref.radial(state.omega, gen)[:, None]
    z = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if state.grad is None:
        omega_new = base._unit(ref.crank_nicolson(x, rho, z))
        found = yield RadiusRequest(omega_new, state.r.clone(), state.slope.clone(), level=level)
        log_p_new, grad_new = log_target(found.radius, omega_new), None
        log_a = log_w(omega_new, log_p_new) - log_w(state.omega, state.log_p)
    else:
        def grad_w(omega, r, grad):
            g = w_p * path.grad_log_mass(a, r, omega, grad, theta0) - ref.grad_log_density(omega)
            return g + w_q * q.grad_log_density(omega) if w_q else g

        omega_new, found, grad_new, log_p_new, log_a = yield from _hamiltonian(
            ref, x, z, state, grad_w, log_w, log_target, math.asin(rho), level)
    log_u = torch.rand(n, generator=gen, dtype=torch.float64).log()
    log_a = torch.nan_to_num(log_a, nan=-math.inf)
    # The end's search started next to its parent's crossing and saw only that neighbourhood;
    # its segment is checked for an earlier exit (RadiusRequest.check) only where the move
    # could still be accepted. A check can only move the crossing in, which lowers log_a
    # (w_p log_p, the log target increasing with the radius), so a move rejected before it
    # is rejected after it too; _CHECK_MARGIN covers the two searches' rounding of the root.
    # The particle keeps the wall gradient its last kick used, so that a move back from it
    # starts with the kick this one ended with (the leapfrog map stays reversible).
    rows = (log_u < log_a + _CHECK_MARGIN).nonzero()[:, 0]
    if len(rows):
        checked = yield RadiusRequest(omega_new[rows], found.radius[rows].clone(),
                                      found.slope[rows].clone(), level=level, check=True)
        radius, slope = found.radius.clone(), found.slope.clone()
        radius[rows], slope[rows] = checked.radius, checked.slope
        log_p_checked = log_target(checked.radius, omega_new[rows])
        log_a[rows] += w_p * torch.nan_to_num(log_p_checked - log_p_new[rows], nan=0.0)
        log_p_new = log_p_new.clone()
        log_p_new[rows] = log_p_checked
        found = Radii(radius, slope)
    accept = log_u < log_a
    new = _State(
        torch.where(accept[:, None], omega_new, state.omega),
        torch.where(accept, found.radius, state.r),
        torch.where(accept, found.slope, state.slope),
        torch.where(accept, log_p_new, state.log_p),
        None if grad_new is None else torch.where(accept[:, None], grad_new, state.grad),
        state.family,
    )
    return new, accept


def _hamiltonian(ref: ProjectedNormal, x, z, state: _State, grad_w, log_w, log_target,
                 eps: float, level: float):
    r""":data:`_LEAPFROG` leapfrog steps from the lifted points ``x`` with momentum
    :math:`C^{1/2}z` (see :func:`_move`); ``grad_w(omega, r, wall gradients)`` is the ambient
    gradient of :math:`w` on the sphere. Returns the end points' ``(omega, Radii, wall
    gradients, log target)`` and the log acceptance ratio.

    In whitened coordinates this is plain HMC for :math:`\tfrac12|y|^2 - w`, the quadratic
    part integrated exactly: the kicks and the rotation are volume-preserving and reversible
    under a flip of the momentum, so :math:`e^{-\Delta H}` is the exact acceptance ratio
    whatever ``grad_w`` returns.
    """
    mean = 0.0 if ref.mean is None else ref.mean

    def kick(u, omega, found, grad):
        """Half a step (eps/2) of C grad_x w: the gradient on the sphere, lifted to x."""
        g = grad_w(omega, found.radius, grad)
        g = g - (g * omega).sum(1, keepdim=True) * omega  # tangent to the sphere
        g = g / torch.linalg.vector_norm(u + mean, dim=1, keepdim=True)
        return 0.5 * eps * ref.times_cov(torch.nan_to_num(g))

    def energy(u, mom, omega, log_p):
        quadratic = (u * ref.solve(u)).sum(1) + (mom * ref.solve(mom)).sum(1)
        return 0.5 * quadratic - log_w(omega, log_p)

    u, mom = x - mean, ref.sample(z) - mean
    omega, found, grad = state.omega, Radii(state.r, state.slope), state.grad
    h0 = energy(u, mom, omega, state.log_p)
    cos, sin = math.cos(eps), math.sin(eps)
    for _ in range(_LEAPFROG):
        mom = mom + kick(u, omega, found, grad)
        u, mom = u * cos + mom * sin, mom * cos - u * sin
        omega = base._unit(u + mean)
        found = yield RadiusRequest(omega, found.radius.clone(), found.slope.clone(), level=level)
        grad = yield GradientRequest(omega, found.radius)
        mom = mom + kick(u, omega, found, grad)
    log_p = log_target(found.radius, omega)
    return omega, found, grad, log_p, h0 - energy(u, mom, omega, log_p)


def _next_beta(ell: torch.Tensor, beta: float, target: float) -> float:
    """The next inverse temperature: as far towards 1 as keeps the ESS at ``target``."""
    return base._step(lambda b: base._ess((b - beta) * ell) >= target, beta, 1.0)




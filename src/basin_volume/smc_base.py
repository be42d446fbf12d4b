r"""The parts the SMC paths of :mod:`basin_volume.smc` share: the messages a sampler exchanges
with its caller (:class:`RadiusRequest`, :class:`Radii`), the run it returns (:class:`SMCRun`),
the ray masses of the Gaussian-cooling path (:class:`_Path`), weights' summaries and
resampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .integrals import log_radial_integral, log_sphere_area

__all__ = ["GradientRequest", "Radii", "RadiusRequest", "SMCRun"]

_BISECTIONS = 50
_ACCEPT_TARGET = 0.3


@dataclass(frozen=True)
class RadiusRequest:
    """Directions whose basin radii the sampler needs, with first guesses."""

    omegas: torch.Tensor  # [B, D] float64 unit rows
    guesses: torch.Tensor  # [B] first radius to try
    slopes: torch.Tensor  # [B] log-log slope to assume (nan: unknown)
    level: float = 1.0  # the radii are wanted where delta = level * cutoff
    # Check every ray's segment for an earlier crossing, not only the rays whose evaluated
    # points hint at one: the end of a move, whose search starts at the parent's radius and
    # sees only the neighbourhood of a crossing. A move prefers rays whose radius came out too
    # long, so a missed first crossing biases the estimate upwards.
    check: bool = False
    # Per-ray log-weight offsets: a ray's importance weight is log_mass(omega, radius) plus
    # its offset. The rays are then checked as with ``check``, heaviest first, until those
    # left unchecked hold at most a small share of the weight (a prior ray's search, which
    # starts at the drawn point's distance, sees only the neighbourhood of a crossing too).
    weights: torch.Tensor | None = None


@dataclass(frozen=True)
class GradientRequest:
    """Boundary points :math:`\\theta_0 + r\\omega` where the sampler wants the gradient of
    :math:`\\delta`; the answer is a ``[B, D]`` float64 tensor (rows of unbounded rays are not
    read), or ``None`` when the objective has no gradient (the moves then go without)."""

    omegas: torch.Tensor  # [B, D] float64 unit rows
    radii: torch.Tensor  # [B]


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
        The path (:mod:`basin_volume.smc`): ``"is"`` when prior rays or the informed
        proposal's importance weights settled it, ``"annealed"`` (the cutoff), ``"tempered"``
        (from the proposal) or ``"smc"`` (Gaussian cooling).
    levels : int
        Cooling levels (0 for ``"is"``).
    ess_start : float
        ESS of the start proposal's weights (a diagnostic of how hard the basin is).
    path : tuple of float
        The levels: precisions :math:`a` of the cooling path (0 for the uniform measure's
        last one), inverse temperatures :math:`\\beta` of tempering, or cutoff multipliers
        :math:`\\lambda` of annealing.
    acceptance : tuple of float
        Mean acceptance rate of the moves at each level.
    radii : torch.Tensor
        The final particles' radii.
    log_integrals : torch.Tensor
        The final particles' :math:`\\log I(\\omega)` under the target measure.
    importance : tuple of float
        Plain importance-sampling estimates of :math:`\\log\\mu(K)` the run made on its way
        (isotropic directions, the prior-ray pilot, the informed proposal), each from exact
        weights, so unbiased in :math:`\\mu(K)`: by Markov's inequality one exceeds the truth by
        :math:`x` nats with probability at most :math:`e^{-x}`. A path's estimate far below
        them is wrong (:attr:`basin_volume.VolumeResult.below_importance`).
    moves : tuple of int
        Moves made at each level (fixed, or until the particles decorrelated).
    log_z_reverse : float
        ``bidirectional`` tempering: the estimate of :math:`\\log\\mu(K)` from walking the
        final particles back to the proposal (:func:`basin_volume.smc_paths._tempered`);
        ``nan`` otherwise.
    correlation : tuple of float
        At each level, the correlation its moves left between the particles and where the
        level found them (the largest, across particles, of the log target's and of the
        projections on the start's leading principal directions:
        :func:`basin_volume.smc_paths._mix`). Near 1, the moves hardly moved the particles:
        copies of one parent still agree, and the next reweighting counts them as independent.
    """

    log_z: float
    kind: str
    levels: int
    ess_start: float
    path: tuple[float, ...] = ()
    acceptance: tuple[float, ...] = ()
    radii: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    log_integrals: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    importance: tuple[float, ...] = ()
    moves: tuple[int, ...] = ()
    log_z_reverse: float = math.nan
    correlation: tuple[float, ...] = ()


def _log_j(r: torch.Tensor, n: int, a: float, b: torch.Tensor) -> torch.Tensor:
    out = log_radial_integral(r.numpy(), n, a, b.numpy())
    return torch.from_numpy(np.asarray(out, dtype=np.float64)).reshape(r.shape)


def _ess(log_w: torch.Tensor) -> float:
    if not bool(torch.isfinite(log_w).any()):
        return 0.0
    w = torch.exp(log_w - log_w.max())
    return float(w.sum() ** 2 / (w * w).sum())


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

    def grad_log_mass(self, a: float, r: torch.Tensor, omega: torch.Tensor, g: torch.Tensor,
                      theta0: torch.Tensor) -> torch.Tensor:
        r"""The gradient in :math:`\omega` (ambient, ``[N, D]``) of
        :math:`\log I_a(\omega, r(\omega))`, ``g`` the gradient of :math:`\delta` at the
        boundary points :math:`\theta_0 + r\omega`.

        The basin's wall moves with the direction as :math:`\nabla_\omega r = -r\,g /
        (\omega\cdot g)` (differentiate :math:`\delta(\theta_0 + r\omega) = \varepsilon`);
        :math:`\partial_r \log I = r^{D-1} e^{-a r^2/2 - a_1 c r}/J` (Lebesgue: :math:`D/r`)
        and, with :math:`c = \omega\cdot\theta_0`, :math:`\partial_c \log I = -a_1
        \mathbb{E}[t]` under the ray's truncated radial law. Rays that are unbounded, or whose
        wall the gradient does not describe (:math:`\omega\cdot g \le 0`, not finite), get
        no wall term.
        """
        d = self.dim
        dot = (omega * g).sum(1)
        wall = torch.isfinite(r) & (r > 0) & (dot > 0) & torch.isfinite(dot)
        r_ok = torch.where(wall, r, torch.ones_like(r))
        if a == 0.0:
            d_r, d_c = d / r_ok, torch.zeros_like(r)
        else:
            b = -self.a1 * (omega @ theta0)
            log_j = _log_j(r, d - 1, a, b)
            d_r = torch.exp((d - 1) * r_ok.log() - 0.5 * a * r_ok**2 + b * r_ok
                            - _log_j(r_ok, d - 1, a, b))
            d_c = -self.a1 * torch.exp(_log_j(r, d, a, b) - log_j)
        grad_r = -r_ok[:, None] * torch.nan_to_num(g) / torch.where(wall, dot, 1.0)[:, None]
        d_r = torch.where(wall, d_r, torch.zeros_like(d_r))
        return d_r[:, None] * grad_r + torch.nan_to_num(d_c)[:, None] * theta0

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


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True)


def _step(ok: Callable[[float], bool], here: float, end: float) -> float:
    """How far from ``here`` towards ``end`` a step may go: ``end`` if ``ok(end)``, else the
    farthest point found ``ok`` by bisection (``here`` is), or a hair past ``here`` when no
    point is, so that the path always moves."""
    if ok(end):
        return end
    fine, far = here, end
    for _ in range(_BISECTIONS):
        mid = 0.5 * (fine + far)
        fine, far = (mid, far) if ok(mid) else (fine, mid)
    return fine if fine != here else far

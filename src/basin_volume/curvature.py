r"""A proposal from the objective's curvature at the centre: the basin's quadratic picture.

Near :math:`\theta_0` a smooth objective is :math:`\delta(\theta_0 + x) \approx \tfrac12 x^\top H
x` (the gradient vanishes at a minimum; a KL basin's Hessian is the Fisher information), so the
basin is close to the ellipsoid :math:`x^\top M x \le 1` with :math:`M = H / 2\varepsilon`. For
the uniform measure the directions of that ellipsoid's points follow the angular central
Gaussian with covariance :math:`M^{-1}` *exactly*: with it every direction's importance weight
is the same. Uniform points of the ellipsoid have covariance :math:`M^{-1}/(D+2)`, so the
ellipsoid acts on directions like the Gaussian factor :math:`e^{-(D+2)\,x^\top M x/2}`; under
the Gaussian prior :math:`N(0, \sigma^2 I)` (in :math:`x`: mean :math:`-\theta_0`) the product
of the two is the normal law

.. math:: N(\mu, P^{-1}),\qquad P = \kappa M + I/\sigma^2,\qquad \mu = -P^{-1}\theta_0/\sigma^2,

with :math:`\kappa = D + 2`, whose projected normal law
(:class:`~basin_volume.projected_normal.ProjectedNormal`) is the proposal: like the ellipsoid's
where the basin is narrower than the prior, like the prior rays' where the basin is flat.
When the prior's own bulk lies outside the ellipsoid (a narrow prior, or a centre far from
it), the basin's prior mass crowds against the wall at its most probable point, and
:math:`\kappa` grows to the Lagrange multiplier that puts :math:`\mu` on the wall
(:func:`_stiffness`). Negative curvature (not a minimum) is clipped to flat. A real basin is
rarely quadratic that far out, and the prior's density changes fast across the wall, so
:class:`CurvatureProposal` then measures the basin's radius along directions between the
mean's and the prior mean's (a dozen radius searches) and moves the mean to the most probable
point of the real wall it finds (:func:`wall_scale`).

The Hessian comes from :mod:`torch.func` (reverse over reverse, in chunks of rows): dense up to
:data:`DENSE_MAX_DIM` parameters, its diagonal up to :data:`MAX_DIM`, nothing beyond (each row
costs one Hessian-vector product, counted as :data:`EVALS_PER_HVP` evaluations of the
objective).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .projected_normal import ProjectedNormal
from .radius import RayStatus, find_radius

__all__ = [
    "DENSE_MAX_DIM", "EVALS_PER_GRADIENT", "EVALS_PER_HVP", "MAX_DIM", "CurvatureProposal",
    "curvature_proposal", "gradients", "hessian", "wall_scale",
]

DENSE_MAX_DIM = 2000  # a dense eigendecomposition costs O(D^3) and dense moves O(N D^2)
MAX_DIM = 20000
EVALS_PER_GRADIENT = 2  # a gradient costs about two evaluations
EVALS_PER_HVP = 4  # a Hessian-vector product: a gradient and two more
_WALL_EVALS = 40  # evaluations of each radius search for the proposal's wall point at most
_WALL_STEPS = 8  # golden sections of the search for the most probable wall point


def hessian(
    fn: Callable[[torch.Tensor], torch.Tensor],
    center: torch.Tensor,
    *,
    dense: bool,
    chunk: int = 64,
) -> torch.Tensor:
    """The Hessian of ``fn`` at ``center`` (``[D, D]``), or its diagonal (``[D]``), in float64.

    Rows are computed ``chunk`` at a time as Hessian-vector products with basis vectors
    (:func:`torch.func.vjp` of :func:`torch.func.grad`, vectorised by :func:`torch.func.vmap`).
    Raises whatever :mod:`torch.func` raises when ``fn`` is not differentiable by it.
    """
    c = center.detach()
    d = c.numel()
    _, pullback = torch.func.vjp(torch.func.grad(fn), c)
    rows = torch.func.vmap(lambda v: pullback(v)[0])
    out = torch.empty((d, d) if dense else (d,), dtype=torch.float64)
    for start in range(0, d, chunk):
        stop = min(d, start + chunk)
        basis = torch.zeros(stop - start, d, dtype=c.dtype, device=c.device)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        block = rows(basis).detach().to("cpu", torch.float64)
        if dense:
            out[start:stop] = block
        else:
            out[start:stop] = block[torch.arange(stop - start), torch.arange(start, stop)]
    if dense:
        out = 0.5 * (out + out.T)
    if not bool(torch.isfinite(out).all()):
        raise ValueError("the Hessian of fn at the centre is not finite")
    return out


def gradients(fn: Callable[[torch.Tensor], torch.Tensor], points: torch.Tensor, *,
              chunk: int = 64) -> torch.Tensor:
    """The gradient of ``fn`` at each row of ``points`` (``[B, D]``), float64 on the CPU.

    ``chunk`` rows at a time through :func:`torch.func.vmap` of :func:`torch.func.grad`, or
    one row at a time where ``fn`` cannot be vectorised. Raises whatever :mod:`torch.func`
    raises when ``fn`` is not differentiable by it.
    """
    grad = torch.func.grad(fn)
    out = []
    for start in range(0, points.shape[0], chunk):
        rows = points[start : start + chunk]
        try:
            block = torch.func.vmap(grad)(rows)
        except Exception:  # noqa: BLE001 - fn does not vectorise: row by row
            block = torch.stack([grad(row) for row in rows])
        out.append(block.detach().to("cpu", torch.float64))
    return torch.cat(out) if out else torch.empty(0, points.shape[1], dtype=torch.float64)


def curvature_proposal(
    h: torch.Tensor, center: torch.Tensor, *, cutoff: float, sigma: float | None
) -> ProjectedNormal:
    r"""The projected normal :math:`N(\mu, P^{-1})` of the module docstring.

    Parameters
    ----------
    h : torch.Tensor
        The Hessian ``[D, D]`` or its diagonal ``[D]``.
    center : torch.Tensor
        :math:`\theta_0`.
    cutoff : float
        :math:`\varepsilon`.
    sigma : float or None
        Prior scale; ``None`` for the uniform measure (then :math:`P = (D+2)M` with flat
        directions given a tiny curvature, and :math:`\mu = 0`).
    """
    h = h.to(torch.float64)
    d = h.shape[0]
    if h.ndim == 2:
        lam, vec = torch.linalg.eigh(h)
    else:
        lam, vec = h, None
    m = lam.clamp_min(0.0) / (2.0 * cutoff)  # the eigenvalues of M
    theta0 = center.detach().to("cpu", torch.float64)
    if sigma is None:
        top = float(m.max())
        if top <= 0:
            raise ValueError("fn has no positive curvature at the centre")
        p = (m * (d + 2)).clamp_min(1e-12 * top * (d + 2))
    else:
        b = (theta0 if vec is None else vec.T @ theta0) / sigma**2
        p = m * _stiffness(m, b, sigma, d) + 1.0 / sigma**2
    if vec is None:
        cov = 1.0 / p
        mean = None if sigma is None else -cov * theta0 / sigma**2
    else:
        cov = (vec / p) @ vec.T
        cov = 0.5 * (cov + cov.T)
        mean = None if sigma is None else -(vec @ ((vec.T @ theta0) / p)) / sigma**2
    if sigma is None:
        cov = cov / (float(cov.diagonal().mean()) if cov.ndim == 2 else float(cov.mean()))
    if mean is not None and not math.isfinite(float(mean.norm())):
        raise ValueError("the curvature proposal's mean is not finite")
    return ProjectedNormal(cov, mean)


def _stiffness(m: torch.Tensor, b: torch.Tensor, sigma: float, d: int) -> float:
    r"""The factor :math:`\kappa \ge D + 2` on :math:`M` in the proposal's precision.

    Where the prior's mass lies outside the ellipsoid, the basin's prior mass crowds against
    its wall, at the most probable point :math:`x^* = -(I/\sigma^2 + \kappa M)^{-1}\theta_0/
    \sigma^2` of the wall (a Lagrange multiplier :math:`\kappa` with :math:`x^{*\top} M x^* =
    1`, in the eigenbasis of M where ``m`` and ``b`` live); the proposal is centred there.
    Otherwise :math:`\kappa = D + 2`, the ellipsoid's own shell (module docstring).
    """
    def wall(kappa: float) -> float:
        return float((m * (b / (1.0 / sigma**2 + kappa * m)) ** 2).sum())

    kappa = float(d + 2)
    if wall(kappa) <= 1.0:
        return kappa
    lo, hi = kappa, kappa
    while wall(hi) > 1.0:
        lo, hi = hi, hi * 4.0
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if wall(mid) > 1.0 else (lo, mid)
    return hi


def wall_scale(mean: torch.Tensor, center: torch.Tensor, radius: float) -> float:
    r"""The factor that moves the proposal's mean :math:`\mu` to the most probable point of
    the basin along its own direction :math:`\hat\mu`.

    Under the prior :math:`N(0, \sigma^2 I)` the density along the ray
    :math:`\theta_0 + t\hat\mu` grows until :math:`t^* = -\hat\mu\cdot\theta_0`, the
    point closest to the origin, so the most probable point of the segment inside the basin
    is at :math:`\min(r, t^*)`, with :math:`r` the ray's measured radius. The quadratic
    picture puts :math:`\mu` on its ellipsoid's wall; where the basin is shorter or longer
    than the ellipsoid along :math:`\hat\mu`, this moves it to the real one (1 when the
    basin is quadratic there).
    """
    norm = float(mean.norm())
    closest = -float(mean @ center.to(mean)) / norm
    return min(radius, max(closest, 0.0)) / norm if norm > 0 else 1.0


class CurvatureProposal:
    """:func:`curvature_proposal` for ``fn``, built when first called (``None`` if it cannot be).

    The SMC sampler calls it only when the prior rays do not settle the estimate, so basins
    that hold a sizeable part of the prior never pay for the Hessian. ``evals`` is what it
    cost (:data:`EVALS_PER_HVP` per Hessian row). With ``required`` a failure raises
    ``ValueError`` instead of giving ``None``.
    """

    def __init__(self, fn, center: torch.Tensor, *, cutoff: float, sigma: float | None,
                 required: bool = False):
        self._args = (fn, center, cutoff, sigma)
        self.required = required
        self.evals = 0
        self._built = False
        self._proposal: ProjectedNormal | None = None

    def __call__(self) -> ProjectedNormal | None:
        if not self._built:
            self._built = True
            self._proposal = self._build()
        return self._proposal

    def _on_the_wall(self, q: ProjectedNormal, h: torch.Tensor) -> ProjectedNormal:
        r"""``q`` with its mean moved to the most probable point of the basin's real wall
        found near it, where the quadratic picture put it on its ellipsoid's wall
        (:math:`\mu^\top M\mu = 1`: the prior's bulk lies outside).

        The directions searched run along the great circle from :math:`\hat\mu` to
        :math:`-\hat\theta_0` (towards the prior's mean), :math:`u(s) \propto (1-s)\hat\mu
        - s\hat\theta_0`; along each, one radius search and :func:`wall_scale` give the most
        probable point inside the basin, and golden sections in :math:`s` maximise its prior
        density. On a quadratic basin :math:`\mu` is that point already. The evaluations
        are counted in ``evals``.
        """
        fn, center, cutoff, sigma = self._args
        c = center.detach()
        mean = q.mean
        quadratic = float(mean.norm())
        h = h.to(torch.float64).clamp_min(0.0) if h.ndim == 1 else h.to(torch.float64)
        form = float((h * mean**2).sum() if h.ndim == 1 else mean @ h @ mean) / (2 * cutoff)
        if quadratic == 0 or form < 1.0 - 1e-6:
            return q  # the mean is inside the ellipsoid: the basin's mass is not at a wall
        theta0 = c.to("cpu", torch.float64)
        ends = (mean / quadratic, -theta0 / max(float(theta0.norm()), 1e-300))
        with torch.no_grad():
            f0 = float(fn(c))
        self.evals += 1
        points: dict[float, tuple[float, torch.Tensor]] = {}

        def score(s_: float) -> float:
            u = (1 - s_) * ends[0] + s_ * ends[1]
            u = u / u.norm()
            unit = u.to(c)
            with torch.no_grad():
                found = find_radius(lambda t: float(fn(c + t * unit)) - f0, cutoff,
                                    guess=quadratic, rtol=1e-4, max_evals=_WALL_EVALS)
            self.evals += found.n_evals
            if found.status is not RayStatus.CONVERGED:
                points[s_] = (-math.inf, mean)
            else:
                x = u * wall_scale(u, theta0, found.radius)  # |u| = 1
                points[s_] = (-float((theta0 + x).square().sum()) / (2 * sigma**2), x)
            return points[s_][0]

        lo, hi = 0.0, 1.0
        score(lo), score(hi)
        g = (math.sqrt(5) - 1) / 2
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        fa, fb = score(a), score(b)
        for _ in range(_WALL_STEPS):
            if fa >= fb:
                hi, b, fb = b, a, fa
                a = hi - g * (hi - lo)
                fa = score(a)
            else:
                lo, a, fa = a, b, fb
                b = lo + g * (hi - lo)
                fb = score(b)
        best, x = max(points.values(), key=lambda v: v[0])
        return q if not math.isfinite(best) else ProjectedNormal(q.cov, x)

    def _build(self) -> ProjectedNormal | None:
        fn, center, cutoff, sigma = self._args
        d = center.numel()
        if d > MAX_DIM:
            if self.required:
                raise ValueError(f"curvature='hessian' needs at most {MAX_DIM} parameters, got "
                                 f"{d}; use curvature='auto' or 'none'")
            return None
        try:
            self.evals = d * EVALS_PER_HVP
            h = hessian(fn, center, dense=d <= DENSE_MAX_DIM)
            q = curvature_proposal(h, center, cutoff=cutoff, sigma=sigma)
            return q if sigma is None else self._on_the_wall(q, h)
        except Exception as err:  # noqa: BLE001 - any failure means: no curvature here
            if self.required:
                raise ValueError(f"curvature='hessian' failed: {err}") from err
            return None

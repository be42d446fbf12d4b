r"""Projected normal laws on the sphere: the proposals and references of the SMC sampler.

If :math:`x \sim N(m, C)` in :math:`\mathbb{R}^D`, its direction :math:`\omega = x/\lVert x
\rVert` has, relative to the uniform distribution on the sphere, the density

.. math::

    q(\omega) = A_D\,(2\pi)^{-D/2}\,\lvert C\rvert^{-1/2}\, e^{-m^\top C^{-1} m/2}\,
        J\!\left(\infty;\ D-1,\ \omega^\top C^{-1}\omega,\ \omega^\top C^{-1} m\right),

with :math:`J(r; n, a, b) = \int_0^r t^n e^{-a t^2/2 + b t} dt` the radial integral of
:mod:`basin_volume.integrals`: the normal density integrated along the ray. With :math:`m = 0`
this is the angular central Gaussian :math:`q(\omega) = \lvert C\rvert^{-1/2}
(\omega^\top C^{-1}\omega)^{-D/2}` of :mod:`basin_volume.directions`; with :math:`m =
-\theta_0`, :math:`C = \sigma^2 I` it is the law of :math:`(\theta - \theta_0)/\lVert\theta -
\theta_0\rVert` for :math:`\theta` drawn from the prior (the *prior-ray* proposal).

Given the direction, the length :math:`R = \lVert x\rVert` has density proportional to
:math:`R^{D-1} e^{-aR^2/2 + bR}` (same :math:`a, b`); :meth:`ProjectedNormal.radial` samples it,
which lets a sampler on the sphere move in :math:`\mathbb{R}^D` with moves that preserve
:math:`N(m, C)` (see :mod:`basin_volume.smc`). Everything is float64 on the CPU.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .integrals import log_radial_integral, log_sphere_area

__all__ = ["ProjectedNormal"]


class ProjectedNormal:
    """The direction of :math:`x \\sim N(m, C)`, ``C`` diagonal (a vector) or dense (a matrix).

    Parameters
    ----------
    cov : torch.Tensor
        ``[D]`` positive variances, or a ``[D, D]`` symmetric positive-definite matrix.
    mean : torch.Tensor, optional
        ``[D]``; ``None`` for the angular central Gaussian (:math:`m = 0`).
    """

    def __init__(self, cov: torch.Tensor, mean: torch.Tensor | None = None):
        self.cov = cov.to(torch.float64)
        self.mean = None if mean is None else mean.to(torch.float64)
        self.dim = cov.shape[0]
        if cov.ndim == 1:
            self._chol = None
            self.log_det = float(self.cov.log().sum())
        else:
            self._chol = torch.linalg.cholesky(self.cov)
            self.log_det = 2.0 * float(self._chol.diagonal().log().sum())
        self._m_cinv_m = 0.0 if mean is None else float(self.mean @ self.solve(self.mean))

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """:math:`C^{-1} v` for ``v`` of shape ``[D]`` or ``[N, D]`` (rows)."""
        if self._chol is None:
            return v / self.cov
        return torch.cholesky_solve(v.reshape(-1, self.dim).T, self._chol).T.reshape(v.shape)

    def sample(self, z: torch.Tensor) -> torch.Tensor:
        """Points :math:`x = m + C^{1/2} z` for standard normal rows ``z`` ``[N, D]``."""
        return self.crank_nicolson(torch.zeros_like(z), 1.0, z)

    def crank_nicolson(self, x: torch.Tensor, rho: float, z: torch.Tensor) -> torch.Tensor:
        """:math:`m + \\sqrt{1-\\rho^2}\\,(x - m) + \\rho\\, C^{1/2} z`: a move of rows ``x``
        that leaves :math:`N(m, C)` invariant (reversible), for standard normal rows ``z``."""
        step = z * self.cov.sqrt() if self._chol is None else z @ self._chol.T
        mean = 0.0 if self.mean is None else self.mean
        return mean + math.sqrt(1.0 - rho * rho) * (x - mean) + rho * step

    def quadratic(self, omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)``: :math:`a = \\omega^\\top C^{-1}\\omega`, :math:`b = \\omega^\\top C^{-1} m`.

        Rows of ``omega`` give entries of ``a`` and ``b``.
        """
        s = self.solve(omega)
        a = (omega * s).sum(-1)
        b = torch.zeros_like(a) if self.mean is None else s @ self.mean
        return a, b

    def log_density(self, omega: torch.Tensor) -> torch.Tensor:
        """Log density of unit rows ``omega`` ``[N, D]`` relative to the uniform law."""
        d = self.dim
        a, b = self.quadratic(omega)
        if self.mean is None:
            return -0.5 * self.log_det - 0.5 * d * a.log()
        log_j = log_radial_integral(math.inf, d - 1, a.numpy(), b.numpy())
        return (
            log_sphere_area(d)
            - 0.5 * d * math.log(2 * math.pi)
            - 0.5 * self.log_det
            - 0.5 * self._m_cinv_m
            + torch.from_numpy(np.asarray(log_j, dtype=np.float64)).reshape(a.shape)
        )

    def grad_log_density(self, omega: torch.Tensor) -> torch.Tensor:
        r"""The gradient in :math:`\omega` (ambient, ``[N, D]``) of :meth:`log_density`'s
        formula: with :math:`a, b` of :meth:`quadratic`, :math:`-D\,C^{-1}\omega/a` when
        :math:`m = 0`, else :math:`-\mathbb{E}[R^2]\,C^{-1}\omega + \mathbb{E}[R]\,C^{-1}m`
        under :math:`R \mid \omega` (:math:`\partial_a \log J = -\mathbb{E}[R^2]/2`,
        :math:`\partial_b \log J = \mathbb{E}[R]`). Only its part tangent to the sphere
        means anything."""
        s = self.solve(omega)
        a = (omega * s).sum(-1)
        if self.mean is None:
            return -self.dim * s / a[:, None]
        b = s @ self.mean
        n, an, bn = self.dim - 1, a.numpy(), b.numpy()
        log_j = log_radial_integral(math.inf, n, an, bn)
        e1, e2 = (
            torch.from_numpy(np.exp(log_radial_integral(math.inf, n + k, an, bn) - log_j))
            for k in (1, 2)
        )
        return -e2[:, None] * s + e1[:, None] * self.solve(self.mean)[None, :]

    def times_cov(self, v: torch.Tensor) -> torch.Tensor:
        """:math:`C v` for rows ``v`` ``[N, D]``."""
        return v * self.cov if self._chol is None else v @ self.cov

    def radial(self, omega: torch.Tensor, gen: torch.Generator, *, steps: int = 6) -> torch.Tensor:
        """Draw :math:`R \\mid \\omega`, density :math:`\\propto R^{D-1} e^{-aR^2/2 + bR}`.

        Exact (a chi variable) when :math:`m = 0`; otherwise ``steps`` independence
        Metropolis-Hastings steps from a widened Laplace approximation, started at the mode
        (the log density is concave, so the approximation is close and acceptance high).
        """
        n = self.dim - 1
        a, b = self.quadratic(omega)
        if self.mean is None:
            key = int(torch.randint(0, 2**62, (1,), generator=gen))
            chi2 = np.random.default_rng(key).chisquare(self.dim, size=a.shape)
            return (torch.from_numpy(chi2) / a).sqrt()
        mode = (b + torch.sqrt(b * b + 4.0 * a * n)) / (2.0 * a)
        sd = 1.25 / torch.sqrt(n / mode**2 + a)

        def log_p(r):
            return n * torch.log(r.clamp_min(1e-300)) - 0.5 * a * r * r + b * r

        def log_q(r):
            return -0.5 * ((r - mode) / sd) ** 2

        r = mode.clone()
        for _ in range(steps):
            prop = mode + sd * torch.randn(a.shape, generator=gen, dtype=torch.float64)
            log_acc = log_p(prop) - log_p(r) - log_q(prop) + log_q(r)
            log_acc = torch.where(prop > 0, log_acc, torch.full_like(log_acc, -math.inf))
            accept = torch.rand(a.shape, generator=gen, dtype=torch.float64).log() < log_acc
            r = torch.where(accept, prop, r)
        return r

    @classmethod
    def fit(
        cls, x: torch.Tensor, *, dense: bool, with_mean: bool, shrinkage: float | None = None
    ) -> ProjectedNormal:
        """Moment fit to equally weighted points ``x`` ``[N, D]`` (mean only if ``with_mean``).

        A dense fit shrinks towards its diagonal by ``shrinkage`` (default
        :math:`\\min(1, D/N)/2`), so it stays well conditioned with fewer points than
        dimensions. The overall scale is irrelevant to the direction's law when
        :math:`m = 0` and is normalised away.
        """
        n, d = x.shape
        mean = x.mean(0) if with_mean else None
        xc = x - mean if with_mean else x
        if dense:
            cov = xc.T @ xc / n
            lam = min(1.0, d / n) / 2 if shrinkage is None else shrinkage
            diag = cov.diagonal().clone()
            cov = (1 - lam) * cov + lam * torch.diag(diag)
            floor = 1e-12 * float(diag.mean())
            cov = cov + floor * torch.eye(d, dtype=cov.dtype)
            scale = float(cov.diagonal().mean())
        else:
            cov = (xc * xc).mean(0)
            cov = cov.clamp_min(1e-12 * float(cov.mean()))
            scale = float(cov.mean())
        if with_mean:
            return cls(cov, mean)
        return cls(cov / scale)

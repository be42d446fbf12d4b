"""The preconditioner protocol and its operators: diagonal, dense and the origin stretch."""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch

from .scales import _scales_from_curvature


@runtime_checkable
class Preconditioner(Protocol):
    """A linear map with determinant one acting on float64 CPU vectors of length ``dim``."""

    dim: int

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        """Return :math:`Pu`."""
        ...


class DiagonalPreconditioner:
    r""":math:`P = \mathrm{diag}(p)` with the scales rescaled so that :math:`\sum\log p_i = 0`.

    Parameters
    ----------
    scales : torch.Tensor
        Positive, finite per-coordinate scales of any overall magnitude.
    """

    def __init__(self, scales: torch.Tensor):
        scales = torch.as_tensor(scales).detach()
        if scales.ndim != 1:
            raise ValueError(
                f"preconditioner must be a 1-D tensor of per-parameter scales, got shape "
                f"{tuple(scales.shape)}"
            )
        scales = scales.to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(scales).all()) or not bool((scales > 0).all()):
            bad = int((~(torch.isfinite(scales) & (scales > 0))).nonzero()[0])
            raise ValueError(
                f"preconditioner must have finite, positive entries; entry {bad} is "
                f"{scales[bad].item()!r} (add a small epsilon before inverting curvature)"
            )
        log_p = scales.log()
        self.scales = (log_p - log_p.mean()).exp()
        self.dim = scales.numel()

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        return self.scales * u


class DensePreconditioner:
    r""":math:`P = V\,\mathrm{diag}(p)\,V^\top` for an orthonormal basis :math:`V`, with
    :math:`\sum_i \log p_i = 0` (so :math:`\det P = 1`).

    Built from a symmetric curvature matrix :math:`H` (a Hessian, a Fisher or Gauss-Newton
    matrix) or its eigendecomposition :math:`H = V\,\mathrm{diag}(\lambda)\,V^\top`, with

    .. math:: p_i = \frac{1}{\max(\lambda_i, 0)^{\gamma} + \eta}

    (negative curvature counts as flat). For a quadratic basin with this :math:`H`,
    :math:`\gamma = 1/2` and :math:`\eta = 0` give :math:`P \propto H^{-1/2}` and a
    zero-variance estimate. Applying :math:`P` costs two dense matrix-vector products,
    :math:`O(D^2)`; holding :math:`V` costs :math:`8D^2` bytes, so this is for models up to
    some :math:`10^4` parameters.

    Parameters
    ----------
    matrix_or_eigh : torch.Tensor or (torch.Tensor, torch.Tensor)
        A symmetric ``[D, D]`` matrix, or ``(eigenvalues, eigenvectors)`` as returned by
        :func:`torch.linalg.eigh` (eigenvectors in the columns).
    eps : float
        :math:`\eta \ge 0`; must be positive when some eigenvalue is zero or negative.
    exponent : float
        :math:`\gamma > 0`.

    Attributes
    ----------
    dim : int
    basis : torch.Tensor
        :math:`V`, float64 ``[D, D]`` on the CPU.
    scales : torch.Tensor
        The normalised :math:`p`, float64 ``[D]``, in the order of ``basis``' columns.
    """

    def __init__(
        self,
        matrix_or_eigh: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        *,
        eps: float = 1e-5,
        exponent: float = 0.5,
    ):
        if isinstance(matrix_or_eigh, tuple | list) or hasattr(matrix_or_eigh, "eigenvectors"):
            eigenvalues, basis = (torch.as_tensor(t).detach() for t in matrix_or_eigh)
            basis = _check_basis(basis, eigenvalues)
            eigenvalues = eigenvalues.to("cpu", torch.float64)
        else:
            matrix = torch.as_tensor(matrix_or_eigh).detach().to("cpu", torch.float64)
            if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
                raise ValueError(
                    f"matrix_or_eigh must be a square [D, D] matrix or an (eigenvalues, "
                    f"eigenvectors) pair, got shape {tuple(matrix.shape)}"
                )
            if not bool(torch.isfinite(matrix).all()):
                raise ValueError("matrix_or_eigh has non-finite entries")
            asym = float((matrix - matrix.T).abs().max())
            if asym > 1e-8 * max(float(matrix.abs().max()), 1e-300):
                raise ValueError(
                    f"matrix_or_eigh must be symmetric (max |H - H^T| = {asym:.3g}); "
                    "symmetrise it first, e.g. (H + H.T) / 2"
                )
            eigenvalues, basis = torch.linalg.eigh(0.5 * (matrix + matrix.T))
        scales = _scales_from_curvature(
            eigenvalues.clamp(min=0), eps=eps, exponent=exponent, what="eigenvalue"
        )
        self._init(basis, scales)

    def _init(self, basis: torch.Tensor, scales: torch.Tensor) -> None:
        log_p = scales.log()
        self.basis = basis
        self.scales = (log_p - log_p.mean()).exp()
        self.dim = basis.shape[0]

    @classmethod
    def from_scales(cls, basis: torch.Tensor, scales: torch.Tensor) -> DensePreconditioner:
        r""":math:`P = V\,\mathrm{diag}(p)\,V^\top` from a basis and positive scales of any
        overall size (normalised here)."""
        scales = torch.as_tensor(scales).detach().to("cpu", torch.float64)
        basis = _check_basis(torch.as_tensor(basis).detach(), scales)
        if not bool(torch.isfinite(scales).all() & (scales > 0).all()):
            raise ValueError("scales must be finite and positive")
        self = cls.__new__(cls)
        self._init(basis, scales)
        return self

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        """Return :math:`V\\,\\mathrm{diag}(p)\\,V^\\top u`."""
        return self.basis @ (self.scales * (self.basis.T @ u))

    def __repr__(self) -> str:
        return f"DensePreconditioner(dim={self.dim})"


class OriginStretch:
    r"""A rank-one stretch along the centre's own axis, optionally after another proposal:

    .. math:: P = s^{-1/D}\,\big(I + (s - 1)\,vv^\top\big)\,P_{\mathrm{base}},
        \qquad v = \theta_0/\lVert\theta_0\rVert,

    so :math:`\det P = 1` and directions are drawn :math:`s` times more often near
    :math:`\pm v`. Under a Gaussian prior much narrower than the trained weights (e.g. the
    initialisation's scale), the prior density changes by many orders of magnitude across the
    basin and its mass sits on the side facing the origin, which isotropic and
    curvature-based proposals almost never draw; ``docs/experiments.md`` measures gains of
    thousands of nats there. Applying :math:`P` costs :math:`O(D)` beyond the base.

    Parameters
    ----------
    center : torch.Tensor
        :math:`\theta_0` (any shape; flattened), not all zero.
    stretch : float
        :math:`s > 0` (``1`` leaves the base proposal unchanged).
    base : tensor of scales or Preconditioner, optional
        Applied first (e.g. Fisher scales).
    """

    def __init__(self, center: torch.Tensor, stretch: float, *, base=None):
        v = torch.as_tensor(center).detach().reshape(-1).to("cpu", torch.float64)
        norm = float(v.norm())
        if not (math.isfinite(norm) and norm > 0):
            raise ValueError("center must be finite and not all zero to define its axis")
        if isinstance(stretch, bool) or not isinstance(stretch, int | float):
            raise TypeError(f"stretch must be a number, got {stretch!r}")
        if not (math.isfinite(stretch) and stretch > 0):
            raise ValueError(f"stretch must be a finite number > 0, got {stretch!r}")
        self.dim = v.numel()
        self.axis = v / norm
        self.stretch = float(stretch)
        self.factor = self.stretch ** (-1.0 / self.dim)
        self.base = as_preconditioner(base, self.dim)

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        """Return :math:`Pu`."""
        if self.base is not None:
            u = self.base.apply(u)
        return self.factor * (u + (self.stretch - 1.0) * self.axis * (self.axis @ u))

    def __repr__(self) -> str:
        return f"OriginStretch(dim={self.dim}, stretch={self.stretch:g}, base={self.base!r})"


def _check_basis(basis: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    basis = basis.to("cpu", torch.float64)
    dim = basis.shape[0] if basis.ndim == 2 else -1
    if basis.ndim != 2 or basis.shape[1] != dim or values.shape != (dim,):
        raise ValueError(
            f"eigenvectors must be [D, D] with D eigenvalues, got {tuple(basis.shape)} and "
            f"{tuple(values.shape)}"
        )
    # O(D^2) orthonormality probe: V^T V x == x for a random x.
    x = torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    err = float(torch.linalg.vector_norm(basis.T @ (basis @ x) - x) / torch.linalg.norm(x))
    if not err < 1e-6:
        raise ValueError(
            f"eigenvectors must be orthonormal columns (V^T V = I), off by {err:.3g}; pass "
            "the output of torch.linalg.eigh"
        )
    return basis


def as_preconditioner(obj, dim: int) -> Preconditioner | None:
    """Turn ``None``, a tensor of scales or a :class:`Preconditioner` into a preconditioner."""
    if obj is None:
        return None
    pre = obj if isinstance(obj, Preconditioner) else DiagonalPreconditioner(obj)
    if pre.dim != dim:
        raise ValueError(
            f"preconditioner has {pre.dim} entries but the centre has {dim} parameters; "
            "build it from the same parameters, in parameters_to_vector order"
        )
    return pre

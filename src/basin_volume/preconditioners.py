r"""Preconditioners: the linear map :math:`P` of the direction proposal.

A preconditioner lengthens the sampling along flat directions of the basin. Every
preconditioner here is normalised to :math:`\det P = 1` (for a diagonal one,
:math:`\sum_i \log p_i = 0`), which is what the importance weight
:math:`\lVert Pu\rVert^{-D}` in :mod:`basin_volume.directions` assumes; multiplying the
scales by a constant therefore changes nothing.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["DiagonalPreconditioner", "Preconditioner", "as_preconditioner"]


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

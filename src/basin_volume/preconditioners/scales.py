r"""From curvature to scales: :math:`p = 1/(c^\gamma + \eta)`, normalised; the prior's epsilon."""

from __future__ import annotations

import math

import torch


def _check_eps_exponent(eps, exponent) -> None:
    for name, value in (("eps", eps), ("exponent", exponent)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not (math.isfinite(exponent) and exponent > 0):
        raise ValueError(f"exponent must be a finite number > 0, got {exponent!r}")


def _scales_from_curvature(
    curvature: torch.Tensor, *, eps: float, exponent: float, what: str
) -> torch.Tensor:
    r""":math:`1/(c^\gamma + \eta)` in float64, checked to be finite and positive."""
    _check_eps_exponent(eps, exponent)
    c = curvature.to("cpu", torch.float64)
    if not bool(torch.isfinite(c).all()):
        bad = int((~torch.isfinite(c)).nonzero()[0])
        raise ValueError(f"{what} {bad} is {c[bad].item()}; the curvature must be finite")
    scales = 1.0 / (c.pow(exponent) + eps)
    if not bool(torch.isfinite(scales).all()):
        bad = int((~torch.isfinite(scales)).nonzero()[0])
        raise ValueError(
            f"{what} {bad} is 0, so with eps=0 its scale is infinite; pass eps > 0 (e.g. eps=1e-5)"
        )
    return scales


def prior_eps(cutoff: float, sigma: float, dim: int, *, exponent: float = 0.5) -> float:
    r"""An :math:`\eta` set by the Gaussian prior: :math:`\eta = (2\varepsilon/(\sigma^2
    D))^{\gamma}`.

    Along a direction of curvature :math:`c` the basin reaches radius
    :math:`\sqrt{2\varepsilon/c}`, while the prior :math:`N(0, \sigma^2 I_D)` puts almost no
    mass beyond radius :math:`\sigma\sqrt D` (the peak of :math:`t^{D-1}e^{-t^2/2\sigma^2}`).
    A direction therefore acts as if it had curvature at least
    :math:`\lambda_0 = 2\varepsilon/(\sigma^2 D)`, and :math:`p = 1/(c^\gamma + \eta)` with
    this :math:`\eta = \lambda_0^\gamma` caps the scale of flat and unconstrained parameters
    (:math:`c = 0`, e.g. weights of always-zero inputs) where the prior caps the basin,
    instead of at an arbitrary :math:`1/\eta`. Meaningful for curvature-like :math:`c` (Fisher,
    Hessian), in the units of the objective; not for Adam's moments.

    Parameters
    ----------
    cutoff : float
        :math:`\varepsilon`, in the units of the objective.
    sigma : float
        The prior scale :math:`\sigma` (``basin_volume.estimate``'s default is the RMS of the
        centre).
    dim : int
        :math:`D`.
    exponent : float
        :math:`\gamma`.
    """
    for name, value in (("cutoff", cutoff), ("sigma", sigma)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    _check_eps_exponent(0.0, exponent)
    return (2.0 * cutoff / (sigma * sigma * dim)) ** exponent

r"""Preconditioners: the linear map :math:`P` of the direction proposal.

A preconditioner lengthens the sampling along flat directions of the basin. Every
preconditioner here is normalised to :math:`\det P = 1` (for a diagonal one,
:math:`\sum_i \log p_i = 0`), which is what the importance weight
:math:`\lVert Pu\rVert^{-D}` in :mod:`basin_volume.directions` assumes; multiplying the
scales by a constant therefore changes nothing.

Where the scales come from
--------------------------
All sources turn a non-negative *curvature-like* quantity :math:`c` into scales with one
formula,

.. math:: p_i = \frac{1}{c_i^{\gamma} + \eta},

with exponent :math:`\gamma` (default 1/2) and epsilon :math:`\eta` (default :math:`10^{-5}`):

* :func:`adam_preconditioner`: :math:`c = |m|`, Adam's second moment ``exp_avg_sq``
  (``order=2``) or first moment ``exp_avg`` (``order=1``);
* :func:`fisher_preconditioner`: :math:`c` = the diagonal of the Fisher information of the
  classifier's predictive distribution, which at the centre equals the diagonal of the
  Hessian of the KL basin :math:`\delta(\theta) = \frac1N\sum_x \mathrm{KL}(p_{\theta_0}\,\|\,
  p_\theta)`;
* :class:`DensePreconditioner`: :math:`c` = the eigenvalues of a dense curvature matrix
  :math:`H = V\,\mathrm{diag}(\lambda)\,V^\top` (e.g. :func:`fisher_matrix`), with
  :math:`P = V\,\mathrm{diag}(p)\,V^\top`.

For a quadratic basin :math:`\delta = \tfrac12 x^\top H x` the choice
:math:`P \propto H^{-1/2}` (:math:`\gamma = 1/2, \eta = 0`) makes every direction's
importance-weighted estimate exactly the ellipsoid's volume: zero variance.

Modules: ``operators`` (the protocol and the linear maps), ``scales`` (curvature to scales),
``adam`` and ``fisher`` (the sources of curvature) and ``factory``
(:func:`resolve_preconditioner`, one entry point for every :class:`PreconditionerType`).
"""

from .adam import adam_preconditioner
from .factory import PreconditionerType, parse_preconditioner_type, resolve_preconditioner
from .fisher import FisherLabels, fisher_diagonal, fisher_matrix, fisher_preconditioner
from .operators import (
    DensePreconditioner,
    DiagonalPreconditioner,
    OriginStretch,
    Preconditioner,
    as_preconditioner,
)
from .scales import prior_eps

__all__ = [
    "DensePreconditioner",
    "DiagonalPreconditioner",
    "FisherLabels",
    "OriginStretch",
    "Preconditioner",
    "PreconditionerType",
    "adam_preconditioner",
    "as_preconditioner",
    "fisher_diagonal",
    "fisher_matrix",
    "fisher_preconditioner",
    "parse_preconditioner_type",
    "prior_eps",
    "resolve_preconditioner",
]

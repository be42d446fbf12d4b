"""Tyche: the probability that a random initialisation lands in a trained network's basin.

The public surface, by purpose:

- **Estimating** -- :func:`estimate` for any function of a parameter vector (with
  :class:`Measure` and :class:`Method`), :func:`estimate_adaptive` for a proposal refined over
  rounds (:class:`AdaptiveUpdate`).
- **Models** -- :class:`VolumeConfig` describes a model-level run and
  :class:`VolumeEstimator` does it (:class:`ModelType`, :class:`CacheMode`).
- **Objectives** -- :class:`ClassifierKL`, :class:`CausalLMKL` and
  :func:`causal_lm_objective`: the KL basins that :class:`VolumeEstimator` builds.
- **Proposals** -- the :class:`Preconditioner` protocol, :class:`DiagonalPreconditioner`,
  :class:`DensePreconditioner`, :class:`OriginStretch`, and their sources
  (:func:`adam_preconditioner`, :func:`fisher_preconditioner`, :func:`fisher_diagonal`,
  :func:`fisher_matrix`, :func:`prior_eps`; :func:`resolve_preconditioner` for a
  :class:`PreconditionerType`).
- **Results** -- :class:`VolumeResult` and the :class:`DirectionRecord` every callback
  receives.
- **Files** -- :func:`run_to_file`, :func:`estimate_to_file` and :func:`scan` write results as
  they go and resume; :func:`load_result` and :func:`read_run` read them.
- **Plots** -- :func:`plot_results`, :func:`compare_results`, :func:`plot_scan`.
- **Warnings and errors** -- :class:`LowESSWarning`, :class:`RadiusSearchWarning`,
  :class:`ResultFileError`, :class:`ResumeError`, :class:`RunInUseError`,
  :class:`BudgetExhausted`.

A quadratic basin :math:`\\tfrac12\\lVert\\theta - \\theta_0\\rVert^2 \\le \\varepsilon` is a
ball of radius :math:`\\sqrt{2\\varepsilon}`:

>>> import math, torch, basin_volume as bv
>>> res = bv.estimate(lambda th: 0.5 * th.square().sum(), torch.zeros(2, dtype=torch.float64),
...                   n_samples=3, cutoff=0.5, measure="uniform", rtol=1e-12, progress=False)
>>> round(res.log_volume, 8) == round(math.log(math.pi), 8)
True
"""

__version__ = "0.1.0"

from .adaptive import AdaptiveUpdate, estimate_adaptive
from .causal import CacheMode, CausalLMKL, causal_lm_objective
from .config import ModelType, VolumeConfig
from .estimator import RadiusSearchWarning, estimate
from .objectives import ClassifierKL
from .plots import compare_results, plot_results, plot_scan
from .preconditioners import (
    DensePreconditioner,
    DiagonalPreconditioner,
    OriginStretch,
    Preconditioner,
    PreconditionerType,
    adam_preconditioner,
    fisher_diagonal,
    fisher_matrix,
    fisher_preconditioner,
    prior_eps,
    resolve_preconditioner,
)
from .records import DirectionRecord, ResultFileError
from .result import LowESSWarning, VolumeResult
from .runfile import (
    ResumeError,
    RunInUseError,
    estimate_to_file,
    load_result,
    read_run,
    run_to_file,
    scan,
)
from .settings import Measure, Method
from .smc_estimate import BudgetExhausted
from .volume_estimator import VolumeEstimator

__all__ = [
    # estimating
    "estimate",
    "estimate_adaptive",
    "AdaptiveUpdate",
    "Measure",
    "Method",
    # models
    "VolumeConfig",
    "VolumeEstimator",
    "ModelType",
    "CacheMode",
    # objectives
    "ClassifierKL",
    "CausalLMKL",
    "causal_lm_objective",
    # proposals
    "Preconditioner",
    "DiagonalPreconditioner",
    "DensePreconditioner",
    "OriginStretch",
    "PreconditionerType",
    "adam_preconditioner",
    "fisher_preconditioner",
    "fisher_diagonal",
    "fisher_matrix",
    "prior_eps",
    "resolve_preconditioner",
    # results
    "VolumeResult",
    "DirectionRecord",
    # files
    "run_to_file",
    "estimate_to_file",
    "scan",
    "load_result",
    "read_run",
    # plots
    "plot_results",
    "compare_results",
    "plot_scan",
    # warnings and errors
    "LowESSWarning",
    "RadiusSearchWarning",
    "ResultFileError",
    "ResumeError",
    "RunInUseError",
    "BudgetExhausted",
]

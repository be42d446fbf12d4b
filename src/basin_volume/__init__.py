"""Tyche: the probability that a random initialisation lands in a trained network's basin.

The public surface is small: :func:`estimate` for any function of a parameter vector,
:class:`VolumeConfig` and :class:`VolumeEstimator` for models, and :class:`VolumeResult`.
"""

__version__ = "0.1.0"

from .adaptive import estimate_adaptive
from .config import ModelType, VolumeConfig
from .estimator import Measure, Method, RadiusSearchWarning, estimate
from .plots import compare_results, plot_results, plot_scan
from .preconditioners import (
    DensePreconditioner,
    PreconditionerType,
    adam_preconditioner,
    fisher_preconditioner,
)
from .result import LowESSWarning, ResultFileError, VolumeResult
from .runfile import ResumeError, estimate_to_file, load_result, run_to_file, scan
from .smc_estimate import BudgetExhausted
from .volume_estimator import VolumeEstimator

__all__ = [
    "BudgetExhausted",
    "Method",
    "DensePreconditioner",
    "PreconditionerType",
    "adam_preconditioner",
    "estimate_adaptive",
    "fisher_preconditioner",
    "LowESSWarning",
    "ResumeError",
    "Measure",
    "ModelType",
    "RadiusSearchWarning",
    "ResultFileError",
    "VolumeConfig",
    "VolumeEstimator",
    "VolumeResult",
    "compare_results",
    "estimate",
    "estimate_to_file",
    "load_result",
    "plot_results",
    "plot_scan",
    "run_to_file",
    "scan",
]

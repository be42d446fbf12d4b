"""Tyche: the probability that a random initialisation lands in a trained network's basin.

The public surface is small: :func:`estimate` for any function of a parameter vector,
:class:`VolumeConfig` and :class:`VolumeEstimator` for models, and :class:`VolumeResult`.
"""

__version__ = "0.1.0"

from .config import ModelType, VolumeConfig, VolumeEstimator
from .estimator import Measure, RadiusSearchWarning, estimate
from .result import LowESSWarning, ResultFileError, VolumeResult

__all__ = [
    "LowESSWarning",
    "Measure",
    "ModelType",
    "RadiusSearchWarning",
    "ResultFileError",
    "VolumeConfig",
    "VolumeEstimator",
    "VolumeResult",
    "estimate",
]

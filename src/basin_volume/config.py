"""Model-level interface: :class:`VolumeConfig` describes a run, :class:`VolumeEstimator` does it.

``VolumeEstimator.from_config(cfg)`` dispatches on ``cfg.model_type`` to build the objective
(a KL basin over the model's outputs) and the centre, and :meth:`VolumeEstimator.run` calls
:func:`basin_volume.estimate`. The model is evaluated through
:func:`torch.func.functional_call`, so its own parameters are never written; its train/eval
modes are restored after the run, also when it raises or is interrupted.
"""

from __future__ import annotations

import enum
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from .estimator import Measure, estimate
from .objectives import ClassifierKL
from .parameters import preserved
from .result import VolumeResult

__all__ = ["ModelType", "VolumeConfig", "VolumeEstimator"]


class ModelType(enum.StrEnum):
    """Which kind of model a :class:`VolumeConfig` describes."""

    CAUSAL = "causal"
    """A Hugging Face causal language model with a tokenizer and a text data set."""
    CLASSIFIER = "classifier"
    """Any ``torch.nn.Module`` mapping ``inputs`` to logits ``[batch, classes]``."""
    MLP = "mlp"
    """The bundled digits MLP (trained on the fly unless ``model`` is given)."""
    PYTHIA = "pythia"
    """``EleutherAI/pythia-{model_name}`` at ``checkpoint_step`` from the hub."""
    CONVNEXT = "convnext"
    """A ConvNeXt image classifier."""


@dataclass(frozen=True)
class VolumeConfig:
    """Everything a model-level run needs. Field names follow the original project.

    Attributes
    ----------
    model : torch.nn.Module, optional
        The trained network (required except for ``model_type="mlp"``).
    tokenizer, dataset, text_key, max_seq_len, val_size, chunking, cache_mode
        Causal language models: the tokenizer, a data set of texts and its text field, the
        sequence length, how many sequences to evaluate on, whether to join and chunk texts,
        and where to cache the centre's outputs.
    model_type : str
        One of :class:`ModelType`.
    inputs : torch.Tensor, optional
        Classifier inputs for the KL basin (``model_type="classifier"``; for ``"mlp"`` the
        training digits by default).
    n_samples, cutoff, measure, sigma, preconditioner, rtol, seed, progress
        As in :func:`basin_volume.estimate`.
    data_batch_size : int
        Examples per forward pass.
    """

    model: Any = None
    tokenizer: Any = None
    dataset: Any = None
    text_key: str = "text"
    n_samples: int = 10
    cutoff: float = 1e-2
    max_seq_len: int = 2048
    val_size: int = 10
    cache_mode: str | None = None
    chunking: bool = False
    model_type: ModelType | str = ModelType.CAUSAL
    inputs: torch.Tensor | None = None
    measure: Measure | str = Measure.GAUSSIAN
    sigma: float | None = None
    preconditioner: torch.Tensor | None = None
    rtol: float = 1e-2
    seed: int = 0
    progress: bool = True
    data_batch_size: int = 4096

    def __post_init__(self):
        try:
            object.__setattr__(self, "model_type", ModelType(self.model_type))
        except ValueError:
            options = ", ".join(repr(m.value) for m in ModelType)
            raise ValueError(
                f"model_type must be one of {options}, got {self.model_type!r}"
            ) from None

    def replace(self, **changes) -> VolumeConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def describe(self) -> dict:
        """The JSON-friendly settings (models and data sets by type name only)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif not (value is None or isinstance(value, str | int | float | bool)):
                value = type(value).__name__
            out[f.name] = value
        return out


class VolumeEstimator:
    """Builds the objective for a model and runs the estimate.

    Use :meth:`from_config`; the constructor takes an already built objective.

    Parameters
    ----------
    config : VolumeConfig
    model : torch.nn.Module
        The network whose modes are protected during the run.
    fn : callable
        The objective over the flat parameter vector.
    center : torch.Tensor
        The trained parameters, flat.
    """

    def __init__(self, config: VolumeConfig, model: torch.nn.Module, fn: Callable, center):
        self.config = config
        self.model = model
        self.fn = fn
        self.center = center

    @classmethod
    def from_config(cls, config: VolumeConfig) -> VolumeEstimator:
        """Dispatch on ``config.model_type``."""
        builder = _BUILDERS.get(config.model_type)
        if builder is None:
            raise NotImplementedError(
                f"model_type={config.model_type.value!r} is not available yet; use "
                "'classifier' or 'mlp', or call basin_volume.estimate with your own objective"
            )
        return builder(config)

    def run(self) -> VolumeResult:
        """Estimate the basin; the model comes back with its modes and parameters intact."""
        cfg = self.config
        with preserved(self.model):
            result = estimate(
                self.fn,
                self.center,
                n_samples=cfg.n_samples,
                cutoff=cfg.cutoff,
                measure=cfg.measure,
                sigma=cfg.sigma,
                preconditioner=cfg.preconditioner,
                rtol=cfg.rtol,
                seed=cfg.seed,
                progress=cfg.progress,
            )
        result.meta["config"] = cfg.describe()
        return result


def _classifier(config: VolumeConfig) -> VolumeEstimator:
    if not isinstance(config.model, torch.nn.Module):
        raise ValueError(
            "model must be a torch.nn.Module mapping inputs to logits for "
            f"model_type='classifier', got {type(config.model).__name__}"
        )
    if config.inputs is None:
        raise ValueError("inputs is required for model_type='classifier': pass inputs=<tensor>")
    with preserved(config.model):
        fn = ClassifierKL(config.model, config.inputs, batch_size=config.data_batch_size)
    n_classes = fn.ref_logp[0].shape[-1]
    if isinstance(config.cutoff, int | float) and config.cutoff >= math.log(n_classes):
        warnings.warn(
            f"cutoff={config.cutoff:g} nats is at least log({n_classes}) = "
            f"{math.log(n_classes):.3g}, the KL from the centre to a constant uniform "
            "predictor: such a basin contains networks that have forgotten everything; typical "
            "cutoffs are 1e-3 to 1e-1",
            UserWarning,
            stacklevel=3,
        )
    return VolumeEstimator(config, config.model, fn, fn.center)


def _mlp(config: VolumeConfig) -> VolumeEstimator:
    from .digits import train_digits_mlp

    model, inputs = config.model, config.inputs
    if model is None or inputs is None:
        run = train_digits_mlp(seed=config.seed)
        model = run.model if model is None else model
        inputs = run.train_inputs if inputs is None else inputs
    return _classifier(config.replace(model=model, inputs=inputs))


_BUILDERS: dict[ModelType, Callable[[VolumeConfig], VolumeEstimator]] = {
    ModelType.CLASSIFIER: _classifier,
    ModelType.MLP: _mlp,
}

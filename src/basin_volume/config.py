"""Model-level interface: :class:`VolumeConfig` describes a run, :class:`VolumeEstimator` does it.

``VolumeEstimator.from_config(cfg)`` dispatches on ``cfg.model_type`` to build the objective
(a KL basin over the model's outputs) and the centre, and :meth:`VolumeEstimator.run` calls
:func:`basin_volume.estimate`. The model is evaluated through
:func:`torch.func.functional_call`, so its own parameters are never written; its train/eval
modes are restored after the run, also when it raises or is interrupted.

This module holds the settings (:class:`VolumeConfig`, checked when it is made);
:class:`VolumeEstimator` lives in :mod:`basin_volume.volume_estimator` and the per-model-type
builders in :mod:`basin_volume.builders`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from . import checks
from .basins import Basin, check_basin_settings
from .parameters import (
    compile_options,
)
from .preconditioners import (
    PreconditionerType,
    parse_preconditioner_type,
)
from .settings import Measure

__all__ = ["ModelType", "VolumeConfig"]

_NUMBER_FIELDS = (
    "n_samples",
    "cutoff",
    "max_seq_len",
    "val_size",
    "sigma",
    "preconditioner_eps",
    "preconditioner_exponent",
    "adam_order",
    "adaptive_rounds",
    "rtol",
    "seed",
    "data_batch_size",
    "model_batch_size",
    "checkpoint_step",
    "cache_budget_bytes",
)
"""Fields given as numbers: numpy scalars and 0-d tensors are turned into Python numbers."""


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
    """An image classifier such as transformers' ``ConvNextV2ForImageClassification``:
    ``model``, or ``model_name`` (a local folder or hub id, loaded onto
    :func:`~basin_volume.devices.default_device`), with ``inputs`` the preprocessed pixel
    values ``[n, channels, height, width]``."""


@dataclass(frozen=True)
class VolumeConfig:
    r"""Everything a model-level run needs. Field names follow the original project.

    Attributes
    ----------
    model : torch.nn.Module, optional
        The trained network (required except for ``model_type="mlp"``).
    tokenizer, dataset, text_key, max_seq_len, val_size, chunking, cache_mode
        Causal language models: the tokenizer, a data set of texts and its text field, the
        sequence length, how many sequences to evaluate on, whether to join and chunk texts,
        and where to cache the centre's outputs (:class:`~basin_volume.causal.CacheMode`, or
        ``None``/``"none"`` to recompute them).
    model_type : str
        One of :class:`ModelType`.
    inputs : tensor, DataLoader or iterable of batches, optional
        The evaluation data. Classifiers (``model_type="classifier"``; for ``"mlp"`` the
        training digits by default): a tensor, or a :class:`torch.utils.data.DataLoader` /
        iterable of tensors, ``(x, y)`` tuples or dicts of model keyword arguments, streamed
        one batch at a time (:mod:`basin_volume.inputs`). Causal LMs: token batches (dicts
        with ``input_ids`` and ``attention_mask``, or ``input_ids``) instead of
        ``tokenizer`` and ``dataset``.
    n_samples, cutoff, measure, sigma, rtol, seed, progress
        As in :func:`basin_volume.estimate`.
    method, budget, replicas, n_moves, bidirectional
        As in :func:`basin_volume.estimate`: ``method="smc"`` (sequential Monte Carlo, see
        ``docs/accuracy.md``) runs on dense rays only, so not in the memory-light mode nor
        with ``preconditioner_type="adaptive"``; ``"auto"`` picks ``"is"`` there. ``budget``
        caps the memory-light mode's directions too, and is refused with
        ``preconditioner_type="adaptive"``.
    preconditioner : tensor or Preconditioner, optional
        Ready-made proposal scales (or a dense preconditioner), as in
        :func:`basin_volume.estimate`; with ``preconditioner_type="adaptive"`` the starting
        proposal.
    preconditioner_type : str or tensor, optional
        Where the proposal comes from (:class:`~basin_volume.adaptive.PreconditionerType`):
        ``None`` (isotropic, or ``preconditioner`` if given), ``"adam"`` (needs
        ``optimizer``), ``"fisher"`` (diagonal Fisher of the KL basin on the run's own inputs
        or tokens; no optimizer state needed), ``"fisher_dense"`` (small classifiers),
        ``"adaptive"`` (refined over ``adaptive_rounds`` rounds,
        :func:`~basin_volume.adaptive.estimate_adaptive`), or a tensor of scales.
    preconditioner_eps, preconditioner_exponent : float
        :math:`\eta` and :math:`\gamma` in :math:`p = 1/(c^\gamma + \eta)` for the Adam and
        Fisher kinds. ``preconditioner_eps=None``: ``1e-5`` for Adam, and for the Fisher kinds
        ``"prior"`` (:func:`~basin_volume.preconditioners.prior_eps`, set by ``cutoff`` and
        ``sigma``), the best setting in ``benchmarks/preconditioners.py``; under
        ``measure="uniform"``, which has no prior, ``1e-5``.
    adam_order : {1, 2}
        Adam's ``exp_avg`` (1) or ``exp_avg_sq`` (2).
    optimizer : optimizer, state dict, path, optional
        Source of Adam's moments: a ``torch.optim.Adam``/``AdamW``, its ``state_dict()``, an
        ``optimizer.pt`` file or a Hugging Face Trainer checkpoint folder.
    adaptive_rounds : int
        ``preconditioner_type="adaptive"``: rounds of ``n_samples / adaptive_rounds``
        directions each.
    data_batch_size : int
        Examples per forward pass (sequences, for causal language models).
    model_batch_size : int
        Directions whose pending radii are evaluated in one vmapped call (see
        :func:`basin_volume.estimate`); falls back to one at a time, with a warning, for models
        that ``torch.func.vmap`` cannot batch. In the memory-light mode the points are
        built in one ``[B, D]`` buffer, ``B`` cut to what a quarter of the free memory holds.
    model_name : str, optional
        ``model_type="pythia"``: ``"14m"``, ``"70m"``, ``"160m-deduped"``... for
        ``EleutherAI/pythia-{model_name}`` on the hub, a hub id, or a local directory;
        ``model_type="convnext"``: a hub id or local directory of an image classifier.
    checkpoint_step : int, optional
        ``model_type="pythia"``: the training step (hub revision ``step{N}``; default the
        final checkpoint).
    low_memory : bool, optional
        Evaluate rays by writing θ0 + tω into the model's parameters
        (restored exactly from one saved copy) and regenerating each direction chunk by chunk,
        so the run needs one extra copy of the parameters instead of several. Default: on
        for models of at least 2e7 parameters. See :mod:`basin_volume.rays`.
    compile : bool or dict
        Evaluate the model through :func:`torch.compile` (``True`` or a dict of its
        arguments); estimates then agree with eager ones to float precision. Worth it for
        large models on GPUs.
    cache_budget_bytes : int, optional
        ``cache_mode="auto"``: the largest cache of the centre's logits kept on the model's
        accelerator (default: half its free memory); larger caches go to host memory.
    parameters : "trainable", "all", list of str, or callable
        Which of the model's parameters are the basin's coordinates: by default the
        trainable ones (``requires_grad=True``; frozen ones keep their values and do not
        count in ``D``), ``"all"``, a list of names from ``model.named_parameters()``, or a
        predicate ``(name, parameter) -> bool``. The result records the choice in
        ``meta["parameters"]``.
    basin : {"kl", "loss"}
        The KL basin (default), or the loss basin :math:`L(\theta) - L(\theta_0) \le
        \varepsilon` (:class:`~basin_volume.basins.Basin`): cross-entropy against ``labels``
        for classifiers, next-token cross-entropy for causal LMs, or ``loss_fn``.
    labels : torch.Tensor, optional
        ``basin="loss"`` with tensor ``inputs``: one label per input (with batches, labels come
        from ``(x, y)`` tuples or a ``labels`` entry).
    loss_fn : callable, optional
        ``basin="loss"``: ``loss_fn(outputs, labels) -> mean loss of a batch`` instead of the
        cross-entropy (see :mod:`basin_volume.basins`).
    """

    model: Any = None
    tokenizer: Any = None
    dataset: Any = None
    text_key: str = "text"
    n_samples: int = 100
    cutoff: float = 1e-2
    max_seq_len: int = 2048
    val_size: int = 10
    cache_mode: str | None = "auto"
    chunking: bool = False
    model_type: ModelType | str = ModelType.CAUSAL
    inputs: Any = None
    measure: Measure | str = Measure.GAUSSIAN
    sigma: float | None = None
    preconditioner: Any = None
    preconditioner_type: str | torch.Tensor | None = None
    preconditioner_eps: float | str | None = None
    preconditioner_exponent: float = 0.5
    adam_order: int = 2
    optimizer: Any = None
    adaptive_rounds: int = 4
    rtol: float = 1e-2
    seed: int = 0
    progress: bool = True
    data_batch_size: int = 4096
    model_batch_size: int = 1
    model_name: str | None = None
    checkpoint_step: int | None = None
    cache_budget_bytes: int | None = None
    low_memory: bool | None = None
    compile: bool | dict = False
    parameters: Any = "trainable"
    basin: Basin | str = Basin.KL
    labels: Any = None
    loss_fn: Any = None
    method: str = "auto"
    budget: int | None = None
    replicas: int = 4
    n_moves: int | None = None
    bidirectional: bool | None = None

    def __post_init__(self):
        for name in _NUMBER_FIELDS:  # np.float32(0.01), torch.tensor(4)... as plain numbers
            object.__setattr__(self, name, checks.as_number(getattr(self, name)))
        self._check_settings()
        if self.cache_mode == "none":  # the command line's spelling of None
            object.__setattr__(self, "cache_mode", None)
        try:
            object.__setattr__(self, "model_type", ModelType(self.model_type))
        except ValueError:
            options = ", ".join(repr(m.value) for m in ModelType)
            raise ValueError(
                f"model_type must be one of {options}, got {self.model_type!r}"
            ) from None
        kind = self.preconditioner_type
        if kind is not None and not isinstance(kind, torch.Tensor):
            kind = parse_preconditioner_type(kind)
            object.__setattr__(self, "preconditioner_type", kind)
        if self.budget is not None and kind is PreconditionerType.ADAPTIVE:
            raise ValueError(
                "budget does not cap preconditioner_type='adaptive' (its rounds are set by "
                "n_samples and adaptive_rounds); leave budget unset, or use "
                "preconditioner_type='fisher' or 'adam'"
            )
        if self.preconditioner is not None and kind not in (
            None,
            PreconditionerType.NONE,
            PreconditionerType.ADAPTIVE,
        ):
            raise ValueError(
                "pass either preconditioner (ready-made scales) or preconditioner_type, not "
                "both; with preconditioner_type='adaptive', preconditioner is the starting "
                "proposal"
            )
        eps = self.preconditioner_eps
        if eps is not None and eps != "prior" and not _is_number(eps, minimum=0.0):
            raise ValueError(
                f"preconditioner_eps must be a finite number >= 0, 'prior' or None, got {eps!r}"
            )
        exponent = self.preconditioner_exponent
        if not _is_number(exponent, minimum=0.0, strict=True):
            raise ValueError(f"preconditioner_exponent must be a number > 0, got {exponent!r}")
        if self.adam_order not in (1, 2) or isinstance(self.adam_order, bool):
            raise ValueError(
                f"adam_order must be 1 (exp_avg) or 2 (exp_avg_sq), got {self.adam_order!r}"
            )
        compile_options(self.compile)  # checked now, not after a model download
        rounds = self.adaptive_rounds
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"adaptive_rounds must be a positive integer, got {rounds!r}")
        n = self.n_samples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n!r}")
        if kind is PreconditionerType.ADAPTIVE and n % rounds:
            raise ValueError(
                f"preconditioner_type='adaptive' runs adaptive_rounds={rounds} rounds of equal "
                f"size, so n_samples={n} must be a multiple of it; e.g. "
                f"n_samples={rounds * -(-n // rounds)}"
            )

    def _check_settings(self) -> None:
        """The estimation settings, checked now rather than at :meth:`VolumeEstimator.run`."""
        checks.check_positive("cutoff", self.cutoff)
        checks.check_rtol(self.rtol)
        checks.check_seed(self.seed)
        if self.sigma is not None:
            checks.check_positive("sigma", self.sigma)
        if self.method not in ("auto", "smc", "is"):
            raise ValueError(f"method must be 'auto', 'smc' or 'is', got {self.method!r}")
        if self.budget is not None:
            checks.check_positive("budget", self.budget, integer=True)
        for name in ("data_batch_size", "model_batch_size", "replicas"):
            checks.check_positive(name, getattr(self, name), integer=True)
        if self.n_moves is not None:
            checks.check_positive("n_moves", self.n_moves, integer=True)
        checks.check_bidirectional(self.bidirectional)
        object.__setattr__(
            self, "basin", check_basin_settings(self.basin, self.labels, self.loss_fn)
        )
        try:
            Measure(self.measure)
        except ValueError:
            raise ValueError(
                f"measure must be 'gaussian' or 'uniform', got {self.measure!r}"
            ) from None
        if isinstance(self.parameters, str) and self.parameters not in ("trainable", "all"):
            raise ValueError(
                "parameters must be 'trainable', 'all', a list of parameter names or a "
                f"function (name, parameter) -> bool; got {self.parameters!r}"
            )

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
            elif isinstance(value, dict) and all(
                isinstance(v, str | int | float | bool | None) for v in value.values()
            ):
                value = {str(k): v for k, v in value.items()}
            elif not (value is None or isinstance(value, str | int | float | bool)):
                value = type(value).__name__
            out[f.name] = value
        return out


def _is_number(value, *, minimum: float, strict: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return value > minimum if strict else value >= minimum


def __getattr__(name: str):
    """``basin_volume.config.VolumeEstimator``, its home before it had a module of its own."""
    if name == "VolumeEstimator":
        from .volume_estimator import VolumeEstimator

        return VolumeEstimator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

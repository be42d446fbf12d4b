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

from . import checks
from .adaptive import (
    PreconditionerType,
    estimate_adaptive,
    parse_preconditioner_type,
    resolve_preconditioner,
)
from .devices import default_device
from .distributed import from_rank0, init_from_env
from .estimator import Measure, estimate, run_rays
from .objectives import ClassifierKL
from .parameters import (
    FlatParameters,
    compile_options,
    describe_selection,
    preserved,
    select_parameters,
)
from .preconditioners import as_preconditioner
from .rays import InPlaceRays
from .result import DirectionRecord, VolumeResult

__all__ = ["ModelType", "VolumeConfig", "VolumeEstimator"]

LOW_MEMORY_THRESHOLD = 20_000_000

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
        and where to cache the centre's outputs.
    model_type : str
        One of :class:`ModelType`.
    inputs : torch.Tensor, optional
        Classifier inputs for the KL basin (``model_type="classifier"``; for ``"mlp"`` the
        training digits by default).
    n_samples, cutoff, measure, sigma, rtol, seed, progress
        As in :func:`basin_volume.estimate`.
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
    """

    model: Any = None
    tokenizer: Any = None
    dataset: Any = None
    text_key: str = "text"
    n_samples: int = 10
    cutoff: float = 1e-2
    max_seq_len: int = 2048
    val_size: int = 10
    cache_mode: str | None = "auto"
    chunking: bool = False
    model_type: ModelType | str = ModelType.CAUSAL
    inputs: torch.Tensor | None = None
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

    def __post_init__(self):
        for name in _NUMBER_FIELDS:  # np.float32(0.01), torch.tensor(4)... as plain numbers
            object.__setattr__(self, name, checks.as_number(getattr(self, name)))
        self._check_settings()
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
        for name in ("data_batch_size", "model_batch_size"):
            checks.check_positive(name, getattr(self, name), integer=True)
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


class VolumeEstimator:
    """Builds the objective for a model and runs the estimate.

    Use :meth:`from_config`; the constructor takes an already built objective.

    Parameters
    ----------
    config : VolumeConfig
    model : torch.nn.Module
        The network whose modes are protected during the run.
    fn : callable
        The objective over the flat parameter vector (``fn(None)``: at the parameters
        currently in the model).
    center : torch.Tensor, optional
        The trained parameters, flat; default the model's current parameters.
    fisher_inputs : tensor or CausalLMKL, optional
        What ``preconditioner_type="fisher"``/``"fisher_dense"`` computes the Fisher on (the
        classifier's inputs, or the causal-LM objective itself); set by :meth:`from_config`.
    """

    def __init__(
        self,
        config: VolumeConfig,
        model: torch.nn.Module,
        fn: Callable,
        center=None,
        *,
        fisher_inputs=None,
    ):
        self.config = config
        self.model = model
        self.fn = fn
        self._center = center
        self._fisher_inputs = fisher_inputs
        self._preconditioner, self._resolved = None, False

    @property
    def center(self) -> torch.Tensor:
        """The trained (selected) parameters as one flat vector (a copy)."""
        if self._center is not None:
            return self._center
        return torch.cat([p.detach().reshape(-1) for _, p in self.selected_parameters()])

    def selected_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The ``(name, parameter)`` pairs that make up the centre (``config.parameters``:
        by default the trainable ones), in ``parameters_to_vector`` order."""
        flat = getattr(self.fn, "params", None)
        if isinstance(flat, FlatParameters):
            return list(flat.named)
        return select_parameters(self.model, self.config.parameters)

    def _describe_parameters(self) -> dict:
        """``meta["parameters"]``: which parameters were measured and which were left out."""
        chosen = self.selected_parameters()
        names = {n for n, _ in chosen}
        return {
            "selection": describe_selection(self.config.parameters),
            "tensors": len(chosen),
            "dim": sum(p.numel() for _, p in chosen),
            "excluded": [n for n, _ in self.model.named_parameters() if n not in names],
        }

    @classmethod
    def from_config(cls, config: VolumeConfig) -> VolumeEstimator:
        """Dispatch on ``config.model_type``."""
        return _BUILDERS[config.model_type](config)

    @property
    def preconditioner(self):
        """The proposal the run uses: ``config.preconditioner``, or the one
        ``config.preconditioner_type`` builds (once, on first access; under torchrun rank 0
        builds it and every rank uses its bits, so every rank draws the same directions)."""
        if not self._resolved:
            cfg = self.config
            kind = cfg.preconditioner_type
            if cfg.preconditioner is not None or kind in (None, PreconditionerType.NONE):
                self._preconditioner = cfg.preconditioner
            else:
                init_from_env()
                self._preconditioner = from_rank0(self._build_preconditioner)
            self._resolved = True
        return self._preconditioner

    def _build_preconditioner(self):
        cfg = self.config
        eps = cfg.preconditioner_eps
        if eps is None and Measure(cfg.measure) is Measure.UNIFORM:
            eps = 1e-5  # "prior" needs a prior
        with preserved(self.model):
            return resolve_preconditioner(
                cfg.preconditioner_type,
                model=self.model,
                inputs=self._fisher_inputs,
                optimizer=cfg.optimizer,
                eps=eps,
                exponent=cfg.preconditioner_exponent,
                adam_order=cfg.adam_order,
                cutoff=cfg.cutoff,
                sigma=cfg.sigma,
                seed=cfg.seed,
                parameters=cfg.parameters,
            )

    @property
    def low_memory(self) -> bool:
        """Whether the run writes into the model in place (see ``VolumeConfig.low_memory``)."""
        if self.config.low_memory is not None:
            return bool(self.config.low_memory)
        return sum(p.numel() for _, p in self.selected_parameters()) >= LOW_MEMORY_THRESHOLD

    def run(
        self,
        *,
        callback: Callable[[DirectionRecord], None] | None = None,
        resume_from: VolumeResult | None = None,
    ) -> VolumeResult:
        """Estimate the basin; the model comes back with its modes and parameters intact.

        Parameters
        ----------
        callback : callable, optional
            Called with each finished direction's record (see :func:`basin_volume.estimate`).
        resume_from : VolumeResult, optional
            A partial result of the same run to continue exactly.
        """
        cfg = self.config
        adaptive = cfg.preconditioner_type is PreconditionerType.ADAPTIVE
        if adaptive and self.low_memory:
            raise ValueError(
                "preconditioner_type='adaptive' cannot run in low_memory mode (its proposals "
                "may be dense); use low_memory=False, or preconditioner_type='fisher' or 'adam'"
            )
        if adaptive and resume_from is not None:
            old = resume_from.meta.get("config") or {}
            for name in ("n_samples", "adaptive_rounds"):
                if old.get(name, getattr(cfg, name)) != getattr(cfg, name):
                    raise ValueError(
                        f"an adaptive run resumes with the rounds it started with: {name} was "
                        f"{old[name]!r}, now {getattr(cfg, name)!r}; keep it, or start a new run"
                    )
        pre = self.preconditioner
        settings = dict(
            cutoff=cfg.cutoff,
            measure=cfg.measure,
            sigma=cfg.sigma,
            rtol=cfg.rtol,
            seed=cfg.seed,
            progress=cfg.progress,
            callback=callback,
        )
        with preserved(self.model):
            if adaptive:
                result = estimate_adaptive(
                    self.fn,
                    self.center,
                    rounds=cfg.adaptive_rounds,
                    n_per_round=cfg.n_samples // cfg.adaptive_rounds,
                    resume_from=resume_from,
                    preconditioner=pre,
                    model_batch_size=cfg.model_batch_size,
                    **settings,
                )
            elif self.low_memory:
                params = [p for _, p in self.selected_parameters()]
                dim = sum(p.numel() for p in params)
                batched = cfg.model_batch_size > 1  # as many points as memory allows
                rays = InPlaceRays(
                    self.fn, params, seed=cfg.seed, preconditioner=as_preconditioner(pre, dim),
                    batch_fn=torch.func.vmap(self.fn) if batched else None,
                )  # fmt: skip
                result = run_rays(
                    rays,
                    batch_size=cfg.model_batch_size,
                    n_samples=cfg.n_samples,
                    resume_from=resume_from,
                    max_evals=40,
                    max_radius=None,
                    meta={"device": str(params[0].device), "memory": "light"},
                    **settings,
                )
            else:
                result = estimate(
                    self.fn,
                    self.center,
                    n_samples=cfg.n_samples,
                    resume_from=resume_from,
                    preconditioner=pre,
                    model_batch_size=cfg.model_batch_size,
                    **settings,
                )
        result.meta["config"] = cfg.describe()
        result.meta["parameters"] = self._describe_parameters()
        return result


def _classifier(config: VolumeConfig) -> VolumeEstimator:
    if not isinstance(config.model, torch.nn.Module):
        raise ValueError(
            "model must be a torch.nn.Module mapping inputs to logits for "
            f"model_type={config.model_type.value!r}, got {type(config.model).__name__}"
        )
    if config.inputs is None:
        raise ValueError(
            f"inputs is required for model_type={config.model_type.value!r}: pass inputs=<tensor>"
        )
    with preserved(config.model):
        fn = ClassifierKL(
            config.model,
            config.inputs,
            batch_size=config.data_batch_size,
            compile=config.compile,
            parameters=config.parameters,
        )
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
    return VolumeEstimator(config, config.model, fn, fisher_inputs=config.inputs)


def _convnext(config: VolumeConfig) -> VolumeEstimator:
    model = config.model
    if model is None and config.model_name is None:
        raise ValueError(
            "model_type='convnext' needs model= (an image classifier) or model_name= (a local "
            "folder or hub id, e.g. 'facebook/convnextv2-atto-1k-224')"
        )
    if config.inputs is None:
        raise ValueError(
            "inputs is required for model_type='convnext': pass the preprocessed pixel values "
            "[n, channels, height, width] (e.g. from the model's AutoImageProcessor)"
        )
    if model is None:
        try:
            from transformers import AutoModelForImageClassification
        except ImportError as err:
            raise ImportError(
                "model_name needs transformers: pip install 'basin_volume[hf]'"
            ) from err
        model = AutoModelForImageClassification.from_pretrained(config.model_name)
        model.to(default_device())
    elif config.model_name is not None:
        raise ValueError("pass model or model_name for model_type='convnext', not both")
    return _classifier(config.replace(model=model))


def _mlp(config: VolumeConfig) -> VolumeEstimator:
    from .digits import train_digits_mlp

    model, inputs, optimizer = config.model, config.inputs, config.optimizer
    if model is None or inputs is None:
        run = train_digits_mlp(seed=config.seed)
        if model is None:  # the optimizer that trained it comes along
            model, optimizer = run.model, run.optimizer if optimizer is None else optimizer
        inputs = run.train_inputs if inputs is None else inputs
    return _classifier(config.replace(model=model, inputs=inputs, optimizer=optimizer))


def _causal(config: VolumeConfig) -> VolumeEstimator:
    from .causal import causal_lm_objective

    if config.model is None:
        raise ValueError(
            "model is required for model_type='causal': pass a Hugging Face causal LM, e.g. "
            "AutoModelForCausalLM.from_pretrained(name), or use model_type='pythia'"
        )
    if config.tokenizer is None:
        raise ValueError(
            "tokenizer is required for model_type='causal': pass the model's tokenizer, e.g. "
            "AutoTokenizer.from_pretrained(name)"
        )
    if config.dataset is None:
        raise ValueError(
            f"dataset is required for model_type={config.model_type.value!r}: pass texts, e.g. "
            "datasets.Dataset.from_dict({'text': [...]}), with text_key naming the column"
        )
    mbs = config.model_batch_size
    if isinstance(mbs, bool) or not isinstance(mbs, int) or mbs < 1:
        raise ValueError(f"model_batch_size must be a positive integer, got {mbs!r}")
    fn = causal_lm_objective(
        config.model,
        config.tokenizer,
        config.dataset,
        text_key=config.text_key,
        val_size=config.val_size,
        max_seq_len=config.max_seq_len,
        chunking=config.chunking,
        data_batch_size=config.data_batch_size,
        cache_mode=config.cache_mode,
        cache_budget_bytes=config.cache_budget_bytes,
        compile=config.compile,
        parameters=config.parameters,
    )
    return VolumeEstimator(config, fn.model, fn, fisher_inputs=fn)


def _pythia(config: VolumeConfig) -> VolumeEstimator:
    from .causal import load_pythia

    if config.model is not None or config.tokenizer is not None:
        raise ValueError(
            "model_type='pythia' loads the model and tokenizer itself from model_name and "
            "checkpoint_step; leave model and tokenizer unset, or use model_type='causal' "
            "to pass your own"
        )
    if config.dataset is None:  # checked before a download, not after
        raise ValueError(
            "dataset is required for model_type='pythia': pass validation texts, e.g. "
            "datasets.Dataset.from_dict({'text': [...]}), with text_key naming the column"
        )
    model, tokenizer = load_pythia(config.model_name, config.checkpoint_step)
    return _causal(config.replace(model=model, tokenizer=tokenizer))


_BUILDERS: dict[ModelType, Callable[[VolumeConfig], VolumeEstimator]] = {
    ModelType.CLASSIFIER: _classifier,
    ModelType.MLP: _mlp,
    ModelType.CAUSAL: _causal,
    ModelType.PYTHIA: _pythia,
    ModelType.CONVNEXT: _convnext,
}

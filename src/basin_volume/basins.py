r"""Which basin a model-level run measures: the KL basin or a loss basin.

``VolumeConfig(basin="kl")`` (the default) measures the KL basin of
:mod:`basin_volume.objectives` and :mod:`basin_volume.causal`. ``basin="loss"`` measures the
*loss basin*

.. math:: \delta(\theta) = L(\theta) - L(\theta_0) \le \varepsilon,

for the mean loss :math:`L` of the model on its evaluation data:

* classifiers (``model_type="classifier"``, ``"mlp"``, ``"convnext"``): by default the
  cross-entropy of the logits against integer class labels,
  :math:`L(\theta) = -\frac1N\sum_n \log p_\theta(y_n\mid x_n)`;
* causal language models: by default the next-token cross-entropy over every predicted
  non-padding token,
  :math:`L(\theta) = -\frac1N\sum_{s}\sum_{i:\,m^{(s)}_{i+1}=1}\log p_\theta(x^{(s)}_{i+1}
  \mid x^{(s)}_{\le i})`, :math:`N` the number of such tokens (Hugging Face ``labels``,
  with ``-100`` for ignored positions, replace the input ids as targets when given).

``loss_fn(outputs, labels)`` replaces the default: it gets a batch's outputs (the logits, or
the model's output tensor) and labels, and returns that batch's *mean* loss (PyTorch's default
``reduction="mean"``); batches are weighted by their number of examples (classifiers) or of
predicted tokens (causal LMs), so :math:`L` is the mean over the whole data set whatever the
batching. Labels come from ``labels=`` (with tensor inputs) or from the batches themselves
(``(x, y)`` tuples, dicts with ``labels``). The estimator subtracts :math:`L(\theta_0)`, which
it computes once; losses are accumulated in float64 (float32 on MPS).

For the basin to be meaningful :math:`\theta_0` should be near a minimum of :math:`L`;
along directions where the loss first falls, the radius is where it has come back up to
:math:`L(\theta_0) + \varepsilon`.
"""

from __future__ import annotations

import enum
import inspect
import itertools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .devices import wide_dtype
from .inputs import Batches, is_batch_source
from .parameters import FlatParameters, ParameterSelection, preserved

__all__ = [
    "Basin",
    "CausalLMLoss",
    "ClassifierLoss",
    "causal_tokens",
    "check_basin_settings",
    "token_tensors",
]

IGNORE_INDEX = -100
"""Label of positions that do not count (the Hugging Face and PyTorch convention)."""

_SLICE_ELEMENTS = 1 << 22

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Basin(enum.StrEnum):
    """What :math:`\\delta` a model-level run measures."""

    KL = "kl"
    """Mean KL divergence of the model's predictions from the centre's (no labels needed)."""
    LOSS = "loss"
    """Excess loss :math:`L(\\theta) - L(\\theta_0)` on labelled data (cross-entropy by
    default, or ``loss_fn``)."""


def check_basin_settings(basin: Any, labels: Any, loss_fn: Any) -> Basin:
    """``basin`` as a :class:`Basin`, checked against ``labels`` and ``loss_fn``.

    Raises
    ------
    ValueError
        For an unknown basin, or labels / a loss function given for a KL basin.
    """
    try:
        kind = Basin(basin)
    except ValueError:
        raise ValueError(f"basin must be 'kl' or 'loss', got {basin!r}") from None
    if kind is Basin.KL and (labels is not None or loss_fn is not None):
        given = "labels" if labels is not None else "loss_fn"
        raise ValueError(
            f"{given} defines a loss basin, but basin='kl' (the default) measures the KL of "
            "the predictions and uses no labels; pass basin='loss'"
        )
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(
            f"loss_fn must be a function (outputs, labels) -> mean loss, e.g. "
            f"torch.nn.CrossEntropyLoss(), got {type(loss_fn).__name__}"
        )
    return kind


def _outputs(out: Any) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, tuple | list) else out
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            "model must return a tensor (or an output with .logits) for a loss basin, got "
            f"{type(out).__name__}"
        )
    return logits


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(wide_dtype(tensor.device)) if tensor.is_floating_point() else tensor


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of rows of ``logits`` ``[n, classes]`` against ``targets`` ``[n]``
    in the wide dtype, a slice of rows at a time."""
    wide = wide_dtype(logits.device)
    total = torch.zeros((), dtype=wide, device=logits.device)
    step = max(1, _SLICE_ELEMENTS // max(1, logits.shape[-1]))
    for rows, ys in zip(logits.split(step), targets.split(step), strict=True):
        total = total + nn.functional.cross_entropy(rows.to(wide), ys, reduction="sum")
    return total


class _LossBasin:
    """What both loss objectives share: the flat centre, and a finite loss there."""

    @property
    def center(self) -> torch.Tensor:
        """A flat copy of the model's parameters (made on each access)."""
        return self.params.center()

    def _check_finite_at_center(self, model: nn.Module) -> None:
        with preserved(model):
            value = float(self(None))
        if not torch.isfinite(torch.tensor(value)):
            raise ValueError(f"the loss at the centre is {value}; the loss basin needs it finite")


class ClassifierLoss(_LossBasin):
    r"""Mean loss :math:`L(\theta)` of a model on labelled data (the estimator forms
    :math:`L(\theta) - L(\theta_0)`).

    Parameters
    ----------
    model : torch.nn.Module
        Maps a batch of inputs to outputs (logits ``[batch, classes]`` for the default
        cross-entropy).
    inputs : tensor, DataLoader or iterable of batches
        As for :class:`~basin_volume.objectives.ClassifierKL`; ``(x, y)`` tuples and dicts
        with ``labels`` carry their labels.
    labels : torch.Tensor, optional
        Labels for tensor ``inputs``.
    loss_fn : callable, optional
        ``loss_fn(outputs, labels) -> mean loss of the batch``; default cross-entropy.
    batch_size : int
        Rows per forward pass for tensor inputs.
    compile : bool or dict, optional
        See :class:`~basin_volume.parameters.FlatParameters`.
    parameters : "trainable", "all", list of str, or callable
        Which parameters are the basin's coordinates.

    Raises
    ------
    ValueError
        When there are no labels, or the loss is not finite at the centre.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Any,
        *,
        labels: torch.Tensor | None = None,
        loss_fn: LossFn | None = None,
        batch_size: int = 4096,
        compile: bool | dict | None = None,
        parameters: ParameterSelection = "trainable",
    ):
        self.params = FlatParameters(model, compile=compile, parameters=parameters)
        self.data = Batches(
            inputs,
            batch_size=batch_size,
            device=self.params.device,
            dtype=self.params.dtype,
            labels=labels,
        )
        self.loss_fn = loss_fn
        self._check_finite_at_center(model)

    def _batch_loss(self, outputs: torch.Tensor, labels: torch.Tensor, size: int) -> torch.Tensor:
        if self.loss_fn is not None:
            return torch.as_tensor(self.loss_fn(_wide(outputs), _wide(labels))) * size
        if labels.is_floating_point() or labels.ndim != 1:
            raise ValueError(
                "the default loss is cross-entropy against integer class labels [batch]; got "
                f"{labels.dtype} labels of shape {tuple(labels.shape)}: pass "
                "loss_fn=<your loss>, e.g. torch.nn.MSELoss() for regression"
            )
        if outputs.ndim != 2 or outputs.shape[0] != size:
            raise ValueError(
                "the default cross-entropy needs logits [batch, classes]; the model returned "
                f"shape {tuple(outputs.shape)} for a batch of {size}"
            )
        return _cross_entropy_sum(outputs, labels)

    def __call__(self, theta: torch.Tensor | None = None) -> torch.Tensor:
        """:math:`L(\\theta)` (``None``: the parameters currently in the model)."""
        wide = wide_dtype(self.params.device)
        total = torch.zeros((), dtype=wide, device=self.params.device)
        with torch.no_grad():
            for i, batch in enumerate(self.data):
                if batch.labels is None:
                    raise ValueError(
                        f"basin='loss' needs labels, and inputs batch {i} has none: pass "
                        "labels=<tensor> with tensor inputs, or (inputs, labels) batches, or "
                        "dicts with a 'labels' entry"
                    )
                out = _outputs(self.params.call(theta, *batch.args, **batch.kwargs))
                total = total + self._batch_loss(out, batch.labels, batch.size).to(wide)
        return total / self.data.n_examples


# --------------------------------------------------------------------------- causal LMs


def _pad_right(rows: list[torch.Tensor], width: int, fill: int) -> torch.Tensor:
    out = torch.full((sum(len(r) for r in rows), width), fill, dtype=torch.long)
    at = 0
    for r in rows:
        out[at : at + len(r), : r.shape[1]] = r
        at += len(r)
    return out


def token_tensors(inputs: Any) -> dict[str, torch.Tensor | None]:
    """Token ids, attention mask and labels of a causal LM's evaluation data, as tensors.

    Parameters
    ----------
    inputs : tensor, dict, DataLoader or iterable of batches
        ``input_ids`` ``[n, length]``; one dict with ``input_ids`` (and ``attention_mask``,
        ``labels``); or batches of such dicts, of ``(input_ids, labels)`` tuples or of id
        tensors. Batches of different widths are right-padded to the widest (mask 0, label
        ``-100``). Sequences must be right-padded themselves.

    Returns
    -------
    dict
        ``input_ids``, ``attention_mask`` (int64, on the CPU) and ``labels`` (or ``None``).
    """
    if isinstance(inputs, torch.Tensor) or isinstance(inputs, Mapping):
        batches = [inputs]
    elif is_batch_source(inputs):
        batches = list(inputs)  # token ids are small next to the logits cache
    else:
        raise TypeError(
            "inputs for a causal LM must be input_ids [n, length], a dict with 'input_ids' "
            "and 'attention_mask', or a DataLoader / iterable of such batches; got "
            f"{type(inputs).__name__}"
        )
    ids, masks, labels = [], [], []
    for i, batch in enumerate(batches):
        if isinstance(batch, Mapping):
            if "input_ids" not in batch:
                raise ValueError(
                    f"inputs batch {i} has no 'input_ids' (keys {sorted(map(str, batch))}); a "
                    "causal LM's batches are dicts with input_ids and attention_mask"
                )
            x, mask = batch["input_ids"], batch.get("attention_mask")
            y = batch.get("labels")
        elif isinstance(batch, tuple | list) and len(batch) in (1, 2):
            x, mask, y = batch[0], None, batch[1] if len(batch) == 2 else None
        else:
            x, mask, y = batch, None, None
        x = torch.as_tensor(x).cpu().long()
        if x.ndim != 2:
            raise ValueError(
                f"inputs batch {i}: input_ids must be [batch, length], got {tuple(x.shape)}"
            )
        ids.append(x)
        masks.append(torch.ones_like(x) if mask is None else torch.as_tensor(mask).cpu().long())
        labels.append(None if y is None else torch.as_tensor(y).cpu().long())
    if any(y is not None for y in labels) and any(y is None for y in labels):
        raise ValueError("some inputs batches have labels and some do not; give all or none")
    width = max(x.shape[1] for x in ids)
    return {
        "input_ids": _pad_right(ids, width, 0),
        "attention_mask": _pad_right(masks, width, 0),
        "labels": None if labels[0] is None else _pad_right(labels, width, IGNORE_INDEX),
    }


def causal_tokens(
    tokenizer,
    dataset,
    *,
    text_key: str = "text",
    val_size: int = 10,
    max_seq_len: int = 2048,
    chunking: bool = False,
) -> dict[str, torch.Tensor]:
    """The tokens a causal-LM run evaluates on: the first ``val_size`` texts (or chunks),
    tokenised as :func:`~basin_volume.causal.causal_lm_objective` does."""
    from .texts import chunk_and_tokenize, iter_texts, tokenize_texts

    if chunking:
        return chunk_and_tokenize(
            dataset, tokenizer, text_key=text_key, max_seq_len=max_seq_len, n_chunks=val_size
        )
    select = getattr(dataset, "select", None)
    try:
        size = len(dataset)
    except TypeError:
        size = None
    if callable(select) and size is not None and not isinstance(dataset, Mapping):
        dataset = select(range(min(val_size, size)))
    texts = list(itertools.islice(iter_texts(dataset, text_key), val_size))
    if not texts:
        raise ValueError("dataset is empty: pass at least one text")
    if len(texts) < val_size:
        warnings.warn(
            f"dataset has only {len(texts)} texts, fewer than val_size={val_size}; using all "
            "of them",
            UserWarning,
            stacklevel=3,
        )
    return tokenize_texts(texts, tokenizer, max_seq_len=max_seq_len)


class CausalLMLoss(_LossBasin):
    r"""Mean next-token loss :math:`L(\theta)` of a causal LM (see the module docstring).

    Parameters
    ----------
    model : torch.nn.Module
        A causal LM returning logits ``[batch, positions, vocab]``.
    input_ids, attention_mask : torch.Tensor
        ``[n, length]``, right-padded.
    labels : torch.Tensor, optional
        Unshifted targets like ``input_ids`` (``-100``: not counted), as Hugging Face models
        take them; default ``input_ids`` at the non-padding positions.
    loss_fn : callable, optional
        ``loss_fn(logits, labels) -> mean loss over the batch's predicted tokens`` with
        unshifted ``labels`` (as Hugging Face's causal-LM loss); default next-token
        cross-entropy.
    batch_size : int
        Sequences per forward pass.
    compile : bool or dict, optional
        See :class:`~basin_volume.parameters.FlatParameters`.
    parameters : "trainable", "all", list of str, or callable
        Which parameters are the basin's coordinates.
    """

    def __init__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        loss_fn: LossFn | None = None,
        batch_size: int = 4096,
        compile: bool | dict | None = None,
        parameters: ParameterSelection = "trainable",
    ):
        from .causal import _unwrap

        self.model = _unwrap(model)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            raise ValueError(
                f"input_ids must be a tensor [n, length], got {getattr(input_ids, 'shape', None)}"
            )
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must be shaped like input_ids {tuple(input_ids.shape)}, got "
                f"{tuple(attention_mask.shape)}"
            )
        lengths = attention_mask.cpu().bool().sum(1)
        if not torch.equal(
            attention_mask.cpu().bool(), torch.arange(input_ids.shape[1]) < lengths[:, None]
        ):
            raise ValueError(
                "attention_mask must be right-padded (ones, then zeros) in every row; "
                "tokenise with padding_side='right'"
            )
        self._tokens = (input_ids, attention_mask, batch_size, parameters)
        self._kl = None
        self.params = FlatParameters(self.model, compile=compile, parameters=parameters)
        self.loss_fn = loss_fn
        mask = attention_mask.cpu().long()
        targets = input_ids.cpu().long().masked_fill(mask == 0, IGNORE_INDEX)
        if labels is not None:
            labels = torch.as_tensor(labels).cpu().long()
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels must be shaped like input_ids {tuple(input_ids.shape)}, got "
                    f"{tuple(labels.shape)}"
                )
            targets = labels.masked_fill(mask == 0, IGNORE_INDEX)
        keep = mask.sum(1) > 0
        ids, mask, targets = input_ids.cpu().long()[keep], mask[keep], targets[keep]
        self.n_tokens = int((targets[:, 1:] != IGNORE_INDEX).sum())
        if self.n_tokens == 0:
            raise ValueError(
                "no token has a predecessor to predict it from (every sequence is one token "
                "long, or every label is -100): the next-token loss is undefined"
            )
        device = self.params.device
        self._batches = []
        for b in range(0, len(ids), batch_size):
            sl = slice(b, b + batch_size)
            width = int(mask[sl].sum(1).max())
            self._batches.append(tuple(t[sl, :width].to(device) for t in (ids, mask, targets)))
        self._kwargs = {}
        if "use_cache" in inspect.signature(self.model.forward).parameters:
            self._kwargs["use_cache"] = False
        self._check_finite_at_center(self.model)

    def __call__(self, theta: torch.Tensor | None = None) -> torch.Tensor:
        """:math:`L(\\theta)` in float64 (float32 on MPS)."""
        from .causal import _logits_of

        device = self.params.device
        wide = wide_dtype(device)
        total = torch.zeros((), dtype=wide, device=device)
        with torch.no_grad():
            for ids, mask, targets in self._batches:
                out = self.params.call(theta, input_ids=ids, attention_mask=mask, **self._kwargs)
                logits = _logits_of(out)
                shifted = targets[:, 1:]
                count = int((shifted != IGNORE_INDEX).sum())
                if self.loss_fn is not None:
                    if count:
                        loss = torch.as_tensor(self.loss_fn(_wide(logits), targets))
                        total = total + loss.to(wide) * count
                    continue
                sel = shifted != IGNORE_INDEX
                total = total + _cross_entropy_sum(logits[:, :-1][sel], shifted[sel])
        return total / self.n_tokens

    def fisher_diagonal(self, *, n_samples: int = 1, seed: int = 0) -> torch.Tensor:
        """The sampled-label Fisher of the next-token distributions over the same tokens
        (:meth:`basin_volume.causal.CausalLMKL.fisher_diagonal`), a curvature proxy for the
        cross-entropy."""
        from .causal import CausalLMKL

        if self._kl is None:
            ids, mask, batch_size, parameters = self._tokens
            self._kl = CausalLMKL(
                self.model,
                ids,
                mask,
                batch_size=batch_size,
                cache_mode=None,
                parameters=parameters,
            )
        return self._kl.fisher_diagonal(n_samples=n_samples, seed=seed)


# --------------------------------------------------------------------------- builders


def classifier_objective(config) -> ClassifierLoss | Any:
    """The objective of a classifier ``VolumeConfig``: its KL or loss basin on ``inputs``."""
    from .objectives import ClassifierKL

    settings = dict(
        batch_size=config.data_batch_size, compile=config.compile, parameters=config.parameters
    )
    if Basin(config.basin) is Basin.KL:
        return ClassifierKL(config.model, config.inputs, **settings)
    return ClassifierLoss(
        config.model, config.inputs, labels=config.labels, loss_fn=config.loss_fn, **settings
    )


def fisher_inputs(config, fn) -> Any:
    """What a classifier's Fisher preconditioner is computed on: the input tensor (stacked
    from the batches, and only when a Fisher kind is asked for)."""
    if isinstance(config.inputs, torch.Tensor):
        return config.inputs
    kind = config.preconditioner_type
    if getattr(kind, "value", kind) in ("fisher", "fisher_dense"):
        return fn.data.stacked_inputs()
    return None


def causal_objective(config) -> Any:
    """The objective of a causal-LM ``VolumeConfig``: KL or loss basin, on the texts of
    ``dataset`` or on the token batches of ``inputs``."""
    from .causal import CausalLMKL, causal_lm_objective

    basin = Basin(config.basin)
    common = dict(compile=config.compile, parameters=config.parameters)
    if config.inputs is None and basin is Basin.KL:
        return causal_lm_objective(
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
            **common,
        )
    if config.inputs is not None:
        tokens = token_tensors(config.inputs)
    else:
        tokens = causal_tokens(
            config.tokenizer,
            config.dataset,
            text_key=config.text_key,
            val_size=config.val_size,
            max_seq_len=config.max_seq_len,
            chunking=config.chunking,
        )
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    if basin is Basin.KL:
        return CausalLMKL(
            config.model,
            ids,
            mask,
            batch_size=config.data_batch_size,
            cache_mode=config.cache_mode,
            cache_budget_bytes=config.cache_budget_bytes,
            **common,
        )
    labels = config.labels if config.labels is not None else tokens.get("labels")
    return CausalLMLoss(
        config.model,
        ids,
        mask,
        labels=labels,
        loss_fn=config.loss_fn,
        batch_size=config.data_batch_size,
        **common,
    )

"""Evaluation data in the forms researchers already have: a tensor, a DataLoader, batches.

A model-level objective (:class:`~basin_volume.objectives.ClassifierKL`,
:class:`~basin_volume.losses.ClassifierLoss`) reads its data through :class:`Batches`, which
accepts

* a tensor whose first axis indexes examples (split into ``batch_size`` rows and moved to the
  model's device once, as before);
* a :class:`torch.utils.data.DataLoader`, or any iterable of batches, each of which is

  - a tensor ``x`` (the model is called as ``model(x)``),
  - a tuple ``(x, y)`` or ``(x,)``: ``model(x)``, with labels ``y`` for a loss basin
    (``x`` may itself be a dict of keyword arguments),
  - a dict of the model's keyword arguments, Hugging Face style (``input_ids``,
    ``attention_mask``, ``pixel_values``...): ``model(**batch)``, with the entry ``labels``
    (or ``label``) taken out as the labels.

Batches from a loader are *streamed*: each evaluation of the objective reads the loader again,
moving one batch at a time to the model's device, so the data set never has to fit there.
What is cached is the centre's outputs (or, for a loss basin, nothing but one number), as for
a tensor. The objective is only defined if every pass sees the same examples in the same
order, so a shuffling loader is refused and every pass is checked against the first (batch
sizes and a checksum of each batch): a loader with random augmentation fails loudly instead of
giving a noisy, meaningless basin. An iterator that can be read only once (a generator) is read
once and its batches are kept in host memory.

Floating-point inputs are cast to the parameters' dtype, integer ones (token ids, attention
masks, labels) keep theirs, exactly as for a tensor, so a loader of the rows of a tensor gives
bit for bit the values of the tensor split into the same batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Batch", "Batches", "LABEL_KEYS", "is_batch_source"]

LABEL_KEYS = ("labels", "label")
"""Entries of a dict batch that hold labels rather than model arguments."""


@dataclass(frozen=True)
class Batch:
    """One batch as the model is called with it: ``model(*args, **kwargs)``.

    Attributes
    ----------
    args : tuple
        Positional arguments (tensors on the model's device).
    kwargs : dict
        Keyword arguments (Hugging Face style), on the model's device.
    labels : torch.Tensor or None
        The batch's labels, if it came with any.
    size : int
        Number of examples (the first axis of the first tensor).
    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    labels: torch.Tensor | None = None
    size: int = 0

    def get(self, name: str) -> torch.Tensor | None:
        """The keyword argument ``name`` (e.g. ``"attention_mask"``), or ``None``."""
        return self.kwargs.get(name)


def is_batch_source(inputs: Any) -> bool:
    """Whether ``inputs`` is an iterable of batches rather than a single tensor."""
    if isinstance(inputs, torch.Tensor | str | bytes | Mapping):
        return False
    return isinstance(inputs, Iterable)


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        for v in value.values():
            found = _first_tensor(v)
            if found is not None:
                return found
    if isinstance(value, tuple | list):
        for v in value:
            found = _first_tensor(v)
            if found is not None:
                return found
    return None


def _split_batch(item: Any, index: int) -> tuple[tuple, dict, Any]:
    """``(args, kwargs, labels)`` of one raw batch."""
    if isinstance(item, torch.Tensor):
        return (item,), {}, None
    if isinstance(item, Mapping):
        kwargs = {k: v for k, v in item.items() if k not in LABEL_KEYS}
        labels = next((item[k] for k in LABEL_KEYS if k in item), None)
        if not kwargs:
            raise ValueError(
                f"inputs batch {index} is a dict with no model arguments (keys "
                f"{sorted(map(str, item))}); give the model's keyword arguments, e.g. "
                "{'input_ids': ..., 'attention_mask': ..., 'labels': ...}"
            )
        return (), dict(kwargs), labels
    if isinstance(item, tuple | list):
        if len(item) not in (1, 2):
            raise ValueError(
                f"inputs batch {index} is a {type(item).__name__} of {len(item)} items; give "
                "(inputs,), (inputs, labels) or a dict of the model's keyword arguments "
                "(e.g. with a collate_fn that returns one of these)"
            )
        x = item[0]
        labels = item[1] if len(item) == 2 else None
        if isinstance(x, Mapping):
            return (), dict(x), labels
        return (x,), {}, labels
    raise TypeError(
        f"inputs batch {index} is a {type(item).__name__}; batches must be tensors, "
        "(inputs, labels) tuples or dicts of the model's keyword arguments"
    )


def _checksum(parts: Iterable[Any]) -> tuple:
    """Shapes and float64 sums of the tensors in ``parts``: what must not change between
    passes over the data."""
    out = []
    for part in parts:
        if isinstance(part, torch.Tensor):
            wide = torch.float64 if part.is_floating_point() else None  # no float64 copy
            out.append((tuple(part.shape), part.dtype, float(part.detach().sum(dtype=wide))))
        elif isinstance(part, Mapping):
            out.append(tuple(sorted((str(k), _checksum([v])) for k, v in part.items())))
        elif isinstance(part, tuple | list):
            out.append(_checksum(part))
        elif part is not None:
            out.append(repr(type(part)))
    return tuple(out)


def _shuffles(loader: Any) -> bool:
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    inner = getattr(batch_sampler, "sampler", None)
    return any(
        isinstance(s, torch.utils.data.RandomSampler | torch.utils.data.SubsetRandomSampler)
        for s in (sampler, inner)
    )


def _in_process_map_style(loader: Any) -> bool:
    return (
        isinstance(loader, torch.utils.data.DataLoader)
        and loader.num_workers == 0
        and not isinstance(loader.dataset, torch.utils.data.IterableDataset)
    )


def _map_style_batches(loader: torch.utils.data.DataLoader) -> Iterator[Any]:
    """The batches of a single-process, map-style DataLoader, read as its own iterator reads
    them (batch sampler, ``__getitems__`` or indexing, ``collate_fn``) but without creating
    that iterator, which draws a seed from the global random generator: a pass then neither
    changes the caller's random state nor fails inside :func:`torch.func.vmap` (batched
    evaluation of several directions)."""
    dataset, collate = loader.dataset, loader.collate_fn
    if loader.batch_sampler is None:  # batch_size=None: one example per batch
        for index in loader.sampler:
            yield collate(dataset[index])
        return
    getitems = getattr(dataset, "__getitems__", None)
    for indices in loader.batch_sampler:
        yield collate(getitems(indices) if getitems else [dataset[i] for i in indices])


class Batches:
    """The evaluation data of an objective as a re-iterable sequence of :class:`Batch` es.

    Parameters
    ----------
    inputs : tensor, DataLoader or iterable of batches
        See the module docstring.
    batch_size : int
        Rows per batch when ``inputs`` is a tensor (a loader keeps its own batches).
    device : torch.device
        Where the model lives; every batch is moved there.
    dtype : torch.dtype
        The parameters' dtype; floating-point inputs are cast to it.
    labels : torch.Tensor, optional
        Labels for tensor ``inputs`` (first axis matching it). With a loader or batches the
        labels come from the batches themselves.

    Attributes
    ----------
    n_examples : int
        Examples in one pass (the sum of the batch sizes).
    n_batches : int
        Batches in one pass.
    streamed : bool
        Whether each pass re-reads a loader (``False`` for a tensor or a one-shot iterator,
        whose batches are held).
    """

    def __init__(
        self,
        inputs: Any,
        *,
        batch_size: int = 4096,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        labels: torch.Tensor | None = None,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"data_batch_size must be a positive integer, got {batch_size!r}")
        self.device = torch.device(device)
        self.dtype = dtype
        self._tensor: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._source: Any = None
        self._held: list | None = None
        self._signature: list[tuple] | None = None
        if isinstance(inputs, torch.Tensor):
            if inputs.ndim < 1 or len(inputs) == 0:
                raise ValueError(
                    "inputs must be a non-empty tensor whose first axis indexes examples, got "
                    f"shape {tuple(inputs.shape)}"
                )
            self._tensor = self._move(inputs)
            self.batch_size = batch_size
            if labels is not None:
                if not isinstance(labels, torch.Tensor) or len(labels) != len(inputs):
                    raise ValueError(
                        f"labels must be a tensor with one entry per input ({len(inputs)}), "
                        f"got {type(labels).__name__} of shape {getattr(labels, 'shape', None)}"
                    )
                self._labels = labels.to(self.device)
            self.n_examples = len(inputs)
            self.n_batches = -(-len(inputs) // batch_size)
            self.streamed = False
            return
        if not is_batch_source(inputs):
            raise TypeError(
                "inputs must be a tensor whose first axis indexes examples, a "
                "torch.utils.data.DataLoader, or an iterable of batches (tensors, "
                f"(inputs, labels) tuples or dicts of model keyword arguments); got "
                f"{type(inputs).__name__}"
            )
        if labels is not None:
            raise ValueError(
                "labels is for tensor inputs; with a DataLoader or batches, give the labels in "
                "the batches themselves: (inputs, labels) tuples or dicts with 'labels'"
            )
        if _shuffles(inputs):
            raise ValueError(
                "inputs is a DataLoader that shuffles (shuffle=True or a random sampler): each "
                "evaluation of the basin must see the same examples in the same order; pass "
                "DataLoader(dataset, batch_size=..., shuffle=False)"
            )
        if isinstance(inputs, Iterator):  # a generator or iterator: read once, keep the batches
            self._held = list(inputs)
            self.streamed = False
        else:
            self._source = inputs
            self.streamed = True
        sizes, signature = [], []
        for index, item in enumerate(self._raw()):  # what one pass holds; nothing is moved
            parts = _split_batch(item, index)
            sizes.append(self._size(parts, index))
            if self.streamed:
                signature.append(_checksum(parts))
        self._signature = signature
        if not sizes or sum(sizes) == 0:
            raise ValueError("inputs holds no examples: pass at least one non-empty batch")
        self.n_examples = sum(sizes)
        self.n_batches = len(sizes)

    # ------------------------------------------------------------------ conversion

    def _move(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            dtype = self.dtype if value.is_floating_point() else value.dtype
            return value.to(self.device, dtype, non_blocking=True)
        if isinstance(value, Mapping):
            return {k: self._move(v) for k, v in value.items()}
        if isinstance(value, tuple | list):
            return type(value)(self._move(v) for v in value)
        return value

    @staticmethod
    def _size(parts: tuple, index: int) -> int:
        first = _first_tensor(parts[:2])
        if first is None or first.ndim < 1:
            raise ValueError(
                f"inputs batch {index} holds no tensor with a batch axis; batches must carry "
                "the model's inputs as tensors [batch, ...]"
            )
        return int(first.shape[0])

    def _batch(self, parts: tuple, index: int) -> Batch:
        args, kwargs, labels = parts
        size = self._size(parts, index)
        if labels is not None and not isinstance(labels, torch.Tensor):
            labels = torch.as_tensor(labels)
        return Batch(
            args=self._move(args),
            kwargs=self._move(kwargs),
            labels=None if labels is None else labels.to(self.device, non_blocking=True),
            size=size,
        )

    # ------------------------------------------------------------------ iteration

    def _raw(self) -> Iterator[Any]:
        if self._held is not None:
            return iter(self._held)
        if _in_process_map_style(self._source):
            return _map_style_batches(self._source)
        return iter(self._source)

    def _read_pass(self) -> Iterator[Batch]:
        index = -1
        for index, item in enumerate(self._raw()):
            parts = _split_batch(item, index)
            if self.streamed and (
                index >= len(self._signature) or _checksum(parts) != self._signature[index]
            ):
                raise ValueError(self._changed(index))
            yield self._batch(parts, index)
        if self.streamed and index + 1 != len(self._signature):
            raise ValueError(self._changed(index + 1))

    def _changed(self, index: int) -> str:
        return (
            f"inputs gave different data on this pass than on the first (batch {index} "
            "differs): the basin is measured on fixed data, so the loader must not shuffle, "
            "augment at random or drop batches; use a deterministic DataLoader "
            "(shuffle=False, no random transforms)"
        )

    def __iter__(self) -> Iterator[Batch]:
        if self._tensor is not None:
            xs = self._tensor.split(self.batch_size)
            ys = (
                self._labels.split(self.batch_size)
                if self._labels is not None
                else [None] * len(xs)
            )
            for x, y in zip(xs, ys, strict=True):
                yield Batch(args=(x,), labels=y, size=len(x))
            return
        yield from self._read_pass()

    def __len__(self) -> int:
        return self.n_batches

    def stacked_inputs(self) -> torch.Tensor:
        """All positional inputs as one tensor (for the classifier Fisher, which needs one).

        Raises
        ------
        ValueError
            For batches of keyword arguments, which have no single input tensor.
        """
        if self._tensor is not None:
            return self._tensor
        parts = []
        for batch in self:
            if batch.kwargs or len(batch.args) != 1:
                raise ValueError(
                    "preconditioner_type='fisher'/'fisher_dense' for a classifier needs its "
                    "inputs as a tensor or (inputs, labels) batches, not dicts of keyword "
                    "arguments; use preconditioner_type='adam' or 'adaptive' instead"
                )
            parts.append(batch.args[0])
        return torch.cat(parts)


def batches_sha256(inputs: Any) -> str:
    """SHA-256 of the tensors in every batch of ``inputs`` (a loader or batches), in order,
    with their dtypes and shapes: the evaluation data's fingerprint in a run log, so a run
    is not resumed on other data."""
    import hashlib

    digest = hashlib.sha256()
    source = Batches(inputs)

    def update(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            flat = value.detach().reshape(-1).contiguous().cpu()
            digest.update(f"{flat.dtype}:{list(value.shape)}:".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        elif isinstance(value, Mapping):
            for key in sorted(value, key=str):
                digest.update(f"{key}=".encode())
                update(value[key])
        elif isinstance(value, tuple | list):
            for v in value:
                update(v)

    for index, item in enumerate(source._raw()):
        digest.update(f"batch{index}:".encode())
        update(_split_batch(item, index))
    return digest.hexdigest()

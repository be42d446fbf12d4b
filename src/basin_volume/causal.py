r"""The KL basin of a Hugging Face causal language model.

For validation sequences :math:`x^{(1)},\dots,x^{(n)}` with attention masks :math:`m`, the
objective is the per-token KL divergence of the next-token distributions from the centre's,
averaged over every non-padding position:

.. math::

    \delta(\theta) = \frac{1}{N}\sum_{s=1}^{n}\sum_{i:\, m^{(s)}_i = 1}
        \mathrm{KL}\big(p_{\theta_0}(\cdot\mid x^{(s)}_{\le i})\,\big\|\,
        p_\theta(\cdot\mid x^{(s)}_{\le i})\big),
    \qquad N = \sum_{s,i} m^{(s)}_i,

in nats, with :math:`\mathrm{KL}(p\|q) = \sum_v p_v(\log p_v - \log q_v)` over the
vocabulary. Positions are chosen by the attention mask, never by comparing token ids with
the pad id, so a real token that happens to equal the pad id is counted. Sequences are
right-padded, so with causal attention the padding never changes a real position's output.

The model is evaluated with :meth:`~basin_volume.parameters.FlatParameters.call`
(:func:`torch.func.functional_call`): its own parameters are never written.

**Caching the centre.** :math:`\log p_{\theta_0}` is needed at every evaluation. It is either
recomputed by a second forward pass each time (``cache_mode=None``) or cached once. The cache
holds the centre's *logits at the non-padding positions only*, in the model's dtype (float32
for a float32 model, half that for bfloat16/float16 models): exactly the numbers the
recomputation would produce, so every cache mode gives bit-identical values of
:math:`\delta` and hence identical estimates for the same seed. (Storing rounded
log-probabilities or a top-k would be smaller but would change the objective.) Log-softmax
and the KL are evaluated in float64 (float32 on MPS, which has no float64) in slices of
positions, so memory beyond the forward pass stays bounded.

The texts are tokenised by :mod:`basin_volume.texts`; the paper's Pythia models are loaded by
:mod:`basin_volume.pythia` (both re-exported here).
"""

from __future__ import annotations

import enum
import inspect
import warnings

import torch
from torch import nn

from .devices import available_ram_bytes, wide_dtype
from .objectives import kl_from_logprobs
from .parameters import FlatParameters, ParameterSelection, preserved
from .pythia import PYTHIA_STEPS, load_pythia, pythia_source
from .texts import (
    _check_budget,
    _check_positive_int,
    _dataset_len,
    _first_texts,
    chunk_and_tokenize,
    iter_texts,
    tokenize_texts,
)

__all__ = [
    "PYTHIA_STEPS",
    "CacheMode",
    "CausalLMKL",
    "causal_lm_objective",
    "choose_cache_device",
    "chunk_and_tokenize",
    "iter_texts",
    "load_pythia",
    "pythia_source",
    "tokenize_texts",
]

_SLICE_ELEMENTS = 1 << 22  # log-softmax/KL work on at most this many float64 entries at once


class CacheMode(enum.StrEnum):
    """Where the centre's outputs are cached (``None`` or ``"none"``: recompute them every
    time)."""

    CPU = "cpu"
    """In host memory; moved to the model's device one batch at a time."""
    GPU = "gpu"
    """On the model's device (CUDA, MPS, or the CPU for a CPU model)."""
    AUTO = "auto"
    """On the model's accelerator if it fits ``cache_budget_bytes`` (default: half its free
    memory), else in host memory if it fits half the available RAM, else not at all."""


def _resolve_cache_mode(cache_mode) -> CacheMode | None:
    """``cache_mode`` as a :class:`CacheMode`, or ``None`` for ``None`` and ``"none"``."""
    if cache_mode is None or cache_mode == "none":
        return None
    try:
        return CacheMode(cache_mode)
    except ValueError:
        raise ValueError(
            f"cache_mode must be None (or 'none'), 'cpu', 'gpu' or 'auto', got {cache_mode!r}"
        ) from None


def _free_accelerator_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    return None


def choose_cache_device(
    cache_mode: CacheMode | str | None,
    nbytes: int,
    device: torch.device | str,
    *,
    budget_bytes: int | None = None,
    free_device_bytes: int | None = None,
    free_ram_bytes: int | None = None,
) -> torch.device | None:
    """Where a cache of ``nbytes`` goes for a model on ``device`` (``None``: no cache).

    Parameters
    ----------
    cache_mode : {None, "cpu", "gpu", "auto"}
    nbytes : int
        Size of the cache.
    device : torch.device
        The model's device.
    budget_bytes : int, optional
        Largest cache ``"auto"`` puts on an accelerator. Default: half of
        ``free_device_bytes``.
    free_device_bytes, free_ram_bytes : int, optional
        Free accelerator memory and available host RAM; queried when not given (an unknown
        amount of RAM counts as enough).
    """
    mode = _resolve_cache_mode(cache_mode)
    device = torch.device(device)
    cpu = torch.device("cpu")
    if mode is None:
        return None
    if mode is CacheMode.CPU:
        return cpu
    if mode is CacheMode.GPU:
        return device
    if device.type != "cpu":
        if budget_bytes is None:
            free = (
                _free_accelerator_bytes(device) if free_device_bytes is None else free_device_bytes
            )
            budget_bytes = free // 2 if free is not None else 0
        if nbytes <= budget_bytes:
            return device
    ram = available_ram_bytes() if free_ram_bytes is None else free_ram_bytes
    if ram is None or nbytes <= ram // 2:
        return cpu
    return None


# --------------------------------------------------------------------------- objective


def _unwrap(model) -> nn.Module:
    inner = getattr(model, "hf_model", None)
    model = inner if isinstance(inner, nn.Module) else model
    if not isinstance(model, nn.Module):
        raise ValueError(
            "model must be a torch.nn.Module (a Hugging Face causal LM, or a wrapper exposing "
            f"one as .hf_model), got {type(model).__name__}"
        )
    return model


def _logits_of(out) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, tuple | list) else out
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
        raise ValueError(
            "model must return logits [batch, positions, vocab] (e.g. a "
            f"transformers *ForCausalLM); got {type(out).__name__}"
        )
    return logits


class CausalLMKL:
    r"""Mean per-token KL of a causal LM's next-token distributions from the centre's.

    ``fn(theta)`` is :math:`\delta(\theta)` of the module docstring: the mean over all
    positions with ``attention_mask == 1`` of
    :math:`\mathrm{KL}(p_{\theta_0}(\cdot\mid x_{\le i}) \| p_\theta(\cdot\mid x_{\le i}))`,
    in nats, float64 (float32 on MPS). The model is always evaluated in eval mode (its modes
    are restored).

    Parameters
    ----------
    model : torch.nn.Module
        A causal LM returning logits ``[batch, positions, vocab]`` (``.logits`` of a
        transformers output, or a tensor), or a wrapper exposing one as ``.hf_model``.
    input_ids, attention_mask : torch.Tensor
        ``[n, length]``; sequences must be right-padded (mask ones then zeros).
    batch_size : int
        Sequences per forward pass.
    cache_mode : {None, "cpu", "gpu", "auto"}
        Where to cache the centre's logits (see :class:`CacheMode`); every mode gives
        identical values.
    cache_budget_bytes : int, optional
        For ``"auto"``: the largest cache put on an accelerator.
    compile : bool or dict, optional
        Evaluate the model through :func:`torch.compile` (see
        :class:`~basin_volume.parameters.FlatParameters`).
    parameters : "trainable", "all", list of str, or callable
        Which parameters are the basin's coordinates (default the trainable ones; see
        :func:`~basin_volume.parameters.select_parameters`).

    Attributes
    ----------
    center : torch.Tensor
        The model's parameters, flat (a fresh copy at each access). Without a cache one
        copy of the centre is kept to recompute its outputs from.
    n_tokens : int
        :math:`N`, the number of positions averaged over.
    cache_device : torch.device or None
        Where the centre's logits are cached (``None``: recomputed at each call).
    cache_bytes : int
        Size of that cache (0 without one).
    n_forward : int
        Forward passes run so far (the centre's included).
    """

    def __init__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        batch_size: int = 4096,
        cache_mode: CacheMode | str | None = CacheMode.AUTO,
        cache_budget_bytes: int | None = None,
        compile: bool | dict | None = None,
        parameters: ParameterSelection = "trainable",
    ):
        self.model = _unwrap(model)
        mode = _resolve_cache_mode(cache_mode)
        _check_positive_int("data_batch_size", batch_size)
        _check_budget(cache_budget_bytes)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not isinstance(input_ids, torch.Tensor) or not isinstance(attention_mask, torch.Tensor):
            raise TypeError("input_ids and attention_mask must be integer tensors [n, length]")
        input_ids, attention_mask = input_ids.cpu(), attention_mask.cpu()
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be [n, length], got "
                f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
            )
        mask = attention_mask.bool()
        lengths = mask.sum(1)
        if not torch.equal(mask, torch.arange(mask.shape[1]) < lengths[:, None]):
            raise ValueError(
                "attention_mask must be right-padded (ones, then zeros) in every row; "
                "tokenise with padding_side='right' or use tokenize_texts"
            )
        keep = lengths > 0
        if not bool(keep.any()):
            raise ValueError("attention_mask selects no tokens: there is nothing to evaluate")
        self.params = FlatParameters(self.model, compile=compile, parameters=parameters)
        device = self.params.device
        # Longest first, so each batch is trimmed to its own longest sequence.
        order = torch.argsort(lengths[keep], descending=True, stable=True)
        ids, lengths = input_ids[keep][order], lengths[keep][order]
        self._batches = []
        for b_ids, b_len in zip(ids.split(batch_size), lengths.split(batch_size), strict=True):
            width = int(b_len.max())
            b_mask = (torch.arange(width) < b_len[:, None]).long()
            self._batches.append((b_ids[:, :width].to(device), b_mask.to(device)))
        self.n_tokens = int(lengths.sum())
        self._kwargs = {}
        if "use_cache" in inspect.signature(self.model.forward).parameters:
            self._kwargs["use_cache"] = False
        self.n_forward = 0
        self.cache_device: torch.device | None = None
        self.cache_bytes = 0
        self._cache: list[torch.Tensor] | None = None
        # The centre's outputs are always computed the same way (functional_call on a flat
        # copy of the parameters), so cached and recomputed logits are bit-identical.
        center = self.params.center()
        self._saved_center: torch.Tensor | None = center
        if mode is None:
            return
        cache: list[torch.Tensor] = []
        for i, batch in enumerate(self._batches):
            rows = self._rows(center, *batch)
            if i == 0:
                nbytes = self.n_tokens * rows.shape[-1] * rows.element_size()
                where = choose_cache_device(mode, nbytes, device, budget_bytes=cache_budget_bytes)
                if where is None:
                    warnings.warn(
                        f"the centre's logits ({nbytes / 2**30:.2f} GiB) fit neither the "
                        "device budget nor half the free RAM; they will be recomputed at "
                        "each evaluation (cache_mode=None), which doubles the run time",
                        UserWarning,
                        stacklevel=2,
                    )
                    return  # keeps the saved centre to recompute from
                self.cache_device, self.cache_bytes = where, nbytes
            rows = rows.to(self.cache_device)
            if self.cache_device.type == "cpu" and device.type == "cuda":
                rows = rows.pin_memory()
            cache.append(rows)
        self._cache, self._saved_center = cache, None

    @property
    def center(self) -> torch.Tensor:
        """A flat copy of the model's parameters (made on each access)."""
        return self.params.center()

    def _rows(
        self, theta: torch.Tensor | None, ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits at the non-padding positions, ``[tokens, vocab]`` in the model's dtype."""
        with torch.no_grad(), preserved(self.model):
            out = self.params.call(theta, input_ids=ids, attention_mask=mask, **self._kwargs)
        self.n_forward += 1
        logits = _logits_of(out)
        if logits.shape[:2] != ids.shape:
            raise ValueError(
                f"model returned logits of shape {tuple(logits.shape)} for input_ids of shape "
                f"{tuple(ids.shape)}; expected [batch, positions, vocab]"
            )
        return logits[mask.bool()]

    def __call__(self, theta: torch.Tensor | None = None) -> torch.Tensor:
        """:math:`\\delta(\\theta)` on the model's device, in float64 (float32 on MPS).

        ``theta=None`` evaluates the parameters currently in the model (for callers that
        write perturbed parameters in place); the centre's outputs still come from the cache
        or from the copy of the centre saved at construction.
        """
        device = self.params.device
        wide = wide_dtype(device)
        total = torch.zeros((), dtype=wide, device=device)
        for i, batch in enumerate(self._batches):
            if self._cache is None:
                ref = self._rows(self._saved_center, *batch)
            else:
                ref = self._cache[i].to(device, non_blocking=True)
            rows = self._rows(theta, *batch)
            step = max(1, _SLICE_ELEMENTS // rows.shape[-1])
            for a, b in zip(ref.split(step), rows.split(step), strict=True):
                total += kl_from_logprobs(
                    torch.log_softmax(a.to(wide), -1), torch.log_softmax(b.to(wide), -1)
                )
        return total / self.n_tokens

    def fisher_diagonal(self, *, n_samples: int = 1, seed: int = 0) -> torch.Tensor:
        r"""Sampled-label estimate of the diagonal of the Hessian of :math:`\delta` at the
        centre (the Fisher information of the next-token distributions).

        .. math:: H_{jj} = \frac1N \sum_{s,i} \mathbb{E}_{y\sim p_{\theta_0}(\cdot\mid
            x^{(s)}_{\le i})}\big[(\partial_j \log p_{\theta_0}(y\mid x^{(s)}_{\le i}))^2\big]
            = \frac1N \sum_s \mathbb{E}\big[(\partial_j \textstyle\sum_i
            \log p_{\theta_0}(y_i\mid x^{(s)}_{\le i}))^2\big].

        The second form holds because the labels :math:`y_i` are drawn independently at
        every position (the context is the real text) and each score has mean zero, so the
        cross terms vanish in expectation. One backward pass per sequence and sample gives
        an unbiased estimate; the model's parameters, ``.grad`` fields and modes are left
        as they were.

        Parameters
        ----------
        n_samples : int
            Label draws per sequence; the variance falls like ``1 / n_samples``.
        seed : int
            Seeds the labels (drawn on the CPU, so the result is device-independent).

        Returns
        -------
        torch.Tensor
            float64 ``[D]`` on the CPU, in ``parameters_to_vector`` order.
        """
        from torch.func import functional_call

        _check_positive_int("n_samples", n_samples)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        gen = torch.Generator().manual_seed(seed)
        leaves = {n: p.detach().requires_grad_() for n, p in self.params.named}
        # per-parameter sums of squares where the model lives, at least float32: one extra
        # copy of the parameters' size beside the gradients, never a float64 D-vector there
        totals = [
            torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
            for p in leaves.values()
        ]
        with preserved(self.model), torch.enable_grad():
            for ids, mask in self._batches:
                for row in range(len(ids)):
                    width = int(mask[row].sum())
                    inputs = dict(
                        input_ids=ids[row : row + 1, :width],
                        attention_mask=mask[row : row + 1, :width],
                        **self._kwargs,
                    )
                    out = functional_call(self.model, leaves, (), inputs)
                    logits = _logits_of(out)[0]
                    wide = torch.promote_types(logits.dtype, torch.float32)
                    logp = torch.log_softmax(logits.to(wide), -1)  # [width, vocab]
                    probs = logp.detach().exp().cpu()
                    labels = torch.multinomial(probs, n_samples, replacement=True, generator=gen)
                    picked = logp.gather(1, labels.to(logp.device))  # [width, n_samples]
                    for k in range(n_samples):
                        grads = torch.autograd.grad(
                            picked[:, k].sum(),
                            list(leaves.values()),
                            retain_graph=True,
                            allow_unused=True,
                        )
                        for acc, g in zip(totals, grads, strict=True):
                            if g is not None:
                                acc += g.to(acc.dtype).square()
        flat = torch.cat([acc.reshape(-1).to("cpu", torch.float64) for acc in totals])
        return flat / (self.n_tokens * n_samples)


def causal_lm_objective(
    model: nn.Module,
    tokenizer,
    dataset,
    *,
    text_key: str = "text",
    val_size: int = 10,
    max_seq_len: int = 2048,
    chunking: bool = False,
    data_batch_size: int = 4096,
    cache_mode: CacheMode | str | None = CacheMode.AUTO,
    cache_budget_bytes: int | None = None,
    compile: bool | dict | None = None,
    parameters: ParameterSelection = "trainable",
) -> CausalLMKL:
    """The KL objective of a causal LM on the first ``val_size`` sequences of ``dataset``.

    Without chunking, the first ``val_size`` texts are tokenised (truncated to
    ``max_seq_len``) and nothing else is read. With ``chunking=True`` texts are joined with
    the eos token and cut into ``val_size`` chunks of ``max_seq_len`` tokens
    (:func:`chunk_and_tokenize`). Other arguments are those of :class:`CausalLMKL`; the names
    match :class:`~basin_volume.VolumeConfig`'s fields.
    """
    _check_positive_int("val_size", val_size)
    _check_positive_int("max_seq_len", max_seq_len)
    _check_positive_int("data_batch_size", data_batch_size)
    _resolve_cache_mode(cache_mode)
    _check_budget(cache_budget_bytes)
    model = _unwrap(model)
    if not isinstance(text_key, str):
        raise TypeError(f"text_key must be a str naming the text column, got {text_key!r}")
    if not isinstance(chunking, bool):
        raise TypeError(f"chunking must be True or False, got {chunking!r}")
    size = _dataset_len(dataset)
    if dataset is not None and size == 0:
        raise ValueError("dataset is empty: pass at least one text")
    if chunking:
        batch = chunk_and_tokenize(
            dataset, tokenizer, text_key=text_key, max_seq_len=max_seq_len, n_chunks=val_size
        )
    else:
        texts = _first_texts(dataset, text_key, val_size)
        if not texts:
            raise ValueError("dataset is empty: pass at least one text")
        if len(texts) < val_size:
            warnings.warn(
                f"dataset has only {len(texts)} texts, fewer than val_size={val_size}; "
                "using all of them",
                UserWarning,
                stacklevel=2,
            )
        batch = tokenize_texts(texts, tokenizer, max_seq_len=max_seq_len)
    return CausalLMKL(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        batch_size=data_batch_size,
        cache_mode=cache_mode,
        cache_budget_bytes=cache_budget_bytes,
        compile=compile,
        parameters=parameters,
    )

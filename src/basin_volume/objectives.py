r"""Objectives over a model's parameter vector.

The KL basin of a classifier is

.. math::

    \delta(\theta) = \frac1N \sum_{x} \mathrm{KL}\big(p_{\theta_0}(\cdot\mid x)\,\big\|\,
        p_\theta(\cdot\mid x)\big)
    = \frac1N \sum_x \sum_c p_{\theta_0}(c\mid x)\big(\log p_{\theta_0}(c\mid x) -
        \log p_\theta(c\mid x)\big),

in nats. The centre's log-probabilities are computed once and cached. The inputs may be a
tensor, a DataLoader or any iterable of batches (:mod:`basin_volume.inputs`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .devices import wide_dtype
from .inputs import Batch, Batches
from .parameters import FlatParameters, ParameterSelection

__all__ = ["ClassifierKL", "kl_from_logprobs"]


def kl_from_logprobs(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Sum over rows of KL(ref || p) from log-probabilities over the last axis.

    Computed in float64 (float32 on devices without it).
    """
    wide = wide_dtype(ref_logp.device)
    ref_logp = ref_logp.to(wide)
    return (ref_logp.exp() * (ref_logp - logp.to(wide))).sum()


class ClassifierKL:
    """Mean KL divergence of a classifier's predictive distribution from the centre's.

    Parameters
    ----------
    model : torch.nn.Module
        Maps a batch of ``inputs`` to logits ``[batch, classes]`` (a tensor, or an output
        with ``.logits`` such as a transformers image classifier's).
    inputs : tensor, DataLoader or iterable of batches
        Evaluation inputs: a tensor whose first axis indexes examples (moved to the model's
        device once), or a :class:`torch.utils.data.DataLoader` / iterable of tensors,
        ``(x, y)`` tuples or dicts of model keyword arguments, streamed one batch at a time
        (see :mod:`basin_volume.inputs`). Floating-point inputs are cast to the parameters'
        dtype; labels in the batches are ignored.
    batch_size : int
        Inputs per forward pass for a tensor (a loader keeps its own batches).
    compile : bool or dict, optional
        Evaluate the model through :func:`torch.compile` (see
        :class:`~basin_volume.parameters.FlatParameters`).
    parameters : "trainable", "all", list of str, or callable
        Which parameters are the basin's coordinates (default the trainable ones; see
        :func:`~basin_volume.parameters.select_parameters`).
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Any,
        *,
        batch_size: int = 4096,
        compile: bool | dict | None = None,
        parameters: ParameterSelection = "trainable",
    ):
        if isinstance(inputs, torch.Tensor) and (inputs.ndim < 1 or len(inputs) == 0):
            raise ValueError(
                "inputs must be a non-empty tensor whose first axis indexes examples, got "
                f"{type(inputs).__name__} of shape {getattr(inputs, 'shape', None)}"
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"data_batch_size must be a positive integer, got {batch_size!r}")
        self.params = FlatParameters(model, compile=compile, parameters=parameters)
        self.data = Batches(
            inputs, batch_size=batch_size, device=self.params.device, dtype=self.params.dtype
        )
        self.batch_size = batch_size
        with torch.no_grad():
            self.ref_logp = [self._logp(None, b) for b in self.data]

    @property
    def inputs(self) -> torch.Tensor:
        """All inputs as one tensor (for tensor inputs and ``(x, y)`` batches)."""
        return self.data.stacked_inputs()

    @property
    def center(self) -> torch.Tensor:
        """A flat copy of the model's parameters (made on each access)."""
        return self.params.center()

    def _logp(self, theta: torch.Tensor | None, batch: Batch) -> torch.Tensor:
        out = self.params.call(theta, *batch.args, **batch.kwargs)
        logits = getattr(out, "logits", out)  # transformers' classifier outputs carry .logits
        if (
            not isinstance(logits, torch.Tensor)
            or logits.ndim != 2
            or logits.shape[0] != batch.size
        ):
            raise ValueError(
                f"model must map a batch of inputs to logits [batch, classes]; got shape "
                f"{tuple(getattr(logits, 'shape', ()))} for a batch of {batch.size}"
            )
        return torch.log_softmax(logits.to(wide_dtype(logits.device)), dim=-1)

    def __call__(self, theta: torch.Tensor | None = None) -> torch.Tensor:
        """Mean KL at ``theta`` (``None``: the parameters currently in the model)."""
        parts = [
            kl_from_logprobs(ref, self._logp(theta, b))
            for ref, b in zip(self.ref_logp, self.data, strict=True)
        ]
        return torch.stack(parts).sum() / self.data.n_examples

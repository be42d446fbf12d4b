"""A model's parameters as one flat vector, without ever writing into the model.

:class:`FlatParameters` maps a 1-D tensor ``theta`` (in ``parameters_to_vector`` order) to a
``{name: view}`` dictionary for :func:`torch.func.functional_call`, so evaluating the model
at ``theta`` leaves the model's own tensors untouched. :func:`preserved` restores the
train/eval flags of every submodule, whatever happens inside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["FlatParameters", "preserved"]


class FlatParameters:
    """The trainable parameters of ``model`` as one flat vector.

    Shared (tied) parameters appear once, as in ``model.parameters()``.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        named = list(model.named_parameters())
        if not named:
            raise ValueError("model has no parameters: there is no basin to measure")
        self.names = [name for name, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.dim = sum(self.numels)
        dtypes = {p.dtype for _, p in named}
        devices = {p.device for _, p in named}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(
                f"all parameters must share one dtype and device, found {dtypes} on {devices}; "
                "cast the model first (e.g. model.to(torch.float32))"
            )
        self.dtype = dtypes.pop()
        self.device = devices.pop()

    def center(self) -> torch.Tensor:
        """A detached copy of the current parameters as one vector."""
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])

    def as_dict(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``theta`` shaped like the model's parameters, keyed by name."""
        return {
            name: chunk.view(shape)
            for name, chunk, shape in zip(
                self.names, theta.split(self.numels), self.shapes, strict=True
            )
        }

    def call(self, theta: torch.Tensor | None, *args, **kwargs):
        """``model(*args, **kwargs)`` evaluated with parameters ``theta``.

        ``theta=None`` uses the parameters currently in the model (the memory-light mode of
        :class:`basin_volume.rays.InPlaceRays` writes them in place).
        """
        if theta is None:
            return self.model(*args, **kwargs)
        return functional_call(self.model, self.as_dict(theta), args, kwargs)


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode, restoring every submodule's mode on exit (also on errors
    and KeyboardInterrupt)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training

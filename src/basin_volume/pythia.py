"""The Pythia models of the paper: their checkpoints on the hub and loading them."""

from __future__ import annotations

import os
from typing import Any

import torch

from .devices import default_device

PYTHIA_STEPS = frozenset([0, *(2**k for k in range(10)), *range(1000, 143001, 1000)])
"""The checkpoints published for every Pythia model (revision ``step{N}``)."""


# --------------------------------------------------------------------------- Pythia


def pythia_source(model_name: str, checkpoint_step: int | None = None) -> tuple[str, str | None]:
    """Where :func:`load_pythia` loads from: ``(hub id or directory, revision)``.

    ``"14m"``, ``"pythia-14m"`` and ``"EleutherAI/pythia-14m"`` all name the hub repository
    ``EleutherAI/pythia-14m`` (likewise ``"160m-deduped"``...); ``checkpoint_step=N`` is the
    revision ``"stepN"`` (default ``"main"``, the final step 143000). An existing local
    directory is used as it is, or its sub-directory ``stepN`` when a step is given.
    """
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(
            f"model_name is required for model_type='pythia', e.g. model_name='14m'; got "
            f"{model_name!r}"
        )
    if checkpoint_step is not None and (
        isinstance(checkpoint_step, bool) or not isinstance(checkpoint_step, int)
    ):
        raise TypeError(f"checkpoint_step must be an int or None, got {checkpoint_step!r}")
    if os.path.isdir(model_name):
        if checkpoint_step is None:
            return model_name, None
        sub = os.path.join(model_name, f"step{checkpoint_step}")
        if not os.path.isdir(sub):
            raise ValueError(
                f"checkpoint_step={checkpoint_step} but the local directory {model_name!r} has "
                f"no sub-directory 'step{checkpoint_step}'; pass checkpoint_step=None to load "
                "the directory itself"
            )
        return sub, None
    repo = (
        model_name
        if "/" in model_name
        else f"EleutherAI/pythia-{model_name.removeprefix('pythia-')}"
    )
    if checkpoint_step is None:
        return repo, "main"
    if checkpoint_step not in PYTHIA_STEPS:
        raise ValueError(
            f"checkpoint_step={checkpoint_step} is not a published Pythia checkpoint; use 0, a "
            "power of two up to 512, or a multiple of 1000 up to 143000"
        )
    return repo, f"step{checkpoint_step}"


def load_pythia(
    model_name: str,
    checkpoint_step: int | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, Any]:
    """Load a Pythia model and its tokenizer with ``from_pretrained``.

    Parameters
    ----------
    model_name : str
        ``"14m"``, ``"70m"``, ``"160m-deduped"``..., a hub id, or a local directory (see
        :func:`pythia_source`).
    checkpoint_step : int, optional
        Training step of the checkpoint (revision ``step{N}``); default the final one.
    device : torch.device or str, optional
        Default: CUDA if available, else MPS, else the CPU.
    dtype : torch.dtype
        Parameter dtype (the hub stores float16; float32 by default for an accurate KL).

    Returns
    -------
    (model, tokenizer)
        The model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, revision = pythia_source(model_name, checkpoint_step)
    extra = {} if revision is None else {"revision": revision}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    model.to(default_device() if device is None else device)
    model.eval()
    return model, tokenizer

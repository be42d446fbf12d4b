"""One factory from a :class:`PreconditionerType` (and the model, inputs...) to a preconditioner."""

from __future__ import annotations

import enum
import math

import torch
from torch import nn

from ..parameters import select_parameters
from ..settings import default_sigma
from .adam import adam_preconditioner
from .fisher import fisher_matrix, fisher_preconditioner
from .operators import DensePreconditioner, Preconditioner
from .scales import prior_eps


class PreconditionerType(enum.StrEnum):
    """Where the proposal's scales come from (``VolumeConfig.preconditioner_type``)."""

    NONE = "none"
    """Isotropic directions."""
    ADAM = "adam"
    """Adam's moment estimates (:func:`~basin_volume.preconditioners.adam_preconditioner`);
    needs the optimizer, its state dict or a checkpoint folder."""
    FISHER = "fisher"
    """Diagonal Fisher of the KL basin on the inputs
    (:func:`~basin_volume.preconditioners.fisher_preconditioner`); needs a classifier and
    its inputs, no optimizer state."""
    FISHER_DENSE = "fisher_dense"
    """Dense Fisher eigenbasis (:class:`~basin_volume.preconditioners.DensePreconditioner`);
    small classifiers only (:math:`8D^2` bytes)."""
    ADAPTIVE = "adaptive"
    """Start isotropic (or from a given ``preconditioner``) and refine during the run with
    :func:`estimate_adaptive`."""


def parse_preconditioner_type(kind) -> PreconditionerType:
    """``kind`` as a :class:`PreconditionerType`, or a ``ValueError`` listing the options."""
    try:
        return PreconditionerType(kind)
    except ValueError:
        options = ", ".join(repr(k.value) for k in PreconditionerType)
        raise ValueError(
            f"preconditioner_type must be None, one of {options}, or a tensor of scales; "
            f"got {kind!r}"
        ) from None


def resolve_preconditioner(
    kind: PreconditionerType | str | torch.Tensor | Preconditioner | None,
    *,
    model: nn.Module | None = None,
    inputs: torch.Tensor | None = None,
    optimizer=None,
    eps: float | str | None = None,
    exponent: float = 0.5,
    adam_order: int = 2,
    cutoff: float | None = None,
    sigma: float | None = None,
    labels: str = "auto",
    batch_size: int | None = None,
    seed: int = 0,
    parameters="trainable",
) -> torch.Tensor | Preconditioner | None:
    """Build the preconditioner a configuration asks for.

    Parameters
    ----------
    kind : PreconditionerType, str, tensor, Preconditioner or None
        ``None``/``"none"``, ``"adam"``, ``"fisher"``, ``"fisher_dense"``, ``"adaptive"``, or
        ready-made scales / a preconditioner (returned unchanged).
    model : torch.nn.Module, optional
        The network (needed by every kind but a ready-made one).
    inputs : torch.Tensor or CausalLMKL, optional
        The basin's evaluation inputs (``"fisher"``, ``"fisher_dense"``), or a causal-LM
        objective (``"fisher"``: its sampled-label Fisher over its tokens).
    optimizer : optimizer, state dict, file or checkpoint folder, optional
        Source of Adam's moments (``"adam"``).
    eps : float or "prior", optional
        :math:`\\eta` in :math:`p = 1/(c^\\gamma + \\eta)`. Default: ``1e-5`` for Adam and
        ``"prior"`` for the Fisher kinds, i.e.
        :func:`~basin_volume.preconditioners.prior_eps` from ``cutoff`` and ``sigma`` (with a
        Fisher, :math:`\\eta = 10^{-5}` lets the exactly flat parameters of a network take
        over every direction; see ``benchmarks/preconditioners.py``).
    exponent : float
        :math:`\\gamma`.
    adam_order : {1, 2}
        ``exp_avg`` or ``exp_avg_sq``.
    cutoff, sigma : float, optional
        For ``eps="prior"``: the run's cutoff and prior scale (default: the RMS of the
        model's parameters, as in :func:`basin_volume.estimate`).
    labels, batch_size, seed
        Passed to the Fisher computations.
    parameters : "trainable", "all", list of str, or callable
        Which of the model's parameters the scales are for (default the trainable ones; see
        :func:`~basin_volume.parameters.select_parameters`).

    Returns
    -------
    torch.Tensor, Preconditioner or None
        For ``"adaptive"``: ``None``, the isotropic starting proposal; the caller runs
        :func:`estimate_adaptive` instead of :func:`basin_volume.estimate`.
    """
    if kind is None or isinstance(kind, torch.Tensor | Preconditioner):
        return kind
    kind = parse_preconditioner_type(kind)
    if kind in (PreconditionerType.NONE, PreconditionerType.ADAPTIVE):
        return None
    if model is None:
        raise ValueError(f"preconditioner_type={kind.value!r} needs the model; pass model=")
    if eps is None:
        eps = 1e-5 if kind is PreconditionerType.ADAM else "prior"
    if eps == "prior":
        if cutoff is None:
            raise ValueError("eps='prior' needs the run's cutoff; pass cutoff=")
        params = [p.detach() for _, p in select_parameters(model, parameters)]
        dim = sum(p.numel() for p in params)
        if sigma is None:
            norm = math.sqrt(sum(float(p.double().square().sum()) for p in params))
            sigma = default_sigma(norm, dim)
        eps = prior_eps(cutoff, sigma, dim, exponent=exponent)
    if kind is PreconditionerType.ADAM:
        if optimizer is None:
            raise ValueError(
                "preconditioner_type='adam' needs the optimizer state: pass the Adam/AdamW "
                "optimizer, its state_dict(), an optimizer.pt file or a Trainer checkpoint "
                "folder (most released checkpoints have none: use 'fisher' instead)"
            )
        return adam_preconditioner(
            optimizer,
            model=model,
            order=adam_order,
            eps=eps,
            exponent=exponent,
            parameters=parameters,
        )
    if inputs is None:
        raise ValueError(
            f"preconditioner_type={kind.value!r} needs the evaluation inputs; pass inputs="
        )
    if kind is PreconditionerType.FISHER_DENSE and not isinstance(inputs, torch.Tensor):
        raise ValueError(
            "preconditioner_type='fisher_dense' is for small classifiers (a [D, D] matrix); "
            "for causal language models use 'fisher'"
        )
    if kind is PreconditionerType.FISHER:
        return fisher_preconditioner(
            model,
            inputs,
            eps=eps,
            exponent=exponent,
            labels=labels,
            batch_size=batch_size,
            seed=seed,
            parameters=parameters,
        )
    matrix = fisher_matrix(
        model, inputs, labels=labels, batch_size=batch_size, seed=seed, parameters=parameters
    )
    return DensePreconditioner(matrix, eps=eps, exponent=exponent)

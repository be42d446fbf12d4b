"""The Fisher information of a classifier's predictive distribution: diagonal and dense."""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator

import torch
from torch import nn

from .scales import _check_eps_exponent, _scales_from_curvature

# --------------------------------------------------------------------------- Fisher


class FisherLabels(enum.StrEnum):
    """How the expectation over labels in the Fisher information is taken."""

    FULL = "full"
    r"""Exactly: :math:`\sum_c p_{\theta_0}(c\mid x)\,(\partial_\theta \log p(c\mid x))^2`, one
    gradient per class (cost :math:`C` backward passes per input)."""
    SAMPLED = "sampled"
    r"""Monte Carlo: ``n_samples`` labels per input drawn from :math:`p_{\theta_0}(\cdot\mid
    x)` with ``seed``; unbiased, cost ``n_samples`` backward passes per input."""
    AUTO = "auto"
    """``"full"`` for at most 64 classes, else ``"sampled"``."""


def _fisher_labels(labels) -> FisherLabels:
    try:
        return FisherLabels(labels)
    except ValueError:
        raise ValueError(f"labels must be 'full', 'sampled' or 'auto', got {labels!r}") from None


def _fisher_rows(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    labels: FisherLabels | str,
    n_samples: int,
    batch_size: int | None,
    seed: int,
    parameters="trainable",
) -> Iterator[torch.Tensor]:
    r"""Yield float64 blocks ``R`` of weighted per-example score vectors, so that the Fisher is
    :math:`F = \frac1N \sum R^\top R` over all blocks (``N`` = number of inputs).

    Rows are :math:`\sqrt{p_c(x)}\,\nabla_\theta \log p_c(x)` (full) or
    :math:`\nabla_\theta \log p_{y}(x)/\sqrt{S}` for sampled labels :math:`y`.
    """
    from torch.func import functional_call, grad, jacrev, vmap

    from ..parameters import FlatParameters, preserved

    labels = _fisher_labels(labels)
    if not isinstance(inputs, torch.Tensor) or inputs.ndim < 1 or len(inputs) == 0:
        raise ValueError(
            "inputs must be a non-empty tensor whose first axis indexes examples, got "
            f"{type(inputs).__name__} of shape {getattr(inputs, 'shape', None)}"
        )
    for name, value in (("n_samples", n_samples), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    flat = FlatParameters(model, parameters=parameters)
    params = {n: p.detach() for n, p in flat.named}
    dtype = flat.dtype if inputs.is_floating_point() else inputs.dtype
    inputs = inputs.to(flat.device, dtype)

    def logp(params, x):
        out = functional_call(model, params, (x.unsqueeze(0),))
        out = getattr(out, "logits", out)
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
            raise ValueError(
                "the Fisher preconditioner needs a classifier: model must map a batch of "
                f"inputs to logits [batch, classes]; got {getattr(out, 'shape', type(out))}"
            )
        return torch.log_softmax(out[0], dim=-1)

    def flatten(tree: dict, lead: int) -> torch.Tensor:
        return torch.cat([tree[n].reshape(*tree[n].shape[:lead], -1) for n in flat.names], -1)

    with preserved(model), torch.no_grad():
        n_classes = logp(params, inputs[0]).shape[-1]
    if labels is FisherLabels.AUTO:
        labels = FisherLabels.FULL if n_classes <= 64 else FisherLabels.SAMPLED
    per_input = n_classes if labels is FisherLabels.FULL else n_samples
    if batch_size is None:
        batch_size = max(1, min(len(inputs), (1 << 25) // max(1, per_input * flat.dim)))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    gen = torch.Generator().manual_seed(seed)
    with preserved(model):
        for x in inputs.split(batch_size):
            with torch.no_grad():
                lp = vmap(logp, in_dims=(None, 0))(params, x).double()
            if labels is FisherLabels.FULL:
                jac = vmap(jacrev(logp), in_dims=(None, 0))(params, x)  # [B, C, ...]
                rows = flatten(jac, 2).double() * lp.exp().sqrt().unsqueeze(-1)
                yield rows.reshape(-1, flat.dim).cpu()
            else:
                y = torch.multinomial(lp.exp().cpu(), n_samples, replacement=True, generator=gen)
                xs = x.repeat_interleave(n_samples, dim=0)
                ys = y.reshape(-1).to(flat.device)
                g = vmap(grad(_picked(logp)), in_dims=(None, 0, 0))(params, xs, ys)
                yield (flatten(g, 1).double() / math.sqrt(n_samples)).cpu()


def _picked(logp):
    def fn(params, x, y):
        return logp(params, x).gather(0, y.reshape(1)).squeeze(0)

    return fn


def fisher_diagonal(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    labels: FisherLabels | str = FisherLabels.AUTO,
    n_samples: int = 1,
    batch_size: int | None = None,
    seed: int = 0,
    parameters="trainable",
) -> torch.Tensor:
    r"""Diagonal of the Fisher information of a classifier's predictive distribution.

    .. math:: F_{ii} = \frac1N \sum_x \mathbb{E}_{y\sim p_{\theta_0}(\cdot\mid x)}
        \Big[\big(\partial_{\theta_i} \log p_{\theta_0}(y\mid x)\big)^2\Big],

    which equals the diagonal of the Hessian at :math:`\theta_0` of the KL basin
    :math:`\frac1N\sum_x \mathrm{KL}(p_{\theta_0}(\cdot\mid x)\,\|\,p_\theta(\cdot\mid x))`
    (:class:`basin_volume.objectives.ClassifierKL`). Per-example gradients come from
    :func:`torch.func.vmap` over :func:`torch.func.grad` / :func:`~torch.func.jacrev` of a
    :func:`torch.func.functional_call`, in eval mode; the model's parameters and modes are
    left exactly as they were.

    Parameters
    ----------
    model : torch.nn.Module
        Maps a batch of inputs to logits ``[batch, classes]``.
    inputs : torch.Tensor or CausalLMKL
        The evaluation inputs of the basin (first axis indexes examples), or a causal-LM
        objective (:class:`basin_volume.causal.CausalLMKL`), whose sampled-label Fisher over
        its own tokens is returned (:meth:`~basin_volume.causal.CausalLMKL.fisher_diagonal`;
        ``model`` and ``batch_size`` are then unused).
    labels : {"auto", "full", "sampled"}
        See :class:`FisherLabels`.
    n_samples : int
        Labels drawn per input when sampling.
    batch_size : int, optional
        Inputs per vectorised pass; default keeps a block of gradients near 256 MB.
    seed : int
        Seeds the sampled labels.
    parameters : "trainable", "all", list of str, or callable
        The parameters the Fisher is taken over (default the trainable ones; see
        :func:`~basin_volume.parameters.select_parameters`). A causal-LM objective uses its
        own selection.

    Returns
    -------
    torch.Tensor
        float64 ``[D]`` on the CPU, in ``parameters_to_vector`` order of those parameters.
    """
    if hasattr(inputs, "fisher_diagonal"):  # a causal-LM objective holding its own tokens
        if _fisher_labels(labels) is FisherLabels.FULL:
            raise ValueError(
                "labels='full' needs one backward pass per vocabulary entry; causal LMs use "
                "sampled labels: pass labels='auto' or 'sampled' and raise n_samples"
            )
        return inputs.fisher_diagonal(n_samples=n_samples, seed=seed)
    total = None
    for rows in _fisher_rows(
        model,
        inputs,
        labels=labels,
        n_samples=n_samples,
        batch_size=batch_size,
        seed=seed,
        parameters=parameters,
    ):
        sq = rows.square().sum(0)
        total = sq if total is None else total + sq
    return total / len(inputs)


def fisher_matrix(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    labels: FisherLabels | str = FisherLabels.AUTO,
    n_samples: int = 1,
    batch_size: int | None = None,
    seed: int = 0,
    max_dim: int = 20_000,
    parameters="trainable",
) -> torch.Tensor:
    r"""The dense Fisher information :math:`F = \frac1N\sum_x \mathbb{E}_y[g g^\top]`,
    :math:`g = \nabla_\theta \log p_{\theta_0}(y\mid x)`: the Hessian of the KL basin at the
    centre (the Gauss-Newton matrix of the softmax). Arguments as in
    :func:`fisher_diagonal`; ``max_dim`` guards against a :math:`8D^2`-byte allocation.

    Returns
    -------
    torch.Tensor
        float64 ``[D, D]`` on the CPU; feed it to :class:`DensePreconditioner`.
    """
    from ..parameters import select_parameters

    dim = sum(p.numel() for _, p in select_parameters(model, parameters))
    if dim > max_dim:
        raise ValueError(
            f"the model has D={dim} parameters: a dense [D, D] Fisher needs "
            f"{8 * dim * dim / 2**30:.1f} GiB; use fisher_preconditioner (diagonal) or raise "
            "max_dim"
        )
    total = torch.zeros(dim, dim, dtype=torch.float64)
    for rows in _fisher_rows(
        model,
        inputs,
        labels=labels,
        n_samples=n_samples,
        batch_size=batch_size,
        seed=seed,
        parameters=parameters,
    ):
        total.addmm_(rows.T, rows)
    return total / len(inputs)


def fisher_preconditioner(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    eps: float = 1e-5,
    exponent: float = 0.5,
    labels: FisherLabels | str = FisherLabels.AUTO,
    n_samples: int = 1,
    batch_size: int | None = None,
    seed: int = 0,
    parameters="trainable",
) -> torch.Tensor:
    r"""Per-parameter scales :math:`p_i = 1/(F_{ii}^{\gamma} + \eta)` from the diagonal Fisher
    of the KL basin (:func:`fisher_diagonal`); needs no optimizer state.

    With :math:`\gamma = 1/2` and :math:`\eta \to 0` this is :math:`\mathrm{diag}(H)^{-1/2}`
    for the Hessian :math:`H` of the KL basin at the centre, exact for a quadratic basin with
    diagonal :math:`H`. ``eps`` bounds the scale of parameters the data does not constrain
    (:math:`F_{ii} = 0`).

    Returns
    -------
    torch.Tensor
        float64 ``[D]`` positive scales, in ``parameters_to_vector`` order.
    """
    _check_eps_exponent(eps, exponent)
    diag = fisher_diagonal(
        model,
        inputs,
        labels=labels,
        n_samples=n_samples,
        batch_size=batch_size,
        seed=seed,
        parameters=parameters,
    )
    return _scales_from_curvature(diag, eps=eps, exponent=exponent, what="Fisher entry")

"""Adam's moment estimates as scales: from an optimizer, a state dict, a file or a checkpoint."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .scales import _check_eps_exponent, _scales_from_curvature

# --------------------------------------------------------------------------- Adam


def adam_preconditioner(
    optimizer_or_state: torch.optim.Optimizer | Mapping | str | os.PathLike,
    *,
    model: nn.Module | Sequence[torch.Tensor] | None = None,
    param_names: Sequence[str] | None = None,
    order: int = 2,
    eps: float = 1e-5,
    exponent: float = 0.5,
    parameters="trainable",
) -> torch.Tensor:
    r"""Per-parameter scales from an Adam-family optimizer's moment estimates.

    .. math:: p_i = \frac{1}{|m_i|^{\gamma} + \eta},\qquad
        m = \begin{cases}\texttt{exp\_avg\_sq} & \text{order} = 2\\
        \texttt{exp\_avg} & \text{order} = 1\end{cases}

    in the order of ``parameters_to_vector(model.parameters())``. The raw moments are used
    (no bias correction: within a parameter group it is one common factor, which the
    normalisation :math:`\sum\log p_i = 0` removes up to its interplay with :math:`\eta`).

    Parameters
    ----------
    optimizer_or_state : torch.optim.Optimizer, dict, str or path
        A stepped :class:`torch.optim.Adam` / :class:`~torch.optim.AdamW` (any optimizer
        whose state holds ``exp_avg_sq`` / ``exp_avg``), its ``state_dict()``, a file saved
        with ``torch.save(optimizer.state_dict(), path)``, or a Hugging Face ``Trainer``
        checkpoint folder containing ``optimizer.pt``.
    model : torch.nn.Module or sequence of tensors, optional
        The parameters the scales must align with. Required for a state dict or a file
        (which holds no shapes or names). With an optimizer object, parameters are looked up
        by identity, so pass the very model the optimizer was built on; without ``model``
        the optimizer's own parameter order is used.
    param_names : sequence of str, optional
        For a state dict without ``param_names`` in its groups: the names (as in
        ``model.named_parameters()``) of the parameters in the order the optimizer received
        them. Usually unnecessary: the plain ``model.parameters()`` order and the
        decay/no-decay grouping of Hugging Face ``Trainer`` are recognised from the shapes.
    order : {1, 2}
        Which moment to use.
    eps : float
        :math:`\eta \ge 0`, added after the power.
    exponent : float
        :math:`\gamma > 0`.
    parameters : "trainable", "all", list of str, or callable
        With ``model`` a module: which of its parameters get scales, in the order of the
        basin's vector (default the trainable ones, as in
        :func:`~basin_volume.parameters.select_parameters`).

    Returns
    -------
    torch.Tensor
        float64 ``[D]`` positive scales (not normalised; :func:`basin_volume.estimate`
        normalises them).

    Raises
    ------
    ValueError
        When the state does not match the model: a parameter without optimizer state (never
        stepped, frozen or not given to the optimizer), a shape or count mismatch, or an
        ambiguous ordering.
    """
    if order not in (1, 2) or isinstance(order, bool):
        raise ValueError(f"order must be 1 (exp_avg) or 2 (exp_avg_sq), got {order!r}")
    _check_eps_exponent(eps, exponent)
    key = "exp_avg_sq" if order == 2 else "exp_avg"
    if isinstance(optimizer_or_state, torch.optim.Optimizer):
        moments = _moments_from_optimizer(optimizer_or_state, model, key, parameters)
    else:
        state = optimizer_or_state
        if isinstance(state, str | os.PathLike):
            state = _load_optimizer_file(state)
        if not isinstance(state, Mapping) or "state" not in state or "param_groups" not in state:
            raise TypeError(
                "optimizer_or_state must be a torch.optim.Optimizer, its state_dict() (a dict "
                "with 'state' and 'param_groups'), a file saved from one, or a Trainer "
                f"checkpoint folder; got {type(optimizer_or_state).__name__}"
            )
        moments = _moments_from_state_dict(state, model, param_names, key, parameters)
    vector = torch.cat([m.detach().reshape(-1).to("cpu", torch.float64) for m in moments])
    return _scales_from_curvature(vector.abs(), eps=eps, exponent=exponent, what=f"{key} entry")


def _named_targets(model, parameters="all") -> list[tuple[str, torch.Tensor]]:
    from ..parameters import select_parameters

    if isinstance(model, nn.Module):
        named = select_parameters(model, parameters)
    elif isinstance(model, Sequence) and all(isinstance(p, torch.Tensor) for p in model):
        named = [(f"parameter {i}", p) for i, p in enumerate(model)]
    else:
        raise TypeError(
            "model must be a torch.nn.Module or a sequence of parameter tensors, got "
            f"{type(model).__name__}"
        )
    if not named:
        raise ValueError("model has no parameters")
    return named


def _moment(state: Mapping, key: str, name: str, param_shape) -> torch.Tensor:
    if key not in state:
        found = sorted(k for k in state if isinstance(k, str))
        raise ValueError(
            f"parameter {name!r} has no {key!r} in its optimizer state (found {found}): the "
            "optimizer has not taken a step yet, or is not Adam/AdamW; call optimizer.step() "
            "first or use a different preconditioner"
        )
    m = state[key]
    if not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(param_shape):
        shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
        raise ValueError(
            f"optimizer state {key!r} for parameter {name!r} has shape {shape} but the "
            f"parameter has shape {tuple(param_shape)}; the state belongs to a different model "
            "or parameter order (pass param_names=[...] in the optimizer's order)"
        )
    return m


def _moments_from_optimizer(
    opt: torch.optim.Optimizer, model, key: str, parameters="trainable"
) -> list[torch.Tensor]:
    managed = {id(p) for group in opt.param_groups for p in group["params"]}
    if model is None:
        named = []
        for g, group in enumerate(opt.param_groups):
            names = group.get("param_names") or [
                f"group {g} parameter {j}" for j in range(len(group["params"]))
            ]
            named.extend(zip(names, group["params"], strict=True))
    else:
        named = _named_targets(model, parameters)
    out = []
    for name, p in named:
        if id(p) not in managed:
            raise ValueError(
                f"parameter {name!r} is not optimised by this optimizer (frozen, or a "
                "different copy of the model); pass the model the optimizer was built on, "
                "or its state_dict() together with model="
            )
        out.append(_moment(opt.state.get(p, {}), key, name, p.shape))
    return out


def _load_optimizer_file(path) -> Mapping:
    path = os.fspath(path)
    if os.path.isdir(path):
        folder, path = path, os.path.join(path, "optimizer.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no optimizer.pt in {folder!r}; a Hugging Face Trainer checkpoint folder "
                "(checkpoint-N) has one unless it was saved with save_only_model=True"
            )
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"no optimizer state file at {path!r}")
    return torch.load(path, map_location="cpu", weights_only=True)


_NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def _is_norm_module(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return isinstance(module, nn.LayerNorm) or "layernorm" in name or "rmsnorm" in name


def _trainer_orders(model: nn.Module) -> list[list[str]]:
    """Parameter orders of Hugging Face ``Trainer``'s two groups: weight decay, then none.

    Two variants of its rule for "no decay" (older: biases and LayerNorm modules; newer: also
    names matching norm patterns), both restricted to ``requires_grad`` parameters.
    """
    in_norm = set()
    for mod_name, module in model.named_modules():
        if _is_norm_module(module):
            prefix = f"{mod_name}." if mod_name else ""
            in_norm.update(prefix + n for n, _ in module.named_parameters())
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    orders = []
    rules = (
        lambda n: n in in_norm or "bias" in n,
        lambda n: n in in_norm or any(re.search(pat, n.lower()) for pat in _NO_DECAY_PATTERNS),
    )
    for no_decay in rules:
        decay = [n for n, _ in named if not no_decay(n)]
        orders.append(decay + [n for n, _ in named if no_decay(n)])
    return orders


def _moments_from_state_dict(
    state_dict: Mapping, model, param_names, key, parameters="trainable"
) -> list[torch.Tensor]:
    if model is None:
        raise ValueError(
            "model is required with an optimizer state_dict or file: it holds no parameter "
            "shapes or names; pass model=<the network> (or a list of its parameters)"
        )
    groups = state_dict["param_groups"]
    ids = [i for group in groups for i in group["params"]]
    states = state_dict["state"]
    named = _named_targets(model)
    shapes = dict(named)
    saved_names = [n for group in groups for n in group.get("param_names", [])]

    def state_shape(i):
        st = states.get(i, {})
        m = st.get(key) if isinstance(st, Mapping) else None
        return tuple(m.shape) if isinstance(m, torch.Tensor) else None

    def matches_one(i, n) -> bool:
        return state_shape(i) in (None, tuple(shapes[n].shape))

    def matches(order: list[str]) -> bool:
        return len(order) == len(ids) and all(map(matches_one, ids, order))

    if ids and all(state_shape(i) is None for i in ids):
        raise ValueError(
            f"the optimizer state holds no {key!r} for any parameter: the optimizer has not "
            "taken a step yet, or is not Adam/AdamW; call optimizer.step() first or use a "
            "different preconditioner"
        )
    if param_names is not None or len(saved_names) == len(ids) > 0:
        order = list(param_names if param_names is not None else saved_names)
        where = "param_names" if param_names is not None else "the state's param_names"
        unknown = [n for n in order if n not in shapes]
        if len(order) != len(ids) or unknown:
            raise ValueError(
                f"{where} must name the optimizer's {len(ids)} parameters with names from "
                f"model.named_parameters(); got {len(order)} names"
                + (f", unknown: {unknown[:3]}" if unknown else "")
            )
    else:
        candidates = [[n for n, _ in named]]
        candidates.append([n for n, p in named if p.requires_grad])
        if isinstance(model, nn.Module):
            candidates.extend(_trainer_orders(model))
        found = []
        for cand in candidates:
            if matches(cand) and cand not in found:
                found.append(cand)
        if not found:
            first = candidates[0]
            detail = f"the state has {len(ids)} parameters, the model {len(first)}"
            if len(first) == len(ids):
                j = next(j for j, n in enumerate(first) if not matches_one(ids[j], n))
                detail = (
                    f"state entry {j} has {key} of shape {state_shape(ids[j])} but parameter "
                    f"{first[j]!r} has shape {tuple(shapes[first[j]].shape)}"
                )
            raise ValueError(
                f"the optimizer state does not match the model ({detail}); pass the model "
                "it was saved from, or param_names=[...] in the order the optimizer "
                "received the parameters"
            )
        if len(found) > 1:
            raise ValueError(
                "the optimizer state matches the model in more than one parameter order "
                "(plain and Hugging Face Trainer decay/no-decay grouping); pass "
                "param_names=[...] in the order the optimizer received the parameters"
            )
        order = found[0]

    by_name = {}
    for i, n in zip(ids, order, strict=True):
        if n in by_name:
            raise ValueError(f"parameter {n!r} appears twice in the optimizer's order")
        by_name[n] = states.get(i, {})
    out = []
    for name, p in _named_targets(model, parameters):
        if name not in by_name:
            raise ValueError(
                f"parameter {name!r} has no optimizer state (frozen, or not given to the "
                "optimizer); every parameter in parameters_to_vector order needs a scale"
            )
        out.append(_moment(by_name[name], key, name, p.shape))
    return out

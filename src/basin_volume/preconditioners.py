r"""Preconditioners: the linear map :math:`P` of the direction proposal.

A preconditioner lengthens the sampling along flat directions of the basin. Every
preconditioner here is normalised to :math:`\det P = 1` (for a diagonal one,
:math:`\sum_i \log p_i = 0`), which is what the importance weight
:math:`\lVert Pu\rVert^{-D}` in :mod:`basin_volume.directions` assumes; multiplying the
scales by a constant therefore changes nothing.

Where the scales come from
--------------------------
All sources turn a non-negative *curvature-like* quantity :math:`c` into scales with one
formula,

.. math:: p_i = \frac{1}{c_i^{\gamma} + \eta},

with exponent :math:`\gamma` (default 1/2) and epsilon :math:`\eta` (default :math:`10^{-5}`):

* :func:`adam_preconditioner`: :math:`c = |m|`, Adam's second moment ``exp_avg_sq``
  (``order=2``) or first moment ``exp_avg`` (``order=1``);
* :func:`fisher_preconditioner`: :math:`c` = the diagonal of the Fisher information of the
  classifier's predictive distribution, which at the centre equals the diagonal of the
  Hessian of the KL basin :math:`\delta(\theta) = \frac1N\sum_x \mathrm{KL}(p_{\theta_0}\,\|\,
  p_\theta)`;
* :class:`DensePreconditioner`: :math:`c` = the eigenvalues of a dense curvature matrix
  :math:`H = V\,\mathrm{diag}(\lambda)\,V^\top` (e.g. :func:`fisher_matrix`), with
  :math:`P = V\,\mathrm{diag}(p)\,V^\top`.

For a quadratic basin :math:`\delta = \tfrac12 x^\top H x` the choice
:math:`P \propto H^{-1/2}` (:math:`\gamma = 1/2, \eta = 0`) makes every direction's
importance-weighted estimate exactly the ellipsoid's volume: zero variance.
"""

from __future__ import annotations

import enum
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

__all__ = [
    "DensePreconditioner",
    "DiagonalPreconditioner",
    "FisherLabels",
    "OriginStretch",
    "Preconditioner",
    "adam_preconditioner",
    "as_preconditioner",
    "fisher_diagonal",
    "fisher_matrix",
    "fisher_preconditioner",
    "prior_eps",
]


@runtime_checkable
class Preconditioner(Protocol):
    """A linear map with determinant one acting on float64 CPU vectors of length ``dim``."""

    dim: int

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        """Return :math:`Pu`."""
        ...


class DiagonalPreconditioner:
    r""":math:`P = \mathrm{diag}(p)` with the scales rescaled so that :math:`\sum\log p_i = 0`.

    Parameters
    ----------
    scales : torch.Tensor
        Positive, finite per-coordinate scales of any overall magnitude.
    """

    def __init__(self, scales: torch.Tensor):
        scales = torch.as_tensor(scales).detach()
        if scales.ndim != 1:
            raise ValueError(
                f"preconditioner must be a 1-D tensor of per-parameter scales, got shape "
                f"{tuple(scales.shape)}"
            )
        scales = scales.to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(scales).all()) or not bool((scales > 0).all()):
            bad = int((~(torch.isfinite(scales) & (scales > 0))).nonzero()[0])
            raise ValueError(
                f"preconditioner must have finite, positive entries; entry {bad} is "
                f"{scales[bad].item()!r} (add a small epsilon before inverting curvature)"
            )
        log_p = scales.log()
        self.scales = (log_p - log_p.mean()).exp()
        self.dim = scales.numel()

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        return self.scales * u


class DensePreconditioner:
    r""":math:`P = V\,\mathrm{diag}(p)\,V^\top` for an orthonormal basis :math:`V`, with
    :math:`\sum_i \log p_i = 0` (so :math:`\det P = 1`).

    Built from a symmetric curvature matrix :math:`H` (a Hessian, a Fisher or Gauss-Newton
    matrix) or its eigendecomposition :math:`H = V\,\mathrm{diag}(\lambda)\,V^\top`, with

    .. math:: p_i = \frac{1}{\max(\lambda_i, 0)^{\gamma} + \eta}

    (negative curvature counts as flat). For a quadratic basin with this :math:`H`,
    :math:`\gamma = 1/2` and :math:`\eta = 0` give :math:`P \propto H^{-1/2}` and a
    zero-variance estimate. Applying :math:`P` costs two dense matrix-vector products,
    :math:`O(D^2)`; holding :math:`V` costs :math:`8D^2` bytes, so this is for models up to
    some :math:`10^4` parameters.

    Parameters
    ----------
    matrix_or_eigh : torch.Tensor or (torch.Tensor, torch.Tensor)
        A symmetric ``[D, D]`` matrix, or ``(eigenvalues, eigenvectors)`` as returned by
        :func:`torch.linalg.eigh` (eigenvectors in the columns).
    eps : float
        :math:`\eta \ge 0`; must be positive when some eigenvalue is zero or negative.
    exponent : float
        :math:`\gamma > 0`.

    Attributes
    ----------
    dim : int
    basis : torch.Tensor
        :math:`V`, float64 ``[D, D]`` on the CPU.
    scales : torch.Tensor
        The normalised :math:`p`, float64 ``[D]``, in the order of ``basis``' columns.
    """

    def __init__(
        self,
        matrix_or_eigh: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        *,
        eps: float = 1e-5,
        exponent: float = 0.5,
    ):
        if isinstance(matrix_or_eigh, tuple | list) or hasattr(matrix_or_eigh, "eigenvectors"):
            eigenvalues, basis = (torch.as_tensor(t).detach() for t in matrix_or_eigh)
            basis = _check_basis(basis, eigenvalues)
            eigenvalues = eigenvalues.to("cpu", torch.float64)
        else:
            matrix = torch.as_tensor(matrix_or_eigh).detach().to("cpu", torch.float64)
            if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
                raise ValueError(
                    f"matrix_or_eigh must be a square [D, D] matrix or an (eigenvalues, "
                    f"eigenvectors) pair, got shape {tuple(matrix.shape)}"
                )
            if not bool(torch.isfinite(matrix).all()):
                raise ValueError("matrix_or_eigh has non-finite entries")
            asym = float((matrix - matrix.T).abs().max())
            if asym > 1e-8 * max(float(matrix.abs().max()), 1e-300):
                raise ValueError(
                    f"matrix_or_eigh must be symmetric (max |H - H^T| = {asym:.3g}); "
                    "symmetrise it first, e.g. (H + H.T) / 2"
                )
            eigenvalues, basis = torch.linalg.eigh(0.5 * (matrix + matrix.T))
        scales = _scales_from_curvature(
            eigenvalues.clamp(min=0), eps=eps, exponent=exponent, what="eigenvalue"
        )
        self._init(basis, scales)

    def _init(self, basis: torch.Tensor, scales: torch.Tensor) -> None:
        log_p = scales.log()
        self.basis = basis
        self.scales = (log_p - log_p.mean()).exp()
        self.dim = basis.shape[0]

    @classmethod
    def from_scales(cls, basis: torch.Tensor, scales: torch.Tensor) -> DensePreconditioner:
        r""":math:`P = V\,\mathrm{diag}(p)\,V^\top` from a basis and positive scales of any
        overall size (normalised here)."""
        scales = torch.as_tensor(scales).detach().to("cpu", torch.float64)
        basis = _check_basis(torch.as_tensor(basis).detach(), scales)
        if not bool(torch.isfinite(scales).all() & (scales > 0).all()):
            raise ValueError("scales must be finite and positive")
        self = cls.__new__(cls)
        self._init(basis, scales)
        return self

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        """Return :math:`V\\,\\mathrm{diag}(p)\\,V^\\top u`."""
        return self.basis @ (self.scales * (self.basis.T @ u))

    def __repr__(self) -> str:
        return f"DensePreconditioner(dim={self.dim})"


class OriginStretch:
    r"""A rank-one stretch along the centre's own axis, optionally after another proposal:

    .. math:: P = s^{-1/D}\,\big(I + (s - 1)\,vv^\top\big)\,P_{\mathrm{base}},
        \qquad v = \theta_0/\lVert\theta_0\rVert,

    so :math:`\det P = 1` and directions are drawn :math:`s` times more often near
    :math:`\pm v`. Under a Gaussian prior much narrower than the trained weights (e.g. the
    initialisation's scale), the prior density changes by many orders of magnitude across the
    basin and its mass sits on the side facing the origin, which isotropic and
    curvature-based proposals almost never draw; ``docs/experiments.md`` measures gains of
    thousands of nats there. Applying :math:`P` costs :math:`O(D)` beyond the base.

    Parameters
    ----------
    center : torch.Tensor
        :math:`\theta_0` (any shape; flattened), not all zero.
    stretch : float
        :math:`s > 0` (``1`` leaves the base proposal unchanged).
    base : tensor of scales or Preconditioner, optional
        Applied first (e.g. Fisher scales).
    """

    def __init__(self, center: torch.Tensor, stretch: float, *, base=None):
        v = torch.as_tensor(center).detach().reshape(-1).to("cpu", torch.float64)
        norm = float(v.norm())
        if not (math.isfinite(norm) and norm > 0):
            raise ValueError("center must be finite and not all zero to define its axis")
        if isinstance(stretch, bool) or not isinstance(stretch, int | float):
            raise TypeError(f"stretch must be a number, got {stretch!r}")
        if not (math.isfinite(stretch) and stretch > 0):
            raise ValueError(f"stretch must be a finite number > 0, got {stretch!r}")
        self.dim = v.numel()
        self.axis = v / norm
        self.stretch = float(stretch)
        self.factor = self.stretch ** (-1.0 / self.dim)
        self.base = as_preconditioner(base, self.dim)

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        """Return :math:`Pu`."""
        if self.base is not None:
            u = self.base.apply(u)
        return self.factor * (u + (self.stretch - 1.0) * self.axis * (self.axis @ u))

    def __repr__(self) -> str:
        return f"OriginStretch(dim={self.dim}, stretch={self.stretch:g}, base={self.base!r})"


def _check_basis(basis: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    basis = basis.to("cpu", torch.float64)
    dim = basis.shape[0] if basis.ndim == 2 else -1
    if basis.ndim != 2 or basis.shape[1] != dim or values.shape != (dim,):
        raise ValueError(
            f"eigenvectors must be [D, D] with D eigenvalues, got {tuple(basis.shape)} and "
            f"{tuple(values.shape)}"
        )
    # O(D^2) orthonormality probe: V^T V x == x for a random x.
    x = torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    err = float(torch.linalg.vector_norm(basis.T @ (basis @ x) - x) / torch.linalg.norm(x))
    if not err < 1e-6:
        raise ValueError(
            f"eigenvectors must be orthonormal columns (V^T V = I), off by {err:.3g}; pass "
            "the output of torch.linalg.eigh"
        )
    return basis


def as_preconditioner(obj, dim: int) -> Preconditioner | None:
    """Turn ``None``, a tensor of scales or a :class:`Preconditioner` into a preconditioner."""
    if obj is None:
        return None
    pre = obj if isinstance(obj, Preconditioner) else DiagonalPreconditioner(obj)
    if pre.dim != dim:
        raise ValueError(
            f"preconditioner has {pre.dim} entries but the centre has {dim} parameters; "
            "build it from the same parameters, in parameters_to_vector order"
        )
    return pre


def _check_eps_exponent(eps, exponent) -> None:
    for name, value in (("eps", eps), ("exponent", exponent)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not (math.isfinite(exponent) and exponent > 0):
        raise ValueError(f"exponent must be a finite number > 0, got {exponent!r}")


def _scales_from_curvature(
    curvature: torch.Tensor, *, eps: float, exponent: float, what: str
) -> torch.Tensor:
    r""":math:`1/(c^\gamma + \eta)` in float64, checked to be finite and positive."""
    _check_eps_exponent(eps, exponent)
    c = curvature.to("cpu", torch.float64)
    if not bool(torch.isfinite(c).all()):
        bad = int((~torch.isfinite(c)).nonzero()[0])
        raise ValueError(f"{what} {bad} is {c[bad].item()}; the curvature must be finite")
    scales = 1.0 / (c.pow(exponent) + eps)
    if not bool(torch.isfinite(scales).all()):
        bad = int((~torch.isfinite(scales)).nonzero()[0])
        raise ValueError(
            f"{what} {bad} is 0, so with eps=0 its scale is infinite; pass eps > 0 (e.g. eps=1e-5)"
        )
    return scales


def prior_eps(cutoff: float, sigma: float, dim: int, *, exponent: float = 0.5) -> float:
    r"""An :math:`\eta` set by the Gaussian prior: :math:`\eta = (2\varepsilon/(\sigma^2
    D))^{\gamma}`.

    Along a direction of curvature :math:`c` the basin reaches radius
    :math:`\sqrt{2\varepsilon/c}`, while the prior :math:`N(0, \sigma^2 I_D)` puts almost no
    mass beyond radius :math:`\sigma\sqrt D` (the peak of :math:`t^{D-1}e^{-t^2/2\sigma^2}`).
    A direction therefore acts as if it had curvature at least
    :math:`\lambda_0 = 2\varepsilon/(\sigma^2 D)`, and :math:`p = 1/(c^\gamma + \eta)` with
    this :math:`\eta = \lambda_0^\gamma` caps the scale of flat and unconstrained parameters
    (:math:`c = 0`, e.g. weights of always-zero inputs) where the prior caps the basin,
    instead of at an arbitrary :math:`1/\eta`. Meaningful for curvature-like :math:`c` (Fisher,
    Hessian), in the units of the objective; not for Adam's moments.

    Parameters
    ----------
    cutoff : float
        :math:`\varepsilon`, in the units of the objective.
    sigma : float
        The prior scale :math:`\sigma` (``basin_volume.estimate``'s default is the RMS of the
        centre).
    dim : int
        :math:`D`.
    exponent : float
        :math:`\gamma`.
    """
    for name, value in (("cutoff", cutoff), ("sigma", sigma)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    _check_eps_exponent(0.0, exponent)
    return (2.0 * cutoff / (sigma * sigma * dim)) ** exponent


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
    from .parameters import select_parameters

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

    from .parameters import FlatParameters, preserved

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
    from .parameters import select_parameters

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

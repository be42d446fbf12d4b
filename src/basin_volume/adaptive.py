r"""Adaptive proposals: refine the preconditioner from the radii already observed.

:func:`estimate_adaptive` runs :func:`basin_volume.estimate` in rounds. Round :math:`r` draws
its directions from a diagonal proposal :math:`P_r = \mathrm{diag}(p^{(r)})` (or, starting
from a :class:`~basin_volume.preconditioners.DensePreconditioner`, diagonal in its eigenbasis)
and with its own seed; between rounds the per-group log-scales are refitted from every
direction seen so far. Every direction's

.. math:: \ell_k = \log A_D + \log I(\omega_k) - D\log\lVert P_{r(k)} u_k\rVert

is an exact importance-weighted estimate under *its own* round's proposal, and a round's
proposal depends only on earlier rounds, so :math:`\mathbb{E}[e^{\ell_k}\mid \text{earlier
rounds}] = \mu` for every :math:`k`. The log-mean-exp over all rounds' directions is therefore
unbiased in exp-space and consistent, exactly like a single run.

The model behind the updates
----------------------------
Parameters are split into groups :math:`g` (each coordinate, or each layer); the proposal for
the next round is :math:`p_i = p^{(0)}_i e^{-a_{g(i)}/2}`, i.e. the curvature model
:math:`h_i = b_i e^{a_{g(i)}}` with :math:`b = (p^{(0)})^{-2}`. For a direction :math:`\omega`
with features :math:`F_g(\omega) = \sum_{i\in g} b_i\omega_i^2` the model's curvature along
:math:`\omega` is :math:`m(\omega) = \sum_g F_g e^{a_g}`.

``update="curvature"`` (default) fits that model to the measured secant curvature of each
direction, :math:`\kappa_k = 2\delta_k / r_k^2` (exact for a quadratic basin, whatever the
radius tolerance). With :math:`c_g = e^{a_g}` the current multipliers (rescaled to the data's
overall level) and :math:`A_{kg} = F_g(\omega_k)\,c_g/\kappa_k`, the relative change
:math:`x` solves the convex, bounded least-squares problem

.. math:: \min_{x\in[K^{-2},\,K^2]^G} \sum_k \Big(\sum_g A_{kg} x_g - 1\Big)^2
    + \lambda \sum_g n_g (x_g - 1)^2

(relative residuals in the measured curvature; :math:`n_g` the group sizes, :math:`K` =
``max_step`` the largest factor by which a group's scale may change in one round, and
:math:`\lambda` = ``ridge`` times the mean data term per coordinate). Every direction of
every round is a valid measurement, whatever proposal drew it, and none is weighted by its
importance weight, so the fit does not collapse when one direction carries all the weight
(ESS near 1, the usual case in high dimension). For a quadratic basin with diagonal Hessian
and per-coordinate groups it is exact once there are more directions than groups, and the
next round has zero variance. What the data cannot see stays as it was (the ridge), so with
fewer directions than groups a round makes the smallest change consistent with them.

``update="cross_entropy"`` is the classic cross-entropy method: the maximum-likelihood
angular central Gaussian (a weighted Tyler fixed point,
:math:`e^{-a_g} = \frac{D}{n_g}\sum_k \tilde w_k F_g(\omega_k)/m(\omega_k)`) under the
importance weights :math:`w_k = e^{\ell_k}`, tempered to :math:`w_k^\beta` with the largest
:math:`\beta \le 1` that keeps their effective sample size at least
:math:`\min(n/4, G + 1)`. It needs more directions than groups.

Limits
------
Both updates refine a *diagonal* model (in the parameters, or in a dense starting
preconditioner's eigenbasis). A diagonal model cannot represent the few dominant,
non-axis-aligned curvature directions of a trained network, and with fewer directions than
groups the curvature fit is underdetermined: on the digits MLP (D = 4810) neither update
improved much on its starting proposal (``benchmarks/preconditioners.py``). Use per-layer or
few groups for real networks; per-coordinate groups suit small problems.
"""

from __future__ import annotations

import enum
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from .directions import sample_direction
from .estimator import estimate
from .parameters import select_parameters
from .preconditioners import (
    DensePreconditioner,
    DiagonalPreconditioner,
    Preconditioner,
    PreconditionerType,
    as_preconditioner,
    resolve_preconditioner,
)
from .result import DirectionRecord, LowESSWarning, VolumeResult

__all__ = [
    "AdaptiveUpdate",
    "PreconditionerType",
    "estimate_adaptive",
    "parameter_groups",
    "resolve_preconditioner",
]

_FEATURE_BYTES = 1 << 31  # largest per-direction feature table kept (directions x groups)


class AdaptiveUpdate(enum.StrEnum):
    """How :func:`estimate_adaptive` refines the proposal between rounds."""

    CURVATURE = "curvature"
    """Least-squares fit of per-group curvature to every direction's measured secant
    curvature 2 delta / r^2 (unweighted; robust when the ESS is near 1)."""
    CROSS_ENTROPY = "cross_entropy"
    """Cross-entropy method: weighted maximum likelihood of the angular central Gaussian
    under tempered importance weights (needs many more directions than groups)."""


def parameter_groups(model: nn.Module, parameters="trainable") -> list[int]:
    """Group sizes with one group per parameter tensor (per layer weight and bias), in
    ``parameters_to_vector`` order of the selected (by default trainable) parameters: a
    ``groups`` argument for :func:`estimate_adaptive`."""
    sizes = [p.numel() for _, p in select_parameters(model, parameters)]
    if not sizes:
        raise ValueError("model has no parameters")
    return sizes


def _group_ids(groups, dim: int, base: torch.Tensor, n_per_round: int) -> torch.Tensor:
    if isinstance(groups, str) and groups == "auto":
        groups = "coordinate" if dim <= n_per_round else min(16, max(1, n_per_round // 4))
    if isinstance(groups, str):
        if groups != "coordinate":
            raise ValueError(
                f"groups must be 'auto', 'coordinate', a number of groups, a list of group "
                f"sizes, a tensor of group ids or a model; got {groups!r}"
            )
        return torch.arange(dim)
    if isinstance(groups, int) and not isinstance(groups, bool) and groups >= 1:
        # quantile bins of the starting log-scales (contiguous blocks when they are all equal)
        rank = torch.empty(dim, dtype=torch.int64)
        rank[torch.argsort(base, stable=True)] = torch.arange(dim)
        return rank * min(groups, dim) // dim
    if isinstance(groups, nn.Module):
        groups = parameter_groups(groups)
    if isinstance(groups, torch.Tensor) and groups.ndim == 1 and groups.numel() == dim:
        ids = groups.to("cpu", torch.int64)
        _, ids = torch.unique(ids, return_inverse=True)
        return ids
    if isinstance(groups, Sequence) and all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in groups
    ):
        if sum(groups) != dim:
            raise ValueError(
                f"groups sizes sum to {sum(groups)} but the centre has {dim} parameters"
            )
        return torch.repeat_interleave(torch.arange(len(groups)), torch.tensor(list(groups)))
    raise ValueError(
        "groups must be 'auto', 'coordinate', a number of groups, a list of positive group "
        "sizes summing to D, a 1-D tensor of D group ids, or a model (one group per parameter "
        f"tensor); got {groups!r}"
    )


def _round_seed(seed: int, r: int) -> int:
    if r == 0:
        return seed
    state = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, r, 0xADA9]).generate_state(2)
    return (int(state[0]) << 31) ^ int(state[1])


@dataclass
class _Frame:
    """The coordinates the scales live in: the parameters, or a dense basis' eigenvectors."""

    base: torch.Tensor  # p0, normalised, float64
    basis: torch.Tensor | None

    def make(self, scales: torch.Tensor) -> Preconditioner:
        if self.basis is None:
            return DiagonalPreconditioner(scales)
        return DensePreconditioner.from_scales(self.basis, scales)

    def coords(self, omega: torch.Tensor) -> torch.Tensor:
        return omega if self.basis is None else self.basis.T @ omega


def _frame(pre: Preconditioner | None, dim: int) -> _Frame:
    if pre is None:
        return _Frame(torch.ones(dim, dtype=torch.float64), None)
    if isinstance(pre, DiagonalPreconditioner):
        return _Frame(pre.scales.clone(), None)
    if isinstance(pre, DensePreconditioner):
        return _Frame(pre.scales.clone(), pre.basis)
    raise ValueError(
        "estimate_adaptive refines diagonal scales: the starting preconditioner must be None, "
        f"a tensor of scales, a DiagonalPreconditioner or a DensePreconditioner; got "
        f"{type(pre).__name__}"
    )


def estimate_adaptive(
    fn: Callable[[torch.Tensor], torch.Tensor | float],
    center: torch.Tensor,
    *,
    rounds: int = 4,
    n_per_round: int = 50,
    update: AdaptiveUpdate | str = AdaptiveUpdate.CURVATURE,
    groups: str | int | Sequence[int] | torch.Tensor | nn.Module = "auto",
    ridge: float = 1e-6,
    max_step: float = 10.0,
    seed: int = 0,
    progress: bool = True,
    callback: Callable[[DirectionRecord], None] | None = None,
    resume_from: VolumeResult | None = None,
    run_round: Callable[..., VolumeResult] | None = None,
    **estimate_kwargs,
) -> VolumeResult:
    r"""Estimate the basin with a proposal refined over ``rounds`` rounds of directions.

    Parameters
    ----------
    fn, center
        As in :func:`basin_volume.estimate`.
    rounds : int
        Number of rounds (the first uses the starting proposal).
    n_per_round : int
        Directions per round; the result has ``rounds * n_per_round`` directions.
    update : {"curvature", "cross_entropy"}
        How the scales are refitted between rounds (see :class:`AdaptiveUpdate` and the
        module notes).
    groups : "auto", "coordinate", int, sizes, tensor of ids or model
        Which scales are free. ``"coordinate"``: one per coordinate (the fit keeps
        ``directions x D`` features and needs about ``D`` directions); an int ``G``: ``G``
        quantile bins of the starting scales (contiguous blocks when they are all equal); a
        list of group sizes in ``parameters_to_vector`` order; a ``[D]`` tensor of group ids;
        or a model (one group per parameter tensor, :func:`parameter_groups`). ``"auto"``:
        per coordinate when ``D <= n_per_round``, else ``min(16, n_per_round // 4)`` bins.
        With a dense starting preconditioner the coordinates are its eigenvectors.
    ridge : float
        Pull of the curvature fit towards the current proposal, relative to the data
        (``update="curvature"``).
    max_step : float
        Largest factor by which a group's scale may change from one round to the next
        (``update="curvature"``).
    seed : int
        Round 0 uses ``seed`` (it is exactly ``estimate(..., seed=seed)``); later rounds use
        seeds derived from ``(seed, round)``.
    progress : bool
        Show a progress bar per round.
    callback : callable, optional
        Called with each finished direction's record, indexed across rounds.
    resume_from : VolumeResult, optional
        The directions an interrupted run with the same settings finished (e.g.
        :func:`basin_volume.load_result` of its run log). Each round's proposal is refitted
        from them exactly as before, so the result equals an uninterrupted run's.
    run_round : callable, optional
        Runs one round's directions under its fixed proposal; called with keyword arguments
        ``n_samples``, ``seed``, ``preconditioner``, ``progress``, ``callback``,
        ``resume_from`` and ``estimate_kwargs``. Default: :func:`basin_volume.estimate` on
        ``fn`` and ``center`` (:class:`~basin_volume.VolumeEstimator` passes its own, e.g.
        to evaluate rays in place in the model).
    **estimate_kwargs
        ``cutoff``, ``measure``, ``sigma``, ``rtol``, ``max_evals``, ``max_radius`` and the
        starting ``preconditioner`` (None, scales, a diagonal or a dense preconditioner), as
        in :func:`basin_volume.estimate`.

    Returns
    -------
    VolumeResult
        All rounds' directions (``index`` running across rounds, ``seed`` = ``seed``), with
        ``meta["adaptive"]`` holding per-round ``log_volume``, ``ess``,
        ``top_weight_share``, ``std`` (spread of the per-direction estimates), seeds and fit
        diagnostics.

    Examples
    --------
    >>> import torch, basin_volume as bv
    >>> from basin_volume.adaptive import estimate_adaptive
    >>> h = torch.tensor([1.0, 10.0, 50.0], dtype=torch.float64)
    >>> res = estimate_adaptive(lambda th: 0.5 * (h * th**2).sum(), torch.zeros(3).double(),
    ...                         rounds=2, n_per_round=8, measure="uniform", cutoff=0.5,
    ...                         rtol=1e-10, progress=False)
    >>> first, second = (r["std"] for r in res.meta["adaptive"]["rounds"])
    >>> first > 0.5, second < 1e-4   # the second round has (near) zero variance
    (True, True)
    """
    if "n_samples" in estimate_kwargs:
        raise TypeError("estimate_adaptive does not take n_samples: use rounds and n_per_round")
    for name, value in (("rounds", rounds), ("n_per_round", n_per_round)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(ridge, bool) or not isinstance(ridge, int | float) or not ridge >= 0:
        raise ValueError(f"ridge must be a number >= 0, got {ridge!r}")
    if isinstance(max_step, bool) or not isinstance(max_step, int | float) or not max_step > 1:
        raise ValueError(f"max_step must be a number > 1, got {max_step!r}")
    try:
        update = AdaptiveUpdate(update)
    except ValueError:
        raise ValueError(f"update must be 'curvature' or 'cross_entropy', got {update!r}") from None
    if not isinstance(center, torch.Tensor) or center.ndim != 1:
        raise ValueError("center must be a 1-D tensor of parameters")
    dim = center.numel()
    frame = _frame(as_preconditioner(estimate_kwargs.pop("preconditioner", None), dim), dim)
    gid = _group_ids(groups, dim, frame.base, n_per_round)
    n_groups = int(gid.max()) + 1
    sizes = torch.bincount(gid, minlength=n_groups).double()
    if 8 * rounds * n_per_round * n_groups > _FEATURE_BYTES:
        raise ValueError(
            f"{n_groups} groups x {rounds * n_per_round} directions is too many features to "
            "keep; pass groups=<model> (one scale per parameter tensor) or a list of sizes"
        )
    if update is AdaptiveUpdate.CROSS_ENTROPY and n_groups >= n_per_round:
        raise ValueError(
            f"update='cross_entropy' needs more directions per round than groups ({n_groups}); "
            "raise n_per_round, use coarser groups, or update='curvature'"
        )
    b = frame.base.pow(-2)
    if run_round is None:
        run_round = functools.partial(estimate, fn, center, method="is")

    done = _resumed_records(resume_from, seed, rounds, n_per_round)
    a = torch.zeros(n_groups, dtype=torch.float64)
    records: list[DirectionRecord] = []
    features, log_kappa, estimates = [], [], []
    info, last, seconds = [], None, 0.0
    for r in range(rounds):
        scales = frame.base * torch.exp(-0.5 * a)[gid]
        pre = frame.make(scales)
        round_seed = _round_seed(seed, r)
        offset = len(records)

        def forward(rec, offset=offset):
            if callback is not None:
                callback(replace(rec, index=offset + rec.index))

        round_prev = None
        if done[offset : offset + n_per_round]:
            round_prev = VolumeResult.from_records(
                [replace(r, index=r.index - offset) for r in done[offset : offset + n_per_round]],
                **{
                    k: getattr(resume_from, k)
                    for k in ("dim", "measure", "cutoff", "sigma", "rtol")
                },
                seed=round_seed,
                meta=resume_from.meta,  # its centre's fingerprint is checked by estimate
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LowESSWarning)
            res = run_round(
                n_samples=n_per_round,
                seed=round_seed,
                preconditioner=pre,
                progress=progress,
                callback=forward,
                resume_from=round_prev,
                **estimate_kwargs,
            )
        records.extend(replace(rec, index=offset + rec.index) for rec in res.records())
        for k in range(res.n_samples):
            omega = sample_direction(k, dim, seed=round_seed, preconditioner=pre).omega
            x = frame.coords(omega.to("cpu", torch.float64))
            features.append(
                torch.zeros(n_groups, dtype=torch.float64).index_add_(0, gid, b * x * x)
            )
            radius, delta = float(res.radii[k]), float(res.deltas[k])
            ok = res.status[k] == "converged" and delta > 0 and 0 < radius < math.inf
            log_kappa.append(math.log(2 * delta / radius**2) if ok else math.nan)
        estimates.extend(res.estimates.tolist())
        finite = res.estimates[torch.isfinite(res.estimates)]
        entry = {
            "round": r,
            "seed": round_seed,
            "n": res.n_samples,
            "log_volume": res.log_volume,
            "ess": res.ess,
            "top_weight_share": res.top_weight_share,
            "std": float(finite.std()) if finite.numel() > 1 else math.nan,
            "n_evals": int(res.n_evals.sum()),
        }
        if r < rounds - 1:
            feats = torch.stack(features)
            if update is AdaptiveUpdate.CURVATURE:
                a, fit = _fit_curvature(
                    feats, torch.tensor(log_kappa), sizes, ridge, a, max_change=max_step**2
                )
            else:
                a, fit = _fit_cross_entropy(feats, torch.tensor(estimates), sizes, dim, a)
            entry["fit"] = fit
        info.append(entry)
        last = res
        seconds += float(res.meta.get("seconds", 0.0))

    meta = dict(last.meta)
    meta["preconditioner"] = "adaptive"
    meta["seconds"] = seconds
    meta["adaptive"] = {
        "n_per_round": n_per_round,
        "update": update.value,
        "rounds": info,
        "n_groups": n_groups,
        "ridge": float(ridge),
        "max_step": float(max_step),
        "start": "isotropic" if frame.basis is None and bool((frame.base == 1).all()) else "given",
    }
    if n_groups <= 64:
        meta["adaptive"]["log_curvature_multipliers"] = a.tolist()
    result = VolumeResult.from_records(
        records,
        dim=last.dim,
        measure=last.measure,
        cutoff=last.cutoff,
        sigma=last.sigma,
        rtol=last.rtol,
        seed=seed,
        meta=meta,
    )
    result.warn_if_unreliable(stacklevel=2)
    return result


def _resumed_records(
    prev: VolumeResult | None, seed: int, rounds: int, n_per_round: int
) -> list[DirectionRecord]:
    """The finished directions of an interrupted adaptive run with the same settings."""
    if prev is None:
        return []
    if not isinstance(prev, VolumeResult):
        raise TypeError(f"resume_from must be a VolumeResult, got {type(prev).__name__}")
    if prev.seed != seed:
        raise ValueError(f"resume_from was made with seed={prev.seed}, this run has seed={seed}")
    made_with = (prev.meta.get("adaptive") or {}).get("n_per_round", n_per_round)
    if made_with != n_per_round:
        raise ValueError(
            f"resume_from was made with n_per_round={made_with}, this run has {n_per_round}: "
            "the rounds must stay the same"
        )
    if prev.n_samples > rounds * n_per_round:
        raise ValueError(
            f"resume_from already has {prev.n_samples} directions, more than rounds x "
            f"n_per_round = {rounds * n_per_round}"
        )
    return prev.records()


def _fit_curvature(feats, log_kappa, sizes, ridge, a_start, *, max_change: float = 100.0):
    r"""Bounded, regularised linear least-squares fit of the group curvature multipliers.

    With :math:`c = e^{a}` the current multipliers rescaled to the data's overall level and
    :math:`A_{kg} = F_{kg} c_g / \kappa_k`, solve for the relative change :math:`x`

    .. math:: \min_x \lVert A x - 1\rVert^2 + \lambda \sum_g n_g (x_g - 1)^2,\qquad
        x \in [1/K, K]

    (relative residuals in the measured curvature; a convex problem). The ridge keeps what
    the data cannot see as it was: with fewer directions than groups the fit is the smallest
    change consistent with the measurements (a Kaczmarz-like projection, which for a
    quadratic basin moves every round closer to the truth).
    """
    import scipy.optimize
    import scipy.sparse

    keep = torch.isfinite(log_kappa)
    n_used = int(keep.sum())
    if n_used == 0:
        return a_start, {"n_used": 0}
    a_start = a_start - (sizes * a_start).sum() / sizes.sum()
    mat = (feats[keep] * a_start.exp() / log_kappa[keep].exp().unsqueeze(1)).numpy()
    ones = np.ones(n_used)
    level = float(mat.sum(1) @ ones / np.square(mat.sum(1)).sum())
    mat = mat * level
    lam = ridge * float(np.square(mat).sum()) / float(sizes.sum())
    weights = np.sqrt(lam * sizes.numpy())
    n_groups = mat.shape[1]
    rhs = np.concatenate([ones, weights])
    bounds = (1.0 / max_change, max_change)
    if n_groups <= 1024:
        aug = np.concatenate([mat, np.diag(weights)])
        sol = scipy.optimize.lsq_linear(aug, rhs, bounds=bounds, method="bvls")
    else:
        aug = scipy.sparse.vstack(
            [scipy.sparse.csr_matrix(mat), scipy.sparse.diags(weights, format="csr")]
        ).tocsr()
        sol = scipy.optimize.lsq_linear(aug, rhs, bounds=bounds, lsq_solver="lsmr")
    x = torch.from_numpy(sol.x)
    a = a_start + math.log(level) + x.log()
    a = a - (sizes * a).sum() / sizes.sum()
    resid = mat @ sol.x - 1.0
    at_bound = int(((sol.x <= 1.0 / max_change * 1.0001) | (sol.x >= max_change * 0.9999)).sum())
    return a, {
        "n_used": n_used,
        "rms_relative_residual": float(np.sqrt(np.mean(resid**2))),
        "groups_at_bound": at_bound,
    }


def _tempered(log_w: torch.Tensor, target: float) -> tuple[torch.Tensor, float]:
    """Weights ``w^beta`` (normalised) with the largest beta <= 1 whose ESS >= target."""

    def ess(beta):
        w = torch.softmax(beta * log_w, 0)
        return float(1.0 / (w * w).sum())

    beta = 1.0
    if ess(1.0) < target:
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if ess(mid) >= target else (lo, mid)
        beta = lo
    return torch.softmax(beta * log_w, 0), beta


def _fit_cross_entropy(feats, estimates, sizes, dim, a_start, *, max_iter: int = 200):
    """Weighted Tyler fixed point for the group scales of an angular central Gaussian."""
    keep = torch.isfinite(estimates)
    feats, log_w = feats[keep], estimates[keep]
    if feats.shape[0] == 0:
        return a_start, {"n_used": 0}
    w, beta = _tempered(log_w, min(feats.shape[0] / 4, sizes.numel() + 1.0))
    log_tau = -a_start.clone()
    for _ in range(max_iter):
        m = (feats * torch.exp(-log_tau)).sum(1)
        new = torch.log((dim / sizes) * (w.unsqueeze(1) * feats / m.unsqueeze(1)).sum(0))
        new = new - (sizes * new).sum() / sizes.sum()
        change = float((new - log_tau).abs().max())
        log_tau = new
        if change < 1e-10:
            break
    ess = float(1.0 / (w * w).sum())
    return -log_tau, {"n_used": int(keep.sum()), "beta": beta, "ess_tempered": ess}

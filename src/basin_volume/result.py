r"""The result of an estimate: per-direction records, the aggregate and its diagnostics.

Each direction :math:`k` contributes a log estimate :math:`\ell_k` whose exponential is an
unbiased estimate of the basin's measure :math:`\mu`. The aggregate is

.. math:: \log\hat\mu = \log \frac1n \sum_k e^{\ell_k},

consistent but biased low for few directions: the weights are heavy-tailed, so the
effective sample size :math:`(\sum w)^2/\sum w^2` of :math:`w_k = e^{\ell_k - \max\ell}` and the
share of the largest weight are reported with it.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from scipy.stats import t as student_t

from . import result_file
from .checks import as_number
from .records import DirectionRecord, ResultFileError
from .settings import first_difference

__all__ = ["DirectionRecord", "LowESSWarning", "ResultFileError", "VolumeResult"]

LOW_ESS = 5.0
SMC_SPREAD = 2.0  # nats: replicas of a converged SMC run agree better than this
STUCK_CORRELATION = 0.9  # an SMC level's moves that leave more than this left it unmixed
STUCK_SHARE = 0.25  # share of unmixed levels above which the moves are said to be stuck


class LowESSWarning(RuntimeWarning):
    """The importance weights are dominated by very few directions: the estimate is likely a
    lower bound and its interval too narrow."""


def warn_every_time(message: str, category: type[Warning], *, stacklevel: int = 2) -> None:
    """:func:`warnings.warn`, but shown every time it is issued under the default filters.

    Python's default action shows a warning once per code location (and message), so in a
    loop over checkpoints a later untrustworthy result would go unflagged. The user's own
    filters (``"ignore"``, ``"error"``, ``"once"``) still apply. ``stacklevel`` counts as in
    :func:`warnings.warn`, from the caller of this function.
    """
    frame = sys._getframe(1)
    for _ in range(stacklevel - 1):
        if frame.f_back is None:
            break
        frame = frame.f_back
    module_globals = frame.f_globals
    where = dict(
        message=message,
        category=category,
        filename=frame.f_code.co_filename,
        lineno=frame.f_lineno,
        module=module_globals.get("__name__", "<unknown>"),
        registry=None,  # no "already shown here" record: each result is flagged
    )
    try:
        warnings.warn_explicit(**where, module_globals=module_globals)
    except ImportError:  # code run by `python -c`: its __main__ has no source to show
        warnings.warn_explicit(**where)


def recorded_center(result: VolumeResult) -> str | None:
    """The ``center_sha256`` a result records (from :func:`basin_volume.estimate`, a run log
    or a results file), or ``None`` when it records none."""
    meta = result.meta
    sha = meta.get("center_sha256")
    if sha is None and isinstance(meta.get("settings"), dict):
        sha = meta["settings"].get("center_sha256")
    return sha if isinstance(sha, str) else None


def _recorded_data(result: VolumeResult) -> Any:
    """The data fingerprint a results file records (``None`` when none)."""
    data = result.meta.get("data")
    return data if isinstance(data, str) else None


def _logmeanexp(x: torch.Tensor) -> float:
    if x.numel() == 0:
        return math.nan
    return float(torch.logsumexp(x, 0) - math.log(x.numel()))


@dataclass(frozen=True, eq=False)
class VolumeResult:
    r"""Per-direction records and the aggregate estimate of a basin's size.

    Attributes
    ----------
    estimates : torch.Tensor
        float64 ``[n]``, per-direction log estimates :math:`\ell_k` (natural log).
    deltas : torch.Tensor
        float64 ``[n]``, :math:`f(\theta_0 + r_k\omega_k) - f(\theta_0)` at the returned radius.
    props : torch.Tensor
        float64 ``[n]``, :math:`\lVert Pu_k\rVert` (1 without a preconditioner).
    mults : torch.Tensor
        float64 ``[n]``, radius in units of ``props``: :math:`r_k = \mathrm{mults}_k\cdot
        \mathrm{props}_k`.
    logabsint : torch.Tensor
        float64 ``[n]``, log of the radial integral :math:`I(\omega_k) = \int_0^{r_k}
        \rho(\theta_0 + t\omega_k)\,t^{D-1}dt` (with :math:`\rho` the prior density, or 1 for
        the uniform measure), so that ``estimates = log A_D + logabsint - D log props``.
    n_evals : torch.Tensor
        int64 ``[n]``, evaluations of the objective spent on each direction.
    radii : torch.Tensor
        float64 ``[n]``, the radius of each direction exactly as evaluated (``inf`` for an
        unbounded ray).
    slopes : torch.Tensor
        float64 ``[n]``, the log-log slope of delta measured near each radius (``nan`` if
        the search needed a single evaluation).
    status : tuple of str
        How each direction's radius search ended (see :class:`basin_volume.radius.RayStatus`).
    dim : int
        Number of parameters :math:`D`.
    measure : str
        ``"gaussian"`` (``log_volume`` is a log probability) or ``"uniform"`` (log volume).
    cutoff, sigma, rtol : float
        The settings of the run (``sigma`` is ``nan`` for the uniform measure).
    seed : int
        Seed of the run; direction ``k`` depends only on ``seed`` and ``k``.
    meta : dict
        Anything else worth keeping (configuration, versions, device, timings; for
        ``method="smc"`` the sampler's diagnostics under ``meta["smc"]``).
    method : str
        ``"is"``: importance sampling, ``log_volume`` is the log-mean-exp of ``estimates``.
        ``"smc"``: :mod:`basin_volume.smc`; ``log_volume`` pools the independent
        ``replicas`` and the rows are the final particles of every replica, with
        ``estimates`` their :math:`\log A_D + \log I(\omega)` (uniform-proposal weights).
    replicas : tuple of float
        ``method="smc"``: each independent replica's estimate of :math:`\log\mu`.
    """

    estimates: torch.Tensor
    deltas: torch.Tensor
    props: torch.Tensor
    mults: torch.Tensor
    logabsint: torch.Tensor
    n_evals: torch.Tensor
    radii: torch.Tensor
    slopes: torch.Tensor
    status: tuple[str, ...]
    dim: int
    measure: str
    cutoff: float
    sigma: float
    rtol: float
    seed: int
    meta: dict = field(default_factory=dict)
    method: str = "is"
    replicas: tuple[float, ...] = ()

    def __post_init__(self):
        if self.method not in ("is", "smc"):
            raise ValueError(f"VolumeResult.method must be 'is' or 'smc', got {self.method!r}")
        if self.method == "smc" and not self.replicas:
            raise ValueError("VolumeResult.replicas must hold the replicas' estimates for 'smc'")
        n = len(self.status)
        for name in result_file.TENSOR_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.shape != (n,):
                raise ValueError(f"VolumeResult.{name} must be a tensor of shape ({n},)")

    # ------------------------------------------------------------------ aggregate
    @property
    def n_samples(self) -> int:
        """Number of directions."""
        return len(self.status)

    @classmethod
    def from_records(cls, records, **settings) -> VolumeResult:
        """Assemble a result from :class:`DirectionRecord` rows (in index order)."""
        records = list(records)
        if [r.index for r in records] != list(range(len(records))):
            raise ValueError("records must hold directions 0, 1, ..., n-1 in order")

        def col(name, dtype=torch.float64):
            return torch.tensor([getattr(r, name) for r in records], dtype=dtype)

        return cls(
            estimates=col("estimate"),
            deltas=col("delta"),
            props=col("prop"),
            mults=col("radius") / col("prop"),
            logabsint=col("logabsint"),
            n_evals=col("n_evals", torch.int64),
            radii=col("radius"),
            slopes=col("slope"),
            status=tuple(r.status for r in records),
            **settings,
        )

    def records(self) -> list[DirectionRecord]:
        """The per-direction rows (inverse of :meth:`from_records`)."""
        return [
            DirectionRecord(
                index=k,
                estimate=float(self.estimates[k]),
                delta=float(self.deltas[k]),
                prop=float(self.props[k]),
                radius=float(self.radii[k]),
                logabsint=float(self.logabsint[k]),
                n_evals=int(self.n_evals[k]),
                status=self.status[k],
                slope=float(self.slopes[k]),
            )
            for k in range(self.n_samples)
        ]

    @property
    def log_volume(self) -> float:
        """Log probability (Gaussian) or log volume (uniform), nats.

        The log-mean-exp of ``estimates`` (importance sampling) or of ``replicas`` (SMC).
        """
        if self.method == "smc":
            return _logmeanexp(torch.tensor(self.replicas, dtype=torch.float64))
        return _logmeanexp(self.estimates)

    @property
    def log10_volume(self) -> float:
        """``log_volume`` in base 10."""
        return self.log_volume / math.log(10.0)

    @property
    def information(self) -> float:
        """:math:`-\\log P` in nats: the information content (Gaussian measure only)."""
        return -self.log_volume

    def _weights(self) -> torch.Tensor:
        logs = self._log_terms()
        finite = logs[torch.isfinite(logs)]
        if finite.numel() != logs.numel() or finite.numel() == 0:
            return torch.full_like(logs, math.nan)
        return torch.exp(logs - logs.max())

    def _log_terms(self) -> torch.Tensor:
        """The unbiased terms pooled by ``log_volume``: directions, or SMC replicas."""
        if self.method == "smc":
            return torch.tensor(self.replicas, dtype=torch.float64)
        return self.estimates

    @property
    def ess(self) -> float:
        r"""Effective sample size :math:`(\sum w)^2/\sum w^2` of the importance weights."""
        w = self._weights()
        return float(w.sum() ** 2 / (w * w).sum())

    @property
    def top_weight_share(self) -> float:
        """Fraction of the total weight carried by the heaviest direction."""
        w = self._weights()
        return float(w.max() / w.sum())

    @property
    def low_ess(self) -> bool:
        """Whether a few directions carry almost all the weight (ESS below
        ``min(5, n / 2)``): ``log_volume`` is then likely a lower bound and its interval too
        narrow. Said by :meth:`summary`, saved in the JSON, warned by
        :meth:`warn_if_unreliable`. Always false for SMC results, whose rows are not
        importance weights (their check is the replicas' agreement)."""
        if self.method == "smc":
            return False
        return self.n_samples >= 2 and self.ess < min(LOW_ESS, 0.5 * self.n_samples)

    @property
    def replicas_disagree(self) -> bool:
        """Whether an SMC result's replicas spread by more than :data:`SMC_SPREAD` nats
        (standard deviation): the run is then not converged. Said by :meth:`summary`,
        warned by :meth:`warn_if_unreliable`."""
        logs = torch.tensor(self.replicas, dtype=torch.float64)
        if self.method != "smc" or logs.numel() < 2 or not bool(torch.isfinite(logs).any()):
            return False
        return not float(logs.std()) <= SMC_SPREAD

    @property
    def below_importance(self) -> bool:
        """Whether an SMC result's whole interval lies below ``meta["smc"]
        ["importance_floor"]``, a 95% lower bound on the truth from the plain importance
        sampling the run did on its way (:attr:`basin_volume.smc.SMCRun.importance`): the
        path then lost the basin's mass, and the estimate is too low. Said by
        :meth:`summary`, warned by :meth:`warn_if_unreliable`."""
        floor = (self.meta.get("smc") or {}).get("importance_floor")
        if self.method != "smc" or floor is None or not math.isfinite(self.log_volume):
            return False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.interval(0.95)[1] < floor

    @property
    def stuck_levels(self) -> tuple[int, int]:
        """``(unmixed, all)``: how many of an SMC result's levels (every replica's) ended
        with their particles correlated above :data:`STUCK_CORRELATION` with where the level
        found them (``meta["smc"]["correlation"]``, :attr:`basin_volume.smc.SMCRun.correlation`);
        ``(0, 0)`` for other results and those saved before it was recorded."""
        if self.method != "smc":
            return 0, 0
        levels = [c for run in (self.meta.get("smc") or {}).get("correlation") or [] for c in run]
        return sum(c > STUCK_CORRELATION for c in levels), len(levels)

    @property
    def moves_stuck(self) -> bool:
        """Whether over :data:`STUCK_SHARE` of an SMC result's levels ended unmixed
        (:attr:`stuck_levels`): the moves hardly moved the particles, so copies of one
        parent still agreed when the next level reweighted them, and the estimate is likely
        low, its interval too narrow (the replicas can agree on a wrong number). Said by
        :meth:`summary`, warned by :meth:`warn_if_unreliable`."""
        unmixed, levels = self.stuck_levels
        return levels > 0 and unmixed > STUCK_SHARE * levels

    @property
    def n_failed(self) -> int:
        """Directions whose radius search did not converge."""
        return sum(s != "converged" for s in self.status)

    def interval(self, level: float = 0.95, *, n_boot: int = 2000, seed: int = 0):
        """Percentile bootstrap interval for ``log_volume``, resampling directions.

        Parameters
        ----------
        level : float
            Coverage, in (0, 1).
        n_boot : int
            Bootstrap resamples.
        seed : int
            Seed of the resampling.

        Returns
        -------
        (float, float)
            ``(low, high)``. With fewer than two directions, ``(-inf, inf)``.

        Notes
        -----
        When one or two directions carry almost all the weight (``ess`` below about 5) no
        resampling of the observed directions can reach above the point estimate: the true
        value is then likely higher than the whole interval. A :class:`LowESSWarning` says so.
        """
        level = as_number(level)
        if isinstance(level, bool) or not isinstance(level, int | float) or not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level!r}")
        n_boot = as_number(n_boot)
        if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
            raise ValueError(f"n_boot must be a positive integer (resamples), got {n_boot!r}")
        if self.method == "smc":
            return self._replica_interval(level)
        n = self.n_samples
        if n < 2 or not bool(torch.isfinite(self.estimates).all()):
            return (-math.inf, math.inf) if n < 2 else (self.log_volume, self.log_volume)
        self.warn_if_unreliable(stacklevel=3)
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, n, (n_boot, n), generator=gen)
        boots = torch.logsumexp(self.estimates[idx], dim=1) - math.log(n)
        q = torch.quantile(
            boots, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=boots.dtype)
        )
        return float(q[0]), float(q[1])

    def _replica_interval(self, level: float) -> tuple[float, float]:
        r"""Student-t interval from the spread of the replicas' :math:`\log\hat\mu_r`.

        Each replica is an independent run, so the spread measures the method's own
        variance (not a resampling of one run's directions). With backward passes
        (``bidirectional``) the upper end is at least theirs: the same Student-t bound
        around :attr:`log_volume_reverse`.
        """
        logs = torch.tensor(self.replicas, dtype=torch.float64)
        if logs.numel() < 2 or not bool(torch.isfinite(logs).all()):
            return (-math.inf, math.inf) if logs.numel() < 2 else (self.log_volume,) * 2
        t = float(student_t.ppf((1 + level) / 2, logs.numel() - 1))
        half = t * float(logs.std() / math.sqrt(logs.numel()))
        high = self.log_volume + half
        back = self._reverse_logs()
        if back is not None:
            high = max(high, self.log_volume_reverse + t * float(back.std() / math.sqrt(
                back.numel())))
        return self.log_volume - half, high

    def _reverse_logs(self) -> torch.Tensor | None:
        """The backward passes' estimates, if every replica made a finite one."""
        back = (self.meta.get("smc") or {}).get("reverse") or []
        logs = torch.tensor([math.nan if v is None else v for v in back], dtype=torch.float64)
        if self.method != "smc" or logs.numel() < 2 or not bool(torch.isfinite(logs).all()):
            return None
        return logs

    @property
    def log_volume_reverse(self) -> float:
        r"""``bidirectional`` SMC: the backward passes' pooled estimate,
        :math:`-\log\tfrac1R\sum_r e^{-\log\hat\mu^{\leftarrow}_r}` (each backward pass
        estimates :math:`1/\mu`); ``nan`` without them. Far above :attr:`log_volume`, it
        says the moves did not mix (:attr:`passes_disagree`)."""
        back = self._reverse_logs()
        return math.nan if back is None else -_logmeanexp(-back)

    @property
    def passes_disagree(self) -> bool:
        """Whether the backward passes of a ``bidirectional`` SMC result lie more than
        :data:`SMC_SPREAD` nats above the forward ones: the moves did not mix, the estimate
        is likely low, and the truth likely between the two. Said by :meth:`summary`,
        warned by :meth:`warn_if_unreliable`."""
        return self.log_volume_reverse - self.log_volume > SMC_SPREAD

    def warn_if_unreliable(self, *, stacklevel: int = 2) -> None:
        """Warn when the ESS is low (the estimate is then likely a lower bound).

        The warning is shown for every result it concerns, also under Python's default
        filters (which would show it once per code location), and names the result's
        ``log_volume``, so in a loop over checkpoints each untrustworthy one is flagged.
        """
        if self.method == "smc":
            if self.below_importance:
                warn_every_time(
                    f"log_volume {self.log_volume:.6g}: {self._below_importance_text()}",
                    LowESSWarning,
                    stacklevel=stacklevel,
                )
            if self.replicas_disagree:
                spread = torch.tensor(self.replicas, dtype=torch.float64).std()
                warn_every_time(
                    f"log_volume {self.log_volume:.6g}: the {len(self.replicas)} SMC replicas "
                    f"disagree (standard deviation {float(spread):.3g} nats), so the estimate "
                    "is not converged; raise n_samples (particles) or n_moves",
                    LowESSWarning,
                    stacklevel=stacklevel,
                )
            if self.passes_disagree:
                warn_every_time(
                    f"log_volume {self.log_volume:.6g}: {self._passes_text()}",
                    LowESSWarning,
                    stacklevel=stacklevel,
                )
            if self.moves_stuck:
                warn_every_time(
                    f"log_volume {self.log_volume:.6g}: {self._stuck_text()}",
                    LowESSWarning,
                    stacklevel=stacklevel,
                )
            return
        if self.low_ess:
            warn_every_time(
                f"log_volume {self.log_volume:.6g}: effective sample size {self.ess:.2f} of "
                f"{self.n_samples} directions (the top direction carries "
                f"{100 * self.top_weight_share:.0f}% of the weight), so log_volume is likely a "
                "lower bound and its interval too narrow; use more directions or a better "
                "preconditioner",
                LowESSWarning,
                stacklevel=stacklevel,
            )

    def _passes_text(self) -> str:
        return (
            f"the backward passes estimate {self.log_volume_reverse:.6g}, "
            f"{self.log_volume_reverse - self.log_volume:.3g} nats above the forward ones: the "
            "moves did not mix, so the estimate is likely low and the truth likely between "
            "the two (the interval spans both); raise n_samples or n_moves"
        )

    def _stuck_text(self) -> str:
        unmixed, levels = self.stuck_levels
        return (
            f"the moves left {unmixed} of {levels} SMC levels unmixed (the particles still "
            f"correlated above {STUCK_CORRELATION:g} with where the level found them), so the "
            "estimate is likely low and its interval too narrow; leave n_moves=None (moves "
            "until the particles decorrelate), or raise the budget"
        )

    def _below_importance_text(self) -> str:
        floor = self.meta["smc"]["importance_floor"]
        return (
            f"importance sampling on the way puts the truth above {floor:.6g} (95%, by "
            "Markov's inequality), above this SMC interval: the path lost part of the basin "
            "and the estimate is too low; raise n_samples or n_moves, or give a better "
            "preconditioner"
        )

    def summary(self) -> str:
        """A few lines for people: the estimate, its interval and how far to trust it."""
        what = "log probability" if self.measure == "gaussian" else "log volume"
        lines = [f"{what}: {self.log_volume:.6g} nats ({self.log10_volume:.6g} in log10)"]
        if self.n_samples >= 2 and math.isfinite(self.log_volume):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", LowESSWarning)
                lo, hi = self.interval(0.95)
            kind = "replica" if self.method == "smc" else "bootstrap"
            lines.append(f"95% {kind} interval: [{lo:.6g}, {hi:.6g}]")
        if self.method == "smc":
            info = self.meta.get("smc", {})
            per = self.n_samples // max(len(self.replicas), 1)
            lines.append(
                f"method: SMC ({', '.join(sorted(set(info.get('kinds', []))))}), "
                f"{len(self.replicas)} replicas of {per} particles, levels "
                f"{info.get('levels')}, objective evaluations {int(self.n_evals.sum())} in all"
            )
            lines.append("replicas: " + ", ".join(f"{r:.6g}" for r in self.replicas))
            if self.below_importance:
                lines.append(f"warning: {self._below_importance_text()}")
            if self._reverse_logs() is not None:
                lines.append(f"backward passes: {self.log_volume_reverse:.6g} (pooled)")
            if self.replicas_disagree:
                lines.append(
                    f"warning: the replicas disagree by more than {SMC_SPREAD:g} nats (standard "
                    "deviation), so the estimate is not converged; raise n_samples or n_moves"
                )
            if self.passes_disagree:
                lines.append(f"warning: {self._passes_text()}")
            if self.moves_stuck:
                lines.append(f"warning: {self._stuck_text()}")
        else:
            lines.append(
                f"directions: {self.n_samples}, ESS {self.ess:.3g}, top weight share "
                f"{self.top_weight_share:.2f}, mean evaluations per direction "
                f"{self.n_evals.double().mean().item():.2f}"
            )
            if self.low_ess:
                lines.append("warning: ESS is low, so the estimate is likely a lower bound")
        if self.n_failed:
            counts = {s: self.status.count(s) for s in sorted(set(self.status)) if s != "converged"}
            lines.append(f"warning: directions not converged: {counts}")
        return "\n".join(lines)

    @classmethod
    def merge(cls, results: list[VolumeResult]) -> VolumeResult:
        """Pool the directions of independent runs of the same basin (different seeds).

        The runs must share ``dim``, ``measure``, ``cutoff``, ``sigma`` and ``rtol``, and,
        where they record them, the centre (``center_sha256``) and the evaluation data
        (``data``); their seeds must differ (equal seeds would repeat the same directions).
        The pooled log-mean-exp is the estimate from all directions together. A merged result
        records its parts in ``meta["merged_seeds"]`` and cannot be resumed.
        """
        results = list(results)
        if not results:
            raise ValueError("merge needs at least one result")
        first = results[0]
        for name, of in (("center_sha256", recorded_center), ("data", _recorded_data)):
            known = {of(r) for r in results} - {None}
            if len(known) > 1:
                raise ValueError(
                    f"cannot merge results with different {name}: "
                    f"{', '.join(sorted(v[:16] + '...' for v in known))}; they measure "
                    f"different basins (another model, checkpoint or data)"
                )
        names = ("dim", "measure", "cutoff", "rtol", "method", "sigma")
        for other in results[1:]:
            name = first_difference(first.__dict__, other.__dict__, names)
            if name == "sigma":
                raise ValueError(
                    f"cannot merge results with different sigma: {first.sigma} and {other.sigma}"
                )
            if name is not None:
                raise ValueError(
                    f"cannot merge results with different {name}: "
                    f"{getattr(first, name)!r} and {getattr(other, name)!r}"
                )
        seeds = [s for r in results for s in r.meta.get("merged_seeds", [r.seed])]
        if len(set(seeds)) != len(seeds):
            raise ValueError(
                f"results share a seed ({seeds}): their directions are the same; "
                "run the parts with different seeds"
            )
        rows = [rec for r in results for rec in r.records()]
        rows = [DirectionRecord(**{**rec.__dict__, "index": i}) for i, rec in enumerate(rows)]
        meta = {"merged_seeds": seeds, "parts": [r.meta for r in results]}
        center = {recorded_center(r) for r in results} - {None}
        if center:
            meta["center_sha256"] = center.pop()
        return cls.from_records(
            rows,
            dim=first.dim,
            measure=first.measure,
            cutoff=first.cutoff,
            sigma=first.sigma,
            rtol=first.rtol,
            seed=first.seed,
            meta=meta,
            method=first.method,
            replicas=tuple(x for r in results for x in r.replicas),
        )

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        """A JSON-ready dictionary (non-finite floats written as strings)."""
        return result_file.to_dict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write the result as JSON (never pickle), atomically; nothing is left behind when
        writing fails."""
        result_file.save(self, path)

    @classmethod
    def from_dict(cls, data: dict) -> VolumeResult:
        """Inverse of :meth:`to_dict`, validating every field.

        Raises
        ------
        ResultFileError
            Naming the field that is missing, of the wrong type or out of range (an unknown
            status, arrays of different lengths, ``dim < 1``, a NaN estimate, a stored
            ``log_volume`` or ``ess`` that the estimates do not give...).
        """
        return result_file.from_dict(cls, data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> VolumeResult:
        """Read a result written by :meth:`save`.

        Raises
        ------
        ResultFileError
            When the file is not a valid results file (not JSON text, a run log, a field
            missing or out of range), naming the file and the field.
        """
        return result_file.load(cls, path)



"""The loop of importance sampling: directions searched in groups, records shared, one
result.

:func:`run_rays` takes any ray evaluator of :mod:`basin_volume.rays` (dense, or in place in
the model for large ones) and resolved :class:`~basin_volume.settings.Settings`; it runs the
warm-up directions one at a time, then groups of ``batch_size`` directions per process (see
:func:`_groups`), and reports directions that did not converge.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checks
from .distributed import gather_records, init_from_env, world
from .integrals import log_radial_integral, log_sphere_area
from .radius import RayResult, RayStatus, exact_cutoff, log_log_curvature, radius_search
from .rays import DenseRays, InPlaceRays, RayStart
from .result import DirectionRecord, VolumeResult, recorded_center, warn_every_time
from .settings import Measure, Settings, first_difference

WARMUP = 16
"""Directions whose radii seed the first guess of every later direction."""


@dataclass(frozen=True)
class _CutoffRecord(DirectionRecord):
    """A :class:`DirectionRecord` whose estimate is at the exact cutoff, with the bound (nats)
    on how far the interpolation of :func:`basin_volume.radius.exact_cutoff` could be from
    the crossing (``nan`` where no radius was interpolated), and the ray's measured log-log
    curvature (``nan`` with fewer than three evaluations)."""

    bound: float = dataclass_field(default=math.nan, compare=False)
    curvature: float = dataclass_field(default=math.nan, compare=False)


def cutoff_bounds(records: list[DirectionRecord]) -> dict:
    """``meta["cutoff_bound"]``: the per-direction bounds (nats) of the exact-cutoff estimates
    and their mean over the directions that have one (``None`` where a direction has none,
    e.g. one resumed from a file, or one that did not converge)."""
    bounds = [getattr(r, "bound", math.nan) for r in records]
    known = [b for b in bounds if math.isfinite(b)]
    return {
        "mean": statistics.fmean(known) if known else None,
        "max": max(known) if known else None,
        "per_direction": [b if math.isfinite(b) else None for b in bounds],
    }


class RadiusSearchWarning(RuntimeWarning):
    """Some directions' radius searches did not converge; see ``VolumeResult.status``."""


def run_rays(
    rays: DenseRays | InPlaceRays,
    *,
    n_samples: int,
    cutoff: float,
    measure: Measure | str,
    sigma: float | None,
    rtol: float,
    seed: int,
    progress: bool,
    max_evals: int,
    max_radius: float | None,
    callback: Callable[[DirectionRecord], None] | None,
    resume_from: VolumeResult | None,
    meta: dict,
    batch_size: int = 1,
    budget: int | None = None,
) -> VolumeResult:
    """The estimator proper, for any ray evaluator of :mod:`basin_volume.rays`.

    :func:`estimate` documents the arguments. The evaluator is restored to the centre after
    every group of directions and on any exception.
    """
    settings = Settings.resolve(
        measure=measure, n_samples=n_samples, cutoff=cutoff, rtol=rtol, max_evals=max_evals,
        seed=seed, sigma=sigma, max_radius=max_radius, dim=rays.dim, norm_c=rays.center_norm,
    )  # fmt: skip
    return run_directions(
        rays,
        settings,
        progress=progress,
        callback=callback,
        resume_from=resume_from,
        meta=meta,
        batch_size=batch_size,
        budget=budget,
    )


def run_directions(
    rays: DenseRays | InPlaceRays,
    settings: Settings,
    *,
    progress: bool,
    callback: Callable[[DirectionRecord], None] | None,
    resume_from: VolumeResult | None,
    meta: dict,
    batch_size: int = 1,
    budget: int | None = None,
) -> VolumeResult:
    """The loop proper, with settings resolved (by :meth:`Settings.resolve` on ``rays``'s
    dimension and centre norm); :func:`run_rays` resolves them first. With ``budget`` it
    stops after the first group of directions whose searches bring this call's evaluations
    to ``budget`` (every rank sees the same records, so all stop together), and the result
    holds the directions done (``meta["budget"]``)."""
    dim, norm_c = rays.dim, rays.center_norm
    measure, n_samples, sigma = settings.measure, settings.n_samples, settings.sigma
    batch_size = checks.check_positive("batch_size", batch_size, integer=True)
    center_sha256 = rays.center_sha256()
    if resume_from is not None:
        _check_resumable(resume_from, settings, dim)
        _check_same_center(resume_from, center_sha256)

    started = time.perf_counter()
    records: list[DirectionRecord] = list(resume_from.records() if resume_from else [])
    resumed, spent = len(records), 0
    init_from_env()
    rank, size = world()
    bar = tqdm(
        total=n_samples,
        initial=len(records),
        disable=not progress or rank != 0,
        desc="directions",
        unit="dir",
    )
    try:
        f0 = rays.value_at_center()
        if not math.isfinite(f0):
            raise ValueError(f"fn(center) is {f0}; the objective must be finite at the centre")
        problem = _Problem(rays, f0, dim, norm_c, settings)
        for group, shared in _groups(len(records), n_samples, rank, size, batch_size):
            state = _search_state(records[:WARMUP], problem.first_guess)
            problem.slope_spread = _slope_spread(records[:WARMUP])
            problem.curvature = _curvature_bound(records[:WARMUP])
            new = list(problem.run_group(group, *state))
            if shared and size > 1:
                new = gather_records(new)
            for record in new:
                records.append(record)
                spent += record.n_evals
                if callback is not None:
                    callback(record)
            bar.update(len(new))
            if progress and rank == 0:
                ests = torch.tensor([r.estimate for r in records], dtype=torch.float64)
                bar.set_postfix(
                    log_vol=f"{float(torch.logsumexp(ests, 0)) - math.log(len(ests)):.5g}",
                    evals=f"{sum(r.n_evals for r in records) / len(records):.2f}",
                )
            if budget is not None and spent >= budget:
                break
    finally:
        bar.close()
        rays.restore()
        rays.release()

    result = VolumeResult.from_records(
        records,
        dim=dim,
        measure=measure.value,
        cutoff=float(settings.cutoff),
        sigma=sigma,
        rtol=float(settings.rtol),
        seed=settings.seed,
        meta={
            "f0": f0,
            "center_sha256": center_sha256,
            "cutoff_bound": cutoff_bounds(records),
            **meta,
            **({} if budget is None else {"budget": {
                "budget": budget, "evals": spent, "directions": len(records) - resumed}}),
            "max_radius": settings.max_radius,
            "seconds": time.perf_counter() - started,
            "torch_version": torch.__version__,
            "basin_volume_version": _version(),
        },
    )
    if rank == 0:  # once per job, not once per process
        _warn_about(result)
    return result


def _groups(done: int, n_samples: int, rank: int, size: int, batch_size: int):
    """Yield ``(indices, shared)``: the directions this rank searches together, in order.

    Every rank runs the warm-up directions itself, one at a time (they fix the search state);
    the rest go in rounds of ``size * batch_size`` directions, rank ``r`` taking every
    ``size``-th one, and each round's records are shared with every rank (``shared``) before
    the next round starts. Generated lazily: nothing is allocated per direction up front.
    """
    for k in range(done, min(WARMUP, n_samples)):
        yield [k], False
    step = size * batch_size
    for start in range(max(done, WARMUP), n_samples, step):
        yield list(range(start + rank, min(start + step, n_samples), size)), True


def _search_state(records: list[DirectionRecord], first_guess: float) -> tuple[float, float]:
    """First radius and log-log slope for the next direction, from earlier ones.

    The median radius of the converged directions among ``records`` (radii concentrate in
    high dimension) and their median measured slope. The estimator passes the first
    :data:`WARMUP` directions only, so direction ``k``'s search depends on nothing but ``k``
    and those: resumed, reordered and sharded runs give the same result for every direction.
    """
    log_radii = [math.log(r.radius) for r in records if r.status == RayStatus.CONVERGED]
    slopes = [r.slope for r in records if math.isfinite(r.slope)]
    guess = math.exp(statistics.median(log_radii)) if log_radii else first_guess
    return guess, statistics.median(slopes) if slopes else 2.0


def _slope_spread(records: list[DirectionRecord]) -> float:
    """Relative uncertainty of the learned slope, for directions whose search stops after one
    evaluation: twice the largest relative deviation of a measured slope from their median
    (at least 0.05; 0.25 while fewer than three slopes are known)."""
    slopes = [r.slope for r in records if math.isfinite(r.slope) and r.slope > 0]
    if len(slopes) < 3:
        return 0.25
    mid = statistics.median(slopes)
    return min(0.9, max(0.05, 2 * max(abs(k - mid) for k in slopes) / mid))


def _curvature_bound(records: list[DirectionRecord]) -> float:
    """:math:`M` of :func:`~basin_volume.radius.exact_cutoff`: twice the largest
    :math:`|d^2\\log\\delta/d(\\log t)^2|` measured on ``records`` (from directions with three
    or more evaluations), and at least 1."""
    seen = [abs(c) for r in records if math.isfinite(c := getattr(r, "curvature", math.nan))]
    return max([1.0] + [2.0 * c for c in seen])


def _check_resumable(prev: VolumeResult, settings: Settings, dim: int) -> None:
    """Refuse to continue a result made with other settings (or a merged one)."""
    if "merged_seeds" in prev.meta:
        raise ValueError("resume_from is a merged result; resume one of its parts instead")
    mine = settings.as_recorded(dim)
    names = ("dim", "measure", "cutoff", "rtol", "seed", "sigma")
    name = first_difference({n: getattr(prev, n) for n in names}, mine, names)
    if name == "sigma":
        raise ValueError(f"resume_from has sigma={prev.sigma!r}, this run sigma={mine[name]!r}")
    if name is not None:
        raise ValueError(
            f"resume_from was made with {name}={getattr(prev, name)!r} but this run has "
            f"{name}={mine[name]!r}; resume with the same settings or start a new run"
        )
    if prev.n_samples > settings.n_samples:
        raise ValueError(
            f"resume_from already has {prev.n_samples} directions, more than "
            f"n_samples={settings.n_samples}"
        )


def _check_same_center(prev: VolumeResult, center_sha256: str) -> None:
    """Refuse to continue a result made around another centre (another basin)."""
    theirs = recorded_center(prev)
    if theirs is not None and theirs != center_sha256:
        raise ValueError(
            f"resume_from was made around another centre: its center_sha256 is "
            f"{theirs[:16]}..., this run's is {center_sha256[:16]}...; it is the partial "
            "result of another basin (another model, checkpoint or dtype): resume it with "
            "its own centre, or start a new run"
        )


@dataclass
class _Problem:
    """Everything fixed during a run; :meth:`run_direction` does one direction."""

    rays: DenseRays | InPlaceRays
    f0: float
    dim: int
    norm_c: float
    settings: Settings
    slope_spread: float = 0.25
    curvature: float = 1.0

    @property
    def first_guess(self) -> float:
        return self.settings.first_guess(self.dim, self.norm_c)

    def log_integral(self, radius: float, dot: float) -> float:
        """log I(omega) for a ray of length ``radius`` with omega . theta0 = ``dot``."""
        return self.log_integrals([radius], [dot])[0]

    def log_integrals(self, radii: list[float], dots: list[float]) -> list[float]:
        """:meth:`log_integral` for many rays in one vectorised call (the Gaussian radial
        integral costs the same for one ray as for hundreds, and gives each the same bits)."""
        if not radii:
            return []
        if self.settings.measure is Measure.GAUSSIAN:
            sigma = self.settings.sigma
            const = -0.5 * self.dim * math.log(2 * math.pi) - 0.5 * (self.norm_c / sigma) ** 2
            rho = np.asarray(radii, dtype=np.float64) / sigma
            beta = -np.asarray(dots, dtype=np.float64) / sigma
            values = np.atleast_1d(log_radial_integral(rho, self.dim - 1.0, 1.0, beta))
            return [const + float(v) for v in values]
        return [self.dim * math.log(r) - math.log(self.dim) if r > 0 else -math.inf for r in radii]

    def run_group(self, ks: list[int], guess: float, slope: float) -> list[DirectionRecord]:
        """Search directions ``ks`` together, evaluating their pending radii in one call."""
        starts = self.rays.start_many(ks)
        searches = [
            radius_search(
                self.settings.cutoff,
                guess=guess,
                rtol=self.settings.rtol,
                slope=slope,
                max_radius=self.settings.max_radius,
                max_evals=self.settings.max_evals,
            )
            for _ in ks
        ]
        pending = {i: next(search) for i, search in enumerate(searches)}
        rays_done: dict[int, RayResult] = {}
        while pending:
            slots = list(pending)
            values = self.rays.values_at_many([(i, pending[i]) for i in slots])
            for i, value in zip(slots, values, strict=True):
                try:
                    pending[i] = searches[i].send(value - self.f0)
                except StopIteration as stop:
                    rays_done[i] = stop.value
                    del pending[i]
        self.rays.restore()
        # Every radius whose integral is needed (the estimate's, and the ends of the exact
        # cutoff's interval), for all the group's directions in one vectorised call.
        plans = [self._radii(rays_done[i], slope) for i in range(len(ks))]
        flat = [r for plan in plans for r in plan]
        dots = [starts[i].dot for i, plan in enumerate(plans) for _ in plan]
        values = iter(self.log_integrals(flat, dots))
        return [
            self._record(k, starts[i], rays_done[i], [next(values) for _ in plans[i]])
            for i, k in enumerate(ks)
        ]

    def _radii(self, ray: RayResult, slope: float) -> list[float]:
        """``[radius]`` to integrate to, or ``[cutoff radius, low, high]`` for a converged ray
        (:func:`~basin_volume.radius.exact_cutoff`)."""
        if ray.status is RayStatus.CONVERGED:
            own = abs(log_log_curvature(ray.points, self.settings.cutoff))  # this ray's
            curvature = max(self.curvature, 2.0 * own) if math.isfinite(own) else self.curvature
            cut = exact_cutoff(ray.points, self.settings.cutoff, slope=slope,
                               slope_spread=self.slope_spread, curvature=curvature)  # fmt: skip
            if cut is not None:
                return [cut.radius, cut.low, cut.high]
        return [ray.radius if ray.status is not RayStatus.NONFINITE else 0.0]

    def _record(
        self, k: int, ray_start: RayStart, ray: RayResult, lais: list[float]
    ) -> DirectionRecord:
        """The direction's record; a converged ray's estimate is taken where delta equals the
        cutoff exactly, with the bound (nats) from the ends of its interval; ``radius`` and
        ``delta`` stay the evaluated ones."""
        radius = ray.radius if ray.status is not RayStatus.NONFINITE else 0.0
        lai, bound = lais[0], math.nan
        if len(lais) == 3:
            bound = max(abs(lais[1] - lai), abs(lais[2] - lai))
        return _CutoffRecord(
            index=k,
            estimate=log_sphere_area(self.dim) + lai - self.dim * math.log(ray_start.prop),
            delta=ray.delta,
            prop=ray_start.prop,
            radius=radius,
            logabsint=lai,
            n_evals=ray.n_evals,
            status=ray.status.value,
            slope=ray.slope,
            bound=bound,
            curvature=log_log_curvature(ray.points, self.settings.cutoff),
        )


def _version() -> str:
    from . import __version__

    return __version__


_WHY = {
    "nonfinite": "nonfinite (radius 0, no mass): delta was NaN or inf at every radius tried",
    "narrow": "nonfinite (radius 0, no mass): delta stayed above the cutoff down to radii "
    "where theta0 + t*omega rounds to theta0 in the centre's dtype, so the basin is narrower "
    "than float resolution along them (raise the cutoff, or use float64)",
    "unbounded": "unbounded: delta stayed below the cutoff up to max_radius (radius inf)",
    "max_evals": "max_evals: the evaluation budget ran out (the best bracket end is kept)",
    "discontinuous": "discontinuous: delta jumps across the cutoff within float resolution "
    "(the inner radius is kept)",
}


def _failures(result: VolumeResult) -> list[str]:
    """One line per way directions failed: why, and which directions."""
    groups: dict[str, list[int]] = {}
    for k, status in enumerate(result.status):
        if status == RayStatus.CONVERGED:
            continue
        if status == RayStatus.NONFINITE and math.isfinite(float(result.deltas[k])):
            status = "narrow"  # the last finite delta was above the cutoff
        groups.setdefault(status, []).append(k)
    lines = []
    for status, ks in groups.items():
        shown = ", ".join(map(str, ks[:10])) + (f", ... ({len(ks)} in all)" if len(ks) > 10 else "")
        lines.append(f"{_WHY.get(status, status)} [directions {shown}]")
    return lines


def _warn_about(result: VolumeResult) -> None:
    if result.n_failed:
        counts = {s: result.status.count(s) for s in set(result.status) if s != "converged"}
        hint = (
            "; unbounded rays make the uniform volume infinite"
            if result.measure == "uniform" and "unbounded" in counts
            else ""
        )
        warn_every_time(
            f"{result.n_failed} of {result.n_samples} directions did not converge {counts}; "
            f"they are included with the radius found (see result.status){hint}: "
            + "; ".join(_failures(result)),
            RadiusSearchWarning,
            stacklevel=3,
        )
    result.warn_if_unreliable(stacklevel=3)

"""Sweeps: one run per checkpoint or setting, with a summary table."""

from __future__ import annotations

import inspect
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import VolumeConfig
from ..distributed import from_rank0, init_from_env, world
from ..estimator import estimate
from ..jsonfloat import jsonable
from ..result import VolumeResult
from ..volume_estimator import VolumeEstimator
from .jobs import Source
from .run import run_to_file


# ---------------------------------------------------------------------------- scans
def _source_n_samples(source: Any) -> int | None:
    if isinstance(source, VolumeEstimator):
        return source.config.n_samples
    if isinstance(source, VolumeConfig):
        return source.n_samples
    if isinstance(source, Mapping):
        return source.get("n_samples", inspect.signature(estimate).parameters["n_samples"].default)
    return getattr(source, "n_samples", None)  # a lazy source may say how many it will run


def scan(
    sources: Sequence[Source | Callable[[], Source]],
    output_dir: str | os.PathLike,
    *,
    values: Sequence[float] | None = None,
    axis: str = "cutoff",
    names: Sequence[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    plot: bool = True,
    spec: Mapping[str, Any] | None = None,
) -> list[dict]:
    """The same estimate over checkpoints or cutoffs: one results file each and a summary.

    Parameters
    ----------
    sources : sequence
        One entry per point: a :data:`Source` (see :func:`run_to_file`), or a function of no
        arguments returning one, called only when that point has to run (so checkpoints are
        loaded one at a time; give the function an ``n_samples`` attribute to let ``resume``
        extend finished points that have fewer directions).
    output_dir : path-like
        Receives ``<name>.json`` (and its run log) per point, ``scan.json`` (the summary
        table) and ``scan.png`` (log probability against the scanned value).
    values : sequence of float, optional
        The x value of each point (training step or cutoff). Default: each source's cutoff
        for ``axis="cutoff"``, else ``0, 1, 2, ...``.
    axis : {"cutoff", "step"} or str
        What ``values`` are; names the plot's x axis (``"cutoff"`` is drawn on a log scale).
    names : sequence of str, optional
        File names (without ``.json``). Default: ``"{axis}_{value:g}"``.
    resume : bool
        Keep finished points (a results file with at least the requested directions) and
        continue unfinished ones from their run logs.
    overwrite : bool
        Recompute every point.
    plot : bool
        Write ``scan.png``.
    spec : mapping, optional
        Passed to :func:`run_to_file` for every point (with ``axis`` and the value added).

    Returns
    -------
    list of dict
        One row per point: ``name``, ``axis``, ``value``, ``file``, ``log_volume``, ``low``,
        ``high`` (95% bootstrap interval), ``ess``, ``n_samples``, ``measure``, ``cutoff``.
    """
    sources = list(sources)
    if not sources:
        raise ValueError("sources is empty: give at least one checkpoint or cutoff to scan")
    if values is None:
        if axis == "cutoff":
            values = [_source_cutoff(s) for s in sources]
        else:
            values = list(range(len(sources)))
    values = [float(v) for v in values]
    if len(values) != len(sources):
        raise ValueError(f"values has {len(values)} entries for {len(sources)} sources")
    names = list(names) if names is not None else [f"{axis}_{v:g}" for v in values]
    if len(names) != len(sources) or len(set(names)) != len(names):
        raise ValueError(f"names must be {len(sources)} distinct file names, got {names}")
    out_dir = Path(output_dir)
    init_from_env()
    rank, _ = world()  # under torchrun rank 0 alone reads and writes files
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for source, value, name in zip(sources, values, names, strict=True):
        path = out_dir / f"{name}.json"
        wanted = _source_n_samples(source)

        def finished(path=path, wanted=wanted) -> VolumeResult | None:
            if resume and path.exists():
                done = VolumeResult.load(path)
                if wanted is None or done.n_samples >= wanted:
                    return done
            return None

        result = from_rank0(finished)
        if result is None:
            if not isinstance(source, VolumeConfig | VolumeEstimator | Mapping):
                source = source()
            result = run_to_file(
                source,
                path,
                resume=resume,
                overwrite=overwrite,
                spec={**(spec or {}), "scan_axis": axis, "scan_value": value},
            )
        rows.append(_summary_row(result, name=name, axis=axis, value=value, file=path))
    if rank != 0:
        return rows
    with open(out_dir / "scan.json", "w") as fh:
        json.dump(jsonable({"axis": axis, "rows": rows}), fh, indent=1)
    if plot:
        from ..plots import plot_scan

        plot_scan(rows, out_dir / "scan.png", axis=axis)
    return rows


def _source_cutoff(source: Any) -> float:
    if isinstance(source, VolumeEstimator):
        return source.config.cutoff
    if isinstance(source, VolumeConfig):
        return source.cutoff
    if isinstance(source, Mapping) and "cutoff" in source:
        return source["cutoff"]
    raise ValueError("pass values=[...]: the cutoff of a lazily built source is not known")


def _summary_row(result: VolumeResult, **extra: Any) -> dict:
    from ..result import LowESSWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LowESSWarning)
        low, high = result.interval(0.95) if result.n_samples >= 2 else (-math.inf, math.inf)
    return {
        **{k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in extra.items()},
        "log_volume": result.log_volume,
        "low": low,
        "high": high,
        "ess": result.ess,
        "n_samples": result.n_samples,
        "measure": result.measure,
        "cutoff": result.cutoff,
    }

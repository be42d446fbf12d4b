r"""Plots of results files (matplotlib, Agg backend, imported only when a plot is drawn).

:func:`plot_results` draws, for one or several results side by side:

1. the histogram of the per-direction log estimates :math:`\ell_k` with the aggregate
   :math:`\log\frac1n\sum_k e^{\ell_k}` marked: the aggregate sits near the largest
   :math:`\ell_k`, and the gap between that and the bulk shows how heavy-tailed the weights are;
2. the running log-mean-exp of the first :math:`n` directions against :math:`n`, with its
   bootstrap interval: a curve that still jumps upward at the right edge has not converged;
3. the distribution of the radii :math:`r(\omega_k)` (parameter-space distance to the basin's
   edge; log scale when they span a decade or more).

:func:`plot_scan` draws log probability against training step or cutoff. :func:`compare_results`
makes the comparison table of ``basin-volume compare``. All log quantities are natural logs, in
nats.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .result import LowESSWarning, VolumeResult

__all__ = ["compare_results", "format_comparison", "plot_results", "plot_scan"]

_LN10 = math.log(10.0)
_LOW_ESS = 5.0


def _pyplot():
    """pyplot on the Agg backend, unless the caller already chose a backend by importing it."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _as_results(
    results: VolumeResult | str | os.PathLike | Sequence[VolumeResult | str | os.PathLike],
    labels: Sequence[str] | None,
) -> tuple[list[VolumeResult], list[str]]:
    from .runfile import load_result

    if isinstance(results, VolumeResult | str | os.PathLike):
        results = [results]
    loaded, names = [], []
    for k, item in enumerate(results):
        if isinstance(item, VolumeResult):
            loaded.append(item)
            names.append(f"result {k + 1}")
        else:
            loaded.append(load_result(item))
            path = Path(item)
            names.append(path.name.removesuffix(".records.jsonl").removesuffix(".json"))
    if labels is not None:
        labels = list(labels)
        if len(labels) != len(loaded):
            raise ValueError(f"labels has {len(labels)} entries for {len(loaded)} results")
        names = labels
    if not loaded:
        raise ValueError("no results to plot: give at least one results file")
    return loaded, names


def _what(results: Sequence[VolumeResult]) -> str:
    measures = {r.measure for r in results}
    if measures == {"gaussian"}:
        return "log probability"
    if measures == {"uniform"}:
        return "log volume"
    return "log probability / log volume"


def _plain_log(axis) -> None:
    """Plain numbers (0.3, 4, 50) on a log axis, minor ticks too when it spans under a decade."""
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(fmt)
    low, high = axis.get_view_interval()
    if low > 0 and high / low < 10:
        axis.set_minor_formatter(fmt)


def _plain(axis) -> None:
    """Full tick numbers: no '1e4' multipliers or '+offset' that hide the nats."""
    from matplotlib.ticker import ScalarFormatter

    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    axis.set_major_formatter(formatter)


def running_logmeanexp(
    estimates: torch.Tensor,
    *,
    level: float = 0.95,
    n_boot: int = 200,
    n_points: int = 60,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-mean-exp of the first ``n`` estimates with a bootstrap band, on a grid of ``n``.

    Parameters
    ----------
    estimates : torch.Tensor
        Per-direction log estimates, in run order.
    level : float
        Coverage of the percentile bootstrap band.
    n_boot : int
        Bootstrap resamples per grid point.
    n_points : int
        Grid points (``n`` spaced evenly from 1 to all directions).
    seed : int
        Seed of the resampling.

    Returns
    -------
    (n, value, low, high) : tensors
        ``low`` and ``high`` equal ``value`` where ``n < 2``.
    """
    est = estimates.double()
    total = est.numel()
    grid = torch.unique(torch.linspace(1, total, min(n_points, total)).round().long())
    gen = torch.Generator().manual_seed(seed)
    values, lows, highs = [], [], []
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    for n in grid.tolist():
        prefix = est[:n]
        value = torch.logsumexp(prefix, 0) - math.log(n)
        values.append(value)
        if n < 2 or not bool(torch.isfinite(prefix).all()):
            lows.append(value)
            highs.append(value)
            continue
        idx = torch.randint(0, n, (n_boot, n), generator=gen)
        boots = torch.logsumexp(prefix[idx], dim=1) - math.log(n)
        lo, hi = torch.quantile(boots, q)
        lows.append(lo)
        highs.append(hi)
    return grid, torch.stack(values), torch.stack(lows), torch.stack(highs)


def plot_results(
    results: VolumeResult | str | os.PathLike | Sequence[VolumeResult | str | os.PathLike],
    output: str | os.PathLike | None = None,
    *,
    labels: Sequence[str] | None = None,
    level: float = 0.95,
    bins: int = 30,
    title: str | None = None,
):
    """Histogram of estimates, running log-mean-exp with its band, and radii, per result.

    Parameters
    ----------
    results : VolumeResult, path, or a sequence of them
        Results, results files (``.json``) or run logs (``.records.jsonl``, also of a run
        still going).
    output : path-like, optional
        Write the figure there (PNG, PDF or SVG by extension).
    labels : sequence of str, optional
        Legend names; default the file names.
    level : float
        Coverage of the bootstrap band.
    bins : int
        Histogram bins.
    title : str, optional
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    results, names = _as_results(results, labels)
    what = _what(results)
    fig, (ax_hist, ax_run, ax_rad) = plt.subplots(1, 3, figsize=(16, 5), layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    finite_all = torch.cat([r.estimates[torch.isfinite(r.estimates)] for r in results])
    edges = None
    if finite_all.numel():
        lo, hi = float(finite_all.min()), float(finite_all.max())
        if hi - lo < 1e-9 * max(1.0, abs(hi)):
            lo, hi = lo - 0.5, hi + 0.5
        edges = torch.linspace(lo, hi, bins + 1).tolist()
    r_edges, log_radii = _radius_bins(results, bins)

    for k, (res, name) in enumerate(zip(results, names, strict=True)):
        color = colors[k % len(colors)]
        est = res.estimates
        finite = est[torch.isfinite(est)]
        agg = res.log_volume
        ess = res.ess
        tag = f"{name}: {agg:.6g} nats, ESS {ess:.3g} of {res.n_samples}"
        # 1. per-direction estimates
        if edges is not None and finite.numel():
            ax_hist.hist(finite.tolist(), bins=edges, color=color, alpha=0.45, label=tag)
        if math.isfinite(agg):
            ax_hist.axvline(agg, color=color, lw=2, ls="--")
        # 2. running log-mean-exp with its bootstrap band
        n, value, low, high = running_logmeanexp(est, level=level)
        ax_run.plot(n.tolist(), value.tolist(), color=color, lw=1.8, label=tag)
        ax_run.fill_between(n.tolist(), low.tolist(), high.tolist(), color=color, alpha=0.2)
        # 3. radii
        radii = res.radii
        finite_r = radii[torch.isfinite(radii) & (radii > 0)]
        if r_edges is not None and finite_r.numel():
            n_inf = int(torch.isinf(radii).sum())
            n_other = res.n_failed - res.status.count("unbounded")
            extra = f", {n_inf} unbounded (not shown)" if n_inf else ""
            extra += f", {n_other} not converged" if n_other > 0 else ""
            ax_rad.hist(
                finite_r.tolist(), bins=r_edges, color=color, alpha=0.45, label=f"{name}{extra}"
            )

    ax_hist.set_xlabel("per-direction log estimate $\\ell_k$ (nats)")
    ax_hist.set_ylabel("directions")
    ax_hist.set_title(f"Per-direction estimates; dashed: aggregate {what}")
    _plain(ax_hist.xaxis)
    ax_run.set_xlabel("number of directions n")
    ax_run.set_ylabel(f"{what} of the first n directions (nats)")
    ax_run.set_title(f"Running log-mean-exp, {100 * level:g}% bootstrap band")
    _plain(ax_run.yaxis)
    if log_radii:
        ax_rad.set_xscale("log")
        _plain_log(ax_rad.xaxis)
    for ax in (ax_hist, ax_rad):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_rad.set_xlabel("radius $r(\\omega)$ to the basin's edge (parameter units)")
    ax_rad.set_ylabel("directions")
    ax_rad.set_title("Radii")
    for ax in (ax_hist, ax_run, ax_rad):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", loc="best")
    low_ess = [n for r, n in zip(results, names, strict=True) if _low_ess(r)]
    heading = title or _default_title(results, what)
    if low_ess:
        heading += (
            f"\nESS < {_LOW_ESS:g} for {', '.join(low_ess)}: a few directions carry the weight, "
            "so the estimate is likely a lower bound"
        )
    fig.suptitle(heading)
    if output is not None:
        fig.savefig(output, dpi=110)
    return fig


def _radius_bins(results: Sequence[VolumeResult], bins: int) -> tuple[list | None, bool]:
    """Common radius bin edges: logarithmic when the radii span a decade or more."""
    finite = torch.cat([r.radii[torch.isfinite(r.radii) & (r.radii > 0)] for r in results])
    if not finite.numel():
        return None, False
    lo, hi = float(finite.min()), float(finite.max())
    if hi / lo < 1.0001:
        lo, hi = lo / 1.05, hi * 1.05
    if hi / lo >= 10:
        return torch.logspace(math.log10(lo), math.log10(hi), bins + 1).tolist(), True
    return torch.linspace(lo, hi, bins + 1).tolist(), False


def _low_ess(result: VolumeResult) -> bool:
    return result.n_samples >= 2 and result.ess < min(_LOW_ESS, 0.5 * result.n_samples)


def _default_title(results: Sequence[VolumeResult], what: str) -> str:
    cutoffs = sorted({r.cutoff for r in results})
    cut = ", ".join(f"{c:g}" for c in cutoffs)
    dims = ", ".join(str(d) for d in sorted({r.dim for r in results}))
    return f"Basin {what} (cutoff {cut} nats, D = {dims})"


def plot_scan(
    rows: Sequence[dict] | str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    axis: str | None = None,
    title: str | None = None,
):
    """Log probability (or log volume) against training step or cutoff, with intervals.

    Parameters
    ----------
    rows : sequence of dict or path-like
        The rows returned by :func:`basin_volume.runfile.scan`, or its ``scan.json``.
    output : path-like, optional
        Write the figure there.
    axis : str, optional
        ``"step"`` or ``"cutoff"`` (drawn on a log scale); default taken from the rows.
    title : str, optional
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure

    Notes
    -----
    Points whose effective sample size is below 5 are drawn hollow: their estimate is likely a
    lower bound and their interval too narrow.
    """
    import json

    plt = _pyplot()
    if isinstance(rows, str | os.PathLike):
        with open(rows) as fh:
            data = json.load(fh)
        axis = axis or data.get("axis")
        rows = data["rows"]
    rows = sorted(rows, key=lambda r: float(r["value"]))
    if not rows:
        raise ValueError("no scan rows to plot")
    axis = axis or rows[0].get("axis", "step")
    x = [float(r["value"]) for r in rows]
    y = [float(r["log_volume"]) for r in rows]
    low = [float(r["low"]) for r in rows]
    high = [float(r["high"]) for r in rows]
    measures = {r.get("measure", "gaussian") for r in rows}
    what = "log probability" if measures == {"gaussian"} else "log volume"
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    ax.plot(x, y, color="C0", lw=1.5, zorder=1)
    for xi, yi, lo, hi, row in zip(x, y, low, high, rows, strict=True):
        if math.isfinite(lo) and math.isfinite(hi):
            ax.plot([xi, xi], [lo, hi], color="C0", lw=1, alpha=0.6, zorder=1)
        weak = float(row.get("ess", math.inf)) < min(_LOW_ESS, 0.5 * int(row.get("n_samples", 0)))
        ax.scatter([xi], [yi], s=40, zorder=2, color="white" if weak else "C0", edgecolors="C0")
    handles = [
        plt.Line2D([], [], marker="o", ls="", color="C0", label="estimate, 95% interval"),
        plt.Line2D(
            [],
            [],
            marker="o",
            ls="",
            markerfacecolor="white",
            color="C0",
            label=f"ESS < {_LOW_ESS:g}: likely a lower bound",
        ),
    ]
    ax.legend(handles=handles, fontsize="small", loc="best")
    if axis == "cutoff":
        ax.set_xscale("log")
        ax.set_xlabel("cutoff $\\varepsilon$ (nats)")
    elif axis == "step":
        positive = [v for v in x if v > 0]
        if len(positive) == len(x) and max(x) / min(x) > 100:
            ax.set_xscale("log")
        ax.set_xlabel("training step")
    else:
        ax.set_xlabel(axis)
    ax.set_ylabel(f"{what} of the basin (nats)")
    _plain(ax.yaxis)
    ax.grid(alpha=0.3)
    secondary = ax.secondary_yaxis("right", functions=(lambda v: v / _LN10, lambda v: v * _LN10))
    secondary.set_ylabel(f"{what} (log10)")
    _plain(secondary.yaxis)
    ax.set_title(title or f"Basin {what} against {axis}")
    if output is not None:
        fig.savefig(output, dpi=110)
    return fig


def compare_results(
    results: VolumeResult | str | os.PathLike | Sequence[VolumeResult | str | os.PathLike],
    *,
    labels: Sequence[str] | None = None,
    reference: int = 0,
    level: float = 0.95,
) -> list[dict[str, Any]]:
    """One row per result: log_volume, interval, ESS, n and its difference from a reference.

    Parameters
    ----------
    results : VolumeResult, path, or a sequence of them
        Results or results files (``.json`` or run logs).
    labels : sequence of str, optional
        Row names; default the file names.
    reference : int
        Index of the result the differences are taken from.
    level : float
        Coverage of the bootstrap intervals.

    Returns
    -------
    list of dict
        Keys ``label``, ``measure``, ``cutoff``, ``dim``, ``n_samples``, ``log_volume``,
        ``log10_volume``, ``low``, ``high``, ``ess``, ``top_weight_share``, ``n_failed``,
        ``diff_nats`` and ``diff_log10`` (this minus the reference), ``low_ess``.
    """
    results, names = _as_results(results, labels)
    if not -len(results) <= reference < len(results):
        raise ValueError(f"reference must index one of the {len(results)} results")
    ref = results[reference].log_volume
    rows = []
    for res, name in zip(results, names, strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LowESSWarning)
            low, high = res.interval(level)
        diff = res.log_volume - ref
        rows.append(
            {
                "label": name,
                "measure": res.measure,
                "cutoff": res.cutoff,
                "dim": res.dim,
                "n_samples": res.n_samples,
                "log_volume": res.log_volume,
                "log10_volume": res.log10_volume,
                "low": low,
                "high": high,
                "ess": res.ess,
                "top_weight_share": res.top_weight_share,
                "n_failed": res.n_failed,
                "diff_nats": diff,
                "diff_log10": diff / _LN10,
                "low_ess": _low_ess(res),
            }
        )
    return rows


def format_comparison(
    rows: Sequence[dict[str, Any]], *, reference: int = 0, varied: Sequence[str] = ()
) -> str:
    """The rows of :func:`compare_results` as a text table with notes below it.

    Parameters
    ----------
    rows : sequence of dict
        From :func:`compare_results`.
    reference : int
        Which row the differences were taken from (named in the header).
    varied : sequence of str
        Settings meant to differ (``"cutoff"`` in a cutoff scan): no note about them.

    Returns
    -------
    str
    """
    header = [
        "result",
        "n",
        "log_volume (nats)",
        "95% interval (nats)",
        "ESS",
        "diff (nats)",
        "diff (log10)",
    ]
    table = [header]
    for row in rows:
        mark = " *" if row["low_ess"] else ""
        table.append(
            [
                str(row["label"]),
                str(row["n_samples"]),
                f"{row['log_volume']:.6g}",
                f"[{row['low']:.6g}, {row['high']:.6g}]",
                f"{row['ess']:.3g}{mark}",
                f"{row['diff_nats']:+.6g}",
                f"{row['diff_log10']:+.6g}",
            ]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"differences are against {rows[reference]['label']!r}"]
    if any(row["low_ess"] for row in rows):
        notes.append(
            f"* ESS < {_LOW_ESS:g}: one or two directions carry the weight, so that estimate is "
            "likely a lower bound and its interval too narrow"
        )
    for key, what in (("measure", "measures"), ("cutoff", "cutoffs"), ("dim", "dimensions")):
        if key not in varied and len({row[key] for row in rows}) > 1:
            notes.append(f"note: the results have different {what}; differences mix them")
    failed = [row["label"] for row in rows if row["n_failed"]]
    if failed:
        notes.append(f"note: directions not converged in {', '.join(map(str, failed))}")
    return "\n".join(lines + [""] + notes)

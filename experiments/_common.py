"""Shared pieces of the laptop-scale experiments: settings, estimates, intervals, output.

Every experiment script imports this module (it sits beside them, so ``python
experiments/<name>.py`` finds it). Nothing here is part of the library.

Conventions
-----------
* The digits MLP is ``basin_volume.digits.train_digits_mlp`` with its defaults: 64 -> 64 GELU
  -> 10 (D = 4810), full-batch Adam for 1000 steps, lr 1e-2, L2 penalty (Adam's coupled
  weight decay) 1e-4, 1024 training digits.
* Its basin is the KL basin on the (clean) training inputs, cutoff 1e-2 nats unless said.
* The Gaussian prior's sigma is the **initialisation scale**: the RMS of the network's
  parameters at step 0 (for the digits MLP, PyTorch's default uniform init with fan-in 64,
  about 1/sqrt(3 * 64) = 0.072). So the estimate is the probability that a network drawn
  like its initialisation (but Gaussian) lands in the basin. The sigma the L2 penalty implies
  (a prior N(0, 1/(lambda N)), sigma = 3.125) is the second prior of every digits experiment.
* Experiments 2-4 report for each basin the highest of four proposals (:func:`best_of`):
  naive, the diagonal Fisher with the prior eps, and that Fisher stretched toward the origin
  (:class:`basin_volume.preconditioners.OriginStretch`, x30 and x100). All are unbiased for
  P, so the highest is the least underestimated.
* Differences are "significant" only when both the 95% bootstrap interval of the difference
  (directions resampled within each estimate) and the 95% t-interval over seeds exclude 0.
  With an effective sample size near 1 the bootstrap interval is too narrow (no resample can
  exceed the largest observed direction), which is why the seed spread is required as well.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

import basin_volume as bv
from basin_volume.result import VolumeResult

REPO = Path(__file__).resolve().parents[1]
FIGURES = REPO / "docs" / "figures"
RESULTS = REPO / "results" / "experiments"
CUTOFF = 1e-2


# --------------------------------------------------------------------------- command line


def parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The options every experiment has: ``--quick`` and where outputs go."""
    p = argparse.ArgumentParser(
        prog=f"python experiments/{name}.py",
        description=doc.strip().splitlines()[0],
        epilog="Writes <figures-dir>/" + name + ".png, and under <results-dir> one "
        "VolumeResult JSON per estimate and summary.json (the printed numbers).",
    )
    p.add_argument("--quick", action="store_true", help="a few-second smoke version")
    p.add_argument("--figures-dir", type=Path, default=FIGURES, help="default: docs/figures")
    p.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help=f"VolumeResult files (default: results/experiments/{name}, git-ignored)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: these models are tiny and a shared 2-core machine "
        "runs their small products fastest on one thread)",
    )
    return p


def setup(args: argparse.Namespace, name: str) -> tuple[Path, Path]:
    """Apply ``--threads``, silence the expected warnings, create the output folders."""
    torch.set_num_threads(args.threads)
    # ESS ~ 1 and unbounded rays are expected here and are reported in the tables instead.
    warnings.simplefilter("ignore", bv.LowESSWarning)
    warnings.simplefilter("ignore", bv.RadiusSearchWarning)
    figures = Path(args.figures_dir)
    results = Path(args.results_dir) if args.results_dir is not None else RESULTS / name
    figures.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    return figures, results


class Clock:
    """Wall-clock seconds since construction."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


def benchmark(name: str = "preconditioners"):
    """``benchmarks/<name>.py`` as a module (its helpers are shared, not copied)."""
    path = REPO / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- models


def digits_init_sigma(seed: int, hidden: int = 64) -> float:
    """RMS of the digits MLP's parameters at initialisation (step 0) under ``seed``."""
    from basin_volume.digits import make_digits_mlp

    model = make_digits_mlp(hidden, seed=seed)
    vec = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    return float(vec.norm()) / math.sqrt(vec.numel())


def l2_sigma(weight_decay: float, n_train: int) -> float:
    """sigma of the prior N(0, sigma^2 I) that the L2 penalty (lambda/2)|theta|^2 on the mean
    loss corresponds to: 1/sqrt(lambda N)."""
    return 1.0 / math.sqrt(weight_decay * n_train)


def rms(vec: torch.Tensor) -> float:
    return float(vec.double().norm()) / math.sqrt(vec.numel())


# --------------------------------------------------------------------------- estimates


def estimate_seeds(
    fn, center, *, seeds: Sequence[int], n_samples: int, save: Path | None = None, **kwargs
) -> tuple[VolumeResult, list[VolumeResult]]:
    """``bv.estimate`` once per direction seed; returns (pooled result, per-seed results).

    The pooled result (``VolumeResult.merge``) is written to ``save`` if given.
    """
    parts = [
        bv.estimate(fn, center, n_samples=n_samples, seed=s, progress=False, **kwargs)
        for s in seeds
    ]
    pooled = VolumeResult.merge(parts)
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        pooled.save(save)
    return pooled, parts


def save(result: VolumeResult, path: Path) -> None:
    """``result.save(path)``, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    result.save(path)


def _boot(result: VolumeResult, n_boot: int, gen: torch.Generator) -> torch.Tensor:
    n = result.n_samples
    idx = torch.randint(0, n, (n_boot, n), generator=gen)
    return torch.logsumexp(result.estimates[idx], dim=1) - math.log(n)


def diff_interval(
    a: VolumeResult, b: VolumeResult, level: float = 0.95, *, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``b.log_volume - a.log_volume``.

    Directions are resampled within each result independently (as in
    ``VolumeResult.interval``). Like that interval it is too narrow when the ESS is near 1.
    """
    if not (math.isfinite(a.log_volume) and math.isfinite(b.log_volume)):
        return (math.nan, math.nan)
    gen = torch.Generator().manual_seed(seed)
    d = _boot(b, n_boot, gen) - _boot(a, n_boot, gen)
    d = d[torch.isfinite(d)]
    q = torch.quantile(d, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=d.dtype))
    return float(q[0]), float(q[1])


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, sd, low, high): Student-t interval for the mean of ``values``."""
    from scipy.stats import t

    vals = [float(v) for v in values]
    mean = statistics.fmean(vals)
    if len(vals) < 2 or not all(math.isfinite(v) for v in vals):
        return mean, math.nan, math.nan, math.nan
    sd = statistics.stdev(vals)
    half = float(t.ppf((1 + level) / 2, len(vals) - 1)) * sd / math.sqrt(len(vals))
    return mean, sd, mean - half, mean + half


def verdict(boot: tuple[float, float], tint: tuple[float, float]) -> str:
    """'higher' / 'lower' when both intervals exclude 0 on the same side, else 'n.s.'."""
    lo = (boot[0], tint[0])
    hi = (boot[1], tint[1])
    if all(math.isfinite(x) for x in lo + hi):
        if min(lo) > 0:
            return "higher"
        if max(hi) < 0:
            return "lower"
    return "n.s."


def compare(
    base: tuple[VolumeResult, list[VolumeResult]],
    other: tuple[VolumeResult, list[VolumeResult]],
    *,
    paired: bool = True,
) -> dict:
    """``other - base`` in log-probability: pooled difference, its bootstrap interval, the
    t-interval over seeds (of the seed-by-seed differences if ``paired``, else Welch's
    interval for two independent samples) and the verdict.

    Each argument is ``(pooled result, per-seed results)`` as from :func:`estimate_seeds`.
    """
    (pa, parts_a), (pb, parts_b) = base, other
    diff = pb.log_volume - pa.log_volume
    boot = diff_interval(pa, pb)
    if paired:
        per = [b.log_volume - a.log_volume for a, b in zip(parts_a, parts_b, strict=True)]
        mean, sd, lo, hi = t_interval(per)
    else:
        mean, sd, lo, hi = welch_interval(
            [r.log_volume for r in parts_b], [r.log_volume for r in parts_a]
        )
    return {
        "diff": diff,
        "boot_low": boot[0],
        "boot_high": boot[1],
        "seed_mean": mean,
        "seed_sd": sd,
        "t_low": lo,
        "t_high": hi,
        "verdict": verdict(boot, (lo, hi)),
    }


def welch_interval(
    b: Sequence[float], a: Sequence[float], level: float = 0.95
) -> tuple[float, float, float, float]:
    """(mean difference, pooled sd, low, high): Welch t-interval of mean(b) - mean(a)."""
    from scipy.stats import t

    b, a = [float(x) for x in b], [float(x) for x in a]
    diff = statistics.fmean(b) - statistics.fmean(a)
    if min(len(a), len(b)) < 2 or not all(math.isfinite(x) for x in a + b):
        return diff, math.nan, math.nan, math.nan
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, 0.0, diff, diff
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(t.ppf((1 + level) / 2, dof)) * se
    return diff, se, diff - half, diff + half


def verdict_models(
    boots: Sequence[tuple[float, float]],
    tint: tuple[float, float],
    *,
    higher: str = "higher",
    lower: str = "lower",
) -> str:
    """Verdict over several models: ``higher``/``lower`` only when the t-interval over models
    and every model's own bootstrap interval exclude 0 on the same side (with one model, its
    bootstrap interval alone)."""
    if len(boots) < 2:
        tint = boots[0]
    vals = [*boots, tint]
    if not all(math.isfinite(x) for b in vals for x in b):
        return "n.s."
    if all(b[0] > 0 for b in vals):
        return higher
    if all(b[1] < 0 for b in vals):
        return lower
    return "n.s."


PROPOSALS = ("naive", "fisher", "fisher+origin30", "fisher+origin100")
"""The proposals of :func:`best_of`: isotropic, diagonal Fisher with the prior eps, and the
latter composed with :class:`~basin_volume.preconditioners.OriginStretch` of stretch
30 and 100."""


SHORT = {"naive": "n", "fisher": "f", "fisher+origin30": "fo30", "fisher+origin100": "fo100"}


def best_of(
    fn, center, fdiag, sigma, *, seeds, n_samples, save_to: Path, cutoff: float = CUTOFF
) -> dict:
    """Estimates of one basin with each of :data:`PROPOSALS`, each pooled over ``seeds``; the
    highest pooled log P is reported as ``log_p`` (``best`` names the proposal).

    All are unbiased estimates of P, so the highest is the least underestimated: by Markov's
    inequality the largest of k exceeds the truth by X nats with probability at most k e^-X.
    ``norm_term`` is ``|center|^2 / (2 sigma^2)``, the part of -log P that only says how far
    the centre is from the prior's mean.
    """
    from basin_volume.preconditioners import OriginStretch, prior_eps

    eta = prior_eps(cutoff, sigma, center.numel())
    fisher = 1.0 / (fdiag.sqrt() + eta)
    pres = {
        "naive": None,
        "fisher": fisher,
        "fisher+origin30": OriginStretch(center, 30, base=fisher),
        "fisher+origin100": OriginStretch(center, 100, base=fisher),
    }
    out, pooled_by = {}, {}
    for label, pre in pres.items():
        pooled, parts = estimate_seeds(
            fn,
            center,
            seeds=seeds,
            n_samples=n_samples,
            save=save_to / f"{label}.json",
            cutoff=cutoff,
            sigma=sigma,
            preconditioner=pre,
        )
        out[label] = {**result_row(pooled), "per_seed": [r.log_volume for r in parts]}
        pooled_by[label] = pooled
    best = max(out, key=lambda k: out[k]["log_p"])
    norm2 = float(center.double().square().sum())
    return {
        **out,
        "best": best,
        "log_p": out[best]["log_p"],
        "info": -out[best]["log_p"],
        "ess": out[best]["ess"],
        "norm_term": norm2 / (2 * sigma * sigma),
        "rms": math.sqrt(norm2 / center.numel()),
        "_pooled": pooled_by[best],
    }


def status_counts(result: VolumeResult) -> dict[str, int]:
    return {s: result.status.count(s) for s in sorted(set(result.status)) if s != "converged"}


def result_row(result: VolumeResult) -> dict:
    """The numbers kept for one pooled estimate."""
    lo, hi = result.interval(0.95)
    return {
        "log_p": result.log_volume,
        "low": lo,
        "high": hi,
        "ess": result.ess,
        "top_share": result.top_weight_share,
        "n": result.n_samples,
        "evals_per_dir": float(result.n_evals.double().mean()),
        "not_converged": status_counts(result),
    }


# --------------------------------------------------------------------------- output


def f(x: float, spec: str = ".1f") -> str:
    """Format a float, writing non-finite values plainly."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("+inf" if x > 0 else "-inf")
    return format(x, spec)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text table, first column left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return os.fspath(x)
    return x


def finish(summary: dict, clock, results: Path, figure_path: Path, figure) -> dict:
    """Time the run, write ``summary.json`` and the figure, say where; return ``summary``."""
    summary["seconds"] = clock()
    write_summary(results / "summary.json", summary)
    figure(summary, figure_path)
    print(f"\ntotal {clock():.0f} s; figure {figure_path}")
    return summary


def write_summary(path: Path, data: dict) -> None:
    """The numbers of a run as JSON (non-finite floats as strings)."""
    path.write_text(json.dumps(_jsonable(data), indent=1) + "\n")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

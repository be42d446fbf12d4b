"""Finding 4: for small cutoffs log P grows like (D/2) log(cutoff).

Near the centre the KL basin is quadratic, delta ~ 1/2 (theta - theta0)^T F (theta - theta0),
so every radius scales like sqrt(cutoff) and, while the basin is small next to the prior, P is
the prior density at theta0 times an ellipsoid's volume: log P = const + (D/2) log(cutoff).
For large cutoffs the basin stops being quadratic and the prior's tails take over, so the
slope must fall (log P <= 0).

The digits MLP (``train_digits_mlp(seed=0)``, D = 4810), its KL basin on the 1024 training
inputs, cutoffs log-spaced from 1e-6 to 1e2 nats (2 per decade), under the two priors of the
other experiments (sigma = init RMS, and sigma = 3.125 from the L2 penalty). Each point is
the highest of the pooled estimates of the four proposals of ``_common.best_of`` (naive,
diagonal Fisher with eps = prior_eps at that cutoff, and that Fisher with a rank-one stretch
toward the origin by 30 and 100), 3 direction seeds each.

Where P is not tiny it can be measured directly: draw ``--direct`` parameter vectors from the
prior and count those inside the basin (delta <= cutoff). The table gives that count and the
log of the fraction with a 95% Clopper-Pearson interval (an upper bound when the count is 0),
a ground truth that needs no star-shaped assumption and no importance weights. The table
also gives the local slope d log P / d log(cutoff) between neighbouring cutoffs and its ratio
to D/2; the figure draws the reference line of slope D/2 through the smallest cutoff.

Run: python3 experiments/cutoff_scan.py   (about 4 minutes on one core)
"""

from __future__ import annotations

import math
import sys
import warnings

import _common as C
import numpy as np
import torch

from basin_volume.digits import train_digits_mlp
from basin_volume.objectives import ClassifierKL
from basin_volume.preconditioners import fisher_diagonal

NAME = "cutoff_scan"


def direct(fn, center, sigma: float, cutoffs, n: int, *, seed: int = 0) -> list[dict]:
    """Fraction of ``n`` prior draws theta ~ N(0, sigma^2 I) with delta(theta) <= cutoff, with
    log of the fraction and its 95% Clopper-Pearson interval, for each cutoff."""
    from scipy.stats import beta

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        f0 = float(fn(center))
        deltas = torch.tensor(
            [
                float(fn(sigma * torch.randn(center.numel(), generator=gen, dtype=center.dtype)))
                - f0
                for _ in range(n)
            ]
        )
    out = []
    for cutoff in cutoffs:
        k = int((deltas <= cutoff).sum())
        lo = float(beta.ppf(0.025, k, n - k + 1)) if k > 0 else 0.0
        hi = float(beta.ppf(0.975, k + 1, n - k)) if k < n else 1.0
        out.append(
            {
                "k": k,
                "n": n,
                "log_p": math.log(k / n) if k else -math.inf,
                "low": math.log(lo) if lo > 0 else -math.inf,
                "high": math.log(hi),
            }
        )
    return out, {"min_delta": float(deltas.min()), "median_delta": float(deltas.median())}


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(NAME, __doc__)
    p.add_argument("--per-decade", type=int, default=2, help="cutoffs per decade")
    p.add_argument("--low", type=float, default=1e-6)
    p.add_argument("--high", type=float, default=1e2)
    p.add_argument("--seeds", type=int, default=3, help="direction seeds per estimate")
    p.add_argument("--n-samples", type=int, default=48, help="directions per seed")
    p.add_argument("--direct", type=int, default=4000, help="prior draws for the direct count")
    args = p.parse_args(argv)
    steps = 1000
    if args.quick:
        args.per_decade, args.low, args.high, args.seeds, args.n_samples = 1, 1e-4, 1e-2, 2, 8
        args.direct = 50
        steps = 30
    figures, results = C.setup(args, NAME)
    warnings.simplefilter("ignore", UserWarning)
    clock = C.Clock()
    decades = math.log10(args.high) - math.log10(args.low)
    n = round(decades * args.per_decade) + 1
    cutoffs = [float(c) for c in np.logspace(math.log10(args.low), math.log10(args.high), n)]
    seeds = list(range(args.seeds))

    run = train_digits_mlp(seed=0, steps=steps)
    fn = ClassifierKL(run.model, run.train_inputs)
    center = fn.center
    dim = center.numel()
    fdiag = fisher_diagonal(run.model, run.train_inputs)
    priors = {"init": C.digits_init_sigma(0), "L2": C.l2_sigma(1e-4, len(run.train_inputs))}
    summary = {"dim": dim, "cutoffs": cutoffs, "seeds": seeds, "n_samples": args.n_samples}
    summary["priors"] = {}
    print(
        f"digits MLP D={dim}, KL basin on {len(run.train_inputs)} training inputs; "
        f"D/2 = {dim / 2:g}; direction seeds {seeds} x {args.n_samples}"
    )
    for prior, sigma in priors.items():
        mc, mc_stats = direct(fn, center, sigma, cutoffs, args.direct)
        rows = []
        for cutoff in cutoffs:
            est = C.best_of(
                fn,
                center,
                fdiag,
                sigma,
                seeds=seeds,
                n_samples=args.n_samples,
                cutoff=cutoff,
                save_to=results / prior / f"cutoff{cutoff:.0e}",
            )
            pooled = est.pop("_pooled")
            est["not_converged"] = C.status_counts(pooled)
            est["evals_per_dir"] = float(pooled.n_evals.double().mean())
            # is the basin quadratic where it matters? radius of the heaviest direction and
            # the median log-log slope of delta at the radius (2 = quadratic)
            est["top_radius"] = float(pooled.radii[int(pooled.estimates.argmax())])
            finite = pooled.slopes[torch.isfinite(pooled.slopes)]
            est["median_slope"] = float(finite.median()) if finite.numel() else math.nan
            rows.append({"cutoff": cutoff, **est, "direct": mc[len(rows)]})
        for a, b in zip(rows[:-1], rows[1:], strict=True):
            b["slope"] = (b["log_p"] - a["log_p"]) / math.log(b["cutoff"] / a["cutoff"])
            b["slope_ratio"] = b["slope"] / (dim / 2)
        small = [r for r in rows if r["cutoff"] <= 1e-3] or rows[:2]
        fit = np.polyfit([math.log(r["cutoff"]) for r in small], [r["log_p"] for r in small], 1)
        summary["priors"][prior] = {
            "sigma": sigma,
            "direct_deltas": mc_stats,
            "rows": rows,
            "fit_slope_small": float(fit[0]),
            "fit_range": [small[0]["cutoff"], small[-1]["cutoff"]],
        }
        print(f"\nprior {prior}: sigma = {sigma:.4g}")
        print(
            C.table(
                [
                    "cutoff",
                    "log P",
                    "95% boot",
                    "ESS",
                    "best",
                    *[C.SHORT[k] for k in C.PROPOSALS],
                    "slope",
                    "slope/(D/2)",
                    "evals/dir",
                    "r top",
                    "dlog delta/dlog r",
                    "not converged",
                    "direct k",
                    "direct log P [95%]",
                ],
                [
                    [
                        f"{r['cutoff']:.0e}",
                        C.f(r["log_p"]),
                        f"[{C.f(r[r['best']]['low'])}, {C.f(r[r['best']]['high'])}]",
                        C.f(r["ess"], ".2f"),
                        C.SHORT[r["best"]],
                        *[C.f(r[k]["log_p"]) for k in C.PROPOSALS],
                        C.f(r.get("slope", math.nan), ".0f"),
                        C.f(r.get("slope_ratio", math.nan), ".3f"),
                        C.f(r["evals_per_dir"], ".2f"),
                        C.f(r["top_radius"], ".3g"),
                        C.f(r["median_slope"], ".2f"),
                        ", ".join(f"{k}: {v}" for k, v in r["not_converged"].items()) or "-",
                        f"{r['direct']['k']}/{r['direct']['n']}",
                        f"{C.f(r['direct']['log_p'], '.2f')} [{C.f(r['direct']['low'], '.2f')}, "
                        f"{C.f(r['direct']['high'], '.2f')}]",
                    ]
                    for r in rows
                ],
            )
        )
        lo, hi = summary["priors"][prior]["fit_range"]
        print(
            f"|theta0| = {float(center.norm()):.2f}; r top: radius of the heaviest direction; "
            "dlog delta/dlog r: median log-log slope of delta at the radius (2 = quadratic)"
        )
        print(
            f"direct draws from the prior: min delta {mc_stats['min_delta']:.4g}, median "
            f"{mc_stats['median_delta']:.4g} nats"
        )
        print(
            f"least-squares slope over cutoffs {lo:.0e}..{hi:.0e}: {fit[0]:.0f} = "
            f"{fit[0] / (dim / 2):.3f} x D/2"
        )
    return C.finish(summary, clock, results, figures / f"{NAME}.png", figure)


def figure(summary: dict, path) -> None:
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    half = summary["dim"] / 2
    for prior, color in (("init", "tab:blue"), ("L2", "tab:orange")):
        data = summary["priors"][prior]
        rows = data["rows"]
        x = [r["cutoff"] for r in rows]
        y = [r["log_p"] for r in rows]
        label = f"prior {prior} (sigma={data['sigma']:.3g})"
        axes[0].plot(x, y, "o-", color=color, label=label + ", best proposal")
        naive = [r["naive"]["log_p"] for r in rows]
        axes[0].plot(x, naive, ":", color=color, lw=1.5, label=f"naive only ({prior})")
        ref = [y[0] + half * math.log(c / x[0]) for c in x]
        axes[0].plot(x, ref, "--", color=color, lw=1, label=f"slope D/2 through {x[0]:.0e}")
        hit = [r for r in rows if r["direct"]["k"] > 0]
        if hit:
            axes[0].errorbar(
                [r["cutoff"] for r in hit],
                [r["direct"]["log_p"] for r in hit],
                yerr=[
                    [r["direct"]["log_p"] - r["direct"]["low"] for r in hit],
                    [r["direct"]["high"] - r["direct"]["log_p"] for r in hit],
                ],
                fmt="*",
                ms=9,
                color=color,
                mec="k",
                label=f"direct count of prior draws ({prior})",
            )
        xs = [r["cutoff"] for r in rows[1:]]
        axes[1].plot(xs, [r["slope_ratio"] for r in rows[1:]], "o-", color=color, label=label)
    ymin = min(r["log_p"] for d in summary["priors"].values() for r in d["rows"])
    axes[0].set_ylim(ymin * 1.1, max(0.0, -0.05 * ymin))
    axes[0].axhline(0, color="k", lw=0.6)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("cutoff [nats]")
    axes[0].set_ylabel("log P [nats]")
    axes[0].set_title(f"Digits MLP (D={summary['dim']}): log P vs cutoff")
    axes[0].legend(fontsize=8)
    axes[1].axhline(1, color="k", ls="--", lw=1)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("cutoff (upper end of the interval) [nats]")
    axes[1].set_ylabel("local slope d log P / d log cutoff, in units of D/2")
    axes[1].set_title("local slope / (D/2)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])

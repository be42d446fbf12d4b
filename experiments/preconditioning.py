"""Finding 1: naive random directions underestimate the basin; preconditioning reduces that.

The digits MLP (64 -> 64 GELU -> 10, D = 4810, ``train_digits_mlp(seed=0)``: full-batch Adam,
1024 training digits, L2 penalty 1e-4) and its KL basin on the training inputs, cutoff 1e-2
nats. Each proposal gets the same budget of fn evaluations per direction seed (directions are
searched until the budget is spent; ``run_with_budget`` of ``benchmarks/preconditioners.py``)
under 5 direction seeds, and under two Gaussian priors: sigma = the initialisation scale
(RMS of the step-0 parameters) and sigma = 1/sqrt(lambda N), the prior the L2 penalty
implies.

Proposals: naive (isotropic); Adam scales 1/(|m|^gamma + eta) from exp_avg_sq (order 2) and
exp_avg (order 1), eta in {1e-8, 1e-5, 1e-3} and gamma in {0.25, 0.5, 1}; the diagonal Fisher
of the KL basin 1/(F_ii^gamma + eta) with eta in {1e-5, 1e-3, prior} and the same gammas
(eta = prior is ``prior_eps(cutoff, sigma, D, exponent=gamma)``); the dense Fisher eigenbasis
with eta in {1e-5, prior}, gamma 0.5; and a rank-one stretch of the proposal toward (and
away from) the origin by s in {10, 30, 100, 300}
(:class:`basin_volume.preconditioners.OriginStretch`), alone and
composed with the diagonal Fisher (eta = prior), and s in {30, 100} with the dense Fisher.
The stretch (added to the library after these runs) tests why the curvature proposals lose
under the narrow init prior (there the prior density falls by e^(|theta0|/sigma^2 * r) across the
basin, so its mass lies in directions with a component toward the origin).

Every estimate is an unbiased estimate of the probability itself, so by Markov's inequality
an estimate exceeds the truth by X nats with probability at most e^-X: when one proposal's
log P is far above another's, the lower one is the underestimate. Differences are against
naive, "higher"/"lower" only when both the bootstrap interval (directions resampled) and the
t-interval over the 5 seeds (paired by seed) exclude 0.

Run: python3 experiments/preconditioning.py   (about 6 minutes on one core)
"""

from __future__ import annotations

import math
import sys

import _common as C
import torch

from basin_volume.digits import train_digits_mlp
from basin_volume.objectives import ClassifierKL
from basin_volume.preconditioners import (
    DensePreconditioner,
    OriginStretch,
    adam_preconditioner,
    fisher_diagonal,
    fisher_matrix,
    prior_eps,
)
from basin_volume.result import VolumeResult

NAME = "preconditioning"


def proposals(run, fn, center, sigma, cutoff, *, quick: bool, fisher: dict):
    """[(label, family, preconditioner or None)] for one prior."""
    dim = center.numel()
    out = [("naive", "naive", None)]
    opt = run.optimizer
    etas = (1e-5,) if quick else (1e-8, 1e-5, 1e-3)
    gammas = (0.5,) if quick else (0.25, 0.5, 1.0)
    for order in (2,) if quick else (2, 1):
        for eta in etas:
            for gamma in gammas:
                pre = adam_preconditioner(
                    opt, model=run.model, order=order, eps=eta, exponent=gamma
                )
                out.append((f"adam{order} eps={eta:g} exp={gamma:g}", f"adam order {order}", pre))
    fdiag = fisher["diag"]
    for gamma in gammas:
        for label in ("prior",) if quick else ("1e-05", "0.001", "prior"):
            eta = (
                prior_eps(cutoff, sigma, dim, exponent=gamma) if label == "prior" else float(label)
            )
            pre = 1.0 / (fdiag.pow(gamma) + eta)
            name = f"fisher eps={label} exp={gamma:g}"
            out.append((name, "diagonal Fisher", pre))
    dense = None
    if fisher.get("eig") is not None:
        for label in ("1e-05", "prior"):
            eta = prior_eps(cutoff, sigma, dim) if label == "prior" else float(label)
            dense = DensePreconditioner(fisher["eig"], eps=eta, exponent=0.5)
            out.append((f"dense fisher eps={label} exp=0.5", "dense Fisher", dense))
    stretches = (30,) if quick else (10, 30, 100, 300)
    for s in stretches:
        out.append((f"origin x{s}", "toward origin", OriginStretch(center, s)))
    fprior = 1.0 / (fdiag.sqrt() + prior_eps(cutoff, sigma, dim))
    for s in stretches:
        pre = OriginStretch(center, s, base=fprior)
        out.append((f"fisher eps=prior + origin x{s}", "toward origin + Fisher", pre))
    if dense is not None:  # the dense Fisher with eps=prior
        for s in (30, 100):
            pre = OriginStretch(center, s, base=dense)
            out.append((f"dense fisher eps=prior + origin x{s}", "toward origin + Fisher", pre))
    return out


def slug(label: str) -> str:
    return label.replace(" ", "_").replace("=", "").replace(".", "p")


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(NAME, __doc__)
    p.add_argument("--budget", type=int, default=500, help="fn evaluations per seed and run")
    p.add_argument("--seeds", type=int, default=5, help="direction seeds")
    p.add_argument("--no-dense", action="store_true", help="skip the dense Fisher")
    args = p.parse_args(argv)
    figures, results = C.setup(args, NAME)
    clock = C.Clock()
    bench = C.benchmark("preconditioners")
    if args.quick:
        args.budget, args.seeds, args.no_dense = min(args.budget, 40), 2, True
    seeds = list(range(args.seeds))
    cutoff = C.CUTOFF

    run = train_digits_mlp(seed=0, steps=100 if args.quick else 1000)
    fn = ClassifierKL(run.model, run.train_inputs)
    center = fn.center
    dim = center.numel()
    priors = {
        "init": C.digits_init_sigma(0),
        "L2": C.l2_sigma(1e-4, len(run.train_inputs)),
    }
    t = C.Clock()
    fisher = {"diag": fisher_diagonal(run.model, run.train_inputs)}
    if not args.no_dense:
        fisher["eig"] = tuple(torch.linalg.eigh(fisher_matrix(run.model, run.train_inputs)))
    fisher_s = t()
    print(
        f"digits MLP D={dim}, test accuracy {run.accuracy:.3f}, RMS(theta0) "
        f"{C.rms(center):.4f}; KL basin on {len(run.train_inputs)} training inputs, cutoff "
        f"{cutoff:g} nats; budget {args.budget} fn evaluations per seed, seeds {seeds}; "
        f"Fisher (diag{'' if args.no_dense else ' + dense eigh'}) {fisher_s:.0f} s"
    )
    summary = {"dim": dim, "cutoff": cutoff, "budget": args.budget, "seeds": seeds, "priors": {}}
    for prior, sigma in priors.items():
        rows = []
        base = None
        for label, family, pre in proposals(
            run, fn, center, sigma, cutoff, quick=args.quick, fisher=fisher
        ):
            t = C.Clock()
            parts = [
                bench.run_with_budget(
                    fn,
                    center,
                    args.budget,
                    preconditioner=pre,
                    seed=s,
                    sigma=sigma,
                    cutoff=cutoff,
                    progress=False,
                )
                for s in seeds
            ]
            pooled = VolumeResult.merge(parts)
            C.save(pooled, results / prior / f"{slug(label)}.json")
            row = {"proposal": label, "family": family, **C.result_row(pooled)}
            row["dirs_per_seed"] = pooled.n_samples / len(seeds)
            row["per_seed"] = [r.log_volume for r in parts]
            row["ess_per_seed"] = [r.ess for r in parts]
            mean, sd, _, _ = C.t_interval(row["per_seed"])
            row["seed_mean"], row["seed_sd"] = mean, sd
            if base is None:
                base = (pooled, parts)
            row["vs_naive"] = C.compare(base, (pooled, parts))
            row["seconds"] = t()
            rows.append(row)
        summary["priors"][prior] = {"sigma": sigma, "rows": rows}
        print(f"\nprior N(0, sigma^2 I), sigma = {sigma:.4g} ({prior})")
        print(render(rows))
        best = max(rows, key=lambda r: r["log_p"])
        gain = best["log_p"] - rows[0]["log_p"]
        print(
            f"best: {best['proposal']}, {C.f(gain)} nats ({C.f(gain / math.log(10))} orders of "
            f"magnitude) above naive; verdict {best['vs_naive']['verdict']}"
        )
    return C.finish(summary, clock, results, figures / f"{NAME}.png", figure)


def render(rows: list[dict]) -> str:
    header = [
        "proposal",
        "dirs",
        "log P",
        "95% boot",
        "ESS",
        "top",
        "seed mean",
        "sd",
        "diff vs naive",
        "boot 95%",
        "t 95% (seeds)",
        "verdict",
    ]
    body = []
    for r in rows:
        c = r["vs_naive"]
        body.append(
            [
                r["proposal"],
                C.f(r["dirs_per_seed"], ".0f"),
                C.f(r["log_p"]),
                f"[{C.f(r['low'])}, {C.f(r['high'])}]",
                C.f(r["ess"], ".2f"),
                C.f(r["top_share"], ".2f"),
                C.f(r["seed_mean"]),
                C.f(r["seed_sd"]),
                C.f(c["diff"]),
                f"[{C.f(c['boot_low'])}, {C.f(c['boot_high'])}]",
                f"[{C.f(c['t_low'])}, {C.f(c['t_high'])}]",
                c["verdict"],
            ]
        )
    return C.table(header, body)


def figure(summary: dict, path) -> None:
    plt = C.pyplot()
    priors = summary["priors"]
    fig, axes = plt.subplots(
        1,
        len(priors),
        figsize=(6.5 * len(priors), 0.28 * max(len(v["rows"]) for v in priors.values()) + 1.8),
    )
    axes = [axes] if len(priors) == 1 else list(axes)
    colors = {
        "naive": "k",
        "adam order 2": "tab:blue",
        "adam order 1": "tab:cyan",
        "diagonal Fisher": "tab:orange",
        "dense Fisher": "tab:red",
        "toward origin": "tab:green",
        "toward origin + Fisher": "tab:olive",
    }
    for ax, (prior, data) in zip(axes, priors.items(), strict=True):
        rows = data["rows"]
        base = rows[0]["log_p"]
        for i, r in enumerate(rows):
            y = len(rows) - 1 - i
            col = colors.get(r["family"], "gray")
            xs = [v - base for v in r["per_seed"]]
            ax.plot(xs, [y] * len(xs), "o", ms=3, color=col, alpha=0.5)
            ax.plot([r["log_p"] - base], [y], "D", ms=6, color=col)
        ax.axvline(0, color="k", lw=0.8, ls=":")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([r["proposal"] for r in reversed(rows)], fontsize=7)
        ax.set_xlabel("log P - log P(naive, pooled)   [nats]")
        ax.set_title(
            f"prior sigma = {data['sigma']:.3g} ({prior}); budget {summary['budget']}/seed"
        )
    fig.suptitle(
        f"Digits MLP (D={summary['dim']}), KL cutoff {summary['cutoff']:g}: dots = seeds, "
        "diamonds = pooled"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])

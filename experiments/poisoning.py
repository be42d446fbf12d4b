"""Finding 3: networks that memorise poisoned labels have smaller basins than clean ones.

For each model seed the digits MLP is trained twice from the same initialisation on the same
1024 clean training digits (``train_digits_mlp(seed=s)``): once alone ("clean") and once with
``--n-poison`` extra held-out digits given a random wrong label ("poisoned",
``train_digits_mlp(seed=s, n_poison=...)``), which the network has to memorise. Both basins
are KL basins on the same clean inputs (``DigitsRun.clean_inputs``), cutoff 1e-2 nats, so
they measure how precisely the parameters must be set to keep the clean behaviour.

Two fixed priors, as in ``checkpoints.py``: sigma = RMS of the initialisation ("init") and
sigma = 1/sqrt(lambda * 1024) = 3.125 ("L2", with the clean N for both). Each basin is
estimated with the four proposals of ``_common.best_of`` (naive, diagonal Fisher with the
prior eps, and that Fisher with a rank-one stretch toward the origin by 30 and 100), 3
direction seeds each, keeping the highest pooled estimate.

Per model: log P(poisoned) - log P(clean) with a bootstrap interval (directions resampled).
Over models: a paired t-interval. "smaller"/"larger" only when the t-interval and every
model's bootstrap interval exclude 0 on the same side.

Run: python3 experiments/poisoning.py   (about 4 minutes on one core)
"""

from __future__ import annotations

import sys
import warnings

import _common as C
import torch

from basin_volume.digits import train_digits_mlp
from basin_volume.objectives import ClassifierKL
from basin_volume.preconditioners import fisher_diagonal

NAME = "poisoning"


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(NAME, __doc__)
    p.add_argument("--models", type=int, default=5, help="model seeds")
    p.add_argument("--n-poison", type=int, default=200, help="wrongly labelled extra digits")
    p.add_argument("--seeds", type=int, default=3, help="direction seeds per estimate")
    p.add_argument("--n-samples", type=int, default=64, help="directions per seed")
    p.add_argument("--steps", type=int, default=1000, help="Adam steps")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.n_poison, args.seeds, args.n_samples, args.steps = 2, 20, 2, 8, 30
    figures, results = C.setup(args, NAME)
    warnings.simplefilter("ignore", UserWarning)  # sigma far from the centre's RMS
    clock = C.Clock()
    seeds = list(range(args.seeds))
    models = []
    for m in range(args.models):
        clean = train_digits_mlp(seed=m, steps=args.steps)
        poisoned = train_digits_mlp(seed=m, steps=args.steps, n_poison=args.n_poison)
        if not torch.equal(clean.clean_inputs, poisoned.clean_inputs):
            raise RuntimeError("clean and poisoned runs must share their clean training inputs")
        n_clean = len(clean.clean_inputs)
        sigmas = {"init": C.digits_init_sigma(m), "L2": C.l2_sigma(1e-4, n_clean)}
        entry = {"model": m, "sigmas": sigmas, "nets": {}}
        for kind, run in (("clean", clean), ("poisoned", poisoned)):
            x_poison = run.train_inputs[n_clean:]
            y_poison = run.train_labels[n_clean:]
            stats = {
                "test_acc": run.accuracy,
                "clean_train_acc": accuracy(run.model, run.clean_inputs, run.clean_labels),
                "poison_train_acc": accuracy(run.model, x_poison, y_poison)
                if len(x_poison)
                else float("nan"),
            }
            fn = ClassifierKL(run.model, run.clean_inputs)
            center = fn.center
            fdiag = fisher_diagonal(run.model, run.clean_inputs)
            est = {}
            for prior, sigma in sigmas.items():
                est[prior] = C.best_of(
                    fn,
                    center,
                    fdiag,
                    sigma,
                    seeds=seeds,
                    n_samples=args.n_samples,
                    save_to=results / f"model{m}" / kind / prior,
                )
            entry["nets"][kind] = {"stats": stats, "est": est}
        models.append(entry)

    summary = {
        "cutoff": C.CUTOFF,
        "n_poison": args.n_poison,
        "steps": args.steps,
        "seeds": seeds,
        "n_samples": args.n_samples,
        "models": [],
        "priors": {},
    }
    for e in models:
        summary["models"].append(
            {
                "model": e["model"],
                "sigmas": e["sigmas"],
                **{
                    kind: {
                        **net["stats"],
                        **{
                            prior: {k: v for k, v in est.items() if k != "_pooled"}
                            for prior, est in net["est"].items()
                        },
                    }
                    for kind, net in e["nets"].items()
                },
            }
        )
    print(
        f"digits MLP: clean vs +{args.n_poison} poisoned labels, {args.steps} Adam steps, "
        f"KL basin on the clean training inputs, cutoff {C.CUTOFF:g}; direction seeds {seeds} "
        f"x {args.n_samples}"
    )
    print(
        C.table(
            ["model", "net", "test acc", "clean train acc", "poison train acc"],
            [
                [
                    str(e["model"]),
                    kind,
                    C.f(net["stats"]["test_acc"], ".3f"),
                    C.f(net["stats"]["clean_train_acc"], ".3f"),
                    C.f(net["stats"]["poison_train_acc"], ".3f"),
                ]
                for e in models
                for kind, net in e["nets"].items()
            ],
        )
    )
    for prior in ("init", "L2"):
        rows, diffs, boots = [], [], []
        for e in models:
            c, q = e["nets"]["clean"]["est"][prior], e["nets"]["poisoned"]["est"][prior]
            d = q["log_p"] - c["log_p"]
            b = C.diff_interval(c["_pooled"], q["_pooled"])
            diffs.append(d)
            boots.append(b)
            rows.append(
                [
                    str(e["model"]),
                    C.f(e["sigmas"][prior], ".4g"),
                    C.f(c["log_p"]),
                    C.f(q["log_p"]),
                    C.f(d),
                    f"[{C.f(b[0])}, {C.f(b[1])}]",
                    C.f(q["norm_term"] - c["norm_term"]),
                    f"{C.SHORT[c['best']]}/{C.SHORT[q['best']]}",
                    f"{C.f(c['ess'], '.2f')}/{C.f(q['ess'], '.2f')}",
                ]
            )
        mean, sd, lo, hi = C.t_interval(diffs)
        v = C.verdict_models(boots, (lo, hi), higher="larger", lower="smaller")
        summary["priors"][prior] = {
            "diffs": diffs,
            "boots": boots,
            "mean": mean,
            "sd": sd,
            "t_low": lo,
            "t_high": hi,
            "verdict": v,
        }
        print(f"\nprior {prior}: log P (highest of the proposals), poisoned minus clean")
        print(
            C.table(
                [
                    "model",
                    "sigma",
                    "log P clean",
                    "log P poisoned",
                    "diff",
                    "boot 95%",
                    "norm term diff",
                    "best c/p",
                    "ESS c/p",
                ],
                rows,
            )
        )
        print(
            f"mean diff {C.f(mean)} nats (sd {C.f(sd)}), 95% t-interval over {len(models)} "
            f"models [{C.f(lo)}, {C.f(hi)}]: poisoned basin is {v}"
            + ("" if v == "n.s." else " (significant)")
        )
    return C.finish(summary, clock, results, figures / f"{NAME}.png", figure)


def figure(summary: dict, path) -> None:
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, prior in zip(axes, ("init", "L2"), strict=True):
        ms = summary["models"]
        x = [m["model"] for m in ms]
        ax.plot(x, [m["clean"][prior]["log_p"] for m in ms], "o", color="tab:blue", label="clean")
        ax.plot(
            x, [m["poisoned"][prior]["log_p"] for m in ms], "s", color="tab:red", label="poisoned"
        )
        for m in ms:
            ax.plot(
                [m["model"]] * 2,
                [m["clean"][prior]["log_p"], m["poisoned"][prior]["log_p"]],
                color="gray",
                lw=0.8,
            )
        s = summary["priors"][prior]
        ax.set_title(
            f"prior {prior}: mean diff {s['mean']:.0f} nats "
            f"[{s['t_low']:.0f}, {s['t_high']:.0f}] ({s['verdict']})",
            fontsize=9,
        )
        ax.set_xlabel("model seed")
        ax.set_ylabel("log P of the clean-input KL basin [nats]")
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Digits MLP: clean vs +{summary['n_poison']} memorised wrong labels "
        f"(cutoff {summary['cutoff']:g})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])

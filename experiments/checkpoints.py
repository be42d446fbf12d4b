"""Finding 2: a network's information content -log P grows during training.

Two models, each estimated at checkpoints along one training run:

* the digits MLP (``train_digits_mlp(seed=s, checkpoint_steps=...)``, 3 model seeds), KL
  basin on its 1024 training inputs, at steps 0, 1, 3, 10, 30, 100, 300, 1000;
* the tiny GPT-NeoX of ``basin_volume.tiny_lm`` (D = 165,632), KL basin on 8 x 64 held-out
  tokens, at steps 0, 10, 30, 100, 300. ``build_tiny_lm`` keeps no intermediate
  checkpoints, but its training is deterministic and its learning-rate schedule (20 steps of
  warm-up, then constant) does not depend on the total number of steps, so
  ``build_tiny_lm(steps=k)`` *is* step k of the 300-step run. Step 0 is rebuilt from the saved
  config under the same seed (checked: it is one Adam step, about lr = 1.5e-4 per parameter,
  from step 1).

The prior is fixed along training: N(0, sigma^2 I) with sigma = the RMS of the step-0
parameters ("init"), and for the digits MLP also sigma = 1/sqrt(lambda N) = 3.125, the prior
of its L2 penalty ("L2"). Each basin is estimated with four proposals (``_common.best_of``):
isotropic ("naive", n), the diagonal Fisher of that checkpoint with the prior-set eps
("fisher", f), and that Fisher composed with a rank-one stretch toward the origin by 30 and
100 (fo30, fo100; ``basin_volume.preconditioners.OriginStretch``), 3 direction seeds each;
the reported log P is the highest of the four pooled estimates. All are unbiased for P, so
the highest is the least underestimated (by Markov's inequality an overestimate by X nats
has probability at most 4 e^-X for the largest of four).

Under the init prior -log P splits into ||theta0||^2 / (2 sigma^2) (how far the checkpoint
is from the prior's centre) and the rest; the tables print the first term as "norm term".

Run: python3 experiments/checkpoints.py   (about 5 minutes on one core)
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import _common as C  # noqa: E402
import torch  # noqa: E402

from basin_volume.digits import make_digits_mlp, train_digits_mlp  # noqa: E402
from basin_volume.objectives import ClassifierKL  # noqa: E402
from basin_volume.preconditioners import fisher_diagonal  # noqa: E402

NAME = "checkpoints"
DIGITS_STEPS = (0, 1, 3, 10, 30, 100, 300, 1000)
LM_STEPS = (0, 10, 30, 100, 300)


def consecutive(steps, per_model: list[dict]) -> list[dict]:
    """Step-to-step change of -log P: t-interval over models, bootstrap per model.

    "grows"/"falls" only when the t-interval and every model's bootstrap interval exclude 0
    on the same side.
    """
    rows = []
    for a, b in zip(steps[:-1], steps[1:], strict=True):
        diffs = [m[b]["info"] - m[a]["info"] for m in per_model]
        # diff_interval(x, y) is log P(y) - log P(x), so this is -log P(b) + log P(a)
        boots = [C.diff_interval(m[b]["_pooled"], m[a]["_pooled"]) for m in per_model]
        mean, sd, lo, hi = C.t_interval(diffs)
        verdict = C.verdict_models(boots, (lo, hi), higher="grows", lower="falls")
        rows.append(
            {
                "from": a,
                "to": b,
                "diffs": diffs,
                "mean": mean,
                "sd": sd,
                "t_low": lo,
                "t_high": hi,
                "boots": boots,
                "verdict": verdict,
            }
        )
    return rows


# --------------------------------------------------------------------------- digits


def digits_part(args, results: Path) -> dict:
    steps = tuple(s for s in DIGITS_STEPS if s <= args.digits_steps)
    if args.digits_steps not in steps:
        steps = (*steps, args.digits_steps)
    models = list(range(args.models))
    seeds = list(range(args.seeds))
    per_model = {"init": [], "L2": []}
    extra = []
    for m in models:
        run = train_digits_mlp(seed=m, steps=args.digits_steps, checkpoint_steps=steps)
        sigmas = {"init": C.digits_init_sigma(m), "L2": C.l2_sigma(1e-4, len(run.train_inputs))}
        stats = {}
        by_prior = {p: {} for p in sigmas}
        for step in steps:
            model = make_digits_mlp(seed=m)
            model.load_state_dict(run.checkpoints[step])
            model.eval()
            with torch.no_grad():
                logits = model(run.train_inputs)
                loss = float(torch.nn.functional.cross_entropy(logits, run.train_labels))
                acc = float((model(run.test_inputs).argmax(-1) == run.test_labels).float().mean())
            stats[step] = {"train_loss": loss, "test_acc": acc}
            fn = ClassifierKL(model, run.train_inputs)
            center = fn.center
            fdiag = fisher_diagonal(model, run.train_inputs)
            for prior, sigma in sigmas.items():
                by_prior[prior][step] = C.best_of(
                    fn,
                    center,
                    fdiag,
                    sigma,
                    seeds=seeds,
                    n_samples=args.n_samples,
                    save_to=results / "digits" / f"model{m}" / prior / f"step{step}",
                )
        for prior in sigmas:
            per_model[prior].append(by_prior[prior])
        extra.append({"sigmas": sigmas, "stats": stats})
    out = {"steps": list(steps), "models": models, "seeds": seeds, "priors": {}}
    for prior in per_model:
        rows = []
        for step in steps:
            vals = [pm[step] for pm in per_model[prior]]
            info = [v["info"] for v in vals]
            mean, sd, lo, hi = C.t_interval(info)
            rows.append(
                {
                    "step": step,
                    "info_per_model": info,
                    "info_mean": mean,
                    "info_sd": sd,
                    "norm_term_mean": sum(v["norm_term"] for v in vals) / len(vals),
                    "rms_mean": sum(v["rms"] for v in vals) / len(vals),
                    "ess": [v["ess"] for v in vals],
                    "best": [v["best"] for v in vals],
                    "log_p_by_proposal": {k: [v[k]["log_p"] for v in vals] for k in C.PROPOSALS},
                    "train_loss_mean": sum(e["stats"][step]["train_loss"] for e in extra)
                    / len(extra),
                    "test_acc_mean": sum(e["stats"][step]["test_acc"] for e in extra) / len(extra),
                }
            )
        out["priors"][prior] = {
            "sigmas": [e["sigmas"][prior] for e in extra],
            "rows": rows,
            "changes": consecutive(steps, per_model[prior]),
        }
    return out


# --------------------------------------------------------------------------- tiny LM


def tiny_lm_checkpoint(step: int, root: Path, *, seed: int = 0):
    """(model, tokenizer) of the tiny LM after ``step`` AdamW steps (0 = initialisation)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPTNeoXForCausalLM
    from transformers.utils import logging as hf_logging

    from basin_volume.tiny_lm import build_tiny_lm

    hf_logging.disable_progress_bar()

    if step == 0:
        path = build_tiny_lm(root / "step1", steps=1, seed=seed)
        config = AutoConfig.from_pretrained(path)
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            model = GPTNeoXForCausalLM(config)
        finally:
            torch.random.set_rng_state(state)
    else:
        path = build_tiny_lm(root / f"step{step}", steps=step, seed=seed)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def lm_part(args, results: Path) -> dict:
    from basin_volume.causal import causal_lm_objective
    from basin_volume.tiny_lm import tiny_lm_texts

    steps = tuple(s for s in LM_STEPS if s <= args.lm_steps)
    if args.lm_steps not in steps:
        steps = (*steps, args.lm_steps)
    root = results / "tiny_lm_models"
    data = tiny_lm_texts()
    seeds = list(range(args.seeds))
    rows, vocab, centers, pooled = [], None, {}, {}
    sigma = None
    for step in steps:
        model, tok = tiny_lm_checkpoint(step, root)
        if vocab is None:
            vocab = tok.get_vocab()
        elif tok.get_vocab() != vocab:
            raise RuntimeError("tiny LM checkpoints were built with different tokenizers")
        fn = causal_lm_objective(
            model, tok, data, val_size=args.lm_val_size, max_seq_len=64, chunking=True
        )
        center = fn.center
        centers[step] = center
        if sigma is None:
            sigma = C.rms(center)  # step 0 comes first: the initialisation scale
        fdiag = fn.fisher_diagonal(n_samples=1, seed=0)
        res = C.best_of(
            fn,
            center,
            fdiag,
            sigma,
            seeds=seeds,
            n_samples=args.lm_n_samples,
            save_to=results / "tiny_lm" / f"step{step}",
        )
        with torch.no_grad():
            loss = lm_loss(model, tok, data, args.lm_val_size)
        pooled[step] = res.pop("_pooled")
        rows.append({"step": step, "heldout_loss": loss, **res})
    check = None
    if 0 in centers and 1 in steps:
        check = C.rms(centers[1] - centers[0])
    elif 0 in centers:
        m1, _ = tiny_lm_checkpoint(1, root)
        v1 = torch.nn.utils.parameters_to_vector(m1.parameters()).detach()
        check = C.rms(v1 - centers[0])
    changes = []
    for a, b in zip(steps[:-1], steps[1:], strict=True):
        lo, hi = C.diff_interval(pooled[b], pooled[a])
        diff = rows[steps.index(b)]["info"] - rows[steps.index(a)]["info"]
        changes.append(
            {
                "from": a,
                "to": b,
                "diff": diff,
                "boot_low": lo,
                "boot_high": hi,
                "verdict": "grows" if lo > 0 else ("falls" if hi < 0 else "n.s."),
            }
        )
    return {
        "steps": list(steps),
        "sigma": sigma,
        "dim": int(centers[steps[0]].numel()),
        "n_tokens": int(fn.n_tokens),
        "rms_step1_minus_step0": check,
        "rows": rows,
        "changes": changes,
    }


def lm_loss(model, tok, data, val_size: int) -> float:
    """Mean next-token cross-entropy on the basin's tokens (the same chunks)."""
    from basin_volume.causal import chunk_and_tokenize

    batch = chunk_and_tokenize(data, tok, max_seq_len=64, n_chunks=val_size)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = ids[:, 1:]
    keep = mask[:, 1:].bool()
    return float(torch.nn.functional.cross_entropy(logits[keep], target[keep]))


# --------------------------------------------------------------------------- output


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(NAME, __doc__)
    p.add_argument("--models", type=int, default=3, help="digits MLP training seeds")
    p.add_argument("--seeds", type=int, default=3, help="direction seeds per estimate")
    p.add_argument("--n-samples", type=int, default=64, help="directions per seed (digits)")
    p.add_argument("--digits-steps", type=int, default=1000)
    p.add_argument("--lm-steps", type=int, default=300)
    p.add_argument("--lm-n-samples", type=int, default=32, help="directions per seed (LM)")
    p.add_argument("--lm-val-size", type=int, default=8, help="64-token chunks in the LM basin")
    p.add_argument("--no-lm", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.seeds, args.n_samples = 2, 2, 8
        args.digits_steps, args.lm_steps, args.lm_n_samples, args.lm_val_size = 10, 1, 4, 2
    figures, results = C.setup(args, NAME)
    warnings.simplefilter("ignore", UserWarning)  # sigma far from a checkpoint's RMS
    clock = C.Clock()
    summary = {"cutoff": C.CUTOFF, "digits": digits_part(args, results)}
    print_digits(summary["digits"])
    if not args.no_lm:
        summary["lm"] = lm_part(args, results)
        print_lm(summary["lm"])
    return C.finish(summary, clock, results, figures / f"{NAME}.png", figure)


def print_digits(d: dict) -> None:
    print(
        f"digits MLP, KL cutoff {C.CUTOFF:g}, models {d['models']}, direction seeds "
        f"{d['seeds']}; -log P in nats (mean +- sd over models)"
    )
    for prior, data in d["priors"].items():
        sig = ", ".join(C.f(s, ".4g") for s in data["sigmas"])
        print(f"\nprior {prior}: sigma = {sig}")
        rows = [
            [
                str(r["step"]),
                C.f(r["train_loss_mean"], ".3f"),
                C.f(r["test_acc_mean"], ".3f"),
                C.f(r["rms_mean"], ".4f"),
                C.f(r["info_mean"]),
                C.f(r["info_sd"]),
                C.f(r["norm_term_mean"]),
                C.f(r["info_mean"] - r["norm_term_mean"]),
                " ".join(C.f(e, ".1f") for e in r["ess"]),
                " ".join(C.SHORT[b] for b in r["best"]),
            ]
            for r in data["rows"]
        ]
        print(
            C.table(
                [
                    "step",
                    "train loss",
                    "test acc",
                    "RMS",
                    "-log P",
                    "sd",
                    "norm term",
                    "rest",
                    "ESS (models)",
                    "best",
                ],
                rows,
            )
        )
        ch = [
            [
                f"{c['from']} -> {c['to']}",
                C.f(c["mean"]),
                C.f(c["sd"]),
                f"[{C.f(c['t_low'])}, {C.f(c['t_high'])}]",
                " ".join(f"[{C.f(b[0])}, {C.f(b[1])}]" for b in c["boots"]),
                c["verdict"],
            ]
            for c in data["changes"]
        ]
        print(
            C.table(
                ["change", "d(-log P)", "sd", "t 95% (models)", "boot 95% per model", "verdict"],
                ch,
            )
        )


def print_lm(d: dict) -> None:
    print(
        f"\ntiny LM D={d['dim']}, {d['n_tokens']} held-out tokens, prior sigma = "
        f"{d['sigma']:.4g} (step-0 RMS); RMS(step 1 - step 0) = "
        f"{C.f(d['rms_step1_minus_step0'], '.3g')}"
    )
    rows = [
        [
            str(r["step"]),
            C.f(r["heldout_loss"], ".3f"),
            C.f(r["rms"], ".4f"),
            C.f(r["info"]),
            C.f(r["norm_term"]),
            C.f(r["info"] - r["norm_term"]),
            *[C.f(-r[k]["log_p"]) for k in C.PROPOSALS],
            C.SHORT[r["best"]],
            C.f(r["ess"], ".2f"),
        ]
        for r in d["rows"]
    ]
    print(
        C.table(
            [
                "step",
                "held-out loss",
                "RMS",
                "-log P",
                "norm term",
                "rest",
                *[C.SHORT[k] for k in C.PROPOSALS],
                "best",
                "ESS",
            ],
            rows,
        )
    )
    ch = [
        [
            f"{c['from']} -> {c['to']}",
            C.f(c["diff"]),
            f"[{C.f(c['boot_low'])}, {C.f(c['boot_high'])}]",
            c["verdict"],
        ]
        for c in d["changes"]
    ]
    print(C.table(["change", "d(-log P)", "boot 95%", "verdict"], ch))


def figure(summary: dict, path) -> None:
    plt = C.pyplot()
    has_lm = "lm" in summary
    fig, axes = plt.subplots(1, 2 if has_lm else 1, figsize=(12 if has_lm else 6.5, 4.2))
    axes = list(axes) if has_lm else [axes]
    d = summary["digits"]
    ax = axes[0]
    for prior, color in (("init", "tab:blue"), ("L2", "tab:orange")):
        rows = d["priors"][prior]["rows"]
        x = [r["step"] for r in rows]
        for i in range(len(d["models"])):
            ax.plot(x, [r["info_per_model"][i] for r in rows], color=color, alpha=0.35, lw=0.8)
        ax.plot(
            x, [r["info_mean"] for r in rows], "o-", color=color, label=f"-log P, prior {prior}"
        )
        if prior == "init":
            ax.plot(
                x,
                [r["norm_term_mean"] for r in rows],
                "--",
                color=color,
                lw=1,
                label="norm term |θ|²/2σ² (init)",
            )
    ax.set_xscale("symlog", linthresh=1)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("information content -log P [nats]")
    ax.set_title(f"digits MLP (faint: each of {len(d['models'])} models)")
    ax.legend(fontsize=8)
    if has_lm:
        lm = summary["lm"]
        ax = axes[1]
        x = [r["step"] for r in lm["rows"]]
        ax.plot(x, [r["info"] for r in lm["rows"]], "o-", color="tab:green", label="-log P (best)")
        for k, mark in zip(C.PROPOSALS, ("x:", "+:", "1:", "2:"), strict=True):
            ax.plot(x, [-r[k]["log_p"] for r in lm["rows"]], mark, lw=0.8, label=k)
        ax.plot(
            x,
            [r["norm_term"] for r in lm["rows"]],
            "--",
            color="tab:green",
            lw=1,
            label="norm term",
        )
        ax.set_xscale("symlog", linthresh=1)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_title(f"tiny GPT-NeoX (D={lm['dim']}), prior sigma = step-0 RMS")
        ax.legend(fontsize=8)
    fig.suptitle(f"Information content over training (KL cutoff {summary['cutoff']:g} nats)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])

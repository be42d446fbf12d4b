"""Information content of Pythia checkpoints over training (KL basin on validation text).

For every training step N the checkpoint ``EleutherAI/pythia-<size>`` at revision ``stepN``
is loaded (or ``<folder>/stepN`` from a local folder of ``save_pretrained`` checkpoints), its
KL basin on the first ``--val-size`` texts of ``--data`` is estimated, and the result is
written to ``<output-dir>/step_<N>.json`` (with a run log beside it, so an interrupted run
continues where it stopped). At the end ``scan.json`` (one row per step) and ``scan.png``
(information content against step) summarise the run.

Preconditioners (``--preconditioner``)
--------------------------------------
``auto`` (default)
    ``adam`` for a checkpoint with an ``optimizer.pt`` (in its folder, or in
    ``--optimizer-dir``), ``fisher`` otherwise. The published Pythia checkpoints on the hub
    carry no optimizer state, so on the hub this means ``fisher``.
``adam``
    Scales ``1/(v^gamma + eps)`` from Adam's second moments
    (:func:`basin_volume.preconditioners.adam_preconditioner`); a checkpoint without
    optimizer state falls back to ``fisher``, with a message.
``fisher``
    Scales from the diagonal Fisher of the next-token distribution on the validation
    sequences (:func:`~basin_volume.preconditioners.fisher_preconditioner` given the
    causal-LM objective: sampled next tokens, ``--fisher-draws`` per sequence).
``adaptive``
    :func:`basin_volume.adaptive.estimate_adaptive`: ``--adaptive-rounds`` rounds, starting
    from ``--adaptive-start`` and refitting one scale per parameter tensor between rounds.
``none``
    Isotropic directions.

Scales are cached in ``<output-dir>/step_<N>.scales.pt`` so that a resumed run uses the
same proposal.

Examples
--------
Single GPU::

    python experiments/full_scale/pythia_checkpoints.py --model 14m \\
        --steps 0 64 512 1000 8000 64000 143000 --n-samples 100 --val-size 20

Several GPUs (directions are sharded over the ranks)::

    torchrun --nproc_per_node=4 experiments/full_scale/pythia_checkpoints.py --model 160m

A local stand-in (a folder with sub-folders ``step0``, ``step10`` ... written by
``save_pretrained``)::

    python experiments/full_scale/pythia_checkpoints.py --model ./ckpts --data texts.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _shared  # noqa: E402

import basin_volume as bv  # noqa: E402
from basin_volume import preconditioners  # noqa: E402
from basin_volume.causal import (  # noqa: E402
    PYTHIA_STEPS,
    chunk_and_tokenize,
    iter_texts,
    load_pythia,
    pythia_source,
    tokenize_texts,
)
from basin_volume.parameters import preserved  # noqa: E402

DEFAULT_STEPS = [0, 1, 8, 64, 512, 1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000, 143000]
PRECONDITIONERS = ("auto", "none", "adam", "fisher", "adaptive")


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python experiments/full_scale/pythia_checkpoints.py",
        description=__doc__.strip().splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("model and checkpoints")
    g.add_argument(
        "--model",
        default="14m",
        help="Pythia size (14m, 31m, 70m, 160m, 410m, 1b, ...; '-deduped' variants too), a hub "
        "id, or a local folder holding one save_pretrained sub-folder per step (stepN) "
        "(default: 14m)",
    )
    g.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=None,
        help="training steps to estimate (hub: published steps 0, 1, 2, 4, ..., 512, 1000, "
        "2000, ..., 143000). Default: a log-spaced set for the hub, every stepN sub-folder "
        "for a local folder",
    )
    g.add_argument(
        "--optimizer-dir",
        type=Path,
        default=None,
        help="folder with optimizer states for the checkpoints: stepN/optimizer.pt or "
        "stepN.pt (a checkpoint folder's own optimizer.pt is found without this)",
    )
    g.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="parameter dtype (default float32: an accurate KL)",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default="NeelNanda/pile-10k",
        help="a .txt (one text per line) / .json / .jsonl / .csv file, a save_to_disk folder, "
        "or a hub data set (default NeelNanda/pile-10k: Pythia's training distribution)",
    )
    g.add_argument("--data-config", default=None, help="hub data set configuration")
    g.add_argument("--split", default="train", help="split of a hub or saved data set")
    g.add_argument("--text-field", default="text", help="the field holding the texts")
    g.add_argument(
        "--val-size",
        type=int,
        default=20,
        help="sequences in the KL (default 20; the centre's logits cache takes about "
        "0.4 GB per 2048-token sequence with Pythia's 50k vocabulary)",
    )
    g.add_argument("--max-seq-len", type=int, default=2048, help="tokens per sequence")
    g.add_argument(
        "--chunking",
        action="store_true",
        help="join texts with the end-of-text token and cut chunks of exactly --max-seq-len",
    )
    g = p.add_argument_group("estimate")
    g.add_argument("--n-samples", type=int, default=100, help="directions per checkpoint")
    g.add_argument("--cutoff", type=float, default=1e-2, help="KL cutoff in nats (1e-2)")
    g.add_argument("--measure", choices=("gaussian", "uniform"), default="gaussian")
    g.add_argument(
        "--sigma",
        type=float,
        default=None,
        help="prior scale (default: the RMS of each checkpoint's parameters)",
    )
    g.add_argument("--rtol", type=float, default=1e-2)
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("preconditioner")
    g.add_argument("--preconditioner", choices=PRECONDITIONERS, default="auto")
    g.add_argument(
        "--precond-eps",
        type=float,
        default=None,
        help="eta in 1/(c^gamma + eta); default 1e-5 for adam, the prior's scale "
        "(basin_volume.preconditioners.prior_eps) for fisher",
    )
    g.add_argument("--precond-exponent", type=float, default=0.5, help="gamma (0.5)")
    g.add_argument("--adam-order", type=int, choices=(1, 2), default=2)
    g.add_argument(
        "--fisher-size",
        type=int,
        default=None,
        help="validation sequences used for the Fisher (default: --val-size)",
    )
    g.add_argument(
        "--fisher-draws",
        type=int,
        default=4,
        help="sampled next-token draws per sequence for the Fisher (default 4)",
    )
    g.add_argument("--adaptive-rounds", type=int, default=4)
    g.add_argument(
        "--adaptive-start",
        choices=("none", "auto", "adam", "fisher"),
        default="none",
        help="starting proposal of --preconditioner adaptive (default isotropic)",
    )
    g = p.add_argument_group("running")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--data-batch-size", type=int, default=8, help="sequences per forward pass")
    g.add_argument("--model-batch-size", type=int, default=1, help="directions per vmap call")
    g.add_argument(
        "--cache-mode",
        choices=("auto", "cpu", "gpu", "none"),
        default="auto",
        help="where the centre's logits are cached (none: recompute)",
    )
    g.add_argument(
        "--low-memory",
        choices=("auto", "on", "off"),
        default="auto",
        help="write perturbed parameters in place (auto: on from 2e7 parameters)",
    )
    g.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="default: results/full_scale/pythia-<model>",
    )
    g.add_argument(
        "--overwrite", action="store_true", help="recompute every step (default: resume)"
    )
    g.add_argument("--no-plot", action="store_true", help="skip scan.png")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# --------------------------------------------------------------------------- Fisher
def fisher_scales(model, ids, mask, *, eps, exponent, draws, batch_size, seed):
    """``(scales, how)``: 1/(F^gamma + eps) with F the sampled causal-LM diagonal Fisher."""
    from basin_volume.causal import CausalLMKL

    objective = CausalLMKL(model, ids, mask, batch_size=batch_size, cache_mode=None)
    scales = preconditioners.fisher_preconditioner(
        model, objective, eps=eps, exponent=exponent, n_samples=draws, seed=seed
    )
    return scales, "fisher"


# --------------------------------------------------------------------------- helpers
def local_steps(folder: Path) -> list[int]:
    """The N of every ``stepN`` sub-folder, sorted."""
    steps = []
    for sub in folder.iterdir():
        if sub.is_dir() and sub.name.startswith("step") and sub.name[4:].isdigit():
            steps.append(int(sub.name[4:]))
    return sorted(steps)


def optimizer_state_for(args, step: int) -> Path | None:
    """Where the optimizer state of ``step`` is, if anywhere."""
    candidates = []
    if Path(args.model).is_dir():
        source, _ = pythia_source(args.model, step)
        candidates.append(Path(source) / "optimizer.pt")
    if args.optimizer_dir is not None:
        candidates += [
            args.optimizer_dir / f"step{step}" / "optimizer.pt",
            args.optimizer_dir / f"step{step}.pt",
        ]
    return next((c for c in candidates if c.is_file()), None)


def validation_batch(args, dataset, tokenizer, n: int) -> dict[str, torch.Tensor]:
    """The same sequences the KL uses (its first ``n``)."""
    if args.chunking:
        return chunk_and_tokenize(
            dataset, tokenizer, text_key=args.text_field, max_seq_len=args.max_seq_len, n_chunks=n
        )
    texts = list(itertools.islice(iter_texts(dataset, args.text_field), n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no pad token: masked anyway
        return tokenize_texts(texts, tokenizer, max_seq_len=args.max_seq_len)


def _sigma_of(model, sigma):
    if sigma is not None:
        return sigma
    squares = sum(float(p.detach().double().square().sum()) for p in model.parameters())
    return math.sqrt(squares / sum(p.numel() for p in model.parameters()))


def build_scales(args, kind: str, step: int, model, tokenizer, dataset):
    """``(scales or None, description)`` for one checkpoint."""
    state = optimizer_state_for(args, step)
    if kind == "auto":
        kind = "adam" if state is not None else "fisher"
    if kind == "adam" and state is None:
        _shared.print0(
            f"  note: no optimizer state for step {step} (published Pythia checkpoints have "
            "none; give --optimizer-dir); using the Fisher preconditioner instead"
        )
        kind = "fisher"
    if kind == "none":
        return None, "none"
    exponent = args.precond_exponent
    if kind == "adam":
        eps = 1e-5 if args.precond_eps is None else args.precond_eps
        scales = preconditioners.adam_preconditioner(
            state, model=model, order=args.adam_order, eps=eps, exponent=exponent
        )
        return scales, f"adam ({state})"
    dim = sum(p.numel() for p in model.parameters())
    if args.precond_eps is None:
        eps = preconditioners.prior_eps(
            args.cutoff, _sigma_of(model, args.sigma), dim, exponent=exponent
        )
    else:
        eps = args.precond_eps
    batch = validation_batch(args, dataset, tokenizer, args.fisher_size or args.val_size)
    return fisher_scales(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        eps=eps,
        exponent=exponent,
        draws=args.fisher_draws,
        batch_size=args.data_batch_size,
        seed=args.seed,
    )


def load_data(args):
    from basin_volume.cli import UsageError, load_text_data

    try:
        return load_text_data(
            args.data, split=args.split, text_field=args.text_field, config=args.data_config
        )
    except UsageError as err:
        raise SystemExit(f"error: {err}") from None


# --------------------------------------------------------------------------- main
def run_step(args, step: int, dataset, device, out_dir: Path) -> dict:
    """Estimate one checkpoint (or reuse its finished result); its summary row."""
    name = f"step_{step}"
    output = out_dir / f"{name}.json"
    n_wanted = args.n_samples
    if args.preconditioner == "adaptive":
        n_wanted = args.adaptive_rounds * max(1, args.n_samples // args.adaptive_rounds)
    done = None if args.overwrite else _shared.finished(output, n_wanted)
    done = done if _shared.agree(done is not None) else None
    if done is not None:
        _shared.print0(f"step {step}: done already ({output})")
        return _shared.summary_row(
            done,
            name=name,
            axis="step",
            value=step,
            file=output,
            preconditioner=done.meta.get("spec", {}).get("preconditioner_used"),
        )
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the previous checkpoint's memory
    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_pythia(args.model, step, device=device, dtype=dtype)
    source, revision = pythia_source(args.model, step)
    _shared.print0(f"step {step}: loaded {source} (revision {revision}) on {device}")

    kind = args.adaptive_start if args.preconditioner == "adaptive" else args.preconditioner
    scales_path = out_dir / f"{name}.scales.pt"
    how: list[str] = ["none"]

    described = out_dir / f"{name}.scales.txt"

    def make():  # rank 0 only; the others load what it saves
        scales, how[0] = build_scales(args, kind, step, model, tokenizer, dataset)
        described.write_text(how[0] + "\n")
        return torch.empty(0, dtype=torch.float64) if scales is None else scales

    if kind == "none":
        scales = None
    else:
        scales = _shared.cached_tensor(scales_path, make, fresh=args.overwrite)
        how[0] = described.read_text().strip() if described.exists() else "cached scales"
        if scales.numel() == 0:
            scales = None
    used = f"adaptive (start: {how[0]})" if args.preconditioner == "adaptive" else how[0]
    _shared.print0(f"step {step}: preconditioner {used}")

    spec = {
        "script": "pythia_checkpoints.py",
        "model": args.model,
        "source": source,
        "revision": revision,
        "step": step,
        "data": args.data,
        "split": args.split,
        "preconditioner": args.preconditioner,
        "preconditioner_used": used,
    }
    cfg = bv.VolumeConfig(
        model_type="causal",
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        text_key=args.text_field,
        val_size=args.val_size,
        max_seq_len=args.max_seq_len,
        chunking=args.chunking,
        n_samples=args.n_samples,
        cutoff=args.cutoff,
        measure=args.measure,
        sigma=args.sigma,
        preconditioner=scales,
        rtol=args.rtol,
        seed=args.seed,
        progress=not args.quiet,
        data_batch_size=args.data_batch_size,
        model_batch_size=args.model_batch_size,
        cache_mode=None if args.cache_mode == "none" else args.cache_mode,
        low_memory={"auto": None, "on": True, "off": False}[args.low_memory],
    )
    if args.preconditioner == "adaptive":
        source_ = _adaptive_runner(args, cfg, model)
    else:
        source_ = cfg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)  # reported in the summary instead
        result = _shared.run_estimate(source_, output, overwrite=args.overwrite, spec=spec)
    seconds = time.perf_counter() - started
    _shared.print0(
        f"step {step}: log P = {result.log_volume:.6g} nats (information "
        f"{-result.log_volume:.6g} nats), ESS {result.ess:.3g}, {seconds:.1f} s"
    )
    return _shared.summary_row(
        result, name=name, axis="step", value=step, file=output, preconditioner=used
    )


def _adaptive_runner(args, cfg: bv.VolumeConfig, model):
    """A function running :func:`estimate_adaptive` on the same KL objective."""
    from basin_volume.adaptive import estimate_adaptive, parameter_groups
    from basin_volume.causal import causal_lm_objective

    def run():
        with preserved(model):
            fn = causal_lm_objective(
                model,
                cfg.tokenizer,
                cfg.dataset,
                text_key=cfg.text_key,
                val_size=cfg.val_size,
                max_seq_len=cfg.max_seq_len,
                chunking=cfg.chunking,
                data_batch_size=cfg.data_batch_size,
                cache_mode=cfg.cache_mode,
            )
            result = estimate_adaptive(
                fn,
                fn.center,
                rounds=args.adaptive_rounds,
                n_per_round=max(1, args.n_samples // args.adaptive_rounds),
                groups=parameter_groups(model),
                seed=args.seed,
                progress=cfg.progress,
                cutoff=cfg.cutoff,
                measure=cfg.measure,
                sigma=cfg.sigma,
                rtol=cfg.rtol,
                preconditioner=cfg.preconditioner,
            )
        result.meta["config"] = cfg.describe()
        return result

    return run


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the scan; returns the summary rows (also written to ``scan.json``)."""
    args = build_parser().parse_args(argv)
    for name in ("val_size", "max_seq_len", "n_samples", "data_batch_size", "fisher_draws"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    if args.cutoff <= 0:
        raise SystemExit("--cutoff must be positive")
    rank, _, local_rank = _shared.setup_distributed()
    device = _shared.pick_device(args.device, local_rank)
    local = Path(args.model).is_dir()
    if args.steps is None:
        args.steps = local_steps(Path(args.model)) if local else DEFAULT_STEPS
        if not args.steps:
            raise SystemExit(f"--model {args.model}: no stepN sub-folders; pass --steps")
    if not local:
        bad = [s for s in args.steps if s not in PYTHIA_STEPS]
        if bad:
            raise SystemExit(
                f"--steps {bad}: not published Pythia checkpoints; use 0, a power of two up "
                "to 512, or a multiple of 1000 up to 143000"
            )
    label = Path(args.model).name if local else args.model.replace("/", "_")
    out_dir = args.output_dir or Path("results") / "full_scale" / f"pythia-{label}"
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = load_data(args)
    _shared.print0(
        f"Pythia {args.model}: steps {args.steps}, {args.val_size} sequences of at most "
        f"{args.max_seq_len} tokens from {args.data}, {args.n_samples} directions each, "
        f"cutoff {args.cutoff:g} nats, preconditioner {args.preconditioner}; output {out_dir}"
    )
    rows = [run_step(args, step, dataset, device, out_dir) for step in args.steps]
    _shared.write_json(out_dir / "scan.json", {"axis": "step", "model": args.model, "rows": rows})
    if rank == 0 and not args.no_plot and rows:
        bv.plot_scan(
            rows,
            out_dir / "scan.png",
            axis="step",
            title=f"Pythia {args.model}: basin log probability over training "
            f"(cutoff {args.cutoff:g} nats)",
        )
    _shared.print0(f"summary: {out_dir / 'scan.json'}" + ("" if args.no_plot else ", scan.png"))
    return rows


if __name__ == "__main__":
    main()

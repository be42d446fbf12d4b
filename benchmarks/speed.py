"""Speed benchmark: Tyche against the original project's search, on the digits MLP and the
tiny LM, in one run.

For each model, on the same directions of its KL basin (cutoff 1e-2 nats, rtol 1e-2, Gaussian
prior with sigma = RMS of the weights): evaluations of the objective and forward passes per
direction, seconds per direction, extra peak memory, and the log-probability with its 95%
bootstrap interval, for

- tyche: the library (centre's outputs cached, log-log secant search, each direction's
  estimate at the exact cutoff with its bound);
- tyche rtol=R: the same with a looser radius tolerance (``--loose-rtol``): fewer forward
  passes, a larger bound;
- baseline: doubling-then-bisection from the previous radius, recomputing the centre's outputs
  at every step (the original project's default), each estimate at the checked radius.

"bound" is the mean over directions of the per-direction bound (nats) on how far the
exact-cutoff interpolation can be from the crossing (``meta["cutoff_bound"]``); an estimate
taken at the checked radius instead is off by up to D * rtol / (2 * slope) nats.

A second table gives the throughput for populations of directions: directions per second
one at a time (``model_batch_size=1``) against batched evaluation (``model_batch_size=B``,
``torch.func.vmap``) on the same ``--throughput-samples`` directions, with 1 and 2 torch
threads, each the best of ``--repeats`` runs in this process.

Run: python benchmarks/speed.py [--n-samples 40] [--json speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from _baseline import baseline_run, peak_memory, reset_peak_memory  # noqa: E402

import basin_volume as bv  # noqa: E402


class Counting:
    """Counts calls of an objective (each call is one forward pass over the data here)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, theta=None):
        self.calls += 1
        return self.fn(theta)


def measure(name, fn, center, args, forwards_per_call):
    rows = {}
    for key, rtol in (("tyche", 1e-2), (f"tyche rtol={args.loose_rtol:g}", args.loose_rtol)):
        counted = Counting(fn)
        base = reset_peak_memory()
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", bv.LowESSWarning)
            ours = bv.estimate(
                counted,
                center,
                n_samples=args.n_samples,
                cutoff=1e-2,
                rtol=rtol,
                seed=0,
                progress=False,
            )
        rows[key] = (ours, time.perf_counter() - t0, counted.calls, peak_memory() - base)
    counted = Counting(fn)
    base = reset_peak_memory()
    t0 = time.perf_counter()
    theirs = baseline_run(counted, center, n_samples=args.n_samples, cutoff=1e-2, rtol=1e-2)
    rows["baseline"] = (theirs, time.perf_counter() - t0, counted.calls, peak_memory() - base)
    out = {}
    print(f"\n{name}: D = {center.numel():,}, {args.n_samples} directions")
    print(
        f"{'search':<16} {'evals/dir':>10} {'fwd/dir':>8} {'s/dir':>8} {'peak MiB':>9} "
        f"{'log P':>12} {'95% interval':>26} {'ESS':>6} {'bound':>8}"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        for key, (res, seconds, calls, peak) in rows.items():
            lo, hi = res.interval(0.95)
            row = {
                "evals_per_direction": res.n_evals.double().mean().item(),
                "forwards_per_direction": calls * forwards_per_call / args.n_samples,
                "seconds_per_direction": seconds / args.n_samples,
                "extra_peak_bytes": peak,
                "log_probability": res.log_volume,
                "interval_95": [lo, hi],
                "ess": res.ess,
                "mean_bound": (res.meta.get("cutoff_bound") or {}).get("mean"),
            }
            out[key] = row
            bound = "-" if row["mean_bound"] is None else f"{row['mean_bound']:.3g}"
            print(
                f"{key:<16} {row['evals_per_direction']:>10.2f} "
                f"{row['forwards_per_direction']:>8.2f} {row['seconds_per_direction']:>8.4f} "
                f"{peak / 2**20:>9.1f} {res.log_volume:>12.6g} "
                f"[{lo:>11.6g}, {hi:>11.6g}] {res.ess:>6.2f} {bound:>8}"
            )
    t, b = out["tyche"], out["baseline"]
    print(
        f"baseline/tyche: {b['forwards_per_direction'] / t['forwards_per_direction']:.1f}x "
        f"forward passes, {b['seconds_per_direction'] / t['seconds_per_direction']:.1f}x time"
    )
    return out


def throughput(name, fn, center, args, batch):
    """Directions per second, one at a time against ``batch`` at a time, best of repeats."""
    n = args.throughput_samples
    best: dict[tuple[int, int], float] = {}
    estimates = {}
    for _ in range(args.repeats):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for size in (1, batch):
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = bv.estimate(fn, center, n_samples=n, cutoff=1e-2, rtol=1e-2, seed=0,
                                      progress=False, model_batch_size=size)  # fmt: skip
                rate = n / (time.perf_counter() - t0)
                best[threads, size] = max(best.get((threads, size), 0.0), rate)
                estimates[threads, size] = res.log_volume
    torch.set_num_threads(args.threads)
    base = max(best[1, 1], best[2, 1])  # one at a time, at its best thread count
    print(f"\n{name}: directions per second, {n} directions (the first 16 one at a time in "
          f"every run), best of {args.repeats}")  # fmt: skip
    print(
        f"{'threads':>7} {'one at a time':>14} {f'batch of {batch}':>12} "
        f"{'batched/best single':>20}"
    )
    out = {}
    for threads in (1, 2):
        single, batched = best[threads, 1], best[threads, batch]
        print(f"{threads:>7} {single:>14.1f} {batched:>12.1f} {batched / base:>19.2f}x")
        out[threads] = {
            "single": single,
            "batched": batched,
            "speedup_vs_best_single": batched / base,
        }
    spread = max(estimates.values()) - min(estimates.values())
    print(
        f"log P spread across these runs: {spread:.2g} nats (batched arithmetic rounds differently)"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--loose-rtol", type=float, default=5e-2)
    parser.add_argument("--throughput-samples", type=int, default=16 + 1024)
    parser.add_argument("--lm-throughput-samples", type=int, default=16 + 48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from basin_volume.causal import causal_lm_objective
    from basin_volume.digits import train_digits_mlp
    from basin_volume.objectives import ClassifierKL
    from basin_volume.tiny_lm import load_tiny_lm, tiny_lm_texts

    results = {"torch": torch.__version__, "threads": args.threads}
    run = train_digits_mlp(seed=0)
    mlp = ClassifierKL(run.model, run.train_inputs)
    results["digits_mlp"] = measure("digits MLP (1024 inputs)", mlp, mlp.center, args, 1)
    if not args.skip_throughput:
        results["digits_mlp_throughput"] = throughput("digits MLP", mlp, mlp.center, args, 64)
    model, tokenizer = load_tiny_lm()
    lm = causal_lm_objective(
        model,
        tokenizer,
        tiny_lm_texts(),
        val_size=10,
        max_seq_len=128,
        chunking=True,
        cache_mode="cpu",
        data_batch_size=10,
    )
    results["tiny_lm"] = measure("tiny GPT-NeoX (10 x 128 tokens)", lm, lm.center, args, 1)
    if not args.skip_throughput:
        lm_args = argparse.Namespace(
            **{**vars(args), "throughput_samples": args.lm_throughput_samples}
        )
        results["tiny_lm_throughput"] = throughput("tiny GPT-NeoX", lm, lm.center, lm_args, 8)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()

"""Speed benchmark: Tyche against the original project's search, on the digits MLP and the
tiny LM, in one run.

For each model, on the same directions of its KL basin (cutoff 1e-2 nats, rtol 1e-2, Gaussian
prior with sigma = RMS of the weights): evaluations of the objective and forward passes per
direction, seconds per direction, extra peak memory, and the log-probability with its 95%
bootstrap interval, for

- tyche: the library (centre's outputs cached, log-log secant search);
- baseline: doubling-then-bisection from the previous radius, recomputing the centre's outputs
  at every step (the original project's default).

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
            rtol=1e-2,
            seed=0,
            progress=False,
        )
    rows["tyche"] = (ours, time.perf_counter() - t0, counted.calls, peak_memory() - base)
    counted = Counting(fn)
    base = reset_peak_memory()
    t0 = time.perf_counter()
    theirs = baseline_run(counted, center, n_samples=args.n_samples, cutoff=1e-2, rtol=1e-2)
    rows["baseline"] = (theirs, time.perf_counter() - t0, counted.calls, peak_memory() - base)
    out = {}
    print(f"\n{name}: D = {center.numel():,}, {args.n_samples} directions")
    print(
        f"{'search':<10} {'evals/dir':>10} {'fwd/dir':>8} {'s/dir':>8} {'peak MiB':>9} "
        f"{'log P':>12} {'95% interval':>26} {'ESS':>6}"
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
            }
            out[key] = row
            print(
                f"{key:<10} {row['evals_per_direction']:>10.2f} "
                f"{row['forwards_per_direction']:>8.2f} {row['seconds_per_direction']:>8.4f} "
                f"{peak / 2**20:>9.1f} {res.log_volume:>12.6g} "
                f"[{lo:>11.6g}, {hi:>11.6g}] {res.ess:>6.2f}"
            )
    t, b = out["tyche"], out["baseline"]
    print(
        f"baseline/tyche: {b['forwards_per_direction'] / t['forwards_per_direction']:.1f}x "
        f"forward passes, {b['seconds_per_direction'] / t['seconds_per_direction']:.1f}x time"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
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
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()

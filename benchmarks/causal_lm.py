"""Forward passes and seconds per direction on the tiny causal LM: Tyche against the original
project's default.

Both run in one process on the same directions of the tiny GPT-NeoX's KL basin (held-out
text joined and cut into ``--val-size`` chunks of ``--max-seq-len`` tokens, cutoff 1e-2 nats,
rtol 1e-2):

- **tyche**: ``VolumeEstimator`` with the centre's logits cached (``cache_mode="auto"``) and
  the log-log secant radius search;
- **baseline**: doubling-then-bisection from the previous direction's radius, recomputing the
  centre's outputs at every evaluation (``cache_mode=None``, the original default), until
  |delta - cutoff| <= rtol * cutoff.

Forward passes are counted by the objective itself (one per batch of sequences), the
centre's included.

Run: python benchmarks/causal_lm.py [--n-samples 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _baseline import doubling_bisection  # noqa: E402

import basin_volume as bv  # noqa: E402
from basin_volume.causal import causal_lm_objective  # noqa: E402
from basin_volume.directions import sample_direction  # noqa: E402
from basin_volume.tiny_lm import load_tiny_lm, tiny_lm_texts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=20)
    parser.add_argument("--val-size", type=int, default=10)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--cutoff", type=float, default=1e-2)
    parser.add_argument("--rtol", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_tiny_lm()
    dataset = tiny_lm_texts()
    common = dict(val_size=args.val_size, max_seq_len=args.max_seq_len, chunking=True)

    t0 = time.perf_counter()
    cfg = bv.VolumeConfig(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        n_samples=args.n_samples,
        cutoff=args.cutoff,
        rtol=args.rtol,
        cache_mode="auto",
        progress=False,
        seed=0,
        **common,
    )
    est = bv.VolumeEstimator.from_config(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        ours = est.run()
    ours_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    fn = causal_lm_objective(model, tokenizer, dataset, cache_mode=None, **common)
    center = fn.center
    with torch.no_grad():
        f0 = float(fn(center))
    evals, log_r = [], []
    guess = 1e-2 * float(center.norm())
    for k in range(args.n_samples):
        omega = sample_direction(k, center.numel(), seed=0).omega.to(center.dtype)

        def delta_at(t, omega=omega):
            with torch.no_grad():
                return float(fn(center + t * omega)) - f0

        r, _, n = doubling_bisection(delta_at, args.cutoff, args.rtol, guess)
        evals.append(n)
        log_r.append(math.log(r))
        guess = r
    base_s = time.perf_counter() - t0
    agree = max(abs(a - b) for a, b in zip(log_r, ours.radii.log().tolist(), strict=True))

    n = args.n_samples
    rows = {
        "tyche (cache auto, secant)": {
            "evals_per_direction": ours.n_evals.double().mean().item(),
            "forward_per_direction": est.fn.n_forward / n,
            "seconds_per_direction": ours_s / n,
        },
        "baseline (no cache, doubling+bisection)": {
            "evals_per_direction": sum(evals) / n,
            "forward_per_direction": fn.n_forward / n,
            "seconds_per_direction": base_s / n,
        },
    }
    print(
        f"tiny GPT-NeoX, D = {center.numel()}, {fn.n_tokens} tokens ({args.val_size} x "
        f"{args.max_seq_len}), {n} directions, cutoff {args.cutoff:g}, rtol {args.rtol:g}, "
        f"{args.threads} thread(s); centre cached on {est.fn.cache_device}"
    )
    print(f"{'search':<42} {'evals/dir':>10} {'forwards/dir':>13} {'s/dir':>8}")
    for name, row in rows.items():
        print(
            f"{name:<42} {row['evals_per_direction']:>10.2f} "
            f"{row['forward_per_direction']:>13.2f} {row['seconds_per_direction']:>8.3f}"
        )
    speedup = (
        rows["baseline (no cache, doubling+bisection)"]["seconds_per_direction"]
        / (rows["tyche (cache auto, secant)"]["seconds_per_direction"])
    )
    print(f"speed-up {speedup:.1f}x; max |log r_tyche - log r_baseline| = {agree:.4f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()

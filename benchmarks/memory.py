"""Peak memory beyond the loaded model: memory-light (in-place) rays against dense rays.

A 50.4M-parameter MLP (three 4096x4096 GELU layers and a 10-way head, float32) is built in a
fresh subprocess per mode; after the model, its data and the centre's cached outputs exist
and a one-direction warm-up run has paged in the code, the process's peak resident memory is
reset (Linux /proc/self/clear_refs) and a short estimate runs. On a GPU the same is measured
with torch.cuda.max_memory_allocated.

Modes: light, light+pre (light with a diagonal preconditioner), light+cache (light with
the direction kept in host memory, as on accelerators), dense.

Run: python benchmarks/memory.py [--n-samples 2] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from basin_volume.directions import CHUNK_SIZE

MODES = ("light", "light+pre", "light+cache", "dense")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(mode: str, n_samples: int, device: str) -> dict:
    import warnings

    import torch
    from torch import nn

    import basin_volume as bv
    from basin_volume.estimator import run_rays
    from basin_volume.objectives import ClassifierKL
    from basin_volume.preconditioners import DiagonalPreconditioner
    from basin_volume.rays import DenseRays, InPlaceRays

    torch.manual_seed(0)
    width = 4096
    model = (
        nn.Sequential(
            nn.Linear(width, width),
            nn.GELU(),
            nn.Linear(width, width),
            nn.GELU(),
            nn.Linear(width, width),
            nn.GELU(),
            nn.Linear(width, 10),
        )
        .to(device)
        .eval()
    )
    dim = sum(p.numel() for p in model.parameters())
    x = torch.randn(64, width, device=device)
    fn = ClassifierKL(model, x)
    param_bytes = dim * 4
    settings = dict(
        n_samples=n_samples,
        cutoff=1e-2,
        measure="gaussian",
        sigma=None,
        rtol=1e-2,
        seed=0,
        progress=False,
        max_evals=40,
        max_radius=None,
        callback=None,
        resume_from=None,
        meta={},
    )
    cuda = device.startswith("cuda")
    pre = None  # built before the measurement, like the model: it is the user's input
    if mode.endswith("+pre"):
        gen = torch.Generator().manual_seed(1)
        pre = DiagonalPreconditioner(torch.rand(dim, generator=gen, dtype=torch.float64) + 0.5)

    def make_rays():
        if mode.startswith("light"):
            cache = mode.endswith("+cache")  # what accelerators do: the direction in host RAM
            return InPlaceRays(
                fn, list(model.parameters()), seed=0, preconditioner=pre, host_cache=cache
            )
        return DenseRays(fn, fn.center, seed=0, preconditioner=pre)

    # warm-up: page in the code paths and allocator pools once, so the measurement below is
    # the steady-state cost of a run rather than one-off library loading
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_rays(make_rays(), **{**settings, "n_samples": 1})
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = _rss_kib("VmRSS") * 1024
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        res = run_rays(make_rays(), **settings)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024
    return {
        "mode": mode,
        "device": device,
        "dim": dim,
        "extra_peak_bytes": peak - base,
        "extra_peak_in_parameter_copies": (peak - base) / param_bytes,
        "seconds_per_direction": seconds / n_samples,
        "evals_per_direction": res.n_evals.double().mean().item(),
        "log_volume": res.log_volume,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n_samples, args.device)))
        return
    rows = []
    for mode in args.modes:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--n-samples",
                str(args.n_samples),
                "--device",
                args.device,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"MLP with D = {rows[0]['dim']:,} float32 parameters ({rows[0]['dim'] * 4 / 2**20:.0f} "
        f"MiB), {args.n_samples} directions on {args.device}"
    )
    print(
        f"{'mode':<8} {'extra peak MiB':>15} {'parameter copies':>17} "
        f"{'beyond 1 copy MiB':>18} {'s/direction':>12} {'evals/dir':>10} {'log_volume':>14}"
    )
    for r in rows:
        beyond = (r["extra_peak_bytes"] - 4 * r["dim"]) / 2**20
        print(
            f"{r['mode']:<8} {r['extra_peak_bytes'] / 2**20:>15.1f} "
            f"{r['extra_peak_in_parameter_copies']:>17.2f} {beyond:>18.1f} "
            f"{r['seconds_per_direction']:>12.2f} {r['evals_per_direction']:>10.2f} "
            f"{r['log_volume']:>14.6g}"
        )
    print(
        "light mode holds one saved copy of the parameters; what lies beyond it is the "
        "activations of a forward pass and a few direction chunks of "
        f"{CHUNK_SIZE:,} entries, independent of D; with a diagonal preconditioner "
        "(+pre) it also holds the scales in the parameters' precision (one more copy); "
        "+cache keeps the current direction in host memory (the default on accelerators, "
        "where that is not the model's memory; on the CPU it is one more copy) and draws "
        "it once per direction instead of once per evaluation"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()

"""GPU check: every accelerator path of Tyche on a Pythia-shaped GPT-NeoX, in one table.

A GPT-NeoX with Pythia-14m's shape (and one with Pythia-160m's, for memory) is built from a
config with random weights (nothing is downloaded) and evaluated on random token ids. Each
row runs one configuration of the estimator on the KL basin of that model (cutoff 1e-2,
rtol 1e-2, Gaussian prior) and reports:

- evals/dir: points evaluated per direction (one forward pass over the data each);
- calls/dir: forward-pass calls (a vmapped call of several points counts once);
- s/dir: seconds per direction after one warm-up direction (compilation, caches);
- setup s: building the objective (the centre's forward pass, cache) plus the warm-up;
- peak MiB: peak memory beyond the model during the measured run
  (``torch.cuda.max_memory_allocated`` on CUDA, peak resident memory on the CPU);
- restored: the model's parameters are bit-identical and its train/eval flags unchanged
  after the run;
- log P: the estimate, to compare rows (cache modes must agree exactly; compile, bfloat16
  and batching to float precision).

The rows: dense vs light (in-place) rays, the light mode with and without the host cache of
the direction (pinned on CUDA), ``compile=True`` vs eager, float32 vs bfloat16, each cache mode
of the centre's logits, batched directions (``model_batch_size``, vmap), the 160m shape in the
light and dense modes, and torchrun with 1 and 2 processes (NCCL on CUDA when there are two
GPUs, gloo otherwise) whose records must equal one process's bit for bit. A row that fails
prints its error and the script goes on, so one run on a new machine says everything.

Run on a GPU (about 5 minutes): ``python benchmarks/gpu_check.py``
On the CPU, the same code paths on smaller shapes (under 3 minutes; this is the slow test):
``python benchmarks/gpu_check.py --device cpu --quick``
Options: ``--skip-torchrun``, ``--json out.json``, ``--rows NAME [NAME ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

import basin_volume as bv  # noqa: E402
from basin_volume.causal import CausalLMKL  # noqa: E402
from basin_volume.estimator import run_rays  # noqa: E402
from basin_volume.ray_loop import WARMUP  # noqa: E402
from basin_volume.rays import InPlaceRays  # noqa: E402

SHAPES = {
    # Pythia's published configurations (GPT-NeoX, rotary on a quarter of each head)
    "14m": dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                intermediate_size=512, vocab_size=50304),
    "160m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, vocab_size=50304),
}  # fmt: skip
QUICK_SHAPES = {  # the same architecture, smaller, for --quick
    "14m": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=256, vocab_size=2048),
    "160m": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=512, vocab_size=4096),
}  # fmt: skip
SETTINGS = dict(cutoff=1e-2, rtol=1e-2, seed=0, progress=False)
TORCHRUN_DIRECTIONS = 18  # more than the 16 warm-up directions every rank runs itself


@dataclass
class Case:
    """One row: a model shape and the estimator's settings for it."""

    name: str
    shape: str = "14m"
    light: bool = False
    host_cache: bool | None = None
    compile: bool = False
    dtype: torch.dtype = torch.float32
    cache_mode: str | None = "auto"
    batch: int = 1
    options: dict = field(default_factory=dict)


def cases() -> list[Case]:
    return [
        Case("dense fp32 cache=gpu", cache_mode="gpu"),
        Case("dense fp32 cache=cpu", cache_mode="cpu"),
        Case("dense fp32 cache=auto", cache_mode="auto"),
        Case("dense fp32 no cache", cache_mode=None),
        Case("dense fp32 batch=4", batch=4),
        Case("light fp32 batch=4", light=True, batch=4),
        Case("light fp32", light=True, host_cache=False),
        Case("light fp32 host cache", light=True, host_cache=True),
        Case("dense fp32 compile", compile=True),
        Case("light fp32 compile", light=True, compile=True),
        Case("dense bf16", dtype=torch.bfloat16),
        Case("light bf16", light=True, dtype=torch.bfloat16),
        Case("light bf16 host cache", light=True, host_cache=True, dtype=torch.bfloat16),
        Case("160m light", shape="160m", light=True),
        Case("160m dense", shape="160m"),
    ]


def build_model(shape: str, device: torch.device, dtype: torch.dtype, quick: bool):
    """A GPT-NeoX of the given Pythia shape with random weights (seeded), in train mode."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    dims = (QUICK_SHAPES if quick else SHAPES)[shape]
    config = GPTNeoXConfig(**dims, max_position_embeddings=2048, rotary_pct=0.25)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config).to(device=device, dtype=dtype)
    model.train()  # the run must hand it back in train mode
    return model


def token_ids(vocab: int, quick: bool) -> torch.Tensor:
    n, length = (4, 32) if quick else (16, 128)
    return torch.randint(vocab, (n, length), generator=torch.Generator().manual_seed(1))


def snapshot(model) -> tuple[list[torch.Tensor], list[bool]]:
    return [p.detach().clone() for p in model.parameters()], [m.training for m in model.modules()]


def unchanged(model, before) -> bool:
    params, modes = before
    same = all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    return same and modes == [m.training for m in model.modules()]


class Memory:
    """Peak memory beyond what is allocated when :meth:`reset` is called."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.base = _status_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _status_kib("VmHWM") * 1024 - self.base


def _status_kib(name: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{name} missing from /proc/self/status")


def estimate_with(case: Case, model, fn: CausalLMKL, n_samples: int):
    """Run the estimator on ``fn`` as ``case`` says."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if case.light:
            params = [p for p in model.parameters() if p.requires_grad]
            batch_fn = torch.func.vmap(fn) if case.batch > 1 else None
            rays = InPlaceRays(fn, params, seed=0, preconditioner=None,
                               host_cache=case.host_cache, batch_fn=batch_fn)  # fmt: skip
            return run_rays(rays, n_samples=n_samples, measure="gaussian", sigma=None,
                            max_evals=40, max_radius=None, callback=None, resume_from=None,
                            meta={}, batch_size=case.batch, **SETTINGS)  # fmt: skip
        return bv.estimate(fn, fn.center, n_samples=n_samples, model_batch_size=case.batch,
                           **SETTINGS)  # fmt: skip


def run_case(case: Case, args) -> dict:
    device = torch.device(args.device)
    model = build_model(case.shape, device, case.dtype, args.quick)
    dim = sum(p.numel() for p in model.parameters())
    before = snapshot(model)
    ids = token_ids(model.config.vocab_size, args.quick)
    compile_opt = (args.compile_options or True) if case.compile else False
    memory = Memory(device)
    t0 = time.perf_counter()
    fn = CausalLMKL(model, ids, batch_size=args.data_batch_size, cache_mode=case.cache_mode,
                    compile=compile_opt)  # fmt: skip
    estimate_with(case, model, fn, 1)  # warm-up: compilation, allocator pools, code paths
    setup = time.perf_counter() - t0
    calls0 = fn.n_forward
    memory.reset()
    t0 = time.perf_counter()
    # batches form after the warm-up directions, which every run searches one at a time
    n = args.n_samples if case.batch == 1 else WARMUP + 2 * case.batch
    res = estimate_with(case, model, fn, n)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = memory.peak()
    row = {
        "directions": n,
        "dim": dim,
        "evals_per_direction": res.n_evals.double().mean().item(),
        "calls_per_direction": (fn.n_forward - calls0) / n,
        "seconds_per_direction": seconds / n,
        "setup_seconds": setup,
        "peak_bytes": peak,
        "restored": unchanged(model, before),
        "log_p": res.log_volume,
        "cache": str(fn.cache_device),
    }
    del fn, model
    return row


# ----------------------------------------------------------------------------- torchrun


def torchrun_problem(args):
    device = torch.device(args.device)
    if device.type == "cuda":
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", rank % torch.cuda.device_count())
    model = build_model("14m", device, torch.float32, args.quick)
    fn = CausalLMKL(model, token_ids(model.config.vocab_size, args.quick),
                    batch_size=args.data_batch_size, cache_mode="auto")  # fmt: skip
    return model, fn


def torchrun_results(args) -> dict:
    """Dense and light runs of :data:`TORCHRUN_DIRECTIONS` directions, as JSON-able dicts."""
    model, fn = torchrun_problem(args)
    out = {}
    cases = (("dense", Case("dense", batch=2)), ("light", Case("light", light=True, batch=2)))
    for name, case in cases:
        res = estimate_with(case, model, fn, TORCHRUN_DIRECTIONS)
        out[name] = {k: getattr(res, k).tolist() for k in ("estimates", "radii", "n_evals")}
        out[name]["status"] = list(res.status)
    return out


def torchrun_child(args) -> None:
    out = torchrun_results(args)
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    with open(args.torchrun_child, "w") as fh:
        json.dump({"world": dist.get_world_size() if dist.is_initialized() else 1, **out}, fh)


def child_run(nproc: int, args) -> tuple[dict, str, float]:
    """The torchrun child's records with ``nproc`` processes (0: plain python, no torchrun)."""
    cuda = torch.device(args.device).type == "cuda"
    backend = "nccl" if cuda and torch.cuda.device_count() >= max(nproc, 1) else "gloo"
    # one thread per process everywhere, so that the reference and the ranks run the same
    # kernels (CPU matmuls round differently with other thread counts)
    env = {**os.environ, "BASIN_VOLUME_BACKEND": backend, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, "records.json")
        launcher = [sys.executable]
        if nproc:
            launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                         "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0"]  # fmt: skip
        cmd = [*launcher, os.path.abspath(__file__), "--torchrun-child", target, "--device",
               args.device, "--data-batch-size", str(args.data_batch_size)]  # fmt: skip
        if args.quick:
            cmd.append("--quick")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.torchrun_timeout,
                              env=env)  # fmt: skip
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"exited {proc.returncode}: {proc.stderr[-1500:]}")
        with open(target) as fh:
            return json.load(fh), backend, seconds


def run_torchrun(nproc: int, args, reference: dict) -> dict:
    got, backend, seconds = child_run(nproc, args)
    if got["world"] == 1:
        backend = "no process group"  # torchrun with one process: nothing to join
    elif backend == "gloo" and torch.device(args.device).type == "cuda":
        backend = "gloo (fewer GPUs than processes: NCCL needs one GPU per rank)"
    row = {"backend": backend, "world": got["world"], "seconds": seconds}
    for name in ("dense", "light"):
        row[f"identical_{name}"] = got[name] == reference[name]
        diffs = [abs(a - b) for a, b in zip(got[name]["estimates"], reference[name]["estimates"],
                                            strict=True)]  # fmt: skip
        row[f"max_diff_{name}"] = max(diffs)
    return row


# ----------------------------------------------------------------------------- driver


def guarded(name: str, work: Callable[[], dict]) -> dict:
    """Run one row; an exception becomes the row's error instead of ending the script."""
    t0 = time.perf_counter()
    try:
        row = work()
    except Exception as err:  # noqa: BLE001 - report every failure, run every row
        row = {"error": f"{type(err).__name__}: {err}".splitlines()[0][:300],
               "traceback": traceback.format_exc()[-2000:]}  # fmt: skip
    row["wall_seconds"] = time.perf_counter() - t0
    row["name"] = name
    return row


def print_row(row: dict) -> None:
    name = row["name"]
    if "error" in row:
        print(f"{name:<24} ERROR {row['error']}", flush=True)
    elif "backend" in row:
        verdict = "same" if row["identical_dense"] and row["identical_light"] else "DIFFERENT"
        print(f"{name:<24} {row['backend']}, {row['world']} process(es): records {verdict} as "
              f"one process (largest |estimate difference|: dense {row['max_diff_dense']:.3g}, "
              f"light {row['max_diff_light']:.3g}); "
              f"{row['seconds']:.1f} s", flush=True)  # fmt: skip
    else:
        print(f"{name:<24} {row['dim']:>11,} {row['evals_per_direction']:>9.2f} "
              f"{row['calls_per_direction']:>9.2f} {row['seconds_per_direction']:>8.4f} "
              f"{row['setup_seconds']:>8.2f} {row['peak_bytes'] / 2**20:>9.1f} "
              f"{'yes' if row['restored'] else 'NO':>8} {row['log_p']:>14.8g} "
              f"{row['cache']:>7}", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smaller shapes (for the CPU)")
    parser.add_argument("--n-samples", type=int, default=None, help="directions per row")
    parser.add_argument("--data-batch-size", type=int, default=8)
    parser.add_argument("--rows", nargs="+", help="run only the rows whose name contains one")
    parser.add_argument("--skip-torchrun", action="store_true")
    parser.add_argument("--torchrun-timeout", type=float, default=240.0)
    parser.add_argument("--json")
    parser.add_argument("--torchrun-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.n_samples is None:
        args.n_samples = 2 if args.quick else 8
    # torch.compile's inductor backend takes minutes to build kernels on a CPU; --quick on
    # the CPU runs the same compile path (dynamo tracing of the functional call) through
    # the eager backend instead
    quick_cpu = args.quick and torch.device(args.device).type == "cpu"
    args.compile_options = {"backend": "eager"} if quick_cpu else None
    if args.torchrun_child:
        torchrun_child(args)
        return
    started = time.perf_counter()
    device = torch.device(args.device)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"Tyche GPU check on {args.device} ({label}), torch {torch.__version__}, "
          f"{args.n_samples} directions per row{', quick shapes' if args.quick else ''}"
          f"{', compile backend eager' if quick_cpu else ''}", flush=True)  # fmt: skip
    print(
        f"{'row':<24} {'D':>11} {'evals/dir':>9} {'calls/dir':>9} {'s/dir':>8} "
        f"{'setup s':>8} {'peak MiB':>9} {'restored':>8} {'log P':>14} {'cache':>7}"
    )
    rows = []
    for case in cases():
        if args.rows and not any(r in case.name for r in args.rows):
            continue
        row = guarded(case.name, lambda case=case: run_case(case, args))
        print_row(row)
        rows.append(row)
    if not args.skip_torchrun:
        reference = guarded("torchrun reference", lambda: child_run(0, args)[0])
        for nproc in (1, 2):
            name = f"torchrun {nproc} proc"
            if "error" in reference:
                row = {**reference, "name": name}
            else:
                row = guarded(name, lambda nproc=nproc: run_torchrun(nproc, args, reference))
            print_row(row)
            rows.append(row)
    failed = [r["name"] for r in rows if "error" in r or not r.get("restored", True)]
    failed += [r["name"] for r in rows if "backend" in r and not (r["identical_dense"] and
                                                                 r["identical_light"])]  # fmt: skip
    total = time.perf_counter() - started
    print(f"{len(rows)} rows in {total:.0f} s; "
          + (f"FAILED: {', '.join(failed)}" if failed else "all rows ran"))  # fmt: skip
    for row in rows:
        if "traceback" in row:
            print(f"\n--- {row['name']} ---\n{row['traceback']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": args.device, "label": label, "quick": args.quick,
                       "seconds": total, "rows": rows}, fh, indent=1)  # fmt: skip
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

"""The commands ``estimate``, ``scan``, ``plot``, ``compare`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from ..jsonfloat import encode
from ._types import UsageError, _first_line, _looks_like_path
from .assemble import (
    _ESTIMATION_DEFAULTS,
    _check_output,
    _load_data,
    _prepare,
    _run_mapped,
    _source,
    _spec,
    _status,
)


# ---------------------------------------------------------------------------- commands
def _estimate(args: argparse.Namespace) -> int:
    from ..runfile import records_path, run_to_file
    from ..volume_estimator import VolumeEstimator

    output = _check_output(args.output, args)
    started = time.perf_counter()
    dataset = _load_data(args)
    loaded = _prepare(args, dataset)
    source = _source(args, loaded, dataset)
    spec = {"command": "estimate", **_spec(args, loaded.model_type)}
    if not isinstance(source, dict):  # built once: its preconditioner serves both paths
        source = _run_mapped(lambda: VolumeEstimator.from_config(source))
    if _runs_smc(source, args):
        return _estimate_smc(args, source, output, started)
    _status(args, f"estimating; each direction is saved to {records_path(output)} as it finishes")
    result = _interruptible(
        lambda: _run_mapped(
            lambda: run_to_file(
                source, output, resume=args.resume, overwrite=args.overwrite, spec=spec
            )
        ),
        lambda: _saved_message(output),
    )
    print(result.summary())
    if result.measure == "gaussian":
        print(f"information content: {result.information:.6g} nats")
    print(f"wrote {output} in {time.perf_counter() - started:.1f} s")
    return 0


def _runs_smc(source, args) -> bool:
    """Whether the run is an SMC run (saved when it ends), not a run log of directions:
    ``--method smc``, or ``auto`` (the default) where SMC applies and ``--resume`` is not
    given (a run log is resumed by importance sampling)."""
    from ..estimator import resolve_method
    from ..preconditioners import as_preconditioner

    if not isinstance(source, dict):
        return source.runs_smc() and not (args.resume and source.config.method == "auto")
    method = source.get("method", "auto")
    if method != "auto":
        return method == "smc"
    if args.resume:
        return False
    pre = as_preconditioner(source.get("preconditioner"), source["center"].numel())
    n = source.get("n_samples", 100)
    return resolve_method(method, pre, n_samples=n, resume_from=None, callback=None).value == "smc"


def _estimate_smc(args, source, output: Path, started: float) -> int:
    """SMC: one run saved when it ends (it is not a sequence of directions that a run log
    could hold)."""
    from .. import estimate

    if args.resume:
        raise UsageError("--resume", "an SMC run cannot be resumed; leave --resume out or use "
                         "--method is")
    _status(args, f"estimating by SMC; the result is saved to {output} when it ends")
    if isinstance(source, dict):
        result = _run_mapped(lambda: estimate(**{**source, "method": "smc"}))
    else:
        result = _run_mapped(source.run)
    result.save(output)
    print(result.summary())
    if result.measure == "gaussian":
        print(f"information content: {result.information:.6g} nats")
    print(f"wrote {output} in {time.perf_counter() - started:.1f} s")
    return 0


def _saved_message(output: Path) -> str:
    from ..runfile import read_run, records_path

    log = records_path(output)
    done = len(read_run(log).records) if log.exists() else 0
    return f"{done} directions are saved in {log}"


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that a run stops as on Ctrl-C (the model is
    restored and the run log closed by the usual ``finally`` blocks)."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated


def _interruptible(run: Callable, saved: Callable[[], str]):
    """Run; on Ctrl-C or SIGTERM say what is saved and how to continue, and exit with status
    130 or 143."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    try:
        return run()
    except (KeyboardInterrupt, _Terminated) as err:
        what, status = (
            ("interrupted", 130) if isinstance(err, KeyboardInterrupt) else ("terminated", 143)
        )
        print(
            f"\n{what}: {saved()}; run the same command with --resume to continue",
            file=sys.stderr,
        )
        raise SystemExit(status) from None
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


_STEP_PATTERN = re.compile(r"(?:step|checkpoint|ckpt|iter)[-_]?(\d+)", re.IGNORECASE)


def _step_of(name: str) -> float | None:
    matches = _STEP_PATTERN.findall(name)
    return float(matches[-1]) if matches else None


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_") or "run"


class _LazySource:
    """Loads a checkpoint only when the scan gets to it."""

    def __init__(self, build: Callable, n_samples: int):
        self._build = build
        self.n_samples = n_samples

    def __call__(self):
        return self._build()


def _scan(args: argparse.Namespace) -> int:
    from ..runfile import scan

    out_dir = Path(args.output_dir).expanduser()
    _check_output(str(out_dir / "scan.json"), args, option="--output-dir")
    dataset = _load_data(args)
    chosen = [k for k in ("cutoffs", "checkpoints", "revisions") if getattr(args, k)]
    if args.model_type == "pythia" and args.steps and not chosen:
        args.revisions = [f"step{int(s)}" for s in args.steps]
        chosen = ["revisions"]
    if len(chosen) != 1:
        raise UsageError(
            "--cutoffs",
            "give exactly one of --cutoffs, --checkpoints or --revisions (with --model-type "
            "pythia, --steps alone scans those training steps)",
        )
    kind = chosen[0]
    n_samples = args.n_samples or _ESTIMATION_DEFAULTS["n_samples"]
    started = time.perf_counter()
    if kind == "cutoffs":
        if args.cutoff is not None:
            raise UsageError("--cutoff", "--cutoffs gives the cutoffs; leave --cutoff out")
        if args.steps:
            raise UsageError("--steps", "--steps labels checkpoints; leave it out with --cutoffs")
        loaded = _prepare(args, dataset)
        base_spec = {"command": "scan", **_spec(args, loaded.model_type)}
        sources = [_source(args, loaded, dataset, {"cutoff": c}) for c in args.cutoffs]
        values, axis = list(args.cutoffs), "cutoff"
        names = [f"cutoff_{c:g}" for c in args.cutoffs]
    else:
        if kind == "checkpoints" and args.model is not None:
            raise UsageError(
                "--model", "--checkpoints names the models; leave --model out (or use --revisions)"
            )
        if kind == "revisions" and args.model is None:
            raise UsageError("--model", "--revisions needs the hub model they belong to")
        items = list(getattr(args, kind))
        if args.steps and len(args.steps) != len(items):
            raise UsageError(
                "--steps", f"give one step per checkpoint ({len(items)}), got {len(args.steps)}"
            )
        parsed = [_step_of(Path(item).name if kind == "checkpoints" else item) for item in items]
        if args.steps:
            values = [float(s) for s in args.steps]
        elif all(v is not None for v in parsed):
            values = parsed
        else:
            values = [float(i) for i in range(len(items))]
        axis = "step" if args.steps or all(v is not None for v in parsed) else "checkpoint"
        names = [
            f"step_{int(v)}" if axis == "step" else _safe_name(Path(item).name)
            for v, item in zip(values, items, strict=True)
        ]
        if len(set(names)) != len(names):
            names = [f"{i:03d}_{n}" for i, n in enumerate(names)]
        if kind == "checkpoints":
            for item in items:
                head = item.rpartition(":")[0] if ":" in item else item  # module:function
                if not Path(head).expanduser().exists() and _looks_like_path(head):
                    raise UsageError("--checkpoints", f"no such checkpoint {head!r}")
        base_spec = {"command": "scan", **_spec(args, args.model_type)}
        sources = [
            _LazySource(_checkpoint_builder(args, dataset, kind, item), n_samples) for item in items
        ]
    rows = _interruptible(
        lambda: _run_mapped(
            lambda: scan(
                sources,
                out_dir,
                values=values,
                axis=axis,
                names=names,
                resume=args.resume,
                overwrite=args.overwrite,
                spec=base_spec,
            ),
            output_option="--output-dir",
        ),
        lambda: f"finished points and the directions done so far are saved in {out_dir}",
    )
    from ..plots import compare_results, format_comparison

    table = compare_results([row["file"] for row in rows], labels=[row["name"] for row in rows])
    print(format_comparison(table, varied=("cutoff",) if axis == "cutoff" else ()))
    print(
        f"wrote {len(rows)} results, {out_dir / 'scan.json'} and {out_dir / 'scan.png'} in "
        f"{time.perf_counter() - started:.1f} s"
    )
    return 0


def _checkpoint_builder(args, dataset, kind: str, item: str) -> Callable:
    def build():
        if kind == "checkpoints":
            loaded = _prepare(args, dataset, model_spec=item)
        else:
            loaded = _prepare(args, dataset, revision=item)
        return _source(args, loaded, dataset)

    return build


def _plot(args: argparse.Namespace) -> int:
    from ..plots import plot_results, plot_scan

    files = [Path(f).expanduser() for f in args.files]
    for f in files:
        if not f.exists() and not _records_exists(f):
            raise UsageError("RESULTS", f"no such results file {str(f)!r}")
    first = files[0]
    output = args.output or str(
        first.with_name(first.name.removesuffix(".records.jsonl").removesuffix(".json") + ".png")
    )
    _check_writable_plain(output)
    scan_file = len(files) == 1 and _is_scan_file(first)
    try:
        if scan_file:
            plot_scan(first, output, title=args.title)
        else:
            plot_results(files, output, labels=args.labels, title=args.title)
    except (ValueError, OSError) as err:
        raise UsageError("RESULTS", _first_line(err)) from None
    print(f"wrote {output}")
    return 0


def _records_exists(path: Path) -> bool:
    from ..runfile import records_path

    return records_path(path).exists()


def _is_scan_file(path: Path) -> bool:
    if path.suffix != ".json" or not path.is_file():
        return False
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "rows" in data and "format" not in data


def _check_writable_plain(output: str) -> None:
    from ..runfile import check_writable

    try:
        check_writable(output)
    except OSError as err:
        raise UsageError("--output", f"{_first_line(err)}; choose a path you can write") from None


def _compare(args: argparse.Namespace) -> int:
    from ..plots import compare_results, format_comparison

    for f in args.files:
        if not Path(f).exists() and not _records_exists(Path(f)):
            raise UsageError("RESULTS", f"no such results file {f!r}")
    if not -len(args.files) <= args.reference < len(args.files):
        raise UsageError(
            "--reference", f"must be an index from 0 to {len(args.files) - 1}, got {args.reference}"
        )
    try:
        rows = compare_results(args.files, labels=args.labels, reference=args.reference)
    except ValueError as err:
        option = "--labels" if "labels" in str(err) else "RESULTS"
        raise UsageError(option, _first_line(err)) from None
    if args.json:
        print(json.dumps([{k: encode(v) for k, v in r.items()} for r in rows], indent=1))
    else:
        print(format_comparison(rows, reference=args.reference))
    return 0


DEMO_MOVES = 3  # moves per SMC level: half an hour on 2 cores (decorrelated moves: hours)
# and no backward pass, which would double that


def _demo(args: argparse.Namespace) -> int:
    from ..config import VolumeConfig
    from ..digits import train_digits_mlp
    from ..volume_estimator import VolumeEstimator

    started = time.perf_counter()
    print("training the digits MLP (64 -> 64 GELU -> 10, Adam, 1024 examples)...", flush=True)
    run = train_digits_mlp(seed=args.seed)
    dim = sum(p.numel() for p in run.model.parameters())
    print(f"  test accuracy {run.accuracy:.3f}, D = {dim} parameters", flush=True)
    cfg = VolumeConfig(
        model_type="mlp",
        model=run.model,
        inputs=run.train_inputs,
        n_samples=args.n_samples,
        cutoff=args.cutoff,
        seed=args.seed,
        progress=not args.quiet,
        n_moves=DEMO_MOVES,
        bidirectional=False,
    )
    estimator = VolumeEstimator.from_config(cfg)
    how = (f"by SMC, {args.n_samples} particles x {cfg.replicas} replicas"
           if estimator.runs_smc() else f"with {args.n_samples} directions")
    print(f"estimating its KL basin (cutoff {args.cutoff:g} nats) under the Gaussian prior "
          f"{how}...", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the summary below states the same caveats
        result = estimator.run()
    print(result.summary())
    print(f"information content: {result.information:.6g} nats")
    print(f"done in {time.perf_counter() - started:.1f} s")
    if args.output and int(os.environ.get("RANK", "0")) == 0:
        result.save(args.output)
        print(f"saved {args.output}")
    return 0

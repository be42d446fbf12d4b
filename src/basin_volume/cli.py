"""Command line: ``basin-volume demo``."""

from __future__ import annotations

import argparse
import sys
import time


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def _demo(args: argparse.Namespace) -> int:
    from .config import VolumeConfig, VolumeEstimator
    from .digits import train_digits_mlp

    started = time.perf_counter()
    print("training the digits MLP (64 -> 64 GELU -> 10, Adam, 1024 examples)...", flush=True)
    run = train_digits_mlp(seed=args.seed)
    dim = sum(p.numel() for p in run.model.parameters())
    print(f"  test accuracy {run.accuracy:.3f}, D = {dim} parameters", flush=True)
    print(
        f"estimating its KL basin (cutoff {args.cutoff:g} nats) under the Gaussian prior "
        f"with {args.n_samples} directions...",
        flush=True,
    )
    cfg = VolumeConfig(
        model_type="mlp",
        model=run.model,
        inputs=run.train_inputs,
        n_samples=args.n_samples,
        cutoff=args.cutoff,
        seed=args.seed,
        progress=not args.quiet,
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the summary below states the same caveats
        result = VolumeEstimator.from_config(cfg).run()
    print(result.summary())
    print(f"information content: {result.information:.6g} nats")
    print(f"done in {time.perf_counter() - started:.1f} s")
    if args.output:
        result.save(args.output)
        print(f"saved {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="basin-volume",
        description="Tyche: estimate how much of parameter space behaves like a trained "
        "network (log probability of its basin under the initialisation prior, in nats).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train the bundled digits MLP and estimate its basin",
        description="Train the digits MLP on scikit-learn's bundled digits and estimate the "
        "log probability that a random initialisation N(0, sigma^2 I), sigma = RMS of the "
        "trained weights, lands in its KL basin.",
    )
    demo.add_argument(
        "--n-samples", type=_positive_int, default=100, help="random directions (default 100)"
    )
    demo.add_argument(
        "--cutoff",
        type=_positive_float,
        default=1e-2,
        help="KL cutoff in nats that defines the basin (default 0.01)",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of training and directions")
    demo.add_argument("--output", help="write the result as JSON to this path")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``basin-volume`` command."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

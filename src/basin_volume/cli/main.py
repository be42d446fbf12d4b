"""The entry point ``basin-volume``: parse, run one command, turn errors into one line."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from collections.abc import Sequence

from ._types import UsageError
from .parser import build_parser


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> None:
    text = " ".join(str(message).split())
    print(f"warning: {text}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``basin-volume`` command.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status (0 on success). Bad arguments exit with status 2 (``SystemExit``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("estimate", "scan"):
        if args.resume and args.overwrite:
            args.parser.error("argument --resume: --resume and --overwrite exclude each other")
    from ..estimator import RadiusSearchWarning
    from ..result import LowESSWarning

    with warnings.catch_warnings():
        # The printed summary states these caveats; other warnings are shown on one line.
        warnings.simplefilter("ignore", LowESSWarning)
        warnings.simplefilter("ignore", RadiusSearchWarning)
        previous = warnings.showwarning
        warnings.showwarning = _one_line_warnings
        output = contextlib.nullcontext()
        if int(os.environ.get("RANK", "0")) > 0:  # under torchrun rank 0 reports
            args.quiet, output = True, contextlib.redirect_stdout(io.StringIO())
        try:
            with output:
                status = args.handler(args)
                sys.stdout.flush()  # a closed pipe shows up here, not at exit
                return status
        except BrokenPipeError:  # e.g. `basin-volume compare ... | head`: the reader left
            _discard_stdout()
            return 1
        except UsageError as err:
            args.parser.error(f"argument {err.option}: {err.message}")
        finally:
            warnings.showwarning = previous
    return 2  # not reached: error() exits


def _discard_stdout() -> None:
    """Point stdout at the null device, so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (e.g. captured)
        pass


if __name__ == "__main__":
    sys.exit(main())

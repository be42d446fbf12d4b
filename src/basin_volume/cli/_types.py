"""Argument types of the command line: one-line errors naming the option, and the choice lists."""

from __future__ import annotations

import argparse
import os

from ..causal import CacheMode
from ..config import ModelType
from ..preconditioners import PreconditionerType
from ..settings import Measure

DATA_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".tsv")
MODEL_TYPES = ("auto", *(kind.value for kind in ModelType))
PRECONDITIONERS = tuple(kind.value for kind in PreconditionerType)
CACHE_MODES = ("auto", "none", *(mode.value for mode in CacheMode if mode is not CacheMode.AUTO))
MEASURES = tuple(measure.value for measure in Measure)
DTYPES = ("auto", "float32", "float64", "bfloat16", "float16")


class UsageError(ValueError):
    """A bad command-line argument: ``option`` names it, the message says how to fix it."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option = option
        self.message = message


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str):  # noqa: D102 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------- argument types
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


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _rtol(text: str) -> float:
    from ..checks import check_rtol

    try:
        return check_rtol(_positive_float(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _seed(text: str) -> int:
    from ..checks import check_seed

    try:
        return check_seed(int(text))
    except ValueError as err:
        message = str(err) if "seed" in str(err) else f"expected an integer, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def _eps(text: str) -> float | str:
    return "prior" if text == "prior" else _nonnegative_float(text)


def _parameters(text: str) -> str | list[str]:
    """``--parameters``: ``trainable``, ``all``, or comma-separated names / glob patterns."""
    text = text.strip()
    if text in ("trainable", "all"):
        return text
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(
            "give trainable, all, or comma-separated parameter names or glob patterns"
        )
    return names


# ---------------------------------------------------------------------------- loading: data
def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _looks_like_path(spec: str) -> bool:
    """A local path rather than a hub name (hub names are ``name`` or ``org/name``)."""
    return (
        spec.startswith((".", "/", "~"))
        or spec.lower().endswith(DATA_SUFFIXES)
        or spec.count("/") >= 2
        or (os.sep != "/" and os.sep in spec)
    )

"""Command line: ``basin-volume demo | estimate | plot | compare | scan``.

Every command is a thin layer over Python functions of the same names:
``estimate`` -> :func:`basin_volume.runfile.run_to_file`, ``plot`` ->
:func:`basin_volume.plots.plot_results` (and :func:`~basin_volume.plots.plot_scan`),
``compare`` -> :func:`basin_volume.plots.compare_results`, ``scan`` ->
:func:`basin_volume.runfile.scan`. The model and data arguments are resolved by
:func:`load_model` and :func:`load_text_data`, also usable from Python.

A bad argument ends the command with one line naming the option and the fix, and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["LoadedModel", "UsageError", "build_parser", "load_model", "load_text_data", "main"]

DATA_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".tsv")
MODEL_TYPES = ("auto", "causal", "classifier", "mlp", "pythia")
PRECONDITIONERS = ("none", "adam", "fisher", "fisher_dense", "adaptive")
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
    from .checks import check_rtol

    try:
        return check_rtol(_positive_float(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _seed(text: str) -> int:
    from .checks import check_seed

    try:
        return check_seed(int(text))
    except ValueError as err:
        message = str(err) if "seed" in str(err) else f"expected an integer, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def _eps(text: str) -> float | str:
    return "prior" if text == "prior" else _nonnegative_float(text)


# ---------------------------------------------------------------------------- loading: data
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


def _read_records(path: Path, text_field: str) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            lines = path.read_text(encoding="utf-8").splitlines()
            return [{text_field: line} for line in lines if line.strip()]
        if suffix == ".jsonl":
            rows = []
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, start=1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as err:
                            raise UsageError(
                                "--data", f"{path} line {lineno} is not JSON ({err.msg})"
                            ) from None
            return rows
        if suffix == ".json":
            with open(path, encoding="utf-8") as fh:
                try:
                    data = json.load(fh)
                except json.JSONDecodeError as err:
                    raise UsageError("--data", f"{path} is not valid JSON ({err})") from None
            if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
                keys = list(data)
                n = len(data[keys[0]]) if keys else 0
                return [{k: data[k][i] for k in keys} for i in range(n)]
            if isinstance(data, list):
                return data
            raise UsageError(
                "--data",
                f'{path} must hold a list of records or an object of columns ({{"text": [...]}})',
            )
        import csv

        with open(path, encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
    except UnicodeDecodeError as err:
        raise UsageError("--data", f"{path} is not UTF-8 text ({err.reason})") from None


def load_text_data(
    spec: str,
    *,
    split: str = "train",
    text_field: str = "text",
    config: str | None = None,
):
    """A text data set from a local file, a saved ``datasets`` folder, or the hub.

    Parameters
    ----------
    spec : str
        A ``.txt`` file (one text per non-empty line), ``.json`` (a list of records, or an
        object of equal-length columns), ``.jsonl`` (one record per line), ``.csv``/``.tsv``,
        a folder written by ``Dataset.save_to_disk``, or a hub data set name.
    split : str
        The split of a hub data set or of a saved ``DatasetDict``.
    text_field : str
        The field holding the texts (for ``.txt`` files, the name given to the lines).
    config : str, optional
        The configuration (subset) of a hub data set.

    Returns
    -------
    datasets.Dataset

    Raises
    ------
    UsageError
        Naming ``--data``, ``--split`` or ``--text-field``: a missing file, an empty data set,
        a text field that is not in it.
    """
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() not in DATA_SUFFIXES:
            raise UsageError(
                "--data",
                f"{spec} has an unknown extension; give a {', '.join(DATA_SUFFIXES)} file",
            )
        rows = _read_records(path, text_field)
        if not rows or not all(isinstance(r, dict) for r in rows):
            raise UsageError("--data", f"{spec} holds no records; give a file with texts in it")
        fields = list(dict.fromkeys(k for r in rows for k in r))
        if text_field not in fields:
            raise UsageError(
                "--text-field",
                f"{text_field!r} is not a field of {spec} (its fields: {', '.join(fields)}); "
                "pass --text-field <one of them>",
            )
        bad = [i for i, r in enumerate(rows) if not isinstance(r.get(text_field), str)]
        if bad:
            raise UsageError(
                "--text-field",
                f"record {bad[0]} of {spec} has no text in {text_field!r} "
                f"(found {rows[bad[0]].get(text_field)!r}); every record needs a string there",
            )
        dataset = Dataset.from_list(rows)
    elif path.is_dir():
        try:
            dataset = load_from_disk(str(path))
        except Exception as err:  # noqa: BLE001 - any failure means "not a saved data set"
            raise UsageError(
                "--data",
                f"{spec} is a folder but not a data set saved with save_to_disk "
                f"({_first_line(err)})",
            ) from None
        if isinstance(dataset, DatasetDict):
            if split not in dataset:
                raise UsageError(
                    "--split", f"{spec} has no split {split!r} (it has {', '.join(dataset)})"
                )
            dataset = dataset[split]
    elif _looks_like_path(spec):
        raise UsageError(
            "--data",
            f"no such file {spec!r}; give a {'/'.join(DATA_SUFFIXES)} file, a saved data set "
            "folder or a hub data set name",
        )
    else:
        try:
            dataset = load_dataset(spec, config, split=split)
        except ValueError as err:
            if "split" in str(err).lower():
                raise UsageError("--split", f"{spec}: {_first_line(err)}") from None
            raise UsageError("--data", f"cannot load {spec!r}: {_first_line(err)}") from None
        except Exception as err:  # noqa: BLE001 - network, missing data set, offline mode
            raise UsageError(
                "--data",
                f"cannot load the hub data set {spec!r} ({_first_line(err)}); check the name "
                "and your connection, or give a local file",
            ) from None
    if text_field not in dataset.column_names:
        raise UsageError(
            "--text-field",
            f"{text_field!r} is not a field of {spec} (its fields: "
            f"{', '.join(dataset.column_names)}); pass --text-field <one of them>",
        )
    if len(dataset) == 0:
        raise UsageError("--data", f"{spec} (split {split!r}) is empty; give a data set with texts")
    return dataset


# ---------------------------------------------------------------------------- loading: models
@dataclasses.dataclass
class LoadedModel:
    """A resolved ``--model`` (see :func:`load_model`).

    Attributes
    ----------
    model_type : str
        ``"causal"``, ``"classifier"``, ``"mlp"`` or ``"function"`` (an ``(fn, center)``
        objective).
    config : dict
        :class:`~basin_volume.VolumeConfig` fields (``model``, ``tokenizer``, ``inputs``...).
    estimate : dict, optional
        For ``"function"``: the arguments of :func:`basin_volume.estimate` (``fn``,
        ``center``, ...).
    optimizer : optional
        The optimizer (or its state) when the model comes with one (the digits MLP).
    folder : pathlib.Path, optional
        The local model folder.
    needs_data : bool
        Whether ``--data`` must supply the texts.
    """

    model_type: str
    config: dict
    estimate: dict | None = None
    optimizer: Any = None
    folder: Path | None = None
    needs_data: bool = False


def _device(name: str):
    import torch

    from .devices import default_device

    if name == "auto":  # under torchrun, each process its own GPU
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(
            "--device", f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device", "CUDA is not available here; use --device cpu or auto")
    if device.type == "cuda" and device.index is None:  # under torchrun: this process's GPU
        return default_device()
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device", "MPS is not available here; use --device cpu or auto")
    return device


def _import_function(spec: str) -> Callable:
    module_name, _, func_name = spec.rpartition(":")
    if not module_name or not func_name.isidentifier():
        raise UsageError("--model", f"{spec!r} is not module:function (e.g. mymodels:build)")
    try:
        if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
            file = Path(module_name).expanduser()
            if not file.is_file():
                raise UsageError("--model", f"no such file {module_name!r} in {spec!r}")
            mod_spec = importlib.util.spec_from_file_location(file.stem, file)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            added = os.getcwd() not in sys.path
            if added:
                sys.path.insert(0, os.getcwd())
            try:
                module = importlib.import_module(module_name)
            finally:
                if added:
                    sys.path.remove(os.getcwd())
    except ModuleNotFoundError as err:
        raise UsageError(
            "--model", f"cannot import {module_name!r} ({err}); check the module name and path"
        ) from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UsageError("--model", f"module {module_name!r} has no function {func_name!r}")
    return func


def _from_function(spec: str) -> LoadedModel:
    import torch

    from .config import VolumeConfig

    value = _import_function(spec)()
    if isinstance(value, VolumeConfig):
        cfg = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        model_type = getattr(cfg["model_type"], "value", cfg["model_type"])
        lm_without_data = model_type in ("causal", "pythia") and cfg["dataset"] is None
        return LoadedModel(model_type, cfg, needs_data=lm_without_data)
    if isinstance(value, dict):
        if "fn" in value or "center" in value:
            return LoadedModel("function", {}, estimate=dict(value))
        model_type = str(getattr(value.get("model_type"), "value", value.get("model_type")))
        if model_type == "None":
            model_type = "causal" if "tokenizer" in value else "classifier"
        lm_without_data = model_type in ("causal", "pythia") and value.get("dataset") is None
        return LoadedModel(
            model_type, {**value, "model_type": model_type}, needs_data=lm_without_data
        )
    if isinstance(value, tuple | list):
        value = tuple(value)
        if len(value) == 2 and isinstance(value[0], torch.nn.Module):
            if not isinstance(value[1], torch.Tensor):
                raise UsageError(
                    "--model",
                    f"{spec} returned (model, {type(value[1]).__name__}); a classifier needs "
                    "(model, inputs) with inputs a tensor",
                )
            return LoadedModel("classifier", {"model": value[0], "inputs": value[1]})
        if len(value) == 2 and callable(value[0]) and isinstance(value[1], torch.Tensor):
            return LoadedModel("function", {}, estimate={"fn": value[0], "center": value[1]})
        if len(value) == 3 and isinstance(value[0], torch.nn.Module):
            return LoadedModel(
                "causal", {"model": value[0], "tokenizer": value[1], "dataset": value[2]}
            )
    if isinstance(value, torch.nn.Module):
        raise UsageError(
            "--model",
            f"{spec} returned a model without data; return (model, inputs) for a classifier "
            "or (model, tokenizer, dataset) for a language model",
        )
    raise UsageError(
        "--model",
        f"{spec} returned {type(value).__name__}; return (model, inputs), (model, tokenizer, "
        "dataset), (fn, center), a dict of VolumeConfig fields or a VolumeConfig",
    )


def _hf_causal(name: str, *, revision: str | None, local: bool, progress: bool) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()

    where = f"folder {name}" if local else f"hub model {name!r}"
    kwargs = {} if local or revision is None else {"revision": revision}
    if local and not (Path(name) / "config.json").is_file():
        raise UsageError(
            "--model",
            f"{name} has no config.json; give a folder written by save_pretrained, a hub "
            "name, 'digits' or module:function",
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except ValueError as err:
        message = _first_line(err)
        option = "--model-type" if "unrecognized" in message.lower() else "--model"
        raise UsageError(
            option,
            f"the {where} cannot be loaded as a Hugging Face causal language model "
            f"({message}); give a causal LM, or module:function for other models",
        ) from None
    except OSError as err:
        raise UsageError(
            "--model" if revision is None or local else "--revision",
            f"cannot load the {where}"
            + (f" at revision {revision!r}" if revision and not local else "")
            + f" ({_first_line(err)}); check the name and your connection, or give a folder",
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        raise UsageError(
            "--model",
            f"the {where} has no usable tokenizer ({_first_line(err)}); save one beside the "
            "model with tokenizer.save_pretrained",
        ) from None
    return LoadedModel(
        "causal",
        {"model": model, "tokenizer": tokenizer},
        folder=Path(name) if local else None,
        needs_data=True,
    )


def load_model(
    spec: str,
    *,
    model_type: str = "auto",
    revision: str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    digits_steps: int = 1000,
    digits_seed: int = 0,
    progress: bool = True,
) -> LoadedModel:
    """Resolve a ``--model`` argument into a model (and, where it brings some, its data).

    Parameters
    ----------
    spec : str
        ``digits`` (the bundled digits MLP, trained here), a local Hugging Face model folder,
        a hub name (``EleutherAI/pythia-14m``), a Pythia size with ``model_type="pythia"``
        (``14m``), or ``module:function`` / ``path/to/file.py:function``. The function takes no
        arguments and returns ``(model, inputs)`` (a classifier and its evaluation inputs),
        ``(model, tokenizer, dataset)`` (a causal LM), ``(fn, center)`` (any objective of a
        flat parameter vector), a dict of :class:`~basin_volume.VolumeConfig` fields, or a
        ``VolumeConfig``.
    model_type : {"auto", "causal", "classifier", "mlp", "pythia"}
        ``auto`` infers it from ``spec``.
    revision : str, optional
        Hub revision (branch, tag or commit; Pythia checkpoints are ``step1000`` etc.).
    device : str
        ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; the model is moved there.
    dtype : {"auto", "float32", "float64", "bfloat16", "float16"}
        Cast the model's parameters (``auto`` keeps them).
    digits_steps, digits_seed : int
        Training steps and seed of the digits MLP.
    progress : bool
        Show Hugging Face's download and loading progress bars.

    Returns
    -------
    object
        With ``model_type``, ``config`` (:class:`VolumeConfig` fields), ``estimate`` (for
        ``(fn, center)``), ``optimizer`` (for Adam preconditioning) and ``folder``.
    """
    import torch

    if model_type not in MODEL_TYPES:
        raise UsageError(
            "--model-type",
            f"unknown model type {model_type!r}; use one of {', '.join(MODEL_TYPES)}",
        )
    dev = _device(device)
    local = Path(spec).expanduser()
    if model_type == "pythia":
        name = spec if "/" in spec else f"EleutherAI/pythia-{spec.removeprefix('pythia-')}"
        loaded = _hf_causal(name, revision=revision, local=False, progress=progress)
    elif spec == "digits" or model_type == "mlp":
        if spec != "digits":
            raise UsageError("--model", "with --model-type mlp, use --model digits")
        from .digits import train_digits_mlp

        run = train_digits_mlp(steps=digits_steps, seed=digits_seed)
        loaded = LoadedModel(
            "mlp",
            {"model": run.model, "inputs": run.train_inputs},
            optimizer=run.optimizer,
        )
    elif local.is_dir():
        loaded = _hf_causal(str(local), revision=revision, local=True, progress=progress)
    elif ":" in spec and not local.exists():
        loaded = _from_function(spec)
    elif local.exists() or _looks_like_path(spec):
        raise UsageError(
            "--model",
            f"no model folder {spec!r}; give a Hugging Face model folder, a hub name such as "
            "EleutherAI/pythia-14m, 'digits' or module:function",
        )
    else:
        loaded = _hf_causal(spec, revision=revision, local=False, progress=progress)
    if model_type not in ("auto", "pythia") and loaded.model_type != model_type:
        if not (model_type == "classifier" and loaded.model_type == "mlp"):
            raise UsageError(
                "--model-type",
                f"--model {spec} gives a {loaded.model_type!r} model, not {model_type!r}; "
                "leave --model-type at auto or change --model",
            )
    model = loaded.config.get("model")
    if isinstance(model, torch.nn.Module):
        if dtype != "auto":
            model.to(getattr(torch, dtype))
            if isinstance(loaded.config.get("inputs"), torch.Tensor):
                inputs = loaded.config["inputs"]
                if inputs.is_floating_point():
                    loaded.config["inputs"] = inputs.to(getattr(torch, dtype))
        model.to(dev)
    return loaded


# ---------------------------------------------------------------------------- preconditioners
def _preconditioner_fields(args, loaded: LoadedModel) -> dict:
    """VolumeConfig fields (or, for a ``module:function`` returning estimate()'s arguments,
    ready-made scales) for ``--preconditioner``.

    Adam's state is checked against the model here, so a mismatched ``--optimizer-state`` is
    a usage error rather than a failure after the data is loaded; the Fisher kinds are
    computed by :class:`~basin_volume.config.VolumeEstimator` on the run's own inputs.
    """
    from .adaptive import resolve_preconditioner
    from .parameters import preserved

    kind = args.preconditioner
    if kind == "none":
        return {}
    state = args.optimizer_state
    if state is not None and not Path(state).expanduser().exists():
        raise UsageError("--optimizer-state", f"no such file or folder {state!r}")
    if state is None and loaded.folder is not None and (loaded.folder / "optimizer.pt").is_file():
        state = str(loaded.folder / "optimizer.pt")
    optimizer = state if state is not None else loaded.optimizer
    if kind == "adam" and optimizer is None:
        raise UsageError(
            "--optimizer-state",
            "--preconditioner adam needs the optimizer's state: give the optimizer.pt saved "
            "with the checkpoint (or its folder), or use --preconditioner fisher",
        )
    tuning = {
        "eps": args.preconditioner_eps,
        "exponent": args.preconditioner_exponent,
        "adam_order": args.adam_order,
    }
    tuning = {k: v for k, v in tuning.items() if v is not None}
    model = loaded.config.get("model")
    is_function = loaded.estimate is not None
    if is_function and kind == "adaptive":
        raise UsageError(
            "--preconditioner",
            "adaptive needs a model, not a module:function returning fn and center; call "
            "basin_volume.estimate_adaptive from Python instead",
        )
    if kind == "adam" or is_function:
        cutoff = args.cutoff if args.cutoff is not None else _ESTIMATION_DEFAULTS["cutoff"]
        if model is None:
            raise UsageError(
                "--preconditioner",
                f"{kind} needs the model, and --model {args.model} returned only fn and "
                "center; return the scales as its 'preconditioner' entry instead",
            )
        try:
            with preserved(model):
                scales = resolve_preconditioner(
                    kind,
                    model=model,
                    inputs=loaded.config.get("inputs"),
                    optimizer=optimizer,
                    cutoff=cutoff,
                    sigma=args.sigma,
                    parameters=args.parameters or loaded.config.get("parameters", "trainable"),
                    **tuning,
                )
        except (TypeError, ValueError, KeyError, OSError) as err:
            option = "--optimizer-state" if kind == "adam" else "--preconditioner"
            raise UsageError(option, f"{kind}: {_first_line(err)}") from None
        return {"preconditioner": scales}
    renamed = {"eps": "preconditioner_eps", "exponent": "preconditioner_exponent"}
    fields = {renamed.get(k, k): v for k, v in tuning.items()}
    return {"preconditioner_type": kind, **fields}


# ---------------------------------------------------------------------------- building runs
_ESTIMATION_DEFAULTS = {
    "n_samples": 100,
    "cutoff": 1e-2,
    "measure": "gaussian",
    "sigma": None,
    "rtol": 1e-2,
    "seed": 0,
}


def _spec(args, model_type: str) -> dict:
    """What the run was asked for, kept in the results header (and checked on resume)."""
    keys = (
        "model",
        "revision",
        "data",
        "split",
        "data_config",
        "text_field",
        "val_size",
        "max_seq_len",
        "chunking",
        "cache_mode",
        "data_batch_size",
        "preconditioner",
        "preconditioner_eps",
        "preconditioner_exponent",
        "adam_order",
        "optimizer_state",
        "dtype",
        "device",
        "digits_steps",
        "digits_seed",
        "parameters",
    )
    spec = {k: getattr(args, k, None) for k in keys}
    spec["model_type"] = model_type
    if spec["preconditioner"] == "none":
        for k in ("preconditioner_eps", "preconditioner_exponent", "adam_order"):
            spec[k] = None
    if model_type != "mlp":
        spec["digits_steps"] = spec["digits_seed"] = None
    return spec


def _check_data_args(args, loaded: LoadedModel) -> None:
    if loaded.needs_data and args.data is None:
        raise UsageError(
            "--data",
            "a language model needs validation texts: give a .txt/.json/.jsonl file or a hub "
            "data set name",
        )
    if not loaded.needs_data and args.data is not None:
        raise UsageError(
            "--data",
            f"--model {args.model} brings its own data, so --data is not used; leave it out",
        )
    if loaded.estimate is not None and getattr(args, "compile", False):
        raise UsageError(
            "--compile",
            f"--model {args.model} returns fn and center, not a model to compile; leave "
            "--compile out (compile inside the function instead)",
        )
    if loaded.model_type in ("mlp", "classifier", "function"):
        for name in ("val_size", "max_seq_len", "cache_mode"):
            if getattr(args, name) is not None:
                option = "--" + name.replace("_", "-")
                raise UsageError(option, f"{option} applies to language models only; leave it out")
        if args.chunking:
            raise UsageError("--chunking", "--chunking applies to language models only")


def _source(args, loaded: LoadedModel, dataset, overrides: dict | None = None):
    """A :data:`basin_volume.runfile.Source` from the parsed options and the loaded model."""
    from .config import VolumeConfig

    given = {k: getattr(args, k) for k in _ESTIMATION_DEFAULTS if getattr(args, k) is not None}
    given.update(overrides or {})
    given["progress"] = not args.quiet
    pre = _preconditioner_fields(args, loaded)
    if loaded.estimate is not None:
        if args.parameters is not None:
            raise UsageError(
                "--parameters",
                f"--model {args.model} returns fn and center, not a model whose parameters "
                "could be chosen; leave --parameters out",
            )
        arguments = {**_ESTIMATION_DEFAULTS, **loaded.estimate, **given, **pre}
        arguments.pop("model_type", None)
        return arguments
    names = {f.name for f in dataclasses.fields(VolumeConfig)}
    # An option given on the command line wins over a VolumeConfig returned by
    # module:function, which wins over the command line's defaults.
    fields = {**_ESTIMATION_DEFAULTS, **loaded.config, **given}
    if dataset is not None:
        fields["dataset"] = dataset
        fields["text_key"] = args.text_field
    optional = {
        "val_size": args.val_size,
        "max_seq_len": args.max_seq_len,
        "chunking": True if args.chunking else None,
        "data_batch_size": args.data_batch_size,
        "compile": True if args.compile else None,
    }
    fields.update({k: v for k, v in optional.items() if v is not None})
    if args.cache_mode is not None:
        fields["cache_mode"] = None if args.cache_mode == "none" else args.cache_mode
    fields.update(pre)
    if args.parameters is not None:
        fields["parameters"] = args.parameters
    fields["model_type"] = loaded.model_type
    unknown = sorted(set(fields) - names)
    if unknown:
        raise UsageError(
            "--model", f"VolumeConfig has no field(s) {unknown}; return only VolumeConfig fields"
        )
    try:
        return VolumeConfig(**fields)
    except (TypeError, ValueError) as err:
        message = _first_line(err)
        raise UsageError(_option_for(message), message) from None


def _option_for(message: str) -> str:
    """The command-line option a :class:`~basin_volume.VolumeConfig` error is about."""
    if "adaptive" in message:
        return "--preconditioner"
    if message.startswith("parameters"):
        return "--parameters"
    field = message.split(" ", 1)[0]
    options = ("n_samples", "cutoff", "sigma", "rtol", "seed", "measure", "data_batch_size")
    return "--" + field.replace("_", "-") if field in options else "--model-type"


def _load_data(args):
    """The --data set, loaded before any model so that a bad file or field fails fast."""
    if args.data is None:
        return None
    _status(args, f"loading data {args.data} ...")
    return load_text_data(
        args.data, split=args.split, text_field=args.text_field, config=args.data_config
    )


def _prepare(args, dataset, model_spec: str | None = None, revision: str | None = None):
    """Load the model named by the options and check it against the data options."""
    spec = model_spec or args.model
    if spec is None:
        raise UsageError(
            "--model", "give the model: a folder, a hub name, digits or module:function"
        )
    _status(args, f"loading model {spec}" + (f" at {revision}" if revision else "") + " ...")
    loaded = load_model(
        spec,
        model_type=args.model_type,
        revision=revision if revision is not None else args.revision,
        device=args.device,
        dtype=args.dtype,
        digits_steps=args.digits_steps,
        digits_seed=args.digits_seed,
        progress=not args.quiet,
    )
    _check_data_args(args, loaded)
    return loaded


def _status(args, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def _run_mapped(run: Callable, *, output_option: str = "--output"):
    """Call ``run()``, turning resume mismatches and the like into :class:`UsageError`."""
    from .result import ResultFileError
    from .runfile import ResumeError, RunInUseError

    try:
        return run()
    except RunInUseError as err:
        raise UsageError(output_option, str(err)) from None
    except ResultFileError as err:  # an empty or damaged run log (or results file) to resume
        raise UsageError(
            output_option,
            f"{_first_line(err)}; pass --overwrite to start that run again (its saved "
            "directions are lost), or write to another output",
        ) from None
    except ResumeError as err:
        option = {"dim": "--model", "text_key": "--text-field"}.get(
            err.field, "--" + err.field.replace("_", "-")
        )
        raise UsageError(option, str(err)) from None
    except NotImplementedError as err:
        if "model_type" not in str(err):
            raise
        raise UsageError("--model-type", _first_line(err)) from None
    except ValueError as err:  # a --parameters selection the model does not match
        if not str(err).startswith("parameters "):
            raise
        raise UsageError("--parameters", _first_line(err)) from None
    except FileExistsError as err:
        raise UsageError(
            output_option, f"{_first_line(err)}; add --resume or --overwrite"
        ) from None


def _check_output(output: str, args, *, option: str = "--output") -> Path:
    from .runfile import check_writable, records_path

    path = Path(output).expanduser()
    try:
        check_writable(path)
    except OSError as err:
        raise UsageError(option, f"{_first_line(err)}; choose a path you can write") from None
    if not args.resume and not args.overwrite:
        for existing in (path, records_path(path)):
            if existing.exists():
                raise UsageError(
                    option,
                    f"{existing} exists; add --resume to continue that run or --overwrite to "
                    "replace it",
                )
    return path


# ---------------------------------------------------------------------------- commands
def _estimate(args: argparse.Namespace) -> int:
    from .runfile import records_path, run_to_file

    output = _check_output(args.output, args)
    started = time.perf_counter()
    dataset = _load_data(args)
    loaded = _prepare(args, dataset)
    source = _source(args, loaded, dataset)
    spec = {"command": "estimate", **_spec(args, loaded.model_type)}
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


def _saved_message(output: Path) -> str:
    from .runfile import read_run, records_path

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
    from .runfile import scan

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
    from .plots import compare_results, format_comparison

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
    from .plots import plot_results, plot_scan

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
    from .runfile import records_path

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
    from .runfile import check_writable

    try:
        check_writable(output)
    except OSError as err:
        raise UsageError("--output", f"{_first_line(err)}; choose a path you can write") from None


def _compare(args: argparse.Namespace) -> int:
    from .plots import compare_results, format_comparison

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
        print(json.dumps([{k: _json_number(v) for k, v in r.items()} for r in rows], indent=1))
    else:
        print(format_comparison(rows, reference=args.reference))
    return 0


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the summary below states the same caveats
        result = VolumeEstimator.from_config(cfg).run()
    print(result.summary())
    print(f"information content: {result.information:.6g} nats")
    print(f"done in {time.perf_counter() - started:.1f} s")
    if args.output and int(os.environ.get("RANK", "0")) == 0:
        result.save(args.output)
        print(f"saved {args.output}")
    return 0


# ---------------------------------------------------------------------------- the parser
class _Formatter(argparse.HelpFormatter):
    """Wraps descriptions and help; keeps the epilog (examples) as written."""

    def add_text(self, text):
        if text and text.startswith(("output:", "examples:")):
            self._add_item(lambda t: t + "\n", [text])
        else:
            super().add_text(text)


_FORMATTER = _Formatter


def _add_model_options(p: argparse.ArgumentParser, *, scan: bool = False) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "-m",
        "--model",
        required=not scan,
        help="the trained network: a local Hugging Face model folder (written by "
        "save_pretrained), a hub name such as EleutherAI/pythia-14m, 'digits' for the bundled "
        "digits MLP (trained here in seconds), or module:function (also path/file.py:function) "
        "returning (model, inputs) for a classifier, (model, tokenizer, dataset) for a "
        "language model, (fn, center) for any objective, or a VolumeConfig"
        + ("; with --checkpoints leave it out" if scan else ""),
    )
    g.add_argument(
        "--model-type",
        choices=MODEL_TYPES,
        default="auto",
        metavar="{" + ",".join(MODEL_TYPES) + "}",
        help="how to read --model (default auto: inferred). causal: a Hugging Face causal LM, "
        "basin = mean per-token KL of next-token distributions over the --data texts; "
        "classifier: a module mapping inputs to logits, basin = mean KL of its predictions; "
        "mlp: the bundled digits MLP; pythia: --model is a Pythia size (14m, 70m, ...) loaded "
        "from EleutherAI/pythia-SIZE at --revision",
    )
    g.add_argument(
        "--revision",
        help="hub revision of the model: branch, tag or commit (Pythia training checkpoints "
        "are step0 ... step143000)",
    )
    g.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="cast the parameters before the run (default auto: as stored); the basin is "
        "measured in this precision",
    )
    g.add_argument(
        "--digits-steps",
        type=_positive_int,
        default=1000,
        help="Adam steps when training the digits MLP (default 1000)",
    )
    g.add_argument(
        "--digits-seed",
        type=int,
        default=0,
        help="seed of the digits MLP's train/test split and initialisation (default 0)",
    )


def _add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "data (language models: the texts whose next-token predictions define the basin)"
    )
    g.add_argument(
        "-d",
        "--data",
        help="validation texts: a local .txt (one text per line), .json (list of records or "
        "{field: [texts]}), .jsonl (one record per line) or .csv file, a folder written by "
        "Dataset.save_to_disk, or a hub data set name such as NeelNanda/pile-10k",
    )
    g.add_argument("--split", default="train", help="split of a hub data set (default train)")
    g.add_argument("--data-config", help="configuration (subset) of a hub data set")
    g.add_argument(
        "--text-field",
        default="text",
        help="field of each record that holds the text (default text)",
    )
    g.add_argument(
        "--val-size",
        type=_positive_int,
        help="texts (sequences) the KL is averaged over; only these are tokenised "
        "(default: VolumeConfig's, 10)",
    )
    g.add_argument(
        "--max-seq-len",
        type=_positive_int,
        help="tokens per sequence; longer texts are cut (default: VolumeConfig's, 2048)",
    )
    g.add_argument(
        "--chunking",
        action="store_true",
        help="join the texts with end-of-text tokens and cut chunks of --max-seq-len tokens",
    )
    g.add_argument(
        "--cache-mode",
        choices=("auto", "none", "cpu", "gpu"),
        help="where the centre's next-token log-probabilities are kept: on the model's "
        "device (gpu), in CPU memory (cpu), recomputed at every evaluation (none), or "
        "auto (the device if it fits); all give the same estimates",
    )
    g.add_argument(
        "--data-batch-size",
        type=_positive_int,
        help="examples per forward pass (lower it if memory runs out)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="evaluate the model through torch.compile (costs time up front; pays off for "
        "large models on GPUs; estimates agree with eager ones to float precision)",
    )


def _add_estimation_options(p: argparse.ArgumentParser, *, scan: bool = False) -> None:
    g = p.add_argument_group("estimation")
    g.add_argument(
        "-n",
        "--n-samples",
        type=_positive_int,
        help="random directions; more give a steadier estimate and a higher ESS (default 100)",
    )
    if not scan:
        g.add_argument(
            "--cutoff",
            type=_positive_float,
            help="epsilon: the basin is where the KL divergence (or objective increase) from "
            "the trained network stays at most this many nats (default 0.01)",
        )
    g.add_argument(
        "--measure",
        choices=("gaussian", "uniform"),
        help="gaussian (default): log probability that an initialisation drawn from "
        "N(0, sigma^2 I) lands in the basin; uniform: log Lebesgue volume of the basin",
    )
    g.add_argument(
        "--sigma",
        type=_positive_float,
        help="prior scale for --measure gaussian (default: RMS of the trained parameters, "
        "||theta0||/sqrt(D))",
    )
    g.add_argument(
        "--rtol",
        type=_rtol,
        help="each radius is found to |KL(r) - cutoff| <= rtol * cutoff; at most 0.5 "
        "(default 0.01)",
    )
    g.add_argument(
        "--seed",
        type=_seed,
        help="seed of the random directions, 0 to 2^63-1; direction k depends only on it and "
        "k (default 0)",
    )
    g.add_argument(
        "--parameters",
        type=_parameters,
        help="which parameters are the basin's coordinates: trainable (default: those with "
        "requires_grad), all, or comma-separated names and glob patterns, e.g. "
        "'gpt_neox.layers.*.mlp.*' (the prior, the preconditioner and D follow)",
    )
    pg = p.add_argument_group("preconditioner (importance sampling of directions)")
    pg.add_argument(
        "--preconditioner",
        choices=PRECONDITIONERS,
        default="none",
        help="draw directions longer along flat parameters and reweight them exactly: none "
        "(isotropic, default), adam (scales 1/(v^exponent + eps) from the optimizer's "
        "second moments), fisher (from the diagonal Fisher of the KL basin on the data; no "
        "optimizer state needed), fisher_dense (the full Fisher's eigenbasis; classifiers "
        "of at most 20,000 parameters), adaptive (refined over rounds from the radii seen; "
        "--n-samples must be a multiple of 4)",
    )
    pg.add_argument(
        "--preconditioner-eps",
        type=_eps,
        default=None,
        help="eps in 1/(v^exponent + eps): a number, or 'prior' to bound each direction's "
        "reach by the prior's scale (default: 1e-5 for adam, 'prior' for fisher)",
    )
    pg.add_argument(
        "--preconditioner-exponent",
        type=_positive_float,
        default=0.5,
        help="exponent in 1/(v^exponent + eps) (default 0.5)",
    )
    pg.add_argument(
        "--adam-order",
        type=int,
        choices=(1, 2),
        default=2,
        help="Adam moment used: 2 = exp_avg_sq (default), 1 = |exp_avg|",
    )
    pg.add_argument(
        "--optimizer-state",
        help="optimizer state_dict saved with torch.save (e.g. a Trainer checkpoint's "
        "optimizer.pt; default: optimizer.pt in the model folder, if there)",
    )


def _add_run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument(
        "--device",
        default="auto",
        help="where the model runs: auto (default: cuda, else mps, else cpu), cpu, cuda, "
        "cuda:N or mps",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run saved at the output (same options; --n-samples may be raised); "
        "the result equals an uninterrupted run's, direction for direction",
    )
    g.add_argument(
        "--overwrite", action="store_true", help="replace existing results at the output"
    )
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar or status lines")


_EPILOG_ESTIMATE = """\
output:
  OUTPUT (JSON) holds the result: every per-direction array, log_volume with its 95%
  bootstrap interval and ESS, the configuration, versions, device and timings; read it with
  basin_volume.VolumeResult.load. While running, each finished direction is appended to
  OUTPUT's run log (results.json -> results.records.jsonl), so an interrupted run loses at
  most the direction in progress: rerun the same command with --resume.

examples:
  basin-volume estimate --model digits --n-samples 200 -o digits.json
  basin-volume estimate --model ./my-lm --data val.jsonl --text-field text \\
      --val-size 20 --max-seq-len 256 --cutoff 0.01 -o lm.json
  basin-volume estimate --model-type pythia --model 14m --revision step1000 \\
      --data NeelNanda/pile-10k --split train -o pythia14m-step1000.json
  basin-volume estimate ... -o lm.json --resume          # after an interruption
"""

_EPILOG_SCAN = """\
examples:
  basin-volume scan --model digits --cutoffs 0.001 0.01 0.1 1 -o scan-digits
  basin-volume scan --checkpoints run/checkpoint-500 run/checkpoint-1000 \\
      --data val.jsonl -o scan-ckpt
  basin-volume scan --model-type pythia --model 14m --steps 1000 8000 64000 \\
      --data NeelNanda/pile-10k -o scan-pythia
Each point is written to DIR/<name>.json (resumable like estimate); DIR/scan.json holds
the summary table and DIR/scan.png plots log probability (nats) against step or cutoff.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``basin-volume`` argument parser with all sub-commands."""
    parser = _Parser(
        prog="basin-volume",
        description="Tyche: estimate how much of parameter space behaves like a trained "
        "network (log probability of its basin under the initialisation prior, in nats).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
    demo.add_argument("--seed", type=_seed, default=0, help="seed of training and directions")
    demo.add_argument("--output", help="write the result as JSON to this path")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(handler=_demo)

    est = sub.add_parser(
        "estimate",
        help="estimate one model's basin, saving each direction as it finishes",
        description="Estimate the log probability (in nats) that a random initialisation "
        "lands in the trained model's basin: the parameters whose outputs stay within "
        "--cutoff nats of KL divergence of the trained model's.",
        epilog=_EPILOG_ESTIMATE,
        formatter_class=_FORMATTER,
    )
    _add_model_options(est)
    _add_data_options(est)
    _add_estimation_options(est)
    _add_run_options(est)
    est.add_argument(
        "-o", "--output", required=True, help="results file to write (JSON), e.g. results.json"
    )
    est.set_defaults(handler=_estimate)

    plot = sub.add_parser(
        "plot",
        help="plot results files (estimates, convergence, radii) or a scan summary",
        description="Plot one or more results files side by side: the histogram of "
        "per-direction log estimates with the aggregate marked, the running log-mean-exp "
        "against the number of directions with its 95% bootstrap band, and the radii. "
        "Run logs (.records.jsonl) of unfinished runs work too. Given a scan.json, plot log "
        "probability against step or cutoff. All log quantities are in nats.",
    )
    plot.add_argument("files", nargs="+", metavar="RESULTS", help="results files (.json)")
    plot.add_argument(
        "-o", "--output", help="image to write: .png, .pdf or .svg (default: RESULTS.png)"
    )
    plot.add_argument("--labels", nargs="+", help="legend names, one per file")
    plot.add_argument("--title", help="figure title")
    plot.set_defaults(handler=_plot)

    cmp_ = sub.add_parser(
        "compare",
        help="table of log_volume, interval, ESS, n and differences in nats and log10",
        description="Compare results files: log_volume with its 95% bootstrap interval, "
        "ESS, number of directions, and the difference from the reference in nats and in "
        "log10. Estimates with ESS below 5 are flagged: they are likely lower bounds.",
    )
    cmp_.add_argument("files", nargs="+", metavar="RESULTS", help="results files (.json)")
    cmp_.add_argument("--labels", nargs="+", help="row names, one per file")
    cmp_.add_argument(
        "--reference",
        type=int,
        default=0,
        help="index of the file the differences are taken from (default 0, the first)",
    )
    cmp_.add_argument("--json", action="store_true", help="print the table as JSON")
    cmp_.set_defaults(handler=_compare)

    scan = sub.add_parser(
        "scan",
        help="the same estimate over checkpoints or cutoffs, with a summary plot",
        description="Run the same estimate over a list of checkpoints (training steps) or "
        "cutoffs: one results file each, a summary table and a plot of log probability "
        "(nats) against step or cutoff.",
        epilog=_EPILOG_SCAN,
        formatter_class=_FORMATTER,
    )
    _add_model_options(scan, scan=True)
    what = scan.add_argument_group("what to scan (give one)")
    what.add_argument(
        "--cutoffs", nargs="+", type=_positive_float, help="cutoffs in nats, one run each"
    )
    what.add_argument(
        "--checkpoints",
        nargs="+",
        help="model folders (or any --model values), one run each; the step is read from "
        "names like checkpoint-500 or step1000 unless --steps is given",
    )
    what.add_argument(
        "--revisions", nargs="+", help="hub revisions of --model, e.g. step1000 step2000"
    )
    what.add_argument(
        "--steps",
        nargs="+",
        type=float,
        help="training step of each checkpoint or revision (the plot's x axis); with "
        "--model-type pythia and nothing else, the Pythia checkpoints to scan",
    )
    _add_data_options(scan)
    _add_estimation_options(scan, scan=True)
    scan.add_argument(
        "--cutoff",
        type=_positive_float,
        help="cutoff in nats when scanning checkpoints (default 0.01)",
    )
    _add_run_options(scan)
    scan.add_argument(
        "-o", "--output-dir", required=True, help="folder for the results files and summary"
    )
    scan.set_defaults(handler=_scan)
    for p in (est, plot, cmp_, scan):
        for action in p._actions:
            if action.metavar is None and action.choices is None and action.nargs != 0:
                action.metavar = _METAVARS.get(action.dest)
    for p in (est, plot, cmp_, scan, demo):
        p.set_defaults(parser=p)
    return parser


_METAVARS = {
    "model": "MODEL",
    "revision": "REV",
    "digits_steps": "N",
    "digits_seed": "SEED",
    "data": "DATA",
    "split": "NAME",
    "data_config": "NAME",
    "text_field": "FIELD",
    "val_size": "N",
    "max_seq_len": "N",
    "data_batch_size": "N",
    "n_samples": "N",
    "cutoff": "NATS",
    "cutoffs": "NATS",
    "sigma": "SIGMA",
    "rtol": "RTOL",
    "seed": "SEED",
    "preconditioner_eps": "EPS",
    "preconditioner_exponent": "GAMMA",
    "optimizer_state": "PATH",
    "device": "DEVICE",
    "output": "PATH",
    "output_dir": "DIR",
    "checkpoints": "CKPT",
    "revisions": "REV",
    "steps": "STEP",
    "labels": "LABEL",
    "title": "TEXT",
    "reference": "INDEX",
}


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
    from .estimator import RadiusSearchWarning
    from .result import LowESSWarning

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

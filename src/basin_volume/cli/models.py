"""Models for the command line: a hub name, a local directory, the MLP, or ``module:function``."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._types import MODEL_TYPES, UsageError, _first_line, _looks_like_path


# ---------------------------------------------------------------------------- loading: models
@dataclasses.dataclass
class LoadedModel:
    """A resolved ``--model`` (see :func:`load_model`).

    Attributes
    ----------
    model_type : str
        A :class:`~basin_volume.ModelType` value (``"causal"``, ``"classifier"``, ``"mlp"``,
        ``"pythia"``, ``"convnext"``) or ``"function"`` (an ``(fn, center)`` objective).
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

    from ..devices import default_device

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

    from ..config import VolumeConfig

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
    model_type : {"auto", "causal", "classifier", "mlp", "pythia", "convnext"}
        ``auto`` infers it from ``spec``. ``convnext`` (an image classifier) needs ``spec``
        to be ``module:function`` returning ``(model, pixel_values)`` or a dict or
        :class:`~basin_volume.VolumeConfig` with ``model_type="convnext"``.
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
    if model_type == "convnext" and not (":" in spec and not local.exists()):
        raise UsageError(
            "--model-type",
            "convnext needs --model module:function returning (model, pixel_values) (the "
            "command line has no image data options)",
        )
    if model_type == "pythia":
        name = spec if "/" in spec else f"EleutherAI/pythia-{spec.removeprefix('pythia-')}"
        loaded = _hf_causal(name, revision=revision, local=False, progress=progress)
    elif spec == "digits" or model_type == "mlp":
        if spec != "digits":
            raise UsageError("--model", "with --model-type mlp, use --model digits")
        from ..digits import train_digits_mlp

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
    if model_type == "convnext" and loaded.model_type == "classifier":
        loaded.model_type = "convnext"  # an image classifier and its pixel values
        loaded.config["model_type"] = "convnext"
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

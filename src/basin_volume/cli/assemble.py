"""From parsed arguments to a run: model spec, data, preconditioner and output checks."""

from __future__ import annotations

import dataclasses
import enum
import sys
from collections.abc import Callable
from pathlib import Path

from ..config import VolumeConfig
from ._types import UsageError, _first_line
from .data import load_text_data
from .models import LoadedModel, load_model


# ---------------------------------------------------------------------------- preconditioners
def _preconditioner_fields(args, loaded: LoadedModel) -> dict:
    """VolumeConfig fields (or, for a ``module:function`` returning estimate()'s arguments,
    ready-made scales) for ``--preconditioner``.

    Adam's state is checked against the model here, so a mismatched ``--optimizer-state`` is
    a usage error rather than a failure after the data is loaded; the Fisher kinds are
    computed by :class:`~basin_volume.config.VolumeEstimator` on the run's own inputs.
    """
    from ..parameters import preserved
    from ..preconditioners import resolve_preconditioner

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
    f.name: str(f.default) if isinstance(f.default, enum.Enum) else f.default
    for f in dataclasses.fields(VolumeConfig)
    if f.name in ("n_samples", "cutoff", "measure", "sigma", "rtol", "seed", "method", "budget",
                  "bidirectional")
}
"""The estimation settings the command line leaves unset: :class:`VolumeConfig`'s defaults."""


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
    if loaded.model_type in ("mlp", "classifier", "convnext", "function"):
        for name in ("val_size", "max_seq_len", "cache_mode"):
            if getattr(args, name) is not None:
                option = "--" + name.replace("_", "-")
                raise UsageError(option, f"{option} applies to language models only; leave it out")
        if args.chunking:
            raise UsageError("--chunking", "--chunking applies to language models only")


def _source(args, loaded: LoadedModel, dataset, overrides: dict | None = None):
    """A :data:`basin_volume.runfile.Source` from the parsed options and the loaded model."""

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
    options = ("n_samples", "cutoff", "sigma", "rtol", "seed", "measure", "data_batch_size",
               "method", "budget", "bidirectional")
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
    from ..result import ResultFileError
    from ..runfile import ResumeError, RunInUseError

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
    """``output`` checked by :func:`basin_volume.runfile.check_output`, errors as
    :class:`UsageError` naming ``option``."""
    from ..runfile import OutputExistsError, check_output

    try:
        path, _ = check_output(
            Path(output).expanduser(), resume=args.resume, overwrite=args.overwrite
        )
    except OutputExistsError as err:
        raise UsageError(
            option,
            f"{err.path} exists; add --resume to continue that run or --overwrite to replace it",
        ) from None
    except OSError as err:
        raise UsageError(option, f"{_first_line(err)}; choose a path you can write") from None
    except ValueError as err:
        raise UsageError(option, _first_line(err)) from None
    return path

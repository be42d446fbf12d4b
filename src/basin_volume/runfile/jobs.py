"""What a run needs from its source (config, estimator or ``estimate`` arguments), as one job."""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .. import checks
from ..config import VolumeConfig
from ..estimator import _check_center, estimate
from ..preconditioners import PreconditionerType
from ..result import DirectionRecord, VolumeResult
from ..settings import Measure, default_sigma, parse_measure
from ..volume_estimator import VolumeEstimator
from .fingerprint import _center_stats, _data_fingerprint, _preconditioner_fingerprint, _probe

Source = VolumeConfig | VolumeEstimator | Mapping[str, Any]
"""What :func:`run_to_file` runs: a model-level config or estimator, or the arguments of
:func:`basin_volume.estimate` as a mapping that includes ``fn`` and ``center``."""


def _timings(seconds: Sequence[float], sessions: int) -> dict:
    finite = [s for s in seconds if math.isfinite(s)]
    return {
        "direction_seconds_total": sum(finite),
        "seconds_per_direction": sum(finite) / len(finite) if finite else math.nan,
        "per_direction_seconds": list(seconds),
        "sessions": sessions,
    }


# ---------------------------------------------------------------------------- running
@dataclasses.dataclass
class _Job:
    """One run, whichever kind of source it came from."""

    settings: dict
    config: dict
    run: Callable[[Callable[[DirectionRecord], None], VolumeResult | None], VolumeResult]
    data: Callable[[], str | float | None]
    device: torch.device


def _settings(tensors, *, n_samples, measure, cutoff, sigma, rtol, seed, preconditioner) -> dict:
    # checked before a run log is made for a run that cannot start
    n_samples = checks.check_positive("n_samples", n_samples, integer=True)
    cutoff = checks.check_positive("cutoff", cutoff)
    rtol, seed = checks.check_rtol(rtol), checks.check_seed(seed)
    measure = parse_measure(measure)
    sigma = checks.as_number(sigma)
    dim, sha, squares = _center_stats(tensors)
    if measure is Measure.UNIFORM:
        sigma = math.nan
    elif sigma is None:
        sigma = default_sigma(math.sqrt(squares), dim)
    return {
        "n_samples": int(n_samples),
        "dim": dim,
        "measure": measure.value,
        "cutoff": float(cutoff),
        "sigma": float(sigma),
        "rtol": float(rtol),
        "seed": int(seed),
        "center_sha256": sha,
        "preconditioner": _preconditioner_fingerprint(preconditioner, dim),
    }


def _proposal_identity(est: VolumeEstimator) -> Any:
    """What identifies the proposal for resuming: ready-made or Adam scales themselves (they
    are bit-reproducible from the stored state); for the Fisher kinds and ``"adaptive"``, which
    are recomputed each session (their last bits may differ between devices), the recipe,
    next to the centre's and the data's own fingerprints."""
    cfg, kind = est.config, est.config.preconditioner_type
    if isinstance(kind, torch.Tensor) or kind is PreconditionerType.ADAM:
        return est.preconditioner
    if kind in (None, PreconditionerType.NONE):
        return cfg.preconditioner
    return (
        f"{kind.value}(eps={cfg.preconditioner_eps!r}, exponent={cfg.preconditioner_exponent!r}"
        f", seed={cfg.seed})"
    )


def _estimator_job(est: VolumeEstimator) -> _Job:
    cfg = est.config
    params = [p for _, p in est.selected_parameters()]  # the centre, in vector order
    settings = _settings(
        params,
        n_samples=cfg.n_samples,
        measure=cfg.measure,
        cutoff=cfg.cutoff,
        sigma=cfg.sigma,
        rtol=cfg.rtol,
        seed=cfg.seed,
        preconditioner=_proposal_identity(est),
    )
    return _Job(
        settings,
        cfg.describe(),
        lambda callback, prev: est.run(callback=callback, resume_from=prev),
        lambda: _data_fingerprint(cfg),
        params[0].device,
    )


def _function_job(arguments: Mapping[str, Any]) -> _Job:
    arguments = dict(arguments)
    try:
        fn, center = arguments.pop("fn"), arguments.pop("center")
    except KeyError as err:
        raise TypeError(
            f"a mapping source must hold estimate()'s arguments including fn and center; "
            f"{err.args[0]!r} is missing"
        ) from None
    params = inspect.signature(estimate).parameters
    unknown = sorted(set(arguments) - set(params) | ({"callback", "resume_from"} & set(arguments)))
    if unknown:
        raise TypeError(f"estimate() has no argument(s) {unknown} to pass through")
    center = _check_center(center)  # before it is hashed
    full = {name: arguments.get(name, params[name].default) for name in params}
    settings = _settings(
        [center],
        n_samples=full["n_samples"],
        measure=full["measure"],
        cutoff=full["cutoff"],
        sigma=full["sigma"],
        rtol=full["rtol"],
        seed=full["seed"],
        preconditioner=full["preconditioner"],
    )
    config = {k: v for k, v in full.items() if k not in ("fn", "center", "callback", "resume_from")}
    config["fn"] = getattr(fn, "__qualname__", type(fn).__name__)
    return _Job(
        settings,
        config,
        lambda callback, prev: estimate(
            fn, center, **arguments, callback=callback, resume_from=prev
        ),
        lambda: _probe(fn, center),
        center.device,
    )


def _job(source: Source) -> _Job:
    if isinstance(source, VolumeEstimator):
        return _estimator_job(source)
    if isinstance(source, VolumeConfig):
        return _estimator_job(VolumeEstimator.from_config(source))
    if isinstance(source, Mapping):
        return _function_job(source)
    raise TypeError(
        "source must be a VolumeConfig, a VolumeEstimator or a mapping of estimate() "
        f"arguments with fn and center, got {type(source).__name__}"
    )

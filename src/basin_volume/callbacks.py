"""Basin volumes during training: a Hugging Face ``Trainer`` callback, and the same for a
hand-written loop.

:func:`estimate_live` measures the basin of a model that is being trained, in the middle of
its training, and leaves everything as it was: parameters and buffers (never written: the
estimator evaluates the model through :func:`torch.func.functional_call`, or restores them
exactly in the memory-light mode), train/eval modes, ``.grad`` fields, and the global torch
random state (CPU and CUDA), so the training run continues exactly as it would have without
the measurement.

:class:`BasinVolumeCallback` calls it from a ``transformers.Trainer`` every ``every_n_steps``
steps and at each checkpoint save, logs ``basin/log_p``, ``basin/ess``,
``basin/interval_low`` and ``basin/interval_high`` through the Trainer's own
:meth:`~transformers.Trainer.log` (so TensorBoard, W&B or whatever ``report_to`` names
receive them, and they land in ``trainer.state.log_history``), and writes each result as JSON
next to its checkpoint (``checkpoint-N/basin_volume.json``), or under
``output_dir/basin_volume/step-N.json`` at steps without a checkpoint.

Example::

    from basin_volume.callbacks import BasinVolumeCallback

    trainer = Trainer(model=model, args=args, train_dataset=train)
    BasinVolumeCallback(tokenizer=tokenizer, dataset=val_texts, val_size=10,
                        n_samples=20, every_n_steps=500).attach(trainer)
    trainer.train()
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import VolumeConfig
from .result import VolumeResult
from .volume_estimator import VolumeEstimator

try:  # transformers is optional: the callback needs it, estimate_live does not
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - exercised only without transformers
    TrainerCallback = object  # type: ignore[assignment,misc]

__all__ = ["BasinVolumeCallback", "estimate_live", "LOG_KEYS", "RESULT_NAME"]

LOG_KEYS = ("basin/log_p", "basin/ess", "basin/interval_low", "basin/interval_high")
"""What is logged at each estimate: the log probability (log volume under
``measure="uniform"``), the effective sample size, and the 95% interval's ends."""

RESULT_NAME = "basin_volume.json"
"""The file written into each checkpoint folder."""


@contextlib.contextmanager
def _random_state_kept() -> Iterator[None]:
    """Restore the global torch random state (CPU and every initialised CUDA device)."""
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _grads(model: nn.Module) -> list:
    return [p.grad for p in model.parameters()]


def estimate_live(
    config: VolumeConfig,
    model: nn.Module,
    *,
    optimizer: Any = None,
    step: int | None = None,
) -> VolumeResult:
    """Estimate the basin of ``model`` as it is now, in the middle of training.

    Parameters
    ----------
    config : VolumeConfig
        Every setting of the run but the model (its ``model`` field is replaced).
    model : torch.nn.Module
        The live model. It comes back bit-identical (parameters, buffers, modes, ``.grad``),
        and the global torch random state is restored, so training continues unchanged.
    optimizer : torch.optim.Optimizer, optional
        The live optimizer, used for ``preconditioner_type="adam"`` when ``config`` names no
        optimizer of its own.
    step : int, optional
        The training step, recorded in ``result.meta["step"]``.

    Returns
    -------
    VolumeResult
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    changes: dict[str, Any] = {"model": model}
    kind = getattr(config.preconditioner_type, "value", config.preconditioner_type)
    if kind == "adam" and config.optimizer is None:
        if optimizer is None:
            raise ValueError(
                "preconditioner_type='adam' needs the optimizer: pass optimizer=<the live "
                "optimizer> (the Trainer callback passes its own)"
            )
        changes["optimizer"] = optimizer
    grads = _grads(model)
    with _random_state_kept():
        result = VolumeEstimator.from_config(config.replace(**changes)).run()
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g  # the objective never backpropagates into the model; this makes it certain
    if step is not None:
        result.meta["step"] = int(step)
    return result


def _log_values(result: VolumeResult) -> dict[str, float]:
    low, high = result.interval(0.95)
    values = (result.log_volume, result.ess, low, high)
    return {k: float(v) for k, v in zip(LOG_KEYS, values, strict=True)}


class BasinVolumeCallback(TrainerCallback):
    """Estimate the basin during ``transformers.Trainer`` training and log it.

    Parameters
    ----------
    every_n_steps : int, optional
        Estimate at every step that is a multiple of this (``None``: only at saves).
    at_save : bool
        Also estimate at every checkpoint save (default ``True``).
    trainer : transformers.Trainer, optional
        The trainer whose :meth:`log` receives the values; usually set with
        :meth:`attach`.
    **fields
        Any :class:`~basin_volume.VolumeConfig` field but ``model`` (the live model is
        used): ``tokenizer``, ``dataset``, ``text_key``, ``val_size``, ``max_seq_len``,
        ``n_samples``, ``cutoff``, ``model_type``, ``inputs``, ``basin``,
        ``preconditioner_type``... ``progress`` defaults to ``False``. With a causal LM and
        no ``tokenizer``, the Trainer's ``processing_class`` is used; with
        ``preconditioner_type="adam"``, the Trainer's optimizer.

    Attributes
    ----------
    results : dict of int to VolumeResult
        Every estimate made, by step.
    config : VolumeConfig
        The settings (checked when the callback is made).
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        at_save: bool = True,
        trainer: Any = None,
        **fields: Any,
    ):
        if TrainerCallback is object:
            raise ImportError("BasinVolumeCallback needs transformers: pip install transformers")
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool)
            or not isinstance(every_n_steps, int)
            or every_n_steps < 1
        ):
            raise ValueError(
                f"every_n_steps must be a positive integer or None, got {every_n_steps!r}"
            )
        if every_n_steps is None and not at_save:
            raise ValueError(
                "with every_n_steps=None and at_save=False the callback never estimates; set "
                "every_n_steps=<N> or at_save=True"
            )
        names = {f.name for f in dataclasses.fields(VolumeConfig)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise TypeError(
                f"BasinVolumeCallback got {unknown}, which are not VolumeConfig fields; it "
                "takes VolumeConfig's fields plus every_n_steps, at_save and trainer"
            )
        if fields.get("model") is not None:
            raise ValueError(
                "leave model out: the callback measures the Trainer's live model at each estimate"
            )
        self.config = VolumeConfig(**{"progress": False, **fields})
        self.every_n_steps = every_n_steps
        self.at_save = at_save
        self.trainer = trainer
        self.results: dict[int, VolumeResult] = {}
        self._warned = False

    def attach(self, trainer: Any) -> BasinVolumeCallback:
        """Add this callback to ``trainer`` and log through its :meth:`log`; returns self."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    # ------------------------------------------------------------------ work

    def _estimate(self, state, model, optimizer, processing_class) -> VolumeResult:
        step = int(state.global_step)
        config = self.config
        if config.tokenizer is None and config.inputs is None and processing_class is not None:
            config = config.replace(tokenizer=processing_class)
        result = estimate_live(config, model, optimizer=optimizer, step=step)
        self.results[step] = result
        self._log(state, _log_values(result))
        return result

    def _log(self, state, values: dict[str, float]) -> None:
        if self.trainer is not None:
            self.trainer.log(dict(values))
            return
        state.log_history.append({**values, "step": state.global_step})
        if not self._warned:
            self._warned = True
            warnings.warn(
                "BasinVolumeCallback is not attached to its Trainer, so the basin values go "
                "to trainer.state.log_history only, not to the report_to integrations; add "
                "it with BasinVolumeCallback(...).attach(trainer)",
                UserWarning,
                stacklevel=3,
            )

    @staticmethod
    def _write(result: VolumeResult, path: Path, state) -> None:
        if getattr(state, "is_world_process_zero", True):
            path.parent.mkdir(parents=True, exist_ok=True)
            result.save(path)

    # ------------------------------------------------------------------ Trainer events

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Estimate at every ``every_n_steps``-th step, and before each save."""
        step = int(state.global_step)
        due = self.every_n_steps is not None and step % self.every_n_steps == 0
        if not (due or (self.at_save and control.should_save)) or step in self.results:
            return control
        result = self._estimate(state, model, optimizer, kwargs.get("processing_class"))
        if not control.should_save:  # no checkpoint at this step: write beside them
            self._write(result, Path(args.output_dir) / "basin_volume" / f"step-{step}.json", state)
        return control

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Write the step's result into the checkpoint folder just saved (estimating now if
        the save came from elsewhere, e.g. the end of an epoch)."""
        step = int(state.global_step)
        result = self.results.get(step)
        if result is None:
            if not self.at_save:
                return control
            result = self._estimate(state, model, optimizer, kwargs.get("processing_class"))
        folder = Path(args.output_dir) / f"checkpoint-{step}"
        if folder.is_dir():
            self._write(result, folder / RESULT_NAME, state)
        else:
            self._write(result, Path(args.output_dir) / "basin_volume" / f"step-{step}.json", state)
        return control

"""The model-level run: :class:`VolumeEstimator` builds the proposal and runs the estimate.

``VolumeEstimator.from_config(cfg)`` dispatches on ``cfg.model_type`` to a builder in
:mod:`basin_volume.builders`; :meth:`VolumeEstimator.run` calls the estimator with the
settings of the :class:`~basin_volume.config.VolumeConfig`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .adaptive import estimate_adaptive
from .config import VolumeConfig
from .distributed import from_rank0, init_from_env
from .estimator import Measure, estimate, resolve_method, run_rays
from .parameters import (
    FlatParameters,
    describe_selection,
    preserved,
    select_parameters,
)
from .preconditioners import (
    PreconditionerType,
    as_preconditioner,
    resolve_preconditioner,
)
from .rays import InPlaceRays
from .result import DirectionRecord, VolumeResult
from .settings import Method, first_difference

LOW_MEMORY_THRESHOLD = 20_000_000


class VolumeEstimator:
    """Builds the objective for a model and runs the estimate.

    Use :meth:`from_config`; the constructor takes an already built objective.

    Parameters
    ----------
    config : VolumeConfig
    model : torch.nn.Module
        The network whose modes are protected during the run.
    fn : callable
        The objective over the flat parameter vector (``fn(None)``: at the parameters
        currently in the model).
    center : torch.Tensor, optional
        The trained parameters, flat; default the model's current parameters.
    fisher_inputs : tensor or CausalLMKL, optional
        What ``preconditioner_type="fisher"``/``"fisher_dense"`` computes the Fisher on (the
        classifier's inputs, or the causal-LM objective itself); set by :meth:`from_config`.
    """

    def __init__(
        self,
        config: VolumeConfig,
        model: torch.nn.Module,
        fn: Callable,
        center=None,
        *,
        fisher_inputs=None,
    ):
        self.config = config
        self.model = model
        self.fn = fn
        self._center = center
        self._fisher_inputs = fisher_inputs
        self._preconditioner, self._resolved = None, False

    @property
    def center(self) -> torch.Tensor:
        """The trained (selected) parameters as one flat vector (a copy)."""
        if self._center is not None:
            return self._center
        return torch.cat([p.detach().reshape(-1) for _, p in self.selected_parameters()])

    def selected_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The ``(name, parameter)`` pairs that make up the centre (``config.parameters``:
        by default the trainable ones), in ``parameters_to_vector`` order."""
        flat = getattr(self.fn, "params", None)
        if isinstance(flat, FlatParameters):
            return list(flat.named)
        return select_parameters(self.model, self.config.parameters)

    def _describe_parameters(self) -> dict:
        """``meta["parameters"]``: which parameters were measured and which were left out."""
        chosen = self.selected_parameters()
        names = {n for n, _ in chosen}
        out = {
            "selection": describe_selection(self.config.parameters),
            "tensors": len(chosen),
            "dim": sum(p.numel() for _, p in chosen),
            "excluded": [n for n, _ in self.model.named_parameters() if n not in names],
        }
        if out["selection"] == "names":  # the names and glob patterns as given
            out["names"] = [str(n) for n in self.config.parameters]
        return out

    @classmethod
    def from_config(cls, config: VolumeConfig) -> VolumeEstimator:
        """Dispatch on ``config.model_type``."""
        from .builders import BUILDERS

        return BUILDERS[config.model_type](config)

    @property
    def preconditioner(self):
        """The proposal the run uses: ``config.preconditioner``, or the one
        ``config.preconditioner_type`` builds (once, on first access; under torchrun rank 0
        builds it and every rank uses its bits, so every rank draws the same directions)."""
        if not self._resolved:
            cfg = self.config
            kind = cfg.preconditioner_type
            if cfg.preconditioner is not None or kind in (None, PreconditionerType.NONE):
                self._preconditioner = cfg.preconditioner
            else:
                init_from_env()
                self._preconditioner = from_rank0(self._build_preconditioner)
            self._resolved = True
        return self._preconditioner

    def _build_preconditioner(self):
        cfg = self.config
        eps = cfg.preconditioner_eps
        if eps is None and Measure(cfg.measure) is Measure.UNIFORM:
            eps = 1e-5  # "prior" needs a prior
        with preserved(self.model):
            return resolve_preconditioner(
                cfg.preconditioner_type,
                model=self.model,
                inputs=self._fisher_inputs,
                optimizer=cfg.optimizer,
                eps=eps,
                exponent=cfg.preconditioner_exponent,
                adam_order=cfg.adam_order,
                cutoff=cfg.cutoff,
                sigma=cfg.sigma,
                seed=cfg.seed,
                parameters=cfg.parameters,
            )

    @property
    def low_memory(self) -> bool:
        """Whether the run writes into the model in place (see ``VolumeConfig.low_memory``)."""
        if self.config.low_memory is not None:
            return bool(self.config.low_memory)
        return sum(p.numel() for _, p in self.selected_parameters()) >= LOW_MEMORY_THRESHOLD

    def runs_smc(self) -> bool:
        """Whether :meth:`run`, called without ``callback`` or ``resume_from``, estimates by
        SMC: ``method="smc"``, or ``"auto"`` on dense rays with a fixed diagonal (or no)
        proposal in one process (:func:`basin_volume.estimate`'s rule)."""
        cfg = self.config
        if cfg.method != "auto":
            return cfg.method == "smc"
        if self.low_memory or cfg.preconditioner_type is PreconditionerType.ADAPTIVE:
            return False
        dim = sum(p.numel() for _, p in self.selected_parameters())
        pre = as_preconditioner(self.preconditioner, dim)
        return resolve_method("auto", pre, n_samples=cfg.n_samples, resume_from=None,
                              callback=None) is Method.SMC

    def run(
        self,
        *,
        callback: Callable[[DirectionRecord], None] | None = None,
        resume_from: VolumeResult | None = None,
    ) -> VolumeResult:
        """Estimate the basin; the model comes back with its modes and parameters intact.

        One loop for every configuration: the proposal (:meth:`_fixed` or
        :meth:`_adaptive`) calls the ray runner (:meth:`_ray_runner`: dense, or in place in
        the model) once per batch of directions that share a proposal.

        Parameters
        ----------
        callback : callable, optional
            Called with each finished direction's record (see :func:`basin_volume.estimate`).
        resume_from : VolumeResult, optional
            A partial result of the same run to continue exactly.
        """
        cfg = self.config
        adaptive = cfg.preconditioner_type is PreconditionerType.ADAPTIVE
        if cfg.method == "smc" and (adaptive or self.low_memory):
            raise ValueError(
                "method='smc' runs on dense rays: it cannot run in the memory-light mode or "
                "with preconditioner_type='adaptive'; use low_memory=False and a fixed "
                "preconditioner, or method='is'"
            )
        proposal = self._adaptive if adaptive else self._fixed
        with preserved(self.model):
            result = proposal(self._ray_runner(), callback=callback, resume_from=resume_from)
        result.meta["config"] = cfg.describe()
        result.meta["parameters"] = self._describe_parameters()
        return result

    def _ray_runner(self) -> Callable[..., VolumeResult]:
        """Runs a batch of directions under one fixed proposal, given ``preconditioner``,
        ``n_samples``, ``seed``, ``progress``, ``callback``, ``resume_from`` and the
        settings: through :func:`basin_volume.estimate` (dense rays, ``model_batch_size``
        directions per vmapped call), or, in the memory-light mode, through
        :class:`~basin_volume.rays.InPlaceRays` (``model_batch_size`` directions per group,
        their points built in one buffer and evaluated in one vmapped call, as many as a
        quarter of the free memory holds)."""
        cfg = self.config
        if not self.low_memory:

            def dense(**kwargs) -> VolumeResult:
                return estimate(
                    self.fn, self.center, model_batch_size=cfg.model_batch_size, **kwargs
                )

            return dense
        params = [p for _, p in self.selected_parameters()]
        dim = sum(p.numel() for p in params)

        def light(*, preconditioner, seed, **kwargs) -> VolumeResult:
            pre = as_preconditioner(preconditioner, dim)
            batched = cfg.model_batch_size > 1  # as many points per call as memory allows
            rays = InPlaceRays(self.fn, params, seed=seed, preconditioner=pre,
                               batch_fn=torch.func.vmap(self.fn) if batched else None)  # fmt: skip
            return run_rays(
                rays,
                seed=seed,
                max_evals=40,
                max_radius=None,
                batch_size=cfg.model_batch_size,
                meta={"device": str(params[0].device), "memory": "light"},
                **kwargs,
            )

        return light

    def _settings(self) -> dict:
        """The estimation settings every proposal passes to the ray runner."""
        cfg = self.config
        return dict(cutoff=cfg.cutoff, measure=cfg.measure, sigma=cfg.sigma, rtol=cfg.rtol)

    def _fixed(self, run_batch, *, callback, resume_from) -> VolumeResult:
        """One proposal for every direction: ``config.preconditioner`` or the built one."""
        cfg = self.config
        # the dense runner is estimate(), which resolves method="auto" itself
        extra = dict(budget=cfg.budget) if self.low_memory else dict(
            method=cfg.method, budget=cfg.budget, replicas=cfg.replicas, n_moves=cfg.n_moves,
            bidirectional=cfg.bidirectional)
        return run_batch(
            **extra,
            preconditioner=self.preconditioner,
            n_samples=cfg.n_samples,
            seed=cfg.seed,
            progress=cfg.progress,
            callback=callback,
            resume_from=resume_from,
            **self._settings(),
        )

    def _adaptive(self, run_batch, *, callback, resume_from) -> VolumeResult:
        """``adaptive_rounds`` rounds, each proposal refitted from the rounds before
        (:func:`~basin_volume.adaptive.estimate_adaptive`)."""
        cfg = self.config
        if self.low_memory:  # the runner would serve; tests/test_preconditioners.py pins this
            raise ValueError(
                "preconditioner_type='adaptive' cannot run in low_memory mode (its proposals "
                "may be dense); use low_memory=False, or preconditioner_type='fisher' or 'adam'"
            )
        if resume_from is not None:
            names = ("n_samples", "adaptive_rounds")
            now = {name: getattr(cfg, name) for name in names}
            old = resume_from.meta.get("config") or {}
            then = {name: old.get(name, now[name]) for name in names}
            name = first_difference(then, now, names)
            if name is not None:
                raise ValueError(
                    f"an adaptive run resumes with the rounds it started with: {name} was "
                    f"{then[name]!r}, now {now[name]!r}; keep it, or start a new run"
                )
        return estimate_adaptive(
            self.fn,
            self.center,
            rounds=cfg.adaptive_rounds,
            n_per_round=cfg.n_samples // cfg.adaptive_rounds,
            resume_from=resume_from,
            preconditioner=self.preconditioner,
            seed=cfg.seed,
            progress=cfg.progress,
            callback=callback,
            run_round=run_batch,
            **self._settings(),
        )


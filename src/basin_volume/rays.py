r"""How the objective is evaluated along a ray :math:`\theta_0 + t\omega`.

Two interchangeable strategies give the same numbers (to float rounding) for the same seed:

* :class:`DenseRays` holds the direction :math:`\omega` as a float64 vector and calls
  ``fn(theta)`` with a fresh :math:`\theta = \theta_0 + t\omega` (functional: nothing is
  written anywhere). Fast for small and medium models.
* :class:`InPlaceRays` never holds a direction: each evaluation regenerates the direction
  chunk by chunk (:func:`basin_volume.directions.normal_chunks`) and writes
  :math:`\theta_0 + t\omega` straight into the model's parameters, which are restored by
  copying from one saved copy of :math:`\theta_0` (never by subtracting). Extra memory: that
  one copy, one chunk, and a diagonal preconditioner's scales if one is used (in the
  parameters' precision, at least float32; the rounding is folded exactly into the weight).

Both accumulate the norms and :math:`\omega\cdot\theta_0` in float64.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import directions
from .devices import available_ram_bytes, wide_dtype
from .directions import normal_chunks, normal_vector, sample_direction
from .parameters import center_sha256
from .preconditioners import DiagonalPreconditioner, Preconditioner

__all__ = ["DenseRays", "InPlaceRays", "RayStart"]


@dataclass(frozen=True)
class RayStart:
    """What the estimator needs to know about direction ``k`` before searching along it.

    Attributes
    ----------
    prop : float
        :math:`\\lVert Pu\\rVert` (1 without a preconditioner).
    dot : float
        :math:`\\omega\\cdot\\theta_0`, in float64.
    """

    prop: float
    dot: float


def scalar(value, what: str) -> float:
    """``value`` as a Python float, insisting that it is a scalar."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"fn must return a scalar (a 0-d tensor or a float), but {what} returned a "
                f"tensor of shape {tuple(value.shape)}; reduce it, e.g. with .mean()"
            )
        return float(value.detach().reshape(()).to("cpu", torch.float64))
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"fn must return a scalar tensor or float, but {what} returned {type(value)}")


class DenseRays:
    """Rays of ``fn(theta)`` around ``center`` with whole-vector directions.

    With ``batch_fn`` (``thetas [B, D] -> values [B]``, e.g. a ``torch.func.vmap`` of the
    objective) the pending radii of several directions are evaluated in one call.
    """

    def __init__(
        self,
        fn: Callable,
        center: torch.Tensor,
        *,
        seed: int,
        preconditioner: Preconditioner | None,
        batch_fn: Callable | None = None,
    ):
        self.fn, self.center, self.seed, self.pre = fn, center, seed, preconditioner
        self.batch_fn = batch_fn
        self.omegas: list[torch.Tensor] = []
        self.dim = center.numel()
        self.center64 = center.to("cpu", torch.float64)
        self.center_norm = float(torch.linalg.vector_norm(self.center64))
        self.omega: torch.Tensor | None = None
        self.index = -1

    def value_at_center(self) -> float:
        with torch.no_grad():
            return scalar(self.fn(self.center), "fn(center)")

    def center_sha256(self) -> str:
        """SHA-256 of the centre's bytes (see :func:`basin_volume.parameters.center_sha256`)."""
        return center_sha256([self.center])

    def start(self, index: int) -> RayStart:
        d = sample_direction(index, self.dim, seed=self.seed, preconditioner=self.pre)
        self.omega = d.omega.to(self.center.device, wide_dtype(self.center.device))
        self.index = index
        return RayStart(d.prop, float(d.omega @ self.center64))

    def value_at(self, t: float) -> float:
        """``fn`` at distance ``t`` along the current direction; NaN (no information, and no
        evaluation) where ``theta0 + t * omega`` rounds to ``theta0`` itself."""
        with torch.no_grad():
            theta = self.center + (t * self.omega).to(self.center.dtype)
            if torch.equal(theta, self.center):
                return math.nan
            return scalar(self.fn(theta), f"fn at direction {self.index}")

    def aim(self, omegas: torch.Tensor) -> None:
        """Take the rows of ``omegas`` (unit directions, any provenance) as the slots of
        :meth:`values_at_many`, as :meth:`start_many` does for seeded directions."""
        wide = wide_dtype(self.center.device)
        self.omegas = list(omegas.to(self.center.device, wide).unbind(0))
        self.indices = list(range(len(self.omegas)))

    def start_many(self, indices: Sequence[int]) -> list[RayStart]:
        starts = []
        self.omegas, self.indices = [], list(indices)
        for k in indices:
            starts.append(self.start(k))
            self.omegas.append(self.omega)
        return starts

    def values_at_many(self, pairs: Sequence[tuple[int, float]]) -> list[float]:
        """Values at ``(slot, t)`` pairs, slots indexing the last :meth:`start_many` call."""
        if self.batch_fn is None or len(pairs) == 1:
            out = []
            for slot, t in pairs:
                self.omega, self.index = self.omegas[slot], self.indices[slot]
                out.append(self.value_at(t))
            return out
        with torch.no_grad():
            points = [
                self.center + (t * self.omegas[slot]).to(self.center.dtype) for slot, t in pairs
            ]
            moved = [i for i, theta in enumerate(points) if not torch.equal(theta, self.center)]
            out = [math.nan] * len(pairs)  # points that round to the centre: no information
            if not moved:
                return out
            values = self.batch_fn(torch.stack([points[i] for i in moved]))
        if not isinstance(values, torch.Tensor) or values.shape != (len(moved),):
            raise ValueError(
                f"batch_fn must return a tensor of shape ({len(moved)},) for {len(moved)} "
                f"parameter vectors, got {getattr(values, 'shape', type(values))}"
            )
        for i, value in zip(moved, values.detach().to("cpu", torch.float64).tolist(), strict=True):
            out[i] = value
        return out

    def restore(self) -> None:
        self.omega, self.omegas = None, []

    def release(self) -> None:
        """Nothing to free: directions live only while their search runs."""


class InPlaceRays:
    """Rays evaluated by writing :math:`\\theta_0 + t\\omega` into ``params`` in place.

    Parameters
    ----------
    fn : callable
        ``fn() -> scalar``: the objective at the parameters currently in the model.
    params : sequence of torch.Tensor
        The model's parameters, in ``parameters_to_vector`` order (contiguous).
    seed : int
        Seed of the run.
    preconditioner : DiagonalPreconditioner, optional
        Only diagonal preconditioners can be applied chunk by chunk.
    host_cache : bool, optional
        Keep the current direction's normal vector in one host buffer (float32, pinned for
        CUDA when possible), refilled once per direction by ``torch.get_num_threads()``
        threads, instead of regenerating it chunk by chunk at every evaluation. Default: on
        when the model lives on an accelerator and the buffer takes under a quarter of the
        available host memory (shared by the processes on this machine); off on the CPU,
        where it would be a second copy of the parameters. :meth:`release` frees it.
    batch_fn : callable, optional
        ``batch_fn(thetas [B, D]) -> values [B]`` (e.g. ``torch.func.vmap`` of an objective
        that also takes a flat parameter vector, as :class:`~basin_volume.causal.CausalLMKL`
        does): :meth:`values_at_many` then writes the pending points into one ``[B, D]``
        buffer in the parameters' dtype (regenerating each direction chunk by chunk as
        always) and evaluates them in one call. Where memory allows: ``B`` is cut so that the
        buffer takes at most a quarter of the free device memory (host memory on the CPU),
        and a ``batch_fn`` that fails falls back, with a warning, to one point at a time.
    """

    def __init__(
        self,
        fn: Callable[[], object],
        params: Sequence[torch.Tensor],
        *,
        seed: int,
        preconditioner: Preconditioner | None,
        host_cache: bool | None = None,
        batch_fn: Callable | None = None,
    ):
        self.batch_fn = batch_fn
        if preconditioner is not None and not isinstance(preconditioner, DiagonalPreconditioner):
            raise ValueError(
                "the memory-light mode supports diagonal preconditioners only; use "
                f"low_memory=False with {type(preconditioner).__name__}"
            )
        self.fn, self.seed = fn, seed
        self.params = list(params)
        for p in self.params:
            if not p.is_contiguous():
                raise ValueError("memory-light mode needs contiguous parameters")
        self.device = self.params[0].device
        self.wide = wide_dtype(self.device)
        self.dim = sum(p.numel() for p in self.params)
        with torch.no_grad():
            self.saved = [p.detach().clone() for p in self.params]
        self.center_norm = math.sqrt(
            sum(
                float(block.to(self.wide).square().sum())
                for s in self.saved
                for block in s.view(-1).split(directions.CHUNK_SIZE)
            )
        )
        if not math.isfinite(self.center_norm):
            raise ValueError("the model's parameters contain NaN or inf: the basin is undefined")
        # The scales are kept in the parameters' precision (at least float32): one more copy
        # of the parameters, not two. Rounding makes det P differ from 1 by a hair; that
        # log-determinant is measured and folded into ``prop``, so the importance weight is
        # exact for the proposal actually used.
        self.scales, self.log_det = None, 0.0
        if preconditioner is not None:
            dtype = torch.promote_types(self.params[0].dtype, torch.float32)
            self.scales = preconditioner.scales.to(self.device, dtype)
            self.log_det = sum(
                float(block.to(self.wide).log().sum())
                for block in self.scales.split(directions.CHUNK_SIZE)
            )
        self.index, self.v_norm = -1, math.nan
        self.v_norm_of: dict[int, float] = {}
        if host_cache is None:
            ram = available_ram_bytes()
            share = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            host_cache = self.device.type != "cpu" and (
                ram is None or 4 * self.dim * share < ram / 4
            )
        self.host_cache = bool(host_cache)
        self._buffer: torch.Tensor | None = None  # the cached direction's normals
        self._buffered = -1  # which direction the buffer holds
        # flat offset of each parameter
        self.offsets = [0]
        for p in self.params:
            self.offsets.append(self.offsets[-1] + p.numel())

    def _normals(self, index: int):
        """Yield (start, z chunk): direction ``index``'s normals, float32 on the CPU."""
        if not self.host_cache:
            yield from normal_chunks(self.seed, index, self.dim)
            return
        if self._buffer is None:
            self._buffer = torch.empty(self.dim, dtype=torch.float32)
            if self.device.type == "cuda":
                try:
                    self._buffer = self._buffer.pin_memory()
                except RuntimeError:  # no pinned memory to be had: pageable copies work too
                    pass
        if self._buffered != index:
            if self.device.type == "cuda":  # copies from the buffer may still be in flight
                torch.cuda.synchronize(self.device)
            self._buffered = -1
            normal_vector(
                self.seed, index, self.dim, workers=torch.get_num_threads(), out=self._buffer
            )
            self._buffered = index
        for start in range(0, self.dim, directions.CHUNK_SIZE):
            yield start, self._buffer[start : start + directions.CHUNK_SIZE]

    def release(self) -> None:
        """Free the host buffer of :attr:`host_cache` (it is made again when needed)."""
        self._buffer, self._buffered = None, -1

    def _chunks(self, index: int):
        """Yield (start, z chunk on the CPU, P z chunk in float64 on the device)."""
        for start, z in self._normals(index):
            v = z.to(self.device, self.wide, non_blocking=z.is_pinned())
            if self.scales is not None:
                v = v * self.scales[start : start + v.numel()].to(self.wide)
            yield start, z, v

    def _pieces(self, start: int, size: int):
        """(param index, slice in the param, slice in the chunk) overlapping [start, start+size)."""
        stop = start + size
        for j, (a, b) in enumerate(zip(self.offsets[:-1], self.offsets[1:], strict=True)):
            lo, hi = max(a, start), min(b, stop)
            if lo < hi:
                yield j, slice(lo - a, hi - a), slice(lo - start, hi - start)

    def value_at_center(self) -> float:
        self.restore()
        with torch.no_grad():
            return scalar(self.fn(), "fn(center)")

    def center_sha256(self) -> str:
        """SHA-256 of the centre's bytes (see :func:`basin_volume.parameters.center_sha256`)."""
        return center_sha256(self.saved)

    def start(self, index: int) -> RayStart:
        self.index = index
        z_sq = v_sq = dot = 0.0
        for start, z_chunk, v in self._chunks(index):
            z_sq += float(z_chunk.double().square().sum())  # on the CPU: float64 even for MPS
            v_sq += float(v.square().sum())
            for j, in_p, in_c in self._pieces(start, v.numel()):
                dot += float(v[in_c] @ self.saved[j].view(-1)[in_p].to(self.wide))
        self.v_norm = math.sqrt(v_sq)
        self.v_norm_of[index] = self.v_norm
        # weight det(P) (|u| / |Pu|)^D = (prop)^-D with prop = |Pu| / |u| / det(P)^(1/D)
        prop = self.v_norm / math.sqrt(z_sq) * math.exp(-self.log_det / self.dim)
        return RayStart(prop, dot / self.v_norm)

    def value_at(self, t: float) -> float:
        """``fn`` with ``theta0 + t * omega`` written into the parameters; NaN (no
        information, and no evaluation) where that point rounds to ``theta0`` itself."""
        with torch.no_grad():
            moved = torch.zeros((), dtype=torch.bool, device=self.device)
            for start, _, v in self._chunks(self.index):
                step = t * (v / self.v_norm)
                for j, in_p, in_c in self._pieces(start, v.numel()):
                    target = self.params[j].view(-1)[in_p]
                    saved = self.saved[j].view(-1)[in_p]
                    point = saved + step[in_c].to(target.dtype)
                    moved |= (point != saved).any()
                    target.copy_(point)
            if not bool(moved):
                return math.nan
            return scalar(self.fn(), f"fn at direction {self.index}")

    def start_many(self, indices: Sequence[int]) -> list[RayStart]:
        starts = [self.start(k) for k in indices]
        self.slots = [(k, s_.prop) for k, s_ in zip(indices, starts, strict=True)]
        self.norms = [self.v_norm_of[k] for k in indices]
        return starts

    def values_at_many(self, pairs: Sequence[tuple[int, float]]) -> list[float]:
        """Values at ``(slot, t)`` pairs: in one call of ``batch_fn`` per as many points as
        fit, else one after the other (the model holds one point)."""
        rows = self._rows_that_fit() if self.batch_fn is not None else 1
        if rows > 1 and len(pairs) > 1:
            try:
                return [v for i in range(0, len(pairs), rows)
                        for v in self._batched(pairs[i : i + rows])]  # fmt: skip
            except (RuntimeError, TypeError, ValueError, NotImplementedError) as err:
                warnings.warn(
                    f"batch_fn failed in the memory-light mode ({type(err).__name__}: "
                    f"{str(err)[:200]}); evaluating one point at a time from now on",
                    UserWarning,
                    stacklevel=2,
                )
                self.batch_fn = None
        out = []
        for slot, t in pairs:
            self.index, self.v_norm = self.slots[slot][0], self.norms[slot]
            out.append(self.value_at(t))
        return out

    def _rows_that_fit(self) -> int:
        """Points whose ``[B, D]`` buffer takes at most a quarter of the free memory."""
        free = None
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        elif self.device.type == "cpu":
            free = available_ram_bytes()
        if free is None:
            return 1
        return max(1, free // 4 // (self.dim * self.params[0].element_size()))

    def _batched(self, pairs: Sequence[tuple[int, float]]) -> list[float]:
        """``batch_fn`` at the points of ``pairs``, each built exactly as :meth:`value_at`
        writes it into the parameters; NaN for points that round to the centre."""
        with torch.no_grad():
            points = torch.empty(len(pairs), self.dim, dtype=self.params[0].dtype,
                                 device=self.device)  # fmt: skip
            moved = torch.zeros(len(pairs), dtype=torch.bool, device=self.device)
            for row, (slot, t) in enumerate(pairs):
                index, v_norm = self.slots[slot][0], self.norms[slot]
                for start, _, v in self._chunks(index):
                    step = t * (v / v_norm)
                    for j, in_p, in_c in self._pieces(start, v.numel()):
                        saved = self.saved[j].view(-1)[in_p]
                        point = saved + step[in_c].to(points.dtype)
                        moved[row] |= (point != saved).any()
                        first = self.offsets[j] + in_p.start
                        points[row, first : first + point.numel()] = point
            keep = moved.cpu().tolist()
            out = [math.nan] * len(pairs)
            if not any(keep):
                return out
            chosen = [i for i, k in enumerate(keep) if k]
            values = self.batch_fn(points[chosen] if len(chosen) < len(pairs) else points)
            del points
        if not isinstance(values, torch.Tensor) or values.shape != (len(chosen),):
            raise ValueError(
                f"batch_fn must return a tensor of shape ({len(chosen)},), got "
                f"{getattr(values, 'shape', type(values))}"
            )
        for i, value in zip(chosen, values.detach().to("cpu", torch.float64).tolist(),
                            strict=True):  # fmt: skip
            out[i] = value
        return out

    def restore(self) -> None:
        """Copy the saved centre back into the parameters (exact)."""
        with torch.no_grad():
            for p, s in zip(self.params, self.saved, strict=True):
                p.copy_(s)

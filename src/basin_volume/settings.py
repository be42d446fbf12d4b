"""The settings of one estimate, validated and resolved once, and compared in one way.

:class:`Settings` holds what fixes every direction's value: the measure, cutoff, prior scale
``sigma`` (its default, the RMS of the centre, resolved here and nowhere else), radius
tolerance, seed, the evaluation budget per direction and the radius cap. Every method
(importance sampling, SMC) starts from :meth:`Settings.resolve`; resuming a result, resuming a
run log and merging results compare settings with :func:`first_difference`.

>>> s = Settings.resolve(measure="gaussian", n_samples=8, cutoff=0.01, rtol=0.01,
...                      max_evals=40, seed=0, sigma=None, max_radius=None, dim=4, norm_c=2.0)
>>> s.sigma, s.measure
(1.0, <Measure.GAUSSIAN: 'gaussian'>)
>>> first_difference({"cutoff": 0.01, "sigma": 1.0}, {"cutoff": 0.02, "sigma": 1.0},
...                  ("sigma", "cutoff"))
'cutoff'
"""

from __future__ import annotations

import enum
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import checks

__all__ = [
    "Measure",
    "Method",
    "Settings",
    "default_sigma",
    "first_difference",
    "resolve_sigma",
    "same_value",
]


class Measure(enum.StrEnum):
    """The measure of parameter space whose basin mass is estimated."""

    GAUSSIAN = "gaussian"
    """Probability under the prior N(0, sigma^2 I): where a random initialisation lands."""
    UNIFORM = "uniform"
    """Lebesgue volume of the basin."""


class Method(enum.StrEnum):
    """How the basin's measure is estimated."""

    AUTO = "auto"
    """``"smc"`` where it applies, else ``"is"`` (see :func:`basin_volume.estimate`)."""
    SMC = "smc"
    """Sequential Monte Carlo along a Gaussian-cooling path (:mod:`basin_volume.smc`)."""
    IS = "is"
    """Importance sampling from one proposal: fast, but a lower bound unless its ESS is high."""


def parse_measure(measure: Any) -> Measure:
    """``measure`` as a :class:`Measure`, or a ``ValueError`` naming the options."""
    try:
        return Measure(measure)
    except ValueError:
        raise ValueError(f"measure must be 'gaussian' or 'uniform', got {measure!r}") from None


def default_sigma(norm_c: float, dim: int) -> float:
    """The default prior scale: the RMS of the centre's entries, :math:`\\lVert\\theta_0\\rVert
    / \\sqrt D`.

    >>> default_sigma(2.0, 4)
    1.0
    """
    return norm_c / math.sqrt(dim)


def resolve_sigma(sigma: Any, norm_c: float, dim: int, measure: Measure) -> float:
    """The prior scale a run uses: ``nan`` for the uniform measure, :func:`default_sigma` for
    ``None``, else ``sigma`` checked (with a warning when it is far from the centre's scale)."""
    if measure is Measure.UNIFORM:
        return math.nan
    rms = default_sigma(norm_c, dim)
    if sigma is None:
        if rms == 0:
            raise ValueError(
                "sigma is missing and cannot be derived: the centre is all zeros, so its RMS "
                "(the default prior scale) is 0; pass sigma=<the initialisation scale>"
            )
        return rms
    sigma = checks.check_positive("sigma", sigma)
    if rms > 0 and not 1e-2 <= sigma / rms <= 1e2:
        warnings.warn(
            f"sigma={sigma:g} is {sigma / rms:.3g} times the RMS of the centre ({rms:.3g}); "
            "the prior is then far from the parameters' scale (did you pass a variance, or "
            "the wrong units?)",
            UserWarning,
            stacklevel=4,
        )
    return float(sigma)


def default_max_radius(measure: Measure, norm_c: float, sigma: float, dim: int) -> float:
    """The radius cap: past the prior's bulk (Gaussian), or far past the centre (uniform)."""
    if measure is Measure.GAUSSIAN:
        return norm_c + sigma * (math.sqrt(dim) + 50.0)
    return 1e6 * max(norm_c, 1.0)


@dataclass(frozen=True)
class Settings:
    """The settings every method shares, validated, with ``sigma`` and ``max_radius``
    resolved (see :func:`basin_volume.estimate` for their meaning)."""

    measure: Measure
    n_samples: int
    cutoff: float
    rtol: float
    max_evals: int
    seed: int
    sigma: float
    max_radius: float

    @classmethod
    def resolve(
        cls,
        *,
        measure: Any,
        n_samples: Any,
        cutoff: Any,
        rtol: Any,
        max_evals: Any,
        seed: Any,
        sigma: Any,
        max_radius: Any,
        dim: int,
        norm_c: float,
    ) -> Settings:
        """Check every setting (errors name the field) and resolve the defaults that depend
        on the centre: ``sigma`` (its RMS) and ``max_radius``."""
        measure = parse_measure(measure)
        n_samples = checks.check_positive("n_samples", n_samples, integer=True)
        cutoff = checks.check_positive("cutoff", cutoff)
        rtol = checks.check_rtol(rtol)
        max_evals = checks.check_positive("max_evals", max_evals, integer=True)
        seed = checks.check_seed(seed)
        sigma = resolve_sigma(sigma, norm_c, dim, measure)
        if max_radius is None:
            max_radius = default_max_radius(measure, norm_c, sigma, dim)
        max_radius = checks.check_positive("max_radius", max_radius)
        return cls(measure, n_samples, cutoff, rtol, max_evals, seed, sigma, max_radius)

    def first_guess(self, dim: int, norm_c: float) -> float:
        """First radius tried before any direction has measured one: 1% of the prior's
        scale."""
        return first_guess(self.measure, self.sigma, dim, norm_c)

    def as_recorded(self, dim: int) -> dict:
        """The settings as a result records them (see :func:`first_difference`)."""
        return {
            "dim": dim,
            "measure": self.measure.value,
            "cutoff": float(self.cutoff),
            "sigma": self.sigma,
            "rtol": float(self.rtol),
            "seed": self.seed,
        }


def first_guess(measure: Measure, sigma: float, dim: int, norm_c: float) -> float:
    """First radius tried before any direction has measured one: 1% of the prior's scale."""
    scale = sigma * math.sqrt(dim) if measure is Measure.GAUSSIAN else None
    return 1e-2 * (scale or max(norm_c, 1.0))


def same_value(a: Any, b: Any) -> bool:
    """Whether two recorded settings agree: numbers to 12 digits (NaN equal to NaN), anything
    else exactly."""
    numbers = int | float
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        return a == b or (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12)
    return a == b


def first_difference(a: Mapping, b: Mapping, names: Iterable[str]) -> str | None:
    """The first of ``names`` whose values in ``a`` and ``b`` differ (see :func:`same_value`),
    or ``None``: the one compatibility check of resume and merge."""
    return next((n for n in names if not same_value(a.get(n), b.get(n))), None)

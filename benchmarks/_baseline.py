"""The original project's radius search, as the baseline of the benchmarks.

Doubling from the previous direction's radius until the ray leaves the basin, then bisection
until |delta - cutoff| <= rtol * cutoff, on the same directions as Tyche. Each direction's log
estimate uses the same exact formula as the library, so the two aggregate estimates can be
compared with their intervals.
"""

from __future__ import annotations

import math
import os
import time

import torch

from basin_volume import VolumeResult
from basin_volume.directions import sample_direction
from basin_volume.integrals import log_radial_integral, log_sphere_area
from basin_volume.result import DirectionRecord


def doubling_bisection(delta_at, cutoff, rtol, guess, max_evals=200):
    """Return ``(radius, delta, evaluations)``."""
    n, t = 0, guess
    lo, hi = 0.0, math.inf
    d = math.nan
    while n < max_evals:
        d = delta_at(t)
        n += 1
        if abs(d - cutoff) <= rtol * cutoff:
            break
        if d < cutoff:
            lo = t
            t = 2 * t if hi == math.inf else 0.5 * (lo + hi)
        else:
            hi = t
            t = 0.5 * t if lo == 0 else 0.5 * (lo + hi)
    return t, d, n


def baseline_run(fn, center, *, n_samples, cutoff, rtol, seed=0):
    """Gaussian-measure estimate (sigma = RMS of the centre) with the baseline search.

    ``fn(theta)`` is evaluated at the centre before every ray point (the original project
    recomputed the centre's outputs each step unless told to cache them).
    """
    dim = center.numel()
    c64 = center.double().cpu()
    norm = float(c64.norm())
    sigma = norm / math.sqrt(dim)
    const = log_sphere_area(dim) - 0.5 * dim * math.log(2 * math.pi) - 0.5 * (norm / sigma) ** 2
    records, guess = [], 1e-2 * norm
    started = time.perf_counter()
    for k in range(n_samples):
        omega64 = sample_direction(k, dim, seed=seed).omega
        omega = omega64.to(center.device, center.dtype)

        def delta_at(t, omega=omega):
            with torch.no_grad():
                f0 = float(fn(center))
                return float(fn(center + t * omega)) - f0

        r, d, n = doubling_bisection(delta_at, cutoff, rtol, guess)
        guess = r
        lai = log_radial_integral(r / sigma, dim - 1.0, 1.0, -float(omega64 @ c64) / sigma)
        records.append(
            DirectionRecord(
                index=k,
                estimate=const + lai,
                delta=d,
                prop=1.0,
                radius=r,
                logabsint=lai - log_sphere_area(dim),
                n_evals=n,
                status="converged",
                slope=math.nan,
            )
        )
    seconds = time.perf_counter() - started
    return VolumeResult.from_records(
        records,
        dim=dim,
        measure="gaussian",
        cutoff=cutoff,
        sigma=sigma,
        rtol=rtol,
        seed=seed,
        meta={"seconds": seconds},
    )


def reset_peak_memory() -> int:
    """Reset the process's peak resident memory (Linux); return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status_kib("VmRSS") * 1024


def peak_memory() -> int:
    """Peak resident memory since the last reset, in bytes."""
    return _status_kib("VmHWM") * 1024


def _status_kib(field: str) -> int:
    with open(f"/proc/{os.getpid()}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")

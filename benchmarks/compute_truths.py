r"""Recompute the Monte Carlo truths of the network problems and the checks of the others.

Writes ``benchmarks/truth_cache.json`` (merging into what is there):

* ``networks[<family>@seed<s>]``: for the 52-parameter MLP and the digits MLP, the centre,
  the settings and, per cutoff, the direct-sampling estimate log P̂ = log(k/n) with its
  delta-method standard error sqrt((1 - P̂)/(n P̂)).
* ``checks``: independent re-derivations of the other truths (mpmath at 30 digits for the
  Gaussian ellipsoids, grid doubling and brute-force Monte Carlo for the product blocks).

Run: ``python benchmarks/compute_truths.py [--only mlp52|digits|checks] [--seed S]``. On the
shared 2-core machine (one torch thread): mlp52 about 3 minutes (200,000 draws, 1.7 million
evaluations), digits about 5 minutes (20,000 draws, 200,000 evaluations; plus 4 s training),
checks about 2.5 minutes (mostly mpmath at D = 1000).

Direct sampling with a segment check
------------------------------------
Draw θ ~ N(0, σ² I) (σ = RMS of θ0) and let M(θ) = max_{t∈[0,1]} δ(θ0 + t(θ − θ0)). θ lies
in the star-shaped basin S_ε iff M(θ) ≤ ε (the estimators' r(ω) is the first exit along the
ray, so S_ε is exactly this set up to its boundary), hence P = Pr(M ≤ ε) for every ε at once
and one set of draws serves all cutoffs of a network. The KL along a segment is far from
monotone here (on the 52-parameter network its maximum is up to ~2.5x its endpoint value), so
the endpoint alone would overestimate P. M is computed in stages, each exact for the decision
"M ≤ ε_max" (ε_max = the largest cutoff): (1) the endpoint t = 1; (2) a coarse grid of 8
points, dropping every draw with a value above ε_max (any grid value is a lower bound on M);
(3) the fine grid t_j = j/G, j = 1..G; (4) every local maximum of the grid sequence
(t_0 = 0 included, δ = 0 there; the endpoint counts when δ_G ≥ δ_{G-1} and δ still falls
just before it, δ(1 - 10^-3/G) ≥ δ(1), one probe evaluation) is refined by
golden-section search on [t_{j-1}, min(t_{j+1}, 1)] (16-24 steps: the bracket shrinks to
< 5e-4 of the grid spacing, and near a smooth maximum the value misses it by about
|δ''|·bracket²/2, far below anything that matters). M = max of all values seen.

The grid can only miss a bump of δ narrower than the spacing 1/G that the grid sequence does
not show as a local maximum. ``grid_check`` measures that directly: the draws that survive
stage 2 (a random subset of up to ``--check`` of them) are redone with a 4x finer grid and
the number of draws whose decision changes at any cutoff is recorded (it is 0 for every
stored result; the largest change of M is recorded too).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import problems as P  # noqa: E402

GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0

SETTINGS = {
    "mlp52": {
        "n": 200_000,
        "grid": 64,
        "coarse": 8,
        "steps": 24,
        "chunk_points": 8192,
        "check": 2000,
    },
    "digits": {"n": 20_000, "grid": 16, "coarse": 8, "steps": 16, "chunk_points": 8, "check": 300},
}
DRAW_CHUNK = 2000  # draws are generated in chunks of this size from one generator


class Segments:
    """Evaluate delta on points theta0 + t (theta - theta0), in vmapped chunks."""

    def __init__(self, fn, center: torch.Tensor, chunk_points: int):
        self.batched = torch.func.vmap(fn)
        self.center = center
        self.chunk = chunk_points
        self.f0 = float(fn(center))
        self.evals = 0

    def __call__(self, offsets: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        """offsets [m, D] = theta - theta0, ts [m, k] -> delta [m, k]."""
        m, k = ts.shape
        if m == 0 or k == 0:
            return ts.new_zeros((m, k))
        rows = max(1, self.chunk // k)
        out = []
        with torch.no_grad():
            for off, t in zip(offsets.split(rows), ts.split(rows), strict=True):
                pts = self.center + t[:, :, None] * off[:, None, :]
                out.append(self.batched(pts.reshape(-1, pts.shape[-1])).reshape(t.shape))
        self.evals += m * k
        return torch.cat(out) - self.f0


def refine_local_maxima(seg: Segments, offsets, values, grid: int, steps: int):
    """Golden-section refinement of the local maxima of each row of ``values`` (delta at
    t = j/grid, j = 1..grid; delta(0) = 0), the endpoint included (bracket [1 - 1/grid, 1])
    unless delta(1 - 1e-3/grid) < delta(1). Returns the largest value seen per row."""
    n = values.shape[0]
    pad = values.new_full((n, 1), -math.inf)
    padded = torch.cat([values.new_zeros(n, 1), values, pad], dim=1)  # j <-> t = j/grid
    mid = padded[:, 1:-1]
    is_max = (mid >= padded[:, :-2]) & (mid >= padded[:, 2:])
    best = values.max(dim=1).values.clone()
    # the endpoint is a true local maximum of delta on [0, 1] when delta still rises into it:
    # probe delta(1 - h) and refine the last interval only when it does not
    at_end = torch.nonzero(is_max[:, -1]).squeeze(1)
    h = 1e-3 / grid
    probe = seg(offsets[at_end], offsets.new_full((at_end.numel(), 1), 1.0 - h))[:, 0]
    best[at_end] = torch.maximum(best[at_end], probe)
    is_max[at_end[probe < values[at_end, -1]], -1] = False
    rows, cols = torch.nonzero(is_max, as_tuple=True)
    if rows.numel() == 0:
        return best
    j = (cols + 1).to(values.dtype)  # grid index of the local maximum
    a, b = (j - 1) / grid, torch.clamp((j + 1) / grid, max=1.0)
    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    off = offsets[rows]
    fc = seg(off, c[:, None])[:, 0]
    fd = seg(off, d[:, None])[:, 0]
    found = torch.maximum(mid[rows, cols], torch.maximum(fc, fd))
    for _ in range(steps):
        left = fc > fd  # the maximum is in [a, d], else in [c, b]
        a, b = torch.where(left, a, c), torch.where(left, d, b)
        c, d = (
            torch.where(left, b - GOLDEN * (b - a), d),
            torch.where(left, c, a + GOLDEN * (b - a)),
        )
        fx = seg(off, torch.where(left, c, d)[:, None])[:, 0]
        fc, fd = torch.where(left, fx, fd), torch.where(left, fc, fx)
        found = torch.maximum(found, fx)
    best.scatter_reduce_(0, rows, found, reduce="amax")
    return best


def segment_max(seg: Segments, offsets, *, cap: float, grid: int, coarse: int, steps: int):
    """(M(theta), delta(theta)) for each row of ``offsets``; rows found above ``cap`` early
    get a value > cap (a lower bound on M), which is all the decisions M <= eps <= cap need.
    ``grid`` must be a multiple of ``coarse``; the fine grid reuses the coarse values."""
    if grid % coarse:
        raise ValueError("grid must be a multiple of coarse")
    n, dtype = offsets.shape[0], offsets.dtype
    end = seg(offsets, offsets.new_ones(n, 1))[:, 0]
    out = end.clone()
    alive = torch.nonzero(out <= cap).squeeze(1)
    tc = torch.arange(1, coarse, dtype=dtype) / coarse
    vc = seg(offsets[alive], tc.expand(alive.numel(), -1))
    if alive.numel():
        out[alive] = torch.maximum(out[alive], vc.max(dim=1).values)
    keep = out[alive] <= cap
    alive, vc = alive[keep], vc[keep]
    if alive.numel() == 0:
        return out, end
    step = grid // coarse
    cols = torch.arange(grid)
    coarse_cols = cols[(cols + 1) % step == 0]  # t = (col + 1)/grid = k/coarse
    other_cols = cols[(cols + 1) % step != 0]
    vf = offsets.new_empty(alive.numel(), grid)
    vf[:, coarse_cols] = torch.cat([vc, end[alive, None]], dim=1)
    t_other = (other_cols + 1).to(dtype) / grid
    vf[:, other_cols] = seg(offsets[alive], t_other.expand(alive.numel(), -1))
    out[alive] = refine_local_maxima(seg, offsets[alive], vf, grid, steps)
    return out, end


def network_truth(
    family: str,
    seed: int,
    cutoffs,
    *,
    n: int,
    grid: int,
    coarse: int,
    chunk_points: int,
    check: int,
    steps: int,
    sample_seed: int,
) -> dict:
    t_start = time.perf_counter()
    center, inputs, sizes = P.network_setup(family, seed)
    fn = P.kl_fn(center, inputs, sizes)
    sigma = float(center.norm()) / math.sqrt(center.numel())
    seg = Segments(fn, center, chunk_points)
    cap = max(cutoffs)
    gen = torch.Generator().manual_seed(sample_seed)
    maxima, ends, survivors = [], [], []
    done = 0
    while done < n:
        m = min(DRAW_CHUNK, n - done)
        theta = sigma * torch.randn(m, center.numel(), generator=gen, dtype=torch.float64)
        offsets = theta - center
        mx, end = segment_max(seg, offsets, cap=cap, grid=grid, coarse=coarse, steps=steps)
        maxima.append(mx)
        ends.append(end)
        # keep the offsets that reached the fine grid, for the grid check (bounded memory)
        if sum(s.shape[0] for s in survivors) < check:
            survivors.append(offsets[mx <= cap * 1.5])
        done += m
        print(f"  {family}: {done}/{n} draws, {seg.evals} evals", end="\r", flush=True)
    print()
    maxima, ends = torch.cat(maxima), torch.cat(ends)
    sampling_s = time.perf_counter() - t_start
    sampling_evals = seg.evals

    # the grid check: redo surviving draws with a 4x finer grid
    sub = (
        torch.cat(survivors)[:check]
        if survivors
        else torch.empty(0, center.numel(), dtype=torch.float64)
    )
    coarse_m = segment_max(seg, sub, cap=cap * 1.5, grid=grid, coarse=coarse, steps=steps)[0]
    fine_m = segment_max(seg, sub, cap=cap * 1.5, grid=4 * grid, coarse=coarse, steps=steps)[0]
    flips = {repr(float(e)): int(((coarse_m <= e) != (fine_m <= e)).sum()) for e in cutoffs}
    both = (coarse_m <= cap * 1.5) & (fine_m <= cap * 1.5)
    grid_check = {
        "draws": int(sub.shape[0]),
        "fine_grid": 4 * grid,
        "decision_flips": flips,
        "max_increase_of_M": float((fine_m - coarse_m)[both].max()) if both.any() else 0.0,
    }

    rows = {}
    for eps in cutoffs:
        k = int((maxima <= eps).sum())
        p = k / n
        rows[repr(float(eps))] = {
            "k": k,
            "n": n,
            "log_p": math.log(p) if k else -math.inf,
            "se": math.sqrt((1 - p) / (n * p)) if k else math.inf,
            # what checking only the endpoint delta(theta) <= eps would have counted
            "k_endpoint_only": int((ends <= eps).sum()),
        }
    return {
        "center": center.tolist(),
        "sigma": sigma,
        "settings": {
            "n": n,
            "grid": grid,
            "coarse": coarse,
            "golden_steps": steps,
            "sample_seed": sample_seed,
            "draw_chunk": DRAW_CHUNK,
        },
        "cutoffs": rows,
        "grid_check": grid_check,
        "evals": sampling_evals,
        "seconds": sampling_s,
        "seconds_with_check": time.perf_counter() - t_start,
        "torch": torch.__version__,
    }


# ------------------------------------------------------------------------- other checks


def ellipsoid_checks() -> dict:
    """mpmath (30 digits) against the float64 inversion on the scored Gaussian ellipsoids."""
    out = {}
    for name in P.names():
        if not name.startswith("ellipsoid") or "gaussian" not in name:
            continue
        p = P.get(name)
        t = time.perf_counter()
        entry = P._REGISTRY[name]
        rng = np.random.default_rng(entry.seed)
        kw = entry.kwargs
        center = rng.normal(size=p.dim)
        rms = P._rms(center)
        axes = rms * P._spread_axes(p.dim, -2.0, rng)
        h = 2 * p.cutoff / axes**2
        if kw.get("singular"):
            h[rng.permutation(p.dim)[: int(round(kw["singular"] * p.dim))]] = 0.0
        rot = P._orthogonal(p.dim, rng) if kw.get("rotated") else None
        shifted = center if rot is None else rot.T @ center
        ref = P.gchisq_logcdf_mpmath(h * p.sigma**2, (shifted / p.sigma) ** 2, 2 * p.cutoff)
        out[name] = {
            "truth": p.truth,
            "mpmath_30_digits": ref,
            "difference": p.truth - ref,
            "seconds": time.perf_counter() - t,
        }
        print(f"  {name}: float64 {p.truth!r}, mpmath {ref!r}")
    return out


def product_checks(n_mc: int = 1_000_000, seed: int = 0) -> dict:
    """Grid doubling of each product truth, and brute-force Monte Carlo of 5 blocks each."""
    out = {}
    rng_mc = np.random.default_rng(seed)
    for name in P.names():
        if not name.startswith("product"):
            continue
        entry = P._REGISTRY[name]
        blocks = P.make_blocks(
            entry.kwargs["n_blocks"], P.PRODUCT_CUTOFF, np.random.default_rng(entry.seed)
        )
        p = P.get(name)
        if p.measure == "gaussian":
            fine = math.fsum(blocks.log_masses(p.sigma, p.cutoff, n_phi=2048, n_t=128).tolist())
            lm = blocks.log_masses(p.sigma, p.cutoff)
            mc = []
            for b in range(5):
                x = rng_mc.normal(size=(n_mc, 2)) * p.sigma - blocks.center[b]
                sub = P.Blocks(
                    *(
                        np.asarray(v)[b : b + 1]
                        for v in (
                            blocks.center,
                            blocks.angle,
                            blocks.k1,
                            blocks.k2,
                            blocks.g,
                            blocks.q,
                        )
                    )
                )
                k = int((sub.deltas(x[:, None, :])[:, 0] <= p.cutoff).sum())
                phat = k / n_mc
                mc.append(
                    {
                        "block": b,
                        "quadrature": float(lm[b]),
                        "mc": math.log(phat),
                        "mc_se": math.sqrt((1 - phat) / (n_mc * phat)),
                    }
                )
        else:
            fine = math.fsum(blocks.log_areas(p.cutoff, n_phi=2048).tolist())
            mc = []
        out[name] = {
            "truth": p.truth,
            "doubled_grids": fine,
            "difference": p.truth - fine,
            "blocks_mc": mc,
        }
        print(f"  {name}: {p.truth!r} (doubled grids: {fine!r})")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["mlp52", "digits", "checks"], action="append")
    ap.add_argument("--seed", type=int, default=0, help="network construction seed")
    ap.add_argument("--n", type=int, help="prior draws (default: per family)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dry-run", action="store_true", help="print, do not write the cache")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    todo = args.only or ["mlp52", "digits", "checks"]
    cache = P.load_cache()
    t0 = time.perf_counter()
    for family in ("mlp52", "digits"):
        if family not in todo:
            continue
        settings = dict(SETTINGS[family])
        if args.n:
            settings["n"] = args.n
        t = time.perf_counter()
        entry = network_truth(
            family,
            args.seed,
            P.NETWORK_CUTOFFS[family],
            sample_seed=1000 + args.seed,
            **settings,
        )
        cache["networks"][P.cache_key(family, args.seed)] = entry
        for eps, row in entry["cutoffs"].items():
            print(
                f"  {family} cutoff {eps}: {row['k']}/{row['n']} -> log P = "
                f"{row['log_p']:.4f} +- {row['se']:.4f}"
            )
        print(f"  grid check: {entry['grid_check']}")
        print(f"  {family}: {time.perf_counter() - t:.0f} s")
    if "checks" in todo:
        cache["checks"]["ellipsoid_mpmath"] = ellipsoid_checks()
        cache["checks"]["product"] = product_checks()
    print(f"total {time.perf_counter() - t0:.0f} s")
    if not args.dry_run:
        P.CACHE.write_text(json.dumps(cache, indent=1) + "\n")
        print(f"wrote {P.CACHE}")


if __name__ == "__main__":
    main()

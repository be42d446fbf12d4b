"""Proposals compared on the digits MLP at equal numbers of objective evaluations.

The bundled digits MLP (64 -> 64 GELU -> 10, D = 4810) is trained with full-batch Adam
(``basin_volume.digits.train_digits_mlp``, seed 0). Its KL basin on the 1024 training digits
(cutoff 1e-2 nats, Gaussian prior with the default sigma = RMS of the parameters) is estimated
with each proposal under 5 direction seeds. Every run gets the same budget of fn evaluations
(default 600 per seed): directions are searched until the budget is spent and the result is
the longest prefix of directions within it (the adaptive proposal gets rounds sized from the
naive run's evaluations per direction and is cut the same way). Setup costs (Fisher gradients,
the dense eigendecomposition) are not fn evaluations and are reported in seconds.

Proposals: naive (isotropic); Adam scales 1/(|m|^gamma + eta) from exp_avg_sq (order 2) and
exp_avg (order 1) over a small sweep of eta and gamma; the diagonal Fisher of the KL basin
and the dense Fisher eigenbasis (4810 x 4810, computed and diagonalised once), each with
eta = 1e-5 and with eta = (2 cutoff / (sigma^2 D))^(1/2), the curvature floor set by the prior
(basin_volume.preconditioners.prior_eps; the diagonal Fisher also with 1e-3); and the adaptive
proposal (4 rounds): curvature and cross-entropy updates of one scale per parameter tensor
started isotropic, curvature updates per parameter tensor started from the Fisher, and of 4
eigenvalue bins started from the dense Fisher.

Columns: evals and dirs are per seed (means); log P is the mean over seeds of log_volume
(natural log of the probability under the prior), sd its standard deviation across seeds,
min/max its range; ESS and top are the mean effective sample size and the mean share of the
total weight carried by the top direction; fail counts radius searches that did not converge
(all seeds: mostly rays still inside the basin at the largest radius, whose full Gaussian
ray integral is used); setup (shared Fisher / eigendecomposition cost included) and run
are wall-clock seconds for all seeds.

Run: python benchmarks/preconditioners.py [--n-evals 600] [--seeds 5] [--json out.json]
(about 5 minutes on 2 idle CPU cores, 10 when they are shared; --quick runs a 3-row smoke version).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings

import torch

import basin_volume as bv
from basin_volume.adaptive import estimate_adaptive, parameter_groups
from basin_volume.digits import train_digits_mlp
from basin_volume.objectives import ClassifierKL
from basin_volume.preconditioners import (
    DensePreconditioner,
    adam_preconditioner,
    fisher_diagonal,
    fisher_matrix,
    prior_eps,
)
from basin_volume.result import VolumeResult


class _Budget(Exception):
    pass


def run_with_budget(fn, center, budget: int, **kwargs) -> VolumeResult:
    """``bv.estimate`` stopped as soon as ``budget`` fn evaluations are spent; the result is
    the longest prefix of directions within the budget."""
    records, spent = [], [0]

    def collect(rec):
        spent[0] += rec.n_evals
        if spent[0] > budget:
            raise _Budget
        records.append(rec)

    try:
        res = bv.estimate(fn, center, n_samples=budget, callback=collect, **kwargs)
        settings = res
    except _Budget:
        settings = None
    if settings is not None:
        return truncate(settings, budget)
    probe = bv.estimate(fn, center, n_samples=1, **kwargs)  # settings only (1 direction)
    return VolumeResult.from_records(
        records,
        dim=probe.dim,
        measure=probe.measure,
        cutoff=probe.cutoff,
        sigma=probe.sigma,
        rtol=probe.rtol,
        seed=probe.seed,
        meta=probe.meta,
    )


def truncate(res: VolumeResult, budget: int) -> VolumeResult:
    """The longest prefix of ``res``' directions spending at most ``budget`` evaluations."""
    cum = res.n_evals.cumsum(0)
    n = int((cum <= budget).sum())
    recs = res.records()[:n]
    return VolumeResult.from_records(
        recs,
        dim=res.dim,
        measure=res.measure,
        cutoff=res.cutoff,
        sigma=res.sigma,
        rtol=res.rtol,
        seed=res.seed,
        meta=res.meta,
    )


def summarise(name: str, results: list[VolumeResult], setup_s: float, run_s: float) -> dict:
    logs = [r.log_volume for r in results]
    return {
        "method": name,
        "evals": statistics.mean(int(r.n_evals.sum()) for r in results),
        "dirs": statistics.mean(r.n_samples for r in results),
        "log_p_mean": statistics.mean(logs),
        "log_p_sd": statistics.stdev(logs) if len(logs) > 1 else math.nan,
        "log_p_min": min(logs),
        "log_p_max": max(logs),
        "ess": statistics.mean(r.ess for r in results),
        "top_share": statistics.mean(r.top_weight_share for r in results),
        "failed": sum(r.n_failed for r in results),
        "log_p_per_seed": logs,
        "setup_s": setup_s,
        "run_s": run_s,
    }


def fmt_row(row: dict) -> str:
    return (
        f"{row['method']:<40} {row['evals']:>6.0f} {row['dirs']:>5.0f} "
        f"{row['log_p_mean']:>10.1f} {row['log_p_sd']:>7.1f} {row['log_p_min']:>10.1f} "
        f"{row['log_p_max']:>10.1f} {row['ess']:>5.2f} {row['top_share']:>5.2f} "
        f"{row['failed']:>4d} {row['setup_s']:>6.1f} {row['run_s']:>6.1f}"
    )


HEADER = (
    f"{'proposal':<40} {'evals':>6} {'dirs':>5} {'log P':>10} {'sd':>7} {'min':>10} "
    f"{'max':>10} {'ESS':>5} {'top':>5} {'fail':>4} {'setup':>6} {'run':>6}"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-evals", type=int, default=600, help="fn evaluations per run")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--cutoff", type=float, default=1e-2)
    parser.add_argument("--rounds", type=int, default=4, help="rounds of the adaptive runs")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense Fisher")
    parser.add_argument("--quick", action="store_true", help="3 rows, 2 seeds: a smoke test")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()
    torch.manual_seed(0)
    seeds = list(range(2 if args.quick else args.seeds))
    budget = args.n_evals

    t0 = time.perf_counter()
    run = train_digits_mlp(seed=0)
    fn = ClassifierKL(run.model, run.train_inputs)
    center = fn.center
    train_s = time.perf_counter() - t0
    sigma = float(center.norm()) / math.sqrt(center.numel())
    eta_prior = prior_eps(args.cutoff, sigma, center.numel())
    print(
        f"digits MLP D={center.numel()}, test accuracy {run.accuracy:.3f} (trained in "
        f"{train_s:.0f} s); KL basin on {len(run.train_inputs)} inputs, cutoff "
        f"{args.cutoff:g} nats, Gaussian prior sigma = RMS(theta0); budget {budget} fn "
        f"evaluations per run, seeds {seeds}; eps=prior is (2 cutoff / (sigma^2 D))^0.5 = "
        f"{eta_prior:.3g}"
    )
    common = {"cutoff": args.cutoff, "progress": False}
    rows: list[dict] = []

    def fixed(name: str, make, shared_setup: float = 0.0):
        t = time.perf_counter()
        pre = make()
        setup = time.perf_counter() - t + shared_setup
        t = time.perf_counter()
        results = [
            run_with_budget(fn, center, budget, preconditioner=pre, seed=s, **common) for s in seeds
        ]
        row = summarise(name, results, setup, time.perf_counter() - t)
        rows.append(row)
        print(fmt_row(row), flush=True)
        return results

    print(HEADER)
    naive = fixed("naive (isotropic)", lambda: None)
    evals_per_dir = statistics.mean(int(r.n_evals.sum()) / r.n_samples for r in naive)
    opt = run.optimizer
    adam_grid = (
        [(1e-5, 0.5)]
        if args.quick
        else [
            (1e-5, 0.5),
            (1e-8, 0.5),
            (1e-3, 0.5),
            (1e-5, 0.25),
            (1e-5, 1.0),
        ]
    )
    for order in (2,) if args.quick else (2, 1):
        for eps, gamma in adam_grid:
            fixed(
                f"adam order={order} eps={eps:g} exp={gamma:g}",
                lambda order=order, eps=eps, gamma=gamma: adam_preconditioner(
                    opt, model=run.model, order=order, eps=eps, exponent=gamma
                ),
            )
    t = time.perf_counter()
    fdiag = fisher_diagonal(run.model, run.train_inputs)
    fisher_s = time.perf_counter() - t
    fisher_eps = (
        [("prior", eta_prior)]
        if args.quick
        else [
            ("1e-05", 1e-5),
            ("1e-03", 1e-3),
            ("prior", eta_prior),
        ]
    )
    for label, eps in fisher_eps:
        fixed(
            f"fisher eps={label} exp=0.5",
            lambda eps=eps: 1.0 / (fdiag.sqrt() + eps),
            fisher_s,
        )
    eig, dense_s = None, 0.0
    if not (args.quick or args.no_dense):
        t = time.perf_counter()
        eig = tuple(torch.linalg.eigh(fisher_matrix(run.model, run.train_inputs)))
        dense_s = time.perf_counter() - t
        for label, eps in (("1e-05", 1e-5), ("prior", eta_prior)):
            fixed(
                f"dense fisher eps={label} exp=0.5",
                lambda eps=eps: DensePreconditioner(eig, eps=eps, exponent=0.5),
                dense_s,
            )
    if not args.quick:
        n_per_round = max(2, round(budget / (args.rounds * evals_per_dir)))
        layers = parameter_groups(run.model)
        variants = [
            ("curvature", "isotropic", None, layers, 0.0),
            ("cross_entropy", "isotropic", None, layers, 0.0),
            ("curvature", "fisher eps=prior", 1.0 / (fdiag.sqrt() + eta_prior), layers, fisher_s),
        ]
        if eig is not None:
            dense = DensePreconditioner(eig, eps=eta_prior)
            variants.append(("curvature", "dense eps=prior", dense, 4, fisher_s + dense_s))
        for update, start, pre, groups, setup in variants:
            t = time.perf_counter()
            results = []
            for s in seeds:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = estimate_adaptive(
                        fn,
                        center,
                        rounds=args.rounds,
                        n_per_round=n_per_round,
                        update=update,
                        groups=groups,
                        preconditioner=pre,
                        seed=s,
                        **common,
                    )
                results.append(truncate(res, budget))
            row = summarise(
                f"adaptive {update} from {start}", results, setup, time.perf_counter() - t
            )
            row["rounds"] = [
                [
                    {k: e[k] for k in ("log_volume", "ess", "std", "n_evals")}
                    for e in r.meta["adaptive"]["rounds"]
                ]
                for r in results
            ]
            rows.append(row)
            print(fmt_row(row), flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"budget": budget, "seeds": seeds, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        warnings.simplefilter("ignore", bv.RadiusSearchWarning)
        main()

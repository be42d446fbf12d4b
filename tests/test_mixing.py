"""The correlation each SMC level's moves leave with where the level began, and the warning
when they leave most levels unmixed (``VolumeResult.moves_stuck``)."""

from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path

import pytest
import torch

import basin_volume as bv
from basin_volume.result import STUCK_CORRELATION
from basin_volume.smc import smc_sampler

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import problems  # noqa: E402

from test_smc import (  # noqa: E402
    _drive,
    _mixed,
    _movers,
    _rotated_ellipsoid_and_a_wrong_proposal,
)


def test_the_correlation_left_is_that_of_the_moves_made():
    """Particles that never move keep a correlation of 1 with the level's start, fresh
    independent ones about 0, and five steps of a drift with correlation 0.9 per step leave
    0.9^5 (4,000 particles: sample correlations within 0.05)."""
    fresh, drift = _movers(4)
    assert _mixed(3, lambda st: st)[3] == pytest.approx(1.0)
    assert abs(_mixed(3, fresh)[3]) < 0.05
    assert _mixed(5, drift)[3] == pytest.approx(0.9**5, abs=0.05)


def test_a_run_records_one_correlation_per_level():
    """A tempering run from a poor proposal (a D = 40 ellipsoid whose Hessian's eigenvalues
    are each off by e^{0.5 z}) records one correlation per level: one move per level leaves
    most levels above the threshold (and yet lands within half a nat of the closed form: the
    check is a heuristic); moves until the particles decorrelate leave none."""
    c, truth, a, start, radius_of = _rotated_ellipsoid_and_a_wrong_proposal()
    one = _drive(smc_sampler(c, sigma=None, n_particles=100, n_moves=1, seed=1, start=start),
                 radius_of)
    enough = _drive(smc_sampler(c, sigma=None, n_particles=100, n_moves=None, seed=1,
                                start=start), radius_of)
    for run in (one, enough):
        assert run.kind == "tempered" and len(run.correlation) == run.levels
    assert sum(v > STUCK_CORRELATION for v in one.correlation) > one.levels / 2
    assert max(enough.correlation) < STUCK_CORRELATION
    assert one.log_z == pytest.approx(truth, abs=0.5)
    assert enough.log_z == pytest.approx(truth, abs=0.5)


def test_moves_stuck_counts_levels_over_the_threshold():
    """A quarter of the levels over the threshold is allowed, more is flagged: by the
    summary, by a warning, and in nothing but SMC results (old files lack the record)."""
    h = torch.logspace(0, 1, 6, dtype=torch.float64)
    c = torch.zeros(6, dtype=torch.float64)
    res = bv.estimate(lambda th: 0.5 * (h * th * th).sum(), c, n_samples=32, measure="uniform",
                      progress=False, replicas=2, method="smc")

    def with_levels(values):
        return dataclasses.replace(res, meta={**res.meta, "smc": {
            **res.meta["smc"], "correlation": values}})

    assert res.stuck_levels == (0, 0) and not res.moves_stuck  # importance sampling: no levels
    fine = with_levels([[0.95, 0.2, 0.1, 0.3], [0.1, 0.99, 0.2, 0.3]])
    assert fine.stuck_levels == (2, 8) and not fine.moves_stuck
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fine.warn_if_unreliable()
    stuck = with_levels([[0.95, 0.2, 0.1, 0.3], [0.1, 0.99, 0.92, 0.3]])
    assert stuck.stuck_levels == (3, 8) and stuck.moves_stuck
    assert "3 of 8 SMC levels unmixed" in stuck.summary()
    with pytest.warns(bv.LowESSWarning, match="leave n_moves=None"):
        stuck.warn_if_unreliable()
    old = dataclasses.replace(res, meta={k: v for k, v in res.meta.items() if k != "smc"})
    assert old.stuck_levels == (0, 0) and not old.moves_stuck


def test_a_low_estimate_from_too_few_moves_is_warned_about():
    """A product of 20 two-dimensional cubic-quartic basins (D = 40; its log prior mass is a
    sum of 2-D quadratures): one move per level leaves the estimate nats below the truth,
    outside its own interval, and the warning says why."""
    p = problems.product("t", 12, n_blocks=20)
    with pytest.warns(bv.LowESSWarning, match="SMC levels unmixed"):
        res = bv.estimate(p.fn, p.center, cutoff=p.cutoff, measure=p.measure, sigma=p.sigma,
                          seed=0, progress=False, n_samples=64, replicas=2, method="smc",
                          n_moves=1, bidirectional=False)
    assert res.meta["smc"]["kinds"] == ["tempered", "tempered"]
    assert res.log_volume < p.truth - 1.5
    assert res.interval()[1] < p.truth
    assert res.moves_stuck

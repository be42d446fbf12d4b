"""Smoke tests of the laptop-scale experiments (``experiments/*.py``) with ``--quick``.

Each script's ``main`` runs into a temporary folder; the tests check that the figure, the
summary and the VolumeResult files are written, that the numbers are finite, and a few facts
that hold whatever the random draws (monotonicity in the cutoff, the step-0 norm term).
The full runs are marked slow.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

import basin_volume as bv

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(scope="module")
def experiments():
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(EXPERIMENTS))


def run(experiments, name: str, tmp_path: Path, *extra: str) -> tuple[dict, Path, Path]:
    figures, results = tmp_path / "figures", tmp_path / "results"
    argv = ["--quick", "--figures-dir", str(figures), "--results-dir", str(results), *extra]
    summary = experiments(name).main(argv)
    assert (figures / f"{name}.png").stat().st_size > 1000
    saved = json.loads((results / "summary.json").read_text())
    assert saved.keys() == summary.keys()
    files = sorted(p for p in results.rglob("*.json") if p.name != "summary.json")
    assert files, "no VolumeResult files written"
    for path in files:
        if "tiny_lm_models" in path.parts:  # the saved tiny LM's own config files
            continue
        res = bv.VolumeResult.load(path)
        assert res.n_samples >= 1
        assert math.isfinite(res.log_volume)
        assert res.log_volume < 0
    return summary, figures, results


def test_preconditioning_quick(experiments, tmp_path):
    summary, _, results = run(experiments, "preconditioning", tmp_path)
    for prior in ("init", "L2"):
        rows = summary["priors"][prior]["rows"]
        assert [r["family"] for r in rows][0] == "naive"
        assert {r["family"] for r in rows} >= {"naive", "adam order 2", "diagonal Fisher"}
        for r in rows:
            assert math.isfinite(r["log_p"]) and r["log_p"] < 0
            assert 1.0 <= r["ess"] <= r["n"]
            assert 0 < r["top_share"] <= 1
            assert r["vs_naive"]["verdict"] in ("higher", "lower", "n.s.")
        assert (results / prior / "naive.json").exists()
    # equal budgets: every proposal spent at most the budget per seed
    budget = summary["budget"]
    for prior in ("init", "L2"):
        for r in summary["priors"][prior]["rows"]:
            assert r["evals_per_dir"] * r["dirs_per_seed"] <= budget + 1e-9


def test_checkpoints_quick(experiments, tmp_path):
    summary, _, _ = run(experiments, "checkpoints", tmp_path)
    d = summary["digits"]
    assert d["steps"] == [0, 1, 3, 10]
    rows = d["priors"]["init"]["rows"]
    # at step 0 the prior's sigma is the RMS of the parameters, so |theta|^2 / 2 sigma^2 = D/2
    assert rows[0]["norm_term_mean"] == pytest.approx(4810 / 2, rel=1e-6)
    for prior in ("init", "L2"):
        for r in d["priors"][prior]["rows"]:
            assert all(math.isfinite(x) and x > 0 for x in r["info_per_model"])
        assert len(d["priors"][prior]["changes"]) == len(d["steps"]) - 1
    lm = summary["lm"]
    assert lm["steps"] == [0, 1]
    # step 0 is rebuilt, not loaded: it must be one small Adam step (lr 1.5e-4) from step 1
    assert 0 < lm["rms_step1_minus_step0"] < 1e-3
    assert all(r["info"] > 0 and math.isfinite(r["info"]) for r in lm["rows"])


def test_poisoning_quick(experiments, tmp_path):
    summary, _, _ = run(experiments, "poisoning", tmp_path)
    assert len(summary["models"]) == 2
    for m in summary["models"]:
        assert math.isnan(m["clean"]["poison_train_acc"])
        assert 0 <= m["poisoned"]["poison_train_acc"] <= 1
        for prior in ("init", "L2"):
            assert math.isfinite(m["clean"][prior]["log_p"])
            assert math.isfinite(m["poisoned"][prior]["log_p"])
    for prior in ("init", "L2"):
        s = summary["priors"][prior]
        assert s["verdict"] in ("larger", "smaller", "n.s.")
        assert s["t_low"] <= s["mean"] <= s["t_high"]


def test_cutoff_scan_quick(experiments, tmp_path):
    summary, _, _ = run(experiments, "cutoff_scan", tmp_path)
    assert summary["cutoffs"] == pytest.approx([1e-4, 1e-3, 1e-2])
    for prior in ("init", "L2"):
        rows = summary["priors"][prior]["rows"]
        logs = [r["log_p"] for r in rows]
        # a larger cutoff gives a larger basin (each estimate is far above the noise here)
        assert logs == sorted(logs)
        assert all(r["slope"] > 0 for r in rows[1:])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["preconditioning", "checkpoints", "poisoning", "cutoff_scan"])
def test_full_run(experiments, tmp_path, name):
    figures, results = tmp_path / "figures", tmp_path / "results"
    summary = experiments(name).main(["--figures-dir", str(figures), "--results-dir", str(results)])
    assert (figures / f"{name}.png").exists()
    assert summary["seconds"] > 0

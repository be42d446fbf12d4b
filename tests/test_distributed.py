"""Directions sharded over two gloo ranks under torchrun equal a single-process run."""

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import basin_volume as bv

SCRIPT = Path(__file__).parent / "scripts" / "sharded_run.py"
sys.path.insert(0, str(SCRIPT.parent))
from sharded_run import classifier_config, problem  # noqa: E402


def torchrun(*args, timeout=120, target=(str(SCRIPT),)):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BASIN_VOLUME_BACKEND": "gloo"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=0",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=localhost:0",
        *target,
        *map(str, args),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_ranks_equal_single_process(tmp_path):
    out = tmp_path / "sharded.json"
    proc = torchrun(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = bv.VolumeResult.load(out)
    fn, center = problem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = bv.estimate(fn, center, n_samples=40, seed=7, progress=False, method="is")
    for name in ("estimates", "deltas", "radii", "props", "n_evals", "logabsint"):
        torch.testing.assert_close(
            getattr(sharded, name), getattr(single, name), rtol=0, atol=0, msg=name
        )
    assert sharded.status == single.status


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_failing_rank_stops_the_job_quickly(tmp_path):
    started = time.monotonic()
    proc = torchrun(tmp_path / "never.json", 1, timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert "deliberate failure on rank 1" in proc.stderr + proc.stdout
    assert elapsed < 60
    assert not (tmp_path / "never.json").exists()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_cli_under_torchrun_writes_once_and_resumes_exactly(tmp_path):
    """The unchanged command under torchrun: rank 0 alone prints and writes the run log; a
    sharded run resumed with more directions equals one single-process run."""
    common = ["estimate", "--model", "digits", "--digits-steps", "60", "--device", "cpu"]
    out = tmp_path / "sharded.json"
    target = ("-m", "basin_volume")
    first = torchrun(*common, "-n", "20", "-o", out, target=target, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("information content") == 1  # rank 1 prints nothing
    log = (tmp_path / "sharded.records.jsonl").read_text().splitlines()
    indices = [json.loads(line)["index"] for line in log[1:]]
    assert indices == list(range(20))  # every direction, once, in order
    resumed = torchrun(*common, "-n", "36", "-o", out, "--resume", target=target, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    single_out = tmp_path / "single.json"
    subprocess.run(
        [sys.executable, "-m", "basin_volume", *common, "-n", "36", "--method", "is", "-o",
         str(single_out), "-q"],
        check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    sharded, single = bv.VolumeResult.load(out), bv.VolumeResult.load(single_out)
    assert sharded.n_samples == 36
    for name in ("estimates", "radii", "props", "n_evals"):
        torch.testing.assert_close(
            getattr(sharded, name), getattr(single, name), rtol=0, atol=0, msg=name
        )


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_fisher_preconditioned_batched_config_run_equals_single_process(tmp_path):
    """Rank 0 builds the Fisher scales and shares their bits; rounds of 2 ranks x 3 batched
    directions give every direction exactly as one process does."""
    out = tmp_path / "config.json"
    proc = torchrun("config", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = bv.VolumeResult.load(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = bv.VolumeEstimator.from_config(classifier_config().replace(method="is")).run()
    assert sharded.n_samples == 24
    for name in ("estimates", "radii", "props", "n_evals"):
        torch.testing.assert_close(
            getattr(sharded, name), getattr(single, name), rtol=0, atol=0, msg=name
        )

"""benchmarks/gpu_check.py runs every accelerator code path; here on the CPU (--quick)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_quick_on_cpu_runs_every_row(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    src = str(Path(__file__).parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    names = [r["name"] for r in rows]
    for wanted in ("dense fp32 cache=gpu", "dense fp32 no cache", "light fp32 host cache",
                   "dense fp32 compile", "light bf16", "160m light", "dense fp32 batch=4",
                   "light fp32 batch=4",
                   "torchrun 1 proc", "torchrun 2 proc"):  # fmt: skip
        assert wanted in names
    assert not [r for r in rows if "error" in r]
    table = [r for r in rows if "restored" in r]
    assert all(r["restored"] for r in table)
    # every cache mode and the light mode evaluate exactly the same numbers
    exact = {r["name"]: r["log_p"] for r in table if "fp32" in r["name"]
             and "compile" not in r["name"] and "batch" not in r["name"]}  # fmt: skip
    assert len(set(exact.values())) == 1, exact
    # the uncached objective runs the centre's forward pass again at every evaluation
    by = {r["name"]: r for r in table}
    assert by["dense fp32 no cache"]["calls_per_direction"] == pytest.approx(
        2 * by["dense fp32 cache=cpu"]["calls_per_direction"]
    )
    for r in rows:
        if "backend" in r:
            assert r["identical_dense"] and r["identical_light"], r

import json
import subprocess
import sys

import pytest

from basin_volume.cli import main


def test_demo_prints_estimate_and_saves(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--n-samples", "5", "--quiet", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "log probability" in text and "information content" in text and "ESS" in text
    data = json.loads(out.read_text())
    assert len(data["estimates"]) == 5


@pytest.mark.parametrize(
    ("args", "option"), [(["--n-samples", "0"], "n-samples"), (["--cutoff", "-1"], "cutoff")]
)
def test_bad_arguments_exit_2_naming_option(args, option):
    proc = subprocess.run(
        [sys.executable, "-m", "basin_volume", "demo", *args], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert option in proc.stderr

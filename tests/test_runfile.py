"""Run logs: incremental saving, exact resume (after an exception or a torn last line), checks."""

import copy
import json
import math

import pytest
import torch

from basin_volume import VolumeConfig, VolumeResult
from basin_volume.result import ResultFileError
from basin_volume.runfile import (
    ResumeError,
    estimate_to_file,
    load_result,
    read_run,
    records_path,
    run_to_file,
    scan,
)

FIELDS = ("estimates", "deltas", "props", "mults", "logabsint", "n_evals", "radii", "slopes")
N = 10


# Few directions: low-ESS warnings are expected and not what these tests are about.
pytestmark = [
    pytest.mark.filterwarnings("ignore::basin_volume.LowESSWarning"),
    pytest.mark.filterwarnings("ignore::basin_volume.RadiusSearchWarning"),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: one thread is as fast, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def config(digits_run):
    return VolumeConfig(
        model_type="mlp",
        model=digits_run.model,
        inputs=digits_run.train_inputs[:256],
        n_samples=N,
        progress=False,
    )


@pytest.fixture(scope="module")
def uninterrupted(config, tmp_path_factory):
    path = tmp_path_factory.mktemp("full") / "full.json"
    return run_to_file(config, path), path


def assert_same_directions(a: VolumeResult, b: VolumeResult) -> None:
    assert a.n_samples == b.n_samples
    for name in FIELDS:
        torch.testing.assert_close(
            getattr(a, name), getattr(b, name), rtol=0, atol=0, equal_nan=True
        )
    assert a.status == b.status
    assert (a.dim, a.measure, a.cutoff, a.sigma, a.rtol, a.seed) == (
        b.dim,
        b.measure,
        b.cutoff,
        b.sigma,
        b.rtol,
        b.seed,
    )


class Stop(Exception):
    pass


def test_run_log_has_header_and_one_line_per_direction(uninterrupted):
    result, path = uninterrupted
    lines = records_path(path).read_text().splitlines()
    header = json.loads(lines[0])
    assert records_path(path).name == "full.records.jsonl"
    assert header["format"] == "basin_volume.run"
    assert header["settings"]["dim"] == result.dim and header["settings"]["n_samples"] == N
    assert header["config"]["model_type"] == "mlp"
    env = header["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and "basin_volume" in env
    rows = [json.loads(line) for line in lines[1:]]
    assert [r["index"] for r in rows] == list(range(N))
    assert all(r["type"] == "direction" and r["seconds"] >= 0 for r in rows)
    # The final file is a plain VolumeResult with the configuration and timings.
    loaded = VolumeResult.load(path)
    assert_same_directions(loaded, result)
    assert len(loaded.meta["timings"]["per_direction_seconds"]) == N
    assert loaded.meta["environment"]["torch"] == torch.__version__
    assert loaded.meta["config"]["n_samples"] == N


def test_resume_after_an_exception_equals_uninterrupted(config, uninterrupted, tmp_path):
    full, _ = uninterrupted
    out = tmp_path / "part.json"
    k = 4

    def stop_after_k(record):
        if record.index == k - 1:
            raise Stop

    with pytest.raises(Stop):
        run_to_file(config, out, callback=stop_after_k)
    assert not out.exists()
    assert len(read_run(out).records) == k  # each direction was on disk before the callback
    partial = load_result(out)
    assert partial.meta["partial"] and partial.n_samples == k
    seen = []
    resumed = run_to_file(config, out, resume=True, callback=seen.append)
    assert [r.index for r in seen] == list(range(k, N))
    assert_same_directions(resumed, full)
    assert_same_directions(VolumeResult.load(out), full)
    assert resumed.meta["timings"]["sessions"] == 2


def test_torn_last_line_is_detected_and_redone(config, uninterrupted, tmp_path):
    full, path = uninterrupted
    data = records_path(path).read_bytes()
    lines = data.split(b"\n")
    cut = len(b"\n".join(lines[:7])) + 1 + len(lines[7]) // 2  # header, 0-5, half of 6
    out = tmp_path / "torn.json"
    records_path(out).write_bytes(data[:cut])
    log = read_run(out)
    assert log.truncated and len(log.records) == 6
    resumed = run_to_file(config, out, resume=True)
    assert_same_directions(resumed, full)
    repaired = read_run(out)
    assert not repaired.truncated and len(repaired.records) == N and repaired.sessions == 2
    for line in records_path(out).read_text().splitlines():
        json.loads(line)  # every line whole again


def test_damaged_middle_line_is_an_error_not_a_silent_skip(uninterrupted, tmp_path):
    _, path = uninterrupted
    lines = records_path(path).read_text().splitlines(keepends=True)
    lines[3] = lines[3][:20] + "\n"
    bad = tmp_path / "bad.records.jsonl"
    bad.write_text("".join(lines))
    with pytest.raises(ResultFileError, match="line 4 is damaged"):
        read_run(bad)
    (tmp_path / "nohead.records.jsonl").write_text('{"type": "direction"}\n')
    with pytest.raises(ResultFileError, match="not a basin_volume run log"):
        read_run(tmp_path / "nohead.records.jsonl")


def test_resume_refuses_a_different_run(config, uninterrupted, tmp_path, digits_run):
    _, path = uninterrupted
    out = tmp_path / "r.json"
    records_path(out).write_bytes(records_path(path).read_bytes())
    with pytest.raises(ResumeError, match="cutoff") as err:
        run_to_file(config.replace(cutoff=0.02), out, resume=True)
    assert err.value.field == "cutoff"
    other = copy.deepcopy(digits_run.model)
    with torch.no_grad():
        other[0].bias[0] += 1e-3
    with pytest.raises(ResumeError) as err:
        run_to_file(config.replace(model=other), out, resume=True)
    assert err.value.field == "model"
    with pytest.raises(ResumeError) as err:
        run_to_file(config.replace(inputs=digits_run.train_inputs[256:512]), out, resume=True)
    assert err.value.field == "data"
    with pytest.raises(ResumeError) as err:
        run_to_file(config.replace(n_samples=N - 1), out, resume=True)
    assert err.value.field == "n_samples"


def test_resume_ignores_smc_only_settings_and_logs_written_before_them(config, uninterrupted,
                                                                        tmp_path):
    """Run logs hold importance sampling only, so SMC's settings may change on resume, and a
    log whose header predates ``bidirectional`` still resumes."""
    full, path = uninterrupted
    lines = records_path(path).read_text().splitlines(keepends=True)
    header = json.loads(lines[0])
    del header["config"]["bidirectional"]
    out = tmp_path / "old.json"
    records_path(out).write_text(json.dumps(header) + "\n" + "".join(lines[1:5]))
    resumed = run_to_file(config.replace(bidirectional=True, n_moves=2, replicas=3), out,
                          resume=True)
    assert_same_directions(resumed, full)


def test_existing_output_needs_resume_or_overwrite(config, uninterrupted, tmp_path):
    _, path = uninterrupted
    with pytest.raises(FileExistsError, match="resume=True"):
        run_to_file(config, path)
    again = run_to_file(config.replace(n_samples=3), tmp_path / "o.json")
    replaced = run_to_file(config.replace(n_samples=2), tmp_path / "o.json", overwrite=True)
    assert again.n_samples == 3 and replaced.n_samples == 2
    assert len(read_run(tmp_path / "o.json").records) == 2


def quadratic(theta):
    return 0.5 * (theta - 1.0).square().sum()


def test_estimate_to_file_resumes_extends_and_survives_a_lost_log(tmp_path):
    center = torch.ones(6, dtype=torch.float64)
    kw = {"cutoff": 0.5, "measure": "uniform", "rtol": 1e-10, "seed": 3, "progress": False}
    full = estimate_to_file(quadratic, center, tmp_path / "full.json", n_samples=8, **kw)
    out = tmp_path / "grow.json"
    first = estimate_to_file(quadratic, center, out, n_samples=5, **kw)
    assert first.n_samples == 5
    records_path(out).unlink()  # only the finished results file is left
    grown = estimate_to_file(quadratic, center, out, n_samples=8, resume=True, **kw)
    assert_same_directions(grown, full)
    assert len(read_run(out).records) == 8
    # The unit ball of radius 1 (0.5 * r^2 = 0.5): log volume is log(pi^3 / 6).
    assert math.isclose(full.log_volume, math.log(math.pi**3 / 6), rel_tol=1e-8)
    with pytest.raises(TypeError, match="no argument"):
        estimate_to_file(quadratic, center, tmp_path / "x.json", bogus=1)


def test_scan_over_cutoffs_writes_each_point_and_resumes(config, tmp_path):
    cutoffs = [0.003, 0.03]
    sources = [config.replace(n_samples=4, cutoff=c) for c in cutoffs]
    rows = scan(sources, tmp_path / "scan", plot=False)
    assert [r["value"] for r in rows] == cutoffs
    assert [r["name"] for r in rows] == ["cutoff_0.003", "cutoff_0.03"]
    assert rows[0]["log_volume"] < rows[1]["log_volume"]  # a larger cutoff, a larger basin
    summary = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert summary["axis"] == "cutoff" and len(summary["rows"]) == 2
    calls = []

    def lazy(c):
        def build():
            calls.append(c)
            return config.replace(n_samples=4, cutoff=c)

        return build

    again = scan([lazy(c) for c in cutoffs], tmp_path / "scan", values=cutoffs, resume=True)
    assert calls == []  # finished points are not rebuilt
    assert [r["log_volume"] for r in again] == [r["log_volume"] for r in rows]
    assert (tmp_path / "scan" / "scan.png").stat().st_size > 10_000


def test_adaptive_run_resumes_exactly_and_keeps_its_rounds(config, tmp_path):
    adaptive = config.replace(preconditioner_type="adaptive", n_samples=8, adaptive_rounds=2)
    full = run_to_file(adaptive, tmp_path / "full.json")
    out = tmp_path / "part.json"

    def stop_in_round_two(record):
        if record.index == 5:
            raise Stop

    with pytest.raises(Stop):
        run_to_file(adaptive, out, callback=stop_in_round_two)
    resumed = run_to_file(adaptive, out, resume=True)
    assert_same_directions(resumed, full)
    assert len(resumed.meta["adaptive"]["rounds"]) == 2
    with pytest.raises(ValueError, match="n_samples"):
        run_to_file(adaptive.replace(n_samples=12), out, resume=True)

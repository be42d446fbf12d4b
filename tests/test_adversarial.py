"""The cases an adversarial trial broke: each gave a confident wrong number, mixed two runs,
or ended in a traceback. Every test here failed before the fix (see docs/reliability.md)."""

import json
import math
import os
import pickle
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import basin_volume as bv
from basin_volume.cli import main
from basin_volume.parameters import FlatParameters, center_sha256
from basin_volume.rays import DenseRays, InPlaceRays
from basin_volume.runfile import (
    RunInUseError,
    RunLock,
    estimate_to_file,
    read_run,
    records_path,
)

C = torch.linspace(0.1, 1.0, 8, dtype=torch.float64)


def quad(center, h=1.0):
    return lambda th: 0.5 * (h * (th - center).square()).sum()


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def cli(args: str, capsys):
    """``basin-volume ARGS`` in this process: (exit status, stdout, stderr)."""
    try:
        code = main(shlex.split(args))
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str) -> bool:
    return "Traceback" not in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- wrong answers without an error


@pytest.mark.parametrize("rtol", [1.0, 2.0, 0.51])
def test_rtol_the_search_cannot_honour_is_refused(rtol, capsys):
    with pytest.raises(ValueError, match="rtol"):
        bv.estimate(quad(C), C, n_samples=2, rtol=rtol, progress=False)
    with pytest.raises(ValueError, match="rtol"):
        bv.VolumeConfig(rtol=rtol)
    code, _, err = cli(f"estimate --model digits -o x.json --rtol {rtol}", capsys)
    assert code == 2 and "--rtol" in err and one_line_error(err)
    res = quiet(bv.estimate, quad(C), C, n_samples=2, rtol=0.5, progress=False)
    assert torch.all((res.deltas - res.cutoff).abs() <= 0.5 * res.cutoff)


def test_nan_everywhere_but_the_centre_is_nonfinite_and_minus_inf():
    def fn(th):
        return torch.zeros((), dtype=th.dtype) if torch.equal(th, C) else th.sum() * math.nan

    with pytest.warns(bv.RadiusSearchWarning) as record:
        res = bv.estimate(fn, C, n_samples=3, progress=False)
    assert set(res.status) == {"nonfinite"}
    assert res.log_volume == -math.inf and torch.all(res.radii == 0)
    message = str(record[0].message)
    assert "NaN or inf at every radius" in message and "directions 0, 1, 2" in message


def test_radius_below_float_resolution_is_nonfinite_and_minus_inf():
    # The exact answer is about -6898.5; the search used to return radii at the float
    # resolution of the centre and -744.
    center = torch.ones(8, dtype=torch.float64)
    with pytest.warns(bv.RadiusSearchWarning) as record:
        res = bv.estimate(quad(center), center, n_samples=3, cutoff=1e-300, progress=False)
    assert set(res.status) == {"nonfinite"} and res.log_volume == -math.inf
    message = str(record[0].message)
    assert "float resolution" in message and "directions 0, 1, 2" in message


def test_points_that_round_to_the_centre_are_not_evaluated():
    calls = []
    center = torch.ones(6, dtype=torch.float64)

    def fn(th=None):
        calls.append(1)
        return torch.zeros(())

    rays = DenseRays(fn, center, seed=0, preconditioner=None)
    rays.start(0)
    assert math.isnan(rays.value_at(1e-30)) and not calls
    assert rays.value_at(1e-3) == 0.0 and len(calls) == 1
    param = nn.Parameter(center.clone())
    inplace = InPlaceRays(fn, [param], seed=0, preconditioner=None)
    inplace.start(0)
    assert math.isnan(inplace.value_at(1e-30)) and len(calls) == 1
    assert inplace.value_at(1e-3) == 0.0 and len(calls) == 2
    inplace.restore()
    assert torch.equal(param.detach(), center)


class PartlyFrozen(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)
        self.embed.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)))


def test_frozen_parameters_are_left_out_by_default():
    model = PartlyFrozen().double()
    inputs = torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    frozen = {n: p.detach().clone() for n, p in model.embed.named_parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(inputs).logsumexp(-1).mean().backward()
        opt.step()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = dict(model_type="classifier", model=model, inputs=inputs, n_samples=3, progress=False)

    res = quiet(bv.VolumeEstimator.from_config(bv.VolumeConfig(**base)).run)
    assert res.dim == trainable == 27
    assert res.meta["parameters"] == {
        "selection": "trainable",
        "tensors": 2,
        "dim": 27,
        "excluded": ["embed.weight", "embed.bias"],
    }
    # the Adam preconditioner used to refuse: the optimizer never saw the frozen parameters
    cfg = bv.VolumeConfig(**base, preconditioner_type="adam", optimizer=opt)
    assert quiet(bv.VolumeEstimator.from_config(cfg).run).dim == 27
    for choice, dim in (("all", 67), (["head.weight"], 24), (lambda n, p: "bias" in n, 11)):
        cfg = bv.VolumeConfig(**base, parameters=choice)
        assert quiet(bv.VolumeEstimator.from_config(cfg).run).dim == dim
    assert FlatParameters(model).dim == 27 and FlatParameters(model, parameters="all").dim == 67
    for n, p in model.embed.named_parameters():
        assert torch.equal(p, frozen[n])
    with pytest.raises(ValueError, match="parameters"):
        bv.VolumeEstimator.from_config(bv.VolumeConfig(**base, parameters=["nope.weight"]))
    with pytest.raises(ValueError, match="parameters"):
        bv.VolumeConfig(parameters="some")


def low_ess_run():
    pre = torch.logspace(-1, 1, 8)
    return bv.estimate(quad(C), C, n_samples=10, preconditioner=pre, progress=False)


def test_low_ess_is_flagged_for_every_result():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")  # Python's own: once per code location
        results = [low_ess_run() for _ in range(3)]
    flags = [w for w in seen if issubclass(w.category, bv.LowESSWarning)]
    assert len(flags) == 3
    assert f"{results[0].log_volume:.6g}" in str(flags[0].message)
    for res in results:
        assert res.low_ess and res.to_dict()["low_ess"] is True
        assert "ESS is low" in res.summary()


# ---------------------------------------------------------------- mixing runs


def test_second_run_on_a_run_log_refuses_while_the_first_runs(tmp_path):
    out = tmp_path / "r.json"
    fn = quad(C)
    kwargs = dict(n_samples=20, rtol=1e-3, progress=False)
    refused = []

    class Stop(Exception):
        pass

    def second_session(record):
        if record.index == 2:
            with pytest.raises(RunInUseError, match=f"process {os.getpid()}") as err:
                estimate_to_file(fn, C, out, resume=True, **kwargs)
            refused.append(err.value.pid)
            raise Stop  # the first session dies here

    with pytest.raises(Stop):
        quiet(estimate_to_file, fn, C, out, callback=second_session, **kwargs)
    assert refused == [os.getpid()]
    assert [r.index for r in read_run(out).records] == [0, 1, 2]  # nothing interleaved
    resumed = quiet(estimate_to_file, fn, C, out, resume=True, **kwargs)
    clean = quiet(bv.estimate, fn, C, method="is", **kwargs)
    assert torch.equal(resumed.estimates, clean.estimates) and resumed.status == clean.status
    assert not RunLock.lock_path(records_path(out)).exists()


SLOW_RUN = """
import sys, time, torch
from basin_volume.runfile import estimate_to_file
c = torch.linspace(0.1, 1.0, 8, dtype=torch.float64)
def fn(th):
    time.sleep(0.02)
    return 0.5 * (th - c).square().sum()
estimate_to_file(fn, c, sys.argv[1], n_samples=200, rtol=1e-3, progress=False, resume=True)
"""


@pytest.mark.slow
def test_two_processes_on_one_run_log(tmp_path):
    script, out = tmp_path / "slow_run.py", tmp_path / "r.json"
    script.write_text(SLOW_RUN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    first = subprocess.Popen([sys.executable, str(script), str(out)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not (records_path(out).exists() and len(read_run(out).records) >= 2):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        fn, kwargs = quad(C), dict(n_samples=200, rtol=1e-3, progress=False)
        with pytest.raises(RunInUseError, match=f"process {first.pid}"):
            estimate_to_file(fn, C, out, resume=True, **kwargs)
        (tmp_path / "objective.py").write_text(MODELS_PY)
        code, _, err = cli_subprocess(
            ["estimate", "--model", f"{tmp_path / 'objective.py'}:quad", "--resume", "-o", str(out)]
        )
        assert code == 2 and f"process {first.pid}" in err and "Traceback" not in err
    finally:
        first.kill()
        first.wait()
    resumed = quiet(estimate_to_file, fn, C, out, resume=True, **kwargs)
    clean = quiet(bv.estimate, fn, C, **kwargs)
    assert torch.equal(resumed.estimates, clean.estimates) and resumed.status == clean.status
    assert read_run(out).sessions == 2


def cli_subprocess(argv):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-m", "basin_volume", *argv], capture_output=True, text=True, env=env
    )
    return proc.returncode, proc.stdout, proc.stderr


MODELS_PY = """
import os, signal, torch
C = torch.linspace(0.1, 1.0, 8, dtype=torch.float64)
calls = []
def quad():
    return (lambda th: 0.5 * (th - C).square().sum()), C
def other():
    return (lambda th: 0.5 * (th - 2 * C).square().sum()), 2 * C
def terminated():
    def fn(th):
        calls.append(1)
        if len(calls) == 30:
            os.kill(os.getpid(), signal.SIGTERM)
        return 0.5 * (th - C).square().sum()
    return fn, C
"""


@pytest.fixture
def models(tmp_path):
    path = tmp_path / "adv_models.py"
    path.write_text(MODELS_PY)
    return path


def test_cli_second_session_refuses_naming_the_pid(models, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli(f"estimate --model {models}:quad -n 3 -q -o {out}", capsys)[0] == 0
    lock = RunLock.acquire(records_path(out))
    try:
        code, _, err = cli(f"estimate --model {models}:quad -n 6 -q --resume -o {out}", capsys)
    finally:
        lock.release()
    assert code == 2 and f"process {os.getpid()}" in err and one_line_error(err)
    assert len(read_run(out).records) == 3


def test_run_lock_without_flock(tmp_path, monkeypatch):
    import errno

    from basin_volume.runfile import lock as runfile

    log = tmp_path / "r.records.jsonl"
    monkeypatch.setattr(runfile, "fcntl", None)  # as on Windows: the lock file is created
    lock = RunLock.acquire(log)  # exclusively, and a crashed run leaves it behind
    with pytest.raises(RunInUseError, match="delete the file"):
        RunLock.acquire(log)
    lock.release()
    assert not RunLock.lock_path(log).exists()
    monkeypatch.undo()

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runfile.fcntl, "flock", no_locks)  # a file system without locks
    with pytest.warns(RuntimeWarning, match="would not be refused"):
        RunLock.acquire(log).release()


def test_merge_refuses_results_of_different_centres(tmp_path):
    kw = dict(n_samples=3, sigma=1.0, progress=False)  # same settings, other centres
    a = quiet(estimate_to_file, quad(C), C, tmp_path / "a.json", **kw)
    b = quiet(estimate_to_file, quad(2 * C), 2 * C, tmp_path / "b.json", seed=1, **kw)
    loaded = [bv.VolumeResult.load(tmp_path / f"{x}.json") for x in "ab"]
    for pair in ([a, b], loaded):
        with pytest.raises(ValueError, match="center_sha256"):
            bv.VolumeResult.merge(pair)
    same = quiet(bv.estimate, quad(C), C, seed=2, **kw)
    merged = bv.VolumeResult.merge([loaded[0], same])
    assert merged.n_samples == 6 and merged.meta["center_sha256"] == center_sha256([C])


def test_resume_from_another_basin_is_refused():
    other = 1.5 * C
    partial = quiet(bv.estimate, quad(other), other, n_samples=2, sigma=1.0, progress=False)
    with pytest.raises(ValueError, match="center_sha256"):
        bv.estimate(quad(C), C, n_samples=4, sigma=1.0, resume_from=partial, progress=False)
    mine = quiet(bv.estimate, quad(C), C, n_samples=2, sigma=1.0, progress=False)
    full = quiet(bv.estimate, quad(C), C, n_samples=4, sigma=1.0, resume_from=mine, progress=False)
    assert full.n_samples == 4


# ---------------------------------------------------------------- files that load but should not


def saved(tmp_path, **changes):
    res = quiet(bv.estimate, quad(C), C, n_samples=4, progress=False)
    data = res.to_dict()
    for key, value in changes.items():
        if isinstance(value, tuple):  # (index, value) inside an array
            data[key][value[0]] = value[1]
        else:
            data[key] = value
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"log_volume": "nan"}, "log_volume"),
        ({"log_volume": -1.0}, "log_volume"),
        ({"ess": 99.0}, "ess"),
        ({"dim": -5}, "dim"),
        ({"sigma": -math.inf}, "sigma"),
        ({"cutoff": 0}, "cutoff"),
        ({"rtol": 2.0}, "rtol"),
        ({"seed": -1}, "seed"),
        ({"measure": "lebesgue"}, "measure"),
        ({"status": ("banana",)}, "banana"),  # a one-element change of the list
        ({"estimates": (1, "nan")}, "estimate"),
        ({"props": (0, -1.0)}, "prop"),
        ({"radii": (2, -1.0)}, "radius"),
        ({"n_evals": (0, 2.5)}, "n_evals"),
        ({"mults": (3, 1e9)}, "mults"),
        ({"slopes": [0.0]}, "slopes"),  # refused before too, naming the field
    ],
)
def test_results_file_with_impossible_values_is_refused(changes, field, tmp_path, capsys):
    if "status" in changes:
        changes = {"status": (0, "banana")}
    path = saved(tmp_path, **changes)
    with pytest.raises(bv.ResultFileError, match=field):
        bv.VolumeResult.load(path)
    code, out, err = cli(f"compare {path} {path}", capsys)
    assert code == 2 and "nan" not in out and one_line_error(err)


def test_binary_or_run_log_is_not_loaded_as_a_results_file(tmp_path):
    blob = tmp_path / "r.pkl"
    blob.write_bytes(pickle.dumps({"estimates": [1.0, 2.0]}))
    with pytest.raises(bv.ResultFileError, match="not a Tyche results file"):
        bv.VolumeResult.load(blob)
    text = tmp_path / "list.json"
    text.write_text("[1, 2]")
    with pytest.raises(bv.ResultFileError, match="not a Tyche results file"):
        bv.VolumeResult.load(text)
    out = tmp_path / "r.json"
    quiet(estimate_to_file, quad(C), C, out, n_samples=2, progress=False)
    with pytest.raises(bv.ResultFileError, match="load_result"):
        bv.VolumeResult.load(records_path(out))
    assert bv.load_result(records_path(out)).n_samples == 2


@pytest.mark.parametrize("damage", ["empty", "header", "middle"])
def test_cli_resume_of_an_empty_or_damaged_run_log_is_one_line(damage, models, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli(f"estimate --model {models}:quad -n 3 -q -o {out}", capsys)[0] == 0
    out.unlink()
    log = records_path(out)
    lines = log.read_bytes().split(b"\n")
    log.write_bytes(
        {
            "empty": b"",
            "header": b"{not json\n" + b"\n".join(lines[1:]),
            "middle": b"\n".join([lines[0], b"garbage", *lines[2:]]),
        }[damage]
    )
    code, _, err = cli(f"estimate --model {models}:quad -n 5 -q --resume -o {out}", capsys)
    assert code == 2 and one_line_error(err)
    assert str(log) in err and "--overwrite" in err
    assert cli(f"estimate --model {models}:quad -n 5 -q --overwrite -o {out}", capsys)[0] == 0


def test_run_log_with_impossible_values_is_refused(tmp_path):
    out = tmp_path / "r.json"
    quiet(estimate_to_file, quad(C), C, out, n_samples=3, progress=False)
    log = records_path(out)
    lines = log.read_text().splitlines()
    entry = json.loads(lines[2])
    entry["status"] = "banana"
    lines[2] = json.dumps(entry)
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(bv.ResultFileError, match="banana"):
        bv.load_result(log)


# ---------------------------------------------------------------- smaller


def test_numpy_and_torch_scalars_are_accepted():
    res = quiet(
        bv.estimate, quad(C), C, n_samples=np.int64(3), cutoff=np.float32(0.01),
        rtol=torch.tensor(0.01), sigma=np.float64(0.5), seed=np.int64(4), progress=False,
    )  # fmt: skip
    plain = quiet(
        bv.estimate, quad(C), C, n_samples=3, cutoff=float(np.float32(0.01)), rtol=0.01,
        sigma=0.5, seed=4, progress=False,
    )  # fmt: skip
    assert torch.equal(res.estimates, plain.estimates) and type(res.cutoff) is float
    cfg = bv.VolumeConfig(n_samples=np.int64(4), cutoff=torch.tensor(0.01), seed=np.int32(1))
    assert (type(cfg.n_samples), type(cfg.cutoff), type(cfg.seed)) == (int, float, int)
    assert json.dumps(cfg.describe())


def test_huge_n_samples_allocates_nothing_per_direction_up_front():
    class Started(Exception):
        pass

    def fn(th):
        if not torch.equal(th, C):
            raise Started
        return quad(C)(th)

    with pytest.raises(Started):  # not MemoryError
        bv.estimate(fn, C, n_samples=10**12, progress=False, method="is")
    tracemalloc.start()
    try:
        with pytest.raises(Started):
            bv.estimate(fn, C, n_samples=10**6, progress=False, method="is")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**22  # a list of 10**6 indices alone would take 8 MB


def test_save_to_a_folder_leaves_nothing_behind(tmp_path):
    res = quiet(bv.estimate, quad(C), C, n_samples=2, progress=False)
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match="folder"):
        res.save(folder)
    assert list(tmp_path.iterdir()) == [folder] and not list(folder.iterdir())


@pytest.mark.parametrize("n_boot", [0, -3, 2.5])
def test_interval_needs_a_positive_number_of_resamples(n_boot):
    res = quiet(bv.estimate, quad(C), C, n_samples=3, progress=False)
    with pytest.raises(ValueError, match="n_boot"):
        res.interval(n_boot=n_boot)
    assert res.interval(n_boot=np.int64(50))[0] <= res.log_volume


class NoHandler(Exception):
    """SIGTERM reached the test's own handler: the command installed none."""


def test_sigterm_says_what_is_saved(models, tmp_path, capsys):
    out = tmp_path / "r.json"

    def fallback(signum, frame):
        raise NoHandler

    before = signal.signal(signal.SIGTERM, fallback)
    try:
        code, _, err = cli(f"estimate --model {models}:terminated -n 50 --method is -q -o {out}",
                             capsys)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert code == 143
    assert "terminated" in err and "directions are saved" in err and "--resume" in err
    done = len(read_run(out).records)
    assert 0 < done < 50 and f"{done} directions are saved in {records_path(out)}" in err
    assert not RunLock.lock_path(records_path(out)).exists()


class ClosedPipe:
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


def test_compare_into_a_closed_pipe_ends_quietly(tmp_path, monkeypatch, capsys):
    res = quiet(bv.estimate, quad(C), C, n_samples=3, progress=False)
    res.save(tmp_path / "a.json")
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 1


@pytest.mark.slow
def test_compare_piped_to_head_has_no_traceback(tmp_path):
    res = quiet(bv.estimate, quad(C), C, n_samples=3, progress=False)
    res.save(tmp_path / "a.json")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(  # head -n 0 leaves at once: every write meets a closed pipe
        f"{shlex.quote(sys.executable)} -m basin_volume compare {tmp_path / 'a.json'} | head -n 0",
        shell=True, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert proc.stderr == "", proc.stderr


def test_centre_on_the_meta_device_is_refused():
    with pytest.raises(ValueError, match="meta device"):
        bv.estimate(quad(C), torch.empty(8, device="meta"), n_samples=2, progress=False)
    model = nn.Linear(4, 3, device="meta")
    cfg = bv.VolumeConfig(model_type="classifier", model=model, inputs=torch.randn(5, 4))
    with pytest.raises(ValueError, match="meta device"):
        bv.VolumeEstimator.from_config(cfg)


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64, 2**64 + 3])
def test_seeds_outside_63_bits_are_refused(seed, capsys):
    with pytest.raises(ValueError, match="seed"):
        bv.estimate(quad(C), C, n_samples=2, seed=seed, progress=False)
    with pytest.raises(ValueError, match="seed"):
        bv.VolumeConfig(seed=seed)
    code, _, err = cli(f"estimate --model digits -o x.json --seed {seed}", capsys)
    assert code == 2 and "--seed" in err
    res = quiet(bv.estimate, quad(C), C, n_samples=1, seed=2**63 - 1, progress=False)
    assert res.seed == 2**63 - 1


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"cutoff": -1}, "cutoff"),
        ({"cutoff": math.inf}, "cutoff"),
        ({"rtol": 0}, "rtol"),
        ({"sigma": -2.0}, "sigma"),
        ({"measure": "lebesgue"}, "measure"),
        ({"model_batch_size": 0}, "model_batch_size"),
        ({"data_batch_size": -1}, "data_batch_size"),
    ],
)
def test_config_is_checked_on_construction(kw, field):
    with pytest.raises(ValueError, match=field):
        bv.VolumeConfig(**kw)


def test_reliability_doc_lists_every_case():
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "reliability.md")).read()
    names = [
        line.split("def ", 1)[1].split("(", 1)[0]
        for line in textwrap.dedent(open(__file__).read()).splitlines()
        if line.startswith("def test_") and "doc_lists" not in line
    ]
    missing = [n for n in names if n not in doc]
    assert not missing, f"docs/reliability.md does not mention {missing}"

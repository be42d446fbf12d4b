import json
import math
import shlex
import subprocess
import sys

import pytest
import torch

from basin_volume import VolumeResult
from basin_volume.cli import main
from basin_volume.runfile import read_run, records_path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: one thread is as fast, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


# ---------------------------------------------------------------------------- estimate, plot,
# compare, scan end to end. In process: a subprocess would pay ~2 s of imports each time.
PNG = b"\x89PNG\r\n\x1a\n"
FIELDS = ("estimates", "deltas", "props", "mults", "logabsint", "n_evals", "radii", "slopes")
DIGITS = "--model digits --digits-steps 50 -q"


def cli(command: str, capsys, **paths):
    """Run ``basin-volume COMMAND`` (``{name}`` filled from ``paths``) in this process.

    Returns (exit status, stdout, stderr).
    """
    args = shlex.split(command.format(digits=DIGITS, **{k: str(v) for k, v in paths.items()}))
    try:
        code = main(args)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_same_directions(a, b):
    assert a.n_samples == b.n_samples and a.status == b.status
    for name in FIELDS:
        torch.testing.assert_close(
            getattr(a, name), getattr(b, name), rtol=0, atol=0, equal_nan=True
        )


def test_estimate_digits_resume_plot_compare(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    code, out, _ = cli("estimate {digits} -n 5 -o {a}", capsys, a=a)
    assert code == 0 and "log probability" in out and "information content" in out
    first = VolumeResult.load(a)
    assert first.n_samples == 5 and first.meta["spec"]["model"] == "digits"
    assert first.meta["environment"]["torch"] == torch.__version__
    assert len(read_run(a).records) == 5
    # Raise n_samples on resume: the result equals a fresh run of 8, direction for direction.
    assert cli("estimate {digits} -n 8 -o {a} --resume", capsys, a=a)[0] == 0
    assert cli("estimate {digits} -n 8 -o {b}", capsys, b=b)[0] == 0
    assert_same_directions(VolumeResult.load(a), VolumeResult.load(b))
    # A torn last line (a crash mid-write) and no final file: --resume redoes that direction.
    data = records_path(b).read_bytes()
    records_path(a).write_bytes(data[: len(data) - 40])
    a.unlink()
    assert cli("estimate {digits} -n 8 -o {a} --resume", capsys, a=a)[0] == 0
    assert_same_directions(VolumeResult.load(a), VolumeResult.load(b))
    # Resuming with another setting is refused, naming the option.
    code, _, err = cli("estimate {digits} -n 8 --cutoff 0.1 -o {a} --resume", capsys, a=a)
    assert code == 2 and "--cutoff" in err and err.count("\n") == 1
    # plot and compare read the results files.
    code, _, _ = cli("plot {a} {b} -o {png} --labels A B", capsys, a=a, b=b, png=tmp_path / "p.png")
    assert code == 0 and (tmp_path / "p.png").read_bytes()[:8] == PNG
    code, out, _ = cli("compare {a} {b}", capsys, a=a, b=b)
    assert code == 0 and "log_volume (nats)" in out and "diff (log10)" in out
    rows = json.loads(cli("compare {a} {b} --json", capsys, a=a, b=b)[1])
    assert rows[1]["diff_nats"] == 0.0 and rows[0]["n_samples"] == 8


MODELS_PY = """
import torch


def classifier():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return model, torch.randn(64, 8)


def step100():
    return classifier()


def step200():
    model, inputs = classifier()
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    return model, inputs


def ball():
    # 0.5 * |theta - c|^2 <= cutoff: a ball of radius sqrt(2 * cutoff) around c.
    center = torch.linspace(1.0, 2.0, 5, dtype=torch.float64)
    return (lambda theta: 0.5 * (theta - center).square().sum()), center
"""


def test_module_function_models_and_scans(tmp_path, capsys):
    m = tmp_path / "models.py"
    m.write_text(MODELS_PY)
    out = tmp_path / "ball.json"
    command = "estimate --model {m}:ball --measure uniform --cutoff 0.5 --rtol 1e-10 -n 4 -q -o {o}"
    assert cli(command, capsys, m=m, o=out)[0] == 0
    # The unit ball in D = 5: log volume = log(8 pi^2 / 15).
    expected = math.log(8 * math.pi**2 / 15)
    assert math.isclose(VolumeResult.load(out).log_volume, expected, rel_tol=1e-8)

    cut = tmp_path / "cut"
    command = "scan --model {m}:classifier --cutoffs 0.01 0.1 -n 4 -q -o {d}"
    code, text, _ = cli(command, capsys, m=m, d=cut)
    assert code == 0 and "cutoff_0.01" in text
    summary = json.loads((cut / "scan.json").read_text())
    assert [r["value"] for r in summary["rows"]] == [0.01, 0.1]
    assert VolumeResult.load(cut / "cutoff_0.1.json").cutoff == 0.1
    assert (cut / "scan.png").read_bytes()[:8] == PNG
    assert cli("plot {s} -o {p}", capsys, s=cut / "scan.json", p=tmp_path / "s.png")[0] == 0
    assert (tmp_path / "s.png").read_bytes()[:8] == PNG

    ckpt = tmp_path / "ckpt"
    command = "scan --checkpoints {m}:step100 {m}:step200 -n 3 -q -o {d}"
    assert cli(command, capsys, m=m, d=ckpt)[0] == 0
    rows = json.loads((ckpt / "scan.json").read_text())["rows"]
    assert [(r["name"], r["value"]) for r in rows] == [("step_100", 100.0), ("step_200", 200.0)]
    stamp = (ckpt / "step_100.json").stat().st_mtime_ns
    assert cli(command + " --resume", capsys, m=m, d=ckpt)[0] == 0  # finished points reused
    assert (ckpt / "step_100.json").stat().st_mtime_ns == stamp


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    tiny = pytest.importorskip("basin_volume.tiny_lm", reason="tiny_lm.py not available yet")
    return tiny.build_tiny_lm(tmp_path_factory.mktemp("tiny") / "lm", steps=30)


def test_tiny_lm_end_to_end(tiny_lm, tmp_path, capsys):
    texts = [
        "The quick brown fox jumps over the lazy dog near the river bank.",
        "Python lists are mutable sequences, typically used to store collections.",
        "A dictionary maps hashable keys to arbitrary values.",
    ]
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    lm = "estimate --model {lm} --data {data} --val-size 2 --max-seq-len 24 -n 3 -q -o {out}"
    paths = {"lm": tiny_lm, "data": data, "out": tmp_path / "lm.json"}
    code, _, err = cli(lm + " --text-field title", capsys, **paths)
    assert code == 2 and "'title' is not a field" in err and "body, id" in err
    assert err.count("\n") == 1
    code, _, err = cli(lm + " --text-field id", capsys, **paths)  # numbers are not texts
    assert code == 2 and "--text-field" in err
    code, text, _ = cli(lm + " --text-field body", capsys, **paths)
    assert code == 0 and "log probability" in text
    result = VolumeResult.load(paths["out"])
    assert result.n_samples == 3 and bool(torch.isfinite(result.estimates).all())
    converged = [k for k, s in enumerate(result.status) if s == "converged"]
    assert converged
    for k in converged:
        assert abs(float(result.deltas[k]) - result.cutoff) <= result.rtol * result.cutoff
    assert result.meta["spec"]["model_type"] == "causal"
    assert result.meta["spec"]["text_field"] == "body"
    txt = tmp_path / "val.txt"  # one text per line
    txt.write_text("\n".join(texts) + "\n")
    paths.update(data=txt, out=tmp_path / "txt.json")
    assert cli(lm, capsys, **paths)[0] == 0


@pytest.mark.parametrize(
    ("command", "option"),
    [
        ("estimate {digits} --data {tmp}/missing.jsonl", "--data"),
        ("estimate {digits} --model-type rnn", "--model-type"),
        ("estimate {digits} --data {tmp}/wrong_field.jsonl", "--text-field"),
        ("estimate {digits} --output {tmp}/a_file/out.json", "--output"),
        ("estimate --model ./no-such-model-folder -q", "--model"),
        ("estimate --model no_such_module:build -q", "--model"),
        ("estimate {digits} --output {tmp}/exists.json", "--resume"),
        ("estimate {digits} --resume --overwrite", "--resume"),
        ("estimate {digits} --n-samples 0", "--n-samples"),
        ("estimate {digits} --measure volume", "--measure"),
        ("estimate {digits} --device tpu9", "--device"),
        ("estimate {digits} --val-size 4", "--val-size"),
        ("scan {digits} -o {tmp}/scan", "--cutoffs"),
        ("plot {tmp}/missing.json", "RESULTS"),
        ("compare {tmp}/exists.json --reference 3", "--reference"),
        ("estimate --model {tmp}/models.py:ball --preconditioner fisher -q", "--preconditioner"),
        ("estimate --model {tmp}/models.py:ball --preconditioner adaptive -q", "--preconditioner"),
        ("estimate --model {tmp}/models.py:ball --compile -q", "--compile"),
    ],
)
def test_bad_arguments_exit_2_with_one_line_naming_the_option(command, option, tmp_path, capsys):
    (tmp_path / "models.py").write_text(MODELS_PY)
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "wrong_field.jsonl").write_text('{"body": "some text"}\n')
    (tmp_path / "exists.json").write_text("{}")
    if command.startswith("estimate") and "--output" not in command:
        command += " --output {tmp}/out.json"
    code, _, err = cli(command, capsys, tmp=tmp_path)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("basin-volume")  # one line
    assert option in err


def test_preconditioner_options_reach_the_run(tmp_path, capsys):
    from basin_volume import preconditioners

    if not hasattr(preconditioners, "adam_preconditioner"):
        pytest.skip("no Adam preconditioner in this version")
    out = tmp_path / "adam.json"
    assert cli("estimate {digits} -n 3 --preconditioner adam -o {o}", capsys, o=out)[0] == 0
    result = VolumeResult.load(out)
    assert result.meta["spec"]["preconditioner"] == "adam"
    assert result.meta["settings"]["preconditioner"] is not None
    assert bool((result.props != 1.0).all())  # directions were drawn from the proposal
    command = "estimate {digits} -n 4 --preconditioner adam --adam-order 1 -o {o} --resume"
    code, _, err = cli(command, capsys, o=out)
    assert code == 2 and "--preconditioner" in err  # other scales: not the same run
    command = "estimate {digits} --preconditioner adaptive -o {o}"
    code, _, err = cli(command, capsys, o=tmp_path / "adaptive.json")
    if code == 2:  # no adaptive backend behind the command line yet: a clear error
        assert "--preconditioner" in err and "none" in err and err.count("\n") == 1


def test_estimate_bad_argument_exit_status_from_the_shell(tmp_path):
    args = ["estimate", "--model", "digits", "--data", str(tmp_path / "missing.jsonl")]
    proc = subprocess.run(
        [sys.executable, "-m", "basin_volume", *args, "-o", str(tmp_path / "x.json"), "-q"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--data" in proc.stderr


@pytest.mark.parametrize("command", ["estimate", "plot", "compare", "scan"])
def test_help_explains_options_in_nats(command, capsys):
    code, out, _ = cli(f"{command} --help", capsys)
    assert code == 0 and "nats" in out


def test_every_model_type_is_a_choice_and_convnext_runs(tmp_path, capsys):
    import basin_volume as bv
    from basin_volume.cli.parser import build_parser

    action = next(
        a
        for a in build_parser()._subparsers._group_actions[0].choices["estimate"]._actions
        if "--model-type" in a.option_strings
    )
    assert {t.value for t in bv.ModelType} <= set(action.choices)
    m = tmp_path / "images.py"
    m.write_text(
        "import torch\n"
        "def tiny_convnet():\n"
        "    torch.manual_seed(0)\n"
        "    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 2), torch.nn.Flatten(),\n"
        "                              torch.nn.Linear(2, 3))\n"
        "    return net, torch.randn(6, 3, 2, 2)\n"
    )
    out = tmp_path / "convnext.json"
    command = "estimate --model {m}:tiny_convnet --model-type convnext -n 3 -q -o {o}"
    assert cli(command, capsys, m=m, o=out)[0] == 0
    assert VolumeResult.load(out).meta["config"]["model_type"] == "convnext"
    command = "estimate --model digits --model-type convnext -n 3 -o {o}"
    code, _, err = cli(command, capsys, o=tmp_path / "digits.json")
    assert code == 2 and "--model-type" in err


def test_defaults_agree_between_estimate_config_and_command_line():
    import dataclasses
    import inspect

    import basin_volume as bv
    from basin_volume.cli.assemble import _ESTIMATION_DEFAULTS

    signature = inspect.signature(bv.estimate).parameters
    fields = {f.name: f.default for f in dataclasses.fields(bv.VolumeConfig)}
    for name in ("n_samples", "cutoff", "measure", "sigma", "rtol", "seed", "method"):
        assert signature[name].default == fields[name] == _ESTIMATION_DEFAULTS[name], name
    assert fields["n_samples"] == 100 and fields["method"] == "auto"


def test_estimate_method_smc_saves_an_smc_result_and_refuses_resume(tmp_path, capsys):
    """--method smc on fn/center (a ball: exact volume) and on a classifier config."""
    m = tmp_path / "models.py"
    m.write_text(MODELS_PY)
    out = tmp_path / "ball.json"
    command = ("estimate --model {m}:ball --measure uniform --cutoff 0.5 --method smc -n 32 -q "
               "-o {o}")
    assert cli(command, capsys, m=m, o=out)[0] == 0
    res = VolumeResult.load(out)
    assert res.method == "smc"
    assert math.isclose(res.log_volume, math.log(8 * math.pi**2 / 15), abs_tol=1e-6)
    code, _, err = cli(command + " --resume", capsys, m=m, o=out)
    assert code == 2 and "--resume" in err
    assert res.meta["bidirectional"] is True  # the default without --budget
    one_way = tmp_path / "one-way.json"
    assert cli(command + " --no-bidirectional", capsys, m=m, o=one_way)[0] == 0
    assert VolumeResult.load(one_way).meta["bidirectional"] is False
    out2 = tmp_path / "clf.json"
    command = "estimate --model {m}:classifier --method smc --budget 200000 -n 32 -q -o {o}"
    assert cli(command, capsys, m=m, o=out2)[0] == 0
    assert VolumeResult.load(out2).method == "smc"


def test_estimate_method_auto_is_smc_and_importance_sampling_with_resume(tmp_path, capsys):
    """The default: SMC (no run log); with --resume, a run log of importance sampling."""
    m = tmp_path / "models.py"
    m.write_text(MODELS_PY)
    out = tmp_path / "ball.json"
    command = "estimate --model {m}:ball --measure uniform --cutoff 0.5 -n 32 -q -o {o}"
    assert cli(command, capsys, m=m, o=out)[0] == 0
    res = VolumeResult.load(out)
    assert res.method == "smc" and not records_path(out).exists()
    assert math.isclose(res.log_volume, math.log(8 * math.pi**2 / 15), abs_tol=1e-6)
    out2 = tmp_path / "logged.json"
    assert cli(command + " --resume", capsys, m=m, o=out2)[0] == 0
    assert VolumeResult.load(out2).method == "is" and records_path(out2).exists()

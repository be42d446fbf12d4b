"""Smoke tests of experiments/full_scale on tiny CPU stand-ins (nothing is downloaded).

* Pythia: two checkpoints of a tiny GPT-NeoX saved with ``save_pretrained`` as ``step0`` and
  ``step2`` (the latter after two AdamW steps, with its ``optimizer.pt``) stand in for the hub
  revisions.
* ConvNeXt V2: a two-stage ConvNextV2 (depths [1, 1], widths [8, 16]) trained for three steps
  on synthetic 32x32 images, clean and with wrongly labelled extra images.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import basin_volume as bv
from basin_volume.preconditioners import adam_preconditioner

SCRIPTS = Path(__file__).resolve().parents[1] / "experiments" / "full_scale"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"full_scale_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pythia():
    return _load("pythia_checkpoints")


@pytest.fixture(scope="module")
def convnext():
    return _load("convnext_cifar")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``root/step0`` (a tiny GPT-NeoX) and ``root/step2`` (two AdamW steps later, with its
    optimizer state), plus a JSONL file of validation texts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from basin_volume.tiny_lm import build_tiny_lm, tiny_lm_texts

    tmp = tmp_path_factory.mktemp("pythia")
    base = build_tiny_lm(
        tmp / "base", steps=10, hidden=32, layers=1, heads=2, vocab_size=300, batch=4
    )
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    root = tmp / "ckpts"
    model.save_pretrained(root / "step0")
    tokenizer.save_pretrained(root / "step0")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for text in tiny_lm_texts(2, split="train")["text"]:
        ids = torch.tensor([tokenizer(text, truncation=True, max_length=32)["input_ids"]])
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(root / "step2")
    tokenizer.save_pretrained(root / "step2")
    torch.save(opt.state_dict(), root / "step2" / "optimizer.pt")
    data = tmp / "val.jsonl"
    data.write_text("".join(json.dumps({"body": t}) + "\n" for t in tiny_lm_texts(3)["text"]))
    return root, data


def _finite(path: Path, n: int) -> bv.VolumeResult:
    assert path.exists(), path
    result = bv.VolumeResult.load(path)
    assert result.n_samples == n
    assert math.isfinite(result.log_volume) and result.log_volume < 0
    assert torch.isfinite(result.estimates).all()
    return result


def test_pythia_checkpoints_scan_uses_adam_then_resumes(pythia, checkpoints, tmp_path, capsys):
    root, data = checkpoints
    out = tmp_path / "out"
    argv = [
        "--model", str(root), "--data", str(data), "--text-field", "body",
        "--val-size", "2", "--max-seq-len", "24", "--n-samples", "2",
        "--device", "cpu", "--output-dir", str(out), "--quiet", "--fisher-draws", "1",
    ]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = pythia.main(argv)
    assert [r["value"] for r in rows] == [0, 2]  # every stepN sub-folder, in order
    first = {r["name"]: _finite(out / f"{r['name']}.json", 2) for r in rows}
    for row in rows:
        assert row["information_nats"] == pytest.approx(-row["log_volume"])
    assert (out / "scan.png").stat().st_size > 0
    scan = json.loads((out / "scan.json").read_text())
    assert [r["name"] for r in scan["rows"]] == ["step_0", "step_2"]

    # step2 has optimizer.pt: the Adam scales are built from it and drive the proposal;
    # step0 has none: the Fisher is used instead.
    by_step = {r["value"]: r for r in rows}
    assert by_step[2]["preconditioner"].startswith("adam")
    assert by_step[0]["preconditioner"].startswith("fisher")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "step2", dtype=torch.float32)
    expected = adam_preconditioner(root / "step2" / "optimizer.pt", model=model)
    cached = torch.load(out / "step_2.scales.pt", weights_only=True)
    torch.testing.assert_close(cached, expected, rtol=0, atol=0)
    assert first["step_2"].meta["settings"]["preconditioner"].startswith("scales:")
    assert not torch.equal(first["step_2"].props, torch.ones(2, dtype=torch.float64))
    fisher = torch.load(out / "step_0.scales.pt", weights_only=True)
    assert fisher.shape == expected.shape and bool((fisher > 0).all())

    # Resume: finished steps are not recomputed.
    log = (out / "step_2.records.jsonl").read_bytes()
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = pythia.main(argv)
    assert "done already" in capsys.readouterr().out
    assert (out / "step_2.records.jsonl").read_bytes() == log
    assert [r["log_volume"] for r in again] == [r["log_volume"] for r in rows]


def test_pythia_rejects_unpublished_hub_steps(pythia, tmp_path):
    with pytest.raises(SystemExit, match="not published"):
        pythia.main(["--model", "14m", "--steps", "3", "--output-dir", str(tmp_path)])


def test_convnext_clean_vs_poisoned(convnext, tmp_path):
    out = tmp_path / "cx"
    argv = [
        "all", "--output-dir", str(out), "--data", "synthetic", "--synthetic-size", "48",
        "--poison", "8", "--depths", "1", "1", "--hidden-sizes", "8", "16",
        "--patch-size", "4", "--steps", "3", "--batch-size", "16", "--save-every", "2",
        "--warmup-steps", "1", "--log-every", "1", "--eval-size", "24", "--n-samples", "2",
        "--fisher-size", "4", "--device", "cpu", "--quiet",
        "--preconditioners", "none", "adam", "fisher",
    ]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        comparison = convnext.main(argv)

    for run, poison in (("clean", 0), ("poisoned", 8)):
        info = json.loads((out / run / "train_info.json").read_text())
        assert info["poison"] == poison and info["train_size"] == 48
        assert info["final"] == "checkpoint-3"
        assert 0.0 <= info["clean_train_accuracy"] <= 1.0
        for step in (2, 3):  # the intermediate and the final checkpoint
            folder = out / run / f"checkpoint-{step}"
            assert (folder / "config.json").exists()
            assert (folder / "model.safetensors").exists()
            state = torch.load(folder / "optimizer.pt", weights_only=True)
            assert {int(s["step"]) for s in state["state"].values()} == {step}
    assert (
        json.loads((out / "clean" / "train_info.json").read_text())["poison_accuracy"]
        != (json.loads((out / "poisoned" / "train_info.json").read_text())["poison_accuracy"])
    )

    results = {}
    for run in ("clean", "poisoned"):
        for kind in ("none", "adam", "fisher"):
            results[run, kind] = _finite(out / f"{run}_{kind}.json", 2)
    assert results["clean", "none"].dim == 5274
    # The basin is measured on the same clean images for both runs, with the init prior.
    for kind in ("none", "adam", "fisher"):
        a, b = results["clean", kind], results["poisoned", kind]
        assert a.sigma == b.sigma
        assert a.meta["data"] == b.meta["data"]
    # The Adam scales come from the run's own optimizer.pt and are used.
    model = convnext.LogitsOnly(convnext.load_checkpoint(out / "clean" / "checkpoint-3", "cpu"))
    expected = adam_preconditioner(out / "clean" / "checkpoint-3", model=model)
    cached = torch.load(out / "clean_adam.scales.pt", weights_only=True)
    torch.testing.assert_close(cached, expected, rtol=0, atol=0)
    assert results["clean", "adam"].meta["settings"]["preconditioner"] is not None
    assert results["clean", "none"].meta["settings"]["preconditioner"] is None
    assert not torch.equal(results["clean", "adam"].props, results["clean", "none"].props)

    assert set(comparison) == {"none", "adam", "fisher", "all"}
    for kind in ("none", "adam", "fisher"):
        rows = comparison[kind]
        assert [r["label"] for r in rows] == ["clean", "poisoned"]
        diff = results["poisoned", kind].log_volume - results["clean", kind].log_volume
        assert rows[1]["diff_nats"] == pytest.approx(diff)
    text = (out / "comparison.txt").read_text()
    assert "poisoned" in text and "preconditioner: adam" in text
    saved = json.loads((out / "comparison.json").read_text())
    assert len(saved["all"]) == 6


def test_convnext_wrapper_returns_logits(convnext):
    from argparse import Namespace

    args = Namespace(depths=[1, 1], hidden_sizes=[8, 16], patch_size=4, seed=0)
    model = convnext.build_model(args).eval()
    x = convnext.normalize(convnext.to_tensors(convnext.synthetic_cifar(3, seed=0))[0])
    with torch.no_grad():
        logits = convnext.LogitsOnly(model)(x)
        assert torch.equal(logits, model(pixel_values=x).logits)
    assert logits.shape == (3, 10)


@pytest.mark.slow
def test_convnext_estimate_under_torchrun(convnext, tmp_path):
    """Two gloo ranks shard the directions; rank 0 writes the same files."""
    out = tmp_path / "cx"
    common = [
        "--data", "synthetic", "--synthetic-size", "32", "--depths", "1", "1",
        "--hidden-sizes", "8", "16", "--patch-size", "4", "--steps", "2", "--batch-size", "16",
        "--warmup-steps", "1", "--device", "cpu",
    ]  # fmt: skip
    for run, poison in (("clean", "0"), ("poisoned", "8")):
        convnext.main(["train", "--out", str(out / run), "--poison", poison, *common])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BASIN_VOLUME_BACKEND": "gloo"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0",
        str(SCRIPTS / "convnext_cifar.py"), "estimate",
        "--runs", str(out / "clean"), str(out / "poisoned"), "--output-dir", str(out),
        "--eval-size", "16", "--n-samples", "3", "--fisher-size", "4", "--device", "cpu",
        "--quiet", "--preconditioners", "none", "fisher",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for run in ("clean", "poisoned"):
        for kind in ("none", "fisher"):
            _finite(out / f"{run}_{kind}.json", 3)
    assert (out / "comparison.txt").exists()


def test_pythia_adaptive_and_adam_fallback(pythia, checkpoints, tmp_path, capsys):
    root, data = checkpoints
    base = [
        "--model", str(root), "--data", str(data), "--text-field", "body", "--val-size", "2",
        "--max-seq-len", "24", "--device", "cpu", "--quiet", "--steps", "0",
    ]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = pythia.main(
            [*base, "--n-samples", "2", "--preconditioner", "adam", "--output-dir", str(tmp_path)]
        )
    assert "no optimizer state for step 0" in capsys.readouterr().out
    assert rows[0]["preconditioner"].startswith("fisher")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = pythia.main(
            [*base, "--n-samples", "4", "--preconditioner", "adaptive", "--adaptive-rounds",
             "2", "--output-dir", str(tmp_path / "adaptive")]
        )  # fmt: skip
    result = _finite(tmp_path / "adaptive" / "step_0.json", 4)
    assert len(result.meta["adaptive"]["rounds"]) == 2
    assert rows[0]["preconditioner"].startswith("adaptive")


def test_convnext_reads_pil_images_from_a_saved_dataset(convnext, tmp_path):
    """The CIFAR-10 code path: an Image column (PIL, as on the hub) in a save_to_disk folder."""
    import numpy as np
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage

    pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    features = Features({"img": Image(), "label": ClassLabel(num_classes=10)})
    ds = Dataset.from_dict(
        {"img": [PILImage.fromarray(p) for p in pixels], "label": [3, 1, 4, 1]}, features=features
    )
    DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "cifar"))
    split = convnext.load_split(str(tmp_path / "cifar"), "test", synthetic_size=0)
    images, labels = convnext.to_tensors(split, limit=3)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 32, 32)
    assert torch.equal(images.permute(0, 2, 3, 1), torch.as_tensor(pixels[:3]))
    assert labels.tolist() == [3, 1, 4]
    with pytest.raises(SystemExit, match="no split"):
        convnext.load_split(str(tmp_path / "cifar"), "validation", synthetic_size=0)

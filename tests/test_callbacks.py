"""Issue 16: the basin during training. A 4-step Hugging Face Trainer run on the tiny GPT-NeoX
(offline) logs the basin at the chosen steps through the Trainer's own log, writes results
next to its checkpoints, and trains exactly as it does without the callback."""

import json
import warnings

import pytest
import torch

import basin_volume as bv
from basin_volume.callbacks import LOG_KEYS, BasinVolumeCallback, estimate_live

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)


@pytest.fixture(scope="module")
def tiny_path():
    from basin_volume.tiny_lm import build_tiny_lm

    return build_tiny_lm(steps=300)


@pytest.fixture(scope="module")
def texts():
    from basin_volume.tiny_lm import tiny_lm_texts

    return tiny_lm_texts(3)


def load(path):
    # dropout on, so that any use of the global random state by the callback would show
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, hidden_dropout=0.1)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def train_set(tokenizer, n=8, width=24):
    from basin_volume.tiny_lm import tiny_lm_texts

    ids = []
    for text in tiny_lm_texts(40, split="train")["text"]:
        ids.extend(tokenizer(text)["input_ids"])
    rows = torch.tensor(ids[: n * width]).view(n, width)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in rows]


class Spy(TrainerCallback):
    """Records what the Trainer's log hands to the reporting integrations."""

    def __init__(self):
        self.logged = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged.append((state.global_step, dict(logs or {})))


def train(path, tmp, *, callback=None):
    model, tokenizer = load(path)
    args = TrainingArguments(
        output_dir=str(tmp),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="steps",
        save_steps=4,
        save_only_model=True,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_set(tokenizer))
    spy = Spy()
    if callback is not None:
        callback.attach(trainer)
    trainer.add_callback(spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer, spy


def test_trainer_logs_basin_at_chosen_steps_and_trains_unchanged(tiny_path, texts, tmp_path):
    _, tokenizer = load(tiny_path)
    cb = BasinVolumeCallback(
        tokenizer=tokenizer,
        dataset=texts,
        val_size=2,
        max_seq_len=24,
        n_samples=2,
        every_n_steps=2,
    )
    trainer, spy = train(tiny_path, tmp_path / "with", callback=cb)
    plain, _ = train(tiny_path, tmp_path / "without")

    # the training is bit-identical to one without the callback
    a, b = trainer.model.state_dict(), plain.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # estimates at steps 2 and 4 only, logged through Trainer.log to the integrations
    basin_logs = [(s, logs) for s, logs in spy.logged if "basin/log_p" in logs]
    assert [s for s, _ in basin_logs] == [2, 4]
    for step, logs in basin_logs:
        assert set(LOG_KEYS) <= set(logs)
        res = cb.results[step]
        assert logs["basin/log_p"] == res.log_volume
        assert logs["basin/ess"] == res.ess
        assert logs["basin/interval_low"] <= logs["basin/interval_high"]
        assert res.meta["step"] == step and res.n_samples == 2
    history = [h["step"] for h in trainer.state.log_history if "basin/log_p" in h]
    assert history == [2, 4]

    # results written beside the checkpoint (step 4) or under output_dir (step 2)
    saved = bv.VolumeResult.load(tmp_path / "with" / "checkpoint-4" / "basin_volume.json")
    assert saved.log_volume == cb.results[4].log_volume
    step2 = json.loads((tmp_path / "with" / "basin_volume" / "step-2.json").read_text())
    assert step2["log_volume"] == pytest.approx(cb.results[2].log_volume)


def test_estimate_live_leaves_model_grads_and_random_state(tiny_path, texts):
    model, tokenizer = load(tiny_path)
    model.train()
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.random.get_rng_state()
    cfg = bv.VolumeConfig(
        tokenizer=tokenizer,
        dataset=texts,
        val_size=2,
        max_seq_len=24,
        n_samples=2,
        progress=False,
        low_memory=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        res = estimate_live(cfg, model, step=7)
    assert res.meta["step"] == 7
    assert model.training
    assert torch.equal(torch.random.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)


def test_callback_checks_its_settings():
    with pytest.raises(TypeError, match="n_sample"):
        BasinVolumeCallback(n_sample=3, every_n_steps=2)
    with pytest.raises(ValueError, match="every_n_steps"):
        BasinVolumeCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="cutoff"):
        BasinVolumeCallback(every_n_steps=2, cutoff=-1)
    with pytest.raises(ValueError, match="model"):
        BasinVolumeCallback(every_n_steps=2, model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="optimizer"):
        estimate_live(bv.VolumeConfig(preconditioner_type="adam"), torch.nn.Linear(2, 2))


def test_plain_pytorch_loop_example_runs():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "examples" / "training_loop.py"
    spec = importlib.util.spec_from_file_location("training_loop", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    history = example.main(steps=60, every=30)
    assert [step for step, _, _ in history] == [30, 60]
    assert all(log_p < 0 for _, log_p, _ in history)

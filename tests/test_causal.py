"""Hugging Face causal LMs (issue 3): the README interface, cache modes, padding, chunking,
the model left untouched, and the Pythia loader, all on a tiny GPT-NeoX built offline."""

import copy
import math
import os
import time
import warnings

import pytest
import torch
from torch import nn

import basin_volume as bv
from basin_volume.causal import (
    CausalLMKL,
    causal_lm_objective,
    choose_cache_device,
    chunk_and_tokenize,
    pythia_source,
)
from basin_volume.tiny_lm import EOS_TOKEN, build_tiny_lm, tiny_lm_texts

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
from datasets import Dataset, DatasetDict  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

STEPS = 150  # enough training for a non-trivial model; about 5 s on one core


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Ops on a model this small run fastest on one thread (and far slower on a busy
    machine with two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_lm(tmp_path_factory.mktemp("tiny") / "lm", steps=STEPS)


@pytest.fixture()
def model(tiny_dir):
    m = AutoModelForCausalLM.from_pretrained(tiny_dir)
    return m.eval()


@pytest.fixture()
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_dict({"text": tiny_lm_texts(40)["text"]})


@pytest.fixture()
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        warnings.filterwarnings("ignore", message="tokenizer has no pad token")
        yield


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(model, snap):
    now = model.state_dict()
    assert now.keys() == snap.keys()
    for k in snap:
        assert now[k].dtype == snap[k].dtype, k
        assert torch.equal(now[k], snap[k]), k


def modes(model):
    return [m.training for m in model.modules()]


# --------------------------------------------------------------------------- tiny LM


def test_tiny_lm_is_a_pythia_architecture_that_learned_and_builds_once(tiny_dir, model, tokenizer):
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    assert model.config.model_type == "gpt_neox"
    assert tokenizer.pad_token is None and tokenizer.eos_token == EOS_TOKEN  # like Pythia's
    assert len(tokenizer) == model.config.vocab_size == 512
    # Held-out next-token loss well below the uniform predictor's log(V).
    ids = torch.tensor(tokenizer(" ".join(tiny_lm_texts(20)["text"]))["input_ids"][:256])[None]
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    assert loss < math.log(512) - 1.0
    marker = tiny_dir / "basin_volume_tiny_lm.json"
    stamp = marker.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert build_tiny_lm(tiny_dir, steps=STEPS) == tiny_dir
    assert time.perf_counter() - t0 < 1.0 and marker.stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="other settings"):
        build_tiny_lm(tiny_dir, steps=STEPS + 1)


# --------------------------------------------------------------------------- README


@pytest.mark.usefixtures("quiet")
def test_readme_snippet_runs_and_converges(model, tokenizer):
    dataset = Dataset.from_dict({"text": tiny_lm_texts(30)["text"]})
    from basin_volume import VolumeConfig, VolumeEstimator

    cfg = VolumeConfig(model=model, tokenizer=tokenizer, dataset=dataset, text_key="text",
                       n_samples=10, cutoff=1e-2, max_seq_len=2048, val_size=10,
                       cache_mode=None, chunking=False)  # fmt: skip
    result = VolumeEstimator.from_config(cfg).run()
    assert cfg.model_type == "causal"
    for name in ("estimates", "deltas", "props", "mults", "logabsint"):
        values = getattr(result, name)
        assert values.shape == (10,), name
        assert torch.isfinite(values).all(), name
    assert set(result.status) == {"converged"}
    assert ((result.deltas - 1e-2).abs() <= 1e-2 * 1e-2 * (1 + 1e-9)).all()
    assert math.isfinite(result.log_volume) and result.log_volume < 0


def test_no_pad_token_warns_once_and_leaves_the_tokenizer_alone(model, tokenizer, dataset):
    with pytest.warns(UserWarning, match="no pad token"):
        causal_lm_objective(model, tokenizer, dataset, val_size=4, cache_mode=None)
    assert tokenizer.pad_token is None


# --------------------------------------------------------------------------- cache modes


@pytest.mark.usefixtures("quiet")
def test_cache_modes_give_identical_estimates(model, tokenizer, dataset):
    results, fns = {}, {}
    for mode in (None, "cpu", "gpu", "auto"):
        cfg = bv.VolumeConfig(model=model, tokenizer=tokenizer, dataset=dataset, n_samples=4,
                              val_size=6, max_seq_len=64, cache_mode=mode, seed=3,
                              progress=False)  # fmt: skip
        est = bv.VolumeEstimator.from_config(cfg)
        results[mode], fns[mode] = est.run(), est.fn
    for mode in ("cpu", "gpu", "auto"):
        for name in ("estimates", "deltas", "mults", "n_evals"):
            assert torch.equal(getattr(results[mode], name), getattr(results[None], name)), (
                mode,
                name,
            )
    assert fns[None].cache_device is None and fns[None].cache_bytes == 0
    vocab, n_tok = model.config.vocab_size, fns["cpu"].n_tokens
    for mode in ("cpu", "gpu", "auto"):
        assert fns[mode].cache_device == torch.device("cpu")
        assert fns[mode].cache_bytes == n_tok * vocab * 4  # float32 logits, non-padding only
    # Without a cache every evaluation also recomputes the centre: twice the forward passes.
    evals = int(results[None].n_evals.sum()) + 1  # + fn(center)
    assert fns[None].n_forward == 2 * evals
    assert fns["cpu"].n_forward == evals + 1


def test_auto_cache_placement():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    gib = 2**30
    pick = choose_cache_device
    assert pick("auto", gib, cuda, free_device_bytes=4 * gib, free_ram_bytes=64 * gib) == cuda
    assert pick("auto", 3 * gib, cuda, free_device_bytes=4 * gib, free_ram_bytes=64 * gib) == cpu
    assert pick("auto", 3 * gib, cuda, budget_bytes=3 * gib, free_ram_bytes=0) == cuda
    assert pick("auto", 3 * gib, cuda, budget_bytes=0, free_ram_bytes=64 * gib) == cpu
    assert pick("auto", 40 * gib, cuda, free_device_bytes=gib, free_ram_bytes=64 * gib) is None
    assert pick("auto", gib, cpu, free_ram_bytes=64 * gib) == cpu
    assert pick("cpu", 99 * gib, cuda, free_ram_bytes=0) == cpu
    assert pick("gpu", 99 * gib, cuda, free_device_bytes=0) == cuda
    assert pick("gpu", 1, cpu) == cpu  # "gpu" means the model's device
    assert pick(None, 1, cuda) is None
    with pytest.raises(ValueError, match="cache_mode"):
        pick("disk", 1, cpu)


def test_auto_without_room_recomputes_with_a_warning(model, tokenizer, dataset, monkeypatch):
    import basin_volume.causal as causal

    monkeypatch.setattr(causal, "available_ram_bytes", lambda: 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="tokenizer has no pad token")
        with pytest.warns(UserWarning, match="recomputed"):
            fn = causal_lm_objective(model, tokenizer, dataset, val_size=3, cache_mode="auto")
    assert fn.cache_device is None and float(fn(fn.center)) == 0.0


# --------------------------------------------------------------------------- the model


@pytest.mark.usefixtures("quiet")
def test_model_is_untouched_after_a_run_and_after_a_run_that_raises(model, tokenizer, dataset):
    model.train()
    model.gpt_neox.layers[1].eval()  # a mixed pattern of modes must come back exactly
    before_modes, snap = modes(model), snapshot(model)
    cfg = bv.VolumeConfig(model=model, tokenizer=tokenizer, dataset=dataset, n_samples=3,
                          val_size=5, max_seq_len=64, cache_mode="auto",
                          progress=False)  # fmt: skip
    est = bv.VolumeEstimator.from_config(cfg)
    assert modes(model) == before_modes
    result = est.run()
    assert len(result.estimates) == 3
    assert_identical(model, snap)
    assert modes(model) == before_modes

    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        calls = {"n": 0}
        inner = est.fn

        def failing(theta, inner=inner, calls=calls, exc=exc):
            calls["n"] += 1
            value = inner(theta)
            if calls["n"] == 4:  # midway through the second direction
                raise exc
            return value

        with pytest.raises(type(exc)):
            bv.VolumeEstimator(cfg, est.model, failing, est.center).run()
        assert calls["n"] == 4
        assert_identical(model, snap)
        assert modes(model) == before_modes


def test_kl_matches_brute_force_with_padding_and_a_real_pad_token(model, tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.pad_token = tok.eos_token  # pad id == eos id, and one text contains a real eos
    texts = [
        "def f(x): return x",
        f"The assert statement{EOS_TOKEN} is used to raise an exception when a check fails.",
        "a",
        "Lists are mutable sequences, typically used to store collections of items. " * 3,
    ]
    max_len = 24
    fn = causal_lm_objective(model, tok, {"text": texts}, val_size=4, max_seq_len=max_len,
                             data_batch_size=3, cache_mode="cpu")  # fmt: skip
    encoded = [tok(t)["input_ids"][:max_len] for t in texts]
    assert tok.pad_token_id in encoded[1]  # a real token equal to the pad id
    assert len({len(e) for e in encoded}) > 1  # padding is needed

    theta = fn.center + 3e-3 * torch.randn(
        fn.center.shape, generator=torch.Generator().manual_seed(0)
    )
    other = copy.deepcopy(model)
    nn.utils.vector_to_parameters(theta, other.parameters())
    per_token, is_pad_id = [], []
    with torch.no_grad():  # each sequence alone, unpadded
        for ids in encoded:
            x = torch.tensor(ids)[None]
            p0 = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)
            p1 = torch.log_softmax(other(input_ids=x).logits[0].double(), -1)
            per_token.append((p0.exp() * (p0 - p1)).sum(-1))
            is_pad_id.append(x[0] == tok.pad_token_id)
    per_token, is_pad_id = torch.cat(per_token), torch.cat(is_pad_id)
    expect = float(per_token.mean())
    assert fn.n_tokens == len(per_token)
    assert float(fn(theta)) == pytest.approx(expect, rel=1e-6)
    assert float(fn(fn.center)) == 0.0
    # Masking by pad id instead of by the attention mask would drop a real token, which is
    # far outside that tolerance.
    wrong = float(per_token[~is_pad_id].mean())
    assert abs(wrong - expect) > 1e-4 * expect


@pytest.mark.parametrize("cache_mode", [None, "cpu"])
@pytest.mark.usefixtures("quiet")
def test_theta_none_evaluates_parameters_written_in_place(model, tokenizer, dataset, cache_mode):
    """The memory-light path writes theta into the model and calls fn(None); the centre's
    outputs must still be the centre's (from the cache, or the copy saved without one)."""
    fn = causal_lm_objective(model, tokenizer, dataset, val_size=3, max_seq_len=32,
                             cache_mode=cache_mode)  # fmt: skip
    center = fn.center
    theta = center + 2e-3 * torch.randn(center.shape, generator=torch.Generator().manual_seed(1))
    expect = float(fn(theta))
    assert expect > 0
    with torch.no_grad():
        nn.utils.vector_to_parameters(theta, model.parameters())
    assert float(fn(None)) == expect
    with torch.no_grad():
        nn.utils.vector_to_parameters(center, model.parameters())
    assert float(fn()) == 0.0


def test_hf_model_wrapper_is_unwrapped(model, tokenizer, dataset, quiet):
    class Wrapper(nn.Module):
        def __init__(self, hf_model):
            super().__init__()
            self.hf_model = hf_model

    common = dict(tokenizer=tokenizer, dataset=dataset, n_samples=2, val_size=4, max_seq_len=48,
                  cache_mode="cpu", progress=False)  # fmt: skip
    direct = bv.VolumeEstimator.from_config(bv.VolumeConfig(model=model, **common)).run()
    wrapped = bv.VolumeEstimator.from_config(bv.VolumeConfig(model=Wrapper(model), **common)).run()
    assert torch.equal(direct.estimates, wrapped.estimates)


def test_model_batch_size_gives_the_sequential_result(model, tokenizer, dataset):
    common = dict(model=model, tokenizer=tokenizer, dataset=dataset, val_size=2, max_seq_len=48,
                  n_samples=20, rtol=1e-3, progress=False, method="is")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pad token; low ESS; a model that cannot be vmapped
        seq = bv.VolumeEstimator.from_config(bv.VolumeConfig(**common)).run()
        bat = bv.VolumeEstimator.from_config(bv.VolumeConfig(model_batch_size=4, **common)).run()
    assert bat.status == seq.status
    torch.testing.assert_close(bat.radii, seq.radii, rtol=1e-5, atol=0)


def test_low_memory_mode_matches_dense(model, tokenizer, dataset):
    common = dict(model=model, tokenizer=tokenizer, dataset=dataset, val_size=2, max_seq_len=48,
                  n_samples=4, rtol=1e-3, progress=False)  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = bv.VolumeEstimator.from_config(bv.VolumeConfig(low_memory=False, **common)).run()
        light = bv.VolumeEstimator.from_config(bv.VolumeConfig(low_memory=True, **common)).run()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(light.radii, dense.radii, rtol=1e-4, atol=0)
    torch.testing.assert_close(light.estimates, dense.estimates, rtol=1e-7, atol=1e-3)


def test_fisher_preconditioner_in_the_config_and_in_low_memory_mode(model, tokenizer, dataset):
    from basin_volume.preconditioners import prior_eps

    common = dict(model=model, tokenizer=tokenizer, dataset=dataset, val_size=2, max_seq_len=32,
                  n_samples=3, rtol=1e-3, progress=False, preconditioner_type="fisher",
                  sigma=0.05)  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense_est = bv.VolumeEstimator.from_config(bv.VolumeConfig(low_memory=False, **common))
        dense = dense_est.run()
        light = bv.VolumeEstimator.from_config(bv.VolumeConfig(low_memory=True, **common)).run()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    fn = dense_est.fn
    eps = prior_eps(1e-2, 0.05, fn.params.dim)
    ref = 1.0 / (fn.fisher_diagonal(n_samples=1, seed=0).sqrt() + eps)
    torch.testing.assert_close(dense_est.preconditioner, ref, rtol=0, atol=0)
    assert set(dense.status) == {"converged"}
    # float32 chunk rounding in light mode: ~1e-7 relative on log-estimates near 3e5
    torch.testing.assert_close(light.estimates, dense.estimates, rtol=1e-6, atol=1e-3)


def test_objective_rejects_left_padding(model):
    ids = torch.tensor([[5, 6, 7], [0, 8, 9]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    with pytest.raises(ValueError, match="right-padded"):
        CausalLMKL(model, ids, mask)


# --------------------------------------------------------------------------- data


def test_only_the_first_val_size_texts_are_tokenised(model, tokenizer):
    seen = []

    class Spy:
        pad_token_id = tokenizer.eos_token_id
        eos_token_id = tokenizer.eos_token_id

        def __call__(self, texts, **kwargs):
            seen.extend(texts)
            return tokenizer(texts, **kwargs)

    big = Dataset.from_dict({"text": [f"text number {i}" for i in range(500)]})
    fn = causal_lm_objective(model, Spy(), big, val_size=3, cache_mode=None)
    assert seen == ["text number 0", "text number 1", "text number 2"]
    assert fn.n_tokens == sum(len(tokenizer(t)["input_ids"]) for t in seen)


def test_chunk_and_tokenize_joins_with_eos_and_cuts(tokenizer, dataset):
    texts = dataset["text"]
    eos = tokenizer.eos_token_id
    stream = []
    for t in texts:  # independent reference: tokenise each text, join with eos
        stream += tokenizer.encode(t, add_special_tokens=False) + [eos]
    out = chunk_and_tokenize(dataset, tokenizer, text_key="text", max_seq_len=50)
    n = len(stream) // 50
    assert out["input_ids"].shape == (n, 50)
    assert out["input_ids"].flatten().tolist() == stream[: n * 50]
    assert bool(out["attention_mask"].eq(1).all())

    def texts_then_fail():  # reads only as far as the chunks asked for need
        for i, t in enumerate(texts):
            if i == 3:
                raise AssertionError("read past the texts needed")
            yield t

    need = len(tokenizer.encode(texts[0], add_special_tokens=False)) + 1
    few = chunk_and_tokenize(texts_then_fail(), tokenizer, max_seq_len=need, n_chunks=1)
    assert few["input_ids"].flatten().tolist() == stream[:need]

    with pytest.warns(UserWarning, match="full chunks"):
        short = chunk_and_tokenize(texts[:2], tokenizer, max_seq_len=8, n_chunks=10_000)
    assert len(short["input_ids"]) < 10_000
    with pytest.raises(ValueError, match="max_seq_len"):
        chunk_and_tokenize(["tiny"], tokenizer, max_seq_len=10_000)


@pytest.mark.usefixtures("quiet")
def test_chunking_in_the_config(model, tokenizer, dataset):
    cfg = bv.VolumeConfig(model=model, tokenizer=tokenizer, dataset=dataset, n_samples=2,
                          val_size=3, max_seq_len=32, chunking=True, cache_mode="auto",
                          progress=False)  # fmt: skip
    est = bv.VolumeEstimator.from_config(cfg)
    assert est.fn.n_tokens == 3 * 32
    result = est.run()
    assert ((result.deltas - 1e-2).abs() <= 1e-4 * (1 + 1e-9)).all()


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"text_key": "body"}, "text_key='body'"),
        ({"dataset": Dataset.from_dict({"text": []})}, "empty"),
        ({"dataset": None}, "dataset is required"),
        ({"val_size": 0}, "val_size"),
        ({"max_seq_len": 0}, "max_seq_len"),
        ({"data_batch_size": 0}, "data_batch_size"),
        ({"cache_mode": "disk"}, "cache_mode"),
        ({"cache_budget_bytes": -1}, "cache_budget_bytes"),
        ({"model_batch_size": 0}, "model_batch_size"),
        ({"tokenizer": None}, "tokenizer is required"),
        ({"model": "not a model"}, "torch.nn.Module"),
        ({"dataset": DatasetDict({"validation": Dataset.from_dict({"text": ["a"]})})}, "split"),
        ({"dataset": {"text": [1, 2]}}, "not a string"),
    ],
)
def test_bad_config_fields_are_named(model, tokenizer, dataset, changes, match):
    cfg = bv.VolumeConfig(model=model, tokenizer=tokenizer, dataset=dataset, val_size=2,
                          progress=False)  # fmt: skip
    with pytest.raises((ValueError, TypeError), match=match):  # on construction or build
        bv.VolumeEstimator.from_config(cfg.replace(**changes))


# --------------------------------------------------------------------------- Pythia


def test_pythia_source_names_the_hub_checkpoint(tmp_path):
    assert pythia_source("14m", 3000) == ("EleutherAI/pythia-14m", "step3000")
    assert pythia_source("pythia-160m-deduped", 512) == (
        "EleutherAI/pythia-160m-deduped",
        "step512",
    )
    assert pythia_source("EleutherAI/pythia-1b", 0) == ("EleutherAI/pythia-1b", "step0")
    assert pythia_source("70m") == ("EleutherAI/pythia-70m", "main")
    with pytest.raises(ValueError, match="checkpoint_step=1234"):
        pythia_source("14m", 1234)
    with pytest.raises(ValueError, match="model_name is required"):
        pythia_source(None)
    assert pythia_source(str(tmp_path)) == (str(tmp_path), None)
    with pytest.raises(ValueError, match="step1000"):
        pythia_source(str(tmp_path), 1000)


@pytest.mark.usefixtures("quiet")
def test_pythia_loads_the_hub_revision_through_from_pretrained(tiny_dir, dataset, monkeypatch):
    calls = []
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def fake(real, kind):
        def load(source, **kwargs):
            calls.append((kind, source, kwargs.get("revision"), kwargs.get("dtype")))
            return real(tiny_dir)  # the local stand-in; nothing is downloaded

        return load

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake(real_model, "model"))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake(real_tok, "tokenizer"))
    cfg = bv.VolumeConfig(model_type="pythia", model_name="14m", checkpoint_step=3000,
                          dataset=dataset, n_samples=2, val_size=4, max_seq_len=64,
                          cache_mode="auto", progress=False)  # fmt: skip
    result = bv.VolumeEstimator.from_config(cfg).run()
    assert calls == [
        ("model", "EleutherAI/pythia-14m", "step3000", torch.float32),
        ("tokenizer", "EleutherAI/pythia-14m", "step3000", None),
    ]
    assert torch.isfinite(result.estimates).all()
    assert result.meta["config"]["model_type"] == "pythia"
    with pytest.raises(ValueError, match="dataset is required"):
        bv.VolumeEstimator.from_config(cfg.replace(dataset=None))
    assert len(calls) == 2  # refused before anything was loaded


@pytest.mark.usefixtures("quiet")
def test_pythia_from_a_local_checkpoint_directory(tiny_dir, dataset, tmp_path, model, tokenizer):
    os.symlink(tiny_dir, tmp_path / "step1000")
    common = dict(dataset=dataset, n_samples=2, val_size=4, max_seq_len=64, progress=False)
    local = bv.VolumeConfig(model_type="pythia", model_name=str(tmp_path), checkpoint_step=1000,
                            **common)  # fmt: skip
    direct = bv.VolumeConfig(model=model, tokenizer=tokenizer, **common)
    a = bv.VolumeEstimator.from_config(local).run()
    b = bv.VolumeEstimator.from_config(direct).run()
    assert torch.equal(a.estimates, b.estimates)
    with pytest.raises(ValueError, match="leave model and tokenizer unset"):
        bv.VolumeEstimator.from_config(local.replace(model=model))

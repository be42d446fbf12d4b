"""Issue 16: evaluation data as DataLoaders and batches, and loss basins at the model level.

Equalities are exact (same batches give bit-identical objectives and estimates); the loss
basins are checked against closed forms computed here, not against the code's own output.
"""

import math
import warnings

import pytest
import torch
from scipy import special
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import basin_volume as bv
from basin_volume.basins import CausalLMLoss, ClassifierLoss, token_tensors
from basin_volume.inputs import Batches
from basin_volume.objectives import ClassifierKL


@pytest.fixture()
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        yield


def run(**fields):
    cfg = bv.VolumeConfig(**{"n_samples": 6, "cutoff": 1e-2, "progress": False, **fields})
    return bv.VolumeEstimator.from_config(cfg).run()


def same_result(a, b):
    for name in ("estimates", "deltas", "props", "mults", "n_evals"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.log_volume == b.log_volume


# --------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def digits(digits_run):
    return digits_run.model, digits_run.train_inputs[:200], digits_run.train_labels[:200]


class Counting:
    """An iterable of batches that counts its passes (a stand-in for a streaming loader)."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


@pytest.mark.usefixtures("quiet")
def test_dataloader_tuples_and_generators_equal_the_tensor(digits):
    model, x, y = digits
    base = dict(model_type="classifier", model=model, seed=3)
    expect = run(inputs=x, data_batch_size=64, **base)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=False)
    same_result(run(inputs=loader, **base), expect)
    same_result(run(inputs=DataLoader(TensorDataset(x), batch_size=64), **base), expect)
    batches = list(zip(x.split(64), y.split(64), strict=True))
    same_result(run(inputs=batches, **base), expect)
    same_result(run(inputs=(b for b in x.split(64)), **base), expect)  # read once, kept
    other = run(inputs=x, data_batch_size=50, **base)  # other batching: equal to rounding
    assert torch.allclose(other.estimates, expect.estimates, rtol=1e-9, atol=0)


def test_batches_are_streamed_once_per_evaluation(digits):
    model, x, _ = digits
    source = Counting(list(x.split(64)))
    fn = ClassifierKL(model, source)
    passes = source.passes
    theta = fn.center + 1e-3
    fn(theta)
    fn(theta)
    assert source.passes == passes + 2
    assert fn.data.streamed and fn.data.n_examples == len(x) and fn.data.n_batches == 4
    expect = ClassifierKL(model, x, batch_size=64)
    assert torch.equal(fn(theta), expect(theta))


class MaskedPool(nn.Module):
    """A text classifier over token ids that averages embeddings where attention_mask is 1."""

    def __init__(self, vocab=20, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, classes)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        return self.head((self.embed(input_ids) * m).sum(1) / m.sum(1))


class Packed(nn.Module):
    """The same classifier taking one tensor [batch, 2, length] of ids and mask."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, packed):
        return self.inner(packed[:, 0], packed[:, 1])


@pytest.mark.usefixtures("quiet")
def test_dict_batches_pass_the_attention_mask():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (40, 7), generator=gen)
    lengths = torch.randint(1, 8, (40,), generator=gen)
    mask = (torch.arange(7) < lengths[:, None]).long()
    model = MaskedPool()
    dicts = [
        {"input_ids": i, "attention_mask": m}
        for i, m in zip(ids.split(8), mask.split(8), strict=True)
    ]
    got = run(model_type="classifier", model=model, inputs=dicts)
    packed = torch.stack([ids, mask], 1)
    same_result(
        got, run(model_type="classifier", model=Packed(model), inputs=packed, data_batch_size=8)
    )
    # padding holds other token ids: the mask hides them, so nothing changes
    noisy = ids.masked_fill(mask == 0, 19)
    dicts2 = [
        {"input_ids": i, "attention_mask": m}
        for i, m in zip(noisy.split(8), mask.split(8), strict=True)
    ]
    assert torch.allclose(
        run(model_type="classifier", model=model, inputs=dicts2).estimates,
        got.estimates,
        rtol=1e-6,
        atol=0,
    )


def test_shuffling_or_changing_loaders_are_refused(digits):
    model, x, _ = digits
    with pytest.raises(ValueError, match="shuffle=False"):
        ClassifierKL(model, DataLoader(TensorDataset(x), batch_size=64, shuffle=True))

    class Augmented:
        def __iter__(self):
            return iter([x[:64] + 1e-3 * torch.randn_like(x[:64])])

    with pytest.raises(ValueError, match="different data"):
        ClassifierKL(model, Augmented())  # the centre's pass already differs from the first
    with pytest.raises(ValueError, match="labels is for tensor inputs"):
        Batches([x], labels=torch.zeros(len(x)))
    with pytest.raises(ValueError, match="tuple of 3"):
        Batches([(x, x, x)])
    with pytest.raises(TypeError, match="inputs must be"):
        Batches(3)
    with pytest.raises(ValueError, match="no examples"):
        Batches([])


def test_fisher_preconditioner_from_tuple_batches_equals_the_tensors(digits):
    model, x, y = digits
    base = dict(model_type="classifier", model=model, preconditioner_type="fisher")
    a = bv.VolumeEstimator.from_config(bv.VolumeConfig(inputs=x, **base)).preconditioner
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    b = bv.VolumeEstimator.from_config(bv.VolumeConfig(inputs=loader, **base)).preconditioner
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- loss basins


@pytest.mark.usefixtures("quiet")
def test_classifier_loss_basin_meets_the_cutoff(digits):
    model, x, y = digits
    res = run(
        model_type="classifier",
        model=model,
        inputs=x,
        labels=y,
        basin="loss",
        n_samples=8,
        rtol=1e-2,
    )
    assert set(res.status) == {"converged"}
    assert torch.all((res.deltas - 1e-2).abs() <= 1e-2 * 1e-2)
    with torch.no_grad():  # L(theta0), computed independently
        expect = nn.functional.cross_entropy(model(x).double(), y)
    assert res.meta["f0"] == pytest.approx(float(expect), rel=1e-12)
    assert res.meta["config"]["basin"] == "loss"
    loader = DataLoader(TensorDataset(x, y), batch_size=4096)
    same_result(
        run(
            model_type="classifier",
            model=model,
            inputs=loader,
            basin="loss",
            n_samples=8,
            rtol=1e-2,
        ),
        res,
    )


def test_loss_basin_settings_name_the_field(digits):
    model, x, y = digits
    with pytest.raises(ValueError, match="basin='loss'"):
        bv.VolumeConfig(model_type="classifier", model=model, inputs=x, labels=y)
    with pytest.raises(ValueError, match="basin must be"):
        bv.VolumeConfig(basin="mse")
    with pytest.raises(ValueError, match="labels"):
        ClassifierLoss(model, x)
    with pytest.raises(ValueError, match="loss_fn"):
        ClassifierLoss(model, x, labels=y.double())
    with pytest.raises(ValueError, match="loss_fn must be a function"):
        bv.VolumeConfig(basin="loss", loss_fn="mse")


def regression(dim, h, *, n_per=4):
    """Inputs with X^T X / N = diag(h) / 2 and targets fitted exactly by w0 = 0, so that the
    mean squared error is exactly delta(w) = 0.5 * sum(h_i w_i^2)."""
    eye = torch.eye(dim, dtype=torch.float64)
    x = torch.cat([eye * (h * dim / 2).sqrt()] * n_per)  # N = dim * n_per rows
    return x, torch.zeros(len(x), 1, dtype=torch.float64)


def linear(dim, weight):
    model = nn.Linear(dim, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(weight)
    return model


@pytest.mark.usefixtures("quiet")
def test_quadratic_loss_gives_the_exact_ellipsoid():
    dim, eps = 12, 0.05
    h = torch.logspace(-1, 1, dim, dtype=torch.float64)
    x, y = regression(dim, h)
    w0 = torch.linspace(-1, 1, dim, dtype=torch.float64)
    model = linear(dim, w0)
    y = x @ w0[:, None]  # fitted exactly at w0: L(w0) = 0 and L(w) = 0.5 (w-w0)^T H (w-w0)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    res = run(
        model_type="classifier",
        model=model,
        inputs=loader,
        basin="loss",
        loss_fn=nn.MSELoss(),
        measure="uniform",
        cutoff=eps,
        rtol=1e-10,
        preconditioner=h.rsqrt(),
    )
    log_vd = (dim / 2) * math.log(math.pi) - math.lgamma(dim / 2 + 1)
    exact = log_vd + (dim / 2) * math.log(2 * eps) - 0.5 * float(h.log().sum())
    assert torch.allclose(res.estimates, torch.full_like(res.estimates, exact), atol=1e-6)
    assert res.log_volume == pytest.approx(exact, abs=1e-6)


@pytest.mark.usefixtures("quiet")
def test_isotropic_loss_basin_matches_the_incomplete_gamma():
    dim, eps, hh, sigma = 10, 0.02, 3.0, 0.2
    x, y = regression(dim, torch.full((dim,), hh, dtype=torch.float64))
    model = linear(dim, torch.zeros(dim, dtype=torch.float64))
    res = run(
        model_type="classifier",
        model=model,
        inputs=x,
        labels=y,
        basin="loss",
        loss_fn=nn.MSELoss(),
        sigma=sigma,
        cutoff=eps,
        rtol=1e-10,
    )
    exact = math.log(special.gammainc(dim / 2, eps / (hh * sigma**2)))
    assert res.log_volume == pytest.approx(exact, abs=1e-6)


# --------------------------------------------------------------------------- causal LMs


@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("transformers")
    from basin_volume.tiny_lm import build_tiny_lm, load_tiny_lm, tiny_lm_texts

    return load_tiny_lm(build_tiny_lm(steps=300)), tiny_lm_texts(6)


@pytest.mark.usefixtures("quiet")
def test_causal_token_batches_equal_the_texts(tiny):
    from basin_volume.causal import tokenize_texts

    (model, tokenizer), texts = tiny
    tokenizer.pad_token = tokenizer.eos_token
    base = dict(model=model, n_samples=3, val_size=6, max_seq_len=48, data_batch_size=3)
    expect = run(tokenizer=tokenizer, dataset=texts, **base)
    tok = tokenize_texts(texts["text"], tokenizer, max_seq_len=48)
    batches = [
        {"input_ids": i, "attention_mask": m}
        for i, m in zip(tok["input_ids"].split(4), tok["attention_mask"].split(4), strict=True)
    ]
    same_result(run(inputs=batches, **base), expect)
    # a loss basin: its L(theta0) is the model's own (Hugging Face) loss on the same tokens
    res = run(inputs=DataLoader(batches, batch_size=None), basin="loss", **base)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    with torch.no_grad():
        hf = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    assert res.meta["f0"] == pytest.approx(float(hf.loss), rel=1e-5)
    assert set(res.status) == {"converged"}
    assert torch.all((res.deltas - 1e-2).abs() <= 1e-2 * 1e-2)
    from_texts = run(tokenizer=tokenizer, dataset=texts, basin="loss", **base)
    assert from_texts.meta["f0"] == pytest.approx(res.meta["f0"], rel=1e-12)


def test_causal_loss_counts_only_predicted_tokens(tiny):
    (model, _), _ = tiny
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    fn = CausalLMLoss(model, ids, mask, batch_size=1)
    assert fn.n_tokens == 3 + 1
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
    picked = [logp[0, 0, 6], logp[0, 1, 7], logp[0, 2, 8], logp[1, 0, 10]]
    assert float(fn()) == pytest.approx(-float(sum(picked)) / 4, rel=1e-6)
    assert torch.equal(
        token_tensors([{"input_ids": ids[:1]}, {"input_ids": ids[1:, :2]}])["attention_mask"],
        torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
    )


@pytest.mark.usefixtures("quiet")
def test_loader_passes_leave_the_random_state_and_batch_under_vmap(digits):
    model, x, y = digits
    loader = DataLoader(TensorDataset(x, y), batch_size=50)
    base = dict(model_type="classifier", model=model, inputs=loader, basin="loss", n_samples=20,
                method="is")
    state = torch.random.get_rng_state()
    one = run(**base)
    assert torch.equal(torch.random.get_rng_state(), state)  # no DataLoader seed drawn
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback from vmap
        batched = run(**base, model_batch_size=4)
    assert torch.allclose(batched.estimates, one.estimates, rtol=1e-9, atol=0)


@pytest.mark.usefixtures("quiet")
def test_run_logs_resume_loader_runs_only_on_the_same_data(digits, tmp_path):
    model, x, y = digits
    out = tmp_path / "r.json"

    def cfg(labels, n):
        loader = DataLoader(TensorDataset(x, labels), batch_size=64)
        return bv.VolumeConfig(
            model_type="classifier",
            model=model,
            inputs=loader,
            basin="loss",
            n_samples=n,
            progress=False,
        )

    first = bv.run_to_file(cfg(y, 3), out)
    more = bv.run_to_file(cfg(y, 5), out, resume=True)
    assert torch.equal(more.estimates[:3], first.estimates)
    with pytest.raises(bv.ResumeError, match="data"):
        bv.run_to_file(cfg((y + 1) % 10, 6), out, resume=True)

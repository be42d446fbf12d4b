import math
import warnings

import pytest
import torch
from torch import nn

import basin_volume as bv
from basin_volume.objectives import ClassifierKL


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()}


def assert_identical(model, snap):
    now = model.state_dict()
    assert now.keys() == snap.keys()
    for k in snap:
        assert torch.equal(now[k], snap[k]), k
        assert now[k].dtype == snap[k].dtype


@pytest.fixture()
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        yield


def test_classifier_kl_matches_brute_force(digits_run):
    model, x = digits_run.model, digits_run.train_inputs[:100]
    fn = ClassifierKL(model, x, batch_size=33)
    theta = fn.center + 0.01 * torch.randn(
        fn.center.shape, generator=torch.Generator().manual_seed(0)
    )
    # brute force: a deep copy with the parameters written in
    other = type(model)(*[m for m in __import__("copy").deepcopy(model)])
    torch.nn.utils.vector_to_parameters(theta, other.parameters())
    with torch.no_grad():
        p0 = torch.log_softmax(model(x).double(), -1)
        p1 = torch.log_softmax(other(x).double(), -1)
    expect = (p0.exp() * (p0 - p1)).sum(-1).mean()
    assert float(fn(theta)) == pytest.approx(float(expect), rel=1e-9)
    assert float(fn(fn.center)) == 0.0


@pytest.mark.usefixtures("quiet")
def test_classifier_run_converges_and_leaves_model_untouched(digits_run):
    model = digits_run.model
    model.train()
    snap = snapshot(model)
    cfg = bv.VolumeConfig(
        model_type="classifier",
        model=model,
        inputs=digits_run.train_inputs,
        n_samples=20,
        cutoff=1e-2,
        progress=False,
        method="is",
    )
    res = bv.VolumeEstimator.from_config(cfg).run()
    assert_identical(model, snap)
    assert model.training  # mode restored
    assert set(res.status) == {"converged"}
    assert torch.all((res.deltas - 1e-2).abs() <= 1e-2 * 1e-2)
    assert math.isfinite(res.log_volume) and res.log_volume < 0
    assert res.meta["config"]["model_type"] == "classifier"
    assert res.n_evals.double().mean().item() <= 3.0


class Exploding(nn.Module):
    """Raises on the n-th forward pass (simulating a fault inside the model)."""

    def __init__(self, after, exc=RuntimeError):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.5)
        self.calls = 0
        self.after = after
        self.exc = exc

    def forward(self, x):
        self.calls += 1
        if self.calls > self.after:
            raise self.exc("boom")
        return self.drop(self.lin(x))


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_model_restored_when_forward_raises_midway(exc):
    torch.manual_seed(0)
    model = Exploding(after=5, exc=exc)
    model.train()
    snap = snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    cfg = bv.VolumeConfig(
        model_type="classifier", model=model, inputs=torch.randn(8, 4), n_samples=10, progress=False
    )
    est = bv.VolumeEstimator.from_config(cfg)
    with pytest.raises(exc, match="boom"):
        est.run()
    assert model.calls > 1
    assert_identical(model, snap)
    assert model.training and model.drop.training
    assert [p.requires_grad for p in model.parameters()] == flags


def test_run_evaluates_in_eval_mode():
    seen = []

    class Recorder(nn.Linear):
        def forward(self, x):
            seen.append(self.training)
            return super().forward(x)

    model = Recorder(4, 3)
    model.train()
    cfg = bv.VolumeConfig(
        model_type="classifier", model=model, inputs=torch.randn(8, 4), n_samples=3, progress=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        bv.VolumeEstimator.from_config(cfg).run()
    assert seen and not any(seen)
    assert model.training


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"model_type": "nope"}, "model_type"),
        ({"model_type": "classifier", "model": None, "inputs": torch.zeros(2, 4)}, "model"),
        ({"model_type": "classifier", "model": nn.Linear(4, 2)}, "inputs"),
        (
            {"model_type": "classifier", "model": nn.Linear(4, 2), "inputs": torch.zeros(0, 4)},
            "inputs",
        ),
    ],
)
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        bv.VolumeEstimator.from_config(bv.VolumeConfig(**kw))


def test_mlp_model_type_trains_and_runs(quiet):
    cfg = bv.VolumeConfig(model_type="mlp", n_samples=3, progress=False)
    res = bv.VolumeEstimator.from_config(cfg).run()
    assert res.dim == 64 * 64 + 64 + 64 * 10 + 10
    assert math.isfinite(res.log_volume)


def tiny_convnext():
    from transformers import ConvNextV2Config, ConvNextV2ForImageClassification

    torch.manual_seed(0)
    config = ConvNextV2Config(num_channels=3, patch_size=4, num_stages=2, hidden_sizes=[8, 16],
                              depths=[1, 1], num_labels=3, image_size=16)  # fmt: skip
    return ConvNextV2ForImageClassification(config).eval()


def test_convnext_model_type_from_a_module_and_from_a_folder(tmp_path):
    model = tiny_convnext()
    pixels = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    est = bv.VolumeEstimator.from_config(
        bv.VolumeConfig(
            model_type="convnext", model=model, inputs=pixels, n_samples=3, progress=False
        )  # fmt: skip
    )
    # the objective is the mean KL of the logits from transformers' output object
    theta = est.center + 0.05 * torch.randn(est.center.shape, generator=torch.Generator())
    ref = torch.log_softmax(model(pixels).logits.double(), -1)
    names = [n for n, _ in model.named_parameters()]
    chunks = theta.split([p.numel() for p in model.parameters()])
    params = {n: c.view(p.shape) for n, c, p in zip(names, chunks, model.parameters(), strict=True)}
    with torch.no_grad():
        out = torch.func.functional_call(model, params, (pixels,)).logits
        moved = torch.log_softmax(out.double(), -1)
    expected = (ref.exp() * (ref - moved)).sum(-1).mean()
    with torch.no_grad():
        assert float(est.fn(theta)) == pytest.approx(float(expected), rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        direct = est.run()
        model.save_pretrained(tmp_path / "convnext")
        cfg = bv.VolumeConfig(model_type="convnext", model_name=str(tmp_path / "convnext"),
                              inputs=pixels, n_samples=3, progress=False)  # fmt: skip
        loaded = bv.VolumeEstimator.from_config(cfg).run()
    assert set(direct.status) == {"converged"}
    torch.testing.assert_close(loaded.estimates, direct.estimates, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="inputs"):
        bv.VolumeEstimator.from_config(bv.VolumeConfig(model_type="convnext", model=model))
    with pytest.raises(ValueError, match="model_name"):
        bv.VolumeEstimator.from_config(bv.VolumeConfig(model_type="convnext", inputs=pixels))


def compile_run(compile, **changes):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3))
    cfg = bv.VolumeConfig(model_type="classifier", model=model, inputs=torch.randn(40, 6),
                          n_samples=6, progress=False, compile=compile, **changes)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        return bv.VolumeEstimator.from_config(cfg).run()


def counting_backend(calls):
    """A torch.compile backend that runs the captured graph eagerly and counts its calls."""

    def backend(graph_module, example_inputs):
        def run(*args):
            calls.append(1)
            return graph_module.forward(*args)

        return run

    return backend


@pytest.mark.parametrize("low_memory", [False, True])
def test_compiled_evaluation_runs_the_captured_graph_every_time(low_memory):
    """Every evaluation goes through the compiled graph (functional and in-place paths), and
    the captured computation gives the very same estimates."""
    calls = []
    eager = compile_run(False, low_memory=low_memory)
    traced = compile_run({"backend": counting_backend(calls)}, low_memory=low_memory)
    assert len(calls) >= int(traced.n_evals.sum())  # one call per evaluation, at least
    for name in ("estimates", "radii", "n_evals"):
        assert torch.equal(getattr(traced, name), getattr(eager, name)), name


def test_batched_evaluation_runs_eagerly_and_leaves_compilation_working():
    """vmapped calls cannot enter compiled code: they run eagerly, and a later unbatched run
    in the same process is still compiled."""
    calls = []
    batched = compile_run({"backend": counting_backend(calls)}, model_batch_size=3)
    assert bool(torch.isfinite(batched.estimates).all())
    before = len(calls)
    later = compile_run({"backend": counting_backend(calls)})
    assert len(calls) - before >= int(later.n_evals.sum())


@pytest.mark.slow
def test_compiled_kernels_agree_to_float_precision():
    eager, compiled = compile_run(False), compile_run(True)
    torch.testing.assert_close(compiled.radii, eager.radii, rtol=1e-4, atol=0)


def test_compile_option_is_checked():
    with pytest.raises(TypeError, match="compile"):
        compile_run("yes")


def test_cache_mode_none_is_spelled_both_ways():
    from basin_volume.causal import _resolve_cache_mode

    assert bv.VolumeConfig(cache_mode="none").cache_mode is None
    assert bv.VolumeConfig(cache_mode=None).cache_mode is None
    assert _resolve_cache_mode("none") is None and _resolve_cache_mode(None) is None
    with pytest.raises(ValueError, match="cache_mode"):
        _resolve_cache_mode("disk")


def test_volume_config_method_smc_and_its_refusals():
    """VolumeConfig(method='smc') runs SMC on a classifier and leaves the model as it was;
    the memory-light mode and the adaptive proposal refuse it by name."""
    import basin_volume as bv

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    inputs = torch.randn(32, 4)
    before = [p.detach().clone() for p in model.parameters()]
    cfg = bv.VolumeConfig(model=model, model_type="classifier", inputs=inputs, n_samples=32,
                          method="smc", replicas=2, n_moves=2, progress=False)
    res = bv.VolumeEstimator.from_config(cfg).run()
    assert res.method == "smc" and len(res.replicas) == 2
    # without a budget the backward pass runs wherever SMC tempered
    smc = res.meta["smc"]
    assert res.meta["bidirectional"] is True and "tempered" in smc["kinds"]
    assert [math.isfinite(v) for v in smc["reverse"]] == [k == "tempered" for k in smc["kinds"]]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(ValueError, match="memory-light"):
        bv.VolumeEstimator.from_config(cfg.replace(low_memory=True)).run()
    with pytest.raises(ValueError, match="method must be"):
        bv.VolumeConfig(model=model, model_type="classifier", inputs=inputs, method="mcmc")
    with pytest.raises(ValueError, match="budget"):
        bv.VolumeConfig(model=model, model_type="classifier", inputs=inputs, budget=0)
    with pytest.raises(ValueError, match="bidirectional must be True, False or None"):
        bv.VolumeConfig(model=model, model_type="classifier", inputs=inputs, bidirectional=1)
    plain = bv.VolumeEstimator.from_config(
        cfg.replace(n_samples=16, n_moves=1, bidirectional=False)).run()
    assert plain.meta["bidirectional"] is False and math.isnan(plain.log_volume_reverse)
    with pytest.raises(ValueError, match="budget does not cap preconditioner_type='adaptive'"):
        bv.VolumeConfig(model=model, model_type="classifier", inputs=inputs, budget=1000,
                        preconditioner_type="adaptive")
    # the memory-light mode's directions stop at the budget too
    light = bv.VolumeEstimator.from_config(cfg.replace(
        low_memory=True, method="is", n_samples=64, budget=60, model_batch_size=4)).run()
    assert light.n_samples < 64 and light.meta["budget"]["directions"] == light.n_samples
    assert 60 <= int(light.n_evals.sum()) <= 60 + 4 * 40
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))

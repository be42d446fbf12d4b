"""Memory-light (in-place) rays equal whole-vector rays, and leave the model exact."""

import warnings

import pytest
import torch
from torch import nn

import basin_volume as bv
from basin_volume import directions
from basin_volume.estimator import run_rays
from basin_volume.objectives import ClassifierKL
from basin_volume.preconditioners import DiagonalPreconditioner
from basin_volume.rays import DenseRays, InPlaceRays


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 5))


SETTINGS = dict(
    n_samples=6,
    cutoff=1e-2,
    measure="gaussian",
    sigma=None,
    rtol=1e-6,
    seed=3,
    progress=False,
    max_evals=40,
    max_radius=None,
    callback=None,
    resume_from=None,
    meta={},
)


def both(model, x, pre=None):
    fn = ClassifierKL(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        dense = run_rays(DenseRays(fn, fn.center, seed=3, preconditioner=pre), **SETTINGS)
        light = run_rays(
            InPlaceRays(fn, list(model.parameters()), seed=3, preconditioner=pre), **SETTINGS
        )
    return dense, light


@pytest.mark.parametrize("chunk", [1 << 20, 100, 37])
@pytest.mark.parametrize("with_pre", [False, True])
def test_light_equals_dense(monkeypatch, chunk, with_pre):
    monkeypatch.setattr(directions, "CHUNK_SIZE", chunk)
    model = make_model()
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(1))
    dim = sum(p.numel() for p in model.parameters())
    pre = None
    if with_pre:
        pre = DiagonalPreconditioner(
            torch.rand(dim, generator=torch.Generator().manual_seed(2)) + 0.1
        )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense, light = both(model, x, pre)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    # Light mode keeps the scales in float32: its proposal differs by rounding (~1e-8), so
    # the radius searches take slightly different paths, each within rtol=1e-6 in delta.
    rel = 1e-12 if pre is None else 1e-6
    torch.testing.assert_close(light.props, dense.props, rtol=rel / 10, atol=0)
    torch.testing.assert_close(light.radii, dense.radii, rtol=1e-5, atol=0)
    torch.testing.assert_close(light.estimates, dense.estimates, rtol=rel, atol=1e-6)
    assert light.log_volume == pytest.approx(dense.log_volume, rel=rel, abs=1e-6)


def test_light_mode_weight_is_exact_for_its_rounded_scales():
    """prop = |P32 z| / |z| / det(P32)^(1/D), with P32 the float32-rounded scales."""
    model = make_model()
    params = list(model.parameters())
    dim = sum(p.numel() for p in params)
    raw = torch.rand(dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 9 + 1
    pre = DiagonalPreconditioner(raw)
    rays = InPlaceRays(lambda: 0.0, params, seed=4, preconditioner=pre)
    p32 = pre.scales.float().double()
    assert rays.scales.dtype == torch.float32
    z = torch.cat([c.double() for _, c in directions.normal_chunks(4, 2, dim)])
    expected = (p32 * z).norm() / z.norm() * torch.exp(-p32.log().sum() / dim)
    assert rays.start(2).prop == pytest.approx(float(expected), rel=1e-13)


def test_light_mode_restores_model_when_fn_raises():
    model = make_model()
    x = torch.randn(8, 10)
    fn = ClassifierKL(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def failing():
        calls.append(1)
        if len(calls) > 4:
            raise KeyboardInterrupt
        return fn()

    with pytest.raises(KeyboardInterrupt):
        run_rays(
            InPlaceRays(failing, list(model.parameters()), seed=0, preconditioner=None), **SETTINGS
        )
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_light_mode_rejects_dense_preconditioner():
    class Dense:
        dim = 3

        def apply(self, u):
            return u

    with pytest.raises(ValueError, match="diagonal"):
        InPlaceRays(lambda: 0.0, [torch.zeros(3)], seed=0, preconditioner=Dense())


@pytest.mark.parametrize("batch", [2, 5])
def test_batched_directions_equal_sequential(batch):
    model = make_model()
    x = torch.randn(32, 10, generator=torch.Generator().manual_seed(4))
    fn = ClassifierKL(model, x)
    kw = dict(n_samples=26, cutoff=1e-2, rtol=1e-4, seed=1, progress=False, method="is")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        seq = bv.estimate(fn, fn.center, **kw)
        bat = bv.estimate(fn, fn.center, model_batch_size=batch, **kw)
    assert bat.status == seq.status
    torch.testing.assert_close(bat.n_evals, seq.n_evals)
    torch.testing.assert_close(bat.radii, seq.radii, rtol=1e-6, atol=0)
    torch.testing.assert_close(bat.estimates, seq.estimates, rtol=1e-9, atol=1e-6)


def test_unvmappable_fn_falls_back_with_warning():
    c = torch.linspace(-1, 1, 8, dtype=torch.float64)

    def fn(th):
        return float(((th - c) ** 2).sum())  # .item()-style: not vmappable

    with pytest.warns(UserWarning, match="vmap"):
        res = bv.estimate(fn, c, n_samples=20, model_batch_size=4, sigma=1.0, progress=False,
                          method="is")
    assert set(res.status) == {"converged"}


def test_batch_fn_with_wrong_shape_is_an_error():
    c = torch.linspace(-1, 1, 8, dtype=torch.float64)
    fn = lambda th: ((th - c) ** 2).sum()  # noqa: E731
    with pytest.raises(ValueError, match="batch_fn"):
        bv.estimate(
            fn,
            c,
            n_samples=20,
            model_batch_size=4,
            sigma=1.0,
            progress=False,
            batch_fn=lambda ths: ths.sum(),
            method="is",
        )


def test_normal_vector_equals_the_chunks_with_any_number_of_workers(monkeypatch):
    monkeypatch.setattr(directions, "CHUNK_SIZE", 100)
    chunks = torch.cat([c for _, c in directions.normal_chunks(3, 5, 1234)])
    for workers in (1, 4):
        assert torch.equal(directions.normal_vector(3, 5, 1234, workers=workers), chunks)


@pytest.mark.parametrize("with_pre", [False, True])
def test_host_cache_gives_identical_results_and_draws_each_direction_once(monkeypatch, with_pre):
    monkeypatch.setattr(directions, "CHUNK_SIZE", 37)
    model = make_model()
    x = torch.randn(16, 10, generator=torch.Generator().manual_seed(1))
    fn = ClassifierKL(model, x)
    dim = sum(p.numel() for p in model.parameters())
    pre = None
    if with_pre:
        pre = DiagonalPreconditioner(
            torch.rand(dim, generator=torch.Generator().manual_seed(2)) + 0.1
        )
    draws = []
    real = directions._fill_chunk

    def counted(out, seed, index, c):
        draws.append(index)
        return real(out, seed, index, c)

    monkeypatch.setattr(directions, "_fill_chunk", counted)
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        for cache in (False, True):
            draws.clear()
            rays = InPlaceRays(
                fn, list(model.parameters()), seed=3, preconditioner=pre, host_cache=cache
            )
            results[cache] = run_rays(rays, **SETTINGS)
            assert rays._buffer is None  # released at the end of the run
            per_direction = len(draws) / -(-dim // 37) / SETTINGS["n_samples"]
            if cache:
                assert per_direction == 1  # generated once, reused by every evaluation
            else:
                assert per_direction == pytest.approx(
                    1 + float(results[cache].n_evals.double().mean())
                )
    for name in ("estimates", "radii", "props", "n_evals"):
        assert torch.equal(getattr(results[True], name), getattr(results[False], name)), name
    # on the CPU the cache would be a second copy of the parameters: off by default
    assert not InPlaceRays(fn, list(model.parameters()), seed=3, preconditioner=None).host_cache

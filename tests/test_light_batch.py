"""The memory-light mode evaluates several directions' points in one batched call."""

import warnings

import pytest
import torch

import basin_volume as bv
from basin_volume.estimator import run_rays
from basin_volume.objectives import ClassifierKL
from basin_volume.rays import InPlaceRays

SETTINGS = dict(n_samples=28, cutoff=1e-2, measure="gaussian", sigma=None, rtol=1e-2, seed=3,
                progress=False, max_evals=40, max_radius=None, callback=None,
                resume_from=None, meta={})  # fmt: skip


def _problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    model.train()
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(1))
    return model, ClassifierKL(model, x)


def test_batched_light_run_equals_one_at_a_time_and_restores_the_model():
    model, fn = _problem()
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def batch_fn(thetas):
        calls.append(thetas.shape[0])
        return torch.func.vmap(fn)(thetas)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        single = run_rays(InPlaceRays(fn, list(model.parameters()), seed=3, preconditioner=None),
                          **SETTINGS)  # fmt: skip
        rays = InPlaceRays(fn, list(model.parameters()), seed=3, preconditioner=None,
                           batch_fn=batch_fn)  # fmt: skip
        batched = run_rays(rays, batch_size=6, **SETTINGS)
    assert max(calls) == 6  # the 12 directions after the warm-up went 6 at a time
    torch.testing.assert_close(batched.n_evals, single.n_evals, rtol=0, atol=0)
    torch.testing.assert_close(batched.estimates, single.estimates, rtol=1e-9, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert model.training


def test_failing_batch_fn_falls_back_with_a_warning():
    model, fn = _problem()

    def broken(thetas):
        raise RuntimeError("no batching here")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        single = run_rays(InPlaceRays(fn, list(model.parameters()), seed=3, preconditioner=None),
                          **SETTINGS)  # fmt: skip
        rays = InPlaceRays(fn, list(model.parameters()), seed=3, preconditioner=None,
                           batch_fn=broken)  # fmt: skip
        with pytest.warns(UserWarning, match="one point at a time"):
            fallback = run_rays(rays, batch_size=4, **SETTINGS)
    torch.testing.assert_close(fallback.estimates, single.estimates, rtol=0, atol=0)


def test_config_light_mode_batches_with_model_batch_size():
    model, _ = _problem()
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(1))
    results = {}
    for b in (1, 5):
        cfg = bv.VolumeConfig(
            model_type="classifier", model=model, inputs=x, n_samples=26, low_memory=True,
            model_batch_size=b, progress=False, seed=2,
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results[b] = bv.VolumeEstimator.from_config(cfg).run()
    torch.testing.assert_close(results[5].n_evals, results[1].n_evals, rtol=0, atol=0)
    torch.testing.assert_close(results[5].estimates, results[1].estimates, rtol=1e-9, atol=1e-6)

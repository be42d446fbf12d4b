import json
import math
import warnings

import pytest
import torch

import basin_volume as bv
from basin_volume.directions import sample_direction


def quad(center, h=1.0):
    return lambda th: 0.5 * (h * (th - center).square()).sum()


C = torch.linspace(-1, 1, 20, dtype=torch.float64)


def run(**kw):
    kw.setdefault("n_samples", 4)
    kw.setdefault("progress", False)
    fn = kw.pop("fn", quad(C))
    center = kw.pop("center", C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        return bv.estimate(fn, center, **kw)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"cutoff": 0.0}, "cutoff"),
        ({"cutoff": -1.0}, "cutoff"),
        ({"cutoff": math.nan}, "cutoff"),
        ({"n_samples": 0}, "n_samples"),
        ({"n_samples": 2.5}, "n_samples"),
        ({"rtol": 0}, "rtol"),
        ({"sigma": -1.0}, "sigma"),
        ({"measure": "lebesgue"}, "measure"),
        ({"preconditioner": torch.ones(19)}, "preconditioner"),
        ({"preconditioner": torch.cat([torch.ones(19), torch.zeros(1)])}, "preconditioner"),
        ({"preconditioner": torch.cat([torch.ones(19), -torch.ones(1)])}, "preconditioner"),
        ({"preconditioner": torch.full((20,), math.nan)}, "preconditioner"),
        ({"center": torch.tensor([0.0, math.nan, 1.0])}, "center"),
        ({"center": torch.tensor([0.0, math.inf, 1.0])}, "center"),
        ({"center": torch.ones(2, 3)}, "center"),
        ({"center": torch.zeros(5, dtype=torch.float64)}, "sigma"),
    ],
)
def test_bad_input_names_the_field(kw, field):
    with pytest.raises((ValueError, TypeError), match=field):
        run(**kw)


def test_zero_center_with_sigma_is_fine():
    res = run(center=torch.zeros(5, dtype=torch.float64), fn=quad(0.0), sigma=1.0)
    assert math.isfinite(res.log_volume)


@pytest.mark.parametrize("bad", [lambda th: th, lambda th: th[:2].sum() * torch.ones(3), "str"])
def test_non_scalar_fn_is_rejected(bad):
    fn = bad if callable(bad) else (lambda th: "x")
    with pytest.raises((ValueError, TypeError), match="scalar"):
        run(fn=fn)


def test_nonfinite_fn_at_center_is_rejected():
    with pytest.raises(ValueError, match="finite"):
        run(fn=lambda th: torch.tensor(math.nan))


def test_result_fields_shapes_and_relations():
    res = run(n_samples=6, preconditioner=torch.linspace(0.5, 2, 20))
    for name in ("estimates", "deltas", "props", "mults", "logabsint", "n_evals"):
        assert getattr(res, name).shape == (6,)
    assert res.estimates.dtype == torch.float64
    radii = res.mults * res.props
    assert torch.all(radii > 0)
    assert torch.all((res.deltas - res.cutoff).abs() <= res.rtol * res.cutoff)
    log_area = bv.integrals.log_sphere_area(20)
    expect = log_area + res.logabsint - 20 * res.props.log()
    torch.testing.assert_close(res.estimates, expect)
    lme = torch.logsumexp(res.estimates, 0).item() - math.log(6)
    assert res.log_volume == pytest.approx(lme, rel=1e-14)
    w = torch.exp(res.estimates - res.estimates.max())
    assert res.ess == pytest.approx((w.sum() ** 2 / (w * w).sum()).item())
    lo, hi = res.interval(0.9)
    assert lo <= res.log_volume + 1e-9 and hi >= lo


def test_directions_depend_only_on_seed_and_index():
    a = sample_direction(7, 50, seed=3).omega
    b = sample_direction(7, 50, seed=3).omega
    c = sample_direction(8, 50, seed=3).omega
    d = sample_direction(7, 50, seed=4).omega
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    assert float(a.norm()) == pytest.approx(1.0, abs=1e-14)
    r1 = run(n_samples=5, seed=11)
    r2 = run(n_samples=5, seed=11)
    assert torch.equal(r1.estimates, r2.estimates)


def test_preconditioner_prop_is_norm_of_scaled_unit_vector():
    p = torch.linspace(0.1, 3.0, 20, dtype=torch.float64)
    pn = p / p.log().mean().exp()
    gen = torch.Generator().manual_seed(bv.directions.direction_seed(0, 2, 0))
    z = torch.randn(20, generator=gen, dtype=torch.float32).double()
    u = z / z.norm()
    d = sample_direction(2, 20, seed=0, preconditioner=bv.preconditioners.DiagonalPreconditioner(p))
    assert d.prop == pytest.approx(float((pn * u).norm()), rel=1e-13)
    torch.testing.assert_close(d.omega, pn * u / (pn * u).norm())


def test_save_load_roundtrip(tmp_path):
    res = run(n_samples=5, measure="uniform")
    path = tmp_path / "r.json"
    res.save(path)
    back = bv.VolumeResult.load(path)
    for name in ("estimates", "deltas", "props", "mults", "logabsint", "n_evals"):
        assert torch.equal(getattr(back, name), getattr(res, name)), name
    assert back.status == res.status and back.dim == res.dim and back.measure == "uniform"
    assert back.log_volume == res.log_volume
    assert math.isnan(back.sigma)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    json.loads(text)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("estimates"),
        lambda d: d.update(format="other"),
        lambda d: d.update(estimates=[1, 2]),
        lambda d: d.update(estimates=["x"] * len(d["status"])),
        lambda d: d.update(dim="20"),
        lambda d: d.update(status=3),
    ],
)
def test_load_rejects_malformed(tmp_path, mutate):
    res = run(n_samples=3)
    data = res.to_dict()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(bv.ResultFileError):
        bv.VolumeResult.load(path)
    path.write_text("{not json")
    with pytest.raises(bv.ResultFileError, match="JSON"):
        bv.VolumeResult.load(path)


def test_low_ess_warns_and_says_lower_bound():
    # a strongly anisotropic quadratic without preconditioning: one direction dominates
    h = torch.logspace(-3, 3, 200, dtype=torch.float64)
    c = torch.ones(200, dtype=torch.float64)
    with pytest.warns(bv.LowESSWarning, match="lower bound"):
        res = bv.estimate(quad(c, h), c, n_samples=30, measure="uniform", progress=False,
                          method="is")
    assert "lower bound" in res.summary()


def test_unbounded_rays_gaussian_finite_uniform_infinite():
    # fn never exceeds the cutoff: every ray is unbounded. Centred at the prior's mean each
    # direction integrates the whole prior, so every estimate is log 1 = 0 exactly.
    c = torch.zeros(4, dtype=torch.float64)
    with pytest.warns(bv.RadiusSearchWarning):
        g = bv.estimate(lambda th: torch.tensor(0.0), c, n_samples=3, sigma=2.0, progress=False)
    assert set(g.status) == {"unbounded"}
    assert g.estimates.abs().max().item() < 1e-12
    c = torch.ones(4, dtype=torch.float64)
    with pytest.warns(bv.RadiusSearchWarning, match="infinite"):
        u = bv.estimate(
            lambda th: torch.tensor(0.0), c, n_samples=3, measure="uniform", progress=False
        )
    assert u.log_volume == math.inf


def test_resume_equals_uninterrupted_and_callback_sees_every_direction():
    h = torch.linspace(0.5, 3.0, 20, dtype=torch.float64)
    fn = lambda th: 0.5 * (h * (th - C).square()).sum() + ((th - C) ** 3).sum()  # noqa: E731
    full = run(fn=fn, n_samples=10, seed=5, rtol=1e-6)
    seen = []
    part = run(fn=fn, n_samples=4, seed=5, rtol=1e-6, callback=seen.append)
    assert [r.index for r in seen] == [0, 1, 2, 3]
    resumed = run(fn=fn, n_samples=10, seed=5, rtol=1e-6, resume_from=part, callback=seen.append)
    assert [r.index for r in seen] == list(range(10))
    assert torch.isfinite(full.slopes).any()
    for name in ("estimates", "deltas", "radii", "n_evals", "slopes"):
        torch.testing.assert_close(
            getattr(full, name), getattr(resumed, name), rtol=0, atol=0, equal_nan=True
        )
    with pytest.raises(ValueError, match="cutoff"):
        run(fn=fn, n_samples=10, seed=5, rtol=1e-6, cutoff=0.5, resume_from=part)


def test_merge_pools_independent_runs():
    a, b = run(n_samples=3, seed=1), run(n_samples=4, seed=2)
    m = bv.VolumeResult.merge([a, b])
    assert m.n_samples == 7
    torch.testing.assert_close(m.estimates, torch.cat([a.estimates, b.estimates]))
    expect = torch.logsumexp(torch.cat([a.estimates, b.estimates]), 0).item() - math.log(7)
    assert m.log_volume == pytest.approx(expect, rel=1e-14)
    assert m.meta["merged_seeds"] == [1, 2]
    with pytest.raises(ValueError, match="seed"):
        bv.VolumeResult.merge([a, a])
    with pytest.raises(ValueError, match="cutoff"):
        bv.VolumeResult.merge([a, run(n_samples=2, seed=3, cutoff=0.5)])
    with pytest.raises(ValueError, match="merged"):
        run(n_samples=9, seed=1, resume_from=m)

"""Faults and bad input: nothing lost, nothing silently wrong."""

import functools
import json
import math
import warnings

import mpmath as mp
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import basin_volume as bv
from basin_volume.integrals import log_radial_integral
from basin_volume.radius import RayStatus, find_radius

# ---------------------------------------------------------------- integrals, property-based


@settings(max_examples=60, deadline=None)
@given(
    n=st.floats(1.0, 1e9),
    beta=st.floats(-30.0, 30.0),
    frac=st.floats(1e-6, 10.0),
)
def test_log_radial_integral_monotone_and_bounded(n, beta, frac):
    peak = (beta + math.sqrt(beta * beta + 4 * n)) / 2
    r = frac * peak
    a, b, full = log_radial_integral([r, r * 1.001, math.inf], n, 1.0, beta)
    assert math.isfinite(a) and math.isfinite(full)
    assert a <= b + 1e-12 * max(1.0, abs(b))
    assert b <= full + 1e-12 * max(1.0, abs(full))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 400), a=st.floats(1e-3, 1e3), x=st.floats(1e-4, 50.0))
def test_log_radial_integral_b0_matches_incomplete_gamma(n, a, x):
    # J(r; n, a, 0) = (1/2) (2/a)^{(n+1)/2} gamma((n+1)/2, a r^2 / 2); pick r from x = a r^2/2
    r = math.sqrt(2 * x / a)
    mp.mp.dps = 40
    s = mp.mpf(n + 1) / 2
    ref = s * mp.log(2 / mp.mpf(a)) - mp.log(2) + mp.log(mp.gammainc(s, 0, mp.mpf(x)))
    got = log_radial_integral(r, n, a, 0.0)
    assert got == pytest.approx(float(ref), rel=1e-12, abs=1e-12)


# ---------------------------------------------------------------- radius search, property-based


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    c=st.floats(1e-6, 1e6),
    power=st.floats(0.5, 6.0),
    guess_exp=st.floats(-8, 8),
    rtol=st.sampled_from([1e-1, 1e-2, 1e-4, 1e-8]),
)
def test_find_radius_on_power_laws(c, power, guess_exp, rtol):
    eps = 1e-2
    root = (eps / c) ** (1 / power)
    seen = {}

    def f(t):
        seen[t] = c * t**power
        return seen[t]

    res = find_radius(f, eps, guess=root * 10**guess_exp, rtol=rtol, max_evals=80)
    assert res.status is RayStatus.CONVERGED
    assert abs(res.delta - eps) <= rtol * eps
    assert seen[res.radius] == res.delta  # the value returned was checked


@settings(max_examples=40, deadline=None)
@given(
    g=st.floats(-2.0, 2.0),
    q=st.floats(1e-3, 1e3),
    cubic=st.floats(0.0, 10.0),
    guess=st.floats(1e-4, 1e2),
)
def test_find_radius_polynomial_rays(g, q, cubic, guess):
    eps = 1e-2
    res = find_radius(
        lambda t: g * t + q * t * t + cubic * t**3, eps, guess=guess, rtol=1e-6, max_evals=80
    )
    assert res.status is RayStatus.CONVERGED
    assert res.delta == pytest.approx(eps, rel=1e-6)


# ---------------------------------------------------------------- per-direction faults


def test_nonfinite_beyond_radius_is_outside_and_run_survives():
    c = torch.zeros(6, dtype=torch.float64)

    def fn(th):
        v = 0.5 * th.square().sum()
        return v if v < 0.05 else torch.tensor(math.nan, dtype=torch.float64)

    res = bv.estimate(fn, c, n_samples=5, cutoff=1e-2, sigma=1.0, rtol=1e-9, progress=False)
    assert set(res.status) == {"converged"}
    torch.testing.assert_close(res.radii, torch.full((5,), math.sqrt(2e-2), dtype=torch.float64))


def test_directions_that_fail_are_kept_and_warned():
    c = torch.zeros(6, dtype=torch.float64)

    def fn(th):  # NaN everywhere off the centre along direction with th[0] > 0
        if float(th.abs().sum()) > 0 and float(th[0]) > 0:
            return torch.tensor(math.nan)
        return 0.5 * th.square().sum()

    with pytest.warns(bv.RadiusSearchWarning, match="nonfinite"):
        res = bv.estimate(fn, c, n_samples=8, sigma=1.0, progress=False, max_evals=10)
    assert res.n_samples == 8
    bad = [i for i, s in enumerate(res.status) if s == "nonfinite"]
    assert bad and all(res.estimates[i] == -math.inf for i in bad)
    assert "not converged" in res.summary()


def test_uniform_unbounded_is_infinite_not_an_error():
    c = torch.ones(3, dtype=torch.float64)
    with pytest.warns(bv.RadiusSearchWarning, match="infinite"):
        res = bv.estimate(
            lambda th: torch.tensor(0.0), c, n_samples=2, measure="uniform", progress=False
        )
    assert res.log_volume == math.inf and set(res.status) == {"unbounded"}


def test_sigma_far_from_parameter_scale_warns():
    c = torch.ones(10, dtype=torch.float64)
    with pytest.warns(UserWarning, match="sigma"):
        bv.estimate(
            lambda th: 0.5 * (th - c).square().sum(), c, n_samples=2, sigma=1e4, progress=False
        )


# ---------------------------------------------------------------- the user's model


class Faulty(nn.Module):
    def __init__(self, exc, after):
        super().__init__()
        self.lin = nn.Linear(5, 4)
        self.norm = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.1)
        self.lin.bias.requires_grad_(False)
        self.calls, self.exc, self.after = 0, exc, after

    def forward(self, x):
        self.calls += 1
        if self.calls > self.after:
            raise self.exc
        return self.drop(self.norm(self.lin(x)))


@pytest.mark.parametrize(
    "exc",
    [RuntimeError("inside the model"), KeyboardInterrupt(), torch.OutOfMemoryError("CUDA oom")],
    ids=["exception", "ctrl-c", "oom"],
)
def test_model_bit_identical_after_fault(exc):
    torch.manual_seed(1)
    model = Faulty(exc, after=6).double()
    model.norm.running_mean.add_(0.3)
    model.train()
    model.drop.eval()  # mixed modes must come back as they were
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    cfg = bv.VolumeConfig(
        model_type="classifier", model=model, inputs=torch.randn(16, 5), n_samples=5, progress=False
    )
    est = bv.VolumeEstimator.from_config(cfg)
    with pytest.raises(type(exc)):
        est.run()
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v) and after[k].dtype == v.dtype, k
        assert after[k].device == v.device
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_classifier_cutoff_above_log_classes_warns():
    model = nn.Linear(3, 2)
    cfg = bv.VolumeConfig(
        model_type="classifier",
        model=model,
        inputs=torch.randn(4, 3),
        cutoff=1.0,
        n_samples=1,
        progress=False,
    )
    with pytest.warns(UserWarning, match="log"):
        bv.VolumeEstimator.from_config(cfg)


# ---------------------------------------------------------------- results files


def _result():
    c = torch.linspace(0.1, 1, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bv.estimate(lambda th: 0.5 * (th - c).square().sum(), c, n_samples=3, progress=False)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from(sorted(_result().to_dict())), value=_json_values)
def test_loader_fuzz_field_values(tmp_path_factory, key, value):
    data = _result().to_dict()
    data[key] = value
    path = tmp_path_factory.mktemp("fuzz") / "r.json"
    path.write_text(json.dumps(data))
    try:
        res = bv.VolumeResult.load(path)
    except bv.ResultFileError as err:
        assert str(err)
    else:
        assert isinstance(res, bv.VolumeResult)


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(0, 2000), junk=st.text(max_size=20))
def test_loader_fuzz_truncated_text(tmp_path_factory, cut, junk):
    text = json.dumps(_result().to_dict())
    path = tmp_path_factory.mktemp("trunc") / "r.json"
    path.write_text(text[:cut] + junk)
    try:
        bv.VolumeResult.load(path)
    except bv.ResultFileError as err:
        assert str(err)


@functools.cache
def _saved_text() -> str:
    return json.dumps(_result().to_dict())


_odd_values = st.sampled_from(
    [math.nan, math.inf, -math.inf, "nan", "inf", "-inf", -1.0, 0.0, -0.0, 1e308, -1e-300]
    + [0.75, 2.5, -5, 0, 1, 2**63, 2**64, 10**400, True, None, "banana", "converged", [], {}]
)
_VALUE_FIELDS = [
    "estimates", "deltas", "props", "mults", "logabsint", "n_evals", "radii", "slopes",
    "status", "dim", "measure", "cutoff", "sigma", "rtol", "seed", "log_volume", "ess",
    "low_ess",
]  # fmt: skip


def _assert_sane(res):
    """What every loaded result must satisfy, whatever the file held."""
    assert res.dim >= 1 and res.measure in ("gaussian", "uniform")
    assert math.isfinite(res.cutoff) and res.cutoff > 0 and 0 < res.rtol <= 0.5
    assert 0 <= res.seed < 2**63
    assert res.measure == "uniform" or (math.isfinite(res.sigma) and res.sigma > 0)
    assert set(res.status) <= {s.value for s in RayStatus}
    assert not bool(torch.isnan(res.estimates).any()) and not math.isnan(res.log_volume)
    assert bool((res.props > 0).all()) and bool(torch.isfinite(res.props).all())
    assert bool((res.radii >= 0).all()) and bool((res.n_evals >= 0).all())
    assert bv.VolumeResult.from_dict(res.to_dict()).status == res.status  # saves and reloads


@settings(max_examples=200, deadline=None)
@given(
    field=st.sampled_from(_VALUE_FIELDS),
    where=st.integers(0, 2),
    value=_odd_values | st.floats() | st.integers(-3, 3),
    scale=st.sampled_from([None, 1 + 1e-6, 0.5, -1.0]),
)
def test_loader_fuzz_mutated_values(tmp_path_factory, field, where, value, scale):
    """Values changed inside a valid file (an array entry or a setting, replaced by an odd
    value or scaled): the loader refuses with ResultFileError, or what it loads is sane."""
    data = json.loads(_saved_text())
    old = data[field][where] if isinstance(data[field], list) else data[field]
    if scale is not None and isinstance(old, int | float) and not isinstance(old, bool):
        value = old * scale
    if isinstance(data[field], list):
        data[field][where] = value
    else:
        data[field] = value
    path = tmp_path_factory.mktemp("values") / "r.json"
    path.write_text(json.dumps(data))  # NaN and Infinity as JSON's non-standard literals
    try:
        res = bv.VolumeResult.load(path)
    except bv.ResultFileError as err:
        assert str(err).startswith(str(path))
    else:
        _assert_sane(res)

"""Preconditioners and adaptive proposals (issue 9).

References are independent of the code under test: closed-form ellipsoid volumes, explicit
loops over a real optimizer's state, per-example autograd loops and autograd Hessians.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import basin_volume as bv
from basin_volume.adaptive import (
    estimate_adaptive,
    parameter_groups,
    resolve_preconditioner,
)
from basin_volume.preconditioners import (
    DensePreconditioner,
    DiagonalPreconditioner,
    OriginStretch,
    Preconditioner,
    adam_preconditioner,
    as_preconditioner,
    fisher_diagonal,
    fisher_matrix,
    fisher_preconditioner,
    prior_eps,
)

CUTOFF = 0.3


def log_ellipsoid_volume(h_eigenvalues: torch.Tensor, cutoff: float) -> float:
    """log vol {x : x^T H x / 2 <= cutoff} = log V_D + D/2 log(2 cutoff) - 1/2 log det H."""
    d = h_eigenvalues.numel()
    log_vd = 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1)
    return log_vd + 0.5 * d * math.log(2 * cutoff) - 0.5 * float(h_eigenvalues.log().sum())


def spectrum(d: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.exp(torch.empty(d, dtype=torch.float64).uniform_(-4, 4, generator=gen))


def rotation(d: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
    return q * torch.sign(torch.diagonal(r))


def quadratic(h_matrix: torch.Tensor):
    return lambda th: 0.5 * th @ (h_matrix @ th)


def uniform_run(fn, d, pre, *, n=12, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        return bv.estimate(
            fn,
            torch.zeros(d, dtype=torch.float64),
            n_samples=n,
            cutoff=CUTOFF,
            measure="uniform",
            preconditioner=pre,
            rtol=1e-10,
            seed=seed,
            progress=False,
        )


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("d", [2, 7, 40])
def test_matching_diagonal_preconditioner_is_exact(d):
    h = spectrum(d)
    truth = log_ellipsoid_volume(h, CUTOFF)
    res = uniform_run(quadratic(torch.diag(h)), d, h.rsqrt())
    assert res.estimates.max() - res.estimates.min() < 1e-8 * max(d, 10)
    assert res.log_volume == pytest.approx(truth, abs=1e-8 * max(d, 10))
    iso = uniform_run(quadratic(torch.diag(h)), d, None)
    assert float(iso.estimates.std()) > 0.1  # the check above is not vacuous


@pytest.mark.parametrize("factor", [1e-7, 3.0, 1e5])
def test_rescaling_the_scales_changes_nothing(factor):
    d = 9
    h = spectrum(d, seed=3)
    scales = h.rsqrt() * torch.linspace(0.5, 2.0, d, dtype=torch.float64)  # not matching
    a = uniform_run(quadratic(torch.diag(h)), d, scales)
    b = uniform_run(quadratic(torch.diag(h)), d, factor * scales)
    torch.testing.assert_close(a.estimates, b.estimates, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(a.props, b.props, rtol=1e-12, atol=0)


@pytest.mark.parametrize("form", ["matrix", "eigh"])
@pytest.mark.parametrize("d", [3, 25])
def test_matching_dense_preconditioner_is_exact(form, d):
    lam = spectrum(d, seed=5)
    q = rotation(d)
    h_matrix = q @ torch.diag(lam) @ q.T
    h_matrix = 0.5 * (h_matrix + h_matrix.T)
    src = h_matrix if form == "matrix" else torch.linalg.eigh(h_matrix)
    pre = DensePreconditioner(src, eps=0.0, exponent=0.5)
    assert isinstance(pre, Preconditioner)
    truth = log_ellipsoid_volume(lam, CUTOFF)
    res = uniform_run(quadratic(h_matrix), d, pre)
    assert res.estimates.max() - res.estimates.min() < 1e-8 * max(d, 10)
    assert res.log_volume == pytest.approx(truth, abs=1e-8 * max(d, 10))
    # the diagonal of a rotated H is not enough: the test can tell the difference
    diag_only = uniform_run(quadratic(h_matrix), d, torch.diagonal(h_matrix).rsqrt())
    assert float(diag_only.estimates.std()) > 1e-3


@pytest.mark.parametrize("with_base", [False, True])
def test_origin_stretch_matching_its_ellipsoid_is_exact(with_base):
    """H = (P P^T)^-1 for P = stretch along c (after diag(b)): every direction is exact."""
    d, s = 12, 40.0
    c = torch.linspace(-1.0, 2.0, d, dtype=torch.float64)
    b = spectrum(d, seed=7).sqrt() if with_base else None
    pre = OriginStretch(c, s, base=b)
    v = c / c.norm()
    stretch = torch.eye(d, dtype=torch.float64) + (s - 1.0) * torch.outer(v, v)
    p_mat = stretch @ (torch.diag(b) if with_base else torch.eye(d, dtype=torch.float64))
    h_matrix = torch.linalg.inv(p_mat @ p_mat.T)
    h_matrix = 0.5 * (h_matrix + h_matrix.T)
    truth = log_ellipsoid_volume(torch.linalg.eigvalsh(h_matrix), CUTOFF)
    res = uniform_run(quadratic(h_matrix), d, pre)
    assert res.estimates.max() - res.estimates.min() < 1e-8 * d
    assert res.log_volume == pytest.approx(truth, abs=1e-8 * d)
    iso = uniform_run(quadratic(h_matrix), d, b)  # without the stretch: not exact
    assert float(iso.estimates.std()) > 0.1
    u = torch.randn(d, dtype=torch.float64)
    norm = math.exp(-float(b.log().mean())) if with_base else 1.0  # base scaled to det 1
    expected = s ** (-1 / d) * norm * (p_mat @ u)  # det P = 1
    torch.testing.assert_close(pre.apply(u), expected, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="stretch"):
        OriginStretch(c, 0.0)
    with pytest.raises(ValueError, match="not all zero"):
        OriginStretch(torch.zeros(d), 2.0)


def test_dense_preconditioner_algebra():
    d = 6
    q = rotation(d, seed=2)
    lam = torch.tensor([0.0, 1e-3, 0.5, 2.0, 9.0, -1.0], dtype=torch.float64)
    pre = DensePreconditioner((lam, q), eps=1e-2, exponent=0.5)
    p = 1.0 / (lam.clamp(min=0).sqrt() + 1e-2)
    p = p / p.log().mean().exp()
    explicit = q @ torch.diag(p) @ q.T
    u = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pre.apply(u), explicit @ u, rtol=1e-12, atol=1e-12)
    assert float(torch.linalg.det(explicit)) == pytest.approx(1.0, rel=1e-10)
    assert float(pre.scales.log().sum()) == pytest.approx(0.0, abs=1e-12)
    same = DensePreconditioner.from_scales(q, 7.0 * p)
    torch.testing.assert_close(same.apply(u), explicit @ u, rtol=1e-12, atol=1e-12)
    assert as_preconditioner(pre, d) is pre


def test_dense_preconditioner_errors():
    with pytest.raises(ValueError, match="symmetric"):
        DensePreconditioner(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="square"):
        DensePreconditioner(torch.ones(2, 3))
    with pytest.raises(ValueError, match="orthonormal"):
        DensePreconditioner((torch.ones(2), torch.ones(2, 2)))
    with pytest.raises(ValueError, match="eps > 0"):
        DensePreconditioner(torch.diag(torch.tensor([0.0, 1.0])), eps=0.0)
    with pytest.raises(ValueError, match="exponent"):
        DensePreconditioner(torch.eye(2), exponent=0.0)
    with pytest.raises(ValueError, match="entries but the centre has"):
        as_preconditioner(DensePreconditioner(torch.eye(3)), 4)


def test_diagonal_preconditioner_still_works():
    pre = DiagonalPreconditioner(torch.tensor([1.0, 4.0, 0.25]))
    torch.testing.assert_close(pre.scales, torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64))
    assert as_preconditioner(None, 3) is None
    assert isinstance(as_preconditioner(torch.ones(3), 3), DiagonalPreconditioner)
    with pytest.raises(ValueError, match="positive"):
        DiagonalPreconditioner(torch.tensor([1.0, 0.0]))


# --------------------------------------------------------------------------- adaptive


def test_adaptive_converges_to_zero_variance_on_an_ellipsoid():
    d = 6
    h = spectrum(d, seed=11)
    truth = log_ellipsoid_volume(h, CUTOFF)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        res = estimate_adaptive(
            quadratic(torch.diag(h)),
            torch.zeros(d, dtype=torch.float64),
            rounds=4,
            n_per_round=16,
            measure="uniform",
            cutoff=CUTOFF,
            rtol=1e-10,
            progress=False,
        )
    rounds = res.meta["adaptive"]["rounds"]
    assert [r["n"] for r in rounds] == [16] * 4
    assert rounds[0]["std"] > 0.5
    assert rounds[-1]["std"] < 1e-4 * rounds[0]["std"]
    assert rounds[-1]["log_volume"] == pytest.approx(truth, abs=1e-6)
    last = res.estimates[-16:]
    assert float((last - truth).abs().max()) < 1e-5
    # the combined estimate is the log-mean-exp of every round's directions
    assert res.n_samples == 64
    assert res.log_volume == pytest.approx(
        float(torch.logsumexp(res.estimates, 0)) - math.log(64), abs=1e-12
    )


def test_adaptive_refines_a_dense_start_in_its_eigenbasis():
    d = 5
    lam = spectrum(d, seed=4)
    q = rotation(d, seed=8)
    h_matrix = q @ torch.diag(lam) @ q.T
    wrong = DensePreconditioner((torch.ones(d, dtype=torch.float64), q), eps=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        res = estimate_adaptive(
            quadratic(h_matrix),
            torch.zeros(d, dtype=torch.float64),
            rounds=3,
            n_per_round=15,
            preconditioner=wrong,
            measure="uniform",
            cutoff=CUTOFF,
            rtol=1e-10,
            progress=False,
        )
    rounds = res.meta["adaptive"]["rounds"]
    assert rounds[-1]["std"] < 1e-4 * rounds[0]["std"]
    assert rounds[-1]["log_volume"] == pytest.approx(log_ellipsoid_volume(lam, CUTOFF), abs=1e-6)


def test_adaptive_cross_entropy_reduces_the_spread():
    d = 4
    h = spectrum(d, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        res = estimate_adaptive(
            quadratic(torch.diag(h)),
            torch.zeros(d, dtype=torch.float64),
            rounds=4,
            n_per_round=100,
            update="cross_entropy",
            measure="uniform",
            cutoff=CUTOFF,
            rtol=1e-10,
            progress=False,
        )
    rounds = res.meta["adaptive"]["rounds"]
    assert rounds[-1]["std"] < 0.3 * rounds[0]["std"]


def test_adaptive_round_zero_is_a_plain_run_and_rounds_differ():
    d = 5
    h = spectrum(d, seed=6)
    fn = quadratic(torch.diag(h))
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        res = estimate_adaptive(
            fn,
            torch.zeros(d, dtype=torch.float64),
            rounds=2,
            n_per_round=5,
            measure="uniform",
            cutoff=CUTOFF,
            seed=3,
            progress=False,
            callback=lambda rec: seen.append(rec.index),
        )
        plain = uniform_run(fn, d, None, n=5, seed=3)
    torch.testing.assert_close(res.estimates[:5], plain.estimates, rtol=0, atol=1e-12)
    assert seen == list(range(10))
    seeds = [r["seed"] for r in res.meta["adaptive"]["rounds"]]
    assert seeds[0] == 3 and seeds[1] != 3
    assert res.seed == 3 and res.meta["preconditioner"] == "adaptive"
    assert [r.index for r in res.records()] == list(range(10))
    loaded = bv.VolumeResult.from_dict(res.to_dict())  # meta is JSON-ready
    assert loaded.meta["adaptive"]["rounds"][1]["seed"] == seeds[1]


@pytest.mark.parametrize("stop", [3, 7, 10])  # inside round 0, inside round 1, between rounds
def test_adaptive_resumed_run_equals_an_uninterrupted_one(stop):
    d = 6
    fn = quadratic(torch.diag(spectrum(d, seed=8)))
    settings = dict(rounds=3, n_per_round=5, groups="coordinate", measure="uniform",
                    cutoff=CUTOFF, rtol=1e-8, seed=2, progress=False)  # fmt: skip
    c = torch.zeros(d, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        full = estimate_adaptive(fn, c, **settings)
        partial = bv.VolumeResult.from_records(
            full.records()[:stop],
            **{k: getattr(full, k) for k in ("dim", "measure", "cutoff", "sigma", "rtol")},
            seed=2,
        )
        calls = []

        def counted(theta):
            calls.append(1)
            return fn(theta)

        resumed = estimate_adaptive(counted, c, resume_from=partial, **settings)
    for name in ("estimates", "radii", "props", "n_evals"):
        assert torch.equal(getattr(resumed, name), getattr(full, name)), name
    assert [r["log_volume"] for r in resumed.meta["adaptive"]["rounds"]] == [
        r["log_volume"] for r in full.meta["adaptive"]["rounds"]
    ]
    redone = int(full.n_evals[stop:].sum())  # only the missing directions are evaluated
    assert len(calls) == redone + 3  # plus fn(centre) once per round
    with pytest.raises(ValueError, match="n_per_round"):
        estimate_adaptive(fn, c, resume_from=full, **{**settings, "n_per_round": 4})
    with pytest.raises(ValueError, match="seed"):
        estimate_adaptive(fn, c, resume_from=partial, **{**settings, "seed": 5})


def test_adaptive_argument_errors():
    c = torch.zeros(4, dtype=torch.float64)
    fn = quadratic(torch.eye(4, dtype=torch.float64))
    with pytest.raises(TypeError, match="n_per_round"):
        estimate_adaptive(fn, c, n_samples=10)
    with pytest.raises(ValueError, match="rounds"):
        estimate_adaptive(fn, c, rounds=0)
    with pytest.raises(ValueError, match="update"):
        estimate_adaptive(fn, c, update="magic")
    with pytest.raises(ValueError, match="groups sizes sum"):
        estimate_adaptive(fn, c, groups=[1, 2])
    with pytest.raises(ValueError, match="groups must be"):
        estimate_adaptive(fn, c, groups="layers")
    with pytest.raises(ValueError, match="cross_entropy"):
        estimate_adaptive(fn, c, update="cross_entropy", n_per_round=3, groups="coordinate")
    assert parameter_groups(nn.Linear(3, 2)) == [6, 2]


# --------------------------------------------------------------------------- Adam


def trained(optimizer_cls=torch.optim.Adam, *, steps=5, model=None, groups=None, **kw):
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = optimizer_cls(groups if groups is not None else model.parameters(), lr=1e-2, **kw)
    x = torch.randn(32, 4)
    y = torch.randint(0, 3, (32,))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def reference_adam(model, opt, key, eps, exponent):
    """Element-by-element loop over the optimizer's state, in model.parameters() order."""
    out = []
    for p in model.parameters():
        m = opt.state[p][key].detach().double().reshape(-1)
        out.extend(1.0 / (abs(float(v)) ** exponent + eps) for v in m)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("optimizer_cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("eps, exponent", [(1e-5, 0.5), (1e-3, 1.0)])
def test_adam_scales_equal_the_formula_in_parameter_order(optimizer_cls, order, eps, exponent):
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    ps = list(model.parameters())
    # the optimizer sees the parameters in a different order than the model lists them
    groups = [{"params": [ps[3], ps[1]]}, {"params": [ps[2], ps[0]], "weight_decay": 0.0}]
    model, opt = trained(optimizer_cls, model=model, groups=groups)
    key = "exp_avg_sq" if order == 2 else "exp_avg"
    ref = reference_adam(model, opt, key, eps, exponent)
    got = adam_preconditioner(opt, model=model, order=order, eps=eps, exponent=exponent)
    assert got.dtype == torch.float64 and got.shape == (sum(p.numel() for p in ps),)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    # state_dict of a plainly built optimizer, aligned by shapes
    model2, opt2 = trained(optimizer_cls)
    ref2 = reference_adam(model2, opt2, key, eps, exponent)
    for source in (opt2, opt2.state_dict()):
        got2 = adam_preconditioner(source, model=model2, order=order, eps=eps, exponent=exponent)
        torch.testing.assert_close(got2, ref2, rtol=1e-12, atol=0)
    # a list of parameters works as well as the module
    got3 = adam_preconditioner(opt2.state_dict(), model=list(model2.parameters()), order=order)
    torch.testing.assert_close(got3, reference_adam(model2, opt2, key, 1e-5, 0.5))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 7)
        self.norm = nn.LayerNorm(7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(self.norm(self.proj(x)))


def trainer_style_optimizer(model):
    """The two parameter groups Hugging Face Trainer builds: decay, then no decay."""
    no_decay = [n for n, _ in model.named_parameters() if "bias" in n or n.startswith("norm.")]
    return [
        {"params": [p for n, p in model.named_parameters() if n not in no_decay]},
        {"params": [p for n, p in model.named_parameters() if n in no_decay], "weight_decay": 0},
    ]


def test_adam_from_a_trainer_checkpoint_folder(tmp_path):
    model = Block()
    model, opt = trained(torch.optim.AdamW, model=model, groups=trainer_style_optimizer(model))
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    for order, key in ((2, "exp_avg_sq"), (1, "exp_avg")):
        ref = reference_adam(model, opt, key, 1e-5, 0.5)
        torch.testing.assert_close(
            adam_preconditioner(folder, model=model, order=order), ref, rtol=1e-12, atol=0
        )
        torch.testing.assert_close(
            adam_preconditioner(str(folder / "optimizer.pt"), model=model, order=order), ref
        )
    with pytest.raises(FileNotFoundError, match="optimizer.pt"):
        adam_preconditioner(tmp_path, model=model)


def test_adam_state_dict_with_parameter_names():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    try:
        opt = torch.optim.Adam(list(reversed(list(model.named_parameters()))), lr=1e-2)
    except (TypeError, ValueError):
        pytest.skip("this torch cannot build optimizers from named parameters")
    x = torch.randn(8, 3)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    ref = reference_adam(model, opt, "exp_avg_sq", 1e-5, 0.5)
    torch.testing.assert_close(adam_preconditioner(opt.state_dict(), model=model), ref)


class Ambiguous(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))
        self.bias = nn.Parameter(torch.randn(3))
        self.v = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return x * self.w + self.bias * self.v


def test_adam_ambiguous_order_asks_for_param_names():
    model = Ambiguous()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(3)).square().sum().backward()
        opt.step()
    with pytest.raises(ValueError, match="param_names"):
        adam_preconditioner(opt.state_dict(), model=model)
    got = adam_preconditioner(opt.state_dict(), model=model, param_names=["w", "bias", "v"])
    torch.testing.assert_close(got, reference_adam(model, opt, "exp_avg_sq", 1e-5, 0.5))


def test_adam_errors_for_mismatched_state():
    model, opt = trained()
    with pytest.raises(ValueError, match="model is required"):
        adam_preconditioner(opt.state_dict())
    other = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    with pytest.raises(ValueError, match="does not match the model"):
        adam_preconditioner(opt.state_dict(), model=other)
    with pytest.raises(ValueError, match="not optimised by this optimizer"):
        adam_preconditioner(opt, model=other)
    bigger = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.Linear(3, 3))
    with pytest.raises(ValueError, match="state has 4 parameters, the model 6"):
        adam_preconditioner(opt.state_dict(), model=bigger)
    fresh = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="step"):
        adam_preconditioner(fresh, model=model)
    with pytest.raises(ValueError, match="step"):
        adam_preconditioner(fresh.state_dict(), model=model)
    partial = torch.optim.Adam(list(model.parameters())[:2])
    partial.state.update({p: opt.state[p] for p in list(model.parameters())[:2]})
    with pytest.raises(ValueError, match="'2.weight'"):
        adam_preconditioner(partial, model=model)
    with pytest.raises(ValueError, match="order"):
        adam_preconditioner(opt, model=model, order=3)
    with pytest.raises(TypeError, match="state_dict"):
        adam_preconditioner({"nope": 1}, model=model)
    with pytest.raises(ValueError, match="no 'exp_avg_sq'"):
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.randn(2, 4)).sum().backward()
        sgd.step()
        adam_preconditioner(sgd, model=model)


# --------------------------------------------------------------------------- Fisher


def small_classifier(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.GELU(), nn.Linear(5, 4)).to(dtype)
    x = torch.randn(13, 3, dtype=dtype)
    return model, x


def brute_force_fisher_diagonal(model, x):
    """sum_x sum_c p_c(x) (d log p_c(x) / d theta)^2 / N, one autograd call per (x, c)."""
    params = list(model.parameters())
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    for i in range(len(x)):
        logp = torch.log_softmax(model(x[i : i + 1])[0], -1)
        for c in range(logp.numel()):
            g = torch.autograd.grad(logp[c], params, retain_graph=True)
            flat = torch.cat([t.reshape(-1) for t in g]).double()
            total += logp[c].exp().item() * flat.square()
    return total / len(x)


def test_fisher_diagonal_matches_a_per_example_autograd_loop():
    model, x = small_classifier()
    ref = brute_force_fisher_diagonal(model, x)
    torch.testing.assert_close(fisher_diagonal(model, x, labels="full"), ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(
        fisher_diagonal(model, x, labels="full", batch_size=4), ref, rtol=1e-10, atol=0
    )
    sampled = fisher_diagonal(model, x, labels="sampled", n_samples=3000, seed=1)
    assert float((sampled - ref).abs().max() / ref.max()) < 0.05
    again = fisher_diagonal(model, x, labels="sampled", n_samples=3000, seed=1)
    torch.testing.assert_close(sampled, again, rtol=0, atol=0)
    scales = fisher_preconditioner(model, x, eps=1e-3, exponent=0.5, labels="full")
    torch.testing.assert_close(scales, 1.0 / (ref.sqrt() + 1e-3), rtol=1e-9, atol=0)


def test_fisher_matrix_is_the_hessian_of_the_kl_basin():
    model, x = small_classifier()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    center = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ref_logp = torch.log_softmax(model(x), -1).detach()

    def mean_kl(theta):
        chunks = theta.split([math.prod(s) for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        logp = torch.log_softmax(torch.func.functional_call(model, params, (x,)), -1)
        return (ref_logp.exp() * (ref_logp - logp)).sum() / len(x)

    hess = torch.autograd.functional.hessian(mean_kl, center)
    torch.testing.assert_close(fisher_matrix(model, x), hess, rtol=1e-8, atol=1e-12)


def test_fisher_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 3))
    model.train()
    model(torch.randn(8, 3))  # give BatchNorm running statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fisher_diagonal(model, torch.randn(10, 3), labels="sampled", seed=0)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fisher_errors():
    model, x = small_classifier()
    with pytest.raises(ValueError, match="labels"):
        fisher_diagonal(model, x, labels="some")
    with pytest.raises(ValueError, match="non-empty"):
        fisher_diagonal(model, x[:0])
    with pytest.raises(ValueError, match="max_dim"):
        fisher_matrix(model, x, max_dim=10)

    class Sequence3D(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x):
            return self.lin(x).unsqueeze(1)

    with pytest.raises(ValueError, match="classifier"):
        fisher_diagonal(Sequence3D().double(), x)
    with pytest.raises(ValueError, match="eps"):
        fisher_preconditioner(model, x, eps=-1.0)


def test_dense_fisher_preconditioner_runs_through_estimate():
    model, x = small_classifier()
    d = sum(p.numel() for p in model.parameters())
    pre = DensePreconditioner(fisher_matrix(model, x), eps=1e-3)
    res = uniform_run(quadratic(torch.eye(d, dtype=torch.float64)), d, pre, n=3)
    assert res.n_samples == 3 and bool(torch.isfinite(res.estimates).all())


class TinyCausalLM(nn.Module):
    """Embeddings, a causal running mean, a tanh layer and a head: logits [B, T, V]."""

    def __init__(self, vocab=5, width=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids).cumsum(1) / torch.arange(1, input_ids.shape[1] + 1)[:, None]
        return self.head(torch.tanh(self.mix(h)))


def tiny_causal_objective():
    from basin_volume.causal import CausalLMKL

    torch.manual_seed(0)
    model = TinyCausalLM().double()
    ids = torch.tensor([[1, 4, 0, 2, 3], [2, 2, 1, 0, 0], [0, 3, 4, 1, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    return model, ids, mask, CausalLMKL(model, ids, mask, batch_size=2, cache_mode="cpu")


def test_causal_lm_fisher_is_the_hessian_diagonal_of_the_token_kl():
    model, ids, mask, objective = tiny_causal_objective()
    params = list(model.parameters())
    exact = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    for row in range(len(ids)):  # sum over real positions and classes of p_c (d log p_c)^2
        width = int(mask[row].sum())
        logp = torch.log_softmax(model(ids[row : row + 1, :width])[0], -1)
        for i in range(width):
            for c in range(logp.shape[-1]):
                g = torch.autograd.grad(logp[i, c], params, retain_graph=True)
                exact += logp[i, c].exp().item() * torch.cat([t.reshape(-1) for t in g]) ** 2
    exact /= int(mask.sum())
    # The exact Fisher is the curvature of the objective itself: 2 delta(e_j h) / h^2.
    center, h = objective.center, 1e-4
    for j in (0, 7, 20, len(center) - 1):
        step = torch.zeros_like(center)
        step[j] = h
        assert 2 * float(objective(center + step)) / h**2 == pytest.approx(
            float(exact[j]), rel=1e-3, abs=1e-9
        )
    before = [p.detach().clone() for p in params]
    sampled = fisher_preconditioner(model, objective, eps=0.0, labels="sampled", n_samples=3000)
    est = 1.0 / sampled.square()
    assert float((est - exact).norm() / exact.norm()) < 0.05
    assert all(torch.equal(p, b) and p.grad is None for p, b in zip(params, before, strict=True))
    torch.testing.assert_close(
        objective.fisher_diagonal(n_samples=50, seed=3),
        objective.fisher_diagonal(n_samples=50, seed=3),
        rtol=0,
        atol=0,
    )
    with pytest.raises(ValueError, match="sampled"):
        fisher_diagonal(model, objective, labels="full")


# --------------------------------------------------------------------------- resolve


def test_prior_eps_formula():
    assert prior_eps(1e-2, 0.2, 1000) == pytest.approx(math.sqrt(2e-2 / (0.04 * 1000)))
    assert prior_eps(1e-2, 0.2, 1000, exponent=1.0) == pytest.approx(2e-2 / (0.04 * 1000))
    with pytest.raises(ValueError, match="sigma"):
        prior_eps(1e-2, 0.0, 10)


def test_resolve_preconditioner():
    model, x = small_classifier()
    assert resolve_preconditioner(None) is None
    assert resolve_preconditioner("none", model=model) is None
    assert resolve_preconditioner("adaptive", model=model) is None
    t = torch.ones(44)
    assert resolve_preconditioner(t) is t
    with pytest.raises(ValueError, match="'fisher_dense'"):
        resolve_preconditioner("hessian", model=model)
    with pytest.raises(ValueError, match="optimizer"):
        resolve_preconditioner("adam", model=model)
    with pytest.raises(ValueError, match="inputs"):
        resolve_preconditioner("fisher", model=model, cutoff=1e-2)
    with pytest.raises(ValueError, match="cutoff"):
        resolve_preconditioner("fisher", model=model, inputs=x)
    center = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    sigma = float(center.norm()) / math.sqrt(center.numel())
    eta = prior_eps(1e-2, sigma, center.numel())
    got = resolve_preconditioner("fisher", model=model, inputs=x, cutoff=1e-2)
    ref = brute_force_fisher_diagonal(model, x)
    torch.testing.assert_close(got, 1.0 / (ref.sqrt() + eta), rtol=1e-9, atol=0)
    dense = resolve_preconditioner("fisher_dense", model=model, inputs=x, eps=1e-3)
    assert isinstance(dense, DensePreconditioner) and dense.dim == center.numel()
    m2, opt = trained()
    scales = resolve_preconditioner("adam", model=m2, optimizer=opt, adam_order=1)
    torch.testing.assert_close(scales, reference_adam(m2, opt, "exp_avg", 1e-5, 0.5))


# --------------------------------------------------------------------------- VolumeConfig


def classifier_config(model, x, **changes):
    settings = dict(model_type="classifier", model=model, inputs=x, n_samples=4, cutoff=0.05)
    return bv.VolumeConfig(**{**settings, "progress": False, **changes})


@pytest.mark.filterwarnings("ignore::basin_volume.LowESSWarning")
def test_config_fisher_uses_the_prior_eps_and_equals_the_function_call():
    model, x = small_classifier()
    est = bv.VolumeEstimator.from_config(
        classifier_config(model, x, preconditioner_type="fisher", sigma=0.5)
    )
    dim = sum(p.numel() for p in model.parameters())
    ref_scales = fisher_preconditioner(model, x, eps=prior_eps(0.05, 0.5, dim))
    torch.testing.assert_close(est.preconditioner, ref_scales, rtol=0, atol=0)
    got = est.run()
    fn = est.fn
    ref = bv.estimate(fn, fn.center, n_samples=4, cutoff=0.05, sigma=0.5,
                      preconditioner=ref_scales, progress=False)  # fmt: skip
    torch.testing.assert_close(got.estimates, ref.estimates, rtol=0, atol=0)
    assert got.meta["config"]["preconditioner_type"] == "fisher"


def test_config_adam_takes_the_optimizer_and_its_settings(digits_run):
    model, opt = digits_run.model, digits_run.optimizer
    cfg = classifier_config(model, digits_run.train_inputs[:64], preconditioner_type="adam",
                            optimizer=opt.state_dict(), adam_order=1, preconditioner_eps=1e-3,
                            preconditioner_exponent=1.0)  # fmt: skip
    scales = bv.VolumeEstimator.from_config(cfg).preconditioner
    ref = adam_preconditioner(opt, model=model, order=1, eps=1e-3, exponent=1.0)
    torch.testing.assert_close(scales, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="optimizer"):
        bv.VolumeEstimator.from_config(cfg.replace(optimizer=None)).preconditioner  # noqa: B018


def test_config_adaptive_runs_rounds_and_validates():
    model, x = small_classifier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        cfg = classifier_config(model, x, preconditioner_type="adaptive", n_samples=6,
                                adaptive_rounds=2)  # fmt: skip
        res = bv.VolumeEstimator.from_config(cfg).run()
    assert res.n_samples == 6 and len(res.meta["adaptive"]["rounds"]) == 2
    assert bool(torch.isfinite(res.estimates).all())
    with pytest.raises(ValueError, match="multiple"):
        classifier_config(model, x, preconditioner_type="adaptive", n_samples=5)
    with pytest.raises(ValueError, match="low_memory"):
        bv.VolumeEstimator.from_config(cfg.replace(low_memory=True)).run()
    with pytest.raises(ValueError, match="preconditioner_type must be"):
        classifier_config(model, x, preconditioner_type="hessian")
    with pytest.raises(ValueError, match="not both"):
        classifier_config(model, x, preconditioner_type="fisher", preconditioner=torch.ones(44))
    with pytest.raises(ValueError, match="adaptive_rounds"):
        classifier_config(model, x, adaptive_rounds=0)

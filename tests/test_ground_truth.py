"""The ground-truth problem library (benchmarks/problems.py) against independent references.

Every truth is compared with something computed another way: mpmath special functions,
a different series or quadrature, or brute-force Monte Carlo of the problem's own ``fn``.
Monte Carlo comparisons allow 4.5 standard errors (a false alarm about once in 10^5 runs).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import problems as P  # noqa: E402

mp = pytest.importorskip("mpmath")

Z = 4.5  # standard errors allowed in Monte Carlo comparisons


def mc_log_fraction(hits: int, n: int) -> tuple[float, float]:
    p = hits / n
    return math.log(p), math.sqrt((1 - p) / (n * p))


def assert_mc(truth: float, hits: int, n: int):
    est, se = mc_log_fraction(hits, n)
    assert abs(est - truth) < Z * se, f"Monte Carlo {est:.5f} +- {se:.5f} vs truth {truth:.5f}"


# ------------------------------------------------------------------------------ closed forms


@pytest.mark.parametrize("dim", [1, 2, 3, 7, 1000, 10**5, 10**7])
def test_log_unit_ball_volume_matches_mpmath(dim):
    with mp.workdps(40):
        ref = mp.log(mp.pi ** (mp.mpf(dim) / 2) / mp.gamma(mp.mpf(dim) / 2 + 1))
    assert P.log_unit_ball_volume(dim) == pytest.approx(float(ref), rel=1e-13, abs=1e-13)


def test_log_ellipsoid_volume_matches_mpmath():
    rng = np.random.default_rng(0)
    h = 10 ** rng.uniform(-6, 6, 300)
    eps = 0.37
    with mp.workdps(50):
        vol = mp.pi**150 / mp.factorial(150)  # V_300
        for hi in h:
            vol *= mp.sqrt(2 * mp.mpf(eps) / mp.mpf(float(hi)))  # semi-axis
        ref = float(mp.log(vol))
    assert P.log_ellipsoid_volume(h, eps) == pytest.approx(ref, rel=1e-13)


@pytest.mark.parametrize("rotated", [False, True])
def test_uniform_ellipsoid_problem_vs_monte_carlo(rotated):
    """Volume of {fn <= cutoff} by uniform sampling in the box around the ellipsoid's
    principal axes, which are found from fn's own Hessian (not from the constructor)."""
    p = P.ellipsoid_uniform("t", 7, dim=3, rotated=rotated)
    hess = torch.func.hessian(p.fn)(p.center)
    evals, vecs = torch.linalg.eigh(hess)
    half = (2 * p.cutoff / evals).sqrt()  # the semi-axes
    n = 400_000
    gen = torch.Generator().manual_seed(1)
    y = (2 * torch.rand(n, 3, generator=gen, dtype=torch.float64) - 1) * half
    theta = p.center + y @ vecs.T
    hits = int((torch.func.vmap(p.fn)(theta) <= p.cutoff).sum())
    log_box = float(torch.log(2 * half).sum())
    est, se = mc_log_fraction(hits, n)
    assert abs(est + log_box - p.truth) < Z * se


# ------------------------------------------------------------------- generalised chi-square

NCX2_CASES = [
    # (dof, noncentrality, x): deep lower tails at large D, small D, around and above the mean
    (1, 0.0, 0.3),
    (1, 2.5, 0.01),
    (2, 0.0, 1.0),
    (3, 7.0, 30.0),
    (5, 1.0, 3.0),
    (5, 50.0, 1.0),
    (50, 0.0, 500.0),
    (200, 40.0, 20.0),
    (1000, 0.0, 100.0),
    (1000, 1000.0, 50.0),
    (1000, 500.0, 1600.0),
]


@pytest.mark.parametrize("dof,nc,x", NCX2_CASES)
def test_gchisq_matches_noncentral_chi_square(dof, nc, x):
    """Isotropic case: the Laplace inversion against the Poisson mixture of incomplete
    gammas (mpmath), with the noncentrality spread unevenly over the coordinates."""
    rng = np.random.default_rng(dof)
    w = rng.uniform(0.1, 1.0, dof)
    mu2 = nc * w / w.sum()
    h = 0.7
    got = P.gchisq_logcdf(np.full(dof, h), mu2, h * x)
    ref = P.ncx2_logcdf_mpmath(dof, nc, x)
    assert got == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_gchisq_central_matches_incomplete_gamma():
    """theta0 = 0: P is the regularised lower incomplete gamma P(D/2, x/2), to -1e5 nats."""
    for dim, x in [(2, 0.5), (30, 1.0), (10_000, 10.0)]:
        with mp.workdps(30):
            ref = float(mp.log(mp.gammainc(mp.mpf(dim) / 2, 0, mp.mpf(x) / 2, regularized=True)))
        got = P.gchisq_logcdf(np.ones(dim), np.zeros(dim), x)
        assert got == pytest.approx(ref, rel=1e-10)


def test_gchisq_two_groups_matches_convolution():
    """Two distinct eigenvalues: Pr(l1 X1 + l2 X2 <= c) for independent noncentral
    chi-squares X1 (k1 dof) and X2 (k2 dof) as a one-dimensional mpmath integral of the
    density of X1 against the CDF of X2, deep in the tail (log P ~ -30)."""
    k1, k2, nc1, nc2, l1, l2, c = 6, 10, 3.0, 8.0, 2.0, 0.25, 0.8
    rng = np.random.default_rng(3)
    w1, w2 = rng.uniform(0.2, 1, k1), rng.uniform(0.2, 1, k2)
    lam = np.concatenate([np.full(k1, l1), np.full(k2, l2)])
    mu2 = np.concatenate([nc1 * w1 / w1.sum(), nc2 * w2 / w2.sum()])
    got = P.gchisq_logcdf(lam, mu2, c)
    with mp.workdps(30):

        def pois(j, nc):
            return mp.exp(-mp.mpf(nc) / 2) * (mp.mpf(nc) / 2) ** j / mp.factorial(j)

        def pdf1(x):
            return mp.fsum(
                pois(j, nc1)
                * x ** (mp.mpf(k1) / 2 + j - 1)
                * mp.exp(-x / 2)
                / (2 ** (mp.mpf(k1) / 2 + j) * mp.gamma(mp.mpf(k1) / 2 + j))
                for j in range(40)
            )

        def cdf2(y):
            return mp.fsum(
                pois(j, nc2) * mp.gammainc(mp.mpf(k2) / 2 + j, 0, y / 2, regularized=True)
                for j in range(40)
            )

        ref = mp.quad(lambda x: pdf1(x) * cdf2((c - l1 * x) / l2), [0, c / l1 / 2, c / l1])
        ref = float(mp.log(ref))
    assert ref < -10
    assert got == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("dim", [2, 3, 4, 5])
def test_gchisq_vs_monte_carlo(dim):
    rng = np.random.default_rng(10 + dim)
    lam = 10 ** rng.uniform(-1.5, 0.5, dim)
    mu = rng.normal(size=dim)
    c = 0.5 * float(np.sum(lam * (1 + mu**2)))
    n = 1_000_000
    z = np.random.default_rng(dim).normal(size=(n, dim))
    hits = int((((z + mu) ** 2) @ lam <= c).sum())
    assert_mc(P.gchisq_logcdf(lam, mu**2, c), hits, n)


def test_gchisq_upper_side_and_flat_directions():
    """Above the mean (the contour left of the pole) and with lam = 0 entries."""
    lam = np.array([0.0, 2e-6, 0.0])
    nc = np.array([0.3, 1.88, 5.0])
    for c in (1e-6, 1e-5, 1e-4):
        ref = P.ncx2_logcdf_mpmath(1, 1.88, c / 2e-6)
        assert P.gchisq_logcdf(lam, nc, c) == pytest.approx(ref, rel=1e-9, abs=1e-15)
    assert P.gchisq_logcdf(np.zeros(4), np.ones(4), 1.0) == 0.0


@pytest.mark.slow
def test_gchisq_float64_matches_mpmath_inversion():
    rng = np.random.default_rng(5)
    lam = 10 ** rng.uniform(-1, 2, 40)
    nc = rng.uniform(0, 4, 40)
    c = 0.05 * float(np.sum(lam * (1 + nc)))
    got = P.gchisq_logcdf(lam, nc, c)
    ref = P.gchisq_logcdf_mpmath(lam, nc, c, dps=20)
    assert got < -10
    assert got == pytest.approx(ref, rel=1e-11)


def test_quadratic_gaussian_pipeline_matches_noncentral_chi_square():
    """The mapping problem -> (lam, nc, c) with a rotation, isotropic h: at D = 200 the
    probability is a noncentral chi-square CDF deep in its tail."""
    rng = np.random.default_rng(8)
    dim, h, sigma, eps = 200, 3.0, 0.7, 0.05
    center = rng.normal(size=dim)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    got = P.quadratic_gaussian_logprob(np.full(dim, h), center, sigma, eps, q)
    ref = P.ncx2_logcdf_mpmath(dim, float(center @ center) / sigma**2, 2 * eps / (h * sigma**2))
    assert ref < -100
    assert got == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize(
    "name",
    [
        "ellipsoid-gaussian-d200",
        "ellipsoid-gaussian-d200-sigma0.1",
        "ellipsoid-rotated-singular-gaussian-d200",
        "ellipsoid-rotated-uniform-d200",
        "ellipsoid-uniform-d1000",
    ],
)
def test_quadratic_truth_from_the_fn_hessian(name):
    """Rebuild each quadratic problem's truth from its fn alone: the Hessian by autograd
    (exact for a quadratic), its eigenvalues and eigenvectors, then the same formulas."""
    p = P.get(name)
    assert float(torch.func.grad(p.fn)(p.center).abs().max()) < 1e-12  # minimum at theta0
    hess = torch.func.hessian(p.fn)(p.center)
    h, vecs = torch.linalg.eigh(hess)
    h = h.clamp(min=0).numpy()
    if p.measure == "uniform":
        assert P.log_ellipsoid_volume(h, p.cutoff) == pytest.approx(p.truth, rel=1e-10)
    else:
        h[h < 1e-12 * h.max()] = 0.0
        shifted = (vecs.T @ p.center).numpy()
        got = P.gchisq_logcdf(h * p.sigma**2, (shifted / p.sigma) ** 2, 2 * p.cutoff)
        assert got == pytest.approx(p.truth, rel=1e-9)


@pytest.mark.parametrize(
    "dim,seed,kwargs",
    [
        (2, 0, {}),
        (3, 0, {}),
        (4, 0, {}),
        (5, 7, {}),
        (3, 6, {"rotated": True, "singular": 0.4}),
        (4, 0, {"rotated": True}),
        (3, 0, {"sigma_factor": 0.5}),
    ],
)
def test_gaussian_ellipsoid_problem_vs_monte_carlo(dim, seed, kwargs):
    """The family's constructor at small D: prior draws through the problem's own fn."""
    p = P.ellipsoid_gaussian("t", seed, dim=dim, **kwargs)
    assert p.truth > -7  # the smallest semi-axis is 0.01 sigma: P is a few e-3
    n = 2_000_000
    gen = torch.Generator().manual_seed(dim)
    theta = p.sigma * torch.randn(n, dim, generator=gen, dtype=torch.float64)
    hits = int((torch.func.vmap(p.fn)(theta) <= p.cutoff).sum())
    assert_mc(p.truth, hits, n)


# ------------------------------------------------------------------------------ products


@pytest.fixture(scope="module")
def blocks():
    return P.make_blocks(50, P.PRODUCT_CUTOFF, np.random.default_rng(0))


def test_blocks_are_star_shaped_and_radius_is_the_boundary(blocks):
    phi = np.linspace(0, 2 * np.pi, 97)
    r = blocks.radius(phi, P.PRODUCT_CUTOFF)  # [B, 97]
    u = np.stack([np.cos(phi), np.sin(phi)], axis=-1)  # [97, 2]
    t = np.linspace(0, 1.5, 301)
    # x[t, phi, b, :] = t r_b(phi) u(phi)
    x = t[:, None, None, None] * r.T[None, :, :, None] * u[None, :, None, :]
    d = blocks.deltas(x)  # [t, phi, B]
    assert np.all(np.diff(d, axis=0) > 0)  # strictly increasing along every ray
    at_r = d[200]  # t = 1
    np.testing.assert_allclose(at_r, P.PRODUCT_CUTOFF, rtol=1e-12)


def test_block_mass_vs_mpmath_closed_form_radial_integral(blocks):
    """One block's prior mass with the radial integral in closed form (error functions) and
    the angle integral by mpmath's tanh-sinh, against the trapezoid x Gauss-Legendre sum."""
    b, sigma = 11, 1.0
    sub = P.Blocks(*(np.asarray(v)[b : b + 1] for v in _fields(blocks)))
    c = blocks.center[b]
    with mp.workdps(20):
        s = mp.mpf(sigma)

        def inner(phi):
            r = mp.mpf(float(sub.radius(np.array([float(phi)]), P.PRODUCT_CUTOFF)[0, 0]))
            beta = (c[0] * mp.cos(phi) + c[1] * mp.sin(phi)) / s  # |c + t u|^2 = ...
            rho = r / s
            alpha2 = (c[0] ** 2 + c[1] ** 2) / s**2
            # int_0^rho tau exp(-(tau + beta)^2/2) dtau, times exp(-(alpha2 - beta^2)/2)
            val = (mp.exp(-(beta**2) / 2) - mp.exp(-((rho + beta) ** 2) / 2)) - beta * mp.sqrt(
                mp.pi / 2
            ) * (mp.erf((rho + beta) / mp.sqrt(2)) - mp.erf(beta / mp.sqrt(2)))
            return val * mp.exp(-(alpha2 - beta**2) / 2)

        ref = mp.quad(inner, mp.linspace(0, 2 * mp.pi, 9)) / (2 * mp.pi)
    got = float(sub.log_masses(sigma, P.PRODUCT_CUTOFF)[0])
    assert got == pytest.approx(float(mp.log(ref)), abs=1e-9)


def _fields(blocks):
    return (blocks.center, blocks.angle, blocks.k1, blocks.k2, blocks.g, blocks.q)


def test_block_masses_and_areas_vs_monte_carlo(blocks):
    sigma, n = 1.0, 600_000
    lm = blocks.log_masses(sigma, P.PRODUCT_CUTOFF)
    la = blocks.log_areas(P.PRODUCT_CUTOFF)
    rng = np.random.default_rng(4)
    r_max = blocks.radius(np.linspace(0, 2 * np.pi, 721), P.PRODUCT_CUTOFF).max(axis=1)
    for b in np.argsort(lm)[-3:]:
        sub = P.Blocks(*(np.asarray(v)[b : b + 1] for v in _fields(blocks)))
        x = rng.normal(size=(n, 1, 2)) * sigma - blocks.center[b]
        assert_mc(float(lm[b]), int((sub.deltas(x) <= P.PRODUCT_CUTOFF).sum()), n)
        half = 1.05 * r_max[b]  # the box [-half, half]^2 contains the block's basin
        x = rng.uniform(-half, half, size=(n, 1, 2))
        hits = int((sub.deltas(x) <= P.PRODUCT_CUTOFF).sum())
        est, se = mc_log_fraction(hits, n)
        assert abs(est + 2 * math.log(2 * half) - float(la[b])) < Z * se


def test_product_problem_vs_monte_carlo():
    """A 2-block product (D = 4) through the problem's own fn (max over blocks)."""
    p = P.product("t", 0, n_blocks=2)
    assert p.truth > -4.5
    n = 1_000_000
    gen = torch.Generator().manual_seed(2)
    theta = p.sigma * torch.randn(n, 4, generator=gen, dtype=torch.float64)
    hits = int((torch.func.vmap(p.fn)(theta) <= p.cutoff).sum())
    assert_mc(p.truth, hits, n)


def test_product_fn_is_the_max_over_blocks():
    rng = np.random.default_rng(9)
    blocks = P.make_blocks(30, P.PRODUCT_CUTOFF, rng)
    fn = P.product_fn(blocks)
    x = 0.1 * rng.normal(size=(5, 30, 2))
    want = blocks.deltas(x).max(axis=1)
    theta = torch.from_numpy(blocks.center[None] + x).reshape(5, -1)
    np.testing.assert_allclose(torch.func.vmap(fn)(theta).numpy(), want, rtol=1e-12)


# -------------------------------------------------------------------------- whole space


def test_whole_space_fn_is_zero_everywhere():
    p = P.get("whole-space-d1000")
    f64 = {"dtype": torch.float64}
    pts = torch.stack(
        [
            p.center,
            torch.zeros(1000, **f64),
            torch.full((1000,), 1e300, **f64),
            torch.full((1000,), -math.inf, **f64),
        ]
    )
    assert torch.equal(torch.func.vmap(p.fn)(pts), torch.zeros(4, dtype=torch.float64))
    assert torch.equal(torch.func.grad(p.fn)(p.center), torch.zeros(1000, dtype=torch.float64))
    theta = p.center.clone().requires_grad_(True)
    p.fn(theta).backward()
    assert torch.equal(theta.grad, torch.zeros(1000, dtype=torch.float64))
    assert p.truth == 0.0 and p.measure == "gaussian"


# ------------------------------------------------------------------------ exact proposals


@pytest.mark.parametrize("name", ["exact-proposal-ellipsoid-d10000"])
def test_exact_proposal_gives_the_truth_in_every_direction(name):
    """log V_D + D log r(omega) - D log |P u| (P normalised to det 1) is the truth for every
    u: the radius from fn alone (fn is quadratic: r = sqrt(cutoff / fn(theta0 + omega)))."""
    p = P.get(name)
    dim = p.dim
    pre = p.preconditioner / torch.exp(torch.log(p.preconditioner).mean())
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        u = torch.randn(dim, generator=gen, dtype=torch.float64)
        u = u / u.norm()
        pu = pre * u
        omega = pu / pu.norm()
        r = math.sqrt(p.cutoff / float(p.fn(p.center + omega)))
        ell = P.log_unit_ball_volume(dim) + dim * math.log(r) - dim * math.log(float(pu.norm()))
        assert ell == pytest.approx(p.truth, rel=1e-11)


# --------------------------------------------------------------------------------- networks


def test_mlp_forward_matches_torch_modules():
    """The flat-parameter MLP (used by the network problems) against nn.Sequential."""
    sizes = (3, 6, 4)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.GELU(), torch.nn.Linear(6, 4))
    net = net.double()
    theta = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    assert theta.numel() == P.n_params(sizes) == 52
    x = torch.randn(20, 3, dtype=torch.float64)
    want = torch.log_softmax(net(x), -1).detach()
    torch.testing.assert_close(P.mlp_forward(theta, x, sizes), want)
    # and the KL: against torch's kl_div at a perturbed point
    other = theta + 0.3 * torch.randn(52, dtype=torch.float64)
    torch.nn.utils.vector_to_parameters(other, net.parameters())
    logq = torch.log_softmax(net(x), -1).detach()
    kl = torch.nn.functional.kl_div(logq, want, log_target=True, reduction="batchmean")
    torch.testing.assert_close(P.kl_fn(theta, x, sizes)(other), kl)


def test_network_cache_matches_a_retrained_centre():
    cache = P.load_cache()
    entry = cache["networks"].get(P.cache_key("mlp52", 0))
    if entry is None:
        pytest.skip("truth_cache.json has no mlp52 entry: run benchmarks/compute_truths.py")
    trained = P.train_mlp52(0)
    cached = torch.tensor(entry["center"], dtype=torch.float64)
    assert float((trained - cached).abs().max()) < 1e-8
    for eps in P.NETWORK_CUTOFFS["mlp52"]:
        row = entry["cutoffs"][repr(float(eps))]
        assert row["n"] >= 20_000 and 0 < row["k"] < row["n"]
        assert row["k"] <= row["k_endpoint_only"]  # the segment check only removes draws
    assert all(v == 0 for v in entry["grid_check"]["decision_flips"].values())


def test_segment_max_matches_a_dense_grid():
    """The staged grid + refinement of compute_truths against a brute-force 4096-point grid
    on the 52-parameter network, where segments are far from monotone."""
    import compute_truths as CT

    center, inputs, sizes = P.network_setup("mlp52", 0)
    fn = P.kl_fn(center, inputs, sizes)
    seg = CT.Segments(fn, center, 8192)
    sigma = float(center.norm()) / math.sqrt(52)
    gen = torch.Generator().manual_seed(5)
    offsets = sigma * torch.randn(250, 52, generator=gen, dtype=torch.float64) - center
    cap = 4.0
    m, end = CT.segment_max(seg, offsets, cap=cap, grid=64, coarse=8, steps=24)
    torch.testing.assert_close(end, torch.func.vmap(fn)(center + offsets))
    inside = torch.nonzero(m <= cap).squeeze(1)[:6]
    assert inside.numel() >= 3
    ts = torch.linspace(0, 1, 4097, dtype=torch.float64)[1:].expand(inside.numel(), -1)
    dense = seg(offsets[inside], ts).max(dim=1).values
    assert torch.all(m[inside] >= dense - 1e-12)  # never below a value that is really there
    torch.testing.assert_close(m[inside], dense, rtol=1e-6, atol=0)
    assert torch.all(m[m > cap] > cap)
    # some draws are inside at the endpoint but leave the basin on the way
    assert int(((end <= cap) & (m > cap)).sum()) > 0


# ------------------------------------------------------------------------------ interface


def _interface_names():
    return [n for n in P.names() if not n.startswith("digits")]


@pytest.mark.parametrize("name", _interface_names())
def test_every_problem_is_well_formed(name):
    p = P.get(name)
    assert p.name == name
    assert p.center.dtype == torch.float64 and p.center.ndim == 1
    assert p.measure in ("gaussian", "uniform")
    assert (p.sigma is not None and p.sigma > 0) == (p.measure == "gaussian")
    f0 = p.fn(p.center)
    assert f0.ndim == 0 and torch.isfinite(f0)
    pts = p.center + 1e-3 * torch.randn(3, p.dim, dtype=torch.float64)
    batched = torch.func.vmap(p.fn)(pts)
    assert batched.shape == (3,) and torch.all(batched >= f0 - 1e-12)
    torch.testing.assert_close(batched[1], p.fn(pts[1]))
    if name == "mlp52-kl-c0.01":
        assert math.isnan(p.truth)
    else:
        assert math.isfinite(p.truth) and p.truth_se >= 0 and p.how
    assert (p.preconditioner is not None) == name.startswith("exact-proposal")


def test_names_and_seeds():
    held = set(P.names(held_out=True))
    assert {"product-gaussian-d200", "product-gaussian-d1000"} <= held
    assert any(n.startswith("ellipsoid-") and "gaussian" in n for n in held)
    assert any(n.startswith(("mlp52-kl", "digits-kl")) for n in held)
    assert held.isdisjoint(P.names(held_out=False))
    assert set(P.names()) == held | set(P.names(held_out=False))
    assert set(P.names(quick=True)) < set(P.names())
    seeds = {P.default_seed(n) for n in P.names() if not n.startswith(("mlp52", "digits"))}
    assert len(seeds) == len([n for n in P.names() if not n.startswith(("mlp52", "digits"))])
    a, b = P.get("ellipsoid-gaussian-d200"), P.get("ellipsoid-gaussian-d200", seed=7)
    assert a.truth != b.truth and not torch.equal(a.center, b.center)
    again = P.get("ellipsoid-gaussian-d200", seed=P.default_seed("ellipsoid-gaussian-d200"))
    assert again.truth == a.truth and torch.equal(again.center, a.center)


# -------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_digits_problem_matches_classifier_kl_and_cache():
    from basin_volume.digits import train_digits_mlp
    from basin_volume.objectives import ClassifierKL

    p = P.get("digits-kl-c2.9")
    run = train_digits_mlp(seed=0)
    ref = ClassifierKL(run.model, run.train_inputs)
    trained = ref.center.double()
    assert float((trained - p.center).abs().max()) < 1e-5
    gen = torch.Generator().manual_seed(0)
    theta = p.center + 0.05 * torch.randn(p.dim, generator=gen, dtype=torch.float64)
    assert float(p.fn(theta)) == pytest.approx(float(ref(theta.float())), rel=1e-4)
    batched = torch.func.vmap(p.fn)(torch.stack([p.center, theta]))
    assert float(batched[0]) == 0.0 and float(batched[1]) == pytest.approx(float(p.fn(theta)))
    assert math.isfinite(p.truth) and p.truth_se > 0


@pytest.mark.slow
def test_mlp52_truth_reproduces_with_fresh_draws():
    """An independent direct-sampling run (other draws) agrees with the cached truths."""
    import compute_truths as CT

    settings = dict(CT.SETTINGS["mlp52"], n=40_000, check=0)
    entry = CT.network_truth("mlp52", 0, P.NETWORK_CUTOFFS["mlp52"], sample_seed=77, **settings)
    for eps in P.NETWORK_CUTOFFS["mlp52"]:
        p = P.get(f"mlp52-kl-c{eps:g}")
        row = entry["cutoffs"][repr(float(eps))]
        assert abs(row["log_p"] - p.truth) < Z * math.hypot(row["se"], p.truth_se)

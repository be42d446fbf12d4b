r"""Ground-truth problems for basin-size estimators: basins whose size is known independently.

Every problem is a callable ``fn`` (a 1-D float64 tensor of D parameters -> scalar tensor,
usable under :func:`torch.func.vmap`), a centre :math:`\theta_0`, a cutoff :math:`\varepsilon`
and a measure; its basin is the star-shaped set

.. math:: S = \{\theta : \delta(\theta_0 + t(\theta - \theta_0)) \le \varepsilon
          \ \forall t \in [0, 1]\},\qquad \delta = fn(\theta) - fn(\theta_0),

i.e. along each ray from :math:`\theta_0` everything up to the first exit. ``truth`` is the
natural log of its Lebesgue volume (``measure="uniform"``) or of its probability under
:math:`N(0, \sigma^2 I_D)` (``measure="gaussian"``). No truth here uses any estimator of the
project: each is a closed form, a one-dimensional contour integral evaluated by adaptive
quadrature (checked against mpmath at 30 digits), a deterministic two-dimensional quadrature,
or direct Monte Carlo sampling of the prior.

Usage::

    import problems
    for name in problems.names(held_out=False, quick=True):
        p = problems.get(name)              # the scored instance
        q = problems.get(name, seed=7)      # same family, another construction seed (tuning)

Problems marked ``held_out`` must never be used to tune a method (their other seeds may be).

1. Ellipsoids, uniform measure
------------------------------
:math:`\delta = \tfrac12 (\theta-\theta_0)^T H (\theta-\theta_0)` with H positive definite
(diagonal, or :math:`Q\,\mathrm{diag}(h)\,Q^T` with Q a random orthogonal matrix). The basin
is the ellipsoid with semi-axes :math:`a_i = \sqrt{2\varepsilon/h_i}`, so

.. math:: \log V = \log V_D + \tfrac D2 \log(2\varepsilon) - \tfrac12 \sum_i \log h_i,
          \qquad \log V_D = \tfrac D2 \log\pi - \log\Gamma(\tfrac D2 + 1).

"Axes over 4 decades": :math:`\log_{10} a_i` evenly spaced over an interval of length 4 and put
in a random order. The ``exact-proposal`` problems also carry ``preconditioner`` =
:math:`h^{-1/2}`, with which every direction of an importance sampler is exact.

2. Ellipsoids, Gaussian measure: a generalised chi-square CDF in its far lower tail
-------------------------------------------------------------------------------------
Write :math:`y = Q^T(\theta - \theta_0)` (Q = I for diagonal H). Under the prior
:math:`Q^T\theta \sim N(0, \sigma^2 I)`, so :math:`y_i = \sigma(z_i + \mu_i)` with
:math:`z \sim N(0, I)`, :math:`\mu = -Q^T\theta_0/\sigma`, and

.. math:: P = \Pr\Big(Q \le c\Big),\qquad Q = \sum_i \lambda_i (z_i + \mu_i)^2,\quad
          \lambda_i = h_i\sigma^2,\quad c = 2\varepsilon

(:math:`h_i = 0`, a flat direction, simply drops out). Q has the Laplace transform
:math:`L(s) = E e^{-sQ} = \prod_i (1+2\lambda_i s)^{-1/2}
\exp(-\lambda_i\mu_i^2 s/(1+2\lambda_i s))`, analytic for
:math:`\mathrm{Re}\,s > -1/(2\lambda_{\max})`, and the CDF's Laplace transform is L(s)/s, so by
the Bromwich inversion along any vertical line :math:`\mathrm{Re}\,s = \gamma > 0`

.. math:: P = \frac{1}{2\pi i}\int_{\gamma-i\infty}^{\gamma+i\infty} e^{K(s)}\,ds
          = \frac{e^{K(\gamma)}}{\pi}\int_0^\infty
            \mathrm{Re}\,\exp\big(K(\gamma+iy) - K(\gamma)\big)\,dy,
          \qquad K(s) = sc + \log L(s) - \log s

(the integrand at -y is the complex conjugate). On :math:`(0,\infty)` K is convex and tends
to :math:`+\infty` at both ends, so it has a unique minimum :math:`\gamma` (the saddle point,
:math:`K'(\gamma) = 0`, found by bracketed root finding on :math:`\log s`). Through the saddle
the vertical line is the steepest-descent direction: :math:`K(\gamma+iy) - K(\gamma) =
-K''(\gamma)y^2/2 + O(y^3)`, whose real part is maximal at y = 0, so the integral is
:math:`O(K''^{-1/2})` with no cancellation, however far in the tail P is (``exp(K(γ))`` carries
all of the smallness, in logs). Each term of :math:`K(\gamma+iy)-K(\gamma)` is evaluated in a
form that is exact in floating point: with :math:`q_i = 1+2\lambda_i\gamma`,
:math:`w_i = 2\lambda_i y/q_i`,

.. math:: -\tfrac12\log(1+i w_i) = -\tfrac14\log(1+w_i^2) - \tfrac i2\arctan w_i,\qquad
          -\lambda_i\mu_i^2\Big[\tfrac{s}{1+2\lambda_i s}\Big]_\gamma^{\gamma+iy}
          = -\lambda_i\mu_i^2\,\frac{iy\,(q_i - 2i\lambda_i y)}{q_i(q_i^2 + 4\lambda_i^2y^2)},

and :math:`-\log(1+iy/\gamma)` likewise; :math:`K(\gamma)` uses ``log1p``. The y-integral is
done by adaptive Gauss-Kronrod quadrature (``scipy.integrate.quad``) on panels of the natural
scale :math:`K''(\gamma)^{-1/2}` up to 40 scales, plus the remaining tail (which only matters at
small D, where the integrand decays like :math:`y^{-D/2-1}` while oscillating as
:math:`e^{icy}`) as a Fourier integral (QUADPACK's QAWF on the non-oscillating factor).
:func:`gchisq_logcdf_mpmath` evaluates the same integral with mpmath at 30 digits.

Checks (``tests/test_ground_truth.py``, ``compute_truths.py``): (a) isotropic H = hI, where P
is the noncentral chi-square CDF with D degrees of freedom and noncentrality
:math:`\|\theta_0\|^2/\sigma^2` at :math:`2\varepsilon/(h\sigma^2)`, computed independently as
the Poisson mixture :math:`\sum_j e^{-\nu/2}(\nu/2)^j/j!\; P(D/2+j, x/2)` of regularised
incomplete gammas in mpmath (all terms positive); agreement to ~1e-13 in log P at
D = 200, 1000 with log P ~ -230, -1140, and ~1e-10 at D = 1..5; (b) two groups of distinct
:math:`\lambda` (a convolution of two noncentral chi-squares, one-dimensional mpmath
quadrature); (c) brute-force Monte Carlo of the problems' own ``fn`` at D = 2..5; (d) each
quadratic problem rebuilt from its ``fn`` alone (autograd Hessian, eigendecomposition); (e)
mpmath (30 digits) against the float64 routine on the five scored Gaussian ellipsoids: they
agree to <= 5e-13 nats (``truth_cache.json``, ``checks.ellipsoid_mpmath``).

Above the mean of Q the same integral is taken along a line :math:`\gamma < 0` between the
pole at 0 and the first singularity :math:`-1/(2\lambda_{\max})` of L, where it equals
:math:`-(1-F)` (the residue at 0 is 1); with :math:`-\log(-s)` in K the saddle again exists
and is unique, and F = 1 - (1 - F) is then not small. Taking the lower line there instead
fails at small D (a slowly decaying, oscillating integrand), which is why the side is chosen.

3. Product basins (held out)
----------------------------
:math:`\delta(\theta) = \max_b \delta_b(\theta_b - \theta_{0,b})` over B two-dimensional
blocks. A point is in S iff every segment value of every block stays below ε, i.e. iff
:math:`\theta_b \in S_b` for every b, so S is exactly the product of the blocks' star-shaped
sets (whatever the blocks look like) and, the prior and Lebesgue measure being products too,
:math:`\log P = \sum_b \log P_b`. Each block, in a rotated frame :math:`y = R_b x`, is

.. math:: \delta_b = \tfrac12(k_1y_1^2 + k_2y_2^2) + g\,y_1^3 + q\,(y_1^4 + y_2^4):

not elliptical (the quartic squares the ends of the long axis off) and not symmetric (the
cubic). Along a ray :math:`x = tu`, :math:`\delta_b = a t^2 + c t^3 + d t^4` with
:math:`a, d > 0`; it is strictly increasing in t > 0 iff :math:`4dt^2 + 3ct + 2a > 0`, which
holds for all directions when :math:`9g^2 < 16k_1q` (use :math:`a \ge k_1u_1^2/2`,
:math:`d \ge qu_1^4`); the construction takes :math:`|g| = 0.9\cdot\tfrac43\sqrt{k_1q}`. So the
sublevel set is star-shaped and the boundary radius :math:`r_b(\varphi)` is the unique
positive root of :math:`dt^4 + ct^3 + at^2 = \varepsilon` (bisection to machine precision). Then

.. math:: P_b = \frac{1}{2\pi\sigma^2}\int_0^{2\pi}\!\!\int_0^{r_b(\varphi)}
          t\,e^{-\|\theta_{0,b} + tu(\varphi)\|^2/2\sigma^2}\,dt\,d\varphi,

with the trapezoid rule in :math:`\varphi` (periodic and smooth: exponential convergence) and
Gauss-Legendre in t on :math:`[0, r_b(\varphi)]`, in log space; the uniform measure uses
:math:`\tfrac12\int r_b^2\,d\varphi`. Checks: doubling both grids (2048 angles x 128 nodes)
changes log P by <= 4e-12 on the three product problems; one block's mass with the radial
integral in closed form (error functions) and mpmath's angle quadrature agrees to 1e-9;
5 blocks of each Gaussian product against 10^6 prior draws each are within 1.8 standard errors
(``checks.product``); a 2-block product through its own ``fn`` against 10^6 draws.

4. Small networks (direct sampling; see ``compute_truths.py``)
----------------------------------------------------------------
KL basins :math:`\delta(\theta) = \frac1N\sum_x \mathrm{KL}(p_{\theta_0}(\cdot|x)\,\|\,
p_\theta(\cdot|x))` of a 52-parameter GELU MLP (3-6-4, synthetic blobs) and of the digits MLP
(D = 4810). Truth: draw :math:`\theta \sim N(0, \sigma^2 I)` and accept iff the whole segment
stays inside, log P̂ = log(k/n) with delta-method standard error
:math:`\sqrt{(1-\hat P)/(n\hat P)}`; σ = RMS of θ0 (the library's default). The values live in
``truth_cache.json`` with the centre they were computed at (the problem uses the cached centre,
so a retrained network that differs in the last bits cannot shift the truth). The segment check
matters: on the 52-parameter network at cutoff 1.5 the endpoint alone would accept 1845 draws
instead of 1283 (+0.36 nats); on the digits MLP 2236 instead of 2231. The 52-parameter network
at cutoff 1e-2 has no independent truth (``truth = nan``): methods must agree there.

``python benchmarks/problems.py`` prints the table of problems and truths.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import integrate, optimize

__all__ = [
    "Problem",
    "get",
    "names",
    "log_unit_ball_volume",
    "log_ellipsoid_volume",
    "gchisq_logcdf",
    "gchisq_logcdf_mpmath",
    "ncx2_logcdf_mpmath",
]

CACHE = Path(__file__).with_name("truth_cache.json")


@dataclass(frozen=True)
class Problem:
    """One basin with a known size. See the module docstring for the conventions."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    center: torch.Tensor
    cutoff: float
    measure: str
    sigma: float | None
    truth: float
    truth_se: float
    held_out: bool
    how: str
    preconditioner: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        return self.center.numel()


# =============================================================================== closed forms


def log_unit_ball_volume(dim: int) -> float:
    """log V_D = (D/2) log(pi) - log Gamma(D/2 + 1)."""
    return 0.5 * dim * math.log(math.pi) - math.lgamma(0.5 * dim + 1.0)


def log_ellipsoid_volume(h: np.ndarray, cutoff: float) -> float:
    """Log volume of {x : x^T diag(h) x / 2 <= cutoff} (h > 0), in float64 with fsum."""
    h = np.asarray(h, dtype=np.float64)
    dim = h.size
    return (
        log_unit_ball_volume(dim)
        + 0.5 * dim * math.log(2.0 * cutoff)
        - 0.5 * math.fsum(np.log(h).tolist())
    )


# ====================================================================== generalised chi-square


def _prepare(lam, nc) -> tuple[np.ndarray, np.ndarray]:
    lam = np.asarray(lam, dtype=np.float64).ravel()
    nc = np.broadcast_to(np.asarray(nc, dtype=np.float64), lam.shape).ravel()
    if np.any(lam < 0) or np.any(nc < 0) or not np.all(np.isfinite(lam) & np.isfinite(nc)):
        raise ValueError("lam and nc must be finite and >= 0")
    keep = lam > 0  # a flat direction never leaves the basin: it drops out
    return lam[keep], nc[keep]


@dataclass(frozen=True)
class _Saddle:
    """The saddle point gamma of K and the quantities the inversion needs there.

    ``upper``: gamma < 0 (the contour passes left of the pole at 0 and the integral is
    -(1 - F)); else gamma > 0 and the integral is F. ``q`` = 1 + 2 lam gamma, computed
    without cancellation on either side.
    """

    gamma: float
    q: np.ndarray
    upper: bool


def _saddle(lam: np.ndarray, nc: np.ndarray, c: float, upper: bool) -> _Saddle:
    """Minimiser of K(s) = s c + log L(s) - log(+-s) on (0, inf) (lower) or on
    (-1/(2 lam_max), 0) (upper). K is convex there and tends to +inf at both ends."""
    if not upper:

        def state(x: float) -> tuple[float, np.ndarray]:  # x = log s
            g = math.exp(x)
            return g, 1.0 + 2.0 * lam * g

        lo = hi = -math.log(c)
        step = 4.0
    else:
        lmax = float(lam.max())

        def state(x: float) -> tuple[float, np.ndarray]:  # x = log(1 + 2 lam_max s) < 0
            v = math.exp(x)
            return math.expm1(x) / (2.0 * lmax), ((lmax - lam) + v * lam) / lmax

        lo = hi = -1.0
        step = 2.0

    def dk(x: float) -> float:
        g, q = state(x)
        return c - float(np.sum(lam / q)) - float(np.sum(lam * nc / q**2)) - 1.0 / g

    while dk(lo) > 0:
        lo -= step
    if upper:
        hi = -1e-300
        while dk(hi) < 0:  # pragma: no cover - K' -> +inf as s -> 0-
            hi /= 2
    else:
        while dk(hi) < 0:
            hi += step
    x = optimize.brentq(dk, lo, hi, xtol=1e-300 if upper else 1e-14, rtol=1e-15, maxiter=1000)
    g, q = state(x)
    return _Saddle(g, q, upper)


def _inversion_log_integral(lam, nc, c: float, sp: _Saddle) -> float:
    r"""log of (1/2 pi i) \int e^{K(s)} ds along Re s = gamma (lower: log F; upper: log(1-F),
    with K(s) = s c + log L(s) - log(-s) there)."""
    g, q = sp.gamma, sp.q
    k0 = (
        g * c
        - 0.5 * math.fsum(np.log(q).tolist() if sp.upper else np.log1p(2.0 * lam * g).tolist())
        - math.fsum((lam * nc * g / q).tolist())
        - math.log(abs(g))
    )
    k2 = float(np.sum(2 * lam**2 / q**2) + np.sum(4 * lam**2 * nc / q**3)) + 1.0 / g**2
    scale = 1.0 / math.sqrt(k2)
    a = 2.0 * lam / q
    lnc = lam * nc

    def parts(y: float) -> tuple[float, float]:
        """Real part and phase of K(g + iy) - K(g) - i c y."""
        w = a * y
        den = q * (q * q + 4.0 * lam * lam * y * y)
        z = y / g
        re = (
            -0.25 * float(np.sum(np.log1p(w * w)))
            - float(np.sum(lnc * 2.0 * lam * y * y / den))
            - 0.5 * math.log1p(z * z)
        )
        im = -0.5 * float(np.sum(np.arctan(w))) - float(np.sum(lnc * y * q / den)) - math.atan(z)
        return re, im

    def integrand(y: float) -> float:
        re, im = parts(y)
        return math.exp(re) * math.cos(im + c * y)

    def amp_cos(y: float) -> float:
        re, im = parts(y)
        return math.exp(re) * math.cos(im)

    def amp_sin(y: float) -> float:
        re, im = parts(y)
        return math.exp(re) * math.sin(im)

    panels = [0, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        body = math.fsum(
            integrate.quad(integrand, lo * scale, hi * scale, epsabs=0, epsrel=1e-13, limit=200)[0]
            for lo, hi in zip(panels[:-1], panels[1:], strict=True)
        )
        y_tail = panels[-1] * scale
        tail = 0.0
        if math.exp(parts(y_tail)[0]) > 1e-300:
            # past 40 scales only small D is left: a smooth amplitude times e^{icy} (QAWF)
            tail = (
                integrate.quad(amp_cos, y_tail, np.inf, weight="cos", wvar=c, limlst=200)[0]
                - integrate.quad(amp_sin, y_tail, np.inf, weight="sin", wvar=c, limlst=200)[0]
            )
    total = body + tail
    if not total > 0:
        raise ArithmeticError(f"inversion integral is {total}, not positive")
    return k0 - math.log(math.pi) + math.log(total)


def gchisq_logcdf(lam, nc, c: float) -> float:
    r"""log Pr(sum_i lam_i (z_i + mu_i)^2 <= c), z ~ N(0, I), nc = mu^2, lam >= 0, c > 0.

    Bromwich inversion through the saddle point (module docstring, section 2), float64. Below
    the mean of the sum the contour is right of the pole at 0 and gives F; above it, left of
    the pole (between it and the first singularity of L) and gives 1 - F, whose logarithm
    keeps the upper tail accurate; F = 1 - (1 - F) is then not small, so nothing cancels.
    Accurate to ~1e-12 relative in P at any depth of the lower tail.
    """
    lam, nc = _prepare(lam, nc)
    if c <= 0:
        return -math.inf
    if lam.size == 0:
        return 0.0
    upper = c > float(np.sum(lam * (1.0 + nc)))
    sp = _saddle(lam, nc, c, upper)
    log_integral = _inversion_log_integral(lam, nc, c, sp)
    return math.log1p(-math.exp(log_integral)) if upper else log_integral


def gchisq_logcdf_mpmath(lam, nc, c: float, *, dps: int = 30) -> float:
    """:func:`gchisq_logcdf` evaluated entirely in mpmath at ``dps`` digits (a check; the
    float64 saddle point only seeds mpmath's root finder)."""
    import mpmath as mp

    lam, nc = _prepare(lam, nc)
    if lam.size == 0:
        return 0.0
    upper = c > float(np.sum(lam * (1.0 + nc)))
    seed = _saddle(lam, nc, c, upper).gamma
    sign = -1 if upper else 1
    with mp.workdps(dps):
        lm = [mp.mpf(float(x)) for x in lam]
        ncm = [mp.mpf(float(x)) for x in nc]
        cm = mp.mpf(c)

        def k(s):
            return (
                s * cm
                - mp.fsum(
                    mp.log(1 + 2 * li * s) / 2 + li * ni * s / (1 + 2 * li * s)
                    for li, ni in zip(lm, ncm, strict=True)
                )
                - mp.log(sign * s)
            )

        def dk(s):
            return (
                cm
                - mp.fsum(
                    li / (1 + 2 * li * s) + li * ni / (1 + 2 * li * s) ** 2
                    for li, ni in zip(lm, ncm, strict=True)
                )
                - 1 / s
            )

        def d2k(s):
            return (
                mp.fsum(
                    2 * li**2 / (1 + 2 * li * s) ** 2 + 4 * li**2 * ni / (1 + 2 * li * s) ** 3
                    for li, ni in zip(lm, ncm, strict=True)
                )
                + 1 / s**2
            )

        g = mp.findroot(dk, mp.mpf(seed), tol=mp.mpf(10) ** (-dps + 5))
        k0 = k(g)
        scale = 1 / mp.sqrt(d2k(g))

        def f(v):
            return mp.re(mp.exp(k(g + 1j * v * scale) - k0))

        integral = mp.quad(f, [0, 1, 2, 4, 8, 16, 32, 64])
        if abs(mp.exp(mp.re(k(g + 64j * scale) - k0))) > mp.mpf(10) ** (-dps):
            # small D: a slowly decaying tail oscillating like e^{i c y}
            integral += mp.quadosc(f, [64, mp.inf], omega=cm * scale)
        log_integral = k0 - mp.log(mp.pi) + mp.log(integral * scale)
        return float(mp.log1p(-mp.exp(log_integral)) if upper else log_integral)


def ncx2_logcdf_mpmath(dof: float, nc: float, x: float, *, dps: int = 40) -> float:
    """log of the noncentral chi-square CDF (``dof`` degrees of freedom, noncentrality ``nc``)
    at ``x``: the Poisson mixture of regularised lower incomplete gammas, in mpmath."""
    import mpmath as mp

    with mp.workdps(dps):
        half_nc, half_x, k = mp.mpf(nc) / 2, mp.mpf(x) / 2, mp.mpf(dof) / 2
        total, j, log_w = mp.mpf(0), 0, -half_nc
        while True:
            term = mp.exp(log_w + mp.log(mp.gammainc(k + j, 0, half_x, regularized=True)))
            total += term
            if j > half_nc and term < total * mp.mpf(10) ** (-dps):
                break
            j += 1
            log_w += mp.log(half_nc) - mp.log(j) if half_nc > 0 else -mp.inf
            if half_nc == 0:
                break
        return float(mp.log(total))


def quadratic_gaussian_logprob(
    h: np.ndarray,
    center: np.ndarray,
    sigma: float,
    cutoff: float,
    rotation: np.ndarray | None = None,
) -> float:
    """log Pr_{theta ~ N(0, sigma^2 I)}(1/2 (theta-c)^T Q diag(h) Q^T (theta-c) <= cutoff)."""
    shifted = center if rotation is None else rotation.T @ center
    return gchisq_logcdf(h * sigma**2, (shifted / sigma) ** 2, 2.0 * cutoff)


# ============================================================================= product blocks


@dataclass(frozen=True)
class Blocks:
    """B two-dimensional blocks, delta_b = (k1 y1^2 + k2 y2^2)/2 + g y1^3 + q (y1^4 + y2^4),
    y = R(angle) x, x = theta_b - center_b. All arrays have length B (center: [B, 2])."""

    center: np.ndarray
    angle: np.ndarray
    k1: np.ndarray
    k2: np.ndarray
    g: np.ndarray
    q: np.ndarray

    @property
    def n(self) -> int:
        return self.angle.size

    def ray_coefficients(self, phi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(a, c, d) of delta_b(t u(phi)) = a t^2 + c t^3 + d t^4, each [B, len(phi)]."""
        ang = phi[None, :] + self.angle[:, None]  # y = R(angle) u(phi) = u(phi + angle)
        v1, v2 = np.cos(ang), np.sin(ang)
        a = 0.5 * (self.k1[:, None] * v1**2 + self.k2[:, None] * v2**2)
        c = self.g[:, None] * v1**3
        d = self.q[:, None] * (v1**4 + v2**4)
        return a, c, d

    def radius(self, phi: np.ndarray, cutoff: float) -> np.ndarray:
        """r_b(phi): the positive root of a t^2 + c t^3 + d t^4 = cutoff, by bisection."""
        a, c, d = self.ray_coefficients(phi)
        # a t^2 + c t^3 + d t^4 increases on t > 0 iff 4 d t^2 + 3 c t + 2 a > 0 there,
        # i.e. iff c >= 0 or 9 c^2 < 32 a d
        if np.any((c < 0) & (9 * c**2 >= 32 * a * d)):
            raise ValueError("a block is not monotone along some ray")

        def f(t):
            return ((d * t + c) * t + a) * t * t - cutoff

        lo = np.zeros_like(a)
        hi = np.sqrt(cutoff / a)
        while True:
            out = f(hi) < 0
            if not out.any():
                break
            hi = np.where(out, 2 * hi, hi)
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if not np.any((mid > lo) & (mid < hi)):
                break
            below = f(mid) < 0
            lo = np.where(below, mid, lo)
            hi = np.where(below, hi, mid)
        return 0.5 * (lo + hi)

    def log_masses(
        self, sigma: float, cutoff: float, *, n_phi: int = 1024, n_t: int = 64
    ) -> np.ndarray:
        """log P_b under N(0, sigma^2 I_2) for each block: trapezoid in phi, Gauss-Legendre
        in t on [0, r_b(phi)], summed in log space."""
        from scipy.special import logsumexp

        phi = 2 * math.pi * np.arange(n_phi) / n_phi
        r = self.radius(phi, cutoff)  # [B, P]
        nodes, weights = np.polynomial.legendre.leggauss(n_t)
        s = 0.5 * (nodes + 1.0)  # on [0, 1]
        w = 0.5 * weights
        u1, u2 = np.cos(phi), np.sin(phi)
        c1, c2 = self.center[:, 0:1], self.center[:, 1:2]  # [B, 1]
        out = np.empty(self.n)
        for i in range(self.n):  # one block at a time keeps memory at [P, n_t]
            t = r[i][:, None] * s[None, :]  # [P, n_t]
            x1 = c1[i] + t * u1[:, None]
            x2 = c2[i] + t * u2[:, None]
            log_f = (
                np.log(t)
                - (x1 * x1 + x2 * x2) / (2 * sigma**2)
                + np.log(w)[None, :]
                + np.log(r[i])[:, None]
            )
            out[i] = (
                logsumexp(log_f) + math.log(2 * math.pi / n_phi) - math.log(2 * math.pi * sigma**2)
            )
        return out

    def log_areas(self, cutoff: float, *, n_phi: int = 1024) -> np.ndarray:
        """log of each block's area, (1/2) integral of r_b(phi)^2 dphi (trapezoid)."""
        phi = 2 * math.pi * np.arange(n_phi) / n_phi
        r = self.radius(phi, cutoff)
        return np.log(0.5 * np.sum(r * r, axis=1) * (2 * math.pi / n_phi))

    def deltas(self, x: np.ndarray) -> np.ndarray:
        """delta_b at offsets x [..., B, 2] (numpy, for Monte Carlo checks)."""
        ca, sa = np.cos(self.angle), np.sin(self.angle)
        y1 = ca * x[..., 0] - sa * x[..., 1]
        y2 = sa * x[..., 0] + ca * x[..., 1]
        return 0.5 * (self.k1 * y1**2 + self.k2 * y2**2) + self.g * y1**3 + self.q * (y1**4 + y2**4)


def make_blocks(n_blocks: int, cutoff: float, rng: np.random.Generator) -> Blocks:
    """Random blocks: centres N(0, 1); quadratic semi-axes sqrt(2 eps / k) log-uniform in
    [0.03, 1]; quartic strength so that it takes kappa ~ U(0.5, 3) times the cutoff at the
    end of the longer quadratic axis; cubic at 90% of the monotonicity bound, random sign."""
    center = rng.normal(size=(n_blocks, 2))
    angle = rng.uniform(0, math.pi, n_blocks)
    axes = 10 ** rng.uniform(-1.5, 0.0, size=(n_blocks, 2))
    k1, k2 = 2 * cutoff / axes[:, 0] ** 2, 2 * cutoff / axes[:, 1] ** 2
    kappa = rng.uniform(0.5, 3.0, n_blocks)
    q = kappa * cutoff / axes.max(axis=1) ** 4
    g = 0.9 * (4.0 / 3.0) * np.sqrt(k1 * q) * rng.choice([-1.0, 1.0], n_blocks)
    return Blocks(center, angle, k1, k2, g, q)


def product_fn(blocks: Blocks) -> Callable[[torch.Tensor], torch.Tensor]:
    """fn(theta) = max_b delta_b(theta_b - center_b), theta = blocks flattened row-major."""
    center = torch.from_numpy(blocks.center.reshape(-1).copy())
    ca = torch.from_numpy(np.cos(blocks.angle))
    sa = torch.from_numpy(np.sin(blocks.angle))
    k1, k2, g, q = (torch.from_numpy(v.copy()) for v in (blocks.k1, blocks.k2, blocks.g, blocks.q))

    def fn(theta: torch.Tensor) -> torch.Tensor:
        x = (theta - center.to(theta)).reshape(-1, 2)
        x1, x2 = x[:, 0], x[:, 1]
        y1 = ca.to(theta) * x1 - sa.to(theta) * x2
        y2 = sa.to(theta) * x1 + ca.to(theta) * x2
        d = (
            0.5 * (k1.to(theta) * y1 * y1 + k2.to(theta) * y2 * y2)
            + g.to(theta) * y1**3
            + q.to(theta) * (y1**4 + y2**4)
        )
        return d.amax()

    return fn


# =================================================================================== networks


def mlp_forward(theta: torch.Tensor, x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """Log-probabilities of a GELU MLP with flat parameters [W1, b1, W2, b2, ...] (each W as
    [out, in], row-major: torch's ``parameters_to_vector`` order for nn.Linear layers)."""
    h = x
    at = 0
    n_layers = len(sizes) - 1
    for i in range(n_layers):
        fan_in, fan_out = sizes[i], sizes[i + 1]
        w = theta[at : at + fan_in * fan_out].reshape(fan_out, fan_in)
        at += fan_in * fan_out
        b = theta[at : at + fan_out]
        at += fan_out
        h = h @ w.T + b
        if i < n_layers - 1:
            h = torch.nn.functional.gelu(h)
    return torch.log_softmax(h, dim=-1)


def n_params(sizes: tuple[int, ...]) -> int:
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def kl_fn(
    center: torch.Tensor, inputs: torch.Tensor, sizes: tuple[int, ...]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """delta(theta) = mean over inputs of KL(p_center || p_theta), float64."""
    x = inputs.to(torch.float64)
    with torch.no_grad():
        ref = mlp_forward(center.to(torch.float64), x, sizes)
    p_ref = ref.exp()

    def fn(theta: torch.Tensor) -> torch.Tensor:
        logp = mlp_forward(theta, x.to(theta), sizes)
        return (p_ref.to(theta) * (ref.to(theta) - logp)).sum() / x.shape[0]

    return fn


MLP52_SIZES = (3, 6, 4)


def mlp52_data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """256 points in R^3 from 4 Gaussian blobs (unit variance, centres N(0, 1.5^2 I))."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    means = 1.5 * torch.randn(4, 3, generator=gen, dtype=torch.float64)
    labels = torch.arange(4).repeat_interleave(64)
    inputs = means[labels] + torch.randn(256, 3, generator=gen, dtype=torch.float64)
    return inputs, labels


def train_mlp52(seed: int, *, steps: int = 500, lr: float = 0.02) -> torch.Tensor:
    """The 3-6-4 GELU MLP (52 parameters) trained by full-batch Adam (float64) on
    :func:`mlp52_data`; initialised like nn.Linear (uniform +-1/sqrt(fan_in))."""
    inputs, labels = mlp52_data(seed)
    gen = torch.Generator().manual_seed(20_000 + seed)
    parts = []
    for fan_in, fan_out in zip(MLP52_SIZES[:-1], MLP52_SIZES[1:], strict=True):
        bound = 1.0 / math.sqrt(fan_in)
        for n in (fan_in * fan_out, fan_out):
            parts.append((2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1) * bound)
    theta = torch.cat(parts).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.nll_loss(mlp_forward(theta, inputs, MLP52_SIZES), labels)
        loss.backward()
        opt.step()
    return theta.detach().clone()


DIGITS_SIZES = (64, 64, 10)


@functools.lru_cache(maxsize=4)
def digits_setup(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre, training inputs) of ``basin_volume.digits.train_digits_mlp(seed=seed)`` with
    its defaults (1000 full-batch Adam steps, 1024 training digits), as float64."""
    from basin_volume.digits import train_digits_mlp

    run = train_digits_mlp(seed=seed)
    center = torch.nn.utils.parameters_to_vector(run.model.parameters()).detach().double()
    return center, run.train_inputs.double()


def network_setup(family: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """(centre, inputs, layer sizes) of a network family ("mlp52" or "digits")."""
    if family == "mlp52":
        return train_mlp52(seed), mlp52_data(seed)[0], MLP52_SIZES
    if family == "digits":
        center, inputs = digits_setup(seed)
        return center, inputs, DIGITS_SIZES
    raise KeyError(family)


def load_cache() -> dict:
    if CACHE.exists():
        return json.loads(CACHE.read_text())
    return {"version": 1, "networks": {}, "checks": {}}


def cache_key(family: str, seed: int) -> str:
    return f"{family}@seed{seed}"


# =================================================================================== registry


def _rms(x: np.ndarray) -> float:
    return math.sqrt(float(np.mean(x * x)))


def _spread_axes(dim: int, lo: float, rng: np.random.Generator, decades: float = 4.0):
    """Semi-axes log-uniform over [10^lo, 10^(lo + decades)] (i.i.d., with the two ends
    included, so the spread is exactly ``decades``), in a random order."""
    u = rng.uniform(0.0, 1.0, dim)
    u[:2] = (0.0, 1.0)
    return 10.0 ** (lo + decades * rng.permutation(u))


def _orthogonal(dim: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.normal(size=(dim, dim))
    q, r = np.linalg.qr(a)
    return q * np.sign(np.diag(r))[None, :]


def _quadratic_fn(center: np.ndarray, h: np.ndarray, rotation: np.ndarray | None = None):
    c = torch.from_numpy(center.copy())
    ht = torch.from_numpy(h.copy())
    rot = None if rotation is None else torch.from_numpy(rotation.copy())

    def fn(theta: torch.Tensor) -> torch.Tensor:
        x = theta - c.to(theta)
        if rot is not None:
            x = x @ rot.to(theta)  # Q^T x
        return 0.5 * (ht.to(theta) * x * x).sum()

    return fn


def _zero_fn(theta: torch.Tensor) -> torch.Tensor:
    # depends on theta (so autograd and vmap see it) but is 0 for every finite or infinite
    # theta; nan only for nan input
    return (theta.clamp(-1.0, 1.0) * 0.0).sum()


def ellipsoid_uniform(
    name, seed, *, dim, rotated=False, exact=False, held_out=False, cutoff=1e-2
) -> Problem:
    rng = np.random.default_rng(seed)
    center = rng.normal(size=dim)
    axes = _spread_axes(dim, -3.0, rng)  # 1e-3 .. 10
    h = 2 * cutoff / axes**2
    rotation = _orthogonal(dim, rng) if rotated else None
    truth = log_ellipsoid_volume(h, cutoff)
    how = "closed form log V_D + (D/2) log(2 eps) - (1/2) sum log h" + (
        " (det of Q diag(h) Q^T = prod h)" if rotated else ""
    )
    return Problem(
        name=name,
        fn=_quadratic_fn(center, h, rotation),
        center=torch.from_numpy(center),
        cutoff=cutoff,
        measure="uniform",
        sigma=None,
        truth=truth,
        truth_se=0.0,
        held_out=held_out,
        how=how + ("; preconditioner h^-1/2 makes every direction exact" if exact else ""),
        preconditioner=torch.from_numpy(h**-0.5) if exact else None,
    )


def ellipsoid_gaussian(
    name,
    seed,
    *,
    dim,
    sigma_factor=1.0,
    rotated=False,
    singular=0.0,
    held_out=False,
    cutoff=1e-2,
) -> Problem:
    rng = np.random.default_rng(seed)
    center = rng.normal(size=dim)
    rms = _rms(center)
    axes = rms * _spread_axes(dim, -2.0, rng)  # 0.01 .. 100 x RMS
    h = 2 * cutoff / axes**2
    if singular:
        h[rng.permutation(dim)[: int(round(singular * dim))]] = 0.0
    rotation = _orthogonal(dim, rng) if rotated else None
    sigma = sigma_factor * rms
    truth = quadratic_gaussian_logprob(h, center, sigma, cutoff, rotation)
    return Problem(
        name=name,
        fn=_quadratic_fn(center, h, rotation),
        center=torch.from_numpy(center),
        cutoff=cutoff,
        measure="gaussian",
        sigma=sigma,
        truth=truth,
        truth_se=0.0,
        held_out=held_out,
        how="generalised noncentral chi-square CDF: Bromwich inversion through the saddle "
        "point (float64 quadrature, checked against mpmath 30 digits)",
    )


def whole_space(name, seed, *, dim, sigma_factor=1.0, held_out=False) -> Problem:
    rng = np.random.default_rng(seed)
    center = rng.normal(size=dim)
    return Problem(
        name=name,
        fn=_zero_fn,
        center=torch.from_numpy(center),
        cutoff=1e-2,
        measure="gaussian",
        sigma=sigma_factor * _rms(center),
        truth=0.0,
        truth_se=0.0,
        held_out=held_out,
        how="fn is constant: the basin is the whole space, log P = 0 exactly",
    )


PRODUCT_CUTOFF = 0.05


def product(name, seed, *, n_blocks, measure="gaussian", held_out=True) -> Problem:
    rng = np.random.default_rng(seed)
    blocks = make_blocks(n_blocks, PRODUCT_CUTOFF, rng)
    center = blocks.center.reshape(-1)
    sigma = _rms(center)
    if measure == "gaussian":
        truth = math.fsum(blocks.log_masses(sigma, PRODUCT_CUTOFF).tolist())
        how = "sum over 2-D blocks of log prior mass: trapezoid(phi, 1024) x Gauss-Legendre(t, 64)"
    else:
        sigma = None
        truth = math.fsum(blocks.log_areas(PRODUCT_CUTOFF).tolist())
        how = "sum over 2-D blocks of log area: trapezoid over phi (1024) of r^2/2"
    return Problem(
        name=name,
        fn=product_fn(blocks),
        center=torch.from_numpy(center.copy()),
        cutoff=PRODUCT_CUTOFF,
        measure=measure,
        sigma=sigma,
        truth=truth,
        truth_se=0.0,
        held_out=held_out,
        how=how,
    )


def network(name, seed, *, family, cutoff, held_out, no_truth=False,
            sigma: float | str | None = None) -> Problem:
    """A small network's KL basin; ``sigma`` defaults to the centre's RMS, ``"init"`` is the
    RMS of the digits MLP's parameters at initialisation."""
    center, inputs, sizes = network_setup(family, seed)
    entry = load_cache()["networks"].get(cache_key(family, seed))
    truth, se = math.nan, math.nan
    how = "truth not computed for this seed: run benchmarks/compute_truths.py --seed"
    if no_truth:
        how = "no independent truth (direct sampling cannot reach it): estimators must agree"
    if entry is not None:
        cached = torch.tensor(entry["center"], dtype=torch.float64)
        if cached.shape != center.shape or float((cached - center).abs().max()) > 1e-4:
            warnings.warn(
                f"{name}: the trained centre differs from the cached one; using the cached "
                "centre (its truth was computed there)",
                stacklevel=2,
            )
        center = cached
        row = entry["cutoffs"].get(repr(float(cutoff)))
        if row is not None and not no_truth:
            truth, se = row["log_p"], row["se"]
            how = (
                f"direct sampling: {row['k']}/{row['n']} prior draws whose whole segment from "
                f"theta0 stays inside (grid {entry['settings']['grid']} + local-max refinement)"
            )
    if sigma == "init":
        from basin_volume.digits import make_digits_mlp

        init = torch.nn.utils.parameters_to_vector(make_digits_mlp(64, seed=seed).parameters())
        sigma = float(init.detach().norm()) / math.sqrt(init.numel())
    elif sigma is None:
        sigma = float(center.norm()) / math.sqrt(center.numel())
    return Problem(
        name=name,
        fn=kl_fn(center, inputs, sizes),
        center=center,
        cutoff=float(cutoff),
        measure="gaussian",
        sigma=sigma,
        truth=truth,
        truth_se=se,
        held_out=held_out,
        how=how,
    )


@dataclass(frozen=True)
class _Entry:
    build: Callable[..., Problem]
    seed: int
    held_out: bool
    quick: bool
    kwargs: dict


NETWORK_CUTOFFS = {"mlp52": (3.0, 1.5), "digits": (2.9, 2.6)}
"""Cutoffs with a direct-sampling truth; the second of each is held out."""

_REGISTRY: dict[str, _Entry] = {}


def _add(name, build, seed, *, held_out=False, quick=True, **kwargs):
    _REGISTRY[name] = _Entry(build, seed, held_out, quick, {**kwargs, "held_out": held_out})


_add("ellipsoid-uniform-d1000", ellipsoid_uniform, 101, dim=1000)
_add("ellipsoid-rotated-uniform-d200", ellipsoid_uniform, 102, dim=200, rotated=True)
_add("ellipsoid-uniform-d10000", ellipsoid_uniform, 103, dim=10_000)
_add("ellipsoid-gaussian-d200", ellipsoid_gaussian, 201, dim=200)
_add("ellipsoid-gaussian-d1000", ellipsoid_gaussian, 202, dim=1000)
_add("ellipsoid-gaussian-d200-sigma0.1", ellipsoid_gaussian, 203, dim=200, sigma_factor=0.1)
_add(
    "ellipsoid-gaussian-d1000-sigma0.1",
    ellipsoid_gaussian,
    204,
    dim=1000,
    sigma_factor=0.1,
    held_out=True,
)
_add(
    "ellipsoid-rotated-singular-gaussian-d200",
    ellipsoid_gaussian,
    205,
    dim=200,
    rotated=True,
    singular=0.2,
    held_out=True,
)
for _dim in (1000, 100_000):
    for _f, _suffix in ((1.0, ""), (0.1, "-sigma0.1")):
        _add(
            f"whole-space-d{_dim}{_suffix}",
            whole_space,
            300 + (_dim == 100_000) * 2 + (_f == 0.1),
            dim=_dim,
            sigma_factor=_f,
            quick=_dim <= 1000,
        )
_add("product-gaussian-d200", product, 401, n_blocks=100, held_out=True)
_add("product-gaussian-d1000", product, 402, n_blocks=500, held_out=True)
_add("product-uniform-d1000", product, 403, n_blocks=500, measure="uniform", held_out=True)
for _family, _quick in (("mlp52", True), ("digits", False)):
    _tune, _held = NETWORK_CUTOFFS[_family]
    _add(f"{_family}-kl-c{_tune:g}", network, 0, family=_family, cutoff=_tune, quick=_quick)
    _add(
        f"{_family}-kl-c{_held:g}",
        network,
        0,
        family=_family,
        cutoff=_held,
        quick=_quick,
        held_out=True,
    )
_add("mlp52-kl-c0.01", network, 0, family="mlp52", cutoff=0.01, no_truth=True)
_add("digits-kl-c0.01", network, 0, family="digits", cutoff=0.01, no_truth=True, quick=False)
# the two priors of experiments/: sigma = the parameters' RMS at initialisation, and the
# sigma the training's L2 penalty implies (experiments/_common.py: l2_sigma)
_add("digits-kl-c0.01-initprior", network, 0, family="digits", cutoff=0.01, no_truth=True,
     quick=False, sigma="init")
_add("digits-kl-c0.01-l2prior", network, 0, family="digits", cutoff=0.01, no_truth=True,
     quick=False, sigma=3.125)
_add("exact-proposal-ellipsoid-d10000", ellipsoid_uniform, 501, dim=10_000, exact=True)
_add(
    "exact-proposal-ellipsoid-d100000",
    ellipsoid_uniform,
    502,
    dim=100_000,
    exact=True,
    quick=False,
)


def names(*, held_out: bool | None = None, quick: bool | None = None) -> list[str]:
    """Problem names, optionally only the held-out (or tuning) ones and the quick ones
    (D <= 10^4 and a cheap fn)."""
    return [
        n
        for n, e in _REGISTRY.items()
        if (held_out is None or e.held_out == held_out) and (quick is None or e.quick == quick)
    ]


def default_seed(name: str) -> int:
    return _REGISTRY[name].seed


@functools.lru_cache(maxsize=64)
def get(name: str, seed: int | None = None) -> Problem:
    """The problem ``name``; ``seed`` builds another member of the same family (default: the
    scored seed). Network seeds other than the scored one need ``compute_truths.py --seed``."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown problem {name!r}; see problems.names()")
    entry = _REGISTRY[name]
    return entry.build(name, entry.seed if seed is None else seed, **entry.kwargs)


def _table() -> str:
    rows = []
    for name in names():
        p = get(name)
        se = f"{p.truth_se:.4f}" if p.truth_se else "exact"
        rows.append(
            f"{name:42s} {p.dim:7d} {p.measure:8s} {p.cutoff:8.3g} {p.truth:16.6f} {se:>7s} "
            f"{'held-out' if p.held_out else 'tuning':8s}  {p.how}"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(_table())

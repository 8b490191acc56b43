"""Every registered sampler against exact answers: Gaussian data (closed-form output law), the 2-D GMM,
DDIM eta=1 == DDPM, DDIM inversion, classifier-free guidance, and the error messages.

For Gaussian data N(mu, s^2) the exact denoiser is affine in x_t, so every sampler's output is
x_0 = A x_T + b + sum_i c_i z_i with z_i its own noise draws. ``exact_law`` recovers A from two runs
with one seed, and b and the c_i by regressing the x_T = 0 run on the replayed draws (the fit is exact:
its residual is asserted ~0; a sampler that leaves the generator untouched has c = 0). With x_T from the
exact marginal at t_max, the output law of the discrete sampler is N(A m_T + b, A^2 v_T + sum c_i^2),
with no sampling error, to compare with N(mu, s^2).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from dtrain.data.synthetic import GaussianMixture, default_gmm
from dtrain.diffusion.guidance import CFGDenoiser
from dtrain.diffusion.schedule import make_schedule
from dtrain.diffusion.timesteps import grid_from_indices, make_grid
from dtrain.samplers import SAMPLERS, ddim, ddim_invert, ddpm, dpm_solver_pp, run, steps_for_nfe

MU, SD = 0.7, 0.5
GAUSS = GaussianMixture(torch.tensor([[MU]], dtype=torch.float64), SD)
NAMES = SAMPLERS.names()
SOLVERS = [n for n in NAMES if not SAMPLERS.get(n).few_step]  # converge with a diffusion denoiser; students' samplers
# (consistency, flow maps) are tested with their own models in their own test files
SCHEDULES = {
    "vp_discrete": {},
    "vp_cosine": {},
    "edm": {},
    "flow": {},
    "vp_discrete_ztsnr": {"zero_terminal_snr": True},  # alpha(t_max) = 0, lambda = -inf, like flow
}


def schedule(key: str):
    return make_schedule(key.removesuffix("_ztsnr"), **SCHEDULES[key])


class Gauss(nn.Module):
    """E[x0 | x_t] = mu + a s^2 / (a^2 s^2 + sigma^2) (x_t - a mu) for N(MU, SD^2): GAUSS.denoiser's closed
    form in a few ops (test_gauss_denoiser_matches_the_mixture_one checks they agree)."""

    def __init__(self, schedule) -> None:
        super().__init__()
        self.schedule, self.calls = schedule, 0

    def forward(self, x: Tensor, t: Tensor | float, cond: object = None) -> Tensor:
        self.calls += 1
        t = torch.as_tensor(t, dtype=torch.float64)
        a, sg = (v.reshape(-1, *[1] * (x.ndim - 1)) if v.ndim else v for v in (self.schedule.alpha(t),
                                                                               self.schedule.sigma(t)))
        return (MU + a * SD**2 / (a**2 * SD**2 + sg**2) * (x - a * MU)).to(x.dtype)


def test_gauss_denoiser_matches_the_mixture_one():
    for key in SCHEDULES:
        s = schedule(key)
        x = torch.randn(7, 1, dtype=torch.float64) * 2
        for t in (torch.linspace(s.t_min, s.t_max, 7, dtype=torch.float64), torch.tensor(s.t_max / 3)):
            torch.testing.assert_close(Gauss(s)(x, t), GAUSS.denoiser(s)(x, t), rtol=1e-12, atol=1e-12)


def marginal_sample(gmm: GaussianMixture, schedule, n: int, seed: int) -> Tensor:
    """x_{t_max} drawn from the exact marginal (data pushed through the forward process), float64."""
    g = torch.Generator().manual_seed(seed)
    x0, _ = gmm.sample(n, g)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return schedule.marginal(x0.double(), eps, schedule.t_max)


def exact_law(name: str, schedule, grid: Tensor, seed: int = 0) -> tuple[float, float]:
    """(mean, variance) of sampler ``name``'s output on GAUSS for x_T from the exact marginal at grid[0]."""
    spec = SAMPLERS.get(name)
    den = Gauss(schedule)
    n = grid.numel() - 1
    M = n + 64  # more samples than noise draws, so the regression below is determined
    gens = [torch.Generator().manual_seed(seed) for _ in range(2)]
    out = [spec.fn(den, torch.full((M, 1), v, dtype=torch.float64), grid, generator=g, **spec.opts)
           for v, g in zip((0.0, 1.0), gens)]
    A = out[1] - out[0]
    assert float(A.max() - A.min()) < 1e-12, "output not affine in x_T with shared noise"
    a_T, s_T = float(schedule.alpha(grid[0])), float(schedule.sigma(grid[0]))
    A, m_T, v_T = float(A.mean()), a_T * MU, a_T**2 * SD**2 + s_T**2
    if torch.equal(gens[0].get_state(), torch.Generator().manual_seed(seed).get_state()):  # drew no noise
        assert float(out[0].max() - out[0].min()) == 0
        return A * m_T + float(out[0][0]), A**2 * v_T
    g = torch.Generator().manual_seed(seed)
    X = torch.cat([torch.ones(M, 1, dtype=torch.float64)]
                  + [torch.randn(M, 1, generator=g, dtype=torch.float64) for _ in range(n)], 1)
    coef = torch.linalg.lstsq(X, out[0]).solution
    assert float((X @ coef - out[0]).abs().max()) < 1e-9, "output not affine in the replayed noise draws"
    return A * m_T + float(coef[0]), A**2 * v_T + float((coef[1:] ** 2).sum())


def law_error(m: float, v: float) -> float:
    """Relative error of N(m, v) against the data N(MU, SD^2), in mean and in standard deviation."""
    return max(abs(m - MU), abs(math.sqrt(v) - SD)) / SD


# ---------------------------------------------------------------------------------------------
# Contract over the registry


class DDIMJump:
    """A diffusion denoiser seen as a first-order flow map, Phi(x, t, s) = one DDIM step: lets the registry-wide
    contract run the flow-map samplers (their students are tested in test_flow_map.py)."""

    def __init__(self, den) -> None:
        self.den, self.schedule = den, den.schedule

    @property
    def calls(self) -> int:
        return self.den.calls

    def jump(self, x: Tensor, t: Tensor, s: Tensor, cond=None) -> Tensor:
        return ddim(self.den, x, torch.stack([torch.as_tensor(t), torch.as_tensor(s)]).double(), cond=cond)


@pytest.mark.parametrize("name", NAMES)
def test_contract(name):
    """Callback per step, NFE as declared, dtype and shape kept, input untouched, same seed -> same output."""
    spec, s = SAMPLERS.get(name), make_schedule("vp_discrete")
    den = default_gmm().denoiser(s)
    if spec.fn is SAMPLERS.get("flowmap").fn:
        den = DDIMJump(den)
    x = marginal_sample(default_gmm(), s, 16, 0).float()
    x_copy = x.clone()
    infos: list[dict] = []
    outs = [run(name, den, x, 9, generator=torch.Generator().manual_seed(3), callback=infos.append) for _ in range(2)]
    n = steps_for_nfe(name, 9)
    assert den.calls == 2 * spec.nfe(n) and spec.nfe(n) <= 9
    assert len(infos) == 2 * n and [d["i"] for d in infos[:n]] == list(range(n))
    grid = make_grid(s, n)
    for i, d in enumerate(infos[:n]):
        assert set(d) == {"i", "t", "s", "x", "x0"} and float(d["t"]) == float(grid[i])
        assert float(d["s"]) == float(grid[i + 1]) and d["x"].shape == x.shape
    assert outs[0].dtype == torch.float32 and outs[0].shape == x.shape
    assert torch.equal(outs[0], outs[1]) and torch.equal(infos[n - 1]["x"], outs[0])
    assert torch.equal(x, x_copy)


# ---------------------------------------------------------------------------------------------
# Gaussian data: the exact output law


@pytest.mark.parametrize("key", list(SCHEDULES))
@pytest.mark.parametrize("name", SOLVERS)
def test_gaussian_law_converges(name, key):
    """At least first-order convergence of the output law to N(mu, s^2): 4x the steps, <= 1/3 the error,
    until the error reaches the floor set by the grid's smallest time (the last step jumps to x0_hat, whose
    law has std s * (1 - O(sigma^2 / (alpha^2 s^2))) at t_min). On the discrete DDPM schedule alpha is
    piecewise linear in t, and the derivative-based solvers (euler, heun) see its kinks: there at least 2x."""
    s = schedule(key)
    if name == "euler_maruyama" and float(s.alpha(s.t_max)) == 0:
        with pytest.raises(ValueError, match=r"euler_maruyama: alpha\(t_max\) = 0"):
            run(name, Gauss(s), torch.zeros(4, 1, dtype=torch.float64), 10)
        return
    e = [law_error(*exact_law(name, s, make_grid(s, n))) for n in (50, 200)]
    t_min = make_grid(s, 200)[-2]
    floor = float((s.sigma(t_min) / (s.alpha(t_min) * SD)) ** 2)
    ratio = 2 if key.startswith("vp_discrete") else 3
    assert e[1] <= max(e[0] / ratio, floor), (e, floor)
    assert e[1] < 0.035


@pytest.mark.parametrize("name", SOLVERS)
def test_gaussian_on_the_ddpm_grid(name):
    """On DDPM's own 1000-step grid (heun: 500 steps, 999 NFE) every sampler's exact output law is within
    1% of the data in mean and std (DDPM ancestral: mean exact, std -0.78%; DDIM: -0.30%). A 10^4-sample
    run with a fixed seed then matches both that law and the data within 4 standard errors of the sample
    count, which the discretisation error (<= 1.1 SE) stays well inside."""
    s = make_schedule("vp_discrete")
    grid = make_grid(s, 500 if name == "heun" else 1000)
    m, v = exact_law(name, s, grid)
    assert law_error(m, v) < 0.01
    N = 10_000
    x = SAMPLERS.get(name).fn(Gauss(s), marginal_sample(GAUSS, s, N, 1), grid,
                              generator=torch.Generator().manual_seed(2), **SAMPLERS.get(name).opts)
    mean, var = float(x.mean()), float(x.var())
    for ref_m, ref_v in ((m, v), (MU, SD**2)):
        assert abs(mean - ref_m) < 4 * math.sqrt(ref_v / N)
        assert abs(var - ref_v) < 4 * ref_v * math.sqrt(2 / (N - 1))


@pytest.mark.parametrize("name", SOLVERS)
def test_gmm_mixture_weights(name):
    """2-D mixture (weights 0.5/0.3/0.2): component frequencies within 4 standard errors of the count."""
    gmm, s, N = default_gmm(), make_schedule("vp_discrete"), 10_000
    x = run(name, gmm.denoiser(s), marginal_sample(gmm, s, N, 0), 100, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(gmm.assign(x), minlength=3).double() / N
    tol = 4 * (gmm.weights * (1 - gmm.weights) / N).sqrt()
    assert bool(((freq - gmm.weights).abs() < tol).all()), (freq, gmm.weights)
    # each sample sits on a component: within 5 std of its mean
    d = (x.double() - gmm.means[gmm.assign(x)]).norm(dim=1) / gmm.stds[0]
    assert float((d > 5).double().mean()) < 1e-3


# ---------------------------------------------------------------------------------------------
# DDIM eta = 1 is DDPM's ancestral sampler


@pytest.mark.parametrize(
    "make", [lambda s: make_grid(s, 1000, "trailing"), lambda s: make_grid(s, 50, "trailing"),
             lambda s: make_grid(s, 37, "leading"), lambda s: grid_from_indices(s, [999, 700, 420, 99, 5])],
    ids=["full", "trailing50", "leading37", "custom"],
)
def test_ddim_eta1_equals_ddpm(make):
    gmm, s = default_gmm(), make_schedule("vp_discrete")
    den, grid = gmm.denoiser(s), make(s)
    x = marginal_sample(gmm, s, 512, 0).float()
    a = ddim(den, x, grid, eta=1.0, generator=torch.Generator().manual_seed(7))
    b = ddpm(den, x, grid, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    c = ddim(den, x, grid, eta=1.0, generator=torch.Generator().manual_seed(8))
    assert float((a - c).abs().max()) > 0.1  # the noise matters: a different seed gives other samples
    if grid.numel() == 1001:
        torch.testing.assert_close(run("ddim_eta1", den, x, 1000, generator=torch.Generator().manual_seed(7)), b,
                                   rtol=0, atol=1e-5)


def test_ddim_eta_interpolates():
    """eta = 0 draws no noise (the generator is untouched); at 50 steps the sample std falls with eta
    (exact laws: 0.471 at eta = 0, 0.444 at eta = 1; gaps >> the 0.5% standard error of 2 10^4 samples)."""
    s = make_schedule("vp_discrete")
    den, grid = Gauss(s), make_grid(s, 50)
    x = marginal_sample(GAUSS, s, 20_000, 0)
    std = [float(ddim(den, x, grid, eta=eta, generator=torch.Generator().manual_seed(1)).std()) for eta in (0, 0.5, 1)]
    assert std[0] > std[1] + 0.005 > std[2] + 0.01 > 0.44, std
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    ddim(den, x[:3], grid, generator=g)
    assert torch.equal(g.get_state(), state)


# ---------------------------------------------------------------------------------------------
# DDIM inversion


@pytest.mark.parametrize("key", ["vp_discrete", "vp_linear", "edm", "flow"])
def test_ddim_inversion_round_trip(key):
    """Plain inversion (the denoiser at the known point) is first order: at 100 steps it misses x_0 by
    0.04-0.09 (Gaussian data, max over 1024 values), so it does not reach 1e-3, and halves with twice the
    steps. Fixed-point refinement makes each step the exact inverse of the sampling step: at 100 steps
    < 1e-3 after 2 iterations (5e-5 to 3e-4), < 1e-5 after 5 (4.5e-9 on the DDPM grid), monotone."""
    gauss4 = GaussianMixture(torch.full((1, 4), MU, dtype=torch.float64), SD)
    s = make_schedule(key)
    den = gauss4.denoiser(s)
    x0 = gauss4.sample(256, torch.Generator().manual_seed(0))[0].double()

    def err(n: int, iters: int) -> float:
        grid = make_grid(s, n)
        return float((ddim(den, ddim_invert(den, x0, grid, fixed_point_iters=iters), grid) - x0).abs().max())

    plain = [err(100, 0), err(200, 0)]
    assert 0.01 < plain[0] < 0.2 and 1.7 < plain[0] / plain[1] < 2.3, plain
    refined = [err(100, k) for k in (1, 2, 5)]
    assert plain[0] > refined[0] > refined[1] > refined[2] and refined[1] < 1e-3 and refined[2] < 1e-5, refined


@pytest.mark.parametrize("key", ["vp_discrete", "flow"])
def test_ddim_inversion_first_step_from_clean_data(key):
    """From x_0 (sigma = 0) the first step is x_t1 = alpha_t1 x_0 + sigma_t1 eps_hat, with eps_hat read at t1: on
    Gaussian data it lands nearer the exact ODE point (x_t1 = alpha mu + sqrt(alpha^2 SD^2 + sigma^2) z) than x_0,
    which the step used to return (it moved with the denoiser's x0_hat, which gives x_0 back) after a wasted call."""
    s = make_schedule(key)
    den = GAUSS.denoiser(s)
    x0 = GAUSS.sample(256, torch.Generator().manual_seed(0))[0].double()
    grid = make_grid(s, 10)
    first = []
    ddim_invert(den, x0, grid, callback=lambda d: first.append(d["x"]) if d["i"] == 0 else None)
    t1 = grid.flip(0)[1]
    a, sg = float(s.alpha(t1)), float(s.sigma(t1))
    exact = a * MU + (a**2 * SD**2 + sg**2) ** 0.5 * (x0 - MU) / SD
    assert float((first[0] - exact).norm()) < 0.8 * float((x0 - exact).norm())


def test_ddim_inversion_gmm():
    """On the mixture plain inversion fails outright (error ~1: samples change component); 10 fixed-point
    iterations per step bring the round trip to 1.6e-4 at 100 steps."""
    gmm, s = default_gmm(), make_schedule("vp_discrete")
    den, grid = gmm.denoiser(s), make_grid(s, 100)
    x0 = gmm.sample(256, torch.Generator().manual_seed(0))[0].double()
    xT = ddim_invert(den, x0, grid, fixed_point_iters=10)
    assert float((ddim(den, xT, grid) - x0).abs().max()) < 1e-3
    assert abs(float(xT.std()) - 1) < 0.1  # the inverted latents look like noise
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match=f"fixed_point_iters must be an int >= 0, got {bad}"):
            ddim_invert(den, x0, grid, fixed_point_iters=bad)


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance on the class-conditional GMM


class ClassGMM(nn.Module):
    """Exact class-conditional denoiser of a GMM (class k = component k); label K is the null class."""

    def __init__(self, gmm: GaussianMixture, schedule) -> None:
        super().__init__()
        self.schedule, self.K = schedule, len(gmm.weights)
        self.cond, self.uncond = gmm.denoiser(schedule, conditional=True), gmm.denoiser(schedule)

    def forward(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])
        out = self.uncond(x, t)
        m = cond != self.K if cond is not None else torch.zeros(x.shape[0], dtype=torch.bool)
        if bool(m.any()):
            out[m] = self.cond(x[m], t[m], cond[m])
        return out


def test_cfg_wrapper_formula():
    gmm, s = default_gmm(), make_schedule("vp_linear")
    den = ClassGMM(gmm, s)
    x = marginal_sample(gmm, s, 6, 0)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    null = torch.full_like(y, 3)
    for t in (torch.tensor(0.4, dtype=torch.float64), torch.linspace(0.1, 0.9, 6, dtype=torch.float64)):
        d_c, d_u = den(x, t, y), den(x, t, null)
        assert float((d_c - d_u).abs().max()) > 1e-3  # the classes differ here
        assert torch.equal(CFGDenoiser(den, 1.0, 3)(x, t, y), d_c)
        assert torch.equal(CFGDenoiser(den, 0.0, 3)(x, t, y), d_u)
        torch.testing.assert_close(CFGDenoiser(den, 2.5, 3)(x, t, y), d_u + 2.5 * (d_c - d_u), rtol=0, atol=1e-12)
        assert torch.equal(CFGDenoiser(den, 2.5, 3)(x, t, None), den(x, t, None))
    assert CFGDenoiser(den, 2.0, 3).schedule is s
    from dtrain.diffusion.denoiser import Denoiser

    t1 = torch.tensor([0.4], dtype=torch.float64)  # one time as [1], as a plain denoiser takes it
    torch.testing.assert_close(CFGDenoiser(den, 2.5, 3)(x, t1, y), CFGDenoiser(den, 2.5, 3)(x, t1[0], y))
    with pytest.raises(ValueError, match=r"t: \(4,\) times for a batch of 6"):
        CFGDenoiser(Denoiser(nn.Identity(), s, "x0"), 2.5, 3)(x, torch.rand(4), y)
    with pytest.raises(ValueError, match=r"guidance: 2 scales for a batch of 6"):
        CFGDenoiser(den, torch.tensor([1.0, 2.0]), 3)(x, t, y)
    with pytest.raises(TypeError, match=r"guidance: cond must be a LongTensor of labels, got list"):
        CFGDenoiser(den, 2.0, 3)(x, t, [0, 1])


@pytest.mark.parametrize("name", SOLVERS)
def test_cfg_with_every_sampler(name):
    """w = 1 samples the chosen component (mean within 4 SE + 0.01 of mu_k), w = 0 ignores the label
    (mixture weights within 4 SE), w = 3 still lands every sample on its class."""
    gmm, s, N = default_gmm(), make_schedule("vp_discrete"), 3000
    den = ClassGMM(gmm, s)
    x = marginal_sample(gmm, s, N, 0)
    y = torch.arange(N) % 3

    def sample(w: float) -> Tensor:
        return run(name, CFGDenoiser(den, w, 3), x, 60, cond=y, generator=torch.Generator().manual_seed(1))

    for w in (1.0, 3.0):
        out = sample(w)
        assert float((gmm.assign(out) == y).double().mean()) > 0.995, w
    out = sample(1.0)
    for k in range(3):
        se = float(gmm.stds[k]) / math.sqrt(N / 3)
        assert float((out[y == k].mean(0) - gmm.means[k]).abs().max()) < 4 * se + 0.01
    freq = torch.bincount(gmm.assign(sample(0.0)), minlength=3).double() / N
    assert bool(((freq - gmm.weights).abs() < 4 * (gmm.weights * (1 - gmm.weights) / N).sqrt()).all()), freq


class TwoValued(nn.Module):
    """x0-network: +3 for label 0, -3 for the null label 1."""

    def forward(self, x: Tensor, c_noise: Tensor, cond: Tensor) -> Tensor:
        return torch.where(cond == 1, -3.0, 3.0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))).expand_as(x)


@pytest.mark.parametrize(("w", "want"), [(0.6, 0.6), (1.5, 1.0), (0.25, -1.0), (1.0, 1.0)])
def test_cfg_clips_the_guided_x0_once(w, want):
    """With ``clip_x0`` the branches are combined unclipped and the guided x0 clipped (guide, then clip): clipping
    each branch first would give -1 + w * 2 (0.2 for w = 0.6, 2.0 for w = 1.5, outside the range)."""
    from dtrain.diffusion.denoiser import Denoiser

    den = Denoiser(TwoValued(), make_schedule("vp_linear"), "x0", clip_x0=1.0)
    x, y = torch.randn(4, 2, dtype=torch.float64), torch.zeros(4, dtype=torch.long)
    torch.testing.assert_close(CFGDenoiser(den, w, 1)(x, 0.5, y), torch.full_like(x, want), rtol=0, atol=1e-12)


def test_clipped_denoiser_keeps_x_t_consistent():
    """With ``clip_x0`` the eps (and every other parameterization) is recomputed from the clipped x0:
    alpha x0_hat + sigma eps_hat = x_t still (an eps left unclipped would put the DDIM step off the line)."""
    from dtrain.diffusion.denoiser import Denoiser

    sch = make_schedule("vp_linear")
    den = Denoiser(TwoValued(), sch, "x0", clip_x0=1.0)
    x, y, t = torch.randn(4, 2, dtype=torch.float64), torch.zeros(4, dtype=torch.long), torch.tensor(0.5)
    x0, eps = den.predict(x, t, y, kind="x0"), den.predict(x, t, y, kind="eps")
    assert float(x0.abs().max()) == 1.0  # clipped from 3
    torch.testing.assert_close(sch.alpha(t) * x0 + sch.sigma(t) * eps, x, rtol=0, atol=1e-12)


def test_dpm_solver_2s_per_sample_falls_back_to_ddim_only_where_lambda_is_infinite():
    """Per-sample times with one row landing on s = 0 (lambda = inf): that row takes the DDIM step, the finite row
    the same 2S step as a 0-d call t -> s."""
    from dtrain.samplers.dpm_solver import dpm_solver_2s_step

    gauss = Gauss(make_schedule("vp_cosine"))
    x = torch.randn(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t, s = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([0.2, 0.0], dtype=torch.float64)
    both, _ = dpm_solver_2s_step(gauss, x, t, s)
    alone, _ = dpm_solver_2s_step(gauss, x[:1], torch.tensor(0.5, dtype=torch.float64),
                                  torch.tensor(0.2, dtype=torch.float64))
    torch.testing.assert_close(both[:1], alone, rtol=0, atol=1e-12)
    last, _ = dpm_solver_2s_step(gauss, x[1:], torch.tensor(0.5, dtype=torch.float64),
                                 torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(both[1:], last, rtol=0, atol=1e-12)


def test_slerp_with_one_alpha_per_sample():
    from dtrain.samplers.ddim import slerp

    z0, z1 = torch.randn(2, 3, 4, 2), torch.randn(2, 3, 4, 2)  # last dim = batch: a broadcast slip would run
    out = slerp(z0, z1, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out[0], z0[0])
    torch.testing.assert_close(out[1], z1[1])
    torch.testing.assert_close(slerp(z0, z1, torch.tensor([0.3, 0.3])), slerp(z0, z1, 0.3))


def test_grid_beyond_the_schedule_is_refused():
    s = make_schedule("flow")
    with pytest.raises(ValueError, match=r"grid: times must lie in \[0, t_max = 1.0\] of the 'flow' schedule, got 2.0"):
        ddim(Gauss(s), torch.zeros(2, 1, dtype=torch.float64), torch.tensor([2.0, 0.5, 0.0]))


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("name", NAMES)
def test_bad_grids_raise(name):
    spec, s = SAMPLERS.get(name), make_schedule("vp_linear")
    den, x = Gauss(s), torch.zeros(2, 1, dtype=torch.float64)
    for grid in (torch.tensor([0.1, 0.5, 0.0]), torch.tensor([1.0, 0.5, 0.5, 0.0]), torch.tensor([0.5, -0.1])):
        with pytest.raises(ValueError, match="grid: times must be strictly decreasing and >= 0"):
            spec.fn(den, x, grid, **spec.opts)
    for grid in (torch.tensor([[1.0, 0.5, 0.0]]), torch.tensor([1.0])):
        with pytest.raises(ValueError, match="grid: must be a 1-D tensor of at least 2 times"):
            spec.fn(den, x, grid, **spec.opts)
    assert den.calls == 0


def test_numpy_step_counts_and_one_element_times():
    """numpy ints count as step counts (a sweep over np.arange); a [1] time with a batch of 3 reaches the network
    as c_noise [3]; a step count that is no int is an InputError naming nfe."""
    import numpy as np

    from dtrain.diffusion.denoiser import Denoiser, time_batch
    from dtrain.errors import InputError

    s = make_schedule("vp_linear")
    torch.testing.assert_close(make_grid(s, np.int64(3)), make_grid(s, 3))
    den, x = Gauss(s), torch.zeros(2, 1, dtype=torch.float64)
    torch.testing.assert_close(run("ddim", den, x, np.int64(4)), run("ddim", den, x, 4))
    for bad in ("10", 2.5, True):
        with pytest.raises(InputError, match=r"nfe: must be an int >= 1"):
            run("ddim", den, x, bad)
    seen = []

    class Spy(nn.Module):
        def forward(self, x, c_noise, cond):
            seen.append(c_noise.shape)
            return torch.zeros_like(x)

    assert time_batch(torch.tensor([0.5]), torch.zeros(3, 2)).shape == (3,)
    Denoiser(Spy(), s, "eps")(torch.zeros(3, 2), torch.tensor([0.5]))
    assert seen == [torch.Size([3])]


def test_bad_options_raise():
    s = make_schedule("vp_linear")
    den, x, grid = Gauss(s), torch.zeros(2, 1, dtype=torch.float64), make_grid(s, 4)
    with pytest.raises(KeyError, match=r"sampler: unknown sampler 'dpm\+\+4m'; choose one of \[.*'ddim'"):
        run("dpm++4m", den, x, 10)
    with pytest.raises(KeyError, match="unknown sampler 'unipc'"):
        SAMPLERS.get("unipc")
    for eta in (-0.1, 1.5):
        with pytest.raises(ValueError, match=rf"ddim: eta must be in \[0, 1\], got {eta}"):
            ddim(den, x, grid, eta=eta)
    with pytest.raises(ValueError, match="dpm_solver_pp: order must be 1, 2 or 3, got 4"):
        dpm_solver_pp(den, x, grid, order=4)
    with pytest.raises(ValueError, match="ddpm: variance must be 'small' or 'large', got 'learned'"):
        ddpm(den, x, grid, variance="learned")
    with pytest.raises(TypeError):
        run("ddim", den, x, 4, temperature=0.5)  # an option the sampler does not take
    assert den.calls == 0


def test_exact_denoiser_null_label_is_the_unconditional_mean():
    """The class-conditional exact GMM denoiser reads the CFG null class (K) as 'no label', per sample, so CFG
    wrappers can drive it; an empty batch passes through."""
    gmm, s = default_gmm(), make_schedule("vp_cosine")
    cond, unc = gmm.denoiser(s, conditional=True), gmm.denoiser(s)
    x, t = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64), torch.tensor(0.6)
    labels = torch.tensor([0, 3, 1, 3, 2, 0])
    out = cond(x, t, labels)
    torch.testing.assert_close(out[[1, 3]], unc(x, t)[[1, 3]], rtol=0, atol=0)
    for i in (0, 2, 4, 5):
        torch.testing.assert_close(out[i : i + 1], cond(x[i : i + 1], t, labels[i : i + 1]), rtol=0, atol=0)
    assert not torch.allclose(out[0], unc(x, t)[0])
    assert cond(torch.zeros(0, 2), t, torch.zeros(0, dtype=torch.long)).shape == (0, 2)
    guided = CFGDenoiser(cond, 3.0, gmm.means.shape[0])
    torch.testing.assert_close(guided(x, t, labels[[0, 2, 4, 5]].repeat(2)[:6]),
                               3.0 * cond(x, t, labels[[0, 2, 4, 5]].repeat(2)[:6]) - 2.0 * unc(x, t))


@pytest.mark.parametrize("name", ["euler", "heun"])
@pytest.mark.parametrize("sched", ["ddpm", "vp_cosine", "edm", "flow"])
def test_euler_and_heun_land_on_the_denoised_estimate(name, sched):
    """The step to t = 0 returns x0_hat on every schedule (EDM's sigma-space step to 0 and the flow's step are exactly
    that); a straight step in t on VP kept (sigma - t sigma') eps_hat of noise: std 0.27 at 4 steps on ddpm."""
    sch = make_schedule(sched)
    den = default_gmm().denoiser(sch)
    seen = []
    x_T = float(sch.sigma(sch.t_max)) * torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
    x = run(name, den, x_T, 4 if name == "euler" else 7, callback=seen.append)
    assert float(seen[-1]["s"]) == 0.0 and torch.equal(x, seen[-1]["x0"])


def test_a_half_precision_state_is_integrated_in_float32():
    """bf16 noise is integrated in float32 and returned in bf16 (in bf16 the state lost the sample: max error 1.5 at
    1000 DDIM steps against float64)."""
    den = default_gmm().denoiser(make_schedule("ddpm"))
    x_T = torch.randn(256, 2, generator=torch.Generator().manual_seed(0)).bfloat16()
    x = run("ddim", den, x_T, 200)
    assert x.dtype == torch.bfloat16 and torch.equal(x, run("ddim", den, x_T.float(), 200).bfloat16())


def test_ddim_inversion_of_half_precision_data_runs_in_float32():
    """ddim_invert widens a bf16 x_0 as ``run`` does (in bf16 the state lost the latent: error 0.9 at 1000 steps)."""
    den = default_gmm().denoiser(make_schedule("ddpm"))
    x0 = default_gmm().sample(256, generator=torch.Generator().manual_seed(0))[0].bfloat16()
    grid = make_grid(den.schedule, 200)
    x = ddim_invert(den, x0, grid)
    assert x.dtype == torch.bfloat16 and torch.equal(x, ddim_invert(den, x0.float(), grid).bfloat16())


def test_per_sample_heun_steps_to_zero_are_refused():
    from dtrain.samplers.heun import heun_step

    den = default_gmm().denoiser(make_schedule("edm"))
    t = torch.full((3,), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"heun_step: per-sample target times s must be > 0"):
        heun_step(den, torch.randn(3, 2), t, torch.tensor([0.0, 0.2, 0.0], dtype=torch.float64))

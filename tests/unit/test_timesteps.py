"""Sampler grids (against diffusers and the EDM formula), respacing, validation, and training-time sampling."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dtrain.diffusion.schedule import make_schedule
from dtrain.diffusion.timesteps import (
    SPACINGS,
    TIME_SAMPLERS,
    check_grid,
    default_spacing,
    grid_from_indices,
    make_grid,
    sample_t,
)

CONTINUOUS = {"uniform", "quadratic", "lambda", "rho", "geometric"}
SCHEDULES = ["vp_discrete", "vp_linear", "vp_cosine", "edm", "ve", "flow"]


def indices(grid: torch.Tensor, T: int = 1000) -> torch.Tensor:
    """DDPM indices of a discrete grid's noisy points."""
    idx = grid[:-1] * T - 1
    assert torch.equal(idx, idx.round()), "grid points are not DDPM knots"
    return idx.round().long()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_discrete_spacings_equal_diffusers(spacing):
    """Every n in 1..T: the same DDPM indices as diffusers' DDIMScheduler.set_timesteps."""
    diffusers = pytest.importorskip("diffusers")
    s = make_schedule("vp_discrete")
    ref = diffusers.DDIMScheduler(timestep_spacing=spacing)
    stray = []
    for n in range(1, 1001):
        ref.set_timesteps(n)
        theirs, ours = ref.timesteps, indices(make_grid(s, n, spacing))
        if theirs.numel() == n + 1:  # diffusers' float arange overshoots and appends index -1
            assert spacing == "trailing" and int(theirs[-1]) == -1
            theirs, _ = theirs[:-1], stray.append(n)
        assert torch.equal(ours, theirs), (spacing, n)
    if spacing == "trailing":  # the known overshoots (T = 1000), kept as a record
        assert stray[:6] == [61, 103, 121, 122, 201, 206] and len(stray) == 62


def test_leading_offset_and_other_schedulers_equal_diffusers():
    diffusers = pytest.importorskip("diffusers")
    s = make_schedule("vp_discrete")
    for n in (10, 50, 333):
        ref = diffusers.DDIMScheduler(timestep_spacing="leading", steps_offset=1)
        ref.set_timesteps(n)
        assert torch.equal(indices(make_grid(s, n, "leading", offset=1)), ref.timesteps)
        for cls in (diffusers.DDPMScheduler, diffusers.DPMSolverMultistepScheduler):
            ref = cls(timestep_spacing="trailing")
            ref.set_timesteps(n)
            assert torch.equal(indices(make_grid(s, n, "trailing")), ref.timesteps.long()), (cls.__name__, n)
        # DPM-Solver's own linspace (n + 1 points, the last dropped) is a respacing: any index subsequence
        ref = diffusers.DPMSolverMultistepScheduler()
        ref.set_timesteps(n)
        assert torch.equal(indices(grid_from_indices(s, ref.timesteps)), ref.timesteps.long())


@pytest.mark.parametrize("key", ["edm", "vp_linear", "vp_discrete"])
@pytest.mark.parametrize("n", [1, 2, 18, 40])
def test_rho_grid_equals_edm_formula(key, n):
    """sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho in sigma / alpha (EDM eq. 5)."""
    s, rho = make_schedule(key), 7.0
    g = make_grid(s, n, "rho")
    r = s.sigma(g[:-1]) / s.alpha(g[:-1])
    r_max, r_min = float(s.sigma(s.t_max) / s.alpha(s.t_max)), float(s.sigma(s.t_min) / s.alpha(s.t_min))
    i = torch.arange(n, dtype=torch.float64)
    u = i / (n - 1) if n > 1 else i
    want = (r_max ** (1 / rho) + u * (r_min ** (1 / rho) - r_max ** (1 / rho))) ** rho
    torch.testing.assert_close(r, want, rtol=1e-9, atol=0)
    if key == "edm":  # sigma is the time: the grid is the formula itself
        torch.testing.assert_close(g[:-1], want, rtol=1e-12, atol=0)
        assert float(g[0]) == 80.0 and (n == 1 or float(g[-2]) == 0.002)


def test_other_continuous_spacings():
    vp = make_schedule("vp_linear")
    lam = vp.lambda_(make_grid(vp, 20, "lambda")[:-1])
    torch.testing.assert_close(lam.diff(), torch.full((19,), float(lam.diff()[0]), dtype=torch.float64), rtol=1e-9,
                               atol=0)
    ve = make_schedule("ve")
    g = make_grid(ve, 10, "geometric")
    torch.testing.assert_close(g[:-1].log().diff(), torch.full((9,), math.log(0.01 / 50) / 9, dtype=torch.float64),
                               rtol=1e-9, atol=0)
    flow = make_schedule("flow")  # t_min = 0: the grid's own last point is the clean end
    assert torch.equal(make_grid(flow, 4, "uniform"), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    q = make_grid(vp, 4, "quadratic")[:-1]
    torch.testing.assert_close(q.sqrt().diff(), torch.full((3,), (math.sqrt(1e-3) - 1) / 3, dtype=torch.float64),
                               rtol=1e-12, atol=0)
    assert [default_spacing(make_schedule(k)) for k in SCHEDULES] == ["trailing", "lambda", "lambda", "rho",
                                                                      "geometric", "uniform"]


def _spacings(key: str) -> list[str]:
    s = make_schedule(key)
    out = [sp for sp in SPACINGS if sp in CONTINUOUS or s.discrete_steps]
    return [sp for sp in out if not (s.t_min == 0 and sp not in ("uniform", "quadratic"))]


@pytest.mark.parametrize("key", SCHEDULES)
def test_grid_invariants(key):
    s = make_schedule(key)

    @settings(max_examples=40, deadline=None, derandomize=True)
    @given(n=st.integers(1, 1000), spacing=st.sampled_from(_spacings(key)))
    def check(n, spacing):
        g = make_grid(s, n, spacing)
        assert g.dtype == torch.float64 and g.ndim == 1 and g.numel() == n + 1
        assert float(g[-1]) == 0.0 and bool((g[1:] < g[:-1]).all())
        assert float(g[0]) <= s.t_max and float(g[-2]) >= s.t_min
        if spacing not in ("leading", "linspace"):
            assert float(g[0]) == s.t_max
        assert torch.equal(check_grid(g), g)

    check()


def test_grid_from_indices_respacing():
    s = make_schedule("vp_discrete")
    g = grid_from_indices(s, [10, 999, 500, 500])  # any order, duplicates dropped (Nichol & Dhariwal's respacing)
    assert torch.equal(g, torch.tensor([1.0, 0.501, 0.011, 0.0], dtype=torch.float64))
    torch.testing.assert_close(s.c_noise(g[:-1]), torch.tensor([999.0, 500.0, 10.0], dtype=torch.float64),
                               rtol=0, atol=1e-9)
    assert torch.equal(grid_from_indices(s, [999.0, 10.0]), grid_from_indices(s, [999, 10]))  # integral floats
    for bad in ([999.7, 10.2], [[1, 2], [3, 4]], [True, False]):  # were truncated / flattened silently
        with pytest.raises(ValueError, match=r"grid: indices must be a flat sequence of ints"):
            grid_from_indices(s, bad)


def test_bad_inputs_raise():
    vp, flow, d = make_schedule("vp_linear"), make_schedule("flow"), make_schedule("vp_discrete")
    for n in (0, -3, 2.5, "10"):
        with pytest.raises(ValueError, match="number of steps must be a positive int"):
            make_grid(vp, n)
    with pytest.raises(ValueError, match=r"grid\.spacing: unknown spacing 'karras'; choose one of"):
        make_grid(vp, 10, "karras")
    with pytest.raises(ValueError, match=r"'trailing' needs a discrete schedule, not 'vp_linear'"):
        make_grid(vp, 10, "trailing")
    with pytest.raises(ValueError, match="1001 steps exceed the schedule's 1000 training steps"):
        make_grid(d, 1001, "trailing")
    for spacing in ("trailing", "leading", "linspace"):  # DDPM indices span all T steps: a t_max would be ignored
        with pytest.raises(ValueError, match=rf"grid\.t_max / t_min: spacing '{spacing}' places DDPM indices"):
            make_grid(d, 4, spacing, t_max=0.5)
    for spacing in ("leading", "linspace"):  # diffusers' one-step grid sits at the first index: a warning
        with pytest.warns(UserWarning, match=rf"one step with spacing '{spacing}' evaluates only near t = 0"):
            assert make_grid(d, 1, spacing).tolist() == [0.001, 0.0]
    with pytest.raises(ValueError, match="need 0 <= t_min < t_max"):
        make_grid(vp, 10, "uniform", t_min=0.5, t_max=0.4)
    with pytest.raises(ValueError, match="'lambda' needs t_min > 0"):
        make_grid(flow, 10, "lambda")
    with pytest.raises(ValueError, match=r"'rho' needs alpha\(t_max\) > 0, but alpha\(1.0\) = 0 for 'flow'"):
        make_grid(flow, 10, "rho", t_min=1e-3)  # log-SNR is -inf at the pure-noise end
    ztsnr = make_schedule("vp_discrete", zero_terminal_snr=True)
    with pytest.raises(ValueError, match="'lambda' needs alpha"):
        make_grid(ztsnr, 10, "lambda")
    assert make_grid(ztsnr, 10, "lambda", t_max=0.999).isfinite().all()
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 999\]"):
        grid_from_indices(d, [1000, 3])
    with pytest.raises(ValueError, match="index subsequences need a discrete schedule"):
        grid_from_indices(vp, [3, 2])
    for g in (torch.tensor([0.1, 0.5, 0.0]), torch.tensor([1.0, 0.5, 0.5, 0.0]), torch.tensor([1.0, -0.5]),
              torch.tensor([1.0, float("nan"), 0.0])):
        with pytest.raises(ValueError, match="strictly decreasing and >= 0"):
            check_grid(g)
    for g in (torch.tensor([[1.0, 0.0]]), torch.tensor([1.0]), [1.0, 0.0]):
        with pytest.raises(ValueError, match="1-D tensor of at least 2 times"):
            check_grid(g)


# ---------------------------------------------------------------------------------------------
# Training-time sampling


@pytest.mark.parametrize("kind", TIME_SAMPLERS)
def test_sample_t_ranges(kind):
    s = make_schedule("vp_discrete" if kind == "uniform_discrete" else "edm")
    t = sample_t(s, 20000, kind, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float64 and t.shape == (20000,)
    assert float(t.min()) >= s.t_min and float(t.max()) <= s.t_max
    if kind == "uniform_discrete":
        idx = t * 1000 - 1
        assert torch.equal(idx, idx.round()) and int(idx.min()) == 0 and int(idx.max()) == 999


def test_sample_t_distributions():
    """Moments within 5 standard errors of the sample count (n = 20000, fixed seed)."""
    n, g = 20000, torch.Generator().manual_seed(1)
    edm = make_schedule("edm")
    z = torch.log(sample_t(edm, n, "lognormal", generator=g))  # unset: EDM's ln sigma ~ N(-1.2, 1.2^2)
    assert abs(float(z.mean()) + 1.2) < 5 * 1.2 / math.sqrt(n)
    assert abs(float(z.std()) - 1.2) < 5 * 1.2 / math.sqrt(2 * n)
    flow = make_schedule("flow")
    u = sample_t(flow, n, "logit_normal", generator=g)  # unset: SD3's logit(t) ~ N(0, 1)
    logit = torch.log(u / (1 - u))
    assert abs(float(logit.mean())) < 5 / math.sqrt(n) and abs(float(logit.std()) - 1) < 5 / math.sqrt(2 * n)
    shifted = sample_t(flow, n, "logit_normal", generator=torch.Generator().manual_seed(2), p_mean=0.5, p_std=2.0)
    logit = torch.log(shifted / (1 - shifted))
    assert abs(float(logit.mean()) - 0.5) < 10 / math.sqrt(n) and abs(float(logit.std()) - 2) < 10 / math.sqrt(2 * n)
    vp = make_schedule("vp_linear")
    u = sample_t(vp, n, "uniform", generator=g)
    assert abs(float(u.mean()) - (1e-3 + 1) / 2) < 5 * (1 / math.sqrt(12)) / math.sqrt(n)
    with pytest.raises(ValueError, match=r"method\.time_sampling: unknown 'beta'"):
        sample_t(vp, 4, "beta")
    with pytest.raises(ValueError, match="'uniform_discrete' needs a discrete schedule"):
        sample_t(vp, 4, "uniform_discrete")

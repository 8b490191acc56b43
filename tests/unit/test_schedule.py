"""Schedules: identities, inverses, derivatives, DDPM knots (against torch and diffusers), round trips, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dtrain.diffusion.schedule import (
    SCHEDULES,
    DiscreteVP,
    FlowSchedule,
    SigmaSchedule,
    VPCosine,
    VPLinear,
    cosine_betas,
    linear_betas,
    make_schedule,
    matched_time,
    schedule_from_config,
    transition,
)
from dtrain.diffusion.timesteps import make_grid

# Every registered name, with the DDPM variants spelled out; test_every_registered_schedule_is_covered
# fails when a schedule is registered without being added here.
CONFIGS = {
    "vp_discrete": ("vp_discrete", {}),
    "vp_discrete_cosine": ("vp_discrete", {"kind": "cosine"}),
    "vp_discrete_ztsnr": ("vp_discrete", {"zero_terminal_snr": True}),
    "vp_discrete_short": ("vp_discrete", {"T": 50, "beta_start": 1e-3, "beta_end": 0.2}),
    "ddpm": ("ddpm", {}),
    "vp_linear": ("vp_linear", {}),
    "vp_cosine": ("vp_cosine", {}),
    "edm": ("edm", {}),
    "ve": ("ve", {}),
    "flow": ("flow", {}),
}
VP = [k for k, (name, _) in CONFIGS.items() if name in ("vp_discrete", "ddpm", "vp_linear", "vp_cosine")]


def sched(key: str):
    name, kw = CONFIGS[key]
    return make_schedule(name, **kw)


def dense(s, n: int = 2001, lo: float = 0.0) -> torch.Tensor:
    return torch.linspace(lo, s.t_max, n, dtype=torch.float64)


def test_every_registered_schedule_is_covered():
    assert {name for name, _ in CONFIGS.values()} == set(SCHEDULES)


@pytest.mark.parametrize("key", VP)
def test_vp_preserves_variance(key):
    s = sched(key)
    t = dense(s)
    torch.testing.assert_close(s.alpha(t) ** 2 + s.sigma(t) ** 2, torch.ones_like(t), rtol=0, atol=1e-14)


@pytest.mark.parametrize("key", list(CONFIGS))
def test_clean_end_and_dtype(key):
    s = sched(key)
    assert float(s.alpha(0.0)) == 1.0 and float(s.sigma(0.0)) == 0.0
    assert s.lambda_(0.0) == math.inf
    t = dense(s, 11).float()  # float32 input still computes in float64
    for f in (s.alpha, s.sigma, s.lambda_, s.alpha_dot, s.sigma_dot, s.c_noise):
        assert f(t).dtype == torch.float64
    assert 0 <= s.t_min < s.t_max


@pytest.mark.parametrize("key", list(CONFIGS))
def test_lambda_strictly_decreasing(key):
    s = sched(key)
    lam = s.lambda_(dense(s, 4001))
    assert bool((lam[1:] < lam[:-1]).all())
    assert not bool(lam.isnan().any())


@pytest.mark.parametrize("key", list(CONFIGS))
def test_t_from_lambda_inverts_lambda(key):
    s = sched(key)

    @settings(max_examples=150, deadline=None, derandomize=True)
    @given(st.floats(min_value=s.t_min, max_value=s.t_max, allow_nan=False))
    def check(t: float) -> None:
        back = float(s.t_from_lambda(s.lambda_(t)))
        assert abs(back - t) <= 1e-6 * max(1.0, t), (t, back)

    check()
    t = dense(s, 1001, lo=s.t_min)  # and vectorised, including both ends
    torch.testing.assert_close(s.t_from_lambda(s.lambda_(t)), t, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("key", list(CONFIGS))
def test_t_from_lambda_at_infinite_log_snr(key):
    """lambda = +inf is t = 0 (never below); lambda = -inf is the end of time, t_max or beyond (inf where alpha
    never reaches 0), never NaN: matched_time clamps it to t_max, a NaN passed through the clamp."""
    s = sched(key)
    clean, noise = s.t_from_lambda(torch.tensor([math.inf, -math.inf], dtype=torch.float64))
    assert float(clean) >= 0 and float(clean) <= s.t_min
    assert not bool(noise.isnan()) and float(noise) >= s.t_max
    assert float(matched_time(make_schedule("flow"), s, torch.tensor([1.0], dtype=torch.float64))[0][0]) == s.t_max


@pytest.mark.parametrize("key", list(CONFIGS))
def test_derivatives_match_finite_differences(key):
    s = sched(key)
    if isinstance(s, DiscreteVP):  # piecewise linear in t: difference within a segment, away from knots
        t = (torch.arange(1, s.T - 1, dtype=torch.float64) + 0.5) / s.T
    else:
        t = torch.linspace(s.t_min, s.t_max, 401, dtype=torch.float64)[1:-1]
    h = 1e-6 * torch.clamp(t, min=1.0)
    for f, df in ((s.alpha, s.alpha_dot), (s.sigma, s.sigma_dot)):
        fd = (f(t + h) - f(t - h)) / (2 * h)
        torch.testing.assert_close(df(t), fd, rtol=1e-6, atol=1e-6)


def test_closed_forms():
    """Hand formulas of each family at a few points."""
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    lin = VPLinear(beta_min=0.1, beta_max=20.0)
    torch.testing.assert_close(lin.alpha(t) ** 2, torch.exp(-(0.1 * t + 0.5 * 19.9 * t**2)), rtol=1e-14, atol=0)
    torch.testing.assert_close(lin.alpha_dot(t), -0.5 * (0.1 + 19.9 * t) * lin.alpha(t), rtol=1e-14, atol=0)
    cos = VPCosine(s=0.008)
    f = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    torch.testing.assert_close(cos.alpha(t) ** 2, f / math.cos(0.008 / 1.008 * math.pi / 2) ** 2, rtol=1e-14, atol=0)
    edm = make_schedule("edm")
    torch.testing.assert_close(edm.sigma(t * 80), t * 80, rtol=0, atol=0)
    torch.testing.assert_close(edm.lambda_(t), -torch.log(t), rtol=1e-15, atol=0)
    torch.testing.assert_close(edm.c_noise(t), 250 * torch.log(t), rtol=1e-15, atol=0)  # EDM: ln(sigma) / 4
    flow = FlowSchedule()
    torch.testing.assert_close(flow.lambda_(t), torch.log((1 - t) / t), rtol=1e-14, atol=1e-15)
    assert float(flow.alpha(1.0)) == 0.0 and flow.lambda_(1.0) == -math.inf


@pytest.mark.parametrize("key", list(CONFIGS))
def test_transition_composes(key):
    s = sched(key)
    ts = torch.linspace(s.t_min, s.t_max, 7, dtype=torch.float64)
    t, u = ts[1:], ts[:-1]  # u < t
    a_tu, var = transition(s, t, u)
    if bool((s.alpha(t) > 0).all()):
        torch.testing.assert_close(a_tu * s.alpha(u), s.alpha(t), rtol=1e-13, atol=0)
    torch.testing.assert_close(a_tu**2 * s.sigma(u) ** 2 + var, s.sigma(t) ** 2, rtol=1e-12, atol=1e-14)
    assert bool((var >= 0).all())


def test_marginal_broadcasts_per_sample_time():
    s = make_schedule("vp_linear")
    x0, eps = torch.randn(3, 2, 4, dtype=torch.float64), torch.randn(3, 2, 4, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    xt = s.marginal(x0, eps, t)
    for i in range(3):
        torch.testing.assert_close(xt[i], s.alpha(t[i]) * x0[i] + s.sigma(t[i]) * eps[i], rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------------------------
# DDPM's discrete schedule


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_discrete_knots_are_cumprod_exactly(kind):
    s = DiscreteVP(kind=kind)
    betas = linear_betas(1000, 1e-4, 0.02) if kind == "linear" else cosine_betas(1000)
    ac = torch.cumprod(1 - betas, 0)
    assert torch.equal(s.alphas_cumprod, ac)
    assert torch.equal(s.knots, torch.cat([torch.ones(1, dtype=torch.float64), ac.sqrt()]))
    t = torch.arange(1001, dtype=torch.float64) / 1000  # knot i / T holds sqrt(alphas_cumprod[i - 1])
    torch.testing.assert_close(s.alpha(t), s.knots, rtol=1e-15, atol=1e-18)
    torch.testing.assert_close(s.sigma(t[1:]) ** 2, 1 - ac, rtol=0, atol=1e-15)
    assert torch.equal(s.c_noise(t[1:]), torch.arange(1000, dtype=torch.float64))  # the DDPM index
    if kind == "linear":
        assert torch.equal(s.alpha(t), s.knots)


def test_discrete_betas_formulas():
    torch.testing.assert_close(linear_betas(5, 0.1, 0.5), torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64))
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    expect = [min(1 - f((i + 1) / 10) / f(i / 10), 0.999) for i in range(10)]
    torch.testing.assert_close(cosine_betas(10), torch.tensor(expect, dtype=torch.float64), rtol=1e-14, atol=0)
    assert float(cosine_betas(1000).max()) == 0.999  # clipped


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ({}, {}),
        ({"kind": "cosine"}, {"beta_schedule": "squaredcos_cap_v2"}),
        ({"zero_terminal_snr": True}, {"rescale_betas_zero_snr": True}),
        ({"T": 200, "beta_start": 5e-4, "beta_end": 0.05}, {"num_train_timesteps": 200, "beta_start": 5e-4,
                                                            "beta_end": 0.05}),
    ],
)
def test_discrete_equals_diffusers_alphas_cumprod(ours, theirs):
    """Equal to diffusers' float32 alphas_cumprod up to float32 rounding (theirs is computed in float32)."""
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(**theirs).alphas_cumprod.double()
    s = DiscreteVP(**ours)
    assert s.T == ref.numel()
    torch.testing.assert_close(s.alphas_cumprod, ref, rtol=0, atol=1e-6)


def test_zero_terminal_snr():
    base, z = DiscreteVP(), DiscreteVP(zero_terminal_snr=True)
    assert float(z.alphas_cumprod[-1]) == 0.0 and float(z.alpha(1.0)) == 0.0 and float(z.sigma(1.0)) == 1.0
    assert z.lambda_(1.0) == -math.inf and float(z.t_from_lambda(-math.inf)) == 1.0
    torch.testing.assert_close(z.alphas_cumprod[0], base.alphas_cumprod[0], rtol=1e-14, atol=0)  # first step kept
    # sqrt(alpha_bar) is shifted and scaled linearly (Lin et al. 2023, Algorithm 1)
    a, b = base.knots[1:], z.knots[1:]
    torch.testing.assert_close(b, (a - a[-1]) * a[0] / (a[0] - a[-1]), rtol=1e-14, atol=1e-16)


def test_custom_alphas_cumprod():
    ac = torch.cumprod(1 - linear_betas(100, 1e-3, 0.05), 0).float()  # e.g. a diffusers checkpoint's float32 values
    s = DiscreteVP(alphas_cumprod=ac)
    assert s.T == 100 and s.kind == "custom" and torch.equal(s.alphas_cumprod, ac.double())


# ---------------------------------------------------------------------------------------------
# Round trips and errors


@pytest.mark.parametrize("key", [*CONFIGS, "custom"])
def test_to_dict_rebuilds_an_equal_schedule(key):
    s = DiscreteVP(alphas_cumprod=torch.linspace(0.99, 0.1, 20)) if key == "custom" else sched(key)
    d = json.loads(json.dumps(s.to_dict()))  # what a bundle or checkpoint stores
    r = make_schedule(**d)
    assert type(r) is type(s) and r.to_dict() == s.to_dict()
    assert (r.t_min, r.t_max, r.discrete_steps) == (s.t_min, s.t_max, s.discrete_steps)
    t = dense(s, 257)
    for f in ("alpha", "sigma", "lambda_", "c_noise"):
        assert torch.equal(getattr(r, f)(t), getattr(s, f)(t)), f


def test_schedule_from_config_skips_unset():
    s = schedule_from_config({"name": "vp_linear", "beta_min": 0.2, "beta_max": None})
    assert isinstance(s, VPLinear) and s.b0 == 0.2 and s.b1 == 20.0
    assert isinstance(schedule_from_config({}), DiscreteVP)


def test_errors_are_clear():
    with pytest.raises(KeyError, match=r"schedule\.name: unknown schedule 'vp_quadratic'.*'vp_linear'"):
        make_schedule("vp_quadratic")
    with pytest.raises(TypeError, match=r"schedule\.beta_mx: schedule 'vp_linear' has no option 'beta_mx'"):
        make_schedule("vp_linear", beta_mx=3.0)
    with pytest.raises(ValueError, match=r"schedule\.kind: unknown discrete VP kind 'quadratic'"):
        make_schedule("vp_discrete", kind="quadratic")
    with pytest.raises(ValueError, match="0 < sigma_min < sigma_max"):
        make_schedule("edm", sigma_min=1.0, sigma_max=0.5)
    # beta = 0 somewhere (sigma or a step of 0), or a single step (t_min = t_max)
    for ac in ([0.5, 0.9], [1.5, 0.9], [1.0, 0.5, 0.1], [0.9, 0.5, 0.5], [0.5]):
        with pytest.raises(ValueError, match=r"strictly decreasing 1-D sequence in \[0, 1\)"):
            DiscreteVP(alphas_cumprod=torch.tensor(ac))
    for make, match in [(lambda: DiscreteVP(T=0), r"schedule\.T: must be an int >= 2 .*, got 0"),
                        (lambda: DiscreteVP(T=1, zero_terminal_snr=True), r"schedule\.T: must be an int >= 2"),
                        (lambda: DiscreteVP(beta_start=0.1, beta_end=0.01), r"schedule\.beta_start / beta_end"),
                        (lambda: make_schedule("vp_linear", beta_min=0.0), r"schedule\.beta_min / beta_max"),
                        (lambda: make_schedule("vp_linear", t_min=1.5), r"need 0 <= t_min < t_max <= 1\.0"),
                        (lambda: make_schedule("vp_cosine", s=-1.0), r"schedule\.s: the cosine offset must be > 0"),
                        (lambda: make_schedule("vp_cosine", t_max=1.0), r"need 0 <= t_min < t_max < 1\.0"),
                        (lambda: make_schedule("flow", t_max=1.5), r"need 0 <= t_min < t_max <= 1\.0, got 0\.0, 1\.5"),
                        (lambda: make_grid(make_schedule("edm"), 4, "rho", rho=0.0), r"grid\.rho: must be > 0")]:
        with pytest.raises(ValueError, match=match):
            make()
    with pytest.raises(TypeError, match=r"schedule\.t_max: schedule 'ddpm' has no option 't_max'"):
        make_schedule("ddpm", T=10, t_max=0.5)
    assert isinstance(SigmaSchedule(), SigmaSchedule)


def test_a_cosine_ddpm_schedule_records_no_betas_it_does_not_use():
    """Bundles and errors showed beta_start / beta_end for the cosine DDPM schedule, which ignores them; a bundle
    written with them still rebuilds the same schedule."""
    d = make_schedule("ddpm", kind="cosine", T=100).to_dict()
    assert "beta_start" not in d and "beta_end" not in d and d["kind"] == "cosine"
    older = {**d, "beta_start": 1e-4, "beta_end": 0.02}
    assert make_schedule(**older).to_dict() == d
    assert make_schedule(**make_schedule("ddpm", T=100, beta_end=0.03).to_dict()).to_dict()["beta_end"] == 0.03

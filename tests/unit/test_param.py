"""Parameterizations: every pair converts both ways on every schedule, and matches the hand formulas."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dtrain.diffusion.denoiser import Denoiser
from dtrain.diffusion.param import PARAMS, Coeffs, convert, edm_c_in, edm_skip_out, from_x0_eps, to_x0_eps, velocity_ode
from dtrain.diffusion.schedule import make_schedule

SCHEDULES = {
    "vp_discrete": {},
    "vp_linear": {},
    "vp_cosine": {},
    "edm": {},
    "ve": {},
    "flow": {},
    "vp_discrete_ztsnr": {"zero_terminal_snr": True},
}


def schedule(key: str):
    return make_schedule(key.removesuffix("_ztsnr"), **SCHEDULES[key])


def interior(s, n: int = 64) -> torch.Tensor:
    """Times strictly inside (t_min, t_max), where alpha > 0 and sigma > 0 (and 0 < t_min for flow)."""
    lo = max(s.t_min, 1e-3 * s.t_max)
    return lo + (s.t_max - lo) * torch.linspace(0.0, 1.0, n + 2, dtype=torch.float64)[1:-1]


def sample(s, sigma_data: float = 0.5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = interior(s)
    x0 = sigma_data * torch.randn(t.numel(), 3, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(t.numel(), 3, 4, generator=g, dtype=torch.float64)
    x_t = s.marginal(x0, eps, t)
    return t, x0, eps, x_t, Coeffs.at(s, t, x_t, sigma_data)


@pytest.mark.parametrize("key", list(SCHEDULES))
@pytest.mark.parametrize(("src", "dst"), list(itertools.product(PARAMS, PARAMS)))
def test_every_pair_round_trips(key, src, dst):
    s = schedule(key)
    _, x0, eps, x_t, c = sample(s)
    p_src, p_dst = from_x0_eps(src, x0, eps, x_t, c), from_x0_eps(dst, x0, eps, x_t, c)
    scale = max(1.0, float(p_dst.abs().max()))
    torch.testing.assert_close(convert(p_src, src, dst, x_t, c), p_dst, rtol=1e-6, atol=1e-6 * scale)
    back = convert(convert(p_src, src, dst, x_t, c), dst, src, x_t, c)
    torch.testing.assert_close(back, p_src, rtol=1e-6, atol=1e-6 * max(1.0, float(p_src.abs().max())))


@pytest.mark.parametrize("key", list(SCHEDULES))
@pytest.mark.parametrize("kind", PARAMS)
def test_to_x0_eps_inverts_from_x0_eps(key, kind):
    s = schedule(key)
    _, x0, eps, x_t, c = sample(s)
    x0_b, eps_b = to_x0_eps(kind, from_x0_eps(kind, x0, eps, x_t, c), x_t, c)
    torch.testing.assert_close(x0_b, x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(eps_b, eps, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("key", ["vp_linear", "edm", "flow"])
def test_round_trip_property(key):
    s = schedule(key)
    lo = max(s.t_min, 1e-3 * s.t_max)

    @settings(max_examples=100, deadline=None, derandomize=True)
    @given(
        t=st.floats(lo, s.t_max * (1 - 1e-6)),
        x0=st.floats(-3, 3),
        eps=st.floats(-4, 4),
        src=st.sampled_from(PARAMS),
        dst=st.sampled_from(PARAMS),
    )
    def check(t, x0, eps, src, dst):
        x0_, eps_ = torch.tensor([[x0]], dtype=torch.float64), torch.tensor([[eps]], dtype=torch.float64)
        tt = torch.tensor([t], dtype=torch.float64)
        x_t = s.marginal(x0_, eps_, tt)
        c = Coeffs.at(s, tt, x_t, 0.5)
        got = convert(from_x0_eps(src, x0_, eps_, x_t, c), src, dst, x_t, c)
        want = from_x0_eps(dst, x0_, eps_, x_t, c)
        assert abs(float(got - want)) <= 1e-6 * max(1.0, abs(float(want)))

    check()


def test_hand_formulas():
    vp = make_schedule("vp_linear")
    _, x0, eps, x_t, c = sample(vp)
    a, s = c.alpha, c.sigma
    torch.testing.assert_close(from_x0_eps("v", x0, eps, x_t, c), a * eps - s * x0, rtol=0, atol=0)
    torch.testing.assert_close(from_x0_eps("score", x0, eps, x_t, c), -eps / s, rtol=0, atol=0)
    torch.testing.assert_close(from_x0_eps("eps", x0, eps, x_t, c), eps, rtol=0, atol=0)
    t = interior(vp)[:, None, None]
    beta = 0.1 + (20.0 - 0.1) * t
    a_dot = -0.5 * beta * a  # d/dt exp(-int beta / 2)
    s_dot = 0.5 * beta * a**2 / s
    torch.testing.assert_close(from_x0_eps("velocity", x0, eps, x_t, c), a_dot * x0 + s_dot * eps, rtol=1e-12, atol=0)
    torch.testing.assert_close(velocity_ode(x0, x_t, c), a_dot * x0 + s_dot * eps, rtol=1e-10, atol=1e-12)

    flow = make_schedule("flow")
    _, x0, eps, x_t, c = sample(flow)
    torch.testing.assert_close(from_x0_eps("velocity", x0, eps, x_t, c), eps - x0, rtol=0, atol=0)
    torch.testing.assert_close(convert(eps - x0, "velocity", "x0", x_t, c), x0, rtol=1e-10, atol=1e-12)

    edm = make_schedule("edm")
    for sd in (0.5, 1.0):
        _, x0, eps, x_t, c = sample(edm, sigma_data=sd)
        sig = c.sigma
        skip, out = edm_skip_out(c.alpha, sig, sd)
        torch.testing.assert_close(skip, sd**2 / (sig**2 + sd**2), rtol=1e-15, atol=0)
        torch.testing.assert_close(out, sig * sd / (sig**2 + sd**2).sqrt(), rtol=1e-15, atol=0)
        F = from_x0_eps("edm", x0, eps, x_t, c)
        torch.testing.assert_close(skip * x_t + out * F, x0, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(F, (x0 - skip * x_t) / out, rtol=0, atol=0)
    # off EDM's schedule (alpha < 1): EDM's own coefficients on x_t / alpha, whose noise level is sigma / alpha
    # (a c_skip without alpha round-trips through to_x0_eps / from_x0_eps, so only this form catches it)
    vp = make_schedule("vp_cosine")
    for sd in (0.5, 1.0):
        _, x0, eps, x_t, c = sample(vp, sigma_data=sd)
        a, s_hat = c.alpha, c.sigma / c.alpha
        skip, out = edm_skip_out(a, c.sigma, sd)
        torch.testing.assert_close(skip * a, sd**2 / (s_hat**2 + sd**2), rtol=1e-12, atol=0)
        torch.testing.assert_close(out, s_hat * sd / (s_hat**2 + sd**2).sqrt(), rtol=1e-12, atol=0)
        torch.testing.assert_close(edm_c_in(a, c.sigma, sd) * a, (s_hat**2 + sd**2).rsqrt(), rtol=1e-12, atol=0)
        # EDM's point: the network's target F has unit variance for data of std sigma_data, at every noise level
        big = sd * torch.randn(4096, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        noise = torch.randn(4096, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        for t in (0.2, 0.5, 0.9):
            ct = Coeffs.at(vp, torch.full((4096,), t, dtype=torch.float64), big, sd)
            F = from_x0_eps("edm", big, noise, vp.marginal(big, noise, torch.full((4096,), t, dtype=torch.float64)), ct)
            assert abs(F.var().item() - 1.0) < 0.01, (sd, t, F.var().item())


def test_velocity_needs_derivatives():
    s = make_schedule("flow")
    x = torch.randn(2, 3, dtype=torch.float64)
    c = Coeffs.at(s, torch.tensor([0.3, 0.6], dtype=torch.float64), x, derivatives=False)
    assert c.alpha_dot is None
    torch.testing.assert_close(convert(x, "eps", "v", x, c), from_x0_eps("v", *to_x0_eps("eps", x, x, c), x, c))
    with pytest.raises(ValueError, match=r"velocity.*derivatives=True"):
        convert(x, "eps", "velocity", x, c)
    with pytest.raises(ValueError, match=r"param: unknown parameterization 'noise'; choose one of"):
        convert(x, "noise", "eps", x, c)


class _Linear(nn.Module):
    """A net whose output is the exact prediction, in ``param`` units, for N(0, sd^2 I) data."""

    def __init__(self, schedule, param: str, sd: float, scaling: bool) -> None:
        super().__init__()
        self.schedule, self.param, self.sd, self.scaling = schedule, param, sd, scaling
        self.t = None  # the true time; the net sees only c_noise, so the test hands t over

    def forward(self, x_in, c_noise, cond):
        assert c_noise.dtype == torch.float32 and c_noise.shape == (x_in.shape[0],)
        c = Coeffs.at(self.schedule, self.t, x_in, self.sd)
        x = x_in * ((c.alpha * self.sd) ** 2 + c.sigma**2).sqrt() if self.scaling else x_in
        x0 = c.alpha * self.sd**2 / ((c.alpha * self.sd) ** 2 + c.sigma**2) * x  # E[x0 | x_t]
        return from_x0_eps(self.param, x0, (x - c.alpha * x0) / c.sigma, x, c)


@pytest.mark.parametrize("key", ["vp_discrete", "edm", "flow"])
@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("scaling", [False, True])
def test_denoiser_recovers_x0_in_every_param(key, param, scaling):
    s, sd = schedule(key), 0.5
    net = _Linear(s, param, sd, scaling)
    den = Denoiser(net, s, param, sigma_data=sd, input_scaling=scaling)
    x = torch.randn(5, 2, dtype=torch.float64)
    for t in (interior(s, 5), interior(s, 5)[2]):  # per-sample times and one shared time
        net.t = t
        a, sg = (v.reshape(-1, 1) if v.ndim else v for v in (s.alpha(t), s.sigma(t)))
        want = a * sd**2 / (a**2 * sd**2 + sg**2) * x
        torch.testing.assert_close(den(x, t), want, rtol=1e-10, atol=1e-12)
        for kind in PARAMS:  # every other view of the same prediction
            c = den.coeffs(t, x)
            torch.testing.assert_close(den.predict(x, t, kind=kind), convert(want, "x0", kind, x, c), rtol=1e-8,
                                       atol=1e-10)


def test_float16_edm_coefficients_past_sigma_256():
    """sigma^2 overflows float16 above 256: c_skip, c_out and the input scaling are formed in float32 and returned in
    the inputs' dtype, so a float16 VE denoiser at sigma = 300 matches the float32 one (it returned x0 = 0)."""
    sch = make_schedule("ve", sigma_max=348.0)
    skip, out = edm_skip_out(torch.tensor([1.0]).half(), torch.tensor([300.0]).half(), 0.5)
    assert skip.dtype == torch.float16 and float(out) == pytest.approx(0.5, rel=1e-3)
    assert float(skip) == pytest.approx(0.25 / (0.25 + 300.0**2), rel=1e-2) and float(skip) > 0

    class Half(nn.Module):
        def forward(self, x, c_noise, cond):
            return torch.full_like(x, 0.5)

    x, t = (torch.randn(2, 3) * 300).half(), torch.full((2,), 300.0, dtype=torch.float64)
    den = Denoiser(Half(), sch, "edm", sigma_data=0.5, input_scaling=True)
    got, ref = den(x, t), den(x.float(), t)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), ref, atol=2e-3, rtol=2e-3)


def test_convert_checks_the_name_when_nothing_converts():
    """convert(pred, "bogus", "bogus") returned pred: a misspelt parameterization passed when both sides agreed."""
    with pytest.raises(ValueError, match="param: unknown parameterization 'bogus'"):
        convert(torch.zeros(2), "bogus", "bogus", torch.zeros(2), None)

"""Parity with diffusers' schedulers: same network, same x_T, same generator -> the same samples (1e-5).

Setup shared by every case: a small random conv network predicting eps (or v), x_T of shape [4, 3, 8, 8]
in float32, ``clip_sample=False``, diffusers' step loop ``out = net(x, t); x = step(out, t, x, generator=g)``
against dtrain's sampler on the grid of the same timesteps. Both draw their per-step noise from the
generator after the network call, one draw of x's shape per step, so equal seeds give equal noise.

Our schedule is built from diffusers' float32 ``alphas_cumprod`` (``DiscreteVP(alphas_cumprod=...)``):
our own float64 cumprod differs from theirs by up to 2.5e-7 (tests/unit/test_schedule.py), which the
1/sqrt(alpha_bar) ~ 160 of the last steps would amplify past 1e-5.

On the full 1000-step grid stock diffusers drifts up to 1.4e-5 from us (DDPM) because it computes each
step's coefficients in float32 (sqrt, products, quotients of float32 ``alphas_cumprod``); with its tables
upcast to float64 (values unchanged, float64 coefficient arithmetic like ours) DDPM agrees bit for bit
and DDIM eta=1 to 1.1e-6. Those cases assert both.

Not compared: DDIM with ``timestep_spacing="linspace"``, or ``"trailing"`` with T % n != 0. There
diffusers' DDIM steps from t to t - T // n, a time that is not the next grid point, so its sampler is not
a walk along any grid (DDPMScheduler and DPMSolverMultistepScheduler do walk their grids).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

diffusers = pytest.importorskip("diffusers")

from dtrain.diffusion.denoiser import Denoiser  # noqa: E402
from dtrain.diffusion.schedule import DiscreteVP  # noqa: E402
from dtrain.diffusion.timesteps import grid_from_indices, make_grid  # noqa: E402
from dtrain.samplers import ddim, ddpm, dpm_solver_pp  # noqa: E402

SHAPE = (4, 3, 8, 8)


class TinyNet(nn.Module):
    """out = x + 0.1 * convs(x, t): the identity is the exact eps of N(0, I) data at low noise, which keeps
    x0_hat O(1) so that 1e-5 is a float32-meaningful tolerance on the outputs."""

    def __init__(self, ch: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.mid, self.out = nn.Conv2d(3, ch, 3, padding=1), nn.Conv2d(ch, ch, 3, padding=1), \
            nn.Conv2d(ch, 3, 3, padding=1)
        self.emb = nn.Linear(2, ch)

    def forward(self, x: Tensor, t: Tensor, cond: object = None) -> Tensor:
        t = t.to(x.dtype).reshape(-1).expand(x.shape[0]) / 1000
        e = self.emb(torch.stack([torch.sin(3 * t), torch.cos(3 * t)], 1))[:, :, None, None]
        h = torch.nn.functional.silu(self.inp(x) + e)
        return x + 0.1 * self.out(torch.nn.functional.silu(self.mid(h)))


@pytest.fixture(scope="module")
def net() -> TinyNet:
    return TinyNet().eval()


def x_T(seed: int = 1) -> Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def diffusers_loop(sched, net: nn.Module, n: int, seed: int = 5, **step_kw) -> Tensor:
    sched.set_timesteps(n)
    x, g = x_T(), torch.Generator().manual_seed(seed)
    for t in sched.timesteps:
        x = sched.step(net(x, t.expand(x.shape[0]), None), t, x, generator=g, **step_kw).prev_sample
    return x


def float64_tables(sched):
    """The scheduler with its alpha tables in float64: same values, float64 coefficient arithmetic."""
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    for name in ("final_alpha_cumprod", "one"):
        if hasattr(sched, name):
            setattr(sched, name, getattr(sched, name).double())
    return sched


def ours(sched, net: nn.Module, param: str = "eps") -> Denoiser:
    return Denoiser(net, DiscreteVP(alphas_cumprod=sched.alphas_cumprod), param)


def close(a: Tensor, b: Tensor) -> None:
    assert a.dtype == b.dtype == torch.float32
    assert math.isfinite(float(b.abs().max())) and 0.05 < float(b.std()) < 5  # a meaningful comparison
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("n", "spacing", "variance"),
    [(1000, "leading", "small"), (50, "leading", "small"), (20, "trailing", "small"), (40, "linspace", "large")],
)
def test_ddpm(net, n, spacing, variance):
    def make():
        return diffusers.DDPMScheduler(clip_sample=False, timestep_spacing=spacing,
                                       variance_type="fixed_small" if variance == "small" else "fixed_large")

    sched = make()
    ref = diffusers_loop(sched, net, n)
    den = ours(sched, net)
    grid = make_grid(den.schedule, n, spacing)
    assert torch.equal(grid_from_indices(den.schedule, sched.timesteps), grid)
    out = ddpm(den, x_T(), grid, generator=torch.Generator().manual_seed(5), variance=variance)
    if n < 1000:
        close(out, ref)
    else:
        assert float((out - ref).abs().max()) < 3e-5
        close(out, diffusers_loop(float64_tables(make()), net, n))


@pytest.mark.parametrize(
    ("n", "spacing", "offset", "eta"),
    [(10, "leading", 0, 0.0), (50, "leading", 1, 0.0), (25, "trailing", 0, 0.0), (10, "trailing", 0, 0.5),
     (50, "leading", 0, 1.0), (100, "trailing", 0, 0.3), (1000, "trailing", 0, 1.0)],
)
def test_ddim(net, n, spacing, offset, eta):
    def make():
        return diffusers.DDIMScheduler(clip_sample=False, timestep_spacing=spacing, steps_offset=offset,
                                       set_alpha_to_one=True)

    sched = make()
    ref = diffusers_loop(sched, net, n, eta=eta)
    den = ours(sched, net)
    grid = make_grid(den.schedule, n, spacing, offset=offset)
    out = ddim(den, x_T(), grid, eta=eta, generator=torch.Generator().manual_seed(5))
    if n < 1000:
        close(out, ref)
    else:
        assert float((out - ref).abs().max()) < 3e-5
        close(out, diffusers_loop(float64_tables(make()), net, n, eta=eta))


@pytest.mark.parametrize(("order", "n", "spacing"), [(2, 10, "linspace"), (2, 14, "trailing"), (2, 25, "trailing"),
                                                     (3, 10, "linspace"), (3, 14, "linspace"), (3, 15, "linspace"),
                                                     (3, 20, "linspace"), (3, 50, "trailing")])
def test_dpm_solver_multistep(net, order, n, spacing):
    sched = diffusers.DPMSolverMultistepScheduler(solver_order=order, algorithm_type="dpmsolver++",
                                                  timestep_spacing=spacing)
    ref = diffusers_loop(sched, net, n)
    den = ours(sched, net)
    grid = grid_from_indices(den.schedule, sched.timesteps)  # DPM-Solver's own linspace is a respacing
    out = dpm_solver_pp(den, x_T(), grid, order=order)
    close(out, ref)
    if order == 3:  # the third-order Taylor variant is a different method: far from diffusers here
        assert float((dpm_solver_pp(den, x_T(), grid, order=3, taylor3=True) - ref).abs().max()) > 1e-4


def test_v_prediction(net):
    for sched, run in [
        (diffusers.DDIMScheduler(clip_sample=False, prediction_type="v_prediction", timestep_spacing="trailing"),
         lambda den, grid: ddim(den, x_T(), grid)),
        (diffusers.DPMSolverMultistepScheduler(prediction_type="v_prediction", timestep_spacing="trailing"),
         lambda den, grid: dpm_solver_pp(den, x_T(), grid, order=2)),
    ]:
        ref = diffusers_loop(sched, net, 20)
        den = ours(sched, net, "v")
        close(run(den, make_grid(den.schedule, 20, "trailing")), ref)


def test_network_sees_diffusers_timesteps(net):
    """c_noise on a DDPM grid is the integer index diffusers passes, exactly, in float32."""
    seen: list[Tensor] = []
    den = ours(diffusers.DDPMScheduler(), lambda x, c, cond: seen.append(c) or x)
    ddim(den, x_T(), make_grid(den.schedule, 7, "trailing"))
    sched = diffusers.DDIMScheduler(timestep_spacing="trailing")
    sched.set_timesteps(7)
    assert all(c.dtype == torch.float32 and c.shape == (4,) for c in seen)
    assert torch.equal(torch.stack([c[0] for c in seen]), sched.timesteps.float())

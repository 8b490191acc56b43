"""The denoising loss: exact targets in every space, weightings against their closed forms, the Bayes error
of a Gaussian, CFG label dropout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dtrain.diffusion.denoiser import Denoiser
from dtrain.diffusion.param import Coeffs, from_x0_eps
from dtrain.diffusion.schedule import make_schedule
from dtrain.methods.denoising import WEIGHTINGS, DenoisingLoss, drop_labels, loss_weight

TARGETS = ("eps", "x0", "v", "velocity", "edm")
SCHEDULES = {"ddpm": {}, "vp_cosine": {}, "edm": {}, "flow": {"t_min": 1e-3, "t_max": 0.999}}


class Oracle(nn.Module):
    """Returns the true (x0, eps) in a given parameterization: the exact network for fixed (x0, eps, t)."""

    def __init__(self, param: str, schedule, x0, eps, t, sigma_data=0.5):
        super().__init__()
        self.param, self.sch, self.x0, self.eps, self.t, self.sd = param, schedule, x0, eps, t, sigma_data

    def forward(self, x_in, c_noise, cond):
        x_t = self.sch.marginal(self.x0, self.eps, self.t)
        c = Coeffs.at(self.sch, self.t, x_t, self.sd)
        return from_x0_eps(self.param, self.x0, self.eps, x_t, c)


def _draw(schedule, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(n, 2, 4, 4, generator=g), torch.randn(n, 2, 4, 4, generator=g)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    t = schedule.t_min + (schedule.t_max - schedule.t_min) * u
    return x0, eps, t


@pytest.mark.parametrize("sched", list(SCHEDULES))
@pytest.mark.parametrize("param", TARGETS)
@pytest.mark.parametrize("target", TARGETS)
def test_exact_network_has_zero_loss_in_every_space(sched, param, target):
    s = make_schedule(sched, **SCHEDULES[sched])
    x0, eps, t = _draw(s)
    den = Denoiser(Oracle(param, s, x0, eps, t), s, param, sigma_data=0.5)
    out = DenoisingLoss(s, param, target=target, weighting="none")(den, x0, t=t, noise=eps)
    assert out.loss.shape == (64,) and torch.equal(out.t, t)
    assert float(out.loss.abs().max()) < 1e-6


def test_wrong_network_gives_plain_mse_of_the_target():
    s = make_schedule("vp_cosine")
    x0, eps, t = _draw(s)
    zero = Denoiser(lambda x, c, y: torch.zeros_like(x), s, "eps")
    out = DenoisingLoss(s, "eps")(zero, x0, t=t, noise=eps)
    torch.testing.assert_close(out.loss, eps.square().flatten(1).mean(1))


@pytest.mark.parametrize("sched", ["ddpm", "vp_cosine", "edm"])
@pytest.mark.parametrize("weighting", ["min_snr", "snr_trunc", "snr_plus_one", "edm"])
def test_weighted_loss_is_the_same_in_every_target_space(sched, weighting):
    """A weight defined in x0 units makes the loss independent of the space it is computed in."""
    s = make_schedule(sched)
    x0, eps, t = _draw(s, seed=1)
    torch.manual_seed(0)
    net = nn.Conv2d(2, 2, 3, padding=1)  # an arbitrary (wrong) network

    def run(target):
        den = Denoiser(lambda x, c, y: net(x), s, "eps", sigma_data=0.5)
        return DenoisingLoss(s, "eps", target=target, weighting=weighting, sigma_data=0.5, snr_gamma=5.0)(
            den, x0, t=t, noise=eps).loss.detach()

    ref = run("x0")
    for target in ("eps", "v", "velocity", "edm"):
        torch.testing.assert_close(run(target), ref, rtol=2e-4, atol=1e-6)


def test_weights_closed_forms():
    vp = make_schedule("ddpm", kind="cosine")
    t = torch.tensor([0.01, 0.1, 0.5, 0.9], dtype=torch.float64)
    snr = vp.snr(t)
    g = 5.0
    torch.testing.assert_close(loss_weight("min_snr", vp, t, "eps", snr_gamma=g), snr.clamp(max=g) / snr)
    torch.testing.assert_close(loss_weight("min_snr", vp, t, "v", snr_gamma=g), snr.clamp(max=g) / (snr + 1))
    torch.testing.assert_close(loss_weight("min_snr", vp, t, "x0", snr_gamma=g), snr.clamp(max=g))
    torch.testing.assert_close(loss_weight("snr_trunc", vp, t, "eps"), snr.clamp(min=1) / snr)
    torch.testing.assert_close(loss_weight("snr_plus_one", vp, t, "v"), torch.ones_like(t))  # = the plain v loss
    assert loss_weight("none", vp, t, "eps") is None
    edm = make_schedule("edm")
    sig, sd = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64), 0.5
    lam = (sig**2 + sd**2) / (sig * sd) ** 2  # EDM's lambda(sigma), Table 1 of arXiv 2206.00364
    torch.testing.assert_close(loss_weight("edm", edm, sig, "x0", sigma_data=sd), lam)
    torch.testing.assert_close(loss_weight("edm", edm, sig, "edm", sigma_data=sd), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"method.weighting"):
        loss_weight("p2", vp, t, "eps")
    assert set(WEIGHTINGS) == {"none", "min_snr", "snr_trunc", "snr_plus_one", "edm"}


def test_gaussian_bayes_error():
    """For x0 ~ N(mu, s^2 I), the exact denoiser's x0-loss at t is E Var(x0 | x_t) = s^2 sig^2 / (a^2 s^2 + sig^2)."""
    s = make_schedule("vp_linear")
    mu, sd, n = 0.7, 0.5, 20000
    t = torch.full((n,), 0.3, dtype=torch.float64)
    a, sig = float(s.alpha(0.3)), float(s.sigma(0.3))

    def exact(x, c_noise, cond):  # E[x0 | x_t] of a Gaussian
        return mu + a * sd**2 / (a**2 * sd**2 + sig**2) * (x - a * mu)

    g = torch.Generator().manual_seed(0)
    x0 = mu + sd * torch.randn(n, 1, generator=g)
    out = DenoisingLoss(s, "x0")(Denoiser(exact, s, "x0"), x0, t=t, noise=torch.randn(n, 1, generator=g))
    bayes = sd**2 * sig**2 / (a**2 * sd**2 + sig**2)
    assert float(out.loss.mean()) == pytest.approx(bayes, rel=0.03)  # MC error ~1% at n = 20000


def test_time_sampling_and_noise_are_drawn():
    s = make_schedule("ddpm", T=1000)
    loss = DenoisingLoss(s, "eps", time_sampling="uniform_discrete")
    seen = []
    den = Denoiser(lambda x, c, y: seen.append(x) or torch.zeros_like(x), s, "eps")
    x0 = torch.zeros(256, 1, 2, 2)
    torch.manual_seed(0)
    out = loss(den, x0)
    knots = out.t * 1000
    torch.testing.assert_close(knots, knots.round())  # DDPM indices: t = (i + 1) / T
    assert 1 <= float(knots.min()) and float(knots.max()) <= 1000 and len(knots.unique()) > 200
    # x_t = alpha x0 + sigma eps with fresh noise: for x0 = 0 it is sigma * N(0, 1)
    z = seen[0] / s.sigma(out.t).float()[:, None, None, None]
    assert abs(float(z.std()) - 1) < 0.05 and abs(float(z.mean())) < 0.05


def test_cfg_label_dropout():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (20000,), generator=g)
    d = drop_labels(y, 0.1, 10, generator=g)
    dropped = d == 10
    assert abs(float(dropped.double().mean()) - 0.1) < 0.006  # 3 binomial std
    assert torch.equal(d[~dropped], y[~dropped])
    assert torch.equal(drop_labels(y, 0.0, 10), y)


def test_labels_reach_the_network_with_dropout():
    s = make_schedule("vp_cosine")
    got = []
    den = Denoiser(lambda x, c, y: got.append(y) or torch.zeros_like(x), s, "eps")
    y = torch.arange(10).repeat(100)
    torch.manual_seed(0)
    DenoisingLoss(s, "eps", cfg_dropout=0.5, num_classes=10)(den, torch.zeros(1000, 2), y)
    assert 0.4 < float((got[0] == 10).double().mean()) < 0.6
    DenoisingLoss(s, "eps", cfg_dropout=0.5, num_classes=0)(den, torch.zeros(1000, 2), y)
    assert torch.equal(got[1], y)  # unconditional models leave labels alone


def test_from_config_reads_recipe_sections():
    s = make_schedule("edm")
    loss = DenoisingLoss.from_config({"name": "denoising", "target": None, "time_sampling": "lognormal",
                                      "weighting": "edm", "cfg_dropout": 0.2},
                                     {"param": "edm", "num_classes": 10, "sigma_data": 0.5}, s)
    assert (loss.target, loss.param, loss.weighting, loss.num_classes) == ("edm", "edm", "edm", 10)
    t = loss.sample_t(4000, torch.device("cpu"))
    ln = torch.log(t)  # EDM: ln sigma ~ N(-1.2, 1.2^2), clipped to [sigma_min, sigma_max]
    assert abs(float(ln.mean()) + 1.2) < 0.06 and abs(float(ln.std()) - 1.2) < 0.06
    with pytest.raises(ValueError, match=r"method.weighting"):
        DenoisingLoss(s, "eps", weighting="p2")


def test_min_snr_eps_weight_at_zero_terminal_snr_is_its_limit():
    """At t = 1 of a zero-terminal-SNR schedule the eps target does not see x0 (snr = 0): min(snr, gamma) / snr is
    taken as its limit 1, not 0 / 0; uniform_discrete draws t = 1, where a NaN made the whole batch NaN."""
    s = make_schedule("vp_discrete", zero_terminal_snr=True)
    t = torch.tensor([0.5, 0.999, 1.0], dtype=torch.float64)
    assert float(s.alpha(t[2:])[0]) == 0.0
    torch.testing.assert_close(loss_weight("min_snr", s, t, "eps"), torch.ones(3, dtype=torch.float64))
    x0 = torch.randn(3, 2)
    net = lambda x, tt, c=None: torch.zeros_like(x)  # noqa: E731
    out = DenoisingLoss(s, "v", target="eps", weighting="min_snr")(Denoiser(net, s, "v"), x0, t=t)
    assert out.loss.isfinite().all()

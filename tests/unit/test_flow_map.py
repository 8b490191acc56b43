"""Flow maps against closed forms: MeanFlow's JVP target and CTM's loss vanish for the exact flow map of Gaussian data,
the few-step samplers (1 step, n steps, gamma-sampling) reproduce the data distribution exactly from it, CTM's
gamma-time and jump match the paper's VE formulas, the rescheduled teacher is the exact denoiser of the other
schedule, guidance of a jump is guidance of the network, the second-time embedding starts as a no-op, and recipes
with bad combinations fail with the key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from dtrain.config import RecipeError, load_recipe
from dtrain.data.synthetic import GaussianMixture, default_gmm
from dtrain.diffusion.denoiser import Denoiser
from dtrain.diffusion.guidance import CFGDenoiser
from dtrain.diffusion.schedule import Schedule, as_t, make_schedule
from dtrain.diffusion.timesteps import make_grid, rho_times
from dtrain.methods.consistency import teacher_step
from dtrain.methods.flow_map import CTMLoss, MeanFlowLoss, Rescheduled, meanflow_target
from dtrain.models import build_model
from dtrain.samplers import run
from dtrain.samplers.few_step import CTMModel, MeanFlowModel, gamma_time

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "flowmap"
MU, S0 = torch.tensor([0.7, -0.4], dtype=torch.float64), 0.5  # Gaussian data N(MU, S0^2 I)


def gaussian_map(schedule: Schedule, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """The exact probability-flow map t -> s for N(MU, S0^2 I): affine, x_s = alpha_s MU + (std_s / std_t)(x_t -
    alpha_t MU), std^2 = alpha^2 S0^2 + sigma^2."""
    (a_t, s_t), (a_s, s_s) = schedule.alpha_sigma(t), schedule.alpha_sigma(s)
    std_t, std_s = (a_t**2 * S0**2 + s_t**2).sqrt(), (a_s**2 * S0**2 + s_s**2).sqrt()
    mu = MU.to(x.dtype)
    return a_s[:, None] * mu + (std_s / std_t)[:, None] * (x - a_t[:, None] * mu)


class ExactNet(nn.Module):
    """A two-time "network" whose output is exact for the Gaussian data: MeanFlow's average velocity (``u``) or CTM's
    clean estimate g = (G - p x_t) / q (``g``, read as param x0). Times come back from c_noise = 1000 t."""

    def __init__(self, schedule: Schedule, kind: str) -> None:
        super().__init__()
        self.schedule, self.kind = schedule, kind

    def forward(self, x: Tensor, c_t: Tensor, cond=None, c_noise_s: Tensor | None = None) -> Tensor:
        t = c_t.double() / 1000
        s = t if c_noise_s is None else c_noise_s.double() / 1000
        sch, gap = self.schedule, (t - s)[:, None]
        if self.kind == "u":  # (x_t - x_s) / (t - s), and the velocity d x_t / dt where s = t
            a, sg = sch.alpha_sigma(t)
            std2 = a**2 * S0**2 + sg**2
            dstd = (a * sch.alpha_dot(t) * S0**2 + sg * sch.sigma_dot(t)) / std2
            v = sch.alpha_dot(t)[:, None] * MU + dstd[:, None] * (x - a[:, None] * MU)
            avg = (x - gaussian_map(sch, x, t, s)) / torch.where(gap == 0, 1.0, gap)
            return torch.where(gap == 0, v, avg).to(x.dtype)
        from dtrain.samplers.ddim import ddim_coeffs

        p, q, _ = ddim_coeffs(sch, t, s)
        x0 = GaussianMixture(MU, S0).x0_mean(x, *sch.alpha_sigma(t)).to(x.dtype)  # s = t: the exact denoiser
        g = (gaussian_map(sch, x, t, s) - p[:, None] * x) / torch.where(q == 0, 1.0, q)[:, None]
        return torch.where((q == 0)[:, None], x0, g)


def _gaussian_teacher(schedule: Schedule):
    return GaussianMixture(MU, S0).denoiser(schedule)


def _exact_meanflow(read: str) -> MeanFlowModel:
    """The exact MeanFlow model of the Gaussian data: u itself ("u"), or CTM's exact clean estimate on a VP cosine
    schedule read on the flow schedule at the same log-SNR ("denoiser", as a student from a VP teacher's weights)."""
    flow = make_schedule("flow")
    if read == "u":
        return MeanFlowModel(ExactNet(flow, "u"), flow)
    vp = make_schedule("vp_cosine", t_min=0.0)
    net = ExactNet(vp, "g")
    return MeanFlowModel(net, flow, Denoiser(net, vp, "x0"))


@pytest.mark.parametrize("read", ["u", "denoiser"])
def test_meanflow_target_equals_the_exact_average_velocity(read):
    """For the exact u of Gaussian data and the exact velocity, v - (t - r) du/dt (du/dt by torch.func.jvp along
    (v, 0, 1)) is u itself, in both JVP modes; a flow-matching model (u = v for every r) is off by far. Read through
    a VP denoiser, u is the exact u too (to c_noise's float32 rounding) and the JVP runs through the time matching."""
    model = _exact_meanflow(read)
    sch = model.schedule
    g = torch.Generator().manual_seed(0)
    x0 = MU + S0 * torch.randn(512, 2, generator=g, dtype=torch.float64)
    t = torch.rand(512, generator=g, dtype=torch.float64) * 0.94 + 0.01
    r = torch.where(torch.arange(512) % 4 == 0, t, t * torch.rand(512, generator=g, dtype=torch.float64))
    loss = MeanFlowLoss(sch, adaptive_p=0.0)
    for jvp in ("detached", "fused"):
        loss.jvp = jvp
        out = loss(model, x0, teacher=_gaussian_teacher(sch), r=r, t=t, generator=g)
        assert float(out.loss.max()) < (1e-9 if read == "u" else 1e-8), jvp
    z = sch.marginal(x0, torch.randn(512, 2, generator=g, dtype=torch.float64), t)
    v = model.u(z, t, t)
    u, target = meanflow_target(model, z, r, t, v)
    torch.testing.assert_close(target, u, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(u, _exact_meanflow("u").u(z, r, t), atol=1e-5, rtol=1e-5)
    flow_matching = model.u(z, t, t)  # ignores r
    assert float((flow_matching - target).square().sum(1).mean()) > 1e-2


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_meanflow_fused_and_detached_give_the_same_loss_and_gradients(one_thread, dropout):
    """Also with dropout: the detached JVP runs with the masks of the forward the loss reads (one network)."""
    sch = make_schedule("flow")
    torch.manual_seed(0)
    net = build_model({"name": "mlp", "dim": 2, "hidden": 32, "depth": 2, "num_classes": 3, "second_time": True,
                       "dropout": dropout})
    nn.init.normal_(net.out[-1].weight, std=0.1)  # a non-trivial output layer
    model = MeanFlowModel(net, sch)
    x0, y = default_gmm().sample(64, generator=torch.Generator().manual_seed(1))
    grads = []
    for jvp in ("detached", "fused"):
        loss = MeanFlowLoss(sch, num_classes=3, cfg_omega=2.0, cfg_kappa=0.3, cfg_dropout=0.2, ratio=0.5, jvp=jvp)
        net.zero_grad()
        torch.manual_seed(3)  # the dropout masks
        out = loss(model, x0, y, generator=torch.Generator().manual_seed(2))
        out.loss.mean().backward()
        grads.append((out.loss.detach(), [p.grad.clone() for p in net.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert any(float(g.abs().max()) > 0 for g in grads[0][1])


def test_meanflow_cfg_velocity_mixes_the_models_own_predictions():
    """v~ = omega v + kappa u(z, t, t | c) + (1 - omega - kappa) u(z, t, t | null); dropped labels keep v."""
    sch = make_schedule("flow")
    torch.manual_seed(0)
    net = build_model({"name": "mlp", "dim": 2, "hidden": 16, "depth": 1, "num_classes": 3, "second_time": True})
    nn.init.normal_(net.out[-1].weight, std=0.5)
    model, loss = MeanFlowModel(net, sch), MeanFlowLoss(sch, num_classes=3, cfg_omega=1.5, cfg_kappa=0.2)
    z, v, t = torch.randn(6, 2), torch.randn(6, 2), torch.rand(6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 3, 1])
    with torch.no_grad():
        got = loss._guided_velocity(model, z, t, v, y)
        u_c, u_n = model.u(z, t, t, y), model.u(z, t, t, torch.full_like(y, 3))
    want = 1.5 * v + 0.2 * u_c + (1 - 1.5 - 0.2) * u_n
    torch.testing.assert_close(got[y != 3], want[y != 3])
    torch.testing.assert_close(got[y == 3], v[y == 3])


def test_meanflow_adaptive_weight_is_stop_gradient(one_thread):
    """Adaptive weighting (arXiv 2505.13447, Sec. 4.3): loss d / sg(d + c / D)^p per sample (d the mean squared error,
    c the paper's constant on the sum), so the value is the paper's S / (S + c)^p times D^(p - 1) and the gradient is
    that of d scaled by the detached weight (not the gradient of the weighted value)."""
    sch = make_schedule("flow")
    torch.manual_seed(0)
    net = build_model({"name": "mlp", "dim": 2, "hidden": 16, "depth": 1, "second_time": True})
    nn.init.normal_(net.out[-1].weight, std=0.3)
    model = MeanFlowModel(net, sch)
    x0, _ = default_gmm().sample(32, generator=torch.Generator().manual_seed(1))

    def run_loss(p: float, c: float) -> tuple[Tensor, list[Tensor]]:
        net.zero_grad()
        out = MeanFlowLoss(sch, adaptive_p=p, adaptive_c=c, ratio=0.5)(model, x0,
                                                                       generator=torch.Generator().manual_seed(2))
        out.loss.sum().backward()
        return out.loss.detach(), [q.grad.clone() for q in net.parameters()]

    d, _ = run_loss(0.0, 0.0)
    D = x0[0].numel()
    for p, c in ((1.0, 1e-3), (0.5, 0.1), (0.75, 1e-3)):
        w = 1 / (d + c / D) ** p  # c is the paper's, on the sum S = D d of squared errors
        loss, grads = run_loss(p, c)
        torch.testing.assert_close(loss, d * w)
        S = D * d  # the paper's weighted loss S / (S + c)^p, up to the constant D^(p - 1)
        torch.testing.assert_close(loss, D ** (p - 1) * S / (S + c) ** p)
        net.zero_grad()  # the same draws again, weighted by the detached w
        plain = MeanFlowLoss(sch, adaptive_p=0.0, ratio=0.5)(model, x0, generator=torch.Generator().manual_seed(2))
        (plain.loss * w).sum().backward()
        for a, b in zip(grads, (q.grad for q in net.parameters())):
            torch.testing.assert_close(a, b)
    assert float(d.std()) > 0.1 * float(d.mean())  # the weights differ between samples, so the check has teeth


@pytest.mark.parametrize("ratio,r_zero", [(0.0, 0.0), (0.25, 0.0), (1.0, 0.0), (0.5, 0.5)])
def test_meanflow_times_ratio_of_r_below_t(ratio, r_zero):
    """t >= r always; r != t for a fraction ``ratio`` of samples and r = 0 for a fraction ``ratio * r_zero``
    (binomial 3-sigma of 20k draws), r = t elsewhere."""
    loss = MeanFlowLoss(make_schedule("flow"), ratio=ratio, r_zero=r_zero)
    r, t = loss.sample_times(20_000, torch.Generator().manual_seed(0))
    assert bool((r <= t).all()) and bool(((t > 0) & (t < 1)).all())
    for frac, p in ((float((r < t).double().mean()), ratio), (float((r == 0).double().mean()), ratio * r_zero)):
        assert abs(frac - p) <= 3 * (p * (1 - p) / 20_000) ** 0.5 + 1e-12, (frac, p)


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_meanflow_times_with_rs_own_law(ratio):
    """r's own logit-normal law (py-meanflow's improved CIFAR-10 sampler): t keeps its law exactly, P(t > x) =
    1 - Phi((logit(x) - m_t) / s_t), and r = min(t, r') for a fraction ``ratio`` (r' independent), r = t elsewhere:
    P(r > x) = P(t > x) (1 - ratio + ratio P(r' > x)). The closed forms at three x, binomial 4-sigma of 40k draws
    (sorting the pair instead, t = max(t, r'), fails the first)."""
    sch = make_schedule("flow")
    (mt, st), (mr, sr) = (-0.6, 1.6), (-4.0, 1.6)
    loss = MeanFlowLoss(sch, time_sampling="logit_normal", p_mean=mt, p_std=st, ratio=ratio, r_p_mean=mr, r_p_std=sr)
    n = 40_000
    r, t = loss.sample_times(n, torch.Generator().manual_seed(0))
    assert bool((r <= t).all()) and float((r < t).double().mean()) > 0.4 * ratio
    lo, hi = float(sch.t_min), float(sch.t_max)

    def above(x: float, m: float, sd: float) -> float:  # P(draw > x)
        q = torch.tensor((x - lo) / (hi - lo), dtype=torch.float64)
        return 1.0 - float(torch.special.ndtr((torch.logit(q) - m) / sd))

    for x in (0.02, 0.2, 0.6):
        for got, p in ((float((t > x).double().mean()), above(x, mt, st)),
                       (float((r > x).double().mean()), above(x, mt, st) * (1 - ratio + ratio * above(x, mr, sr)))):
            assert abs(got - p) <= 4 * (p * (1 - p) / n) ** 0.5, (x, got, p)


def test_meanflow_cifar10_recipe_carries_rs_own_law_into_the_loss():
    """The CIFAR-10 recipe's r law reaches the loss (from_config passes r_p_mean / r_p_std), and unset it falls back
    to t's law sorted (the paper's first sampler)."""
    from dtrain.diffusion.schedule import schedule_from_config

    cfg = load_recipe(RECIPES / "meanflow_cifar10.yaml")
    loss = MeanFlowLoss.from_config(cfg.method, cfg.model, schedule_from_config(cfg.schedule))
    assert loss.schedule.c_scale == 1.0  # the paper's code feeds t and r in [0, 1]
    assert loss.r_law == (-4.0, 1.6) and (loss.p_mean, loss.p_std, loss.ratio, loss.adaptive_p) == (-0.6, 1.6, 0.75,
                                                                                                   0.75)
    cfg = load_recipe(RECIPES / "meanflow_cifar10.yaml", ["method.r_p_mean=null", "method.r_p_std=null"])
    assert MeanFlowLoss.from_config(cfg.method, cfg.model, schedule_from_config(cfg.schedule)).r_law is None


@pytest.mark.parametrize("c_scale,warns", [(1000, True), (100, False), (1, False)])
def test_meanflow_warns_of_a_fast_time_input(c_scale, warns):
    """A flow network fed c_noise = 1000 t (the flow schedule's default) warns: MeanFlow differentiates it in t."""
    import warnings

    from dtrain.lit.flow_map import MeanFlowModule

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        MeanFlowModule(load_recipe(RECIPES / "meanflow_gmm.yaml", [f"schedule.c_scale={c_scale}"]))
    hits = [w for w in seen if "schedule.c_scale" in str(w.message)]
    assert bool(hits) == warns and all("set schedule.c_scale: 1" in str(w.message) for w in hits)


def test_ctm_dsm_term_is_the_denoising_loss_of_g_at_s_equal_t(one_thread):
    """loss(dsm_weight = w) - loss(0) = w mean((g(x_t, t, t) - x0)^2) (param x0, weighting none), at the same x_t."""
    sch = make_schedule("vp_cosine")
    torch.manual_seed(0)
    net = build_model({"name": "mlp", "dim": 2, "hidden": 16, "depth": 1, "second_time": True}).double()
    nn.init.normal_(net.out[-1].weight, std=0.3)
    model = CTMModel(Denoiser(net, sch, "x0"))
    g = torch.Generator().manual_seed(0)
    x0 = MU + S0 * torch.randn(64, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(64, 2, generator=g, dtype=torch.float64)
    times = CTMLoss(sch).sample_times(64, torch.Generator().manual_seed(1))
    teacher = _gaussian_teacher(sch)
    base, with_dsm = (CTMLoss(sch, param="x0", dsm_weight=w)(model, teacher, x0, times=times, noise=noise).loss
                      for w in (0.0, 0.5))
    t = times[0]
    with torch.no_grad():
        dsm = (model.g(sch.marginal(x0, noise, t), t, t, clip=False) - x0).square().mean(1)
    torch.testing.assert_close(with_dsm - base, 0.5 * dsm)
    assert float(dsm.mean()) > 1e-3


@pytest.mark.parametrize("compare", ["zero", "s"])
def test_ctm_loss_vanishes_for_the_exact_flow_map(compare):
    """With the exact G of Gaussian data: loss 0 when the teacher segment is empty (u = t), and the Heun teacher's
    error falls at second order with its steps: the squared error of 4 steps is > 100x below 1 step's (4^4 = 256 for
    second order, 16 for first; measured 277 and 271)."""
    sch = make_schedule("vp_cosine")
    model = CTMModel(Denoiser(ExactNet(sch, "g"), sch, "x0"))
    g = torch.Generator().manual_seed(0)
    x0 = MU + S0 * torch.randn(256, 2, generator=g, dtype=torch.float64)
    loss = CTMLoss(sch, param="x0", dsm_weight=0.0, compare=compare)
    t, u, s = loss.sample_times(256, torch.Generator().manual_seed(1))
    noise = torch.randn(256, 2, generator=g, dtype=torch.float64)
    teacher = _gaussian_teacher(sch)
    exact = loss(model, teacher, x0, times=(t, t, s), noise=noise).loss
    assert float(exact.max()) < 1e-20
    err = []
    for k in (1, 4):
        loss.teacher_steps = k
        err.append(float(loss(model, teacher, x0, times=(t, u, s), noise=noise).loss.mean()))
    print(f"CTM exact-map loss ({compare}), Heun teacher 1 / 4 steps: {err}")
    assert 0 < err[1] < err[0] / 100 and err[0] < 1e-2


def test_ctm_target_network_takes_the_jump_from_u(one_thread):
    """With ``target`` (theta^-), x_target = G_theta^-(x_u, u, s) and only x_est comes from the student: the loss equals
    mean((G_theta(x_t, t, s) - G_theta^-(x_u, u, s))^2) (compare s, one DDIM teacher step), and differs from the loss
    with the student as its own target; ``target=model`` is that default."""
    sch = make_schedule("vp_cosine")
    torch.manual_seed(0)
    nets = [build_model({"name": "mlp", "dim": 2, "hidden": 16, "depth": 1, "second_time": True}).double()
            for _ in range(2)]
    for net in nets:
        nn.init.normal_(net.out[-1].weight, std=0.3)
    student, target = (CTMModel(Denoiser(net, sch, "x0")) for net in nets)
    g = torch.Generator().manual_seed(0)
    x0 = MU + S0 * torch.randn(64, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(64, 2, generator=g, dtype=torch.float64)
    loss = CTMLoss(sch, param="x0", solver="ddim", compare="s", dsm_weight=0.0)
    t, u, s = times = loss.sample_times(64, torch.Generator().manual_seed(1))
    teacher = _gaussian_teacher(sch)
    got = loss(student, teacher, x0, target=target, times=times, noise=noise).loss
    with torch.no_grad():
        x_t = sch.marginal(x0, noise, t)
        x_u = teacher_step("ddim", teacher, x_t, t, u)
        want = (student.jump(x_t, t, s, clip=False) - target.jump(x_u, u, s, clip=False)).square().mean(1)
    torch.testing.assert_close(got.detach(), want.float())  # the distance is taken in float32
    own = loss(student, teacher, x0, times=times, noise=noise).loss
    torch.testing.assert_close(own, loss(student, teacher, x0, target=student, times=times, noise=noise).loss)
    assert float((own - got).abs().max()) > 1e-3


def test_ctm_times_are_ordered_and_bounded():
    sch = make_schedule("ddpm", kind="cosine")
    loss = CTMLoss(sch, max_span=0.1, s_zero_prob=0.5)
    t, u, s = loss.sample_times(4096, torch.Generator().manual_seed(0))
    assert bool(((s <= u) & (u <= t) & (u >= 1 / 1000) & (t - u <= 0.1 + 1e-12)).all())
    assert 0.45 < float((s == 0).double().mean()) < 0.55
    n = 40_000  # no span limit: s uniform in [0, t], u uniform in [s, t] (CTM's s <= u <= t), t by time_sampling
    t, u, s = CTMLoss(sch, s_zero_prob=0.25).sample_times(n, torch.Generator().manual_seed(1))
    keep, tol = s > 0, 4 * (1 / 12) ** 0.5 / n**0.5
    assert abs(float((s == 0).double().mean()) - 0.25) < 0.01 and abs(float(t.mean()) - 0.5) < tol
    assert abs(float((s / t)[keep].mean()) - 0.5) < 2 * tol and abs(float((s / t)[keep].std()) - 12 ** -0.5) < 0.01
    frac = ((u - s) / (t - s))[t > 0.01]  # away from u's floor u_min
    assert abs(float(frac.mean()) - 0.5) < 2 * tol and abs(float(frac.std()) - 12 ** -0.5) < 0.01


def test_ctm_rho_times_are_uniform_grid_positions():
    """On sigma schedules CTM draws t, then s <= t, then u in [s, t] uniformly over its rho = 7 EDM grid's indices
    (arXiv 2310.02279): the default there, ``rho``, draws them uniformly on that grid's continuous scale. In rho
    positions (0: sigma_max, 1: sigma_min) t is uniform, s uniform below t and u uniform between (means within 4
    sigma of 40k draws), and P(sigma_t < 1) is the position of sigma = 1 (uniform sigma would give 0.012)."""
    edm, n = make_schedule("edm"), 40_000
    loss = CTMLoss(edm, s_zero_prob=0.25)
    assert loss.time_sampling == "rho" and CTMLoss(make_schedule("vp_cosine")).time_sampling == "uniform"
    t, u, s = loss.sample_times(n, torch.Generator().manual_seed(0))
    zero = s == 0
    assert bool(((s <= u) & (u <= t) & (u >= edm.t_min)).all()) and abs(float(zero.double().mean()) - 0.25) < 0.01
    hi, lo = 80.0 ** (1 / 7), 0.002 ** (1 / 7)
    pos = lambda x: (hi - x.clamp_min(0.002) ** (1 / 7)) / (hi - lo)  # noqa: E731 (sigma = t on edm)
    q_t, q_s, q_u = pos(t), pos(torch.where(zero, torch.full_like(s, 0.002), s)), pos(u)
    tol = 4 * (1 / 12) ** 0.5 / n**0.5
    assert abs(float(q_t.mean()) - 0.5) < tol and abs(float((q_t < 0.25).double().mean()) - 0.25) < 0.01
    keep = ~zero
    assert abs(float(((q_s - q_t) / (1 - q_t))[keep].mean()) - 0.5) < 2 * tol
    assert abs(float(((q_u - q_t) / (q_s - q_t)).mean()) - 0.5) < 2 * tol
    assert abs(float((t < 1).double().mean()) - (1 - (hi - 1) / (hi - lo))) < 0.01
    torch.testing.assert_close(rho_times(edm, torch.linspace(0, 1, 18, dtype=torch.float64)),
                               make_grid(edm, 18, "rho")[:-1], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"method.time_sampling: 'rho' needs .* 'flow' does not have"):
        CTMLoss(make_schedule("flow"), time_sampling="rho")


def _exact_models():
    flow, vp = make_schedule("flow"), make_schedule("vp_cosine")
    return {"meanflow": MeanFlowModel(ExactNet(flow, "u"), flow),
            "ctm": CTMModel(Denoiser(ExactNet(vp, "g"), vp, "x0"))}


@pytest.mark.parametrize("kind", ["meanflow", "ctm"])
@pytest.mark.parametrize("sampler,nfe", [("flowmap", 1), ("flowmap", 3), ("flowmap_gamma", 4)])
def test_few_step_samplers_are_exact_with_the_exact_flow_map(kind, sampler, nfe):
    """1 step, n steps and gamma-sampling from the exact flow map all give N(MU, S0^2 I) (affine maps of Gaussian
    noise; gamma-sampling noises forward exactly): mean and std within sampling error of 200k samples."""
    model = _exact_models()[kind]
    sch = model.schedule
    z = float(sch.sigma(sch.t_max)) * torch.randn(200_000, 2, generator=torch.Generator().manual_seed(0),
                                                  dtype=torch.float64)
    x = run(sampler, model, z, nfe, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x.mean(0), MU, atol=0.005, rtol=0)
    torch.testing.assert_close(x.std(0), torch.full((2,), S0, dtype=torch.float64), atol=0.005, rtol=0)


def test_gamma_time_is_ctms_ve_formula():
    """On VE / EDM (alpha = 1): u = sqrt(1 - gamma^2) s (arXiv 2310.02279, Sec. 5); gamma 0 keeps s, 1 gives 0."""
    sch = make_schedule("edm")
    s = torch.tensor([0.01, 0.5, 3.0, 40.0], dtype=torch.float64)
    for gamma in (0.0, 0.3, 0.9):
        torch.testing.assert_close(gamma_time(sch, s, gamma), (1 - gamma**2) ** 0.5 * s)
    assert float(gamma_time(sch, s[1], 1.0)) == 0.0


def test_ctm_jump_is_the_papers_ve_form_and_identity_at_s_equal_t(one_thread):
    """G(x, t, s) = (s / t) x + (1 - s / t) g on EDM's schedule (the paper's eq. 4), and G(x, t, t) = x (t = 0 too)."""
    sch = make_schedule("edm")
    torch.manual_seed(0)
    cfg = {"name": "mlp", "dim": 2, "hidden": 16, "depth": 1, "second_time": True}
    net = build_model(cfg)
    nn.init.normal_(net.out[-1].weight, std=0.5)
    model = CTMModel(Denoiser(net, sch, "edm", sigma_data=0.5))
    x = torch.randn(5, 2, dtype=torch.float64)
    net.double()
    t = torch.tensor([0.5, 2.0, 10.0, 80.0, 1.0], dtype=torch.float64)
    s = torch.tensor([0.0, 1.0, 0.3, 5.0, 1.0], dtype=torch.float64)
    with torch.no_grad():
        r = (s / t)[:, None]
        torch.testing.assert_close(model.jump(x, t, s, clip=False), r * x + (1 - r) * model.g(x, t, s, clip=False))
        assert torch.equal(model.jump(x, t, t), x)
        zero = torch.zeros(5, dtype=torch.float64)
        assert torch.equal(model.jump(x, zero, zero), x)


@pytest.mark.parametrize("teacher_schedule", ["vp_cosine", "ddpm"])
def test_rescheduled_teacher_is_the_exact_denoiser_of_the_flow_schedule(teacher_schedule):
    """A denoiser on a VP schedule read on the flow schedule (same log-SNR, rescaled input) is the flow schedule's."""
    kw = {"kind": "cosine"} if teacher_schedule == "ddpm" else {}
    vp, flow, gmm = make_schedule(teacher_schedule, **kw), make_schedule("flow"), default_gmm()
    teacher = Rescheduled(gmm.denoiser(vp), flow)
    t = torch.linspace(0.02, 0.97, 48, dtype=torch.float64)
    x = flow.marginal(gmm.sample(48, generator=torch.Generator().manual_seed(0))[0].double(),
                      torch.randn(48, 2, dtype=torch.float64), t)
    torch.testing.assert_close(teacher(x, t), gmm.denoiser(flow)(x, t), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(teacher(x[:1], float(t[5])), gmm.denoiser(flow)(x[:1], float(t[5])))


def test_guided_jump_is_the_guided_network_output(one_thread):
    """CFGDenoiser.jump of a MeanFlow model: z - (t - s)(u_null + w (u_c - u_null))."""
    sch = make_schedule("flow")
    torch.manual_seed(0)
    net = build_model({"name": "mlp", "dim": 2, "hidden": 16, "depth": 1, "num_classes": 3, "second_time": True})
    nn.init.normal_(net.out[-1].weight, std=0.5)
    model = MeanFlowModel(net, sch)
    z, y = torch.randn(4, 2), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        got = CFGDenoiser(model, 2.5, 3).jump(z, 0.8, 0.3, y)
        u_c, u_n = model.u(z, 0.3, 0.8, y), model.u(z, 0.3, 0.8, torch.full_like(y, 3))
    torch.testing.assert_close(got, z - 0.5 * (u_n + 2.5 * (u_c - u_n)))
    with pytest.raises(TypeError, match="not a flow map"):
        CFGDenoiser(Denoiser(net, sch, "velocity"), 2.0, 3).jump(z, 0.8, 0.3, y)
    with pytest.raises(TypeError, match="flow-map student"):
        run("flowmap", Denoiser(net, sch, "velocity"), z, 1)


@pytest.mark.parametrize("kind", ["consistency", "ctm", "meanflow"])
def test_guided_few_step_students_clip_the_guided_estimate_once(kind, one_thread):
    """A student over a clipping denoiser (clip_x0 1) is affine in its clean estimate x0_hat; guidance at w = 3 guides
    the unclipped x0_hat, then clips it once (as for a plain Denoiser), instead of mixing the clipped branches, which
    leaves [-1, 1]: the consistency function equals the consistency function over the guided Denoiser, and a CTM /
    MeanFlow jump is the DDIM step t -> s to the clipped guided estimate."""
    from dtrain.samplers.ddim import ddim_step
    from dtrain.samplers.few_step import ConsistencyModel

    torch.manual_seed(0)
    vp, flow, w = make_schedule("vp_cosine"), make_schedule("flow"), 3.0
    net = build_model({"name": "mlp", "dim": 2, "hidden": 16, "depth": 1, "num_classes": 3,
                       "second_time": kind != "consistency"})
    for q in net.parameters():
        nn.init.normal_(q, std=0.5)
    den = Denoiser(net, vp, "v", clip_x0=1.0)
    x, y, null = 2 * torch.randn(64, 2), torch.arange(64) % 3, torch.full((64,), 3)
    with torch.no_grad():
        if kind == "consistency":
            model, t = ConsistencyModel(den), 0.9
            got = CFGDenoiser(model, w, 3)(x, t, y)
            want = ConsistencyModel(CFGDenoiser(den, w, 3))(x, t, y)
            naive = model(x, t, null) + w * (model(x, t, y) - model(x, t, null))
        else:
            model = CTMModel(den) if kind == "ctm" else MeanFlowModel(net, flow, den)
            sch, t, s = model.schedule, 0.9, 0.2
            got = CFGDenoiser(model, w, 3).jump(x, t, s, y)
            x0 = model.clean(x, t, s, null, clip=False) + w * (model.clean(x, t, s, y, clip=False)
                                                                - model.clean(x, t, s, null, clip=False))
            assert float(x0.abs().max()) > 1.1  # the guided estimate leaves the clip range before clipping
            want = ddim_step(sch, x, x0.clamp(-1, 1), torch.tensor(t, dtype=torch.float64),
                             torch.tensor(s, dtype=torch.float64))
            naive = model.jump(x, t, s, null) + w * (model.jump(x, t, s, y) - model.jump(x, t, s, null))
            if kind == "ctm":  # the denoiser view (s = t) is the guided Denoiser with its second time at t
                torch.testing.assert_close(CFGDenoiser(model, w, 3)(x, t, y), CFGDenoiser(den, w, 3)(x, t, y))
    torch.testing.assert_close(got, want)
    assert float((got - naive).abs().max()) > 0.01  # guiding the clipped branches is another (wrong) answer


@pytest.mark.parametrize("cfg", [{"name": "mlp", "dim": 2, "hidden": 16, "depth": 1, "num_classes": 3},
                                 {"name": "unet", "in_channels": 1, "resolution": 8, "channels": 16,
                                  "channel_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4],
                                  "dropout": 0.0, "num_classes": 3}])
def test_second_time_network_starts_as_the_one_time_network(cfg, one_thread):
    """A second_time network loaded from a one-time network (only s_emb.* new) computes it for every s; without the
    fourth argument it takes s = t; a one-time state dict is unchanged (backward compatible)."""
    torch.manual_seed(0)
    one, two = build_model(cfg), build_model({**cfg, "second_time": True})
    for p in one.parameters():  # non-trivial weights everywhere (the output layers start at zero)
        nn.init.normal_(p, std=0.2)
    missing, unexpected = two.load_state_dict(one.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.startswith("s_emb.") for k in missing)
    assert set(build_model(cfg).state_dict()) == set(one.state_dict())
    x = torch.randn(3, 2) if cfg["name"] == "mlp" else torch.randn(3, 1, 8, 8)
    c, y = torch.tensor([10.0, 400.0, 900.0]), torch.tensor([0, 1, 3])
    with torch.no_grad():
        ref = one(x, c, y)
        for s in (None, torch.zeros(3), torch.tensor([5.0, 100.0, 899.0])):
            torch.testing.assert_close(two(x, c, y, s), ref)
        nn.init.normal_(two.s_emb.mlp[-1].weight, std=0.2)  # once trained, s matters; None still means s = t
        assert not torch.allclose(two(x, c, y, torch.zeros(3)), two(x, c, y))
        torch.testing.assert_close(two(x, c, y), two(x, c, y, c))


def test_meanflow_jvp_runs_through_unet_attention(one_thread):
    """The UNet's attention inside the JVP (math SDPA kernel): du/dt matches a central finite difference in t."""
    sch = make_schedule("flow")
    torch.manual_seed(0)
    net = build_model({"name": "unet", "in_channels": 1, "resolution": 8, "channels": 16, "channel_mult": [1, 2],
                       "num_res_blocks": 1, "attn_resolutions": [4], "dropout": 0.0, "second_time": True}).double()
    for p in net.parameters():
        nn.init.normal_(p, std=0.05)
    model = MeanFlowModel(net, sch)
    z, t, r = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([0.6, 0.9], dtype=torch.float64), \
        torch.tensor([0.2, 0.9], dtype=torch.float64)
    v = torch.zeros_like(z)  # tangent only in t: du/dt = d_t u
    u, target = meanflow_target(model, z, r, t, v)
    h = 1e-4
    with torch.no_grad():
        fd = (model.u(z, r, t + h) - model.u(z, r, t - h)) / (2 * h)
    want = v - (t - r)[:, None, None, None] * fd
    torch.testing.assert_close(target, want, atol=1e-4, rtol=1e-3)  # c_noise reaches the net as float32
    assert u.shape == z.shape


@pytest.mark.parametrize("override,key", [
    (["schedule.name=vp_cosine"], "schedule.name"),
    (["model.param=v"], "model.param"),
    (["model.second_time=false"], "model.second_time"),
    (["method.jvp=forward"], "method.jvp"),
    (["method.jvp=fused", "strategy.name=deepspeed"], "method.jvp"),
    (["method.ratio=1.5"], "method.ratio"),
    (["method.r_zero=-0.1"], "method.r_zero"),
    (["method.adaptive_c=0"], "method.adaptive_c"),
    (["method.p_std=0"], "method.p_std"),
    (["method.cfg_dropout=1.0"], "method.cfg_dropout"),
    (["method.init=ctm"], "method.init"),
    (["method.time_sampling=logit_normal", "method.r_p_std=0"], "method.r_p_std"),
    (["method.r_p_mean=-4.0"], "method.r_p_mean"),  # r's own law is logit-normal; this recipe samples uniform
])
def test_meanflow_recipe_rejects_bad_combinations(override, key):
    with pytest.raises(RecipeError) as e:
        load_recipe(RECIPES / "meanflow_gmm.yaml", override)
    assert e.value.key == key


@pytest.mark.parametrize("override,key", [
    (["method.compare=x0"], "method.compare"),
    (["method.solver=euler"], "method.solver"),
    (["method.teacher_steps=0"], "method.teacher_steps"),
    (["method.dsm_weighting=snr"], "method.dsm_weighting"),
    (["method.huber_c=0"], "method.huber_c"),
    (["method.s_zero_prob=1.5"], "method.s_zero_prob"),
    (["method.target_ema=1.0"], "method.target_ema"),
    (["method.time_sampling=sigma"], "method.time_sampling"),
    (["method.time_sampling=rho", "schedule.name=flow", "schedule.kind=null", "model.param=velocity"],
     "method.time_sampling"),  # no finite log-SNR at t_max = 1
])
def test_ctm_recipe_rejects_bad_combinations(override, key):
    with pytest.raises(RecipeError) as e:
        load_recipe(RECIPES / "ctm_gmm.yaml", override)
    assert e.value.key == key


def test_flowmap_sampler_needs_a_flow_map_student():
    with pytest.raises(RecipeError) as e:
        load_recipe(RECIPES.parent / "teacher" / "gmm.yaml", ["sampler.name=flowmap"])
    assert e.value.key == "sampler.name"


def test_as_t_keeps_forward_mode_tangents():
    """The time plumbing (as_t, c_noise, float32) keeps forward-AD tangents: d c_noise / dt = 1000 on flow."""
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        t = fwAD.make_dual(torch.tensor([0.3], dtype=torch.float64), torch.ones(1, dtype=torch.float64))
        c = make_schedule("flow").c_noise(as_t(t)).float()
        assert float(fwAD.unpack_dual(c).tangent) == 1000.0


def test_label_dropout_drops_the_configured_fraction():
    """MeanFlow / CTM CFG training: each label becomes the null class with probability p (p = 1: all, p = 0: none)."""
    from dtrain.methods.flow_map import _noise_and_labels

    x0, labels = torch.zeros(20_000, 2), torch.arange(20_000) % 10
    for p, lo, hi in ((0.1, 0.09, 0.11), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)):
        _, cond = _noise_and_labels(x0, labels, p, 10, None, torch.Generator().manual_seed(0))
        null = (cond == 10).double().mean().item()
        assert lo <= null <= hi, (p, null)
        assert torch.equal(cond[cond != 10], labels[cond != 10])  # the rest keep their own label


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_meanflow_feeds_the_network_its_own_dtype(dtype):
    """A bf16 (or float64) MeanFlow network samples from float32 noise (it crashed in the first linear layer: 'mat1
    and mat2 must have the same dtype'); the state stays float32 and agrees with the float32 network."""
    sch = make_schedule("flow")
    torch.manual_seed(0)
    net = build_model({"name": "mlp", "dim": 2, "hidden": 16, "depth": 1, "second_time": True})
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    ref = run("flowmap", MeanFlowModel(net, sch), z, 2)
    x = run("flowmap", MeanFlowModel(copy.deepcopy(net).to(dtype), sch), z, 2)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, ref, atol=0.05 if dtype == torch.bfloat16 else 1e-6, rtol=0)

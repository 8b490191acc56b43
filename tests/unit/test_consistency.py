"""Consistency models against exact answers: the boundary f(x, t_min) = x bit for bit for every parameterization and
schedule, the c_skip / c_out closed form, losses that vanish exactly for exactly consistent models (CD with a DDIM
teacher, CT on a point mass), the curricula and iCT's interval law, the distances, the per-sample teacher steps
against the shared samplers, the multistep sampler's noise law, the bundle kind, and a 1-step CD student on the
2-D GMM that gets the mixture weights right where the teacher's DDIM-1 collapses.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from dtrain.config import RecipeError, load_recipe
from dtrain.data.synthetic import default_gmm, sliced_wasserstein
from dtrain.diffusion.denoiser import Denoiser
from dtrain.diffusion.param import PARAMS
from dtrain.diffusion.schedule import bcast, make_schedule
from dtrain.errors import InputError
from dtrain.methods import consistency as C
from dtrain.models import EMA, MLP, build_denoiser, build_model
from dtrain.samplers import SAMPLERS, ddim, dpm_solver_2s, heun, run
from dtrain.samplers.few_step import ConsistencyModel, consistency, consistency_grid

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SCHEDULES = {
    "ddpm_cosine": lambda: make_schedule("ddpm", kind="cosine"),
    "vp_linear": lambda: make_schedule("vp_linear"),
    "vp_cosine": lambda: make_schedule("vp_cosine"),
    "edm": lambda: make_schedule("edm"),
    "ve": lambda: make_schedule("ve"),
    "flow": lambda: make_schedule("flow", t_min=1e-3),
}


def random_net(dim: int = 3, seed: int = 0, dropout: float = 0.0) -> nn.Module:
    """An MLP whose output is not zero (the real one zero-initialises its last layer)."""
    torch.manual_seed(seed)
    net = MLP(dim, 32, 1, dropout=dropout)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net.eval()


class Const(nn.Module):
    """D(x, t) = c for every x and t: its probability-flow ODE is solved exactly by DDIM steps, which compose."""

    def __init__(self, schedule, c: Tensor) -> None:
        super().__init__()
        self.schedule, self.c = schedule, c

    def forward(self, x: Tensor, t, cond=None) -> Tensor:
        return self.c.to(x.dtype).expand_as(x)


# ---------------------------------------------------------------------------------------------
# The boundary condition


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("sched", list(SCHEDULES))
def test_boundary_is_exact_for_every_parameterization(sched, param):
    sch = SCHEDULES[sched]()
    cm = ConsistencyModel(Denoiser(random_net(), sch, param, sigma_data=0.5, input_scaling=param == "edm"))
    x = 3 * torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    t_min = sch.t_min
    for t in (t_min, torch.tensor(t_min, dtype=torch.float64), torch.full((5,), t_min, dtype=torch.float64)):
        assert torch.equal(cm.consistency(x, t), x), (sched, param)
    a_min = float(sch.alpha(t_min))
    assert torch.equal(cm(x, t_min), x if a_min == 1.0 else x / a_min)  # the clean-data view
    # a mixed batch: only the rows at t_min are the identity, the others move
    t = torch.tensor([t_min, 0.3 * sch.t_max, t_min, sch.t_max, t_min], dtype=torch.float64)
    f = cm.consistency(x, t)
    assert torch.equal(f[[0, 2, 4]], x[[0, 2, 4]])
    assert (f[[1, 3]] - x[[1, 3]]).abs().max() > 1e-2
    # continuity: no jump at the boundary (c_skip -> 1, c_out -> 0)
    near = cm.consistency(x, t_min * (1 + 1e-9) if sched != "ddpm_cosine" else t_min + 1e-12)
    assert (near - x).abs().max() < 1e-5, (near - x).abs().max()


def test_edm_coefficients_are_song_et_al_c_out_and_our_c_skip():
    """On EDM with D in EDM's parameterization, f = c_skip x + c_out F with Song et al.'s c_out and
    c_skip = (sigma_min sigma + sigma_data^2) / (sigma^2 + sigma_data^2)."""
    sch, sd = make_schedule("edm"), 0.5

    class Fixed(nn.Module):  # F(x, c_noise) = the fixed tensor below
        def forward(self, x, c_noise, cond=None):
            return F_out

    F_out = torch.randn(4, 3, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.01, 1.0, 80.0], dtype=torch.float64)
    f = ConsistencyModel(Denoiser(Fixed(), sch, "edm", sigma_data=sd)).consistency(x, sigma)
    s_min = 0.002
    c_out = (sigma - s_min) * sd / (sigma**2 + sd**2).sqrt()
    c_skip = (s_min * sigma + sd**2) / (sigma**2 + sd**2)
    torch.testing.assert_close(f, c_skip[:, None] * x + c_out[:, None] * F_out, rtol=1e-12, atol=1e-12)


def test_init_from_a_teacher_is_its_one_step_ddim_jump():
    sch = make_schedule("ddpm", kind="cosine")
    den = Denoiser(random_net(), sch, "v")
    x, t = torch.randn(6, 3), torch.tensor(0.7, dtype=torch.float64)
    want = ddim(den, x, torch.tensor([0.7, sch.t_min, 0.0], dtype=torch.float64)[:2])  # DDIM 0.7 -> t_min
    torch.testing.assert_close(ConsistencyModel(den).consistency(x, t), want, rtol=1e-5, atol=1e-6)


def test_schedule_without_a_boundary_time_is_refused():
    with pytest.raises(ValueError, match="t_min must be > 0"):
        ConsistencyModel(Denoiser(random_net(), make_schedule("flow"), "velocity"))


# ---------------------------------------------------------------------------------------------
# Losses that vanish for exactly consistent models


@pytest.mark.parametrize("sched", ["ddpm_cosine", "edm", "vp_cosine"])
def test_cd_loss_vanishes_for_an_exactly_consistent_student(sched):
    sch = SCHEDULES[sched]()
    c = torch.tensor([0.3, -0.5, 0.1], dtype=torch.float64)
    teacher = Const(sch, c)
    good = ConsistencyModel(Const(sch, c))
    bad = ConsistencyModel(Const(sch, c + 0.05))  # consistent too where sigma_min / sigma ~ 0, but not near t_min
    x0 = torch.randn(256, 3, dtype=torch.float64)
    for variant_kw in ({}, {"num_scales": 40, "distance": "l1"},
                       {"curriculum": "ict", "time_sampling": "lognormal", "weighting": "ict",
                        "distance": "pseudo_huber"}):
        loss = C.ConsistencyLoss(sch, "cd", solver="ddim", total_steps=100, **variant_kw)
        zero = loss(good, good, x0, teacher=teacher, step=50).loss
        assert zero.abs().max() < 1e-9, (variant_kw, zero.abs().max())
        assert loss(bad, bad, x0, teacher=teacher, step=50).loss.mean() > 1e3 * zero.abs().max() + 1e-7
    # Heun integrates in t: exact on EDM (x - c is linear in sigma = t), off on VP schedules, where sigma ~ sqrt(t)
    # near 0 (vp_cosine: an error of 0.27 on the first interval of 18) and DDPM's alpha is piecewise linear with
    # steep last knots. CD on VP schedules should use the DDIM solver (an exponential integrator).
    heun_loss = C.ConsistencyLoss(sch, "cd", solver="heun")(good, good, x0, teacher=teacher).loss.max()
    assert (heun_loss < 1e-9) if sched == "edm" else (heun_loss > 1e-4)
    # DPM-Solver++(2S) is an exponential integrator too: exact for a constant x0 on every schedule
    assert C.ConsistencyLoss(sch, "cd", solver="dpm++2s")(good, good, x0, teacher=teacher).loss.abs().max() < 1e-9


@pytest.mark.parametrize("solver", ["ddim", "heun", "dpm++2s"])
def test_cd_teacher_steps_see_the_students_labels(solver):
    """Class-conditional CD: every teacher evaluation of the ODE step gets the batch's labels (a teacher stepping
    unconditionally would distil the unconditional flow into a conditional student)."""
    sch = make_schedule("edm")
    seen = []

    class Recorder(Const):
        def forward(self, x, t, cond=None):
            seen.append(cond)
            return super().forward(x, t, cond)

    teacher = Recorder(sch, torch.zeros(3, dtype=torch.float64))
    cm = ConsistencyModel(Const(sch, torch.zeros(3, dtype=torch.float64)))
    labels = torch.arange(8) % 3
    C.ConsistencyLoss(sch, "cd", solver=solver)(cm, cm, torch.randn(8, 3, dtype=torch.float64), labels,
                                                 teacher=teacher)
    assert seen and all(c is not None and torch.equal(c, labels) for c in seen), seen


def test_variant_defaults_are_the_documented_table():
    """``resolve`` fills a bare section with the module docstring's defaults (CM's CD target EMA 0.95, CT's mu0 0.9,
    iCT's stop-grad 0; arXiv 2303.01469, 2310.14189)."""
    want = {"cd": ("teacher", "fixed", 18, "uniform", "l2", "none", 0.95),
            "ct": ("scratch", "ct", 18, "uniform", "l2", "none", 0.9),
            "ict": ("scratch", "ict", 18, "lognormal", "pseudo_huber", "ict", 0.0)}
    keys = ("init", "curriculum", "num_scales", "time_sampling", "distance", "weighting", "target_ema")
    for variant, values in want.items():
        m = C.resolve({"name": variant})
        assert tuple(m[k] for k in keys) == values, variant
    assert (C.resolve({"name": "ct"})["scales_start"], C.resolve({"name": "ct"})["scales_end"]) == (2, 150)
    assert (C.resolve({"name": "ict"})["scales_start"], C.resolve({"name": "ict"})["scales_end"]) == (10, 1280)
    assert C.resolve({"name": "cd", "target_ema": 0.5})["target_ema"] == 0.5


def test_cd_needs_a_teacher():
    sch = make_schedule("edm")
    cm = ConsistencyModel(Const(sch, torch.zeros(2)))
    with pytest.raises(ValueError, match="needs a teacher"):
        C.ConsistencyLoss(sch, "cd")(cm, cm, torch.randn(4, 2))


@pytest.mark.parametrize("variant", ["ct", "ict"])
def test_ct_loss_vanishes_on_a_point_mass_with_shared_noise(variant):
    """Data = one point c: the exact consistency function is the DDIM map with D = c, and CT's pair (same x0, same
    noise) lands on the same trajectory, so the loss is 0; independent noise per point would not be."""
    sch = make_schedule("edm")
    c = torch.tensor([0.2, -0.4], dtype=torch.float64)
    cm = ConsistencyModel(Const(sch, c))
    x0 = c.expand(512, 2).clone()
    loss = C.ConsistencyLoss(sch, variant, total_steps=10)
    assert loss(cm, cm, x0, step=3).loss.abs().max() < 1e-9
    t_lo, t_hi, _ = loss.sample_intervals(512, 3, torch.Generator().manual_seed(0))
    assert (t_hi > t_lo).all() and (t_lo >= sch.t_min).all()
    z = torch.randn(512, 2, dtype=torch.float64)
    with torch.no_grad():  # what the loss would be with fresh noise at t_n: clearly not 0
        other = cm.consistency(sch.marginal(x0, torch.randn_like(x0), t_lo), t_lo)
        pred = cm.consistency(sch.marginal(x0, z, t_hi), t_hi)
    assert (pred - other).square().mean() > 1e-8


def test_ict_weighting_on_a_vp_schedule_reaches_the_loss():
    """iCT's lambda_n = 1 / (s_{n+1} - s_n) in EDM's sigma = sigma / alpha of the scaled variable (on EDM, t itself:
    the only schedule the grid was checked on, and nothing checked the loss applies it): on the digits recipe's
    discrete cosine schedule, against the closed form and inside the per-sample loss."""
    sch = make_schedule("ddpm", kind="cosine", T=1000)
    loss = C.ConsistencyLoss(sch, "ict", total_steps=10, spacing="uniform")
    ts, _, w = loss.grid(11)
    a, s = sch.alpha_sigma(ts)
    torch.testing.assert_close(w, 1 / (s / a).diff(), rtol=1e-10, atol=0)
    assert not torch.allclose(w, 1 / ts.diff(), rtol=0.1)  # t is not sigma / alpha here
    student = ConsistencyModel(Denoiser(random_net(), sch, "v"))
    target = ConsistencyModel(Denoiser(random_net(seed=1), sch, "v"))
    x0, z = torch.randn(6, 3), torch.randn(6, 3)
    lo, hi = ts[:6], ts[1:7]
    unit = loss(student, target, x0, intervals=(lo, hi, torch.ones(6, dtype=torch.float64)), noise=z).loss
    weighted = loss(student, target, x0, intervals=(lo, hi, w[:6]), noise=z).loss
    torch.testing.assert_close(weighted, unit * w[:6].to(unit.dtype), rtol=1e-6, atol=0)


@pytest.mark.parametrize("target_ema", [0.0, 0.9])
def test_the_target_reads_the_students_dropout_masks(target_ema):
    """theta^- drops what the student drops (iCT's theta^- = sg(theta) is the student's own function): with dropout
    0.3 the loss at t_n = t_{n+1} is exactly 0, for the stop-gradient target and for an EMA copy of the same
    weights (kept in eval mode; run in the student's mode for the call, and back in eval mode after)."""
    sch = make_schedule("edm")
    net = random_net(dropout=0.3).train()
    student = ConsistencyModel(Denoiser(net, sch, "edm"))
    ema = EMA(net, [target_ema]) if target_ema else None
    target = student if ema is None else ConsistencyModel(Denoiser(ema[ema.tags[0]], sch, "edm"))
    x0, t = torch.randn(32, 3), torch.full((32,), 0.7, dtype=torch.float64)
    for variant in ("ict", "ct"):
        loss = C.ConsistencyLoss(sch, variant, total_steps=10)
        assert float(loss(student, target, x0, intervals=(t, t, torch.ones_like(t))).loss.abs().max()) == 0.0
    assert ema is None or not any(m.training for m in ema[ema.tags[0]].modules())
    x = sch.marginal(x0, torch.randn_like(x0), t)
    with torch.no_grad():  # two forwards with their own masks differ clearly
        assert float((student.consistency(x, t) - student.consistency(x, t)).abs().max()) > 1e-2


# ---------------------------------------------------------------------------------------------
# Curricula, grids, interval law, weighting, distances


def test_curricula_closed_forms():
    assert C.num_scales("fixed", 123, 1000, n=18) == 18
    # CM's CT (arXiv 2303.01469, App. C): s0 at k = 0, s1 + 1 at k = K
    assert C.num_scales("ct", 0, 1000, s0=2, s1=150) == 2
    assert C.num_scales("ct", 1000, 1000, s0=2, s1=150) == 151
    assert C.num_scales("ct", 250, 1000, s0=2, s1=150) == math.ceil(math.sqrt(0.25 * (151**2 - 4) + 4) - 1) + 1
    # iCT (arXiv 2310.14189): 10 -> 1280 doubling every K' = K / 8 steps, then N = s + 1
    K = 800_000
    got = [C.num_scales("ict", k, K, s0=10, s1=1280) for k in (0, 99_999, 100_000, 250_000, 700_000, 799_999)]
    assert got == [11, 11, 21, 41, 1281, 1281]


def test_edm_grid_is_karras_and_lognormal_law_is_icts():
    sch, n, rho = make_schedule("edm"), 11, 7.0
    ts = C.consistency_times(sch, n)
    i = torch.arange(n, dtype=torch.float64)
    karras = (0.002 ** (1 / rho) + i / (n - 1) * (80 ** (1 / rho) - 0.002 ** (1 / rho))) ** rho
    torch.testing.assert_close(ts, karras, rtol=1e-12, atol=0)
    assert float(ts[0]) == 0.002 and float(ts[-1]) == 80.0
    p = C.interval_probs(sch, ts, "lognormal", -1.1, 2.0)
    cdf = [math.erf((math.log(float(s)) + 1.1) / (math.sqrt(2) * 2.0)) for s in karras]
    want = torch.tensor(cdf, dtype=torch.float64).diff()
    torch.testing.assert_close(p, want / want.sum(), rtol=1e-10, atol=0)
    loss = C.ConsistencyLoss(sch, "ict", total_steps=10)
    _, _, w = loss.grid(n)
    torch.testing.assert_close(w, 1 / karras.diff(), rtol=1e-10, atol=0)  # lambda = 1 / (sigma_{n+1} - sigma_n)
    # the intervals are drawn with that law
    _, t_hi, _ = loss.sample_intervals(40_000, 0, torch.Generator().manual_seed(0))
    counts = torch.bincount(torch.searchsorted(ts, t_hi) - 1, minlength=n - 1).double() / 40_000
    assert (counts - want / want.sum()).abs().max() < 0.01


def test_discrete_grid_starts_at_the_boundary():
    sch = make_schedule("ddpm", kind="cosine")
    ts = C.consistency_times(sch, 18)
    assert float(ts[0]) == sch.t_min and float(ts[-1]) == sch.t_max and bool((ts.diff() > 0).all())
    with pytest.raises(ValueError, match=r"method\.spacing: 'trailing'"):
        C.consistency_times(sch, 18, "trailing")


def test_distances():
    a, b = torch.zeros(2, 4), torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, 4.0, 0.0, 0.0]])
    assert C.distance("l2", a, b).tolist() == [0.0, 25 / 4]
    assert C.distance("l1", a, b).tolist() == [0.0, 7 / 4]
    c = C.pseudo_huber_c(4)
    assert c == pytest.approx(0.00054 * 2)
    ph = C.distance("pseudo_huber", a, b)
    assert ph[0] == 0 and ph[1] == pytest.approx(math.sqrt(25 + c**2) - c)
    small = C.distance("pseudo_huber", a, 1e-4 * b, huber_c=1.0)
    assert small[1] == pytest.approx(25e-8 / 2, rel=1e-3)  # quadratic near 0: ||d||^2 / (2c)
    with pytest.raises(ValueError, match=r"method\.distance: unknown 'l3'"):
        C.distance("l3", a, b)


def test_lpips_without_the_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)
    with pytest.raises(ValueError, match="needs the `lpips` package"):
        C.LPIPSDistance()



def test_ct_target_decay_is_cms_mu_of_k():
    """CM's App. C: mu(k) = exp(s0 ln mu0 / N(k)) under the ct curriculum (mu0 at k = 0, N = s0); fixed elsewhere."""
    sch = make_schedule("edm")
    ct = C.ConsistencyLoss(sch, "ct", total_steps=800_000)
    assert ct.target_decay(0.9, 0) == pytest.approx(0.9, abs=1e-15)
    for k in (1000, 50_000, 799_999):
        assert ct.target_decay(0.9, k) == pytest.approx(0.9 ** (2 / C.num_scales("ct", k, 800_000)), rel=1e-12)
    assert ct.target_decay(0.9, 799_999) == pytest.approx(0.99860, abs=1e-5)  # N = 151
    assert ct.target_decay(0.0, 10) is None
    assert C.ConsistencyLoss(sch, "cd").target_decay(0.95, 10) is None
    assert C.ConsistencyLoss(sch, "ict", total_steps=100).target_decay(0.0, 10) is None


def test_ct_run_averages_its_target_with_mu_of_k(tmp_path, one_thread, fit_spied):
    """In ``dtrain fit`` (ct on the GMM, the ct curriculum over 6 steps) theta^- after step k's update is
    mu(k) theta^- + (1 - mu(k)) theta_k, mu(k) = exp(s0 ln mu0 / N(k)), not the fixed mu0."""
    import lightning as L

    from dtrain.lit.consistency import ConsistencyModule

    cfg = load_recipe(RECIPES / "cm" / "cd_gmm.yaml", [
        "method.name=ct", "method.target_ema=0.9", "model.hidden=16", "model.depth=1", "data.batch_size=32",
        "data.num_samples=256", "trainer.max_steps=6", "trainer.cpu_threads=1", "trainer.progress_bar=false",
        "logger.mode=disabled", "trainer.accelerator=cpu", "trainer.devices=1", f"out_dir={tmp_path}"])
    module = ConsistencyModule(cfg)
    seen: dict[int, tuple[list[Tensor], list[Tensor]]] = {}

    class Spy(L.Callback):  # runs before the module's hook: theta^- before step k's update, and theta_k
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen[trainer.global_step] = ([p.detach().clone() for p in pl_module.target.parameters()],
                                         [p.detach().clone() for p in pl_module.net.parameters()])

    fit_spied(cfg, module, Spy())
    mus = [0.9 ** (2 / C.num_scales("ct", k, 6)) for k in range(1, 5)]
    assert len(set(mus)) > 2 and all(m > 0.9 for m in mus[1:])
    for k, mu in zip(range(1, 5), mus):
        for before, net, after in zip(seen[k][0], seen[k][1], seen[k + 1][0]):
            torch.testing.assert_close(after, mu * before + (1 - mu) * net, rtol=1e-5, atol=1e-6)

def test_a_resume_refuses_another_target_decay_and_warns_of_a_curriculum_recomputed(tmp_path):
    """theta^-'s copy in a checkpoint is named by its decay (target.0_9.*): a resume with another decay loaded
    nothing into the new copy and restarted it from the first weights, silently. A curriculum's N(k) is computed over
    trainer.max_steps: a resume with another length changes N at once (iCT at step 8 of 16 -> 32: 161 -> 41)."""
    from dtrain.config import to_container
    from dtrain.export.checkpoint import CheckpointError
    from dtrain.lit.consistency import ConsistencyModule

    def recipe(*over: str) -> dict:
        return to_container(load_recipe(RECIPES / "cm" / "cd_gmm.yaml", [f"out_dir={tmp_path}", *over]))

    ct = ["method.name=ct", "method.curriculum=fixed"]
    ck = {"global_step": 8, "dtrain": {"recipe": recipe(*ct, "method.target_ema=0.9")}}
    ConsistencyModule.check_resume(tmp_path / "a.ckpt", ck, recipe(*ct, "method.target_ema=0.9"), tmp_path)
    with pytest.raises(CheckpointError, match=r"a\.ckpt: method\.target_ema: 0\.9 in the checkpoint \(now 0\.5\)"):
        ConsistencyModule.check_resume(tmp_path / "a.ckpt", ck, recipe(*ct, "method.target_ema=0.5"), tmp_path)
    ict = ["method.name=ict", "method.target_ema=null", "method.distance=null"]
    ck = {"global_step": 8, "dtrain": {"recipe": recipe(*ict, "trainer.max_steps=16")}}
    with pytest.warns(UserWarning, match=r"discretisation differs .*: N at step 8 is 41, the checkpoint's run had "
                      r"161"):
        ConsistencyModule.check_resume(tmp_path / "a.ckpt", ck, recipe(*ict, "trainer.max_steps=32"), tmp_path)
    ck12 = {"global_step": 12, "dtrain": {"recipe": recipe(*ict, "trainer.max_steps=12")}}
    with warnings.catch_warnings():  # iCT's K' = floor(K / 8) is 1 for 12 and 15 steps: N(k) the same, no warning
        warnings.simplefilter("error")
        ConsistencyModule.check_resume(tmp_path / "a.ckpt", ck12, recipe(*ict, "trainer.max_steps=15"), tmp_path)
    cd = {"global_step": 3, "dtrain": {"recipe": recipe()}}
    with pytest.warns(UserWarning, match=r"N at step 3 is 10, the checkpoint's run had 18"):  # a fixed N changed
        ConsistencyModule.check_resume(tmp_path / "a.ckpt", cd, recipe("method.num_scales=10"), tmp_path)
    with pytest.raises(CheckpointError, match=r"method\.target_ema: 0\.0 in the checkpoint \(now 0\.9"):
        ConsistencyModule.check_resume(tmp_path / "a.ckpt", ck, recipe(*ict, "trainer.max_steps=16",
                                                                       "method.target_ema=0.9"), tmp_path)


def test_sample_times_are_the_training_modules_grid_too(tmp_path):
    """With method.sample_times the bundle samples on [t_max, *times, 0]; the module's own sampling (grids, the
    in-training FID sweep) took the default consistency grid at that NFE (t = 0.4529 where the bundle has 0.5)."""
    from dtrain.lit.consistency import ConsistencyModule
    from dtrain.samplers import run
    from dtrain.samplers.base import initial_noise

    cfg = load_recipe(RECIPES / "cm" / "cd_gmm.yaml", ["model.hidden=16", "model.depth=1", "method.sample_times=[0.5]",
                                                        f"out_dir={tmp_path}"])
    module = ConsistencyModule(cfg)
    grid = module.sample_grids()[("consistency", 2)]
    assert grid.tolist() == module.checkpoint_info()["sampler"]["grid"] == [module.schedule.t_max, 0.5, 0.0]
    got = module.sample(6, nfe=2, sampler="consistency", generator=torch.Generator().manual_seed(3))
    den = module.denoiser_for(module.default_ema)
    g = torch.Generator().manual_seed(3)
    x_T = initial_noise(den.schedule, 6, (2,), g, torch.device("cpu"))
    with torch.no_grad():
        want = run("consistency", den, x_T, 2, grid=grid, generator=g)  # the same noise at t = 0.5
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------
# Teacher steps: the shared samplers' steps, per sample


@pytest.mark.parametrize("solver", C.SOLVERS)
def test_teacher_step_per_sample_equals_the_shared_sampler(solver):
    sch = make_schedule("ddpm", kind="cosine")
    den = Denoiser(random_net(), sch, "v")
    x = torch.randn(4, 3, dtype=torch.float64)
    den.net.double()
    t = torch.tensor([0.9, 0.5, 0.2, 0.05], dtype=torch.float64)
    s = torch.tensor([0.8, 0.45, 0.01, 0.001], dtype=torch.float64)
    got = C.teacher_step(solver, den, x, t, s)
    fn = {"ddim": ddim, "heun": heun, "dpm++2s": dpm_solver_2s}[solver]
    want = torch.cat([fn(den, x[i: i + 1], torch.stack([t[i], s[i]])) for i in range(4)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


class GaussTeacher(nn.Module):
    """The exact denoiser of N(0.7, 0.5^2) with per-sample times."""

    def __init__(self, schedule) -> None:
        super().__init__()
        self.schedule = schedule

    def forward(self, x: Tensor, t, cond=None) -> Tensor:
        a, sg = (bcast(v, x) for v in self.schedule.alpha_sigma(t))
        return 0.7 + a * 0.25 / (a * a * 0.25 + sg * sg) * (x - a * 0.7)


@pytest.mark.parametrize("sched,spacing", [("ddpm_cosine", "lambda"), ("vp_cosine", "lambda"), ("edm", "rho")])
def test_second_order_teacher_steps_follow_the_exact_flow_closer(sched, spacing):
    """One teacher step over each interval of an 18-point CD grid on Gaussian data, against the exact probability-flow
    map x_u = a_u mu + sqrt((a_u^2 s^2 + sigma_u^2) / (a_t^2 s^2 + sigma_t^2)) (x_t - a_t mu). Measured max errors
    (ddim / heun / dpm++2s): ddpm_cosine 0.141 / 0.032 / 0.026, vp_cosine 0.070 / 0.011 / 0.009, edm 0.093 / 0.046 /
    0.014: the second-order steps are 2x (Heun on EDM) to 5x closer."""
    sch = SCHEDULES[sched]()
    ts = C.consistency_times(sch, 18, spacing)
    t_hi, t_lo = ts[1:].repeat_interleave(9), ts[:-1].repeat_interleave(9)
    z = torch.linspace(-3, 3, 9, dtype=torch.float64).repeat(17)[:, None]
    (a_t, s_t), (a_u, s_u) = ((bcast(v, z) for v in sch.alpha_sigma(w)) for w in (t_hi, t_lo))
    x = a_t * 0.7 + (a_t**2 * 0.25 + s_t**2).sqrt() * z
    exact = a_u * 0.7 + ((a_u**2 * 0.25 + s_u**2) / (a_t**2 * 0.25 + s_t**2)).sqrt() * (x - a_t * 0.7)
    err = {v: float((C.teacher_step(v, GaussTeacher(sch), x, t_hi, t_lo) - exact).abs().max()) for v in C.SOLVERS}
    assert err["dpm++2s"] < err["ddim"] / 4 and err["heun"] < err["ddim"] / 1.9, err


@pytest.mark.parametrize("spacing", ["lambda", "uniform"])
def test_target_bias_is_the_chain_error_against_the_exact_flow(spacing):
    """``target_bias`` (one teacher step per interval vs ``refine`` steps) equals, on Gaussian data, the chain's error
    against the exact probability-flow map to 5 %, and shrinks as the grid refines. Measured (8 / 18 points): lambda
    0.087 / 0.020, uniform 0.043 / 0.009."""
    sch = SCHEDULES["ddpm_cosine"]()
    z = torch.randn(4000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ts8, ts18 = (C.consistency_times(sch, n, spacing) for n in (8, 18))
    (a_t, s_t), (a_u, s_u) = (sch.alpha_sigma(ts8[w]) for w in (-1, 0))
    x = a_t * 0.7 + (a_t**2 * 0.25 + s_t**2).sqrt() * z
    exact = a_u * 0.7 + ((a_u**2 * 0.25 + s_u**2) / (a_t**2 * 0.25 + s_t**2)).sqrt() * (x - a_t * 0.7)
    chain = x
    for i in range(7, 0, -1):
        chain = C.teacher_step("dpm++2s", GaussTeacher(sch), chain, ts8[i].expand(4000), ts8[i - 1].expand(4000))
    want = float((chain - exact).square().mean().sqrt())
    got = C.target_bias(GaussTeacher(sch), ts8, x, refine=16)
    assert want > 1e-3 and got == pytest.approx(want, rel=0.05), (got, want)
    assert C.target_bias(GaussTeacher(sch), ts18, x, refine=16) < got / 2
    with pytest.raises(ValueError, match="refine"):
        C.target_bias(GaussTeacher(sch), ts8, x, refine=1)


# ---------------------------------------------------------------------------------------------
# Sampling


def test_consistency_sampler_noise_law_and_grid():
    sch = make_schedule("vp_cosine")
    ident = Const(sch, torch.zeros(1))
    ident.forward = lambda x, t, cond=None: x  # D(x, t) = x: the output is the last renoised state
    x_T = torch.randn(2000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grid = torch.tensor([sch.t_max, 0.4, 0.0], dtype=torch.float64)
    seen = []
    out = consistency(ident, x_T, grid, generator=torch.Generator().manual_seed(1), callback=seen.append)
    z = torch.randn(2000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a, s = float(sch.alpha(0.4)), float(sch.sigma(0.4))
    s_min = float(sch.sigma(sch.t_min) / sch.alpha(sch.t_min))
    # x_0.4 = alpha x0 + sqrt(sigma^2 - alpha^2 s_min^2) z: x_{t_min} = alpha_min x0 noised forward to 0.4
    torch.testing.assert_close(out, a * x_T + math.sqrt(s**2 - a**2 * s_min**2) * z, rtol=1e-12, atol=1e-12)
    assert [float(d["t"]) for d in seen] == [sch.t_max, 0.4]
    # one step is DDIM's one step, for any denoiser
    den = Denoiser(random_net(2), sch, "v")
    x = torch.randn(8, 2)
    assert torch.equal(run("consistency", den, x, 1), run("ddim", den, x, 1))


def test_default_grid_skips_the_boundary():
    edm = make_schedule("edm")
    g = consistency_grid(edm, 2)
    assert g.tolist()[0] == 80.0 and g.tolist()[-1] == 0.0 and len(g) == 3 and float(g[1]) > edm.t_min
    assert consistency_grid(make_schedule("ddpm"), 2).tolist() == [1.0, 0.5, 0.0]  # trailing: as make_grid
    ddpm = make_schedule("ddpm")
    assert consistency_grid(ddpm, 2, "leading").tolist()[1] > ddpm.t_min  # leading reaches t_min: n + 1, cut
    for spacing in ("leading", "linspace"):  # their one point is index 0 (the output would be x_T): f(x_T, T)
        assert consistency_grid(ddpm, 1, spacing).tolist() == [1.0, 0.0]
    full = consistency_grid(ddpm, 1000)  # T steps: no T + 1 exist, so the last evaluation is at t_min
    assert len(full) == 1001 and float(full[-2]) == ddpm.t_min
    calls = []
    den = Const(edm, torch.zeros(1))
    den.forward = lambda x, t, cond=None: calls.append(float(t)) or x
    run("consistency", den, torch.zeros(1, 1), 3)
    assert len(calls) == 3 and min(calls) > edm.t_min
    assert SAMPLERS.get("consistency").grid is consistency_grid


def test_bundle_kind_consistency_loads_and_samples(tmp_path):
    from dtrain.export.bundle import load_bundle, save_bundle

    sch = make_schedule("vp_cosine")
    cfg = {"name": "mlp", "dim": 2, "hidden": 16, "depth": 1, "num_classes": 3, "param": "v", "clip_x0": 1.0}
    net = build_model(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    info = {"kind": "consistency", "model": cfg, "schedule": sch.to_dict(),
            "sampler": {"name": "consistency", "nfe": 2, "spacing": None, "eta": None, "guidance": 1.0,
                        "grid": [sch.t_max, 0.3, 0.0], "options": {}},
            "image": {"shape": [2], "range": None}, "class_names": ["a", "b", "c"], "provenance": {}}
    save_bundle(tmp_path / "b", net.state_dict(), info)
    pipe = load_bundle(tmp_path / "b")
    assert isinstance(pipe.denoiser, ConsistencyModel)
    ref = ConsistencyModel(build_denoiser(cfg, sch, net=copy.deepcopy(net).eval()))
    labels = torch.tensor([0, 1, 2, 3])
    for nfe, grid in ((None, [sch.t_max, 0.3, 0.0]), (1, None), (3, None)):
        g = torch.Generator().manual_seed(4)
        x_T = float(sch.sigma(sch.t_max)) * torch.randn(4, 2, generator=g)
        want = run("consistency", ref, x_T, nfe or 2, cond=labels, generator=g,
                   grid=None if grid is None else torch.tensor(grid, dtype=torch.float64))
        got = pipe.sample(4, nfe=nfe, labels=labels, generator=torch.Generator().manual_seed(4))
        assert torch.equal(got, want), nfe
    with pytest.raises(InputError, match=r"w: bundle kind 'consistency' does not support guidance"):
        pipe.sample(4, nfe=1, labels=[0, 1, 2, 0], w=2.0)  # no null class trained (CD / CT / iCT: no label dropout)
    assert json.loads((tmp_path / "b" / "dtrain.json").read_text())["kind"] == "consistency"
    # chosen times: [t_max, *times, 0] through the API and `dtrain sample --times`
    g = torch.Generator().manual_seed(4)
    x_T = float(sch.sigma(sch.t_max)) * torch.randn(4, 2, generator=g)
    want = run("consistency", ref, x_T, 3, cond=labels, generator=g,
               grid=torch.tensor([sch.t_max, 0.6, 0.2, 0.0], dtype=torch.float64))
    got = pipe.sample(4, labels=labels, times=[0.6, 0.2], generator=torch.Generator().manual_seed(4))
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="times: must decrease"):
        pipe.sample(4, times=[0.2, 0.6])
    from dtrain.cli import main

    assert main(["sample", str(tmp_path / "b"), "--num", "4", "--labels", "0,1,2,3", "--times", "0.6,0.2",
                 "--seed", "4", "--out", str(tmp_path / "s.npz")]) == 0
    import numpy as np

    assert np.array_equal(np.load(tmp_path / "s.npz")["samples"], want.numpy())


# ---------------------------------------------------------------------------------------------
# Recipes


@pytest.mark.parametrize("override,key,needle", [
    (["method.distance=l3"], "method.distance", "choose one of"),
    (["method.spacing=trailing"], "method.spacing", "choose one of"),
    (["method.target_ema=1.0"], "method.target_ema", "[0, 1)"),
    (["method.sample_times=[0.2,0.5]"], "method.sample_times", "must decrease strictly"),
    (["method.sample_times=[2.0]"], "method.sample_times", "must decrease strictly"),
    (["method.name=ict", "method.guidance=2.0"], "method.guidance", "only consistency distillation"),
    (["method.num_scales=1"], "method.num_scales", ">= 2"),
    (["sampler.guidance=2.0"], "sampler.guidance", "trains no null class"),
    (["eval.guidance=1.5"], "eval.guidance", "trains no null class"),
    # iCT's curriculum ends at 1281 points, more than the 1000 DDPM indices linspace can place: refused at load,
    # not when the run reaches that N (it checked only N(0))
    (["method.name=ict", "method.spacing=linspace", "trainer.max_steps=800"], "method.spacing",
     "1281 steps exceed the schedule's 1000"),
    # s = sigma / alpha is infinite at t_max under zero terminal SNR: ict's 1 / ds weight was 0 on the top interval
    (["method.name=ict", "method.spacing=uniform", "schedule.zero_terminal_snr=true"], "method.weighting",
     "would never train"),
])
def test_bad_consistency_recipes_name_the_key(override, key, needle):
    path = RECIPES / "cm" / "cd_digits.yaml"
    with pytest.raises(RecipeError) as e:
        load_recipe(path, override)
    assert e.value.key == key and needle in e.value.reason, str(e.value)


# ---------------------------------------------------------------------------------------------
# The 2-D GMM: a 1-step CD student gets the mixture weights right


def test_one_step_cd_student_matches_the_gmm_weights():
    """CD from scratch (MLP, v-parameterization, vp_cosine) with the exact mixture denoiser as teacher, 400 steps.
    Measured: weight error 0.012 and sliced W1 0.08 (exact-sample floor 0.017); the teacher's own DDIM-1 puts every
    sample near the mixture's mean (weight error 0.5, W1 0.68)."""
    torch.manual_seed(0)
    gmm, sch = default_gmm(), make_schedule("vp_cosine")
    teacher = gmm.denoiser(sch)
    net = MLP(2, 64, 2)
    student = ConsistencyModel(Denoiser(net, sch, "v"))
    target_net = copy.deepcopy(net).requires_grad_(False)
    target = ConsistencyModel(Denoiser(target_net, sch, "v"))
    loss_fn = C.ConsistencyLoss(sch, "cd", solver="ddim", num_scales=18, total_steps=400)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for k in range(400):
        x0, _ = gmm.sample(256, generator=g)
        loss = loss_fn(student, target, x0, teacher=teacher, step=k).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(target_net.parameters()), list(net.parameters()), 0.05)
    x_T = float(sch.sigma(sch.t_max)) * torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))
    exact, _ = gmm.sample(4000, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        x = run("consistency", student.eval(), x_T, 1)
        x_ddim = run("ddim", teacher, x_T, 1)
    assert gmm.weight_error(x) < 0.1, gmm.weight_error(x)
    assert sliced_wasserstein(x, exact) < 0.2, sliced_wasserstein(x, exact)
    assert gmm.weight_error(x_ddim) > 0.3 and sliced_wasserstein(x_ddim, exact) > 0.5  # what 1 step gives without CD

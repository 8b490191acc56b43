"""Progressive distillation math (dtrain.methods.progressive): the target lands where two teacher DDIM steps land,
closed forms, per-sample times, the loss in every student parameterization, nested grids, the round plan, recipe
errors, and guided PD's pieces (w-conditioned networks, per-sample CFG). Training runs: tests/e2e/test_pd.py."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from dtrain.config import RecipeError, load_recipe
from dtrain.data.synthetic import GaussianMixture, default_gmm
from dtrain.diffusion.denoiser import Denoiser
from dtrain.diffusion.guidance import CFGDenoiser, GuidedCond, WCondDenoiser
from dtrain.diffusion.param import Coeffs, from_x0_eps
from dtrain.diffusion.schedule import make_schedule
from dtrain.diffusion.timesteps import make_grid
from dtrain.lit.progressive import round_lr
from dtrain.methods.progressive import ProgressiveLoss, pd_grid, pd_target, round_plan
from dtrain.models import build_denoiser, build_model
from dtrain.samplers import ddim

ROOT = Path(__file__).resolve().parents[2]


def mlp_denoiser(schedule, param="v", seed=0, **kw):
    torch.manual_seed(seed)
    return build_denoiser({"name": "mlp", "param": param, "dim": 2, "hidden": 32, "depth": 2, **kw}, schedule)


@pytest.mark.parametrize("sched", ["ddpm", "vp_cosine", "edm", "flow"])
def test_target_makes_one_student_step_land_where_two_teacher_steps_land(sched):
    """DDIM from x_t with x0~ over [t, s] equals the teacher's DDIM over [t, t', s] (the dtrain.samplers.ddim peer)."""
    s = make_schedule(sched, **({"t_max": 0.999} if sched == "flow" else {}))
    teacher = mlp_denoiser(s)
    grid = make_grid(s, 8)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1)) * float(s.sigma(grid[0]))
    with torch.no_grad():
        for i in (0, 2, 6):  # the first step (alpha ~ 0 on ddpm), a middle one, the last one (lands on t = 0)
            t, tm, ss = grid[i], grid[i + 1], grid[i + 2]
            two = ddim(teacher, x, torch.stack([t, tm, ss]))
            tgt = pd_target(teacher, x, t.expand(16), tm.expand(16), ss.expand(16))
            one = ddim(Constant(tgt, s), x, torch.stack([t, ss]))
            torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-5)
            if float(ss) == 0:  # landing on clean data the target is the teacher's two-step sample itself
                torch.testing.assert_close(tgt, two, rtol=1e-6, atol=1e-6)


class Constant(nn.Module):
    """A 'denoiser' that returns a fixed x0 (to drive the ddim sampler with a given prediction)."""

    def __init__(self, x0, schedule):
        super().__init__()
        self.x0, self.schedule = x0, schedule

    def forward(self, x, t, cond=None):
        return self.x0


def test_point_mass_teacher_gives_the_point():
    """Data = one point mu: D(x, t) = mu exactly, every DDIM step is exact and x0~ = mu for any x_t and grid."""
    s = make_schedule("ddpm", kind="cosine")
    gmm = GaussianMixture(torch.tensor([[0.3, -0.7]]), 0.0)
    grid = make_grid(s, 16)
    x = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    idx = torch.randint(0, 8, (32,), generator=torch.Generator().manual_seed(1))
    tgt = pd_target(gmm.denoiser(s), x, grid[2 * idx], grid[2 * idx + 1], grid[2 * idx + 2])
    torch.testing.assert_close(tgt, gmm.means.expand(32, 2), rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_point_mass_target_is_exact_in_low_precision_at_fine_grids(dtype):
    """At a 512-step grid q(t, s) is ~1e-4: Alg. 2's (x_s - p x_t) / q divided rounding noise by it (float32: rms
    error 2.7e-4, bf16: 0.57 on data in [-1, 1]); the same x0~ as a combination of the teacher's two x0 readings is
    exact."""

    class PointMass(nn.Module):
        def __init__(self, sch, x0):
            super().__init__()
            self.schedule, self.x0 = sch, x0

        def forward(self, x, t, cond=None):
            return self.x0.expand_as(x)

    sch = make_schedule("vp_discrete")
    grid = pd_grid(sch, 512, 512, "trailing")
    x0 = (torch.rand(1, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(dtype)
    idx = torch.arange(256)
    t, tm, ss = grid[2 * idx], grid[2 * idx + 1], grid[2 * idx + 2]
    x_t = sch.marginal(x0.float().expand(256, 2), torch.randn(256, 2, generator=torch.Generator().manual_seed(1)),
                       t).to(dtype)
    tgt = pd_target(PointMass(sch, x0), x_t, t, tm, ss)
    ulp = 1e-6 if dtype == torch.float32 else 2.0**-7  # bf16: one rounding of values in [-1, 1]
    assert tgt.dtype == dtype and float((tgt.float() - x0.float()).abs().max()) <= ulp


def test_per_sample_times_equal_one_sample_at_a_time():
    s = make_schedule("vp_cosine")
    teacher = default_gmm().denoiser(s)
    grid = make_grid(s, 8)
    idx = torch.tensor([0, 3, 1, 2, 3, 0])
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    batch = pd_target(teacher, x, grid[2 * idx], grid[2 * idx + 1], grid[2 * idx + 2])
    for j, i in enumerate(idx.tolist()):
        one = pd_target(teacher, x[j:j + 1], grid[2 * i], grid[2 * i + 1], grid[2 * i + 2])
        torch.testing.assert_close(batch[j:j + 1], one, rtol=1e-6, atol=1e-6)


class FixedX0(nn.Module):
    """A network whose x0 reading is tanh(x_t) whatever its parameterization (t recovered from c_noise = 1000 t)."""

    def __init__(self, schedule, param):
        super().__init__()
        self.s, self.param = schedule, param

    def forward(self, x, c_noise, cond=None):
        t = c_noise.double() / 1000
        c = Coeffs.at(self.s, t, x)
        x0 = torch.tanh(x)
        return from_x0_eps(self.param, x0, (x - c.alpha * x0) / c.sigma, x, c).float()


@pytest.mark.parametrize("weighting", ["snr_trunc", "snr_plus_one"])
def test_loss_is_the_weighted_x0_error_for_eps_x0_v_students(weighting):
    """Students reading the same x0 in different parameterizations get the same loss: w(t) |x0_hat - x0~|^2 with
    w = max(SNR, 1) or SNR + 1 (Salimans & Ho 2022, Sec. 4), computed here by hand."""
    s = make_schedule("vp_cosine")
    teacher = default_gmm().denoiser(s)
    x0, _ = default_gmm().sample(64, generator=torch.Generator().manual_seed(0))
    grid = pd_grid(s, 8, 64)
    idx, noise = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(1)), torch.randn(64, 2)
    losses = {}
    for param in ("eps", "x0", "v"):
        student = Denoiser(FixedX0(s, param), s, param)
        out = ProgressiveLoss(s, param, weighting=weighting)(student, teacher, x0, grid, idx=idx, noise=noise)
        assert out.loss.shape == (64,)
        losses[param] = out.loss
    t = grid[2 * idx]
    x_t = s.marginal(x0, noise, t)
    tgt = pd_target(teacher, x_t, t, grid[2 * idx + 1], grid[2 * idx + 2])
    snr = s.snr(t)
    w = snr.clamp(min=1) if weighting == "snr_trunc" else snr + 1
    by_hand = (w * (torch.tanh(x_t) - tgt).double().square().mean(1)).float()
    for param, loss in losses.items():
        torch.testing.assert_close(loss, by_hand, rtol=2e-3, atol=1e-6, msg=param)


def test_grids_nest():
    s = make_schedule("ddpm", kind="cosine")
    for n in (1, 2, 4, 8, 16, 32):  # trailing DDPM indices nest for halvings of 64 steps (T = 1000)
        assert torch.equal(pd_grid(s, n, 64), make_grid(s, n)), n
        assert torch.equal(pd_grid(s, n, 64), pd_grid(s, 2 * n, 64)[::2])
    c = make_schedule("vp_cosine")  # lambda spacing does not nest: the student grid is a subsample
    assert torch.equal(pd_grid(c, 4, 64), make_grid(c, 64)[::16])
    assert not torch.equal(pd_grid(c, 4, 64), make_grid(c, 4))
    for bad in ((3, 64), (8, 4), (4, 24)):
        with pytest.raises(ValueError, match=r"method\.start_steps"):
            pd_grid(s, *bad)


def test_round_plan():
    m = {"start_steps": 64, "end_steps": 4, "round_steps": [], "guidance": []}
    plan = round_plan(m, 400)
    assert [(r.kind, r.steps, r.start, r.end) for r in plan] == [
        ("pd", 32, 0, 100), ("pd", 16, 100, 200), ("pd", 8, 200, 300), ("pd", 4, 300, 400)]
    assert plan[0].name == "round00_32steps"
    plan = round_plan({**m, "round_steps": [5, 1, 1, 1, 2], "guidance": [1.0, 3.0]}, 10)
    assert [(r.kind, r.steps, r.end) for r in plan] == [("guide", 64, 5), ("pd", 32, 6), ("pd", 16, 7), ("pd", 8, 8),
                                                        ("pd", 4, 10)]
    assert len(round_plan({**m, "round_steps": [7]}, 28)) == 4
    for kw, steps, key in (({"round_steps": [1, 2]}, 3, "method.round_steps"), ({}, 401, "trainer.max_steps"),
                           ({"round_steps": [100]}, 401, "trainer.max_steps"), ({"end_steps": 3}, 400, "start_steps"),
                           ({"end_steps": 64}, 400, "start_steps")):
        with pytest.raises(ValueError, match=key):
            round_plan({**m, **kw}, steps)


def test_lr_restarts_every_round():
    f = [round_lr(i, bounds=((0, 10), (10, 30)), warmup=5, schedule="cosine", min_ratio=0.0) for i in range(30)]
    assert f[0] == f[10] == pytest.approx(0.2) and f[4] == f[14] == 1.0
    assert f[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 5)))
    assert f[29] == pytest.approx(0.5 * (1 + math.cos(math.pi * 14 / 15)))  # round 2: 20 steps, 5 of warmup


def test_pd_recipes_validate_and_name_bad_keys():
    for name in ("gmm", "digits", "digits_guided", "cifar10"):
        load_recipe(ROOT / "recipes" / "pd" / f"{name}.yaml")
    bad = {"method.round_steps=[1,2]": "method.round_steps", "method.weighting=p2": "method.weighting",
           "model.w_cond=true": "model.w_cond", "method.guidance=[3,1]": "method.guidance",
           "ema.stds=[0.1]": "ema.stds", "method.end_steps=3": "method.start_steps",
           "trainer.max_steps=999": "trainer.max_steps"}
    for override, key in bad.items():
        with pytest.raises(RecipeError, match=re.escape(key)):
            load_recipe(ROOT / "recipes" / "pd" / "digits.yaml", [override])
    with pytest.raises(RecipeError, match=r"sampler\.guidance"):
        load_recipe(ROOT / "recipes" / "pd" / "digits_guided.yaml", ["sampler.guidance=5.0"])
    with pytest.raises(RecipeError, match=r"model\.w_cond"):
        load_recipe(ROOT / "recipes" / "teacher" / "digits.yaml", ["model.w_cond=true"])


@pytest.mark.parametrize("name", ["mlp", "unet"])
def test_w_conditioned_network_starts_as_its_teacher(name):
    cfg = ({"name": "mlp", "dim": 2, "hidden": 32, "depth": 2, "num_classes": 3} if name == "mlp" else
           {"name": "unet", "in_channels": 1, "resolution": 8, "channels": 16, "channel_mult": [1, 2],
            "num_res_blocks": 1, "attn_resolutions": [], "num_classes": 3, "dropout": 0.0})
    torch.manual_seed(0)
    plain, wnet = build_model(cfg), build_model({**cfg, "w_cond": True})
    with torch.no_grad():  # a 'trained' teacher: no zero-initialised layers left
        for p in plain.parameters():
            p.add_(0.05 * torch.randn_like(p))
    missing, extra = wnet.load_state_dict(plain.state_dict(), strict=False)
    assert not extra and missing and all(k.startswith("w_emb.") for k in missing)
    x = torch.randn(4, 2) if name == "mlp" else torch.randn(4, 1, 8, 8)
    c, y = torch.tensor([10.0, 200.0, 500.0, 900.0]), torch.tensor([0, 1, 2, 3])
    ref = plain(x, c, y)
    for w in (None, torch.tensor([0.0, 1.0, 2.5, 7.0])):
        torch.testing.assert_close(wnet(x, c, GuidedCond(y, w) if w is not None else y), ref)
    with torch.no_grad():
        for p in wnet.w_emb.parameters():
            p.add_(0.1)
    assert not torch.allclose(wnet(x, c, GuidedCond(y, torch.full((4,), 3.0))), ref)
    with pytest.raises(ValueError, match="w_cond"):
        plain(x, c, GuidedCond(y, torch.ones(4)))


def test_per_sample_guidance_scales():
    s = make_schedule("vp_cosine")
    den = mlp_denoiser(s, num_classes=3)
    x, y = torch.randn(5, 2), torch.tensor([0, 1, 2, 1, 0])
    t, w = torch.full((5,), 0.4, dtype=torch.float64), torch.tensor([0.0, 1.0, 2.0, 3.5, 5.0])
    with torch.no_grad():
        batch = CFGDenoiser(den, w, 3)(x, t, y)
        for j in range(5):
            one = CFGDenoiser(den, float(w[j]), 3)(x[j:j + 1], t[j:j + 1], y[j:j + 1])
            torch.testing.assert_close(batch[j:j + 1], one, rtol=1e-6, atol=1e-6)
    seen = []
    WCondDenoiser(lambda x, t, cond: seen.append(cond) or x, 2.5)(x, t, y)
    assert isinstance(seen[0], GuidedCond) and torch.equal(seen[0].labels, y) and seen[0].w.tolist() == [2.5] * 5


def test_students_sample_and_sweep_on_their_distilled_grids(monkeypatch):
    """A PD student samples (sample grids, ``dtrain fit``'s samples) and is swept (``eval.samplers`` 'ddim:n'
    during training) on the grid it was distilled on; another sampler or step count takes the default grid."""
    import dtrain.samplers as samplers
    from dtrain.lit.progressive import ProgressiveModule

    over = ["schedule.name=vp_cosine", "method.start_steps=16", "method.end_steps=4", "method.round_steps=[10]",
            "trainer.max_steps=20", "model.hidden=16", "model.depth=1"]
    with pytest.warns(UserWarning, match="the distilled grid"):
        module = ProgressiveModule(load_recipe(ROOT / "recipes" / "pd" / "gmm.yaml", over))
    grids = module.sample_grids()
    assert sorted(grids) == [("ddim", 4), ("ddim", 8)]
    assert torch.equal(grids[("ddim", 4)], pd_grid(module.schedule, 4, 16, module.spacing))
    assert not torch.equal(grids[("ddim", 4)], make_grid(module.schedule, 4, module.spacing))
    seen = []
    real = samplers.run
    monkeypatch.setattr(samplers, "run", lambda *a, grid=None, **k: seen.append(grid) or real(*a, grid=grid, **k))
    module.sample(3, ema=None)  # the current round's 8 steps
    module.sample(3, nfe=4, ema=None)
    module.sample(3, nfe=4, sampler="heun", ema=None)
    assert torch.equal(seen[0], grids[("ddim", 8)]) and torch.equal(seen[1], grids[("ddim", 4)]) and seen[2] is None


def test_drawn_times_cover_every_student_step_and_w_its_range():
    """What the losses draw (idx and w None): PD trains every student step t = grid[0], grid[2], ... (never the final
    0 or a teacher midpoint), guided PD stage 1 every teacher time but the final 0, and w ~ U[w_min, w_max]."""
    from dtrain.methods.progressive import GuidanceLoss, sample_w

    s = make_schedule("vp_cosine")
    teacher = default_gmm().denoiser(s)
    grid = pd_grid(s, 8, 64)
    x0, _ = default_gmm().sample(4000, generator=torch.Generator().manual_seed(0))
    student = Denoiser(FixedX0(s, "v"), s, "v")
    out = ProgressiveLoss(s, "v")(student, teacher, x0, grid, generator=torch.Generator().manual_seed(1))
    assert sorted(set(out.t.tolist())) == sorted(grid[0:-1:2].tolist())
    labels = torch.randint(0, 3, (4000,), generator=torch.Generator().manual_seed(2))
    g = GuidanceLoss(s, "v", w_range=(1.0, 3.0), null_label=3)
    cond_teacher = default_gmm().denoiser(s, conditional=True)
    wstudent = Denoiser(FixedX0(s, "v"), s, "v")
    out = g(wstudent, cond_teacher, x0, grid, labels, generator=torch.Generator().manual_seed(3))
    assert sorted(set(out.t.tolist())) == sorted(grid[:-1].tolist())
    w = sample_w(100_000, (1.0, 3.0), torch.Generator().manual_seed(4))
    assert 1.0 <= float(w.min()) < 1.001 and 2.999 < float(w.max()) <= 3.0
    assert float(w.mean()) == pytest.approx(2.0, abs=0.01) and float(w.var()) == pytest.approx(4 / 12, rel=0.02)


def test_default_weighting_is_the_papers_truncated_snr():
    """PD's loss without a weighting, and a recipe without method.weighting, use max(SNR, 1) in x0 units
    (Salimans & Ho 2022, arXiv 2202.00512, eq. 9's 'truncated SNR')."""
    from dtrain.config import ProgressiveCfg
    from dtrain.methods.denoising import loss_weight

    s = make_schedule("vp_cosine")
    loss = ProgressiveLoss(s, "v")
    assert loss.denoising.weighting == ProgressiveCfg().weighting == "snr_trunc"
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    w = loss_weight(loss.denoising.weighting, s, t, "x0")
    torch.testing.assert_close(w, s.snr(t).clamp(min=1.0).to(w.dtype))


def test_min_snr_weighting_defaults_to_gamma_5():
    """min_snr without snr_gamma takes gamma 5 (Hang et al. 2023, arXiv 2303.09556), the value PD's min_snr weighting
    inherits (CTM's DSM term builds the same loss): the x0-space weight is min(SNR, 5)."""
    from dtrain.methods.denoising import DenoisingLoss, loss_weight

    s = make_schedule("vp_cosine")
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    for loss in (DenoisingLoss(s, "x0", weighting="min_snr"), ProgressiveLoss(s, "v", weighting="min_snr").denoising):
        w = loss_weight(loss.weighting, s, t, "x0", snr_gamma=loss.snr_gamma)
        torch.testing.assert_close(w, s.snr(t).clamp(max=5.0).to(w.dtype))


@pytest.mark.parametrize("guided", [False, True])
def test_dropped_labels_reach_teacher_and_student_alike(guided):
    """``method.cfg_dropout`` replaces a label by the null class before the teacher sees it: teacher and student
    get the same labels, about a fraction p of them null (PD rounds, guided PD's w-conditioned rounds, stage 1)."""
    from dtrain.methods.progressive import GuidanceLoss

    s = make_schedule("vp_cosine")
    n, p = 4000, 0.3
    y = torch.randint(0, 3, (n,))
    student = mlp_denoiser(s, num_classes=3)
    got = {"teacher": [], "student": []}

    def labels(cond):
        return cond.labels if isinstance(cond, GuidedCond) else cond

    class Teacher:
        schedule = s

        def __call__(self, x, t, cond):
            got["teacher"].append(labels(cond))
            return torch.zeros_like(x)

    student.raw = lambda x, t, cond, c: got["student"].append(labels(cond)) or torch.zeros_like(x)
    x0, gen = torch.randn(n, 2), torch.Generator().manual_seed(0)
    if guided:  # stage 1: the teacher is called twice (conditional, null) by CFG
        GuidanceLoss(s, w_range=(0.0, 2.0), null_label=3, cfg_dropout=p)(student, Teacher(), x0,
                                                                         pd_grid(s, 8, 8), y, generator=gen)
        cond = GuidedCond(y, torch.ones(n))
    else:
        cond = y
    ProgressiveLoss(s, cfg_dropout=p, num_classes=3)(student, Teacher(), x0, pd_grid(s, 4, 8), cond, generator=gen)
    runs = [got["student"][0]] if not guided else got["student"]
    for seen in runs:
        dropped = seen == 3
        assert abs(dropped.float().mean().item() - p) < 0.03
        assert torch.equal(seen[~dropped], y[~dropped])
    assert all(torch.equal(t, got["student"][-1]) for t in got["teacher"][-2:])  # the PD round's two teacher steps
    if guided:  # stage 1's CFG teacher saw the student's labels, then the null class (one batch of 2n)
        assert torch.equal(got["teacher"][0], torch.cat([got["student"][0], torch.full((n,), 3)]))


def test_rounds_index_keeps_only_this_runs_earlier_rounds_with_relative_paths(tmp_path):
    """rounds.json after a round is written: this plan's earlier rounds and the round, bundles relative to the run
    folder (an older run's absolute paths went stale when the folder moved: made relative too). Entries of another
    plan or of later rounds (an earlier run in the folder, a resume that went back past them) were kept before."""
    import json
    import warnings

    from dtrain.lit.progressive import ProgressiveModule

    over = [f"out_dir={tmp_path}", "name=run", "method.start_steps=8", "method.end_steps=1", "method.round_steps=[6]",
            "trainer.max_steps=18", "model.hidden=16", "model.depth=1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the eps student, the distilled grids
        module = ProgressiveModule(load_recipe(ROOT / "recipes" / "pd" / "gmm.yaml", over))
    index = tmp_path / "run" / "rounds" / "rounds.json"
    index.parent.mkdir(parents=True)
    ours = {"index": 0, "kind": "pd", "steps": 4, "start": 0, "end": 6, "bundle": "/elsewhere/rounds/round00_4steps"}
    index.write_text(json.dumps([ours, {**ours, "index": 1, "steps": 2, "start": 6, "end": 10},  # another plan's
                                 {**ours, "index": 2, "steps": 1, "start": 12, "end": 18},  # this round, before
                                 {**ours, "index": 3, "steps": 1, "start": 18, "end": 24}]))  # a later round
    module._write_round(module.rounds[2], module.net.state_dict(), None, {})
    entries = json.loads(index.read_text())
    assert [e["index"] for e in entries] == [0, 2] and entries[0] == {**ours, "bundle": "rounds/round00_4steps"}
    assert entries[1]["bundle"] == "rounds/round02_1steps" and (tmp_path / "run" / entries[1]["bundle"]).is_dir()

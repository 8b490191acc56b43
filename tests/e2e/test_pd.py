"""Progressive distillation end to end on CPU: rounds 64 -> 4 steps on the 2-D mixture whose 4-step student matches the
mixture as well as the teacher's DDIM-64, the per-round artefacts and the teacher chain, export of the last checkpoint,
an interrupted run resumed mid-round (and at a round boundary) that ends bit-identical to the uninterrupted one, the
resume's checks (round plan, round teacher) and the last round's bundle after a resume at the last step, and guided PD
(a w-conditioned student sampled at any w of its range)."""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from dtrain.cli import main
from dtrain.config import load_recipe
from dtrain.data.synthetic import default_gmm, sliced_wasserstein
from dtrain.diffusion.guidance import CFGDenoiser, GuidedCond, WCondDenoiser
from dtrain.diffusion.schedule import make_schedule, schedule_from_config
from dtrain.diffusion.timesteps import make_grid
from dtrain.export.bundle import load_bundle
from dtrain.methods.progressive import GuidanceLoss, ProgressiveLoss, pd_grid
from dtrain.models import build_denoiser
from dtrain.samplers import ddim

ROOT = Path(__file__).resolve().parents[2]
PD_GMM, TEACHER_GMM = ROOT / "recipes" / "pd" / "gmm.yaml", ROOT / "recipes" / "teacher" / "gmm.yaml"
QUIET = ["trainer.cpu_threads=1", "trainer.progress_bar=false", "logger.mode=disabled"]


def fit_with_teacher(cfg, teacher) -> Path:
    """``dtrain fit``'s path (datamodule, module, trainer and callbacks from the recipe) with a teacher object."""
    import lightning as L

    from dtrain.data import build_datamodule
    from dtrain.lit.fit import build_trainer, run_dir
    from dtrain.lit.progressive import ProgressiveModule

    torch.set_num_threads(cfg.trainer.cpu_threads)
    L.seed_everything(cfg.seed, verbose=False)
    module, out = ProgressiveModule(cfg, teacher=teacher), run_dir(cfg)
    build_trainer(cfg, out).fit(module, datamodule=build_datamodule(cfg.data, seed=cfg.seed))
    return out


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory):
    """The recipe's rounds 64 -> 32 -> 16 -> 8 -> 4 with the exact mixture denoiser as the first teacher (the
    student starts from scratch, so the first round is longer)."""
    cfg = load_recipe(PD_GMM, [f"out_dir={tmp_path_factory.mktemp('pd')}", *QUIET, "model.hidden=64",
                               "data.batch_size=512", "method.round_steps=[800,300,300,800]", "trainer.max_steps=2200",
                               "trainer.ckpt_every_n_steps=1100"])
    return fit_with_teacher(cfg, default_gmm().denoiser(schedule_from_config(cfg.schedule))), cfg


def test_four_step_student_matches_the_mixture_like_teacher_ddim64(exact_run):
    """Sliced W1 to the mixture (mean over 4 reference sets of 10000; exact samples score 0.011-0.017) and the RMS
    distance to the teacher's DDIM-64 sample from the same noise. Measured: student 0.019 / 0.064, teacher DDIM-64
    0.020 / 0, DDIM-16 0.058 / 0.11, DDIM-4 0.23 / 0.40 (sampler grid: 0.34 / 0.62)."""
    out, cfg = exact_run
    s, gmm, n = schedule_from_config(cfg.schedule), default_gmm(), 10000
    student = load_bundle(out / "rounds" / "round03_4steps")
    assert student.info["sampler"]["nfe"] == 4 and student.info["sampler"]["grid"] == pd_grid(s, 4, 64).tolist()
    refs = [gmm.sample(n, generator=torch.Generator().manual_seed(10 + k))[0] for k in range(4)]

    def sw(x):
        return sum(sliced_wasserstein(x, r, seed=k) for k, r in enumerate(refs)) / 4

    z = float(s.sigma(s.t_max)) * torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    teacher = gmm.denoiser(s)
    x = {"student4": student.sample(n, generator=torch.Generator().manual_seed(1)),  # the same z
         "teacher64": ddim(teacher, z, make_grid(s, 64)), "teacher16": ddim(teacher, z, make_grid(s, 16))}
    x.update({f"teacher4_{i}": ddim(teacher, z, g) for i, g in enumerate((make_grid(s, 4), pd_grid(s, 4, 64)))})
    d = {k: sw(v) for k, v in x.items()}
    rms = {k: float((v - x["teacher64"]).square().sum(1).mean().sqrt()) for k, v in x.items()}
    assert d["student4"] < 1.15 * d["teacher64"], d  # as close to the mixture, up to the estimate's noise
    assert d["student4"] < min(d["teacher4_0"], d["teacher4_1"]) / 10, d  # the teacher's own 4 steps
    assert rms["student4"] < rms["teacher16"] < min(rms["teacher4_0"], rms["teacher4_1"]), rms
    assert gmm.weight_error(x["student4"]) < 0.02


def test_round_artefacts_and_teacher_chain(exact_run):
    out, cfg = exact_run
    rounds = json.loads((out / "rounds" / "rounds.json").read_text())
    assert [(r["index"], r["steps"], r["global_step"]) for r in rounds] == [(0, 32, 800), (1, 16, 1100), (2, 8, 1400),
                                                                            (3, 4, 2200)]
    s = schedule_from_config(cfg.schedule)
    for r in rounds:
        assert r["bundle"] == f"rounds/round{r['index']:02d}_{r['steps']}steps"  # relative to the run: it may move
        d = out / r["bundle"]
        assert sorted(p.name for p in d.iterdir()) == ["dtrain.json", "eval.json", "model.safetensors"]
        assert json.loads((d / "eval.json").read_text()) == r and r["ema"] == "0_98"
        info = json.loads((d / "dtrain.json").read_text())
        assert info["kind"] == "denoiser" and info["sampler"]["name"] == "ddim" and info["sampler"]["eta"] is None
        assert info["sampler"]["nfe"] == r["steps"] and info["sampler"]["grid"] == pd_grid(s, r["steps"], 64).tolist()
        assert info["provenance"]["training"]["pd"]["round"] == r["index"]
        assert info["provenance"]["metrics"]["sliced_w1"] == r["metrics"]["sliced_w1"] < 0.03
        teacher = info["provenance"]["teacher"]
        if r["index"] == 0:
            assert teacher["format"] == "object" and teacher["kind"] == "ExactDenoiser"
        else:  # round k's teacher is round k-1's bundle, by path and weights hash
            prev = out / rounds[r["index"] - 1]["bundle"]
            assert teacher["path"] == str(prev.resolve()) and teacher["format"] == "bundle"
            assert teacher["sha256"] == json.loads((prev / "dtrain.json").read_text())["weights"]["sha256"]
    ck = torch.load(out / "checkpoints" / "step0001100.ckpt", map_location="cpu", weights_only=True)
    assert ck["dtrain"]["kind"] == "pd" and ck["dtrain"]["pd"]["round"] == 1 and ck["dtrain"]["sampler"]["nfe"] == 16
    assert not [k for k in ck["state_dict"] if k.startswith("teacher.")]


def test_last_checkpoint_exports_to_the_last_round(exact_run, tmp_path):
    out, _ = exact_run
    assert main(["export", str(out / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "b")]) == 0
    exported, last = load_bundle(tmp_path / "b"), load_bundle(out / "rounds" / "round03_4steps")
    assert exported.info["weights"]["sha256"] == last.info["weights"]["sha256"]
    assert exported.info["sampler"] == last.info["sampler"]
    a, b = (p.sample(64, generator=torch.Generator().manual_seed(0)) for p in (exported, last))
    assert torch.equal(a, b)
    from dtrain.lit.common import DiffusionModule  # the training module restored from it: the last round too (it

    module = DiffusionModule.load_checkpoint(out / "checkpoints" / "last.ckpt").eval()  # read round 0: 64 steps)
    assert module.round == len(module.rounds) - 1
    assert torch.equal(module.sample(64, generator=torch.Generator().manual_seed(0)).clamp(-1, 1), a.clamp(-1, 1))


@pytest.fixture(scope="module")
def small_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    assert main(["fit", str(TEACHER_GMM), f"out_dir={out}", *QUIET, "model.hidden=16", "model.depth=1",
                 "data.batch_size=64", "trainer.max_steps=20", "ema.decays=[0.9]"]) == 0
    return out / "teacher-gmm" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def small_run(small_teacher, tmp_path_factory):
    """``dtrain fit`` arguments (all but out_dir and name) and the run of rounds of 4, 2, 1 steps, 6 optimizer steps
    each, a checkpoint every 3 steps (tests copy it, never change it)."""
    common = ["fit", str(PD_GMM), f"teacher={small_teacher}", *QUIET, "model.hidden=16", "model.depth=1",
              "data.batch_size=64", "method.start_steps=8", "method.end_steps=1", "method.round_steps=[6]",
              "trainer.max_steps=18", "trainer.ckpt_every_n_steps=3", "eval.num=256", "ema.decays=[0.9]"]
    out = tmp_path_factory.mktemp("pd_small")
    assert main([*common, f"out_dir={out}", "name=full"]) == 0
    return common, out / "full"


def same_weights(a: Path, b: Path) -> None:
    want, got = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    assert got["global_step"] == want["global_step"] and got["dtrain"]["pd"] == want["dtrain"]["pd"]
    assert got["state_dict"].keys() == want["state_dict"].keys()
    for k, v in want["state_dict"].items():
        assert torch.equal(got["state_dict"][k], v), k


def test_resume_mid_round_and_at_a_boundary_is_exact(small_run, tmp_path):
    """Rounds 4, 2, 1 steps of 6 optimizer steps; resuming from step 9 (round 1, whose teacher is round 0's bundle)
    and from step 6 (round 0 finished, its hand-over still to do) ends with the uninterrupted run's weights."""
    common, full = small_run
    common = [*common, f"out_dir={tmp_path}"]
    ck9 = torch.load(full / "checkpoints" / "step0000009.ckpt", map_location="cpu", weights_only=True)
    assert ck9["dtrain"]["pd"]["round"] == 1
    assert ck9["dtrain"]["teacher"]["path"] == str((full / "rounds" / "round00_4steps").resolve())
    for step, keep in ((9, ["round00_4steps"]), (6, [])):
        run = tmp_path / f"from{step}"
        (run / "rounds").mkdir(parents=True)
        for name in keep:  # what existed when the run was interrupted
            shutil.copytree(full / "rounds" / name, run / "rounds" / name)
        assert main([*common, f"name=from{step}", "--resume", str(full / "checkpoints" / f"step{step:07d}.ckpt")]) == 0
        same_weights(full / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
        for r in ("round01_2steps", "round02_1steps"):
            a, b = (json.loads((d / "rounds" / r / "eval.json").read_text())["metrics"] for d in (full, run))
            assert a == b


def no_trainer(monkeypatch) -> None:
    """The checks must refuse before ``dtrain fit`` holds the run folder and builds the trainer."""
    import dtrain.lit.fit

    def started(*args, **kwargs):
        raise AssertionError("the trainer started")

    monkeypatch.setattr(dtrain.lit.fit, "_train", started)


def test_a_resume_at_the_last_step_writes_the_last_round_it_lacks(small_run, tmp_path):
    """last.ckpt of the last step is written before the last round's eval and bundle: a job killed in between left
    neither, and a resume from it (Lightning runs no training loop, so no on_train_end) exited 0 without them. Now
    they are written, as the uninterrupted run wrote them; a resume of the finished run writes nothing again."""
    common, full = small_run
    run = tmp_path / "run"
    shutil.copytree(full, run)
    shutil.rmtree(run / "rounds" / "round02_1steps")
    index = run / "rounds" / "rounds.json"
    index.write_text(json.dumps(json.loads(index.read_text())[:2]))
    assert main([*common, f"out_dir={tmp_path}", "name=run", "--resume", "auto"]) == 0
    got, want = (json.loads((d / "rounds" / "rounds.json").read_text()) for d in (run, full))
    assert [e["index"] for e in got] == [0, 1, 2] and got[2]["bundle"] == "rounds/round02_1steps"
    assert got[2]["global_step"] == 18 and got[2]["metrics"] == want[2]["metrics"]
    a, b = (json.loads((d / "rounds" / "round02_1steps" / "dtrain.json").read_text()) for d in (full, run))
    assert b["weights"]["sha256"] == a["weights"]["sha256"]
    assert b["provenance"]["teacher"]["sha256"] == a["provenance"]["teacher"]["sha256"]  # round 1's student
    written = (run / "rounds" / "round02_1steps" / "dtrain.json").stat().st_mtime_ns
    assert main([*common, f"out_dir={tmp_path}", "name=run", "--resume", "auto"]) == 0
    assert (run / "rounds" / "round02_1steps" / "dtrain.json").stat().st_mtime_ns == written


def test_a_resume_refuses_a_replaced_round_teacher(small_run, tmp_path, monkeypatch, capsys):
    """A round's teacher is the previous round's bundle in the run folder: one replaced by other weights was loaded
    and trained against silently. Its weights hash must be the checkpoint's teacher's."""
    common, full = small_run
    run = tmp_path / "run"
    shutil.copytree(full, run)
    shutil.rmtree(run / "rounds" / "round00_4steps")
    shutil.copytree(full / "rounds" / "round01_2steps", run / "rounds" / "round00_4steps")
    no_trainer(monkeypatch)
    ck = run / "checkpoints" / "step0000009.ckpt"
    assert main([*common, f"out_dir={tmp_path}", "name=run", "--resume", str(ck)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"dtrain fit: {run / 'rounds' / 'round00_4steps'}: the bundle of PD round 1/3's student, "
                          f"round 2's teacher, holds weights sha256 "), err
    assert "not those the checkpoint was trained against" in err and "resume from a checkpoint of step 6" in err


def test_a_resume_without_the_runs_rounds(small_run, tmp_path, monkeypatch, capsys):
    """A run folder copied without rounds/: the round's teacher is the bundle the checkpoint recorded (checked by its
    hash) and the run ends as the uninterrupted one; it failed inside the trainer naming "rounds/round00_4steps:
    checkpoint not found". With the recorded bundle gone too, the resume is refused before the trainer starts, naming
    the bundle and the round."""
    common, full = small_run
    run, moved = tmp_path / "run", tmp_path / "moved"
    shutil.copytree(full / "checkpoints", run / "checkpoints")
    assert main([*common, f"out_dir={tmp_path}", "name=run", "--resume", str(run / "checkpoints" /
                                                                                "step0000009.ckpt")]) == 0
    same_weights(full / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    shutil.copytree(run / "checkpoints", moved / "checkpoints")
    shutil.rmtree(run / "rounds")  # the bundle run's step-15 checkpoint recorded
    no_trainer(monkeypatch)
    assert main([*common, f"out_dir={tmp_path}", "name=moved", "--resume", str(moved / "checkpoints" /
                                                                                 "step0000015.ckpt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"dtrain fit: {moved / 'rounds' / 'round01_2steps'}: the bundle of PD round 2/3's student, round "
                   f"3's teacher, is missing (the checkpoint's record of it, {run / 'rounds' / 'round01_2steps'}, is "
                   f"gone too); put it back (a copy of that bundle), resume from a checkpoint of step 12 or earlier "
                   f"(--resume <file>), which writes it again, or start a new run")


def test_a_resume_with_another_round_plan_is_refused_before_the_trainer_starts(small_run, tmp_path, monkeypatch,
                                                                               capsys):
    common, full = small_run
    no_trainer(monkeypatch)
    assert main([*common, f"out_dir={tmp_path}", "name=run", "method.round_steps=[4,6,8]", "--resume",
                 str(full / "checkpoints" / "step0000009.ckpt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"dtrain fit: {full / 'checkpoints' / 'step0000009.ckpt'}: method.round_steps: the "
                          f"checkpoint's rounds (4-step [0, 6), 2-step [6, 12), 1-step [12, 18)) are not this "
                          f"recipe's (4-step [0, 4), 2-step [4, 10), 1-step [10, 18); "), err


def test_a_fresh_start_over_earlier_rounds_is_refused(small_run, tmp_path, monkeypatch, capsys):
    """A run without checkpoints (recipes/pd/gmm.yaml keeps none, ckpt_every_n_steps: 0) that was killed leaves its
    rounds; a fresh start in its folder mixed them into its own rounds.json."""
    common, full = small_run
    shutil.copytree(full / "rounds", tmp_path / "run" / "rounds")
    no_trainer(monkeypatch)
    assert main([*common, f"out_dir={tmp_path}", "name=run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"dtrain fit: {tmp_path / 'run'} already holds progressive-distillation rounds of an "
                          f"earlier run (rounds/: round00_4steps, round01_2steps, round02_1steps, ...)"), err
    assert err.endswith(f"or remove {tmp_path / 'run' / 'rounds'} first")


def test_teacher_given_as_a_bundle(small_teacher, tmp_path):
    """``teacher=<bundle dir>`` (dtrain export's output) works like the checkpoint: the student starts from the bundle's
    weights, and the run records the bundle by path and weights hash."""
    from dtrain.lit.progressive import ProgressiveModule

    bundle = tmp_path / "teacher_bundle"
    assert main(["export", str(small_teacher), "--out", str(bundle)]) == 0
    over = [f"teacher={bundle}", f"out_dir={tmp_path}", *QUIET, "model.hidden=16", "model.depth=1",
            "data.batch_size=64", "method.start_steps=4", "method.end_steps=2", "method.round_steps=[2]",
            "trainer.max_steps=2", "eval.num=64", "ema.decays=[0.9]", "name=from_bundle"]
    module = ProgressiveModule(load_recipe(PD_GMM, over))
    module.setup("fit")
    teacher = load_bundle(bundle)
    sha = teacher.info["weights"]["sha256"]
    assert module.teacher_ref["format"] == "bundle" and module.teacher_ref["sha256"] == sha
    for k, v in teacher.net.state_dict().items():
        assert torch.equal(module.net.state_dict()[k], v) and torch.equal(module.ema["0_9"].state_dict()[k], v), k
    assert main(["fit", str(PD_GMM), *over]) == 0
    ck = torch.load(tmp_path / "from_bundle" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck["dtrain"]["teacher"]["path"] == str(bundle.resolve()) and ck["dtrain"]["teacher"]["sha256"] == sha


def test_ema_schedule_restarts_every_round(small_teacher, tmp_path):
    """Each round's EMA copies restart from its student, and ``ema.start_step`` counts from the round's start: in
    every round of 6 steps, the copy equals the network after the round's first 2 steps and differs after the 3rd."""
    import lightning as L

    from dtrain.lit.fit import fit

    class Probe(L.Callback):
        def __init__(self) -> None:
            self.same: dict[int, bool] = {}

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:  # after global_step updates
            net, ema = module.net.state_dict(), module.ema["0_9"].state_dict()
            self.same[trainer.global_step] = all(torch.equal(v, ema[k]) for k, v in net.items())

    probe = Probe()
    fit(PD_GMM, [f"teacher={small_teacher}", f"out_dir={tmp_path}", *QUIET, "model.hidden=16", "model.depth=1",
                 "data.batch_size=64", "method.start_steps=8", "method.end_steps=2", "method.round_steps=[6]",
                 "trainer.max_steps=12", "eval.num=64", "ema.decays=[0.9]", "ema.start_step=2"], callbacks=[probe])
    assert [probe.same[s] for s in (1, 2, 3, 7, 8, 9)] == [True, True, False, True, True, False], probe.same


def test_eps_teacher_and_eps_student_warn(tmp_path):
    """PD needs x0 or v students at low SNR (Salimans & Ho 2022, Sec. 4): an eps teacher read by a v student, and an
    eps student, are both named in a warning."""
    from dtrain.lit.progressive import ProgressiveModule

    assert main(["fit", str(TEACHER_GMM), f"out_dir={tmp_path}", *QUIET, "model.hidden=16", "model.depth=1",
                 "model.param=eps", "data.batch_size=64", "trainer.max_steps=2", "name=eps"]) == 0
    over = [f"teacher={tmp_path / 'eps' / 'checkpoints' / 'last.ckpt'}", f"out_dir={tmp_path}", *QUIET,
            "model.hidden=16", "model.depth=1", "method.round_steps=[1]", "trainer.max_steps=4"]
    module = ProgressiveModule(load_recipe(PD_GMM, over))
    with pytest.warns(UserWarning, match=r"model\.param: the student predicts 'v', the teacher 'eps'"):
        module.setup("fit")
    with pytest.warns(UserWarning, match=r"model\.param: an eps-predicting student"):
        ProgressiveModule(load_recipe(PD_GMM, [*over, "model.param=eps"]))


def test_fit_without_a_teacher_names_the_field(tmp_path, capsys):
    """One line naming the field, before the run directory exists (tests/unit/test_fit_input_errors.py: the others)."""
    assert main(["fit", str(PD_GMM), f"out_dir={tmp_path}", *QUIET, "model.hidden=16", "trainer.max_steps=4",
                 "method.round_steps=[1]"]) == 2
    assert "teacher: method 'pd' distils a teacher" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_guided_rounds_through_fit(tmp_path, capsys):
    """A class-conditional teacher, stage 1 + one round: the bundles are w-conditioned (``guided_denoiser``), sample
    with one network call per step at any w, and the checkpoint records the trained range."""
    assert main(["fit", str(TEACHER_GMM), f"out_dir={tmp_path}", *QUIET, "model.hidden=16", "model.depth=1",
                 "model.num_classes=3", "method.cfg_dropout=0.2", "data.batch_size=64", "trainer.max_steps=10"]) == 0
    teacher = tmp_path / "teacher-gmm" / "checkpoints" / "last.ckpt"
    assert main(["fit", str(PD_GMM), f"teacher={teacher}", f"out_dir={tmp_path}", *QUIET, "model.hidden=16",
                 "model.depth=1", "model.num_classes=3", "model.w_cond=true", "method.guidance=[1.0,3.0]",
                 "sampler.guidance=2.0", "method.cfg_dropout=0.1", "data.batch_size=64", "method.start_steps=4",
                 "method.end_steps=2", "method.round_steps=[5]", "trainer.max_steps=10", "eval.num=128"]) == 0
    rounds = tmp_path / "pd-gmm" / "rounds"
    assert sorted(p.name for p in rounds.iterdir()) == ["round00_4steps", "round01_2steps", "rounds.json"]
    said = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("PD round")]
    assert [ln.split(": ")[0] for ln in said] == ["PD round 1/2 done at step 5", "PD round 2/2 done at step 10"]
    assert said[1].startswith("PD round 2/2 done at step 10: 2-step student, sliced_w1 ")
    assert said[1].endswith(str(rounds / "round01_2steps"))
    pipe = load_bundle(rounds / "round01_2steps")
    assert pipe.kind == "guided_denoiser" and pipe.info["provenance"]["training"]["pd"]["w_range"] == [1.0, 3.0]
    calls = []
    pipe.net.register_forward_hook(lambda m, args, out: calls.append(args[2]))
    x = {w: pipe.sample(6, w=w, labels=[0, 1, 2, 0, 1, 2], generator=torch.Generator().manual_seed(0))
         for w in (1.5, 2.5)}
    assert len(calls) == 4 and all(isinstance(c, GuidedCond) for c in calls)  # one call per step, w as an input
    assert [float(c.w[0]) for c in calls] == [1.5, 1.5, 2.5, 2.5]
    assert not torch.equal(x[1.5], x[2.5])  # w reaches the network (its embedding has barely trained here)
    with pytest.warns(UserWarning, match=r"w: 5.0 is outside the guidance range \[1.0, 3.0\]"):
        pipe.sample(3, w=5.0, labels=[0, 1, 2])
    # dtrain eval guides it the same way (the bundle kind's guide: w as an input), not by classifier-free guidance,
    # which would call the network twice per step with bare labels
    from dtrain.eval.commands import add_eval_args, run_eval
    from dtrain.eval.features import build_extractor
    from dtrain.eval.fid import compute_ref_stats
    from dtrain.export.bundle import kind_guide
    from dtrain.export.checkpoint import load_teacher

    compute_ref_stats(build_extractor("raw", shape=(2,)), torch.randn(200, 2).split(100), "test",
                      sync=False).save(tmp_path / "ref.npz")
    seen = []

    def load(path, **kw):
        model, info = load_teacher(path, **kw)
        model.net.register_forward_hook(lambda m, args, out: seen.append(args[2]))
        return model, info

    args = add_eval_args(argparse.ArgumentParser()).parse_args(
        [str(rounds / "round01_2steps"), "--samplers", "ddim:2", "--num", "8", "--batch-size", "8", "--guidance", "2.5",
         "--extractor", "raw", "--ref-stats", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "eval"),
         "--wandb", "disabled"])
    run_eval(args, load, kind_guide)
    assert len(seen) == 2 and all(isinstance(c, GuidedCond) and float(c.w[0]) == 2.5 for c in seen)


class ExactCFGTeacher(nn.Module):
    """E[x0 | x_t, class] of the mixture, and E[x0 | x_t] for the null label 3: an exact class-conditional teacher."""

    def __init__(self, gmm, schedule):
        super().__init__()
        self.cond, self.uncond, self.schedule = gmm.denoiser(schedule, True), gmm.denoiser(schedule), schedule

    def forward(self, x, t, cond=None):
        if cond is None:
            return self.uncond(x, t)
        out = self.cond(x, t, cond.clamp(max=2))
        return torch.where((cond == 3)[:, None], self.uncond(x, t), out)


def test_guided_student_matches_its_cfg_teacher_at_every_w():
    """Guided PD's two stages on the exact mixture (Meng et al. 2023, arXiv 2210.03142): the 4-step w-conditioned
    student sampled at w = 1, 2, 3 lands near the CFG teacher's 8-step DDIM samples at that w (measured: 0.017,
    0.013, 0.045), much nearer than those of the other scales (>= 0.08): a student ignoring w fails at two of them."""
    torch.set_num_threads(1)
    s, gmm = make_schedule("vp_cosine"), default_gmm()
    teacher = ExactCFGTeacher(gmm, s)
    torch.manual_seed(0)
    student = build_denoiser({"name": "mlp", "param": "v", "dim": 2, "hidden": 64, "depth": 3, "num_classes": 3,
                              "w_cond": True}, s)
    g = torch.Generator().manual_seed(0)
    stage1 = GuidanceLoss(s, "v", w_range=(1.0, 3.0), null_label=3, cfg_dropout=0.1)
    rounds = ProgressiveLoss(s, "v", num_classes=3, cfg_dropout=0.1)
    grid = pd_grid(s, 8, 8)  # stage 1 on the 8-step grid, then the round 8 -> 4 steps
    for stage, steps in ((1, 500), (2, 300)):
        opt = torch.optim.Adam(student.parameters(), lr=3e-3)
        ema = copy.deepcopy(student).requires_grad_(False)
        for i in range(steps):
            for p in opt.param_groups:
                p["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * i / steps))
            x0, y = gmm.sample(256, generator=g)
            if stage == 1:  # the CFG teacher at w ~ U[1, 3]
                loss = stage1(student, teacher, x0, grid, y, generator=g).loss.mean()
            else:  # the stage-1 student (w-conditioned) is the teacher, both get GuidedCond(labels, w)
                w = 1 + 2 * torch.rand(256, generator=g)
                loss = rounds(student, teacher, x0, grid, GuidedCond(y, w), generator=g).loss.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for a, b in zip(ema.parameters(), student.parameters()):
                    a.lerp_(b, 0.02)
        student.load_state_dict(ema.state_dict())
        teacher = ema.eval()
    n = 4000
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(5)) * float(s.sigma(s.t_max))
    y = torch.arange(n) % 3
    with torch.no_grad():
        ref = {w: ddim(CFGDenoiser(ExactCFGTeacher(gmm, s), w, 3), z, pd_grid(s, 8, 8), cond=y) for w in (1, 2, 3)}
        got = {w: ddim(WCondDenoiser(teacher, float(w)), z, pd_grid(s, 4, 8), cond=y) for w in (1, 2, 3)}
    for w in (1, 2, 3):
        near = sliced_wasserstein(got[w], ref[w])
        far = min(sliced_wasserstein(got[w], ref[v]) for v in (1, 2, 3) if v != w)
        assert near < far / 2, (w, near, far)

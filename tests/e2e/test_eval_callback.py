"""The every-N-steps FID sweep inside a real (tiny) training run: runs at the right steps, scores the EMA
denoiser exactly as a direct sweep does, writes JSON, and logs a table, a line plot and scalars to W&B."""

from __future__ import annotations

import json

import pytest
import torch

from dtrain.data.synthetic import default_gmm
from dtrain.eval.features import build_extractor
from dtrain.eval.fid import compute_ref_stats, load_ref
from dtrain.eval.sweep import fid_sweep

pytestmark = pytest.mark.usefixtures("one_thread")
GMM = "recipes/teacher/gmm.yaml"


def sweep_overrides(tmp_path, n_ref: int, *overrides: str) -> list[str]:
    """Overrides of a GMM recipe for a raw-feature FID sweep every 2 steps against ``n_ref`` exact samples."""
    x, _ = default_gmm().sample(n_ref, torch.Generator().manual_seed(0))
    ref = compute_ref_stats(build_extractor("raw", shape=(2,)), x.split(1000), source="default_gmm")
    ref_path = ref.save(tmp_path / "gmm_ref.npz")
    return [f"out_dir={tmp_path}", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.progress_bar=false",
            "optim.warmup_steps=0", "data.num_samples=4096", "eval.every_n_steps=2", "eval.batch_size=40",
            "eval.feature_extractor=raw", f"eval.ref_stats={ref_path}", *overrides]


def sweep_recipe(tmp_path, n_ref: int, *overrides: str, recipe: str = GMM):
    """``recipe`` (the GMM teacher's) with ``sweep_overrides``."""
    from dtrain.config import load_recipe

    return load_recipe(recipe, sweep_overrides(tmp_path, n_ref, *overrides))


@pytest.mark.timeout(240)
def test_fid_callback_in_training(tmp_path, monkeypatch, capsys, wandb_records):
    from dtrain.lit.common import module_class
    from dtrain.lit.eval_callback import FIDSweepCallback
    from dtrain.lit.fit import build_trainer, run_dir

    monkeypatch.setenv("WANDB_MODE", "offline")
    raw = build_extractor("raw", shape=(2,))
    cfg = sweep_recipe(tmp_path, 4000, "trainer.max_steps=5", "trainer.log_every_n_steps=1",
                       "eval.samplers=['ddim:1,4','ddpm:4']", "eval.num=96", "eval.seed=3",
                       "trainer.progress_bar=true")  # the final sweep's line went to the closed bar and was lost
    from dtrain.data import build_datamodule

    out = run_dir(cfg)
    module = module_class(cfg.method.name)(cfg)
    trainer = build_trainer(cfg, out)
    cb = FIDSweepCallback.from_recipe(cfg, out_dir=out / "eval")
    trainer.callbacks.append(cb)
    trainer.fit(module, datamodule=build_datamodule(cfg.data, seed=cfg.seed))
    trainer.logger.experiment.finish()  # flush the offline run before reading it back

    assert [s for s, _ in cb.history] == [2, 4, 5]  # every 2 steps, then the final weights
    said = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("eval at step")]
    assert [ln.split(":")[0] for ln in said] == ["eval at step 2", "eval at step 4", "eval at step 5"]
    assert said[-1].endswith(f"ddpm@4 FID {cb.history[-1][1][2].fid:.2f}")  # the terminal shows each sweep
    last = cb.history[-1][1]
    assert [(r.sampler, r.nfe, r.num) for r in last] == [("ddim", 1, 96), ("ddim", 4, 96), ("ddpm", 4, 96)]
    # the callback scored the default EMA denoiser in eval mode: a direct sweep gives the same numbers
    den = module.denoiser_for(module.default_ema).eval()
    again = fid_sweep(den, ["ddim:1,4", "ddpm:4"], num=96, batch_size=40, shape=(2,), extractor=raw, ref=cb._ref,
                      seed=3, progress=False)
    assert [r.fid for r in again] == pytest.approx([r.fid for r in last], rel=1e-9)
    assert module.net.training  # training mode restored

    rec = json.loads((out / "eval" / "step_0000004.json").read_text())
    assert rec["step"] == 4 and rec["ref_count"] == 4000 and len(rec["rows"]) == 3

    wandb_dir = next((out / "wandb").glob("offline-run-*"))
    tables = sorted(wandb_dir.rglob("fid_table_*.table.json"), key=lambda p: int(p.name.split("_")[2]))
    assert len(tables) == 3 and len(list(wandb_dir.rglob("fid_vs_nfe_table_*.table.json"))) == 3  # table + plot
    table = json.loads(tables[-1].read_text())
    assert [row[3] for row in table["data"]] == pytest.approx([r.fid for r in last], rel=1e-12)
    fids: dict[int, dict[str, float]] = {}  # the scalars of each sweep, by step (records, not raw bytes: a key
    for rec in wandb_records(wandb_dir):  # crossing one of the log's 32 KiB blocks is split there)
        if rec.WhichOneof("record_type") == "history":
            items = {it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in rec.history.item}
            if any(k.startswith("eval/fid/") for k in items):
                fids[items["trainer/global_step"]] = {k: v for k, v in items.items() if k.startswith("eval/fid/")}
    keys = [f"eval/fid/{k}" for k in ("ddim_nfe1", "ddim_nfe4", "ddpm_nfe4")]
    assert {s: [f.get(k) for k in keys] for s, f in fids.items()} == {
        s: pytest.approx([r.fid for r in rows], rel=1e-12) for s, rows in cb.history}


@pytest.mark.timeout(240)
def test_a_sigterm_cuts_the_sweep_short_and_the_checkpoint_follows(tmp_path, monkeypatch):
    """SIGTERM during a sweep: it stops before its next point (minutes of sampling would eat the SLURM grace
    time), keeps the points done, and the checkpoint is written at the end of that same step."""
    import os
    import signal

    from dtrain.data import build_datamodule
    from dtrain.dist.slurm import Preemption
    from dtrain.lit.common import module_class
    from dtrain.lit.eval_callback import FIDSweepCallback
    from dtrain.lit.fit import build_trainer, run_dir

    cfg = sweep_recipe(tmp_path, 2000, "trainer.max_steps=10", "logger.mode=disabled", "eval.samplers=['ddim:1,4']",
                       "eval.num=40")
    import dtrain.eval.sweep as sweep

    calls, real = [], sweep.generate

    def signal_in_step_4s_sweep(*args, **kw):  # once per point: the first point of the second sweep
        calls.append(args[1:3])
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kw)

    monkeypatch.setattr(sweep, "generate", signal_in_step_4s_sweep)

    out = run_dir(cfg)
    cb = FIDSweepCallback.from_recipe(cfg)
    trainer = build_trainer(cfg, out, extra_callbacks=[cb])
    with pytest.warns(UserWarning, match=r"eval at step 4: stopped after 1 point\(s\)"):
        trainer.fit(module_class(cfg.method.name)(cfg), datamodule=build_datamodule(cfg.data, seed=cfg.seed))
    stop = next(c for c in trainer.callbacks if isinstance(c, Preemption))
    assert [(s, [(r.sampler, r.nfe) for r in rows]) for s, rows in cb.history] == [
        (2, [("ddim", 1), ("ddim", 4)]), (4, [("ddim", 1)])]
    assert stop.stopped_by == signal.SIGTERM and trainer.global_step == 5  # saved at the end of step 5
    assert torch.load(out / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] == 5


@pytest.mark.timeout(240)
def test_a_run_without_ema_trains_on_in_training_mode_after_a_sweep(tmp_path):
    """Without EMA copies the sweep scores the raw network itself: it must be back in training mode (dropout on)
    for the steps after. (With EMA the sweep never touches the network, so the test above cannot see this.)"""
    import lightning as L

    from dtrain.data import build_datamodule
    from dtrain.lit.common import module_class
    from dtrain.lit.eval_callback import FIDSweepCallback
    from dtrain.lit.fit import build_trainer, run_dir

    cfg = sweep_recipe(tmp_path, 1000, "trainer.max_steps=3", "eval.samplers=['ddim:1']", "eval.num=40",
                       "ema.decays=[]", "ema.stds=[]", "logger.mode=disabled", "model.dropout=0.1")
    modes: list[tuple[int, bool]] = []

    class Mode(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append((trainer.global_step, pl_module.net.training))

    module = module_class(cfg.method.name)(cfg)
    trainer = build_trainer(cfg, run_dir(cfg))
    cb = FIDSweepCallback.from_recipe(cfg, out_dir=run_dir(cfg) / "eval")
    trainer.callbacks.extend([cb, Mode()])
    trainer.fit(module, datamodule=build_datamodule(cfg.data, seed=cfg.seed))
    assert [s for s, _ in cb.history] == [2, 3] and modes == [(0, True), (1, True), (2, True)], modes


@pytest.mark.timeout(240)
def test_a_guided_pd_student_is_swept_with_w_as_its_input(tmp_path):
    """A w-conditioned student (guided PD) is scored as it samples, as its bundles and dtrain eval are: w as an input
    of its network (``WCondDenoiser``), not classifier-free guidance, which never gives it w."""
    from dtrain.cli import main
    from dtrain.data import build_datamodule
    from dtrain.diffusion.guidance import GuidedCond, WCondDenoiser
    from dtrain.lit.eval_callback import FIDSweepCallback
    from dtrain.lit.fit import build_trainer, run_dir
    from dtrain.lit.progressive import ProgressiveModule

    small = ["trainer.cpu_threads=1", "trainer.progress_bar=false", "logger.mode=disabled", "model.hidden=16",
             "model.depth=1", "model.num_classes=3", "data.batch_size=64"]
    assert main(["fit", GMM, f"out_dir={tmp_path}", *small, "method.cfg_dropout=0.2", "trainer.max_steps=4"]) == 0
    cfg = sweep_recipe(tmp_path, 1000, *small, f"teacher={tmp_path}/teacher-gmm/checkpoints/last.ckpt",
                       "model.w_cond=true", "method.guidance=[1.0,3.0]", "sampler.guidance=2.0",
                       "method.cfg_dropout=0.1", "method.start_steps=4", "method.end_steps=2", "method.round_steps=[2]",
                       "method.eval=false", "trainer.max_steps=4", "eval.samplers=['ddim:2,4']", "eval.num=40",
                       recipe="recipes/pd/gmm.yaml")
    module = ProgressiveModule(cfg)
    cb = FIDSweepCallback.from_recipe(cfg)
    conds = []  # the EMA student's network runs only in the sweeps here
    module.ema[module.default_ema].register_forward_hook(lambda m, args, out: conds.append(args[2]))
    build_trainer(cfg, run_dir(cfg), extra_callbacks=[cb]).fit(module, datamodule=build_datamodule(cfg.data, seed=0))
    assert [s for s, _ in cb.history] == [2, 4] and cb.guidance == 2.0
    # a call per step (2 + 4 per sweep) on the 40 samples, each given w (CFG: twice the batch, bare labels and nulls)
    assert len(conds) == 2 * 6 and all(isinstance(c, GuidedCond) and c.labels.shape == (40,) and
                                       bool((c.w == 2.0).all()) for c in conds)
    den = module.denoiser_for(module.default_ema).eval()
    kw = dict(num=40, batch_size=40, shape=(2,), extractor=build_extractor("raw", shape=(2,)), ref=cb._ref,
              num_classes=3, guidance=2.0, progress=False, grids=module.sample_grids())
    w_input = fid_sweep(den, ["ddim:2,4"], guide=lambda d, w, null: WCondDenoiser(d, w), **kw)
    cfg_guided = fid_sweep(den, ["ddim:2,4"], **kw)  # classifier-free guidance, what the sweep ran before
    assert [r.fid for r in cb.history[-1][1]] == pytest.approx([r.fid for r in w_input], rel=1e-9)
    assert all(abs(a.fid - b.fid) > 1e-6 for a, b in zip(w_input, cfg_guided, strict=True)), (w_input, cfg_guided)


class Killed(BaseException):
    """The job killed (an exception no handler of dtrain or Lightning takes for an error it may recover from)."""


def said_steps(capsys) -> list[str]:
    """The steps of the sweeps the terminal showed since the last call."""
    return [ln.split(":")[0].removeprefix("eval at step ") for ln in capsys.readouterr().out.splitlines()
            if ln.startswith("eval at step")]


@pytest.mark.timeout(240)
def test_a_final_sweep_killed_after_the_last_checkpoint_runs_on_resume(tmp_path, monkeypatch, capsys):
    """Killed during the final sweep, after the last step's checkpoint: ``--resume auto`` restores the last step,
    where Lightning runs no training loop (no on_train_end, no batch starts); the sweep runs at the fit's end on the
    restored weights. Resumed once more, the run has its final sweep and sweeps nothing."""
    import dtrain.eval.sweep as sweep
    from dtrain.cli import main
    from dtrain.lit.common import DiffusionModule

    argv = ["fit", GMM, *sweep_overrides(tmp_path, 1000, "trainer.cpu_threads=1", "logger.mode=disabled",
                                         "trainer.max_steps=4", "trainer.ckpt_every_n_steps=2",
                                         "eval.samplers=['ddim:1,2']", "eval.num=40")]
    calls, real = [], sweep.fid_sweep

    def killed_in_the_second(*args, **kw):  # step 2's sweep, then the final one: killed there
        calls.append(len(calls))
        if len(calls) == 2:
            raise Killed
        return real(*args, **kw)

    monkeypatch.setattr(sweep, "fid_sweep", killed_in_the_second)
    with pytest.raises(Killed):
        main(argv)
    out = tmp_path / "teacher-gmm"
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert said_steps(capsys) == ["2"] and not (out / "eval" / "step_0000004.json").exists()
    monkeypatch.setattr(sweep, "fid_sweep", real)
    assert main([*argv, "--resume", "auto"]) == 0
    assert said_steps(capsys) == ["4"]
    rec = json.loads((out / "eval" / "step_0000004.json").read_text())
    assert rec["step"] == 4 and rec["complete"] is True
    module = DiffusionModule.load_checkpoint(out / "checkpoints" / "last.ckpt")  # the final weights were scored
    raw = build_extractor("raw", shape=(2,))
    again = fid_sweep(module.denoiser_for(module.default_ema).eval(), ["ddim:1,2"], num=40, batch_size=40, shape=(2,),
                      extractor=raw, ref=load_ref(rec["ref_stats"], raw), progress=False)
    assert [r["fid"] for r in rec["rows"]] == pytest.approx([r.fid for r in again], rel=1e-9)
    assert main([*argv, "--resume", "auto"]) == 0
    assert said_steps(capsys) == []


@pytest.mark.timeout(240)
def test_a_resume_repeats_only_a_sweep_its_checkpoints_job_did_not_complete(tmp_path, monkeypatch, capsys):
    """Step N's checkpoint is written before step N's sweep runs. A fit resumed from it runs that sweep again only
    when the job before did not complete it (here: a SIGTERM cut it short): no second W&B point, no wasted sweep
    per requeue."""
    import os
    import signal

    import dtrain.eval.sweep as sweep
    from dtrain.cli import main

    argv = ["fit", GMM, *sweep_overrides(tmp_path, 1000, "trainer.cpu_threads=1", "logger.mode=disabled",
                                         "trainer.max_steps=4", "trainer.ckpt_every_n_steps=2",
                                         "eval.samplers=['ddim:1,2']", "eval.num=40")]
    out = tmp_path / "teacher-gmm"
    calls, real = [], sweep.generate

    def signal_in_the_first_point(*args, **kw):  # step 2's sweep: it stops after this point
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kw)

    monkeypatch.setattr(sweep, "generate", signal_in_the_first_point)
    with pytest.warns(UserWarning, match=r"eval at step 2: stopped after 1 point\(s\)"), pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 143  # after the checkpoint of step 3
    assert said_steps(capsys) == ["2"]
    assert json.loads((out / "eval" / "step_0000002.json").read_text())["complete"] is False
    ckpt = str(out / "checkpoints" / "step0000002.ckpt")
    assert main([*argv, "--resume", ckpt]) == 0
    assert said_steps(capsys) == ["2", "4"]  # step 2's sweep again: the job before did not complete it
    assert json.loads((out / "eval" / "step_0000002.json").read_text())["complete"] is True
    assert main([*argv, "--resume", ckpt]) == 0
    assert said_steps(capsys) == ["4"]  # this time it did


@pytest.mark.timeout(240)
@pytest.mark.parametrize("signum", ["SIGTERM", "SIGUSR1"])
def test_a_signal_that_cuts_the_final_sweep_short_leaves_the_job_unfinished(tmp_path, monkeypatch, capsys, signum):
    """SLURM's time-limit signal during the final sweep stopped it (complete: false) and the job exited 0, looking
    finished with no final FID and no requeue. Now SIGTERM exits 143 and the requeue signal requeues; the resumed
    fit runs the final sweep."""
    import os
    import signal

    import dtrain.dist.slurm as slurm
    import dtrain.eval.sweep as sweep
    from dtrain.cli import main

    sig = getattr(signal, signum)
    requeued: list[bool] = []
    monkeypatch.setattr(slurm, "_requeue", lambda: requeued.append(True) or True)
    monkeypatch.setattr(slurm, "callbacks", lambda: [slurm.Preemption(signal.SIGUSR1)])  # as under SLURM
    argv = ["fit", GMM, *sweep_overrides(tmp_path, 1000, "trainer.cpu_threads=1", "logger.mode=disabled",
                                         "trainer.max_steps=2", "trainer.ckpt_every_n_steps=0",
                                         "eval.samplers=['ddim:1,2']", "eval.num=40")]
    out, real, calls = tmp_path / "teacher-gmm", sweep.generate, []

    def signal_in_the_first_point(*args, **kw):  # the final sweep: it stops after this point
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), sig)
        return real(*args, **kw)

    monkeypatch.setattr(sweep, "generate", signal_in_the_first_point)
    with pytest.warns(UserWarning, match=r"eval at step 2: stopped after 1 point\(s\)"):
        if sig == signal.SIGTERM:
            with pytest.raises(SystemExit) as e:
                main(argv)
            assert e.value.code == 143 and not requeued
        else:
            assert main(argv) == 0 and requeued == [True]  # requeued: the next job resumes
    assert "cut short the final evaluation" in capsys.readouterr().err
    assert json.loads((out / "eval" / "step_0000002.json").read_text())["complete"] is False
    if sig == signal.SIGUSR1:  # the requeued job resumes at the last step: its sweep runs at the fit's end, and
        calls.clear()  # is cut short by the requeue signal again: requeued again (it exited 0 without a requeue)
        with pytest.warns(UserWarning, match=r"eval at step 2: stopped after 1 point\(s\)"):
            assert main([*argv, "--resume", "auto"]) == 0 and requeued == [True, True]
        assert json.loads((out / "eval" / "step_0000002.json").read_text())["complete"] is False
        capsys.readouterr()
    monkeypatch.setattr(sweep, "generate", real)
    assert main([*argv, "--resume", "auto"]) == 0
    assert said_steps(capsys) == ["2"]
    assert json.loads((out / "eval" / "step_0000002.json").read_text())["complete"] is True

"""The every-N-steps FID sweep inside a real (tiny) training run: runs at the right steps, scores the EMA
denoiser exactly as a direct sweep does, writes JSON, and logs a table, a line plot and scalars to W&B."""

from __future__ import annotations

import json

import pytest
import torch

from dtrain.data.synthetic import default_gmm
from dtrain.eval.features import build_extractor
from dtrain.eval.fid import compute_ref_stats
from dtrain.eval.sweep import fid_sweep

pytestmark = pytest.mark.usefixtures("one_thread")


def sweep_recipe(tmp_path, n_ref: int, *overrides: str):
    """The GMM teacher recipe with a raw-feature FID sweep every 2 steps against ``n_ref`` exact samples."""
    from dtrain.config import load_recipe

    x, _ = default_gmm().sample(n_ref, torch.Generator().manual_seed(0))
    ref = compute_ref_stats(build_extractor("raw", shape=(2,)), x.split(1000), source="default_gmm")
    ref_path = ref.save(tmp_path / "gmm_ref.npz")
    return load_recipe("recipes/teacher/gmm.yaml", [
        f"out_dir={tmp_path}", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.progress_bar=false",
        "optim.warmup_steps=0", "data.num_samples=4096", "eval.every_n_steps=2", "eval.batch_size=40",
        "eval.feature_extractor=raw", f"eval.ref_stats={ref_path}", *overrides])


@pytest.mark.timeout(240)
def test_fid_callback_in_training(tmp_path, monkeypatch, capsys):
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
    log = next(wandb_dir.glob("*.wandb")).read_bytes()  # the offline record log holds the scalar keys verbatim
    assert all(f"eval/fid/{k}".encode() in log for k in ("ddim_nfe1", "ddim_nfe4", "ddpm_nfe4"))


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

"""The shared LightningModule lifecycle on a tiny GMM teacher: LR schedule, clipping and its norm, the EMA of
step N in the checkpoint of step N, format-1 checkpoint layout, timestep buckets, module registry."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from dtrain.config import load_recipe
from dtrain.lit.common import LIT_MODULES, DiffusionModule, lr_factor, module_class, time_fraction
from dtrain.lit.teacher import TeacherModule

GMM = Path(__file__).resolve().parents[2] / "recipes" / "teacher" / "gmm.yaml"


def recipe(tmp_path, *extra):
    return load_recipe(GMM, [f"out_dir={tmp_path}", "model.hidden=16", "model.depth=1", "data.batch_size=64",
                             "data.num_samples=2048", "trainer.max_steps=6", "trainer.log_every_n_steps=3",
                             "trainer.ckpt_every_n_steps=4", "trainer.progress_bar=false", "logger.mode=disabled",
                             "ema.decays=[0.9,0.5]", "ema.stds=[0.1]", "optim.warmup_steps=2", *extra])


def test_lr_factor_warmup_then_cosine():
    f = [lr_factor(s, warmup=4, total=12, schedule="cosine", min_ratio=0.1) for s in range(13)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == pytest.approx(1.0) and f[12] == pytest.approx(0.1)
    assert f[8] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, warmup=4, total=12, schedule="constant", min_ratio=0.1) == 1.0


def test_time_fraction():
    from dtrain.diffusion.schedule import make_schedule

    edm = make_schedule("edm")
    torch.testing.assert_close(time_fraction(edm, torch.tensor([0.002, 80.0], dtype=torch.float64)),
                               torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert float(time_fraction(make_schedule("ddpm"), torch.tensor(0.5))) == 0.5


def test_registry():
    assert module_class("denoising") is TeacherModule
    with pytest.raises(KeyError, match=r"method\.name: unknown method 'pd2'"):
        module_class("pd2")
    assert "denoising" in LIT_MODULES


def test_fit_lifecycle_and_checkpoint_layout(tmp_path):
    from dtrain.lit.fit import build_trainer, close_loggers, run_dir

    cfg = recipe(tmp_path)
    L.seed_everything(0, verbose=False)
    module = TeacherModule(cfg)
    init = {k: v.clone() for k, v in module.net.state_dict().items()}
    seen: dict[str, object] = {"lr": []}

    class Spy(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen["lr"].append(optimizer.param_groups[0]["lr"])  # type: ignore[union-attr]

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 4:  # weights after all of step 4's hooks
                seen["net4"] = {k: v.clone() for k, v in pl_module.net.state_dict().items()}
                seen["ema4"] = {k: v.clone() for k, v in pl_module.ema.state_dict().items()}

    from dtrain.data import build_datamodule

    trainer = build_trainer(cfg, run_dir(cfg))
    trainer.callbacks.insert(0, Spy())
    trainer.fit(module, datamodule=build_datamodule(cfg.data, seed=0))
    close_loggers(trainer)
    lr = 2e-3
    assert seen["lr"][:2] == pytest.approx([lr * 0.5, lr])  # warmup over 2 steps, then cosine
    assert seen["lr"][-1] == pytest.approx(lr * lr_factor(5, warmup=2, total=6, schedule="cosine", min_ratio=0.05))

    ckdir = tmp_path / "teacher-gmm" / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["last.ckpt", "step0000004.ckpt"]
    ck4 = torch.load(ckdir / "step0000004.ckpt", map_location="cpu", weights_only=True)
    last = torch.load(ckdir / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck4["global_step"] == 4 and last["global_step"] == 6
    sd = ck4["state_dict"]
    assert {k.split(".")[0] for k in sd} == {"net", "ema"}
    assert {k.split(".")[1] for k in sd if k.startswith("ema.")} == {"0_9", "0_5", "std0_100"}
    for k, v in seen["net4"].items():  # type: ignore[union-attr]
        assert torch.equal(sd[f"net.{k}"], v)
    for k, v in seen["ema4"].items():  # type: ignore[union-attr]
        assert torch.equal(sd[f"ema.{k}"], v), k  # the EMA of step 4, not step 3
    meta = ck4["dtrain"]
    assert meta["format"] == 1 and meta["kind"] == "teacher" and meta["ema_tags"] == ["0_9", "0_5", "std0_100"]
    assert meta["recipe"]["model"]["hidden"] == 16 and meta["image"] == {"shape": [2], "range": None}
    assert meta["default_ema"] == "0_9" and len(meta["recipe_hash"]) == 64
    assert not any(torch.equal(init[k], sd[f"net.{k}"]) for k in init if "out" in k)  # trained
    # the checkpoint rebuilds the module, EMA included
    again = DiffusionModule.load_checkpoint(ckdir / "last.ckpt")
    assert isinstance(again, TeacherModule)
    for k, v in last["state_dict"].items():
        assert torch.equal(again.state_dict()[k], v)


def test_grad_norm_is_the_global_norm_before_clipping(tmp_path):
    cfg = recipe(tmp_path, "optim.grad_clip=1e-4")
    module = TeacherModule(cfg)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        gradient_clip_val=1e-4, enable_model_summary=False)
    captured = {}

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # grads after the step
            grads = [p.grad for p in pl_module.net.parameters() if p.grad is not None]
            captured["norm_after"] = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

        def on_after_backward(self, trainer, pl_module):
            grads = [p.grad for p in pl_module.net.parameters() if p.grad is not None]
            captured["norm_before"] = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

    trainer.callbacks.append(Spy())
    from dtrain.data import build_datamodule

    trainer.fit(module, datamodule=build_datamodule(cfg.data, seed=0))
    assert float(module._grad_norm) == pytest.approx(captured["norm_before"], rel=1e-5)
    assert captured["norm_after"] == pytest.approx(1e-4, rel=1e-3)


@pytest.mark.parametrize("max_steps", [6, 8])
def test_logged_loss_is_the_mean_of_each_log_interval(tmp_path, max_steps):
    """``train/loss`` is accumulated on device and logged once per ``log_every_n_steps``: the interval's mean;
    the last, partial interval of a run (8 steps, logged every 3: steps 7-8) is written too, at its step."""
    import csv

    from dtrain.data import build_datamodule
    from dtrain.lit.fit import build_trainer, run_dir

    cfg = recipe(tmp_path, "ema.decays=[]", "ema.stds=[]", f"trainer.max_steps={max_steps}")  # log every 3
    module = TeacherModule(cfg)
    losses: list[float] = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = build_trainer(cfg, run_dir(cfg), extra_callbacks=[Spy()])
    trainer.fit(module, datamodule=build_datamodule(cfg.data, seed=0))
    with open(run_dir(cfg) / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) == max_steps
    want = [sum(losses[i:i + 3]) / len(losses[i:i + 3]) for i in range(0, max_steps, 3)]
    assert [float(r["train/loss"]) for r in rows] == pytest.approx(want, rel=1e-6)
    assert [int(r["step"]) for r in rows] == [min(i + 3, max_steps) - 1 for i in range(0, max_steps, 3)]


def test_bucket_losses_are_per_time_means(tmp_path):
    module = TeacherModule(recipe(tmp_path))
    loss = torch.tensor([1.0, 2.0, 3.0, 10.0])
    t = torch.tensor([0.01, 0.05, 0.95, 0.99], dtype=torch.float64) * module.schedule.t_max
    module._accumulate(loss, t)
    sums, counts = module._bucket.tolist()
    assert counts[0] == 2 and counts[9] == 2 and sum(counts) == 4
    assert sums[0] / counts[0] == 1.5 and sums[9] / counts[9] == 6.5


def test_sample_shapes_and_guidance(tmp_path):
    module = TeacherModule(recipe(tmp_path, "model.num_classes=3"))
    g = torch.Generator().manual_seed(0)
    x = module.sample(labels=torch.tensor([0, 1, 2]), nfe=3, guidance=2.0, generator=g)
    assert x.shape == (3, 2)
    assert module.sample(5, nfe=2, ema=None).shape == (5, 2)


def test_same_seed_same_weights(tmp_path):
    from dtrain.lit.fit import fit

    def train(seed: int, name: str) -> dict:
        cfg = recipe(tmp_path, f"seed={seed}", f"name={name}", "trainer.ckpt_every_n_steps=0")
        out = fit(cfg)
        return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]

    a, b, c = train(0, "a"), train(0, "b"), train(1, "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_a_resumed_csv_run_keeps_the_earlier_jobs_scalars(tmp_path, one_thread):
    """logger.mode: disabled writes csv/metrics.csv, which Lightning's writer deletes when it exists: the earlier job's
    rows are kept as metrics.1.csv (then .2, ...), the resumed job's go to metrics.csv."""
    import csv

    from dtrain.lit.fit import fit

    over = [f"out_dir={tmp_path}", "model.hidden=16", "model.depth=1", "data.batch_size=32", "data.num_samples=256",
            "logger.mode=disabled", "trainer.progress_bar=false", "trainer.log_every_n_steps=2",
            "trainer.ckpt_every_n_steps=2"]
    run = fit(GMM, [*over, "trainer.max_steps=4"])
    fit(GMM, [*over, "trainer.max_steps=6"], resume="last")

    def steps(name: str) -> list[int]:
        with open(run / "csv" / name) as f:
            return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]

    assert steps("metrics.1.csv") == [1, 3] and steps("metrics.csv") == [5]


def test_under_accumulation_a_resumed_runs_logged_loss_is_the_uninterrupted_ones(tmp_path, one_thread):
    """With accumulate_grad_batches 2 the first micro-batch of a fit ends at its start step: the module logged there
    and cleared its sums, so the first interval after a resume left out a micro-batch (train/loss at step 7:
    0.75657 resumed, 0.75961 uninterrupted) and a fresh run logged a row at step 0."""
    import csv

    from dtrain.lit.fit import fit

    over = [f"out_dir={tmp_path}", "model.hidden=16", "model.depth=1", "data.batch_size=32", "data.num_samples=1024",
            "logger.mode=disabled", "trainer.progress_bar=false", "trainer.log_every_n_steps=2",
            "trainer.ckpt_every_n_steps=4", "trainer.accumulate_grad_batches=2", "trainer.deterministic=true",
            "trainer.max_steps=8", "ema.decays=[0.9]", "ema.stds=[]"]
    ref = fit(GMM, [*over, "name=ref"])
    res = fit(GMM, [*over, "name=res"], resume=str(ref / "checkpoints" / "step0000004.ckpt"))

    def rows(path: Path) -> dict[int, float]:
        with open(path) as f:
            return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}

    assert list(rows(ref / "csv" / "metrics.csv")) == [1, 3, 5, 7]
    assert rows(res / "csv" / "metrics.csv") == pytest.approx({k: v for k, v in rows(ref / "csv" / "metrics.csv")
                                                               .items() if k > 4}, rel=1e-6)


def test_a_resume_with_a_longer_cosine_run_steps_on_the_new_schedule_at_once(tmp_path, one_thread):
    """Resumed at step 8 with trainer.max_steps 8 -> 16 under a cosine schedule, step 8 trained at the old
    schedule's last LR (restored with the optimizer) and only step 9 on the new one."""
    from dtrain.lit.fit import fit

    over = [f"out_dir={tmp_path}", "model.hidden=16", "model.depth=1", "data.batch_size=32", "data.num_samples=256",
            "logger.mode=disabled", "trainer.progress_bar=false", "trainer.ckpt_every_n_steps=4",
            "optim.lr_schedule=cosine", "optim.warmup_steps=2", "optim.min_lr_ratio=0.1", "ema.decays=[]",
            "ema.stds=[]"]
    lrs: dict[int, float] = {}

    class Spy(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            lrs[trainer.global_step] = optimizer.param_groups[0]["lr"]

    fit(GMM, [*over, "trainer.max_steps=8"])
    lr = load_recipe(GMM).optim.lr
    with pytest.warns(UserWarning, match=r"trainer\.max_steps 8 -> 16"):
        fit(GMM, [*over, "trainer.max_steps=16"], resume="last", callbacks=[Spy()])
    want = {s: lr * lr_factor(s, warmup=2, total=16, schedule="cosine", min_ratio=0.1) for s in range(8, 16)}
    assert lrs == pytest.approx(want, rel=1e-9)


def test_sample_grids_wait_for_the_first_optimizer_step():
    """Under gradient accumulation the first micro-batch ends at the start step: a fresh run drew a grid of its
    untrained model (step 0) and a resumed one redrew the grid of the step it resumed from."""
    from types import SimpleNamespace

    from dtrain.lit.callbacks import SampleGrid

    drawn: list[int] = []
    cb = SampleGrid(every_n_steps=4)
    cb.log_grid = lambda trainer, module, step: drawn.append(step)
    module = SimpleNamespace(is_image=True)
    for start in (0, 4):
        trainer = SimpleNamespace(global_step=start, is_global_zero=True)
        cb.on_train_start(trainer, module)
        for step in (start, start, start + 1, start + 1, start + 4):
            trainer.global_step = step
            cb.on_train_batch_end(trainer, module, None, None, 0)
    assert drawn == [4, 8]


def test_every_micro_batch_of_every_step_draws_its_own_noise(tmp_path, monkeypatch):
    """torch's generators are reseeded per (step, micro-batch): noise and times differ between optimizer steps and
    between the accumulated micro-batches of one step (with one seed per step, teacher training would reuse a
    single noise draw for the whole run), and the same (seed, rank, step, micro) gives the same seed."""
    from dtrain.lit import common
    from dtrain.lit.fit import fit

    seeds: list[int] = []
    real = common.seed_generators
    monkeypatch.setattr(common, "seed_generators", lambda s, device: (seeds.append(s), real(s, device))[1])
    fit(recipe(tmp_path, "trainer.accumulate_grad_batches=3", "trainer.max_steps=3", "trainer.ckpt_every_n_steps=0"))
    assert len(seeds) == 9 and len(set(seeds)) == 9
    assert seeds == [common.train_seed(0, 0, step, micro) for step in range(3) for micro in range(3)]


def test_optimizer_and_ema_follow_the_recipe(tmp_path):
    """AdamW takes the recipe's weight decay, betas and eps; the EMA its start step and update interval."""
    m = TeacherModule(recipe(tmp_path, "optim.weight_decay=0.1", "optim.betas=[0.5,0.9]", "optim.eps=1e-6",
                             "ema.every=4", "ema.start_step=10"))
    opt = m.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt[0][0] if isinstance(opt, tuple) else opt
    group = opt.param_groups[0]
    assert (group["weight_decay"], tuple(group["betas"]), group["eps"]) == (0.1, (0.5, 0.9), 1e-6)
    assert (m.ema.every, m.ema.start_step) == (4, 10)


def test_ema_update_after_a_resume_waits_for_the_next_optimizer_step():
    """Resumed at step N (under gradient accumulation the first micro-batches leave global_step at N), the EMA is
    averaged at step N + 1 only: one extra update would make the resumed EMA differ from the uninterrupted one."""
    from types import SimpleNamespace

    from dtrain.lit.callbacks import EMAUpdate

    calls: list[int] = []
    module = SimpleNamespace(ema=SimpleNamespace(update=lambda net, step: calls.append(step)), net=None, guard=None,
                             ema_step=lambda step: step)
    cb, trainer = EMAUpdate(), SimpleNamespace(global_step=5)
    cb.on_train_start(trainer, module)
    cb.on_train_batch_end(trainer, module, None, None, 0)
    assert calls == []
    trainer.global_step = 6
    cb.on_train_batch_end(trainer, module, None, None, 1)
    cb.on_train_batch_end(trainer, module, None, None, 2)
    assert calls == [6]


def test_throughput_counts_every_accumulated_micro_batch(tmp_path):
    """perf/samples_per_s = optimizer steps per second x per-rank batch x ranks x accumulation steps."""
    import csv

    from dtrain.lit.fit import fit

    out = fit(recipe(tmp_path, "trainer.accumulate_grad_batches=2", "trainer.log_every_n_steps=2",
                     "trainer.ckpt_every_n_steps=0"))
    with open(out / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/samples_per_s")]
    assert rows and all(float(r["perf/samples_per_s"]) == pytest.approx(float(r["perf/steps_per_s"]) * 64 * 2)
                        for r in rows)


def test_a_half_precision_batch_reaches_the_loss_in_float32(tmp_path):
    """bf16-true / 16-true / DeepSpeed bf16 cast the batch: the loss's arithmetic (PD's x0~ over q ~ 1e-4, CT's
    1 / ds-weighted differences) ran in bf16 (a 0.57 rms target error); the batch is float32 from training_step on,
    and the networks still get their own dtype."""
    module = TeacherModule(recipe(tmp_path))
    seen = []

    def compute_loss(batch):
        seen.append(batch["x"].dtype)
        return torch.zeros(2), None

    module.compute_loss = compute_loss
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        module.training_step({"x": torch.zeros(2, 2, dtype=dtype)}, 0)
    assert seen == [torch.float32] * 3

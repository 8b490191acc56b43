"""Lightning's DeepSpeed (ZeRO-2, ZeRO-3, optimizer offload), FSDP and FSDP2 strategies built from recipes
(``dtrain.dist.strategy``) train a teacher for a few steps on one GPU through ``dtrain.lit.fit.build_trainer``.

Each run: the loss stays finite, the checkpoint (a DeepSpeed directory, an FSDP file, a distributed
directory) consolidates to fp32 and loads into the model, the EMA copy is fp32 and differs from the network,
and where the strategy leaves the trained module usable, its EMA samples equal the consolidated model's.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
GMM = ROOT / "recipes" / "teacher" / "gmm.yaml"
DIGITS = ROOT / "recipes" / "teacher" / "digits.yaml"
STEPS = 30
pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]


def _fit(recipe: Path, overrides: list[str], out: Path, summary: dict):
    """``dtrain fit`` without W&B: the same datamodule, module and trainer, a CSV logger."""
    from lightning.pytorch.loggers import CSVLogger

    from dtrain.config import load_recipe
    from dtrain.data import build_datamodule
    from dtrain.lit.common import module_class
    from dtrain.lit.fit import build_trainer, run_dir

    cfg = load_recipe(recipe, [f"out_dir={out}", "logger.mode=disabled", "trainer.progress_bar=false",
                               f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=5",
                               f"trainer.ckpt_every_n_steps={STEPS}", "trainer.accelerator=gpu", "trainer.devices=1",
                               *overrides])
    run = run_dir(cfg)
    module = module_class(cfg.method.name)(cfg)
    trainer = build_trainer(cfg, run, logger=CSVLogger(str(run), name="csv"))
    cuda = torch.cuda.is_available()  # (without it: only tests/unit/test_gpu_benchmark.py's import audit, on the CPU)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=build_datamodule(cfg.data, seed=cfg.seed))
    summary.update(overrides=overrides, seconds=time.perf_counter() - t0, global_step=trainer.global_step,
                   peak_mem_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                   strategy=type(trainer.strategy).__name__)
    losses = _losses(run)
    summary["losses"] = losses
    assert trainer.global_step == STEPS
    assert losses and all(torch.isfinite(torch.tensor(losses))), losses
    return cfg, module, trainer, run


def _losses(run: Path) -> list[float]:
    import csv

    files = sorted(run.glob("csv/version_*/metrics.csv"))
    rows = list(csv.DictReader(files[-1].open())) if files else []
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def _check_checkpoint(run: Path, summary: dict):
    from dtrain.export.checkpoint import read_checkpoint
    from dtrain.lit.common import module_class

    path = run / "checkpoints" / "last.ckpt"
    summary["checkpoint_is_directory"] = path.is_dir()
    ckpt = read_checkpoint(path)  # consolidates a sharded directory
    sd = ckpt["state_dict"]
    assert ckpt["global_step"] == STEPS and all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    tag = ckpt["dtrain"]["ema_tags"][0]
    nets = [k[4:] for k in sd if k.startswith("net.")]
    gap = max((sd[f"net.{k}"] - sd[f"ema.{tag}.{k}"]).abs().max().item() for k in nets)
    summary["net_ema_gap"] = gap
    assert gap > 0
    recipe = ckpt["dtrain"]["recipe"]
    module = module_class(recipe["method"]["name"])(recipe)
    module.load_state_dict(sd)
    return module.to("cuda" if torch.cuda.is_available() else "cpu"), tag


def _samples(module, tag: str) -> torch.Tensor:
    return module.sample(64, nfe=8, ema=tag, generator=torch.Generator(device=module.device).manual_seed(3))


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed(stage, out_dir, summary):
    pytest.importorskip("deepspeed")
    import deepspeed

    _, module, _, run = _fit(GMM, ["strategy.name=deepspeed", f"strategy.zero_stage={stage}",
                                   "trainer.precision=bf16-mixed", "model.hidden=256", "model.depth=4"],
                             out_dir, summary)
    loaded, tag = _check_checkpoint(run, summary)
    ema = module.ema[tag]
    with deepspeed.zero.GatheredParameters(list(ema.parameters()), enabled=stage == 3):
        assert all(p.dtype == torch.float32 for p in ema.parameters())
        inrun = {k: v.detach().float().cpu().clone() for k, v in ema.state_dict().items()}
    for k, v in loaded.ema[tag].state_dict().items():
        assert torch.equal(inrun[k], v.cpu()), k
    if stage == 2:  # whole weights on the rank: the trained module (Lightning's teardown left it on the CPU) samples
        a, b = _samples(module.cuda(), tag), _samples(loaded, tag)  # like the consolidated one
        summary["samples_max_abs_diff"] = (a - b).abs().max().item()
        assert torch.equal(a, b)


def test_deepspeed_offload_optimizer_uses_cpu_adam(out_dir, summary):
    pytest.importorskip("deepspeed")
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from deepspeed.ops.op_builder import CPUAdamBuilder

    try:  # DeepSpeed compiles the op on first use (ninja, a C++ compiler, Python.h); ~30-60 s
        CPUAdamBuilder().load()
    except Exception as e:  # an incomplete toolchain on this machine, not a dtrain failure
        summary["skipped"] = f"DeepSpeed's cpu_adam op cannot be built here: {type(e).__name__}: {str(e)[:300]}"
        pytest.skip(summary["skipped"])

    _, _, trainer, run = _fit(GMM, ["strategy.name=deepspeed", "strategy.zero_stage=2",
                                    "strategy.offload_optimizer=true", "trainer.precision=bf16-mixed"],
                              out_dir, summary)
    summary["optimizer"] = type(trainer.strategy.deepspeed_engine.basic_optimizer).__name__
    assert isinstance(trainer.strategy.deepspeed_engine.basic_optimizer, DeepSpeedCPUAdam)
    _check_checkpoint(run, summary)


def test_deepspeed_stage2_samples_during_training(out_dir, summary):
    """ZeRO-2 keeps whole weights on every rank: the sample grid of rank 0 runs on the fp32 EMA copy."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("sklearn")
    _, _, _, run = _fit(DIGITS, ["strategy.name=deepspeed", "strategy.zero_stage=2", "trainer.precision=bf16-mixed",
                                 "trainer.sample_every_n_steps=15", "data.batch_size=64"], out_dir, summary)
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000015.png", "step_0000030.png"]
    _check_checkpoint(run, summary)


@pytest.mark.parametrize("sharded", [False, True])
def test_fsdp(sharded, out_dir, summary):
    _, _, _, run = _fit(GMM, ["strategy.name=fsdp", f"strategy.sharded_checkpoint={sharded}",
                              "trainer.precision=bf16-mixed", "model.hidden=256", "model.depth=4"], out_dir, summary)
    loaded, tag = _check_checkpoint(run, summary)
    assert torch.isfinite(_samples(loaded, tag)).all()


def test_fsdp2(out_dir, summary):
    _, _, _, run = _fit(GMM, ["strategy.name=fsdp2", "strategy.sharded_checkpoint=true",
                              "trainer.precision=bf16-mixed", "model.hidden=256", "model.depth=4"], out_dir, summary)
    loaded, tag = _check_checkpoint(run, summary)
    assert torch.isfinite(_samples(loaded, tag)).all()


def test_ddp_reference(out_dir, summary):
    """The same run under DDP, for the timings and losses in summary.json."""
    _, module, _, run = _fit(GMM, ["strategy.name=ddp", "trainer.precision=bf16-mixed", "model.hidden=256",
                                   "model.depth=4"], out_dir, summary)
    loaded, tag = _check_checkpoint(run, summary)
    assert torch.equal(_samples(module.cuda(), tag), _samples(loaded, tag))

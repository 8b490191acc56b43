"""The digits teacher from its recipe, on this machine's CPU: training time and class accuracy of its samples.

    python benchmarks/teacher_digits.py [key=value ...]     # -> benchmarks/results/teacher_digits.json

Trains ``recipes/teacher/digits.yaml`` through ``dtrain.lit.fit.fit`` (the code path of ``dtrain fit``), times
the training loop alone (first to last batch, Lightning start-up excluded; reported separately), then draws
class-conditional samples with the recipe's sampler (DDIM-50, CFG w = ``sampler.guidance``) from the default
EMA and asks the FID-digits classifier (``dtrain.eval.features``, trained on real digits) for their class.
``accuracy_without_guidance`` is the same with w = 1. The machine's load average is recorded: on a shared
2-core machine it moves the timings a lot (the recipe trains on one thread, ``trainer.cpu_threads: 1``).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dtrain.config import load_recipe, to_container  # noqa: E402
from dtrain.lit.common import DiffusionModule  # noqa: E402

RECIPE = ROOT / "recipes" / "teacher" / "digits.yaml"
OUT = ROOT / "benchmarks" / "results" / "teacher_digits.json"


class LoopTimer(L.Callback):
    """Wall time from the first training batch to the end of the last one."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not hasattr(self, "t0"):
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.t0


@torch.no_grad()
def class_accuracy(module: DiffusionModule, n_per_class: int, seed: int, guidance: float | None = None) -> dict:
    from dtrain.eval.features import build_extractor

    clf = build_extractor("digits")
    labels = torch.arange(10).repeat_interleave(n_per_class)
    t0 = time.perf_counter()
    x = module.sample(labels=labels, generator=torch.Generator().manual_seed(seed), guidance=guidance)
    seconds = time.perf_counter() - t0
    hit = clf.logits(x.clamp(-1, 1)).argmax(1) == labels
    per_class = [float(hit[labels == k].double().mean()) for k in range(10)]
    return {"accuracy": float(hit.double().mean()), "per_class": per_class, "sample_seconds": round(seconds, 1)}


def main(overrides: list[str]) -> dict:
    from dtrain.lit import fit as fit_mod

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    out_dir = Path(os.environ.get("BENCH_OUT", "/tmp/dtrain_bench"))
    cfg = load_recipe(RECIPE, [f"out_dir={out_dir}", "logger.mode=disabled", "trainer.progress_bar=false",
                               *overrides])
    timer = LoopTimer()
    build = fit_mod.build_trainer

    def with_timer(*a, **kw):
        trainer = build(*a, **kw)
        trainer.callbacks.append(timer)
        return trainer

    fit_mod.build_trainer = with_timer
    shutil.rmtree(fit_mod.run_dir(cfg), ignore_errors=True)  # a fresh run each time (fit refuses to start beside one)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    run = fit_mod.fit(cfg)
    total = time.perf_counter() - t0
    load1 = os.getloadavg()
    module = DiffusionModule.load_checkpoint(run / "checkpoints" / "last.ckpt")
    n_per_class, seed = 100, 0
    acc = class_accuracy(module, n_per_class, seed)
    plain = class_accuracy(module, n_per_class, seed, guidance=1.0)
    clf_info = json.loads((ROOT / "dtrain" / "assets" / "digits_classifier.json").read_text())
    result = {
        "benchmark": "teacher_digits",
        "command": "python benchmarks/teacher_digits.py " + " ".join(overrides),
        "accuracy": acc["accuracy"],
        "accuracy_per_class": acc["per_class"],
        "accuracy_without_guidance": plain["accuracy"],
        "train_seconds": round(timer.seconds, 1),
        "fit_seconds_total": round(total, 1),
        "steps": int(cfg.trainer.max_steps),
        "steps_per_second": round(cfg.trainer.max_steps / timer.seconds, 2),
        "batch_size": int(cfg.data.batch_size),
        "parameters": module.num_params(),
        "sampler": {"name": cfg.sampler.name, "nfe": cfg.sampler.nfe, "guidance": cfg.sampler.guidance,
                    "ema": module.default_ema, "samples": 10 * n_per_class, "seed": seed,
                    "seconds": acc["sample_seconds"]},
        "classifier": {"name": "FID-digits (dtrain.eval.features.DigitsFeatures)",
                       "test_accuracy": clf_info["test_accuracy"], "sha256": clf_info["sha256"]},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "processor": platform.processor() or platform.machine(),
                    "loadavg_before": [round(v, 2) for v in load0], "loadavg_after": [round(v, 2) for v in load1]},
        "recipe": to_container(cfg),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "recipe"}, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

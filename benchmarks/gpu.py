"""GPU throughput of the CIFAR-10 teacher: images/s, TFLOP/s and MFU of a bare loop vs dtrain, eager and compiled,
and the peak memory of DDP vs DeepSpeed ZeRO-2 (one GPU).

    python benchmarks/gpu.py [--steps 50] [--warmup 10] [--batch-size 128] [--cases bare,dtrain,...]
        # -> benchmarks/results/gpu_<gpu name>.json

The network is ``recipes/teacher/cifar10.yaml``'s (DDPM's CIFAR-10 UNet, 35.7M parameters, class-conditional),
trained as the recipe says (bf16-mixed autocast, channels_last, fused AdamW, clipping, three EMA copies) on random
in-memory 32x32 images, batch 128. Cases, each in its own process (clean compile caches and memory peaks):

- ``bare`` / ``bare_compile``: a hand-written PyTorch loop (``benchmarks/overhead.py: bare_run``), eager or with
  ``nn.Module.compile`` (inductor);
- ``dtrain`` / ``dtrain_compile``: ``dtrain fit``'s LightningModule under ``build_trainer``'s Trainer, the
  recipe's strategy (DDP, one rank), ``trainer.compile`` false / true;
- ``dtrain_deepspeed_zero2``: the same with ``strategy.name=deepspeed``, ``strategy.zero_stage=2``.

FLOPs per step are counted once with ``torch.utils.flop_counter.FlopCounterMode`` over the network's forward and
backward (matmuls, convolutions, attention as the math kernel's matmuls; a multiply-add is 2 FLOPs; elementwise ops,
norms and the optimizer are not counted, as in the usual MFU). MFU = achieved FLOP/s / the GPU's dense bf16 peak
(``PEAK_BF16_TFLOPS``; none for a MIG slice).
Anchors: EDM's ImageNet-64 ADM ran at ~15% MFU on A100, fast-DiT at ~24%.
Without CUDA it exits with a message and measures nothing; ``--smoke`` runs a tiny version on the CPU (tests).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "teacher" / "cifar10.yaml"
RESULTS = ROOT / "benchmarks" / "results"
# In this order, so that a run cut short (tools/gpu_offline.sh's budget) loses the least: the eager pair (the recipe
# as it trains, and dtrain's overhead), dtrain compiled (its best MFU), the bare compiled loop that completes the
# compiled pair, and last the ZeRO-2 memory, which on one GPU partitions nothing.
CASES = {
    "bare": ["trainer.compile=false"],
    "dtrain": ["trainer.compile=false"],
    "dtrain_compile": ["trainer.compile=true"],
    "bare_compile": ["trainer.compile=true"],
    "dtrain_deepspeed_zero2": ["trainer.compile=false", "strategy.name=deepspeed", "strategy.zero_stage=2"],
}
# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets; first match of the device name wins.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("GH200", 989.0), ("H100", 989.0),
    ("H200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("A10", 125.0),
]
SMOKE = ["model.channels=32", "model.channel_mult=[1,2]", "model.attn_resolutions=[16]", "model.resolution=32",
         "trainer.accelerator=cpu", "trainer.precision=bf16-mixed", "trainer.cpu_threads=1", "optim.impl=foreach",
         "ema.stds=[0.1]"]
NO_CUDA = ("benchmarks/gpu.py: no CUDA GPU here (torch.cuda.is_available() is False), so nothing was measured. "
           "Run it on a machine with an NVIDIA GPU: python benchmarks/gpu.py")


def require_cuda() -> None:
    """Exit with a clear message (status 2) where CUDA is unavailable."""
    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        raise SystemExit(2)


def peak_bf16_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by its ``torch.cuda.get_device_name`` (None: not in the table, or a MIG slice)."""
    if "MIG" in device_name:  # e.g. "NVIDIA H100 80GB HBM3 MIG 3g.40gb": a fraction of the chip's SMs
        return None
    for key, tflops in PEAK_BF16_TFLOPS:  # whole words: "L4" is not the L40, "A10" not the A10G
        if re.search(rf"(?<![\w-]){re.escape(key)}(?![\w])", device_name, re.IGNORECASE):
            return tflops
    return None


def versions() -> dict[str, Any]:
    """The software a result depends on: CUDA and cuDNN as torch was built with, the NVIDIA driver (nvidia-smi's),
    Lightning and DeepSpeed as installed; None where absent."""
    from importlib.metadata import PackageNotFoundError, version

    def dist(name: str) -> str | None:  # not imported: DeepSpeed's import takes seconds of the benchmark's budget
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        driver = (smi.stdout.split("\n")[0].strip() or None) if smi.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        driver = None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "driver": driver, "lightning": dist("lightning"), "deepspeed": dist("deepspeed")}


def step_flops(net: torch.nn.Module, x: torch.Tensor, c_noise: torch.Tensor, cond: Any = None,
               autocast: torch.dtype | None = None) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs of one training step of ``net`` on this batch, counted by
    ``FlopCounterMode`` (a multiply-add is 2 FLOPs; the backward is what autograd runs: no input gradient of the
    first layer). Attention runs as the math kernel's two matmuls on every device: the CPU's fused kernel (taken
    with channels_last) has no FLOP formula, and a GPU kernel's backward also counts its recompute of the scores,
    which MFU leaves out."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    ctx = (lambda: torch.autocast(x.device.type, dtype=autocast)) if autocast is not None else nullcontext
    with FlopCounterMode(display=False) as fc, torch.no_grad(), ctx(), sdpa_kernel(SDPBackend.MATH):
        net(x, c_noise, cond)
    fwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
        with ctx():
            out = net(x, c_noise, cond)
        out.float().square().mean().backward()
    net.zero_grad(set_to_none=True)
    return fwd, fc.get_total_flops()


def throughput(flops_per_step: float | None, steps_per_s: float, batch_size: int, peak_tflops: float | None
               ) -> dict[str, float | None]:
    """images/s, achieved TFLOP/s and MFU (achieved / peak) of a run (None where the FLOPs are unknown)."""
    achieved = flops_per_step * steps_per_s / 1e12 if flops_per_step else None
    return {"images_per_s": batch_size * steps_per_s, "steps_per_s": steps_per_s, "achieved_tflops": achieved,
            "mfu": achieved / peak_tflops if achieved and peak_tflops else None}


def recipe(out_dir: Path, batch_size: int, total_steps: int, overrides: list[str]) -> Any:
    from dtrain.config import load_recipe

    return load_recipe(RECIPE, [f"out_dir={out_dir}", "logger.mode=disabled", "trainer.progress_bar=false",
                                f"trainer.max_steps={total_steps}", "trainer.ckpt_every_n_steps=0",
                                "trainer.sample_every_n_steps=0", "trainer.devices=1", f"data.batch_size={batch_size}",
                                *overrides])


def fake_cifar(n: int, cfg: Any, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n random images in [-1, 1] of the recipe's shape and labels (CPU): the data pipeline is not measured here."""
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    x = torch.rand(n, m.in_channels, m.resolution, m.resolution, generator=g) * 2 - 1
    return x, torch.randint(0, max(1, m.num_classes), (n,), generator=g)


def run_case(case: str, a: argparse.Namespace) -> dict[str, Any]:
    """One case in this process: steps/s, CPU steps/s, peak device memory."""
    from benchmarks.overhead import bare_run, dtrain_run
    from dtrain.data.memory import InMemoryDataModule
    from dtrain.lit.fit import set_cpu_threads, set_tf32

    with tempfile.TemporaryDirectory() as tmp:
        cfg = recipe(Path(tmp), a.batch_size, a.warmup + a.steps, [*CASES[case], *(SMOKE if a.smoke else [])])
        set_cpu_threads(int(cfg.trainer.cpu_threads))
        set_tf32(bool(cfg.trainer.tf32))
        x, y = fake_cifar(a.batch_size * 8, cfg)
        if case.startswith("bare"):
            res = bare_run(cfg, a.warmup, a.steps, (x, y), "cpu" if a.smoke else "cuda")
        else:
            dm = InMemoryDataModule({"x": x, "y": y}, a.batch_size, seed=cfg.seed, num_classes=cfg.model.num_classes)
            res = dtrain_run(cfg, a.warmup, a.steps, dm, checkpoint=False)
    return {"case": case, "overrides": CASES[case], **res}


def count_flops(a: argparse.Namespace, device: str) -> dict[str, Any]:
    """The network's parameters and FLOPs per training step at the benchmark's batch, shapes and precision."""
    from dtrain.models import build_model, count_params

    cfg = recipe(Path(tempfile.gettempdir()), a.batch_size, 1, SMOKE if a.smoke else [])
    fmt = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    net = build_model(cfg.model).to(device, memory_format=fmt)
    x, y = fake_cifar(a.batch_size, cfg)
    x = x.to(device).contiguous(memory_format=fmt)
    c = torch.randint(0, 1000, (a.batch_size,)).float().to(device)
    bf16 = torch.bfloat16 if cfg.trainer.precision.startswith("bf16") else None
    fwd, train = step_flops(net, x, c, y.to(device) if cfg.model.num_classes else None, autocast=bf16)
    return {"model_params": count_params(net), "precision": cfg.trainer.precision,
            "flops_forward_per_step": fwd, "flops_train_per_step": train,
            "flops_train_per_image": train / a.batch_size}


def positive_int(text: str) -> int:
    """An argparse type: an int of at least 1."""
    if (n := int(text)) < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=positive_int, default=50, help="timed optimizer steps per case")
    # at least 1: dtrain's clock starts at the end of step warmup - 1
    p.add_argument("--warmup", type=positive_int, default=10, help="untimed steps first (compilation happens here)")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {list(CASES)}")
    p.add_argument("--timeout", type=positive_int, default=480, help="seconds per case")
    p.add_argument("--out", type=Path, default=None, help="default: <--out-dir>/gpu_<gpu name>.json")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="default: benchmarks/results")
    p.add_argument("--smoke", action="store_true", help="a tiny CPU run of the same code (for tests)")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, write its JSON to --case-out
    p.add_argument("--case-out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.case:
        import faulthandler

        faulthandler.dump_traceback_later(max(1, a.timeout - 10), exit=False)  # a hang shows where it was
        from dtrain.fileio import write_json

        write_json(a.case_out, run_case(a.case, a))  # whole or absent: the parent reads it
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return None
    if not a.smoke:
        require_cuda()
    cases = [c for c in a.cases.split(",") if c]
    if a.smoke:  # the CPU has neither DeepSpeed under Lightning nor a quick inductor
        cases = [c for c in cases if c in ("bare", "dtrain")]
    if unknown := sorted(set(cases) - set(CASES)):
        p.error(f"--cases: unknown {unknown}; choose from {list(CASES)}")
    device = "cpu" if a.smoke else "cuda"
    name = "cpu-smoke" if a.smoke else torch.cuda.get_device_name(0)
    peak = None if a.smoke else peak_bf16_tflops(name)
    no_mfu = (None if peak else "--smoke: no GPU" if a.smoke else "a MIG slice: a fraction of the chip's peak"
              if "MIG" in name else "the GPU is not in PEAK_BF16_TFLOPS")
    software = versions()
    try:
        flops = count_flops(a, device)
    except Exception as e:  # the cases still run; MFU stays unknown
        flops = {"flops_error": f"{type(e).__name__}: {e}"[:2000]}
    if device == "cuda":
        torch.cuda.empty_cache()  # this process holds no memory while the cases run
    from benchmarks.common import machine
    from dtrain.fileio import write_json

    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    path = a.out or a.out_dir / f"gpu_{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}

    def ratio(num: str, den: str, key: str = "images_per_s") -> float | None:
        n, d = results.get(num, {}).get(key), results.get(den, {}).get(key)
        return n / d if n and d else None

    def write() -> dict[str, Any]:  # after every case: a run stopped from outside keeps the cases it finished
        res = {
            "benchmark": "CIFAR-10 teacher (DDPM UNet) throughput: bare PyTorch loop vs dtrain, eager vs "
                         "torch.compile; DDP vs DeepSpeed ZeRO-2 peak memory on one GPU",
            "command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "gpu": name, "peak_bf16_tflops": peak, "mfu_not_reported": no_mfu, "versions": software,
            "recipe": str(RECIPE.relative_to(ROOT)),
            "batch_size": a.batch_size, "steps": a.steps, "warmup": a.warmup, **flops,
            "cases": results, "cases_pending": [c for c in cases if c not in results],
            "dtrain_vs_bare": {"eager": ratio("dtrain", "bare"), "compiled": ratio("dtrain_compile", "bare_compile")},
            "compile_speedup": {"bare": ratio("bare_compile", "bare"), "dtrain": ratio("dtrain_compile", "dtrain")},
            "peak_mem_gib": {"ddp": results.get("dtrain", {}).get("peak_mem_gib"),
                             "deepspeed_zero2": results.get("dtrain_deepspeed_zero2", {}).get("peak_mem_gib")},
            "deepspeed_note": "one GPU: ZeRO-2 partitions nothing across ranks here; DeepSpeed trains bf16 weights "
                              "(the model cast, fp32 master copies in the optimizer) where DDP runs bf16 autocast "
                              "on fp32 weights, and the EMA reads the fp32 master weights every step",
            "anchors": "MFU of EDM's ImageNet-64 ADM training on A100 ~15%, fast-DiT ~24%",
            "machine": machine(),
        }
        write_json(path, res, indent=1)  # atomic: a run killed mid-write leaves the previous complete file
        return res

    res = write()  # the FLOP count and every case pending; then after every case
    for case in cases:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "case.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--case", case, "--case-out", str(out),
                   "--steps", str(a.steps), "--warmup", str(a.warmup), "--batch-size", str(a.batch_size),
                   "--timeout", str(a.timeout), *(["--smoke"] if a.smoke else [])]
            t0 = time.perf_counter()
            code: int | None = None
            try:
                run = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, cwd=ROOT)
                code, log = run.returncode, run.stderr
            except subprocess.TimeoutExpired as e:  # its captured output comes back as bytes
                err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
                log = f"timed out after {a.timeout} s\n{err}"
            ok = out.is_file()  # measured: kept even when the process failed on its way out
            if ok:
                r = json.loads(out.read_text())
                r.update(throughput(flops.get("flops_train_per_step"), r["steps_per_s"], a.batch_size, peak))
                mem = r.pop("peak_mem_bytes")
                r["peak_mem_gib"] = mem / 2**30 if mem == mem else None  # NaN (no CUDA: --smoke) is not JSON
                if code != 0:
                    r.update(exit_code=code, stderr_tail=str(log)[-1000:])
            else:
                r = {"case": case, "exit_code": code, "error": str(log)[-2000:]}
            r["process_wall_s"] = time.perf_counter() - t0
            results[case] = r
            print(json.dumps({k: v for k, v in r.items() if k != "error"} if ok else r), flush=True)
            res = write()
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()

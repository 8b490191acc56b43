"""The CPU-side pieces of ``benchmarks/gpu.py``: its FLOP count against a closed-form count of the UNet's layers,
the MFU arithmetic and peak table, and the message it exits with where there is no CUDA."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu  # noqa: E402
from dtrain.models.unet import AttentionBlock, UNet  # noqa: E402


def closed_form_flops(net: UNet, x: torch.Tensor, c: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """(forward FLOPs, FLOPs of the layers whose input needs no gradient) from each layer's shapes: a convolution
    2 * out.numel() * C_in / groups * k_h * k_w, a linear layer 2 * out.numel() * in_features, attention
    2 * (QK^T + AV) = 4 * B * heads * L^2 * head_dim. Counted with forward hooks."""
    total, no_input_grad = [0], [0]

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if isinstance(mod, nn.Conv2d):
            f = 2 * out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, nn.Linear):
            f = 2 * out.numel() * mod.in_features
        else:  # AttentionBlock
            B, C, H, W = args[0].shape
            f = 4 * B * mod.heads * (H * W) ** 2 * (C // mod.heads)
        total[0] += f
        if not args[0].requires_grad:
            no_input_grad[0] += f

    hooks = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d | nn.Linear
                                                                               | AttentionBlock)]
    net(x, c, y)
    for h in hooks:
        h.remove()
    return total[0], no_input_grad[0]


@pytest.mark.parametrize("fmt, autocast", [(torch.contiguous_format, None), (torch.channels_last, torch.bfloat16)],
                         ids=["contiguous", "channels_last-bf16"])
def test_step_flops_equal_the_closed_form_count(one_thread, fmt, autocast):
    """Also as the benchmark counts (the recipe's channels_last and bf16 autocast), where the CPU's attention kernel
    has no FLOP formula unless the count runs the math kernel."""
    torch.manual_seed(0)
    net = UNet(in_channels=3, resolution=8, channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
               num_heads=2, dropout=0.0, num_classes=10).to(memory_format=fmt)
    x, c, y = torch.randn(3, 3, 8, 8).contiguous(memory_format=fmt), torch.rand(3) * 999, torch.randint(0, 10, (3,))
    fwd, train = gpu.step_flops(net, x, c, y, autocast=autocast)
    expect, first = closed_form_flops(net, x, c, y)
    assert fwd == expect
    # backward: the gradient of every weight (1x forward) and of every input that needs one (1x forward)
    assert train == 3 * expect - first
    assert first > 0 and 2.9 * fwd < train < 3 * fwd
    assert all(p.grad is None for p in net.parameters())  # the count leaves no gradients behind


def test_cifar10_unet_flops_per_image():
    """DDPM's CIFAR-10 network: 35.7M parameters, about 6.2 GMACs = 12.4 GFLOPs per image forward."""
    from dtrain.config import load_recipe
    from dtrain.models import build_model, count_params

    cfg = load_recipe(gpu.RECIPE, ["out_dir=/tmp"])
    with torch.device("meta"):
        net = build_model(cfg.model)
        x, c, y = torch.zeros(2, 3, 32, 32), torch.zeros(2), torch.zeros(2, dtype=torch.long)
        fwd, train = gpu.step_flops(net, x, c, y)
    assert count_params(net) == pytest.approx(35.7e6, rel=0.01)
    assert fwd / 2 == pytest.approx(12.44e9, rel=0.001)
    assert 2.9 * fwd < train < 3 * fwd


def test_mfu_arithmetic_and_peak_table():
    r = gpu.throughput(2.5e12, 40.0, 128, 989.0)  # 2.5 TFLOP a step, 40 steps/s
    assert r["images_per_s"] == 5120.0 and r["achieved_tflops"] == pytest.approx(100.0)
    assert r["mfu"] == pytest.approx(100.0 / 989.0)
    assert gpu.throughput(1e12, 1.0, 1, None)["mfu"] is None
    names = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H200": 989.0,
             "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0, "NVIDIA L40S": 362.0, "NVIDIA L4": 121.0,
             "Tesla V100-SXM2-16GB": None, "NVIDIA L40": 181.0, "NVIDIA A10G": None,  # "L4" matched the L40
             "NVIDIA GH200 480GB": 989.0, "NVIDIA H100 NVL": 835.0,
             "NVIDIA H100 80GB HBM3 MIG 3g.40gb": None, "NVIDIA A100-SXM4-40GB MIG 1g.5gb": None}  # a slice's share
    assert {n: gpu.peak_bf16_tflops(n) for n in names} == names


def test_exits_with_a_message_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        gpu.main([])
    assert e.value.code == 2
    assert "no CUDA GPU here" in capsys.readouterr().err
    assert not list((ROOT / "benchmarks" / "results").glob("gpu_cpu*.json"))  # nothing written


def test_results_record_the_software_and_why_mfu_is_missing(monkeypatch, tmp_path):
    """On a MIG slice (no case run here): no peak, the reason for no MFU, and the CUDA, cuDNN, driver, Lightning and
    DeepSpeed versions (None where absent)."""
    import importlib.metadata as md
    import json
    import os

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3 MIG 3g.40gb")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)  # (it asks the faked GPU)
    monkeypatch.setattr(gpu, "count_flops", lambda a, device: {"flops_train_per_step": 1e12})
    version = md.version

    def no_deepspeed(name: str) -> str:
        if name == "deepspeed":
            raise md.PackageNotFoundError(name)
        return version(name)

    monkeypatch.setattr(md, "version", no_deepspeed)
    (tmp_path / "bin").mkdir()
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 570.86.15\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    res = gpu.main(["--cases", "", "--out", str(tmp_path / "r.json")])
    assert res["peak_bf16_tflops"] is None and res["mfu_not_reported"] == "a MIG slice: a fraction of the chip's peak"
    assert res["versions"] == {"torch": torch.__version__, "cuda": torch.version.cuda,
                               "cudnn": 90100, "driver": "570.86.15",
                               "lightning": version("lightning"), "deepspeed": None}
    assert json.loads((tmp_path / "r.json").read_text())["versions"] == res["versions"]
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert gpu.versions()["driver"] is None


@pytest.mark.parametrize("flag", ["--warmup", "--steps"])
def test_warmup_and_steps_are_at_least_one(flag, tmp_path, capsys):
    """At --warmup 0 dtrain's clock never started (its steps/s nonsense), at --steps 0 the rates were NaN."""
    with pytest.raises(SystemExit) as e:
        gpu.main(["--smoke", "--cases", "", "--batch-size", "1", "--out", str(tmp_path / "r.json"), flag, "0"])
    assert e.value.code == 2 and f"argument {flag}: must be at least 1, not 0" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_cases_run_the_most_informative_first():
    """A run cut short by tools/gpu_offline.sh's budget keeps the eager pair, then dtrain compiled, the bare compiled
    loop that completes the compiled pair, and last the one-GPU ZeRO-2 memory (which partitions nothing)."""
    assert list(gpu.CASES) == ["bare", "dtrain", "dtrain_compile", "bare_compile", "dtrain_deepspeed_zero2"]


SCRIPT = ROOT / "tools" / "gpu_offline.sh"


def _script(*args: str, env: dict | None = None, cwd: Path = ROOT):
    import os
    import subprocess

    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA this would run the real GPU suite and benchmark")
def test_offline_script_runs_the_gpu_tests_and_benchmark_into_out(tmp_path):
    """``tools/gpu_offline.sh run`` without wheels or CUDA, from another folder with a relative OUT: the environment
    report, the GPU tests (all skipped here), their summaries, and the benchmark's no-CUDA message, each in OUT."""
    import re

    r = _script("run", "out", "all", str(tmp_path / "no_wheels"), env={"TMPDIR": str(tmp_path)}, cwd=tmp_path)
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench.log", "env.txt", "gpu_tests.json", "gpu_tests.log", "gpu_tests.xml"], r.stdout + r.stderr
    assert "no wheels in" in r.stderr
    env = (out / "env.txt").read_text()
    assert f" {ROOT / 'dtrain' / '__init__.py'}" in env and "torch " in env and "Python.h:" in env
    log = (out / "gpu_tests.log").read_text()
    assert re.search(r"\b\d+ skipped", log) and "failed" not in log and "error" not in log
    assert (out / "gpu_tests.json").read_text().strip() == "{}"
    assert "no CUDA GPU here" in (out / "bench.log").read_text()
    assert r.returncode == 1  # the benchmark measured nothing


HANG_PLUGIN = '''
import os, pathlib, time
import pytest
import torch

torch.cuda.is_available = lambda: True  # the GPU tests run (their fixtures set up) instead of being skipped
torch.cuda.get_device_name = lambda i=0: "no GPU"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):  # the first test hangs, outside any fit
    pathlib.Path(os.environ["HANG_MARK"]).write_text(item.nodeid)
    time.sleep(120)
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA this would run the real GPU suite")
def test_offline_script_interrupts_a_test_running_at_the_deadline(tmp_path):
    """A GPU test still running at the tests' deadline (here one hung outside any fit, without pytest-timeout) is
    interrupted (SIGINT): pytest still writes its junit XML, summary line and the test's summary.json, and the log
    names the test (SIGTERM killed pytest with none of them, and -q named no test)."""
    import json
    import re

    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "hang_in_test.py").write_text(HANG_PLUGIN)
    r = _script("run", str(tmp_path / "out"), "tests", str(tmp_path / "no_wheels"),
                env={"TMPDIR": str(tmp_path), "TESTS_S": "45", "PYTHONPATH": str(tmp_path / "plugins"),
                     "PYTEST_ADDOPTS": "-p hang_in_test -p no:timeout", "HANG_MARK": str(tmp_path / "hung")})
    log = (tmp_path / "out" / "gpu_tests.log").read_text()
    hung = (tmp_path / "hung").read_text()
    assert hung.startswith("tests/gpu/") and hung in log and "KeyboardInterrupt" in log, r.stdout + r.stderr
    assert re.search(r"^=+ .*\bin [\d.]+s\b.*=+$", log, re.M), log
    assert (tmp_path / "out" / "gpu_tests.xml").is_file() and r.returncode == 1
    summaries = json.loads((tmp_path / "out" / "gpu_tests.json").read_text())
    assert summaries[re.sub(r"[^\w.-]+", "_", hung.split("::")[-1])]["device"] == "no GPU"


def test_offline_script_names_bad_arguments(tmp_path):
    r = _script("run", str(tmp_path), "everything")
    assert r.returncode == 2 and "WHAT must be tests, bench or all, not 'everything'" in r.stderr
    r = _script("run")
    assert r.returncode == 2 and "run needs OUT" in r.stderr
    r = _script()
    assert r.returncode == 2 and "tools/gpu_offline.sh wheels [DIR] [PYVER]" in r.stdout
    assert r.stdout.rstrip().endswith("and commit.")  # the whole header


AUDIT_SITE = '''
import atexit, os, sys

def _dump():
    with open(os.path.join(os.environ["DTRAIN_IMPORT_AUDIT"], f"{os.getpid()}.txt"), "w") as f:
        f.write("\\n".join(sorted({m.split(".")[0] for m in list(sys.modules)})))

atexit.register(_dump)
'''
AUDIT_GPU_TESTS = '''
import sys, tempfile
from pathlib import Path
sys.path.insert(0, "tests/gpu")
import test_strategies_gpu as t
from deepspeed.ops.adam import DeepSpeedCPUAdam  # noqa: F401
from deepspeed.ops.op_builder import CPUAdamBuilder  # noqa: F401
from dtrain.dist.strategy import deepspeed_config  # noqa: F401
t.STEPS = 3
for recipe, extra in ((t.GMM, []), (t.DIGITS, ["data.batch_size=8", "trainer.sample_every_n_steps=3"])):
    with tempfile.TemporaryDirectory() as out:
        _, module, _, run = t._fit(recipe, ["trainer.accelerator=cpu", "trainer.precision=32-true",
                                            "trainer.log_every_n_steps=1", *extra], Path(out),
                                   {})
        loaded, tag = t._check_checkpoint(run, {})
        t._samples(loaded, tag)
'''


def _bash_array(name: str) -> list[str]:
    import re

    body = re.search(rf"^{name}=\(([^)]*)\)", SCRIPT.read_text(), re.M)
    assert body, name
    return [w.split("==")[0] for w in body.group(1).split()]


def test_the_gpu_paths_import_only_the_image_and_the_carried_packages(tmp_path):
    """What ``tools/gpu_offline.sh`` assumes: the GPU tests' code path (their ``_fit``, checkpoint and sampling
    helpers, on the CPU) and ``benchmarks/gpu.py`` (``--smoke``, its case subprocesses too) import no distribution
    beyond the image's (``IMAGE``) and the carried wheels (``PACKAGES``), or the device run fails on an import."""
    import importlib.metadata as md
    import json
    import os
    import re
    import subprocess

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(AUDIT_SITE)
    (tmp_path / "mods").mkdir()
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}", "DTRAIN_IMPORT_AUDIT":
           str(tmp_path / "mods"), "WANDB_MODE": "offline"}
    for cmd in ([sys.executable, "-c", AUDIT_GPU_TESTS],
                [sys.executable, "benchmarks/gpu.py", "--smoke", "--steps", "1", "--warmup", "1", "--batch-size", "2",
                 "--out", str(tmp_path / "smoke.json")]):
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    smoke = json.loads((tmp_path / "smoke.json").read_text())  # written after each case; both finished
    assert list(smoke["cases"]) == ["bare", "dtrain"] and smoke["cases_pending"] == []
    assert smoke["dtrain_vs_bare"]["eager"] > 0 and "error" not in smoke["cases"]["dtrain"]
    assert len(list((tmp_path / "mods").iterdir())) >= 4  # the audit script, gpu.py and its two case processes
    modules = {m for f in (tmp_path / "mods").iterdir() for m in f.read_text().split()}
    owners = md.packages_distributions()

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    used = {norm(d) for m in modules if m not in sys.stdlib_module_names for d in owners.get(m, [])} - {"dtrain"}
    allowed = {norm(d) for d in [*_bash_array("IMAGE"), *_bash_array("PACKAGES")]}
    assert "torch" in used and "deepspeed" in used and "omegaconf" in used  # the audit saw the paths
    assert used <= allowed, f"imported, but neither on the image nor carried: {sorted(used - allowed)}"


def test_gpu_tests_skip_near_their_deadline(monkeypatch):
    """tools/gpu_offline.sh gives the GPU tests a deadline: a test starting within 30 s of it is skipped (pytest
    then ends by itself and writes its report), one with time left runs."""
    import importlib.util
    import time

    spec = importlib.util.spec_from_file_location("gpu_conftest", ROOT / "tests" / "gpu" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    monkeypatch.setenv("DTRAIN_GPU_DEADLINE", str(time.time() + 20))
    with pytest.raises(pytest.skip.Exception, match="out of time"):
        conftest.pytest_runtest_setup(None)
    monkeypatch.setenv("DTRAIN_GPU_DEADLINE", str(time.time() + 120))
    conftest.pytest_runtest_setup(None)
    monkeypatch.delenv("DTRAIN_GPU_DEADLINE")
    conftest.pytest_runtest_setup(None)


GPU_TIMER_TESTS = '''
import signal

import pytest
import torch

torch.cuda.is_available = lambda: True  # (collected before conftest.py skips the GPU tests without CUDA)
pytestmark = pytest.mark.timeout(600)


def test_long():
    print("timer", signal.getitimer(signal.ITIMER_REAL)[0])


@pytest.mark.timeout(20)
def test_short():
    print("timer", signal.getitimer(signal.ITIMER_REAL)[0])
'''


def test_gpu_tests_time_out_before_their_deadline(tmp_path):
    """With pytest-timeout, a GPU test may run until 10 s before DTRAIN_GPU_DEADLINE, or its own timeout mark if
    sooner: the timer pytest-timeout sets (SIGALRM) is that one, so a hung test fails, with its summary, before
    tools/gpu_offline.sh interrupts the run."""
    import os
    import re
    import shutil
    import subprocess
    import time

    (tmp_path / "tests" / "gpu").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "gpu" / "conftest.py", tmp_path / "tests" / "gpu")
    (tmp_path / "tests" / "gpu" / "test_timer.py").write_text(GPU_TIMER_TESTS)
    left = 100
    r = subprocess.run([sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider", "tests/gpu"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "DTRAIN_GPU_DEADLINE": str(time.time() + left)})
    timers = [float(t) for t in re.findall(r"timer ([\d.]+)", r.stdout)]
    assert r.returncode == 0 and len(timers) == 2, r.stdout + r.stderr
    assert left - 10 - 40 < timers[0] <= left - 10 and 15 < timers[1] <= 20


def test_every_gpu_test_has_a_place_in_the_time_limited_order():
    """tools/gpu_offline.sh gives the GPU tests a deadline; tests/gpu/conftest.py runs them quickest first (the
    DeepSpeed op builds last). A GPU test missing from that order would run last, maybe never."""
    import ast
    import importlib.util
    import types

    spec = importlib.util.spec_from_file_location("gpu_conftest", ROOT / "tests" / "gpu" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    names = [n.name for f in (ROOT / "tests" / "gpu").glob("test_*.py")
             for n in ast.parse(f.read_text()).body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    assert len(names) >= 6
    ranks = {n: conftest._rank(types.SimpleNamespace(name=n + "[x]")) for n in names}
    assert all(r < len(conftest.FIRST) for r in ranks.values()), ranks
    assert ranks["test_ddp_reference"] == 0
    assert ranks["test_deepspeed_offload_optimizer_uses_cpu_adam"] == max(ranks.values())

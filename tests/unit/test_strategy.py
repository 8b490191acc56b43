"""``dtrain.dist``: strategies and DeepSpeed configs from recipes, invalid combinations refused at validation,
fsdp2 (FSDP2 on CPU) training equal to DDP with sharded EMA copies, and the SLURM helpers (topology, sbatch
flags, the requeue callback)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from dtrain.config import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]
GMM = ROOT / "recipes" / "teacher" / "gmm.yaml"
SMALL = ["model.hidden=32", "model.depth=2", "data.batch_size=64", "data.num_samples=4096", "ema.decays=[0.99]",
         "logger.mode=disabled", "trainer.progress_bar=false", "trainer.cpu_threads=1"]


def recipe(*overrides: str):
    return load_recipe(GMM, [*SMALL, *overrides])


# ---- strategies from recipes ------------------------------------------------------------------------------------
def test_ddp_strategies():
    from lightning.pytorch.strategies import DDPStrategy

    from dtrain.dist.strategy import build_strategy

    assert build_strategy(recipe()) == "auto"
    s = build_strategy(recipe("strategy.name=ddp", "strategy.find_unused_parameters=true", "strategy.timeout_min=7"))
    assert type(s) is DDPStrategy and s._ddp_kwargs == {"find_unused_parameters": True}
    assert s._start_method == "popen" and s._timeout.total_seconds() == 420
    assert build_strategy(recipe("strategy.name=ddp_spawn"))._start_method == "spawn"


def test_fsdp_strategies():
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from dtrain.dist.strategy import build_strategy, fsdp_unit_types
    from dtrain.models.mlp import MLP, Block

    s = build_strategy(recipe("strategy.name=fsdp", "strategy.sharding=grad_op", "strategy.sharded_checkpoint=true"))
    assert isinstance(s, FSDPStrategy) and s.kwargs["use_orig_params"] is True
    assert s.sharding_strategy.name == "SHARD_GRAD_OP" and s._state_dict_type == "sharded"
    assert set(s.kwargs["auto_wrap_policy"]._module_classes) == {MLP, Block} == fsdp_unit_types(recipe().model)
    from dtrain.models.unet import AttentionBlock, ResBlock, UNet

    digits = load_recipe(ROOT / "recipes" / "teacher" / "digits.yaml")
    assert fsdp_unit_types(digits.model) == {UNet, ResBlock, AttentionBlock}
    s2 = build_strategy(recipe("strategy.name=fsdp2", "strategy.sharding=grad_op"))
    assert isinstance(s2, ModelParallelStrategy) and s2.reshard_after_forward is False
    assert s2._save_distributed_checkpoint is False


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_deepspeed_strategy_and_config(precision):
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from dtrain.dist.strategy import build_strategy, deepspeed_config

    cfg = recipe("strategy.name=deepspeed", "strategy.zero_stage=3", "strategy.offload_optimizer=true",
                 "strategy.offload_params=true", f"trainer.precision={precision}", "optim.grad_clip=0.5",
                 "trainer.accumulate_grad_batches=4", "strategy.loss_scale=0",
                 *(["strategy.initial_scale_power=12"] if precision == "16-mixed" else []))  # fp16's only
    conf = deepspeed_config(cfg)
    assert conf["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                         "offload_param": {"device": "cpu", "pin_memory": True}}
    assert conf["gradient_clipping"] == 0.5 and conf["train_micro_batch_size_per_gpu"] == 64
    assert "gradient_accumulation_steps" not in conf  # Lightning sets it from the trainer
    assert deepspeed_config(cfg, standalone=True)["gradient_accumulation_steps"] == 4
    assert ("bf16" in conf) == (precision == "bf16-mixed") and ("fp16" in conf) == (precision == "16-mixed")
    if precision == "16-mixed":
        assert conf["fp16"] == {"enabled": True, "loss_scale": 0.0, "initial_scale_power": 12,
                                "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1.0}
    s = build_strategy(cfg)
    assert isinstance(s, DeepSpeedStrategy) and s.config == conf


def test_deepspeed_setup_hands_deepspeed_contiguous_weights(monkeypatch):
    """``deepspeed.initialize`` (inside Lightning's ``DeepSpeedStrategy.setup``) reads every weight as bytes, which
    channels_last weights refuse (tests/unit/test_zero.py shows both): dtrain's strategy makes them contiguous
    first, and the batches stay channels_last."""
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    import dtrain.dist.strategy as S
    from dtrain.lit.teacher import TeacherModule

    cfg = load_recipe(ROOT / "recipes" / "teacher" / "patches.yaml", [
        "strategy.name=deepspeed", "model.channels=8", "model.num_heads=1", "model.resolution=8",
        "model.channel_mult=[1,2]", "model.attn_resolutions=[4]", "data.size=8", "trainer.channels_last=true"])
    module = TeacherModule(cfg)
    conv = next(p for p in module.net.parameters() if p.ndim == 4)
    assert module.channels_last and not conv.is_contiguous()
    seen = []
    monkeypatch.setattr(DeepSpeedStrategy, "setup", lambda self, trainer: seen.append(
        all(p.is_contiguous() for p in self.lightning_module.parameters())))
    monkeypatch.setattr(S, "zero_ema", lambda m: None)
    monkeypatch.setattr(S, "check_ema_alignment", lambda m: None)
    strategy = S.build_strategy(cfg)
    strategy._lightning_module = module
    strategy.setup(None)
    assert seen == [True] and module.channels_last


@pytest.mark.parametrize(("overrides", "key", "match"), [
    (["strategy.name=horovod"], "strategy.name", "unknown strategy 'horovod'"),
    (["strategy.name=deepspeed", "strategy.zero_stage=4"], "strategy.zero_stage", "must be 1, 2 or 3"),
    (["strategy.name=ddp", "strategy.offload_optimizer=true"], "strategy.offload_optimizer", "needs strategy.name"),
    (["strategy.name=deepspeed", "strategy.offload_params=true"], "strategy.offload_params", "ZeRO stage 3"),
    (["strategy.name=deepspeed", "trainer.accelerator=cpu"], "strategy.name", "CUDA GPUs only"),
    (["strategy.name=fsdp", "trainer.accelerator=cpu"], "strategy.name", "use ddp or fsdp2"),
    (["strategy.name=deepspeed", "trainer.precision=64-true"], "trainer.precision", "deepspeed supports"),
    (["strategy.name=fsdp2", "trainer.precision=16-mixed"], "trainer.precision", "fsdp2"),
    (["strategy.name=deepspeed", "strategy.loss_scale=128"], "strategy.loss_scale", "fp16 only"),
    (["strategy.name=ddp", "strategy.min_loss_scale=0"], "strategy", "min_loss_scale > 0"),
    (["strategy.name=fsdp2", "strategy.sharding=hybrid"], "strategy.sharding", "choose one of ['full', 'grad_op']"),
    (["strategy.name=ddp", "strategy.sharding=grad_op"], "strategy.sharding", "applies to fsdp / fsdp2 only"),
    (["strategy.name=deepspeed", "strategy.sharded_checkpoint=true"], "strategy.sharded_checkpoint", "fsdp"),
    (["strategy.name=fsdp2", "trainer.sample_every_n_steps=100"], "trainer.sample_every_n_steps", "shards it"),
    (["strategy.name=deepspeed", "strategy.zero_stage=3", "trainer.sample_every_n_steps=100"],
     "trainer.sample_every_n_steps", "ZeRO stage 3"),
    (["strategy.name=fsdp", "eval.every_n_steps=100", "eval.samplers=[ddim:4]", "eval.ref_stats=digits:train"],
     "eval.every_n_steps", "FID sweep during training"),
    (["strategy.timeout_min=0"], "strategy.timeout_min", ">= 1"),
    # fsdp's precisions are checked like the others' (Lightning's own ValueError named no key, and came on the GPU)
    (["strategy.name=fsdp", "trainer.precision=64-true"], "trainer.precision", "fsdp supports"),
    # options of other strategies were accepted and dropped without a word
    (["strategy.name=ddp", "trainer.precision=16-mixed", "strategy.initial_scale_power=3"],
     "strategy.initial_scale_power", "applies to deepspeed with 16-mixed / 16-true only"),
    (["strategy.name=deepspeed", "trainer.precision=bf16-mixed", "strategy.hysteresis=4"], "strategy.hysteresis",
     "it would be ignored"),
    (["strategy.name=deepspeed", "strategy.find_unused_parameters=true"], "strategy.find_unused_parameters",
     "applies to ddp / ddp_spawn only, not 'deepspeed'"),
    (["strategy.name=fsdp2", "strategy.find_unused_parameters=true"], "strategy.find_unused_parameters", "fsdp2"),
])
def test_invalid_combinations_fail_at_validation(overrides, key, match):
    with pytest.raises(RecipeError, match=re.escape(match)) as e:
        recipe(*overrides)
    assert e.value.key == key and e.value.source == "command line"


def test_fsdp2_on_the_cpu_needs_torch_2_7(monkeypatch):
    """torch 2.6's FSDP2 records CUDA stream events on the CPU too (the fsdp2 run below fails there; 2.7.1 passes):
    ``check_inputs`` (``dtrain fit``, before anything starts) says so; recipe validation does not (a CPU login node
    validates GPU recipes)."""
    from dtrain.config import check_inputs

    cfg = recipe("strategy.name=fsdp2", "trainer.accelerator=cpu")
    monkeypatch.setattr(torch, "__version__", "2.6.0+cpu")
    with pytest.raises(RecipeError, match=r"fsdp2 on the CPU needs torch >= 2\.7 \(torch 2\.6\.0\+cpu's") as e:
        check_inputs(cfg)
    assert e.value.key == "strategy.name"
    monkeypatch.setattr(torch, "__version__", "2.7.1")
    check_inputs(cfg)


def test_valid_combinations_pass():
    recipe("strategy.name=deepspeed", "strategy.zero_stage=2", "trainer.sample_every_n_steps=100")  # replicated
    recipe("strategy.name=deepspeed", "strategy.zero_stage=3", "strategy.offload_params=true",
           "trainer.precision=16-mixed", "strategy.loss_scale=1024")
    recipe("strategy.name=fsdp2", "trainer.accelerator=cpu", "trainer.precision=bf16-mixed")


def test_ema_alignment_check_names_the_tensor():
    from dtrain.dist.strategy import check_ema_alignment
    from dtrain.lit.teacher import TeacherModule

    module = TeacherModule(recipe())
    check_ema_alignment(module)  # full copies line up
    module.ema.targets = lambda copy: [t.reshape(-1)[:1] for t in type(module.ema)._tensors(copy)]
    with pytest.raises(RuntimeError, match=r"ema.0_99: its shards do not line up with net's \(tensor 0"):
        check_ema_alignment(module)


# ---- fsdp2 (Lightning, CPU) and FSDP1 (raw torch; Lightning's FSDPStrategy needs CUDA) on 2 ranks -----------------
def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist_runs(tmp_path_factory):
    """`dtrain fit` under fsdp2 (2 CPU ranks) and the raw FSDP1 worker (2 ranks), at once."""
    from dtrain.config import check_inputs

    try:  # fsdp2 on the CPU needs torch >= 2.7 (dtrain fit says so before the run)
        check_inputs(recipe("strategy.name=fsdp2", "trainer.accelerator=cpu"))
    except RecipeError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("dist")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    fit = [sys.executable, "-m", "dtrain.cli", "fit", str(GMM), f"out_dir={out}", *SMALL, "trainer.accelerator=cpu",
           "trainer.devices=2", "trainer.max_steps=20", "trainer.ckpt_every_n_steps=0", "optim.grad_clip=0.05",
           "trainer.log_every_n_steps=5",
           "name=fsdp2", "strategy.name=fsdp2", "strategy.sharded_checkpoint=true", "ema.stds=[0.1]"]
    (out / "fsdp1").mkdir()
    worker = [sys.executable, str(Path(__file__).with_name("fsdp1_worker.py")), str(out / "fsdp1"), "5"]
    dist = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port()), "OMP_NUM_THREADS": "1"}
    runs = [("fsdp2", fit, {}), *((f"fsdp1 rank {r}", worker, {**dist, "RANK": str(r)}) for r in (0, 1))]
    procs = [(name, subprocess.Popen(cmd, cwd=ROOT, env={**env, **extra}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)) for name, cmd, extra in runs]
    try:
        for name, p in procs:
            log, _ = p.communicate(timeout=270)
            assert p.returncode == 0, f"{name}:\n{log[-3000:]}"
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


def _single_process_reference(overrides: list[str], steps: int, seeds: tuple[int, int] | None,
                              losses: list[float] | None = None) -> dict[str, torch.Tensor]:
    """What 2 data-parallel ranks compute, in one process: each rank's batches and noise stream (torch seeded with
    ``seeds[r]``; None: reseeded every step as ``DiffusionModule.training_step`` does), gradients averaged, clipped
    by global norm (optim.grad_clip), AdamW + LR schedule, EMA update; ``losses`` gets each step's loss, the mean
    over the two ranks."""
    from dtrain.data.memory import InMemoryBatches
    from dtrain.data.synthetic import default_gmm
    from dtrain.lit.common import seed_generators, train_seed
    from dtrain.lit.teacher import TeacherModule

    cfg = load_recipe(GMM, overrides)
    torch.manual_seed(cfg.seed)
    m = TeacherModule(cfg)
    o = m.configure_optimizers()
    opt, sched = o["optimizer"], o["lr_scheduler"]["scheduler"]
    x, _ = default_gmm().sample(cfg.data.num_samples, generator=torch.Generator().manual_seed(cfg.seed))
    data = [iter(InMemoryBatches({"x": x}, cfg.data.batch_size, seed=cfg.seed, rank=r, world_size=2)) for r in (0, 1)]
    rng = []
    for seed in seeds or ():
        torch.manual_seed(seed)
        rng.append(torch.get_rng_state())
    for step in range(1, steps + 1):
        opt.zero_grad()
        for r in (0, 1):
            if seeds is None:
                seed_generators(train_seed(cfg.seed, r, step - 1), torch.device("cpu"))
            else:
                torch.set_rng_state(rng[r])
            loss = m.compute_loss(next(data[r]))[0].mean() / 2
            loss.backward()
            if losses is not None and r == 0:
                losses.append(loss.item())
            elif losses is not None:
                losses[-1] += loss.item()
            if seeds is not None:
                rng[r] = torch.get_rng_state()
        torch.nn.utils.clip_grad_norm_(m.net.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        m.ema.update(m.net, step)
    return m.state_dict()


def _assert_matches(sd: dict, ref: dict, tag: str) -> None:
    assert sorted(sd) == sorted(ref)
    for k, v in ref.items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=1e-5, msg=k)
    gap = max((ref[k] - ref[f"ema.{tag}.{k[4:]}"]).abs().max().item() for k in ref if k.startswith("net."))
    assert gap > 1e-3  # the EMA is not the network: the tolerance above tells them apart


@pytest.mark.slow
@pytest.mark.timeout(330)
def test_fsdp2_trains_like_data_parallel_with_sharded_ema(dist_runs, one_thread):
    """`dtrain fit` with strategy.name=fsdp2: net and its EMA copy sharded (half per rank); the result is the
    data-parallel one, gradient clipping by the global norm included (a small optim.grad_clip makes it bite; the
    noise seeds are DiffusionModule.training_step's per-step ones)."""
    from torch.distributed.checkpoint import FileSystemReader

    from dtrain.export.checkpoint import read_checkpoint

    sharded = dist_runs / "fsdp2" / "checkpoints" / "last.ckpt"
    assert sharded.is_dir()
    meta = FileSystemReader(str(sharded)).read_metadata().state_dict_metadata
    assert len(meta["state_dict.net.inp.weight"].chunks) == 2  # each rank held half of net ...
    assert len(meta["state_dict.ema.0_99.inp.weight"].chunks) == 2  # ... and half of its EMA copy
    ckpt = read_checkpoint(sharded)  # the directory is consolidated on the way
    assert ckpt["global_step"] == 20 and ckpt["dtrain"]["ema_tags"] == ["0_99", "std0_100"]
    losses: list[float] = []
    ref = _single_process_reference([*SMALL, "trainer.max_steps=20", "optim.grad_clip=0.05", "ema.stds=[0.1]"], 20,
                                    None, losses)
    _assert_matches(ckpt["state_dict"], ref, "0_99")  # the power EMA too (its first update copies: no foreach copy
    # on DTensors)
    import csv

    with open(dist_runs / "fsdp2" / "csv" / "metrics.csv") as fh:  # every 5 steps, at Lightning's step - 1
        logged = {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(fh) if r.get("train/loss")}
    want = {s - 1: sum(losses[s - 5: s]) / 5 for s in (5, 10, 15, 20)}
    assert logged.keys() == want.keys()  # train/loss was rank 0's interval mean, not the mean over ranks
    assert all(abs(logged[k] - want[k]) < 1e-5 * want[k] for k in want), (logged, want)
    from dtrain.export.bundle import sha256_tensors
    from dtrain.export.checkpoint import load_teacher, select_weights

    shas = {tag: load_teacher(sharded, ema=tag)[1]["ref"]["sha256"] for tag in ("0_99", "raw")}
    import shutil

    from dtrain.export.zero import ZeroCheckpointError, consolidate

    half = dist_runs / "fsdp2-unfinished"
    shutil.copytree(sharded, half)
    (half / "meta.pt").unlink()  # Lightning writes it last: said "dtrain: missing: not a dtrain training checkpoint"
    with pytest.raises(ZeroCheckpointError, match=r"without its 'meta.pt', which Lightning writes last: an unfinished"):
        consolidate(half)
    assert shas["0_99"] == sha256_tensors(select_weights(ckpt, "0_99")[0]) != shas["raw"]  # a directory has no
    # file hash: its selected weights name it (the eval point cache and a student's provenance key on it)


@pytest.mark.slow
@pytest.mark.timeout(330)
def test_fsdp1_sharded_ema_matches_data_parallel_reference(dist_runs, one_thread):
    """The wrapping of strategy.name=fsdp (net and each EMA copy separate units, original parameters kept) makes
    every rank's EMA shard line up with its net shard; the sharded checkpoint consolidates to the full weights."""
    from dtrain.export.zero import consolidate

    sys.path.insert(0, str(Path(__file__).parent))
    from fsdp1_worker import OVERRIDES

    full = torch.load(dist_runs / "fsdp1" / "full.pt", weights_only=True)
    _assert_matches(full, _single_process_reference(OVERRIDES, 5, (1000, 1001)), "0_9")
    ckpt = consolidate(dist_runs / "fsdp1" / "sharded")  # FSDPStrategy's sharded layout: {"model": ...} + meta.pt
    assert ckpt["global_step"] == 5 and ckpt["dtrain"]["ema_tags"] == ["0_9"]
    assert sorted(ckpt["state_dict"]) == sorted(full)
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in full.items())


# ---- SLURM helpers (no cluster needed; tests/slurm runs the real thing) -----------------------------------------
def _env(**kw: str) -> dict[str, str]:
    base = {"SLURM_NTASKS": "8", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_ID": "1234",
            "SLURM_PROCID": "5", "SLURM_JOB_NAME": "dtrain", "SLURM_STEP_ID": "0"}  # an srun task
    return {**base, **kw}


def test_slurm_job_and_topology():
    from dtrain.dist.slurm import slurm_job, topology

    assert slurm_job({}) is None and slurm_job(_env(SLURM_JOB_NAME="bash")) is None  # not srun / interactive
    job = slurm_job(_env())
    assert (job.job_id, job.num_nodes, job.tasks_per_node, job.num_tasks, job.rank) == ("1234", 2, 4, 8, 5)
    assert slurm_job(_env(SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID="3")).job_id == "77_3"
    no_per_node = {k: v for k, v in _env().items() if k != "SLURM_NTASKS_PER_NODE"}
    assert slurm_job({**no_per_node, "SLURM_TASKS_PER_NODE": "4(x2)"}).tasks_per_node == 4
    assert topology("auto", 1, env={}) == ("auto", 1)  # not under SLURM: the recipe's
    assert topology("auto", 1, env=_env()) == (4, 2)  # dtrain fit needs no flags under srun
    assert topology(4, 2, env=_env()) == (4, 2)
    with pytest.warns(UserWarning, match=r"trainer.devices=8, trainer.num_nodes=3: the SLURM allocation has 4"):
        assert topology(8, 3, env=_env()) == (4, 2)
    from dtrain.errors import InputError

    uneven = {**no_per_node, "SLURM_NTASKS": "4", "SLURM_TASKS_PER_NODE": "3,1"}  # 3 + 1, not 3 per node
    with pytest.raises(InputError, match=r"SLURM: 4 task\(s\) spread unevenly over 2 node\(s\) \(3,1 per node\)"):
        topology("auto", 1, env=uneven)
    # sbatch --ntasks=1 over a template's --ntasks-per-node=2: said "1 task(s) spread unevenly ... (1 per node)"
    over = _env(SLURM_NTASKS="1", SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="2", SLURM_TASKS_PER_NODE="1")
    with pytest.raises(InputError, match=r"--ntasks-per-node=2 on 1 node\(s\), but the job has 1 task\(s\).*"
                                         r"overrode the template's --ntasks-per-node"):
        topology("auto", 1, env=over)
    batch = {k: v for k, v in _env().items() if k != "SLURM_STEP_ID"}  # the batch script, not an srun task: waited
    with pytest.raises(InputError, match=r"the job has 8 tasks but this process is no task of a job step .*srun"):
        topology("auto", 1, env=batch)  # 30 min for 7 ranks that never start
    # torchrun inside a job (one srun task per node, torchrun's processes per GPU) ran N single-rank trainings
    elastic = _env(SLURM_NTASKS="1", SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="1", TORCHELASTIC_RUN_ID="r",
                   LOCAL_WORLD_SIZE="2", WORLD_SIZE="2")
    with pytest.warns(UserWarning, match=r"the torchrun launch has 2 process\(es\) per node on 1 node\(s\)"):
        assert topology(1, 1, env=elastic) == (2, 1)
    assert topology("auto", 1, env={"TORCHELASTIC_RUN_ID": "r", "LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8"}) == (4, 2)


def test_sbatch_args_from_the_recipe(capsys, load_tool):
    from dtrain.dist.slurm import sbatch_args

    cpu = recipe("trainer.accelerator=cpu", "trainer.num_nodes=2")
    assert sbatch_args(cpu) == ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0"]
    gpu = recipe("trainer.devices=8", "trainer.num_nodes=4")
    assert sbatch_args(gpu) == ["--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8"]
    assert sbatch_args(gpu, nodes=1, gpus_per_node=2) == ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2"]
    with pytest.raises(ValueError, match=r"trainer\.devices is 'auto'"):
        sbatch_args(recipe())
    tool = load_tool("slurm_submit")
    assert tool.main(["--dry-run", "slurm/multi_node.sbatch", str(GMM), "trainer.devices=4", "trainer.num_nodes=3",
                      "--sbatch=--time=1:00:00 -p gpu"]) == 0
    assert capsys.readouterr().out.strip() == (f"sbatch --nodes=3 --ntasks-per-node=4 --gpus-per-node=4 "
                                               f"--time=1:00:00 -p gpu slurm/multi_node.sbatch {GMM} "
                                               f"trainer.devices=4 trainer.num_nodes=3")
    assert tool.main(["--print-args", str(GMM), "trainer.accelerator=cpu"]) == 0
    assert capsys.readouterr().out.strip() == "--nodes=1 --ntasks-per-node=1 --gpus-per-node=0"


def test_hpc_path_numbering(tmp_path):
    from dtrain.dist.slurm import hpc_path

    assert hpc_path(tmp_path).name == "hpc_ckpt_1.ckpt"
    (tmp_path / "hpc_ckpt_1.ckpt").mkdir()  # DeepSpeed writes directories
    (tmp_path / "hpc_ckpt_3.ckpt").touch()
    assert hpc_path(tmp_path).name == "hpc_ckpt_4.ckpt"


class _Signal(L.Callback):
    """Sends this process ``signum`` at the end of ``step`` (as scancel --signal=USR1 would)."""

    def __init__(self, step: int, signum: int = signal.SIGUSR1) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_requeue_saves_at_a_step_boundary_after_the_ema_and_stops(tmp_path, monkeypatch, one_thread):
    from dtrain.data import build_datamodule
    from dtrain.dist import slurm
    from dtrain.lit.teacher import TeacherModule

    calls = []
    monkeypatch.setattr(slurm, "_requeue", lambda: calls.append("requeue") or True)
    cfg = recipe("trainer.max_steps=50")
    module = TeacherModule(cfg)
    req = slurm.Preemption()
    before = signal.getsignal(signal.SIGUSR1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=50, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[req, _Signal(7)])
    trainer.fit(module, datamodule=build_datamodule(cfg.data, seed=0))
    assert calls == ["requeue"] and trainer.global_step == 7  # stopped right after the save
    assert req.saved == str(tmp_path / "hpc_ckpt_1.ckpt") and signal.getsignal(signal.SIGUSR1) == before
    ckpt = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)
    assert ckpt["global_step"] == 7
    sd = ckpt["state_dict"]
    for k, v in module.ema["0_99"].state_dict().items():  # the EMA of step 7, not step 6
        assert torch.equal(sd[f"ema.0_99.{k}"], v), k


def test_sigterm_saves_at_a_step_boundary_and_stops_without_a_requeue(tmp_path, monkeypatch, one_thread):
    """Outside SLURM (no requeue signal) SIGTERM still checkpoints at the next step and stops; Lightning's own
    SIGTERM handler (no checkpoint) is back in place after fit, and the process default after that."""
    from dtrain.data import build_datamodule
    from dtrain.dist import slurm
    from dtrain.lit.teacher import TeacherModule

    calls = []
    monkeypatch.setattr(slurm, "_requeue", lambda: calls.append("requeue") or True)
    assert [type(c) for c in slurm.callbacks()] == [slurm.Preemption] and slurm.callbacks()[0].requeue_signal is None
    cfg = recipe("trainer.max_steps=50")
    stop = slurm.Preemption(requeue_signal=None)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=50, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[stop, _Signal(4, signal.SIGTERM)])
    trainer.fit(TeacherModule(cfg), datamodule=build_datamodule(cfg.data, seed=0))
    assert calls == [] and trainer.global_step == 4 and stop.stopped_by == signal.SIGTERM
    assert torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] == 4
    assert not trainer.received_sigterm  # Lightning's handler did not run (it would stop without a checkpoint)
    assert {s: signal.getsignal(s) for s in before} == before


def test_ctrl_c_saves_at_a_step_boundary_and_a_second_one_stops_at_once(tmp_path, monkeypatch, capsys, one_thread):
    """Ctrl-C in `dtrain fit` stopped without a checkpoint (Lightning's handler): every step since the last
    periodic checkpoint was lost. Now it saves like SIGTERM and exits 130; a second Ctrl-C before the step ends
    stops at once (KeyboardInterrupt), and the handlers from before fit are back."""
    from dtrain.dist import slurm
    from dtrain.lit.fit import fit

    monkeypatch.setattr(slurm, "callbacks", lambda: [slurm.Preemption(None)])
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    over = [f"out_dir={tmp_path}", "trainer.max_steps=20", "trainer.ckpt_every_n_steps=0"]
    with pytest.raises(SystemExit) as e:
        fit(GMM, [*SMALL, *over], callbacks=[_Signal(4, signal.SIGINT)])
    assert e.value.code == 130 and {s: signal.getsignal(s) for s in before} == before
    assert torch.load(tmp_path / "teacher-gmm" / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] == 4
    err = capsys.readouterr().err
    assert "dtrain: stopped on Ctrl-C (SIGINT) at step 4 of 20; `dtrain fit ... --resume auto`" in err

    class Twice(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises((KeyboardInterrupt, SystemExit)):  # Lightning turns it into sys.exit(1)
        fit(GMM, [*SMALL, f"out_dir={tmp_path / 'b'}", "trainer.max_steps=20", "trainer.ckpt_every_n_steps=0"],
            callbacks=[Twice()])
    assert not list((tmp_path / "b" / "teacher-gmm").glob("hpc_ckpt_*"))
    assert {s: signal.getsignal(s) for s in before} == before


def test_sigterm_after_the_requeue_signal_still_requeues(tmp_path, monkeypatch, one_thread):
    from dtrain.data import build_datamodule
    from dtrain.dist import slurm
    from dtrain.lit.teacher import TeacherModule

    calls = []
    monkeypatch.setattr(slurm, "_requeue", lambda: calls.append("requeue") or True)
    cfg = recipe("trainer.max_steps=50")
    stop = slurm.Preemption()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=50, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[_Signal(3, signal.SIGUSR1), _Signal(3, signal.SIGTERM), stop])
    trainer.fit(TeacherModule(cfg), datamodule=build_datamodule(cfg.data, seed=0))
    assert calls == ["requeue"] and stop.stopped_by == signal.SIGUSR1 and trainer.global_step == 3


@pytest.mark.parametrize("requeued", [False, True])
def test_a_failed_requeue_exits_non_zero(tmp_path, monkeypatch, one_thread, requeued):
    """A requeue that fails (--no-requeue, scontrol refused) exited 0 with the run unfinished: the job looked
    COMPLETED and --dependency=afterok jobs started. Now 128 + SIGUSR1 after the checkpoint; 0 when requeued."""
    from dtrain.dist import slurm
    from dtrain.lit.fit import fit

    monkeypatch.setattr(slurm, "_requeue", lambda: requeued)
    monkeypatch.setattr(slurm, "callbacks", lambda: [slurm.Preemption(signal.SIGUSR1)])  # as under SLURM
    over = [f"out_dir={tmp_path}", "trainer.max_steps=20", "trainer.ckpt_every_n_steps=0"]
    if requeued:
        fit(GMM, [*SMALL, *over], callbacks=[_Signal(3)])
    else:
        with pytest.raises(SystemExit) as e:
            fit(GMM, [*SMALL, *over], callbacks=[_Signal(3)])
        assert e.value.code == 128 + signal.SIGUSR1
    assert torch.load(tmp_path / "teacher-gmm" / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] == 3


def test_a_signal_during_the_last_step_lets_the_run_end_normally(tmp_path, monkeypatch, one_thread):
    """SIGTERM in the last step wrote an HPC checkpoint, skipped last.ckpt (a step behind for good: a resume finds
    max_steps reached and writes nothing) and exited 143 although training had finished."""
    from dtrain.lit.fit import fit

    run = fit(GMM, [*SMALL, f"out_dir={tmp_path}", "trainer.max_steps=6", "trainer.ckpt_every_n_steps=4"],
              callbacks=[_Signal(6, signal.SIGTERM)])
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert not list(run.glob("hpc_ckpt_*"))


def test_requeue_pending_at_the_start_waits_for_a_step_boundary(tmp_path, monkeypatch, one_thread):
    """A signal already pending when training (re)starts under gradient accumulation: the checkpoint is written
    after the first optimizer step, not after the first micro-batch (mid-accumulation)."""
    from dtrain.data import build_datamodule
    from dtrain.dist import slurm
    from dtrain.lit.teacher import TeacherModule

    monkeypatch.setattr(slurm, "_requeue", lambda: True)

    class Early(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                os.kill(os.getpid(), signal.SIGUSR1)

    cfg = recipe("trainer.max_steps=5")
    seen = []

    class Micro(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(batch_idx)

    req = slurm.Preemption()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=5, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path), accumulate_grad_batches=2,
                        callbacks=[req, Early(), Micro()])
    trainer.fit(TeacherModule(cfg), datamodule=build_datamodule(cfg.data, seed=0))
    assert torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] == 1
    assert seen == [0, 1] and trainer.global_step == 1


def test_a_stop_before_max_steps_leaves_the_end_sweep_to_the_last_job(monkeypatch):
    """FIDSweepCallback's sweep at the end of training runs when the run is done, not when a SLURM requeue stops
    it early (inside the --signal grace time; the requeued job reaches the end and sweeps then)."""
    from types import SimpleNamespace

    from dtrain.lit.eval_callback import FIDSweepCallback

    cb = FIDSweepCallback(["ddim:1"], every_n_steps=0, ref_stats="digits:train")
    ran = []
    monkeypatch.setattr(cb, "run", lambda trainer, module, step: ran.append(step))
    cb.on_train_end(SimpleNamespace(global_step=300, max_steps=1000), None)
    assert ran == []
    cb.on_train_end(SimpleNamespace(global_step=1000, max_steps=1000), None)
    cb.on_train_end(SimpleNamespace(global_step=40, max_steps=-1), None)  # epoch-bounded runs: at their end
    assert ran == [1000, 40]


RACE = """
import json, os, signal, sys, types
import torch, torch.distributed as dist
from dtrain.dist import slurm

dist.init_process_group("gloo")
rank = dist.get_rank()
calls = []
slurm._requeue = lambda: calls.append("requeue") or True
class Strategy:
    root_device = torch.device("cpu")
    def reduce(self, t, reduce_op):  # the flag goes over a gloo group in host memory, never the device's
        raise AssertionError("reduced on the training device: a GPU sync every step")
    def broadcast(self, obj, src=0):
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]
stop = slurm.Preemption(signal.SIGUSR1)
stop.received = {0: None, 1: int(sys.argv[2])}[rank] if len(sys.argv) > 2 else None
if rank == 0 and len(sys.argv) > 3:
    stop.received = int(sys.argv[3])
trainer = types.SimpleNamespace(global_step=1, max_steps=100, world_size=2, strategy=Strategy(),
                                default_root_dir=sys.argv[1],
                                is_global_zero=rank == 0, save_checkpoint=lambda path, **kw: None, should_stop=False)
stop.on_train_batch_end(trainer, None, None, None, 0)
dist.barrier()
groups = len(dist.distributed_c10d._world.pg_map)
stop.teardown(trainer, None, "fit")  # the flag's gloo group goes with the fit
closed = [groups - len(dist.distributed_c10d._world.pg_map)]
from dtrain.cli import _close_process_groups
_close_process_groups()  # and every group before the process exits (dtrain.cli.main)
closed.append(dist.is_initialized())
json.dump({"stopped_by": stop.stopped_by, "calls": calls, "stop": trainer.should_stop, "requeued": stop.requeued,
           "closed": closed}, open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w"))
"""


@pytest.mark.parametrize("signals, want", [((signal.SIGUSR1,), signal.SIGUSR1),
                                           ((signal.SIGTERM, signal.SIGUSR1), signal.SIGUSR1)])
def test_ranks_agree_on_the_signal_when_it_reaches_them_apart(tmp_path, signals, want):
    """SLURM's USR1 reached rank 1 but not yet rank 0 (or rank 0 got SIGTERM meanwhile): both ranks stop with the
    requeue signal and rank 0 requeues (judged from rank 0's flag alone, the job would end with 143 and no
    requeue)."""
    import json
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path), *map(str, map(int, signals))],
                                      env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    out = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [o["stopped_by"] for o in out] == [int(want)] * 2 and all(o["stop"] for o in out)
    assert out[0]["calls"] == ["requeue"] and out[1]["calls"] == []
    assert all(o["requeued"] for o in out)  # rank 0's scontrol result, broadcast (a failure exits non-zero)
    # groups left to the interpreter's exit aborted a rank in gloo's teardown once (a finished SLURM job FAILED)
    assert all(o["closed"] == [1, False] for o in out), out


def test_signal_handlers_are_restored_after_a_failed_fit(tmp_path, one_thread):
    """An exception mid-fit: SIGUSR1 and SIGTERM are the handlers from before fit again (Lightning's teardown
    restores what it found at registration, which was the callback's setup-time SIGUSR1 handler)."""
    from dtrain.data import build_datamodule
    from dtrain.dist import slurm
    from dtrain.lit.teacher import TeacherModule

    class Boom(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                raise RuntimeError("boom")

    cfg = recipe("trainer.max_steps=50")
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=50, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[slurm.Preemption(), Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(TeacherModule(cfg), datamodule=build_datamodule(cfg.data, seed=0))
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.skipif(tuple(map(int, torch.__version__.split(".")[:2])) < (2, 7), reason="fsdp2 on the CPU: torch >= 2.7")
def test_fsdp2_shards_a_channels_last_network(tmp_path, one_thread):
    """Every GPU recipe sets trainer.channels_last, and fsdp2 failed at its first step: "FSDP does not support
    non-contiguous parameters yet". The weights are made contiguous before sharding (as for DeepSpeed)."""
    from dtrain.lit.fit import fit

    run = fit(ROOT / "recipes" / "teacher" / "digits.yaml",
              ["trainer.channels_last=true", "trainer.devices=1", "trainer.accelerator=cpu", "strategy.name=fsdp2",
               "trainer.max_steps=2", "trainer.sample_every_n_steps=0", "logger.mode=disabled", "optim.impl=auto",
               "trainer.progress_bar=false", "model.channels=8", "data.batch_size=16", f"out_dir={tmp_path}"])
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


def test_a_signal_stop_logs_its_own_last_interval(tmp_path, one_thread):
    """Lightning writes the logged values again when a run stops (its should_update_logs): a SIGTERM at step 15 of
    10-step intervals wrote the step-9 row a second time (step 14), and the interval 10-15 was lost."""
    import csv

    from dtrain.lit.fit import fit

    with pytest.raises(SystemExit):
        fit(GMM, [*SMALL, f"out_dir={tmp_path}", "trainer.max_steps=40", "trainer.log_every_n_steps=10",
                  "logger.mode=disabled", "trainer.progress_bar=false"], callbacks=[_Signal(15, signal.SIGTERM)])
    rows = [r for r in csv.DictReader(open(tmp_path / "teacher-gmm" / "csv" / "metrics.csv")) if r.get("train/loss")]
    assert [r["step"] for r in rows] == ["9", "14"]
    assert rows[1]["train/loss"] != rows[0]["train/loss"] and rows[1]["perf/steps_per_s"] != rows[0]["perf/steps_per_s"]


def test_under_slurm_lightnings_own_requeue_handler_stays_off(monkeypatch):
    """Under SLURM the environment plugin is SLURMEnvironment(auto_requeue=False): Lightning's signal handler would
    requeue alongside dtrain's Preemption (two requeues, or one without a checkpoint); outside SLURM, no plugin."""
    from dtrain.dist import slurm

    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    assert slurm.plugins() == []
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    (env,) = slurm.plugins()
    assert type(env).__name__ == "SLURMEnvironment" and env.auto_requeue is False
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "r")
    assert slurm.plugins() == []  # torchrun's ranks (Lightning's TorchElasticEnvironment), not SLURM's

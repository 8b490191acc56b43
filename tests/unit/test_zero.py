"""DeepSpeed ZeRO-1, ZeRO-2 and ZeRO-3 on CPU, 2 gloo ranks, bf16 (raw ``deepspeed.initialize`` with the config
``dtrain.dist.strategy`` builds; Lightning's DeepSpeedStrategy refuses CPU, tests/gpu runs it).

The sharded checkpoint consolidates (``dtrain.export.zero``, weights_only reads, no DeepSpeed import) into a
format-1 checkpoint that equals DeepSpeed's own ``zero_to_fp32`` tensor for tensor, loads into the model and
samples exactly what the in-run model sampled; the EMA kept in fp32 shards equals the EMA recurrence over the
fp32 master weights; a resume restores those shards exactly; export and tools/convert_ckpt.py take the directory.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("zero_worker.py")
STEPS = 6
pytestmark = [pytest.mark.timeout(420), pytest.mark.slow]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    """The three stages at once (6 processes): {stage: output directory}."""
    procs, out = [], {}
    for stage in (1, 2, 3):
        d = tmp_path_factory.mktemp(f"zero{stage}")
        out[stage], port = d, _port()
        for rank in range(2):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            log = open(d / f"rank{rank}.log", "w")
            procs.append((subprocess.Popen([sys.executable, str(WORKER), str(d), str(stage), "bf16-mixed", str(STEPS)],
                                           env=env, stdout=log, stderr=subprocess.STDOUT), log, d, rank))
    try:
        for p, log, d, rank in procs:
            rc = p.wait(timeout=360)
            log.close()
            assert rc == 0, f"rank {rank} ({d.name}) failed:\n" + (d / f"rank{rank}.log").read_text()[-3000:]
    finally:
        for p, log, *_ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])  # stage 1 keeps the EMA (frozen) only in the module state: it was lost
def test_consolidated_checkpoint_loads_and_samples_like_the_run(runs, stage):
    from dtrain.export.checkpoint import read_checkpoint
    from dtrain.lit.common import module_class

    ckpt = read_checkpoint(runs[stage] / "ckpt")  # a directory: consolidated on the way
    inrun = torch.load(runs[stage] / "inrun.pt", weights_only=True)
    sd = ckpt["state_dict"]
    assert ckpt["global_step"] == STEPS and ckpt["dtrain"]["kind"] == "teacher" and "dtrain_sharded" not in ckpt
    assert sorted(sd) == sorted(inrun["weights"]) and all(v.dtype == torch.float32 for v in sd.values())
    tags = ckpt["dtrain"]["ema_tags"]
    assert tags == ["0_9"] and {k.split(".")[0] for k in sd} == {"net", "ema"}
    for k, v in sd.items():
        assert torch.equal(v, inrun["weights"][k]), k
    recipe = ckpt["dtrain"]["recipe"]
    module = module_class(recipe["method"]["name"])(recipe)
    module.load_state_dict(sd)  # strict: exactly the network's and the EMA's tensors
    for ema, want in inrun["samples"].items():
        got = module.sample(256, nfe=8, ema=None if ema == "None" else ema, generator=torch.Generator().manual_seed(7))
        assert torch.equal(got, want), f"EMA {ema}: max diff {(got - want).abs().max()}"


@pytest.mark.parametrize("stage", [2, 3])
def test_consolidation_equals_deepspeeds_zero_to_fp32(runs, stage):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from dtrain.export.zero import consolidate

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ref = get_fp32_state_dict_from_zero_checkpoint(str(runs[stage] / "ckpt"))
    ours = consolidate(runs[stage] / "ckpt")["state_dict"]
    assert sorted(ours) == sorted(ref)
    for k, v in ref.items():
        assert torch.equal(ours[k], v.contiguous().float()), k


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_sharded_ema_is_the_ema_of_the_fp32_master_weights(runs, stage):
    """EMA_0 = net_0, EMA_s = lerp(EMA_{s-1}, net_s, 1 - 0.9) over the fp32 master weights after every step (as
    DeepSpeed makes them: from its bf16 cast of the initial weights): what the rank-local fp32 shards (stage 3) /
    full fp32 copies (stage 2) hold, in the consolidated checkpoint."""
    from dtrain.export.zero import consolidate

    hist = torch.load(runs[stage] / "inrun.pt", weights_only=True)["history"]
    sd = consolidate(runs[stage] / "ckpt")["state_dict"]
    assert len(hist) == STEPS + 1
    ema = {k: v.clone() for k, v in hist[0].items()}
    for w in hist[1:]:
        for k in ema:
            ema[k].lerp_(w[k], 1 - 0.9)
    for k, v in ema.items():
        torch.testing.assert_close(sd[f"ema.0_9.{k}"], v, rtol=0, atol=1e-6)
        torch.testing.assert_close(sd[f"net.{k}"], hist[-1][k], rtol=0, atol=0)
    moved = max((hist[-1][k] - hist[0][k]).abs().max().item() for k in ema)
    assert moved > 1e-3  # the weights (so the EMA) moved far more than the tolerance


def test_stages_agree(runs):
    """ZeRO-2 and ZeRO-3 train the same model on the same data: equal up to reduction order and bf16 compute."""
    h2 = torch.load(runs[2] / "inrun.pt", weights_only=True)["history"][-1]
    h3 = torch.load(runs[3] / "inrun.pt", weights_only=True)["history"][-1]
    h0 = torch.load(runs[2] / "inrun.pt", weights_only=True)["history"][0]
    moved = max((h2[k] - h0[k]).abs().max().item() for k in h2)
    diff = max((h2[k] - h3[k]).abs().max().item() for k in h2)
    assert diff < 0.02 * moved, (diff, moved)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_restores_the_fp32_ema_exactly(runs, stage):
    assert torch.load(runs[stage] / "inrun.pt", weights_only=True)["restored"] is True


def test_export_and_convert_take_the_directory(runs, tmp_path):
    from dtrain.export.bundle import load_bundle
    from dtrain.export.checkpoint import export_checkpoint, read_checkpoint

    d = runs[3] / "ckpt"
    bundle = load_bundle(export_checkpoint(d, tmp_path / "bundle"))
    inrun = torch.load(runs[3] / "inrun.pt", weights_only=True)
    assert torch.equal(bundle.denoiser.net.state_dict()["inp.weight"], inrun["weights"]["ema.0_9.inp.weight"])
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_ckpt.py"), str(d), str(tmp_path / "x.ckpt")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    single, consolidated = read_checkpoint(tmp_path / "x.ckpt"), read_checkpoint(d)
    assert single["global_step"] == STEPS and single["dtrain"] == consolidated["dtrain"]
    assert all(torch.equal(single["state_dict"][k], v) for k, v in consolidated["state_dict"].items())
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_ckpt.py"), str(tmp_path), str(tmp_path / "y")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a sharded (DeepSpeed / FSDP) checkpoint directory" in r.stderr


def test_unsaved_prefixes_are_dropped_and_bad_directories_named(runs, tmp_path):
    from dtrain.export.checkpoint import CheckpointError
    from dtrain.export.zero import consolidate

    d = tmp_path / "ckpt"
    shutil.copytree(runs[2] / "ckpt", d)
    f = d / "checkpoint" / "mp_rank_00_model_states.pt"
    states = torch.load(f, weights_only=True)
    states["dtrain_sharded"]["unsaved_prefixes"] = ["ema."]  # as a student marks its teacher
    torch.save(states, f)
    assert {k.split(".")[0] for k in consolidate(d)["state_dict"]} == {"net"}
    (d / "checkpoint" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match="the optimizer states say 2 ranks but 1 files"):
        consolidate(d)
    with pytest.raises(CheckpointError, match="not a directory"):
        consolidate(f)


def test_an_unfinished_save_is_refused_and_a_tag_directory_read_through_latest(runs, tmp_path):
    """A directory without ``latest`` (DeepSpeed writes it last; StepCheckpoint removes it before rewriting
    last.ckpt/ in place) was consolidated from whatever shards were there, old and new mixed."""
    from dtrain.export.checkpoint import CheckpointError, export_checkpoint, read_kind
    from dtrain.export.zero import consolidate

    d = tmp_path / "ckpt"
    shutil.copytree(runs[2] / "ckpt", d)
    want = consolidate(d)["state_dict"]
    got = consolidate(d / "checkpoint")["state_dict"]  # the tag directory itself: its parent's latest names it
    assert all(torch.equal(got[k], v) for k, v in want.items())
    (d / "latest").write_text("other")
    with pytest.raises(CheckpointError, match=r"'latest' names tag 'other', which is not a directory here"):
        consolidate(d)
    (d / "latest").unlink()
    for call in (lambda: consolidate(d), lambda: consolidate(d / "checkpoint"), lambda: read_kind(d),
                 lambda: export_checkpoint(d, tmp_path / "bundle")):
        with pytest.raises(CheckpointError, match=r"without its 'latest' file, which DeepSpeed writes last: an "
                                                  r"unfinished save .*echo checkpoint >"):
            call()
    assert not (tmp_path / "bundle").exists()


def test_a_sharded_teachers_metadata_is_read_without_consolidating(runs, tmp_path):
    """read_kind / read_model_section / read_schedule said None for a directory, so the checks before a run skipped
    a sharded teacher: CD trained on a consistency student's directory."""
    from dtrain.export.checkpoint import read_checkpoint, read_kind, read_model_section, read_schedule
    from dtrain.export.zero import sharded_meta

    d = tmp_path / "ckpt"
    shutil.copytree(runs[2] / "ckpt", d)
    full = read_checkpoint(d)
    assert sharded_meta(d)["dtrain"] == full["dtrain"] and sharded_meta(d)["global_step"] == STEPS
    assert read_kind(d) == "denoiser" and read_model_section(d) == full["dtrain"]["recipe"]["model"]
    assert read_schedule(d)["name"] == full["dtrain"]["recipe"]["schedule"]["name"]
    f = d / "checkpoint" / "mp_rank_00_model_states.pt"
    states = torch.load(f, weights_only=True)
    states["dtrain"]["kind"] = "ct"
    torch.save(states, f)
    assert read_kind(d) == "consistency"


@pytest.mark.parametrize("stage, shard", [(2, "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"),
                                          (3, "zero_pp_rank_1_mp_rank_00_model_states.pt")])
def test_a_resume_checks_a_deepspeed_directory_and_skips_one_with_a_shard_cut_short(runs, tmp_path, caplog, stage,
                                                                                    shard):
    """--resume took a DeepSpeed directory unchecked: another optim.lr was accepted silently, another network failed
    in DeepSpeed's load, and a directory with a truncated shard was picked. Its client state is checked against the
    recipe like a file's, and one with a rank's file cut short is skipped, naming the file."""
    import logging

    from dtrain.export.checkpoint import CheckpointError
    from dtrain.export.zero import sharded_meta
    from dtrain.lit.checkpointing import resume_path

    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    shutil.copytree(runs[stage] / "ckpt", last)
    recipe = sharded_meta(last)["dtrain"]["recipe"]
    assert resume_path(run, "auto", recipe=recipe) == last
    with pytest.raises(CheckpointError, match=r"last\.ckpt: --resume: optim\.lr 0\.01 \(now 0\.5\)"):
        resume_path(run, "auto", recipe={**recipe, "optim": {**recipe["optim"], "lr": 0.5}})
    with pytest.raises(CheckpointError, match=r"network differs from the recipe's: model\.hidden 32 \(now 64\)"):
        resume_path(run, "auto", recipe={**recipe, "model": {**recipe["model"], "hidden": 64}})
    shutil.copytree(last, run / "checkpoints" / "step0000006.ckpt")  # as old as last.ckpt, which wins the tie
    f = last / "checkpoint" / shard
    os.truncate(f, f.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="dtrain.checkpoint"):
        assert resume_path(run, "auto", recipe=recipe) == run / "checkpoints" / "step0000006.ckpt"
    assert f"skipping {f}: not a whole torch file (truncated?)" in caplog.text


CHANNELS_LAST = '''
import os, sys, torch
import deepspeed, deepspeed.ops
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
from dtrain.config import load_recipe
from dtrain.dist.strategy import deepspeed_config, dense_weights
from dtrain.lit.teacher import TeacherModule
cfg = load_recipe(sys.argv[1], ["strategy.name=deepspeed", "model.channels=8", "model.num_heads=1",
                                "model.resolution=8", "model.channel_mult=[1,2]", "model.attn_resolutions=[4]",
                                "data.size=8", "trainer.channels_last=true", "logger.mode=disabled"])
deepspeed.init_distributed("gloo")
for fix in (False, True):
    m = TeacherModule(cfg)
    if fix:
        dense_weights(m)
    opt = m.configure_optimizers()["optimizer"]
    try:
        deepspeed.initialize(model=m, optimizer=opt, model_parameters=list(m.net.parameters()),
                             config=deepspeed_config(cfg, standalone=True))
        print("fixed" if fix else "unfixed", "initialized", flush=True)
    except RuntimeError as e:
        print("fixed" if fix else "unfixed", "failed:", e, flush=True)
'''


def test_channels_last_weights_pass_deepspeed_initialize(tmp_path):
    """``deepspeed.initialize`` reads every weight as bytes, which a channels_last conv weight refuses (a recipe
    with ``trainer.channels_last: true`` failed under ``strategy.name=deepspeed``); the DeepSpeed strategy makes
    the weights contiguous first (``dense_weights``)."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_port()), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", CHANNELS_LAST, str(ROOT / "recipes" / "teacher" / "patches.yaml")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert "unfixed failed: self.stride(-1) must be 1" in r.stdout, r.stdout + r.stderr[-3000:]
    assert "fixed initialized" in r.stdout, r.stdout + r.stderr[-3000:]



# ---------------------------------------------------------------------------------------------
# Synthetic DeepSpeed layouts (no training run): known fp32 values in, the same values out


def _ds_checkpoint(d: Path, stage: int, shapes: dict, flats: list, *, pads=None, model_ranks=None,
                   **model_states) -> Path:
    """A DeepSpeed checkpoint directory (``latest`` naming the tag directory ``checkpoint``) as ``consolidate``
    reads it: one parameter group with ``shapes``, rank r's fp32
    partition ``flats[r]``, stage 1/2 ``param_alignment_paddings`` ``pads``; stage 3 writes one model-states file
    per rank in ``model_ranks`` (default: every rank)."""
    d.mkdir()
    (d / "latest").write_text("checkpoint")
    d = d / "checkpoint"
    d.mkdir()
    states = {"module": {}, "buffer_names": [], "param_shapes": [{k: torch.Size(s) for k, s in shapes.items()}],
              "global_step": 3, **model_states}
    for r in (range(len(flats)) if model_ranks is None else model_ranks) if stage == 3 else [None]:
        torch.save(states, d / ("mp_rank_00_model_states.pt" if r is None else
                                f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"))
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    for r, flat in enumerate(flats):
        opt = {"zero_stage": stage, "partition_count": [len(flats)], key: [torch.tensor(flat)]}
        if pads is not None:
            opt["param_alignment_paddings"] = pads
        torch.save({"optimizer_state_dict": opt}, d / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    return d.parent


def test_zero2_alignment_padding_between_parameters_is_skipped(tmp_path):
    """ZeRO-1/2 pads each fp32 parameter but a group's last to an alignment (param_alignment_paddings): the
    parameters after a padded one are read past its padding, not shifted into it (silently wrong weights)."""
    from dtrain.export.zero import consolidate

    # group [a0 a1 pad pad | b0 b1 b2 pad] split over 2 ranks; net.a (2 values) is padded by 2
    d = _ds_checkpoint(tmp_path / "ckpt", 2, {"net.a": [2], "net.b": [3]}, [[1.0, 2.0, 0.0, 0.0], [3.0, 4.0, 5.0, 0.0]],
                       pads=[[2, 0]])
    ckpt = consolidate(d)
    assert ckpt["global_step"] == 3
    assert ckpt["state_dict"]["net.a"].tolist() == [1.0, 2.0]
    assert ckpt["state_dict"]["net.b"].tolist() == [3.0, 4.0, 5.0]


def test_zero3_missing_rank_file_is_named(tmp_path):
    """A stage-3 checkpoint missing a rank's model-states file (ranks 0 and 2 of 2) is refused naming the ranks,
    not consolidated from whichever files are there."""
    from dtrain.export.zero import ZeroCheckpointError, consolidate

    d = _ds_checkpoint(tmp_path / "ckpt", 3, {"net.a": [2]}, [[1.0], [2.0]], model_ranks=[0, 2])
    with pytest.raises(ZeroCheckpointError, match=r"model-states files for ranks \[0, 2\]: some are missing"):
        consolidate(d)


def test_zero_shared_parameters_are_copied_from_their_target(tmp_path):
    """A tied parameter (DeepSpeed's shared_params: stored once, under its target) is in the consolidated state
    dict with its target's values, so the checkpoint loads strictly."""
    from dtrain.export.zero import consolidate

    # stage 3 over 2 ranks: net.a = [1, 2] split as [1] | [2]
    d = _ds_checkpoint(tmp_path / "ckpt", 3, {"net.a": [2]}, [[1.0], [2.0]], shared_params={"net.b": "net.a"})
    sd = consolidate(d)["state_dict"]
    assert sorted(sd) == ["net.a", "net.b"]
    assert sd["net.b"].tolist() == sd["net.a"].tolist() == [1.0, 2.0]


def test_an_ema_copy_missing_tensors_is_not_consolidated(tmp_path):
    """A checkpoint whose EMA copy lost tensors on the way (ZeRO-1's, before stage 1 read them from the module
    state) is refused naming a missing tensor: convert_ckpt wrote such a file, which nothing could load."""
    from dtrain.export.checkpoint import CheckpointError
    from dtrain.export.zero import consolidate

    d = _ds_checkpoint(tmp_path / "ckpt", 2, {"net.a": [2], "net.b": [2]}, [[1.0, 2.0], [3.0, 4.0]],
                       dtrain={"ema_tags": ["0_9"]})
    with pytest.raises(CheckpointError, match=r"state_dict\.ema\.0_9\.a: missing from EMA '0_9' \(2 tensors\)"):
        consolidate(d)

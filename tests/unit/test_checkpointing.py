"""Atomic checkpoints and resume from the newest readable one (dtrain.lit.checkpointing): a writer SIGKILLed
mid-write never leaves a partial file under the checkpoint's name; truncated checkpoints are named in the log and
skipped, and `dtrain fit --resume last` continues from the previous good one to the uninterrupted run's weights."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from dtrain.cli import main
from dtrain.export.checkpoint import CheckpointError
from dtrain.lit.checkpointing import AtomicCheckpointIO, atomic_save, probe_checkpoint, remove_stale_temps, resume_path

REPO = Path(__file__).resolve().parents[2]
GMM = REPO / "recipes" / "teacher" / "gmm.yaml"
SMALL = ["model.hidden=16", "model.depth=1", "data.batch_size=32", "data.num_samples=1024", "trainer.cpu_threads=1",
         "trainer.progress_bar=false", "logger.mode=disabled", "trainer.ckpt_every_n_steps=2"]

WRITER = textwrap.dedent("""
    import sys, torch
    from dtrain.lit.checkpointing import atomic_save
    path, i = sys.argv[1], 0
    while True:  # ever new versions, 8 MB each, until killed
        i += 1
        atomic_save({"state_dict": {"w": torch.full((2_000_000,), float(i))}, "global_step": i}, path)
        print(i, flush=True)
""")


def test_sigkill_mid_write_leaves_the_previous_file(tmp_path):
    """Kill a process that rewrites an 8 MB checkpoint in a loop at random moments: the file under the name is
    always a complete version; the interrupted write is a hidden temp file that resume removes."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip()  # one full version written
        time.sleep(random.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        ck = torch.load(path, weights_only=True)
        assert bool((ck["state_dict"]["w"] == float(ck["global_step"])).all())
    assert resume_path(tmp_path, "last") == path
    remove_stale_temps(tmp_path)  # (dtrain fit, holding the run folder)
    assert not list(path.parent.glob(".*tmp*"))  # stale temp files removed


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.ckpt"
    atomic_save({"v": 1}, path)

    def half_then_fail(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"v": 2}, path)
    assert torch.load(path, weights_only=True) == {"v": 1} and sorted(os.listdir(tmp_path)) == ["a.ckpt"]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_checkpoints_are_skipped_and_named(tmp_path, caplog, one_thread):
    """Checkpoints at steps 2, 4, 6 (+ last = 6); last.ckpt and step 6 truncated: `--resume last` names both, uses
    step 4 and ends at step 6 with the weights of the uninterrupted run."""
    assert main(["fit", str(GMM), *SMALL, f"out_dir={tmp_path / 'a'}", "trainer.max_steps=6"]) == 0
    run = tmp_path / "a" / "teacher-gmm"
    ref = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert not list(run.rglob(".*tmp*"))
    _truncate(run / "checkpoints" / "last.ckpt")
    _truncate(run / "checkpoints" / "step0000006.ckpt")
    with pytest.raises(CheckpointError, match="unreadable"):
        probe_checkpoint(run / "checkpoints" / "last.ckpt")
    with caplog.at_level(logging.WARNING, logger="dtrain.checkpoint"):
        assert resume_path(run, "last") == run / "checkpoints" / "step0000004.ckpt"
        assert main(["fit", str(GMM), *SMALL, f"out_dir={tmp_path / 'a'}", "trainer.max_steps=6", "--resume",
                     "last"]) == 0
    log = caplog.text
    assert f"skipping {run / 'checkpoints' / 'last.ckpt'}: unreadable (truncated or corrupt?)" in log
    assert f"skipping {run / 'checkpoints' / 'step0000006.ckpt'}" in log and "step0000004.ckpt (step 4)" in log
    out = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert out["global_step"] == 6
    for k, v in ref["state_dict"].items():
        assert torch.equal(v, out["state_dict"][k]), k


def test_explicit_truncated_checkpoint_fails_naming_it(tmp_path, capsys):
    bad = tmp_path / "x.ckpt"
    atomic_save({"state_dict": {}, "global_step": 3}, bad)
    assert probe_checkpoint(bad) == 3
    _truncate(bad)
    assert main(["fit", str(GMM), *SMALL, f"out_dir={tmp_path}", "--resume", str(bad)]) == 2
    assert f"dtrain fit: {bad}: --resume: unreadable (truncated or corrupt?)" in capsys.readouterr().err


def test_auto_starts_fresh_without_checkpoints(tmp_path):
    assert resume_path(tmp_path, "auto") is None
    with pytest.raises(FileNotFoundError, match="--resume: checkpoint not found"):
        resume_path(tmp_path, "last")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):  # never a silent restart from scratch
        resume_path(tmp_path, "auto")


def test_candidates_are_newest_first_and_last_wins_a_tie(tmp_path):
    """A filesystem with coarse timestamps gives a step file and the last.ckpt written after it one mtime: last.ckpt
    (the newer) comes first; an hpc_ckpt newer than both comes before them."""
    from dtrain.lit.checkpointing import checkpoint_candidates

    ck = tmp_path / "checkpoints"
    ck.mkdir()
    for name in ("step0000004.ckpt", "last.ckpt", "step0000002.ckpt"):
        atomic_save({"state_dict": {}, "global_step": 1}, ck / name)
    for name, t in (("step0000002.ckpt", 100), ("step0000004.ckpt", 200), ("last.ckpt", 200)):
        os.utime(ck / name, ns=(t * 10**9, t * 10**9))
    assert [p.name for p in checkpoint_candidates(tmp_path)] == ["last.ckpt", "step0000004.ckpt", "step0000002.ckpt"]
    atomic_save({"state_dict": {}, "global_step": 1}, tmp_path / "hpc_ckpt_1.ckpt")
    os.utime(tmp_path / "hpc_ckpt_1.ckpt", ns=(300 * 10**9, 300 * 10**9))
    assert checkpoint_candidates(tmp_path)[0] == tmp_path / "hpc_ckpt_1.ckpt"


def test_trainer_writes_through_atomic_io(tmp_path):
    from dtrain.config import load_recipe
    from dtrain.lit.fit import build_trainer

    trainer = build_trainer(load_recipe(GMM, [*SMALL, "trainer.max_steps=1"]), tmp_path)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_resume_warns_where_in_memory_data_cannot_find_its_place(digits_teacher):
    """In-memory data resumes at global_step x accumulate batches of the recipe's size and order: a change of batch
    size, seed or accumulation is named in a warning; the same recipe resumes silently."""
    import warnings

    from dtrain.lit.checkpointing import check_resume

    ck = torch.load(digits_teacher, map_location="cpu", weights_only=True)
    recipe = ck["dtrain"]["recipe"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_resume(digits_teacher, ck, recipe)
    changed = {**recipe, "seed": 7, "data": {**recipe["data"], "batch_size": 8}}
    with pytest.warns(UserWarning, match=r"resume: data\.batch_size 32 -> 8, seed 0 -> 7: in-memory data restarts"):
        check_resume(digits_teacher, ck, changed)


def test_a_resume_below_the_checkpoints_step_is_refused(digits_teacher):
    """trainer.max_steps below the checkpoint's step: the resume exited 0 having trained nothing (and rewrote
    recipe.yaml with the smaller value); equal is a finished run's requeue and passes."""
    from dtrain.export.checkpoint import CheckpointError
    from dtrain.lit.checkpointing import check_resume

    ck = torch.load(digits_teacher, map_location="cpu", weights_only=True)
    recipe = ck["dtrain"]["recipe"]
    assert ck["global_step"] == recipe["trainer"]["max_steps"] == 4
    check_resume(digits_teacher, ck, recipe)
    with pytest.raises(CheckpointError, match=r"trainer\.max_steps: 3, but the checkpoint is at step 4 already"):
        check_resume(digits_teacher, ck, {**recipe, "trainer": {**recipe["trainer"], "max_steps": 3}})


def test_checkpoints_and_bundles_record_the_source_commit(digits_teacher, digits_bundle):
    """provenance.git_commit: the commit of the dtrain source that trained (``-dirty`` with uncommitted changes),
    in the checkpoint and in its bundle."""
    import json

    import dtrain
    from dtrain.export.checkpoint import git_commit

    src = Path(dtrain.__file__).parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("dtrain does not run from a git checkout here")
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src, capture_output=True,
                           text=True).stdout.strip()
    assert git_commit() == head.stdout.strip() + ("-dirty" if dirty else "")
    ck = torch.load(digits_teacher, map_location="cpu", weights_only=True)
    info = json.loads((digits_bundle / "dtrain.json").read_text())
    assert ck["dtrain"]["git_commit"] == info["provenance"]["git_commit"] == git_commit()


def test_keep_checkpoints_keeps_the_newest_periodic_ones_across_a_resume(tmp_path):
    """trainer.keep_checkpoints=2: only the two newest step checkpoints stay (and last.ckpt), also after a resume
    (the kept list is restored from the checkpoint and pruned further); 0 keeps all; negative is refused."""
    from dtrain.config import RecipeError, load_recipe
    from dtrain.lit.fit import fit

    common = [*SMALL, f"out_dir={tmp_path}", "trainer.ckpt_every_n_steps=2", "trainer.keep_checkpoints=2"]
    run = fit(GMM, [*common, "trainer.max_steps=7"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step0000004.ckpt",
                                                                       "step0000006.ckpt"]
    fit(GMM, [*common, "trainer.max_steps=12"], resume="auto")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step0000010.ckpt",
                                                                       "step0000012.ckpt"]
    every = fit(GMM, [*SMALL, f"out_dir={tmp_path / 'all'}", "trainer.ckpt_every_n_steps=2", "trainer.max_steps=6"])
    assert len(list((every / "checkpoints").glob("step*.ckpt"))) == 3
    # switched on at a resume (the disk filled up): the earlier job's files go too, last.ckpt is the newest
    fit(GMM, [*SMALL, f"out_dir={tmp_path / 'all'}", "trainer.ckpt_every_n_steps=2", "trainer.max_steps=12",
              "trainer.keep_checkpoints=2"], resume="auto")
    assert sorted(p.name for p in (every / "checkpoints").iterdir()) == ["last.ckpt", "step0000010.ckpt",
                                                                         "step0000012.ckpt"]
    assert torch.load(every / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12
    with pytest.raises(RecipeError, match=r"trainer\.keep_checkpoints: must be >= 0"):
        load_recipe(GMM, ["trainer.keep_checkpoints=-1"])


def test_keep_checkpoints_drops_a_signal_checkpoint_once_a_newer_periodic_one_exists(tmp_path):
    """SIGTERM at step 3 -> hpc_ckpt_1.ckpt (exit 143); the resumed run (keep_checkpoints=2) writes step 4 and
    the signal checkpoint goes; without keep_checkpoints it stays."""
    import lightning as L

    from dtrain.lit.fit import fit

    class Term(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    for keep, stays in ((2, False), (0, True)):
        common = [*SMALL, f"out_dir={tmp_path / str(keep)}", "trainer.ckpt_every_n_steps=4",
                  f"trainer.keep_checkpoints={keep}", "trainer.max_steps=6"]
        with pytest.raises(SystemExit) as stop:
            fit(GMM, common, callbacks=[Term()])
        run = tmp_path / str(keep) / "teacher-gmm"
        assert stop.value.code == 143 and (run / "hpc_ckpt_1.ckpt").is_file()
        fit(GMM, common, resume="auto")
        assert (run / "hpc_ckpt_1.ckpt").exists() == stays
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_a_fresh_start_in_a_run_directory_with_checkpoints_is_refused(tmp_path, capsys):
    """It used to warn and train beside them: last.ckpt, the file users export and hand on as a teacher, stayed the
    earlier run's (the new one was last-v1.ckpt). Now it is refused, also by --dry-run, naming the way on."""
    from dtrain.cli import main
    from dtrain.errors import InputError
    from dtrain.lit.fit import fit

    common = [*SMALL, f"out_dir={tmp_path}", "trainer.max_steps=2"]
    run = fit(GMM, common)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    for dry in (False, True):
        with pytest.raises(InputError, match=r"already holds checkpoints of an earlier run \(newest: "
                                             r"checkpoints/last\.ckpt\); --resume auto continues it; to start afresh"):
            fit(GMM, common, dry_run=dry)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    fit(GMM, [*common, "trainer.max_steps=3"], resume="auto")  # the way on
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert main(["fit", str(GMM), *common, "--dry-run", "--resume", str(tmp_path / "nothing.ckpt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_an_unfinished_deepspeed_directory_is_skipped_on_resume(tmp_path):
    """A node failure mid-save left a newer DeepSpeed directory without its 'latest' file: resume picked it, and
    every requeue failed to load it. It is skipped as unfinished, like a truncated file."""
    import time

    from dtrain.lit.checkpointing import resume_path

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    good = run / "checkpoints" / "step0000010.ckpt"
    torch.save({"state_dict": {}, "global_step": 10}, good)
    time.sleep(0.01)
    part = _deepspeed_dir(run / "checkpoints" / "step0000020.ckpt", {"state_dict": {}, "global_step": 20}, done=False)
    assert resume_path(run, "auto") == good
    (part / "latest").write_text("checkpoint")  # DeepSpeed's last write: now it is the newest complete one
    assert resume_path(run, "auto") == part and probe_checkpoint(part) == 20


def test_an_unfinished_fsdp_directory_is_skipped_on_resume(tmp_path):
    """Lightning's sharded FSDP save writes the shards and .metadata, then rank 0's meta.pt (the training state):
    a directory without meta.pt was taken as finished and failed to restore. It is skipped; with meta.pt it is the
    newest, and its step is read from meta.pt."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    good = run / "checkpoints" / "step0000010.ckpt"
    torch.save({"state_dict": {}, "global_step": 10}, good)
    time.sleep(0.01)
    part = _fsdp_dir(run / "checkpoints" / "step0000020.ckpt", {"state_dict": {"w": torch.ones(3)}, "global_step": 20,
                                                                "loops": {}}, done=False)
    assert resume_path(run, "auto") == good
    with pytest.raises(CheckpointError, match=r"without its 'meta\.pt', which Lightning writes last"):
        probe_checkpoint(part)
    torch.save({"global_step": 20, "loops": {}}, part / "meta.pt")
    assert resume_path(run, "auto") == part and probe_checkpoint(part) == 20


def test_a_sharded_last_checkpoint_rewritten_in_place_is_ordered_by_its_last_save(tmp_path):
    """DeepSpeed rewrites last.ckpt/ in place (tag 'checkpoint'), which leaves the directory's own modification time
    at its first save: resume picked an older step directory over the newer last.ckpt. The order now follows the
    file each format writes last."""
    run = tmp_path / "run"
    for i, name in enumerate(["last.ckpt", "step0000010.ckpt", "step0000020.ckpt"]):
        d = _deepspeed_dir(run / "checkpoints" / name, {"state_dict": {}, "global_step": 10 * i})
        for p in (d, d / "latest"):
            os.utime(p, ns=(10**18 + i * 10**9,) * 2)
    assert resume_path(run, "auto").name == "step0000020.ckpt"
    os.utime(run / "checkpoints" / "last.ckpt" / "latest", ns=(10**18 + 5 * 10**9,) * 2)  # rewritten at step 25
    assert resume_path(run, "auto").name == "last.ckpt"


def test_a_sharded_rewrite_first_drops_the_finished_marker(tmp_path):
    """StepCheckpoint removes a sharded last.ckpt's 'latest' / 'meta.pt' before rewriting it, so a save killed
    halfway leaves a directory resume skips (not one read half old, half new)."""
    from types import SimpleNamespace

    from dtrain.lit.callbacks import StepCheckpoint

    d = tmp_path / "checkpoints" / "last.ckpt"
    (d / "checkpoint").mkdir(parents=True)
    torch.save({}, d / "checkpoint" / "mp_rank_00_model_states.pt")
    for name in ("latest", "meta.pt"):
        (d / name).write_text("checkpoint")
    seen = []

    def killed(path, weights_only=False):  # the strategy's save, cut short
        seen.append(sorted(p.name for p in Path(path).iterdir()))
        raise KeyboardInterrupt

    strategy = SimpleNamespace(broadcast=lambda v: v, barrier=lambda name=None: None)
    trainer = SimpleNamespace(global_step=7, world_size=2, is_global_zero=True, loggers=[], strategy=strategy,
                              save_checkpoint=killed)
    with pytest.raises(KeyboardInterrupt):
        StepCheckpoint(tmp_path / "checkpoints", every_n_steps=0)._save_checkpoint(trainer, str(d))
    assert seen == [["checkpoint"]]
    with pytest.raises(CheckpointError, match="unfinished save"):
        probe_checkpoint(d)


def _fsdp_dir(d: Path, ckpt: dict, done: bool = True) -> Path:
    """``ckpt`` saved the way Lightning's FSDP / ModelParallel (fsdp2) strategies save a sharded checkpoint: its
    ``state_dict`` as a torch distributed checkpoint (``.metadata`` + two ``*.distcp`` shards), then (``done``) the
    rest as ``meta.pt``."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # one process without a process group, which dcp assumes with a warning
        warnings.simplefilter("ignore")
        dcp.save({"state_dict": ckpt["state_dict"]}, storage_writer=dcp.FileSystemWriter(d, thread_count=2),
                 no_dist=True)
    if done:
        torch.save({k: v for k, v in ckpt.items() if k != "state_dict"}, d / "meta.pt")
    return d


def _deepspeed_dir(d: Path, ckpt: dict, world: int = 2, done: bool = True) -> Path:
    """``ckpt`` saved the way Lightning's DeepSpeed strategy saves it (ZeRO-2, bf16, ``world`` ranks): the tag
    directory ``checkpoint`` with rank 0's model states (DeepSpeed's keys + the client state: the checkpoint without
    its state_dict) and one optimizer-states file per rank, then (``done``) ``latest`` naming the tag."""
    tag = d / "checkpoint"
    tag.mkdir(parents=True)
    sd = ckpt["state_dict"]
    client = {k: v for k, v in ckpt.items() if k != "state_dict"}
    torch.save({"module": sd, "buffer_names": [], "param_shapes": [{k: v.shape for k, v in sd.items()}],
                "dp_world_size": world, **client}, tag / "mp_rank_00_model_states.pt")
    flat = torch.cat([torch.zeros(2 * world), *(v.reshape(-1).float() for v in sd.values())])
    for r, part in enumerate(flat.chunk(world)):
        torch.save({"optimizer_state_dict": {"zero_stage": 2, "partition_count": [world],
                                             "single_partition_of_fp32_groups": [part.clone()]}},
                   tag / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    if done:
        (d / "latest").write_text("checkpoint")
    return d


SHARDED = {"fsdp": _fsdp_dir, "deepspeed": _deepspeed_dir}
BASE = [*SMALL, "trainer.max_steps=6"]


def _recipe(*overrides: str) -> dict:
    from dtrain.config import load_recipe, to_container

    return to_container(load_recipe(GMM, [*BASE, *overrides]))


def _gmm_checkpoint(step: int) -> dict:
    """What Lightning hands the strategy to save at ``step``: a GMM teacher's weights and its dtrain metadata."""
    from dtrain.config import load_recipe
    from dtrain.lit.teacher import TeacherModule

    module = TeacherModule(load_recipe(GMM, BASE))
    ckpt = {"global_step": step, "epoch": 0, "state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    return ckpt


@pytest.mark.filterwarnings("ignore:resume. trainer.max_steps 6 -> 3")  # before the refusal
@pytest.mark.parametrize("layout", sorted(SHARDED))
def test_a_sharded_checkpoint_is_checked_against_the_recipe_on_resume(tmp_path, layout):
    """A sharded directory (DeepSpeed, FSDP / fsdp2 sharded_checkpoint) skipped every resume check: another schedule,
    optim.lr or EMA set was accepted silently, and another network died in the strategy's load with a 180-line
    traceback. Its metadata is checked like a file's, in one line."""
    run = tmp_path / "run"
    last = SHARDED[layout](run / "checkpoints" / "last.ckpt", _gmm_checkpoint(4))
    assert resume_path(run, "auto", recipe=_recipe()) == last and probe_checkpoint(last) == 4
    for override, match in [("optim.lr=0.5", r"optim\.lr 0\.002 \(now 0\.5\)"),
                            ("schedule.name=vp_linear", r"schedule \{'name': 'vp_cosine'.*\(now \{'name': 'vp_linear'"),
                            ("model.hidden=32", r"the checkpoint's network differs .*: model\.hidden 16 \(now 32\)"),
                            ("ema.decays=[0.9]", r"keeps EMA copies \['0_99'\], the recipe asks for \['0_9'\]"),
                            ("trainer.max_steps=3", r"trainer\.max_steps: 3, but the checkpoint is at step 4")]:
        with pytest.raises(CheckpointError, match=match):
            resume_path(run, "auto", recipe=_recipe(override))


@pytest.mark.parametrize("layout, damage", [("fsdp", "truncate"), ("fsdp", "remove"), ("deepspeed", "truncate"),
                                            ("deepspeed", "remove")])
def test_a_sharded_checkpoint_with_a_shard_cut_short_or_missing_is_skipped_on_resume(tmp_path, caplog, layout,
                                                                                      damage):
    """Only a sharded directory's finished-save marker was checked: one with a truncated shard was picked by
    --resume auto / last and the fit died with a bare EOFError in the strategy's load. It is skipped naming the
    shard, like a truncated file, and the previous checkpoint is used; named explicitly, it is refused."""
    run = tmp_path / "run"
    good = SHARDED[layout](run / "checkpoints" / "step0000002.ckpt", _gmm_checkpoint(2))
    last = SHARDED[layout](run / "checkpoints" / "last.ckpt", _gmm_checkpoint(4))
    for i, d in enumerate((good, last)):
        os.utime(d / ("meta.pt" if layout == "fsdp" else "latest"), ns=(10**18 + i * 10**9,) * 2)
    assert resume_path(run, "auto") == last
    shard = (sorted(last.glob("*.distcp")) if layout == "fsdp" else sorted(last.glob("*/*optim_states.pt")))[-1]
    if damage == "truncate":
        os.truncate(shard, shard.stat().st_size // 2)
        why = "truncated: .* bytes, the checkpoint's .metadata records" if layout == "fsdp" else "not a whole torch"
    else:
        shard.unlink()
        why = "missing: the checkpoint's .metadata lists it" if layout == "fsdp" else "some are missing"
    with caplog.at_level(logging.WARNING, logger="dtrain.checkpoint"):
        assert resume_path(run, "last", recipe=_recipe()) == good
    assert f"skipping {shard if layout == 'fsdp' or damage == 'truncate' else shard.parent}: " in caplog.text
    with pytest.raises(CheckpointError, match=f"--resume: .*{why}"):
        resume_path(run, str(last))


def test_resuming_a_moved_run_directory_keeps_writing_last_ckpt(tmp_path):
    """A run directory copied elsewhere and resumed there: Lightning sees another dirpath and forgets last.ckpt, and
    its version counter wrote last-v1.ckpt beside a stale last.ckpt (the file users hand on). No more."""
    import shutil

    from dtrain.lit.fit import fit

    run = fit(GMM, [*SMALL, f"out_dir={tmp_path / 'a'}", "trainer.max_steps=3"])
    moved = tmp_path / "b" / run.name
    shutil.copytree(run, moved)
    fit(GMM, [*SMALL, f"out_dir={tmp_path / 'b'}", "trainer.max_steps=5"], resume="auto")
    names = sorted(p.name for p in (moved / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step0000002.ckpt", "step0000004.ckpt"], names
    assert torch.load(moved / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5


def test_resume_removes_checkpoint_writes_that_never_finished(tmp_path):
    """A write cut by SIGKILL leaves a hidden temp file (gigabytes on a big model): the next resume still starts
    from the newest finished checkpoint, and the fit that holds the run folder removes the temp files (resume_path
    itself does not: a second fit refused by the folder's lock deleted the running one's write in progress)."""
    from dtrain.lit.checkpointing import TMP_TAG

    ck = tmp_path / "checkpoints"
    ck.mkdir()
    torch.save({"global_step": 3, "state_dict": {}}, ck / "step0000003.ckpt")
    stale = [ck / f".last.ckpt{TMP_TAG}abc", tmp_path / f".hpc_ckpt_1.ckpt{TMP_TAG}x"]
    for p in stale:
        p.write_bytes(b"PK\x03\x04")
    assert resume_path(tmp_path, "auto") == ck / "step0000003.ckpt"
    assert all(p.exists() for p in stale)
    remove_stale_temps(tmp_path)
    assert not any(p.exists() for p in stale)


def test_pruning_keeps_a_signal_checkpoint_newer_than_the_periodic_ones(tmp_path):
    """``trainer.keep_checkpoints`` drops a SLURM signal's hpc_ckpt once a newer periodic checkpoint exists, and
    keeps one that is newer (the only copy of the latest weights after a requeue)."""
    from dtrain.lit.callbacks import StepCheckpoint

    ck = tmp_path / "checkpoints"
    ck.mkdir()
    for i, name in enumerate(["hpc_ckpt_1.ckpt", "checkpoints/step0000004.ckpt", "checkpoints/step0000008.ckpt",
                              "hpc_ckpt_2.ckpt"]):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))
    StepCheckpoint.prune(ck, keep=1)
    assert sorted(p.name for p in tmp_path.rglob("*.ckpt")) == ["hpc_ckpt_2.ckpt", "step0000008.ckpt"]


def test_no_second_last_checkpoint_after_a_signal_checkpoint(tmp_path):
    """Stopped by SIGTERM / SIGUSR1 right after its hpc checkpoint, training writes no second full last.ckpt inside
    SLURM's kill grace time; stopped at another step, it does."""
    from types import SimpleNamespace

    from dtrain.dist.slurm import Preemption
    from dtrain.lit.callbacks import StepCheckpoint

    cb, sig, saved = StepCheckpoint(tmp_path, every_n_steps=0), Preemption(None), []
    trainer = SimpleNamespace(global_step=7, callbacks=[sig, cb], world_size=1, is_global_zero=True, loggers=[],
                              save_checkpoint=lambda path, weights_only=False: saved.append(Path(path).name))
    sig.saved_step = 7
    cb.on_train_end(trainer, None)
    assert saved == []
    sig.saved_step = 6
    cb.on_train_end(trainer, None)
    assert saved == ["last.ckpt"]

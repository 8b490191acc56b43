"""Bad input to ``dtrain fit`` gives one line naming the field, flag or file (exit code 2), never a traceback, and
where it can, before the run directory exists: a missing or mistaken teacher, a directory or another network to
resume from, a GPU that is not there, an override without '=', an empty recipe file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dtrain.cli import main

R = Path(__file__).resolve().parents[2] / "recipes"
DIGITS = R / "teacher" / "digits.yaml"
QUIET = ["logger.mode=disabled", "trainer.progress_bar=false", "trainer.cpu_threads=1", "trainer.accelerator=cpu",
         "trainer.devices=1"]
STEPS = "trainer.max_steps=2"  # should a check miss, no run trains long


@pytest.fixture
def bundle(digits_bundle):
    """The inference bundle of the 16-channel digits teacher checkpoint (``digits_bundle``, tests/conftest.py)."""
    return digits_bundle


@pytest.fixture
def fit_error(cli_error):
    """``fit_error(*argv)``: ``dtrain fit argv`` fails with one line (``cli_error``, tests/conftest.py)."""
    return lambda *argv: cli_error("fit", *argv)


@pytest.mark.parametrize("recipe", ["cm/cd_digits.yaml", "pd/digits.yaml", "flowmap/ctm_digits.yaml",
                                    "cm/ict_digits.yaml"])
@pytest.mark.parametrize("dry_run", [True, False])
def test_missing_teacher_fails_at_validation(tmp_path, recipe, dry_run, fit_error):
    steps = [] if recipe.startswith("pd/") else [STEPS]  # pd's round plan fixes max_steps
    err = fit_error(str(R / recipe), f"out_dir={tmp_path}", *QUIET, *steps, *(["--dry-run"] if dry_run else []))
    assert f"{recipe}: teacher: " in err and "checkpoint or bundle" in err
    assert not any(tmp_path.iterdir())  # no run directory


def test_optional_teacher_stays_optional(tmp_path):
    """MeanFlow from scratch and ict from scratch take no teacher."""
    assert main(["fit", str(R / "flowmap" / "meanflow_digits.yaml"), f"out_dir={tmp_path}", "--dry-run"]) == 0
    assert main(["fit", str(R / "cm" / "ict_digits.yaml"), "method.init=scratch", "--dry-run"]) == 0


# students that start from the teacher's weights (the 16-channel digits teacher; the recipes' students have 32)
COPIES = {"cd": ("cm/cd_digits.yaml", []), "ict": ("cm/ict_digits.yaml", ["method.init=teacher"]),
          "pd": ("pd/digits.yaml", []), "ctm": ("flowmap/ctm_digits.yaml", []),
          "meanflow": ("flowmap/meanflow_digits.yaml", ["method.init=teacher"])}


@pytest.mark.parametrize("method", list(COPIES))
@pytest.mark.parametrize("source", ["checkpoint", "bundle"])
@pytest.mark.parametrize("dry_run", [True, False])
def test_student_network_not_the_teachers_before_the_run(tmp_path, digits_teacher, bundle, method, source, dry_run,
                                                         fit_error):
    """Read from the teacher's metadata (its recipe's model section, or the bundle's dtrain.json) in ``fit`` itself:
    no run directory, and --dry-run fails too."""
    recipe, over = COPIES[method]
    teacher = digits_teacher if source == "checkpoint" else bundle
    steps = [] if method == "pd" else [STEPS]
    err = fit_error(str(R / recipe), f"teacher={teacher}", *over, f"out_dir={tmp_path}", *QUIET, *steps,
                    *(["--dry-run"] if dry_run else []))
    assert f"{recipe}: model: the student network is not the teacher's ({teacher}): model.channels 32 (the " \
           f"teacher's 16)" in err
    assert ("model.second_time may be set" in err) == (method in ("ctm", "meanflow"))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("override", "named"), [("model.num_heads=2", "model.num_heads 2 (the teacher's 4)"),
                                                 ("model.second_time=true", "model.second_time True (the teacher's "
                                                                            "False)"),
                                                 ("model.attn_resolutions=[]", "model.attn_resolutions [] (the "
                                                                               "teacher's [4])")])
def test_student_network_names_every_key_that_differs(digits_teacher, override, named, fit_error):
    """Keys the weights' load would miss (the attention heads) too; a consistency student is the teacher exactly."""
    err = fit_error(str(R / "cm" / "cd_digits.yaml"), f"teacher={digits_teacher}", "model.channels=8",
                    override, "--dry-run")
    assert "model.channels 8 (the teacher's 16)" in err and named in err and err.count("(the teacher's ") == 2


def test_student_network_that_may_differ(tmp_path, digits_teacher, bundle, monkeypatch):
    """The denoiser's fields and dropout, CTM's second time, guided PD's w embedding may differ; students that do not
    start from the teacher's weights are not checked; no weights are read. (A sharded teacher's metadata is read
    without consolidating it: tests/unit/test_zero.py.)"""
    import dtrain.export.checkpoint as C

    def no_weights(*a, **k):
        raise AssertionError("the check read the teacher's weights")

    monkeypatch.setattr(C, "read_checkpoint", no_weights)
    monkeypatch.setattr("dtrain.lit.common.read_checkpoint", no_weights)  # imported there by name
    monkeypatch.setattr(C, "load_bundle", no_weights)
    for recipe, over in [
        ("cm/cd_digits.yaml", [f"teacher={digits_teacher}", "model.channels=16", "model.dropout=0.2", "model.param=eps",
                               "model.clip_x0=null", "model.sigma_data=1.0", "model.input_scaling=true"]),
        ("flowmap/ctm_digits.yaml", [f"teacher={bundle}", "model.channels=16"]),
        ("pd/digits_guided.yaml", [f"teacher={digits_teacher}", "model.channels=16"]),
        ("flowmap/meanflow_digits.yaml", [f"teacher={digits_teacher}"]),
    ]:
        assert main(["fit", str(R / recipe), *over, f"out_dir={tmp_path / 'runs'}", "--dry-run"]) == 0, (recipe, over)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("what", ["bundle", "plain", "run"])
def test_resume_from_a_directory_that_is_no_checkpoint(tmp_path, digits_teacher, bundle, what, fit_error):
    path = {"bundle": bundle, "plain": tmp_path / "plain", "run": digits_teacher.parents[1]}[what]
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("x")
    err = fit_error(str(DIGITS), f"out_dir={tmp_path / 'runs'}", *QUIET, STEPS, "--resume", str(path))
    assert f"{path}: --resume: " in err
    assert {"bundle": "inference bundle", "plain": "not a sharded", "run": "run directory"}[what] in err


def test_resume_with_another_network(tmp_path, digits_teacher, fit_error):
    err = fit_error(str(DIGITS), f"out_dir={tmp_path}", "model.channels=8", *QUIET, STEPS, "--resume",
                    str(digits_teacher))
    assert f"{digits_teacher}: --resume: " in err and "model.channels 16 (now 8)" in err


@pytest.mark.parametrize(("override", "words"), [
    ("schedule.kind=linear", "schedule {'name': 'vp_discrete', 'kind': 'cosine', 'T': 1000"),
    ("method.time_sampling=uniform", None),  # training settings may change: resumes fine up to the check
])
def test_resume_for_another_objective(tmp_path, digits_teacher, fit_error, override, words):
    """A resume (the SLURM templates always pass --resume auto) under another schedule or parameterization went on
    silently and rewrote recipe.yaml: exports then used a schedule the first steps never trained on."""
    if words is None:
        from dtrain.config import load_recipe, to_container
        from dtrain.lit.checkpointing import check_resume

        ck = torch.load(digits_teacher, map_location="cpu", weights_only=True)
        check_resume(digits_teacher, ck, to_container(load_recipe(DIGITS, ["model.channels=16", override])))
        return
    err = fit_error(str(DIGITS), f"out_dir={tmp_path}", "model.channels=16", override, *QUIET, STEPS, "--resume",
                    str(digits_teacher))
    assert f"{digits_teacher}: --resume: " in err and words in err and "trained for another objective" in err, err
    assert not any(tmp_path.iterdir())


def test_resume_under_another_method(digits_teacher):
    """A checkpoint resumed under another ``method.name`` (ct -> ict: the same network and schedule, another
    objective) is refused naming it; the checks before a run let the recipe through."""
    import copy

    from dtrain.export.checkpoint import CheckpointError
    from dtrain.lit.checkpointing import check_resume

    ck = torch.load(digits_teacher, map_location="cpu", weights_only=True)
    recipe = copy.deepcopy(ck["dtrain"]["recipe"])  # its own recipe: resumes
    check_resume(digits_teacher, ck, recipe)
    recipe["method"]["name"] = "ict"
    with pytest.raises(CheckpointError, match=r"method.name 'denoising' \(now 'ict'\): the checkpoint was trained "
                                              r"for another objective"):
        check_resume(digits_teacher, ck, recipe)


@pytest.mark.parametrize(("override", "words"), [
    ("ema.decays=[0.9]", ["EMA copies ['0_995', 'std0_100']", "asks for ['0_9', 'std0_100'] (ema.decays / ema.stds)"]),
    ("ema.stds=[0.2]", ["EMA copies ['0_995', 'std0_100']", "asks for ['0_995', 'std0_200']"]),
    ("optim.lr=1e-5", ["optim.lr 0.002 (now 1e-05)", "keeps the optimizer state and settings of its checkpoint"]),
    ("optim.weight_decay=0.5", ["optim.weight_decay 0.0 (now 0.5)"]),
])
def test_resume_with_settings_the_checkpoint_fixes(tmp_path, digits_teacher, fit_error, override, words):
    """EMA copies and the optimizer's restored settings: a changed value fails before the run (Lightning would
    raise on hundreds of missing EMA keys, or silently keep the checkpoint's learning rate); recipe.yaml stays."""
    err = fit_error(str(DIGITS), f"out_dir={tmp_path}", "model.channels=16", override, *QUIET, STEPS, "--resume",
                    str(digits_teacher))
    assert f"{digits_teacher}: --resume: " in err and all(w in err for w in words), err
    assert not any(tmp_path.iterdir())


def test_gpu_accelerator_without_cuda(tmp_path, monkeypatch, fit_error):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = fit_error(str(DIGITS), f"out_dir={tmp_path}", *QUIET, STEPS, "trainer.accelerator=gpu")
    assert "trainer.accelerator: 'gpu'" in err and "no CUDA GPU" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("strategy", ["deepspeed", "fsdp"])
def test_gpu_only_strategy_with_auto_accelerator_without_cuda(tmp_path, monkeypatch, fit_error, strategy):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = fit_error(str(DIGITS), f"out_dir={tmp_path}", "logger.mode=disabled", "trainer.progress_bar=false", STEPS,
                    "trainer.accelerator=auto", "trainer.sample_every_n_steps=0", f"strategy.name={strategy}")
    assert "strategy.name: Lightning's" in err and "no CUDA GPU is available here; use ddp or fsdp2" in err
    assert not any(tmp_path.iterdir())


def test_override_without_equals(tmp_path, fit_error):
    err = fit_error(str(DIGITS), f"out_dir={tmp_path}", "trainer.max_steps", "--dry-run")
    assert "command line: trainer.max_steps: an override is key=value" in err


def test_empty_recipe_file(tmp_path, fit_error):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    err = fit_error(str(tmp_path / "empty.yaml"), "--dry-run")
    assert "empty.yaml: the recipe file is empty" in err


def test_teacher_directory_neither_bundle_nor_sharded(tmp_path, fit_error):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "weights.bin").write_bytes(b"0")
    err = fit_error(str(R / "cm" / "cd_digits.yaml"), f"teacher={tmp_path / 't'}", "--dry-run")
    assert f"teacher: {tmp_path / 't'} is a directory but neither an inference bundle" in err


def test_overrides_after_a_flag_are_overrides_and_unknown_flags_still_fail(capsys):
    """``dtrain fit R --dry-run k=v`` (or after ``--resume last``, as job scripts write it) applies k=v; a real
    unknown flag or a bare word after the flags is still refused by argparse (exit 2)."""
    from omegaconf import OmegaConf

    assert main(["fit", str(DIGITS), "model.channels=8", "--dry-run", "trainer.max_steps=3", "seed=5"]) == 0
    cfg = OmegaConf.create(capsys.readouterr().out.split("# parameters")[0])
    assert (cfg.trainer.max_steps, cfg.seed, cfg.model.channels) == (3, 5, 8)
    for extra in (["--bogus"], ["stray"], ["x=1", "stray"]):
        with pytest.raises(SystemExit) as e:
            main(["fit", str(DIGITS), "--dry-run", *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and (f"dtrain fit: error: unrecognized arguments: {extra[-1]} ({extra[-1]!r} is "
                                      "neither a flag of `dtrain fit` nor a key=value override)") in err, err


@pytest.mark.parametrize("source", ["checkpoint", "bundle"])
def test_a_few_step_student_is_no_teacher_to_distil(tmp_path, digits_teacher, bundle, source, fit_error):
    """A consistency student's checkpoint or bundle as ``teacher`` of PD / CD (which read the teacher as a denoiser)
    fails before the run with one line naming the file and its kind (PD warned and trained from scratch, CD
    blamed method.init); iCT may still start from its weights."""
    import json
    import shutil

    if source == "checkpoint":
        ck = torch.load(digits_teacher, map_location="cpu", weights_only=True)
        ck["dtrain"]["kind"] = "cd"
        student = tmp_path / "cd.ckpt"
        torch.save(ck, student)
    else:
        student = tmp_path / "cd_bundle"
        shutil.copytree(bundle, student)
        info = json.loads((student / "dtrain.json").read_text())
        info["kind"] = "consistency"
        info["sampler"]["guidance"] = 1.0  # as a consistency student's own export writes it
        (student / "dtrain.json").write_text(json.dumps(info))
    for recipe in ("pd/digits.yaml", "cm/cd_digits.yaml"):
        err = fit_error(str(R / recipe), f"teacher={student}", f"out_dir={tmp_path / 'runs'}", *QUIET,
                        "model.channels=16", "--dry-run")
        assert f"teacher: {student} holds a 'consistency' student, not a denoiser" in err, err
    assert main(["fit", str(R / "cm" / "ict_digits.yaml"), f"teacher={student}", "method.init=teacher",
                 "model.channels=16", f"out_dir={tmp_path / 'runs'}", "--dry-run"]) == 0


@pytest.mark.parametrize(("over", "words"), [
    (["eval.ref_stats=/nowhere/ref.npz"],
     ["command line: eval.ref_stats: file not found: /nowhere/ref.npz (progressive distillation scores each round's",
      "or set method.eval=false"]),
    (["eval.feature_extractor=inception"],
     ["digits.yaml: eval.feature_extractor_weights_path: not set: progressive distillation scores each round's"]),
])
def test_round_evaluation_inputs_are_checked_before_training(tmp_path, digits_teacher, fit_error, over, words):
    """PD scores each round's student (eval.ref_stats set): a missing reference file or Inception weights fail at
    launch, not after the first round's training."""
    err = fit_error(str(R / "pd" / "digits.yaml"), f"teacher={digits_teacher}", f"out_dir={tmp_path}", *QUIET,
                    "method.round_steps=[2]", "trainer.max_steps=12", "model.channels=16", *over)
    assert all(w in err for w in words), err
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def ref_files(tmp_path_factory):
    """Statistics files of the 'raw' and 'digits' extractors over a few digits, and a file that is no .npz."""
    from dtrain.data.digits import digits_arrays
    from dtrain.eval.features import build_extractor
    from dtrain.eval.fid import compute_ref_stats

    d, (x, _) = tmp_path_factory.mktemp("refs"), digits_arrays("test")
    for name in ("raw", "digits"):
        ext = build_extractor(name, shape=(1, 8, 8))
        compute_ref_stats(ext, [x[:64]], "digits", sync=False).save(d / f"{name}.npz")
    (d / "junk.npz").write_text("not numpy")
    return d


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize(("over", "words"), [
    (["eval.ref_stats={refs}/raw.npz"], ["command line: eval.ref_stats: {refs}/raw.npz does not match this evaluation "
                                         "(extractor: file has 'raw', evaluation uses 'digits')"]),
    (["eval.ref_stats={refs}/digits.npz", "eval.feature_extractor=raw", "data.name=gmm", "model.name=mlp",
      "model.dim=2", "model.num_classes=3"],
     ["extractor: file has 'digits', evaluation uses 'raw'; resolution: file has [1, 8, 8], evaluation uses [2]"]),
    (["eval.ref_stats={refs}/junk.npz"], ["eval.ref_stats: {refs}/junk.npz is not a dtrain reference-statistics "
                                          "file (.npz with mu, sigma, meta): not an .npz archive"]),
    (["eval.ref_stats=digits:train", "data.name=patches", "data.size=16", "model.in_channels=3",
      "model.resolution=16", "model.attn_resolutions=[]", "model.num_classes=0", "sampler.guidance=1",
      "method.cfg_dropout=0"],
     ["digits.yaml: eval.feature_extractor: 'digits' scores 1x8x8 images, and this model's samples are 3x16x16"]),
])
def test_sweep_reference_of_another_extractor_or_shape(tmp_path, ref_files, fit_error, over, words, dry_run):
    """Statistics of another extractor or resolution for the in-training sweeps (eval.every_n_steps) fail the
    launch and --dry-run naming eval.ref_stats; a fit found them after W&B and the data had started, a dry run
    not at all."""
    over = [o.format(refs=ref_files) for o in over]
    err = fit_error(str(DIGITS), f"out_dir={tmp_path}", *QUIET, STEPS, "eval.every_n_steps=1", "eval.samplers=[ddim:2]",
                    "eval.num=8", "eval.batch_size=8", *over, *(["--dry-run"] if dry_run else []))
    assert all(w.format(refs=ref_files) in err for w in words), err
    assert "(eval.every_n_steps > 0 sweeps)" in err
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def no_null_teacher(digits_teacher, tmp_path_factory):
    """``digits_teacher`` as if trained with method.cfg_dropout 0: its null-class embedding never learned."""
    ck = torch.load(digits_teacher, map_location="cpu", weights_only=True)
    ck["dtrain"]["recipe"]["method"]["cfg_dropout"] = 0.0
    ck["dtrain"]["recipe"]["sampler"]["guidance"] = 1.0
    torch.save(ck, path := tmp_path_factory.mktemp("no_null") / "teacher.ckpt")
    return path


def test_guidance_needs_a_model_that_learned_the_null_class(tmp_path, no_null_teacher, fit_error, cli_error):
    """A class-conditional model trained without label dropout has a random null-class embedding: guiding it (a
    student's guided targets, dtrain eval / sample with w != 1, a bundle's default w) is refused naming the key, not
    run on noise; w = 1 works."""
    never = "classifier-free guidance needs the unconditional (null-class) prediction, which "
    err = fit_error(str(R / "pd" / "digits_guided.yaml"), f"teacher={no_null_teacher}", f"out_dir={tmp_path}",
                    *QUIET, "model.channels=16", "--dry-run")
    assert "digits_guided.yaml: method.guidance: [1.0, 3.0] guides the teacher" in err, err
    assert never + "it never learned" in err, err
    err = fit_error(str(R / "cm" / "cd_digits.yaml"), f"teacher={no_null_teacher}", f"out_dir={tmp_path}", *QUIET,
                    "model.channels=16", "method.guidance=2.0", "--dry-run")
    assert "method.guidance: 2.0 guides the teacher" in err, err
    err = cli_error("export", str(no_null_teacher), "--out", str(tmp_path / "b2"), "--guidance", "2")
    assert "sampler.guidance: 2.0, but " + never + "this model never" in err, err
    bundle = tmp_path / "b"
    assert main(["export", str(no_null_teacher), "--out", str(bundle)]) == 0
    err = cli_error("sample", str(bundle), "--w", "2", "--num", "2", "--out", str(tmp_path / "s.png"))
    assert "w: 2.0: " + never in err, err
    assert main(["sample", str(bundle), "--w", "1", "--num", "2", "--nfe", "2", "--out", str(tmp_path / "s.png")]) == 0
    for model in (no_null_teacher, bundle):
        err = cli_error("eval", str(model), "--guidance", "2", "--samplers", "ddim:2", "--num", "4",
                        "--out", str(tmp_path / "ev"), "--wandb", "disabled")
        assert "--guidance: 2.0: " + never in err, err


def test_a_second_fit_into_a_busy_run_folder_is_refused(tmp_path, fit_error, monkeypatch):
    """Two fits into one run folder (a job launched twice) overwrote each other's checkpoints: the second is refused
    naming the holder; a holder of this same SLURM job (requeued while its dead node's lock lingers on a network
    filesystem) is stale; ranks other than the first never lock."""
    import fcntl
    import json

    from dtrain.config import load_recipe
    from dtrain.lit.fit import _first_process, run_dir

    gmm = R / "teacher" / "gmm.yaml"
    over = [f"out_dir={tmp_path}", *QUIET, STEPS, "model.hidden=8", "model.depth=1", "data.num_samples=1024",
            "trainer.ckpt_every_n_steps=0"]
    run = run_dir(load_recipe(gmm, over))
    run.mkdir(parents=True)
    with open(run / ".fit.lock", "w") as f:
        f.write(json.dumps({"pid": 4242, "host": "node3", "job": "881", "restart": 0}))
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        err = fit_error(str(gmm), *over)
        assert err == (f"dtrain fit: command line: out_dir / name: another dtrain fit is training in {run}; wait "
                       f"for it to end, or give this run another name= or out_dir= (held by pid 4242 on node3, "
                       f"SLURM job 881)"), err
        assert not (run / "checkpoints").exists()
        monkeypatch.setenv("SLURM_JOB_ID", "881")  # another fit of this job's same start: alive, refused
        assert "held by pid 4242 on node3, SLURM job 881" in fit_error(str(gmm), *over)
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the job requeued: its first start's lock is stale
        assert main(["fit", str(gmm), *over]) == 0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert _first_process({}) and _first_process({"RANK": "0", "LOCAL_RANK": "0", "SLURM_PROCID": "0"})
    assert not any(_first_process({k: "1"}) for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def test_a_refused_fit_leaves_the_running_ones_checkpoint_write_alone(tmp_path, fit_error):
    """A second fit with --resume auto deleted the running fit's checkpoint temp file (a write in progress) as a
    killed job's leftover, then was refused by the lock: the running fit's rename failed. Only the lock holder
    cleans; a fit that holds the folder removes a killed job's leftovers."""
    import fcntl

    from dtrain.config import load_recipe
    from dtrain.lit.fit import run_dir

    gmm = R / "teacher" / "gmm.yaml"
    over = [f"out_dir={tmp_path}", *QUIET, STEPS, "model.hidden=8", "model.depth=1", "data.num_samples=1024",
            "trainer.ckpt_every_n_steps=0"]
    run = run_dir(load_recipe(gmm, over))
    assert main(["fit", str(gmm), *over]) == 0
    tmp = run / "checkpoints" / ".last.ckpt.tmpnode3.4242.abcd1234"
    tmp.write_bytes(b"half a checkpoint")
    with open(run / ".fit.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert "another dtrain fit is training in" in fit_error(str(gmm), *over, "--resume", "auto")
        assert tmp.exists()
    assert main(["fit", str(gmm), *over, "trainer.max_steps=3", "--resume", "auto"]) == 0
    assert not tmp.exists()


def test_a_lock_is_not_kept_by_forked_children_of_a_killed_holder(tmp_path, monkeypatch):
    """DataLoader workers forked while the fit held the run folder shared its lock: after the fit was SIGKILLed they
    kept it for seconds, and the --resume auto of a requeued job was refused naming the dead process. A lock file
    another user made (read-only to us) is locked without the holder record."""
    import subprocess
    import sys

    import dtrain.fileio as fileio

    lock = tmp_path / ".fit.lock"
    script = ("import os, signal, sys, time\nfrom dtrain.fileio import exclusive\n"
              "with exclusive(sys.argv[1], 'busy'):\n"
              "    r, w = os.pipe()\n"
              "    pid = os.fork()\n"
              "    if pid == 0:\n        os.write(w, b'x')\n        time.sleep(30)\n        os._exit(0)\n"
              "    os.read(r, 1)\n"  # the child runs (its at-fork hooks ran before fork returned there)
              "    print(pid, flush=True)\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(lock)], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())  # (the child keeps the pipe open: read its line, wait for the parent)
    proc.stdout.close()
    assert proc.wait(timeout=60) == -9
    try:
        os.kill(child, 0)  # the forked child outlives its parent
        with fileio.exclusive(lock, "busy"):
            pass
    finally:
        os.kill(child, 9)
    real = open

    def no_write(path, mode="r", **kw):
        if mode != "r":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, mode, **kw)

    monkeypatch.setattr("builtins.open", no_write)
    with fileio.exclusive(lock, "busy"):
        with pytest.raises(fileio.BusyError, match="busy"):
            with fileio.exclusive(lock, "busy"):
                pass


def test_a_resume_reading_another_copy_of_the_teacher_is_refused(tmp_path, digits_teacher, digits_bundle):
    """A student resumed with another method.teacher_ema read another copy of the same teacher file (its raw weights
    instead of its EMA) and distilled towards it from then on, silently."""
    from dtrain.export.bundle import read_info, sha256_file
    from dtrain.export.checkpoint import CheckpointError
    from dtrain.lit.checkpointing import _teacher_copy, check_resume_teacher

    tag = _teacher_copy(Path(digits_teacher), "auto")
    assert tag is not None and _teacher_copy(Path(digits_teacher), "raw") is None
    meta = {"teacher": {"path": str(digits_teacher), "sha256": sha256_file(digits_teacher), "ema": tag}}
    check_resume_teacher(tmp_path / "s.ckpt", meta, str(digits_teacher))  # auto: the same copy
    check_resume_teacher(tmp_path / "s.ckpt", meta, str(digits_teacher), teacher_ema=tag.replace("_", "."))
    with pytest.raises(CheckpointError, match=rf"s\.ckpt: method\.teacher_ema: 'raw' reads the teacher's raw weights; "
                       rf"the checkpoint was trained against its {tag} weights"):
        check_resume_teacher(tmp_path / "s.ckpt", meta, str(digits_teacher), teacher_ema="raw")
    info = read_info(digits_bundle)["weights"]
    meta = {"teacher": {"path": str(digits_bundle), "sha256": info["sha256"], "ema": info["ema"]}}
    check_resume_teacher(tmp_path / "s.ckpt", meta, str(digits_bundle))  # a bundle holds one copy


def test_a_resume_may_read_the_teacher_from_its_exact_bundle(tmp_path, digits_teacher, digits_bundle, cli_error):
    """A student trained against a teacher checkpoint resumes with the bundle exported from it (the teacher's run
    folder cleaned, its bundle kept): the same weights, which the bundle's provenance.source_sha256 links to the
    checkpoint; it was refused as another teacher. Another copy (raw) or a lossy dtype is still refused."""
    from dtrain.export.bundle import sha256_file
    from dtrain.export.checkpoint import CheckpointError
    from dtrain.lit.checkpointing import _teacher_copy, check_resume_teacher

    ref = {"path": str(digits_teacher), "format": "checkpoint", "sha256": sha256_file(digits_teacher),
           "ema": _teacher_copy(Path(digits_teacher), "auto")}
    check_resume_teacher(tmp_path / "s.ckpt", {"teacher": ref}, str(digits_bundle))
    for flags in (["--ema", "raw"], ["--dtype", "bf16"]):
        out = tmp_path / flags[1]
        assert main(["export", str(digits_teacher), "--out", str(out), *flags]) == 0
        with pytest.raises(CheckpointError, match=r"teacher: .* is not the teacher the checkpoint was trained against"):
            check_resume_teacher(tmp_path / "s.ckpt", {"teacher": ref}, str(out))


def test_training_only_model_keys_may_differ(digits_teacher):
    """``model.dropout`` and ``model.grad_checkpoint`` change how a network trains, not its weights: a resumed run
    and a student starting from its teacher may set them otherwise; a key that changes the network may not."""
    from dtrain.config import load_recipe, to_container
    from dtrain.export.checkpoint import CheckpointError
    from dtrain.lit.checkpointing import check_model
    from dtrain.lit.common import module_class

    ck = torch.load(digits_teacher, map_location="cpu", weights_only=True)
    model = dict(ck["dtrain"]["recipe"]["model"])
    check_model(digits_teacher, ck, {**model, "grad_checkpoint": not model.get("grad_checkpoint"), "dropout": 0.3})
    with pytest.raises(CheckpointError, match=r"model\.channels"):
        check_model(digits_teacher, ck, {**model, "channels": 2 * model["channels"]})
    pd = load_recipe(R / "pd" / "digits.yaml", [f"teacher={digits_teacher}", "model.channels=16",
                                                "model.grad_checkpoint=true"])
    module_class("pd").check_teacher_network(to_container(pd))


def test_dry_run_checks_the_files_a_launch_reads_but_not_this_machines_gpus(tmp_path, monkeypatch, capsys):
    """--dry-run prints the recipe, then fails on a file the run would read (here the FID weights); a GPU recipe
    dry-runs on a machine without one (a login node)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["fit", str(DIGITS), "--dry-run", "eval.feature_extractor_weights_path=/no/w.pth"]) == 2
    out, err = capsys.readouterr()
    assert "# parameters:" in out and "command line: eval.feature_extractor_weights_path: file not found" in err
    assert main(["fit", str(DIGITS), "--dry-run", "trainer.accelerator=gpu"]) == 0


def test_a_teacher_ema_too_long_for_its_run_warns():
    """_base/train.yaml's EMA 0.999 averages over ~1000 updates: after 60 steps the copy export and eval use by
    default was 94% random weights (FID 550 against the raw weights' 256), with no word."""
    import warnings

    from dtrain.config import load_recipe
    from dtrain.lit.fit import _warn_short_ema

    with pytest.warns(UserWarning, match=r"ema\.decays: 0\.999 averages over ~1000 updates; after "
                                         r"trainer\.max_steps=60 its copy still holds 94% of the initial"):
        _warn_short_ema(load_recipe(DIGITS, ["trainer.max_steps=60", "ema.decays=[0.999]"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_short_ema(load_recipe(DIGITS, ["trainer.max_steps=5000", "ema.decays=[0.999]"]))
        _warn_short_ema(load_recipe(DIGITS, ["trainer.max_steps=60", "ema.decays=[0.9]"]))


def test_a_longer_cosine_run_on_resume_warns_of_the_lr_jump(digits_teacher):
    """Resuming a cosine-schedule run with a larger trainer.max_steps recomputed the schedule: the LR jumped from
    near its floor back up (1.0e-4 -> 5.9e-4 at the resume), silently."""
    import copy

    from dtrain.lit.checkpointing import check_resume

    ck = torch.load(digits_teacher, map_location="cpu", weights_only=True)
    recipe = copy.deepcopy(ck["dtrain"]["recipe"])
    recipe["trainer"]["max_steps"] = 2 * recipe["trainer"]["max_steps"]
    recipe["optim"]["lr_schedule"] = ck["dtrain"]["recipe"]["optim"]["lr_schedule"] = "cosine"
    with pytest.warns(UserWarning, match=r"resume: trainer\.max_steps \d+ -> \d+ under optim\.lr_schedule 'cosine'"):
        check_resume(digits_teacher, ck, recipe)

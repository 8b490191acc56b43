"""`dtrain fit` end to end on CPU: a digits teacher whose samples improve, a GMM teacher that matches its
mixture, the W&B offline run read back, checkpoints, resume, --dry-run and recipe errors on the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dtrain.cli import main
from dtrain.config import load_recipe

ROOT = Path(__file__).resolve().parents[2]
DIGITS, GMM = ROOT / "recipes" / "teacher" / "digits.yaml", ROOT / "recipes" / "teacher" / "gmm.yaml"

# A short digits run: the recipe's network, a few hundred steps of smaller batches (about a minute on 2 cores).
# One thread: on a shared machine two OpenMP threads stall whenever another process takes a core.
THREADS = "trainer.cpu_threads=1"
DIGITS_SHORT = [THREADS, "data.batch_size=64", "trainer.max_steps=200", "trainer.log_every_n_steps=40",
                "trainer.ckpt_every_n_steps=100", "trainer.sample_every_n_steps=100",
                "ema.decays=[0.99]", "trainer.progress_bar=false", "logger.mode=offline"]


@pytest.fixture(scope="session")
def wandb_run(wandb_records):
    """``wandb_run(out)``: (config, history rows, run directory) of the single offline run under ``out/wandb``."""

    def read(out: Path) -> tuple[dict, list[dict], Path]:
        (run_dir,) = list((out / "wandb").glob("offline-run-*"))
        config, history = {}, []
        for rec in wandb_records(run_dir):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                config = {it.key: json.loads(it.value_json) for it in rec.run.config.update if it.key != "_wandb"}
            elif kind == "history":
                history.append({it.key or "/".join(it.nested_key): json.loads(it.value_json)
                                for it in rec.history.item})
        return config, history, run_dir

    return read


@torch.no_grad()
def class_accuracy(module, n_per_class: int = 20, seed: int = 0, ema: str | None = "default") -> float:
    """Fraction of class-conditional samples (recipe sampler: DDIM-50, CFG) the FID-digits classifier agrees with."""
    from dtrain.eval.features import build_extractor

    clf = build_extractor("digits")
    labels = torch.arange(10).repeat_interleave(n_per_class)
    x = module.sample(labels=labels, generator=torch.Generator().manual_seed(seed), ema=ema)
    return float((clf.logits(x.clamp(-1, 1)).argmax(1) == labels).double().mean())


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    assert main(["fit", str(DIGITS), f"out_dir={out}", *DIGITS_SHORT]) == 0
    return out / "teacher-digits"


def test_digits_teacher_loss_falls_and_samples_improve(digits_run, wandb_run):
    from dtrain.lit.common import DiffusionModule

    trained = DiffusionModule.load_checkpoint(digits_run / "checkpoints" / "last.ckpt")
    untrained = type(trained)(trained.recipe)  # the same recipe at initialisation
    acc0, acc = class_accuracy(untrained, ema=None), class_accuracy(trained)
    print(f"class accuracy of DDIM-50 samples: untrained {acc0:.3f}, after 200 steps {acc:.3f}")
    assert acc0 < 0.25, acc0  # chance is 0.1
    assert acc >= 0.8, (acc0, acc)  # measured: 0.105 -> 0.970
    _, history, _ = wandb_run(digits_run)
    losses = [(h["trainer/global_step"], h["train/loss"]) for h in history if "train/loss" in h]
    assert [s for s, _ in losses] == [39, 79, 119, 159, 199]
    first, last = losses[0][1], sum(v for _, v in losses[-2:]) / 2
    assert last < 0.7 * first, losses


def test_digits_run_directory_and_checkpoints(digits_run):
    cfg = load_recipe(DIGITS, [f"out_dir={digits_run.parent}", *DIGITS_SHORT])
    assert OmegaConf.load(digits_run / "recipe.yaml") == cfg
    ckpts = sorted(p.name for p in (digits_run / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step0000100.ckpt", "step0000200.ckpt"]
    ck = torch.load(digits_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck["global_step"] == 200
    tags = ["0_99", "std0_100"]
    assert ck["dtrain"]["ema_tags"] == tags and ck["dtrain"]["kind"] == "teacher" and ck["dtrain"]["format"] == 1
    assert ck["dtrain"]["recipe"] == OmegaConf.to_container(cfg)
    assert ck["dtrain"]["image"] == {"shape": [1, 8, 8], "range": [-1.0, 1.0]}
    net = {k[4:] for k in ck["state_dict"] if k.startswith("net.")}
    for tag in tags:
        assert {k[len(tag) + 5:] for k in ck["state_dict"] if k.startswith(f"ema.{tag}.")} == net
    assert len(net) + 2 * len(net) == len(ck["state_dict"])
    assert sorted(p.name for p in (digits_run / "samples").iterdir()) == ["step_0000100.png", "step_0000200.png"]


def test_digits_wandb_offline_run_holds_config_scalars_images(digits_run, wandb_run):
    config, history, run_dir = wandb_run(digits_run)
    cfg = OmegaConf.to_container(OmegaConf.load(digits_run / "recipe.yaml"))
    assert config == cfg  # the resolved recipe is the run config
    keys = set().union(*history)
    assert {"train/loss", "train/grad_norm", "lr-AdamW", "trainer/global_step"} <= keys
    assert {f"loss_t/{i / 10:.1f}" for i in range(10)} <= keys  # per-timestep buckets
    lrs = [h["lr-AdamW"] for h in history if "lr-AdamW" in h]
    assert lrs[0] == pytest.approx(2e-3 * 40 / 100)  # warmup over 100 steps: the LR of step 39 is 40 / 100
    images = [h for h in history if "samples" in h or "samples/_type" in h]
    assert [h["trainer/global_step"] for h in images] == [100, 200]
    pngs = list((run_dir / "files" / "media" / "images").glob("samples_*.png"))
    assert len(pngs) == 2


def test_gmm_teacher_matches_the_mixture(tmp_path):
    """Unconditional MLP teacher on the 2-D GMM: weights within 0.05, sliced W1 near the exact-sample floor."""
    from dtrain.data.synthetic import default_gmm, sliced_wasserstein
    from dtrain.lit.common import DiffusionModule

    assert main(["fit", str(GMM), f"out_dir={tmp_path}", THREADS, "trainer.progress_bar=false",
                 "logger.mode=disabled"]) == 0
    module = DiffusionModule.load_checkpoint(tmp_path / "teacher-gmm" / "checkpoints" / "last.ckpt")
    n, gmm = 4000, default_gmm()
    x = module.sample(n, generator=torch.Generator().manual_seed(1))
    exact, _ = gmm.sample(n, generator=torch.Generator().manual_seed(2))
    exact2, _ = gmm.sample(n, generator=torch.Generator().manual_seed(3))
    floor = sliced_wasserstein(exact, exact2)  # two exact sample sets of this size
    sw = sliced_wasserstein(x, exact)
    assert gmm.weight_error(x) < 0.05
    assert sw < 2 * floor, (sw, floor)  # measured: 0.016 vs floor 0.017
    # the per-component spread is right too (a blurred or collapsed model fails this)
    k = gmm.assign(x)
    for j in range(3):
        std = float((x[k == j] - gmm.means[j].float()).std())
        assert abs(std - 0.15) < 0.03, (j, std)


def test_resume_from_last(tmp_path, capsys):
    common = [f"out_dir={tmp_path}", THREADS, "model.hidden=16", "model.depth=1", "data.batch_size=32",
              "data.num_samples=1024", "trainer.ckpt_every_n_steps=3", "trainer.progress_bar=false",
              "logger.mode=disabled"]
    assert main(["fit", str(GMM), *common, "trainer.max_steps=3"]) == 0
    assert main(["fit", str(GMM), *common, "trainer.max_steps=5", "--resume", "last"]) == 0
    ck = torch.load(tmp_path / "teacher-gmm" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck["global_step"] == 5
    assert main(["fit", str(GMM), *common, "--resume", str(tmp_path / "missing.ckpt")]) == 2
    assert "dtrain fit: --resume: checkpoint not found:" in capsys.readouterr().err


def test_a_resumed_online_run_logs_into_the_same_wandb_run(tmp_path, monkeypatch):
    """Online, --resume (a requeued SLURM job) continues the W&B run of the first job (one run on the dashboard, not
    one per requeue), also after an offline job in between; a fresh start, or an offline job (``wandb sync`` would
    replace the history of a shared id), starts a new one. Checked on the loggers' init arguments (nothing connects
    before ``.experiment``); an offline resume runs for real."""
    import re

    from dtrain.lit.fit import build_logger

    monkeypatch.setenv("WANDB_MODE", "offline")
    common = [f"out_dir={tmp_path}", THREADS, "model.hidden=16", "model.depth=1", "data.batch_size=32",
              "data.num_samples=1024", "trainer.ckpt_every_n_steps=3", "trainer.progress_bar=false",
              "logger.mode=offline", "trainer.sample_every_n_steps=0"]
    run = tmp_path / "teacher-gmm"
    assert main(["fit", str(GMM), *common, "trainer.max_steps=3"]) == 0
    first = (run / "wandb_run_id").read_text().strip()
    cfg = load_recipe(GMM, [*common, "logger.mode=online"])
    monkeypatch.delenv("WANDB_MODE")  # it would win over logger.mode (dtrain.lit.fit.logger_mode)
    init = build_logger(cfg, run, resume=True)._wandb_init
    assert init["id"] == first and init["resume"] == "allow" and init["mode"] == "online"
    assert (init["group"], init["job_type"]) == ("teacher-gmm", "train")  # a run's jobs group on the dashboard
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["fit", str(GMM), *common, "trainer.max_steps=5", "--resume", "auto"]) == 0  # offline: a new id
    names = sorted((run / "wandb").glob("offline-run-*"), key=lambda p: p.stat().st_mtime_ns)
    ids = [re.fullmatch(r"offline-run-\d{8}_\d{6}-([a-z0-9]+)(-\d+)?", p.name).group(1) for p in names]
    assert len(ids) == 2 and ids[0] == first != ids[1]
    assert (run / "wandb_run_id").read_text().strip() == first  # an offline job broke the online chain: the next
    monkeypatch.delenv("WANDB_MODE")  # online job resumed the offline job's id, not the first job's run
    assert build_logger(cfg, run, resume=True)._wandb_init["id"] == first
    assert build_logger(cfg, run, resume=False)._wandb_init["id"] not in ids
    assert (run / "wandb_run_id").read_text().strip() not in ids  # a fresh start begins a new chain


def test_a_run_that_fails_ends_its_wandb_run_failed(tmp_path, monkeypatch, wandb_records):
    """The W&B run was finished with exit code 0 whatever happened (a crash, a non-finite stop, SIGTERM): the
    dashboard showed failed jobs as finished. The exit record of the offline run holds the job's code."""
    import lightning as L

    from dtrain.lit.fit import fit

    class Boom(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                raise RuntimeError("boom")

    monkeypatch.setenv("WANDB_MODE", "offline")
    common = [f"out_dir={tmp_path}", THREADS, "model.hidden=16", "model.depth=1", "data.batch_size=32",
              "data.num_samples=1024", "trainer.progress_bar=false", "logger.mode=offline",
              "trainer.sample_every_n_steps=0", "trainer.max_steps=3"]
    with pytest.raises(RuntimeError, match="boom"):
        fit(GMM, [*common, "name=crash"], callbacks=[Boom()])
    fit(GMM, [*common, "name=fine"])
    for name, code in (("crash", 1), ("fine", 0)):
        (run_dir,) = list((tmp_path / name / "wandb").glob("offline-run-*"))
        exits = [r.exit.exit_code for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "exit"]
        assert exits == [code], (name, exits)


def test_wandb_mode_from_the_environment_wins_over_the_recipe(monkeypatch):
    """wandb tells users to set WANDB_MODE=online, and dtrain demo honoured it, but dtrain fit passed the recipe's
    logger.mode to wandb.init, which wins: an offline recipe stayed offline. A recipe's disabled (CSV logs) stays."""
    from dtrain.eval.report import logger_mode

    for env, recipe, want in (("online", "offline", "online"), ("offline", "online", "offline"),
                              ("disabled", "offline", "disabled"), ("dryrun", "online", "offline"),
                              ("online", "disabled", "disabled"), (None, "offline", "offline"), ("bogus", "online",
                                                                                                   "online")):
        if env is None:
            monkeypatch.delenv("WANDB_MODE", raising=False)
        else:
            monkeypatch.setenv("WANDB_MODE", env)
        assert logger_mode(recipe) == want, (env, recipe)


def test_cli_dry_run_and_recipe_errors():
    from dtrain.models import build_model, count_params

    env = {"PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "dtrain.cli", "fit", str(DIGITS), "model.channels=32", "--dry-run"],
                         capture_output=True, text=True, cwd=ROOT, env={**_env(), **env}, timeout=120)
    assert run.returncode == 0, run.stderr
    cfg = load_recipe(DIGITS, ["model.channels=32"])
    n = count_params(build_model(cfg.model))
    assert OmegaConf.create(run.stdout.split("# parameters")[0]) == cfg
    assert f"# parameters: {n:,} (unet)" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "dtrain.cli", "fit", str(DIGITS), "trainer.max_step=5"],
                         capture_output=True, text=True, cwd=ROOT, env={**_env(), **env}, timeout=120)
    assert bad.returncode == 2
    assert "command line: trainer.max_step: unknown key" in bad.stderr and "max_steps" in bad.stderr


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.mark.timeout(300)
def test_ddp_two_cpu_processes(tmp_path, wandb_run):
    """`dtrain fit` under DDP (2 CPU processes, gloo): one run directory, one W&B run, rank 0's checkpoint; a global
    batch of 64 is 32 per rank."""
    cmd = [sys.executable, "-m", "dtrain.cli", "fit", str(GMM), f"out_dir={tmp_path}", THREADS,
           "trainer.accelerator=cpu", "trainer.devices=2", "strategy.name=ddp", "trainer.max_steps=4",
           "trainer.ckpt_every_n_steps=2", "trainer.log_every_n_steps=2", "trainer.progress_bar=false",
           "model.hidden=16", "model.depth=1", "trainer.global_batch_size=64", "data.num_samples=1024",
           "logger.mode=offline"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**_env(), "PYTHONPATH": str(ROOT)},
                         timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "teacher-gmm"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt", "step0000002.ckpt",
                                                                       "step0000004.ckpt"]
    ck = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck["global_step"] == 4 and ck["dtrain"]["ema_tags"] == ["0_99"]
    config, history, _ = wandb_run(out)  # exactly one run (rank 0)
    assert config["trainer"]["devices"] == 2 and config["data"]["batch_size"] == 32
    assert (run.stdout + run.stderr).count("batch: 32 per rank x 2 rank(s) x 1 accumulation step(s) = 64") == 1
    assert [h["trainer/global_step"] for h in history if "train/loss" in h] == [1, 3]
    perf = [h for h in history if "perf/steps_per_s" in h]  # throughput of each log interval, over both ranks
    assert len(perf) == 2 and all(h["perf/steps_per_s"] > 0 for h in perf)
    assert all(h["perf/samples_per_s"] == pytest.approx(64 * h["perf/steps_per_s"]) for h in perf)


def test_online_wandb_without_a_login_is_one_line_before_any_work(tmp_path, monkeypatch, cli_error, digits_bundle):
    """logger.mode online (or --wandb online) without credentials: wandb's UsageError traceback and exit 1, for
    dtrain eval after the whole sweep."""
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    err = cli_error("fit", str(GMM), f"out_dir={tmp_path}", "logger.mode=online", THREADS)
    assert "logger.mode (or WANDB_MODE): online W&B needs a login: run `wandb login`" in err, err
    assert not (tmp_path / "teacher-gmm" / "checkpoints").exists()
    err = cli_error("eval", str(digits_bundle), "--samplers", "ddim:2", "--num", "10", "--wandb", "online",
                    "--out", str(tmp_path / "eval"))
    assert err.startswith("dtrain eval: --wandb: online W&B needs a login") and not (tmp_path / "eval").exists(), err

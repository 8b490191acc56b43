"""Consistency models through ``dtrain fit`` on CPU: a 1-step CD student on the 2-D GMM (exact teacher) exported to a
bundle that samples bit for bit like the training module, crash-exact resume, and CD / iCT from a real digits teacher
checkpoint (initialisation, checkpoint metadata, export -> load_bundle -> sample)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dtrain.cli import main
from dtrain.config import load_recipe
from dtrain.data import build_datamodule
from dtrain.data.synthetic import default_gmm, sliced_wasserstein
from dtrain.diffusion.schedule import schedule_from_config
from dtrain.export import bundle as B
from dtrain.export import checkpoint as C
from dtrain.lit.common import DiffusionModule
from dtrain.lit.consistency import ConsistencyModule
from dtrain.lit.fit import build_trainer, close_loggers
from dtrain.samplers.few_step import ConsistencyModel

ROOT = Path(__file__).resolve().parents[2] / "recipes"
QUIET = ["trainer.cpu_threads=1", "trainer.progress_bar=false", "logger.mode=disabled", "trainer.accelerator=cpu",
         "trainer.devices=1"]


def fit_with(cfg, module, ckpt_path=None):
    trainer = build_trainer(cfg, Path(cfg.out_dir) / cfg.name)
    try:
        trainer.fit(module, datamodule=build_datamodule(cfg.data, seed=cfg.seed), ckpt_path=ckpt_path)
    finally:
        close_loggers(trainer)
    return Path(cfg.out_dir) / cfg.name / "checkpoints" / "last.ckpt"


def test_cd_gmm_one_step_student_exported_and_sampled(tmp_path):
    """CD from scratch with the exact mixture denoiser as teacher: the bundle's 1-step samples get the mixture weights
    within 0.1 and equal the module's own samples bit for bit. A smaller run than the recipe's (measured: weight error
    0.011, sliced W1 0.054 in 600 steps, about 15 s; the recipe: 0.011 and 0.051)."""
    cfg = load_recipe(ROOT / "cm" / "cd_gmm.yaml", [f"out_dir={tmp_path}", *QUIET, "trainer.max_steps=600",
                                                   "data.batch_size=256", "model.hidden=64", "model.depth=2",
                                                   "ema.decays=[0.95]"])
    gmm = default_gmm()
    module = ConsistencyModule(cfg, teacher=gmm.denoiser(schedule_from_config(cfg.schedule)))
    ckpt = fit_with(cfg, module)

    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    meta, sd = ck["dtrain"], ck["state_dict"]
    assert meta["kind"] == "cd" and meta["bundle_kind"] == "consistency" and meta["teacher"]["kind"] == "ExactDenoiser"
    assert meta["consistency"] == {"variant": "cd", "num_scales": 18, "target_ema": 0.95, "t_min": 1e-3}
    net = {k[4:] for k in sd if k.startswith("net.")}
    assert {k[len("target.0_95."):] for k in sd if k.startswith("target.0_95.")} == net
    assert not any(k.startswith("teacher.") for k in sd)

    pipe = B.load_bundle(C.export_checkpoint(ckpt, tmp_path / "bundle"))
    assert isinstance(pipe.denoiser, ConsistencyModel) and pipe.info["sampler"]["name"] == "consistency"
    restored = DiffusionModule.load_checkpoint(ckpt).eval()
    for nfe in (1, 2):
        ref = restored.sample(8, nfe=nfe, generator=torch.Generator().manual_seed(3))
        assert torch.equal(pipe.sample(8, nfe=nfe, generator=torch.Generator().manual_seed(3)), ref)
    x = pipe.sample(4000, generator=torch.Generator().manual_seed(1))
    exact, _ = gmm.sample(4000, generator=torch.Generator().manual_seed(2))
    print(f"CD GMM 1-step: weight error {gmm.weight_error(x):.4f}, sliced W1 {sliced_wasserstein(x, exact):.4f}")
    assert gmm.weight_error(x) < 0.1
    assert sliced_wasserstein(x, exact) < 0.15  # exact samples: 0.017; the teacher's DDIM-1: 0.68
    k = gmm.assign(x)  # the per-component spread (data: 0.15): samples collapsed onto the means passed the above
    stds = [float((x[k == j] - gmm.means[j].float()).std()) for j in range(3)]
    assert all(0.12 < sd < 0.3 for sd in stds), stds  # measured: 0.20-0.24 (a small 1-step student is blurrier)


@pytest.fixture(scope="module")
def gmm_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("gmm_teacher")
    assert main(["fit", str(ROOT / "teacher" / "gmm.yaml"), f"out_dir={out}", *QUIET, "trainer.max_steps=20",
                 "model.hidden=16", "model.depth=1", "data.batch_size=64", "data.num_samples=2048"]) == 0
    return out / "teacher-gmm" / "checkpoints" / "last.ckpt"


def test_resume_repeats_the_uninterrupted_run(tmp_path, gmm_teacher):
    """`dtrain fit --resume last` after a stop at step 3 ends at step 6 with the uninterrupted run's weights, EMA and
    target network, bit for bit (intervals and noise are seeded by the step; the target updates before each loss)."""
    common = [f"teacher={gmm_teacher}", *QUIET, "model.hidden=16", "model.depth=1", "data.batch_size=32",
              "data.num_samples=1024", "trainer.ckpt_every_n_steps=3"]
    recipe = str(ROOT / "cm" / "cd_gmm.yaml")
    assert main(["fit", recipe, f"out_dir={tmp_path / 'a'}", *common, "trainer.max_steps=6"]) == 0
    assert main(["fit", recipe, f"out_dir={tmp_path / 'b'}", *common, "trainer.max_steps=3"]) == 0
    assert main(["fit", recipe, f"out_dir={tmp_path / 'b'}", *common, "trainer.max_steps=6", "--resume", "last"]) == 0
    a, b = (torch.load(tmp_path / d / "cd-gmm" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
            for d in ("a", "b"))
    assert a["global_step"] == b["global_step"] == 6
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert a["dtrain"]["teacher"]["sha256"] == C.sha256_file(gmm_teacher)
    started = torch.load(tmp_path / "b" / "cd-gmm" / "checkpoints" / "step0000003.ckpt", weights_only=True)
    assert not torch.equal(started["state_dict"]["net.out.2.weight"], a["state_dict"]["net.out.2.weight"])


@pytest.mark.parametrize("recipe", ["cd_digits", "ict_digits"])
def test_digits_student_from_a_teacher_checkpoint(tmp_path, digits_teacher, recipe):
    over = [f"teacher={digits_teacher}", f"out_dir={tmp_path}", *QUIET, "model.channels=16", "trainer.max_steps=3",
            "data.batch_size=16", "trainer.sample_every_n_steps=0", "trainer.ckpt_every_n_steps=0", "name=s"]
    cfg = load_recipe(ROOT / "cm" / f"{recipe}.yaml", over)
    teacher, _ = C.load_teacher(digits_teacher)
    module = ConsistencyModule(cfg)
    module.setup("fit")  # loads the teacher's EMA weights into the student, its EMA copies and its target
    for name, net in [("net", module.net), *((f"ema {t}", module.ema[t]) for t in module.ema.tags),
                      *((f"target {t}", module.target[t]) for t in (module.target.tags if module.target else []))]:
        for k, v in net.state_dict().items():
            assert torch.equal(v, teacher.net.state_dict()[k]), (name, k)
    assert (module.teacher is None) == (recipe == "ict_digits")  # iCT uses the teacher only for the first weights

    assert main(["fit", str(ROOT / "cm" / f"{recipe}.yaml"), *over]) == 0
    ckpt = tmp_path / "s" / "checkpoints" / "last.ckpt"
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    kind = recipe.split("_")[0]
    assert ck["dtrain"]["kind"] == kind and ck["dtrain"]["teacher"]["sha256"] == C.sha256_file(digits_teacher)
    assert any(k.startswith("target.") for k in ck["state_dict"]) == (kind == "cd")  # iCT: stop-grad, no copy
    pipe = B.load_bundle(C.export_checkpoint(ckpt, tmp_path / "bundle"))
    assert pipe.kind == "consistency" and pipe.info["provenance"]["kind"] == kind
    x = pipe.sample(20, nfe=2, labels=list(range(10)) * 2, generator=torch.Generator().manual_seed(0))
    assert x.shape == (20, 1, 8, 8) and bool(x.isfinite().all())


def test_cd_grid_tool_tables_a_real_teacher(digits_teacher, capsys, tmp_path, load_tool):
    """tools/cd_grid.py on a teacher checkpoint: one row per (spacing, N), each the ``target_bias`` of that grid, and a
    clear exit 2 naming the field for a bad spacing or a missing file."""
    from dtrain.methods.consistency import consistency_times, target_bias
    from dtrain.samplers.base import initial_noise

    tool = load_tool("cd_grid")
    assert tool.main([str(digits_teacher), "--num-scales", "4,6", "--spacings", "lambda,uniform", "--num", "20",
                      "--refine", "2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [("lambda", "4"), ("lambda", "6"), ("uniform", "4"), ("uniform", "6")]
    teacher, _ = C.load_teacher(digits_teacher)
    x = initial_noise(teacher.schedule, 20, (1, 8, 8), torch.Generator().manual_seed(0))
    want = target_bias(teacher, consistency_times(teacher.schedule, 6, "uniform"), x, torch.arange(20) % 10, refine=2)
    assert float(rows[3][2]) == pytest.approx(want, abs=1e-4) and want > 0
    assert tool.main([str(digits_teacher), "--spacings", "trailing", "--num", "4"]) == 2
    assert "--spacings: unknown 'trailing'; choose from rho" in capsys.readouterr().err
    assert tool.main([str(tmp_path / "none.ckpt")]) == 2
    assert "none.ckpt" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["ct", "ict"])
def test_curriculum_state_is_logged(tmp_path, variant):
    """CT / iCT log the N(k) each logged batch trained with (and CT its target decay mu(k)) beside train/loss."""
    import csv
    import math

    from dtrain.methods import consistency as CM

    assert main(["fit", str(ROOT / "cm" / "cd_gmm.yaml"), f"method.name={variant}", f"out_dir={tmp_path}",
                 *QUIET, "model.hidden=16", "model.depth=1", "data.batch_size=32",
                 "data.num_samples=1024", "trainer.max_steps=9", "trainer.log_every_n_steps=2"]) == 0
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    m = CM.resolve({"name": variant})
    want = {k: CM.num_scales(variant, k, 9, s0=m["scales_start"], s1=m["scales_end"]) for k in range(9)}
    got = {int(r["step"]): float(r["train/num_scales"]) for r in rows}
    assert sorted(got) == [1, 3, 5, 7, 8] and got == {k: want[k] for k in got}
    assert len(set(got.values())) > 1  # the curriculum moved within the run
    if variant == "ct":
        mu0 = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)["dtrain"]["consistency"]["target_ema"]
        assert all(float(r["train/target_mu"]) == pytest.approx(math.exp(2 * math.log(mu0) / want[int(r["step"])]))
                   for r in rows)
    else:
        assert all(not r.get("train/target_mu") for r in rows)


@pytest.mark.parametrize("recipe,extra", [("cm/cd_gmm.yaml", []), ("flowmap/ctm_gmm.yaml", ["method.target_ema=0.9"])])
def test_target_network_runs_beside_a_bf16_student(tmp_path, gmm_teacher, recipe, extra):
    """Under bf16-true (as under DeepSpeed bf16) the batch and the student are bf16 while the EMA copies, CD's and
    CTM's target network among them, stay fp32: the denoiser feeds each network its own dtype (this crashed with
    'mat1 and mat2 must have the same dtype')."""
    assert main(["fit", str(ROOT / recipe), f"teacher={gmm_teacher}", f"out_dir={tmp_path}", *QUIET,
                 "model.hidden=16", "model.depth=1", "data.batch_size=32", "data.num_samples=1024",
                 "trainer.precision=bf16-true", "trainer.max_steps=3", *extra]) == 0
    ck = torch.load(next(tmp_path.rglob("last.ckpt")), map_location="cpu", weights_only=True)
    sd = ck["state_dict"]
    assert ck["global_step"] == 3 and sd["net.out.2.weight"].dtype == torch.bfloat16
    target = [v for k, v in sd.items() if k.startswith("target.") and v.is_floating_point()]
    assert target and all(v.dtype == torch.float32 and bool(v.isfinite().all()) for v in target)


def test_a_resume_keeps_the_teacher_it_was_distilled_from(tmp_path, digits_teacher, capsys):
    """--resume took any teacher=: a student of a teacher run that kept training (its last.ckpt rewritten) went on
    against the new teacher, its target changed mid-run and its provenance forgot the first one."""
    other = tmp_path / "other.ckpt"
    ck = torch.load(digits_teacher, map_location="cpu", weights_only=True)
    ck["global_step"] += 1  # another file: the teacher run went on
    torch.save(ck, other)
    over = [f"out_dir={tmp_path}", *QUIET, "model.channels=16", "data.batch_size=16", "trainer.sample_every_n_steps=0",
            "name=s"]
    recipe = str(ROOT / "cm" / "cd_digits.yaml")
    assert main(["fit", recipe, f"teacher={digits_teacher}", "trainer.max_steps=2", *over]) == 0
    capsys.readouterr()
    assert main(["fit", recipe, f"teacher={other}", "trainer.max_steps=3", *over, "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert f"teacher: {other} (sha256 " in err and "is not the teacher the checkpoint was trained against" in err
    assert main(["fit", recipe, f"teacher={digits_teacher}", "trainer.max_steps=3", *over, "--resume", "auto"]) == 0
    assert torch.load(tmp_path / "s" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3

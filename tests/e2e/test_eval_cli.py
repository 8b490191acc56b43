"""``dtrain eval CKPT``: a format-1 checkpoint of a tiny digits UNet -> table, JSON, plot, grids; the JSON rows
equal a direct ``fid_sweep`` of the same denoiser; bad reference statistics and specs fail in one clear line."""

from __future__ import annotations

import json

import pytest
import torch

from dtrain.eval.features import build_extractor
from dtrain.eval.fid import RefStats, load_ref
from dtrain.eval.sweep import fid_sweep

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.channels=16", "model.channel_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[]",
        "sampler.guidance=1.5", "logger.mode=disabled"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from dtrain.config import load_recipe, to_container
    from dtrain.diffusion.schedule import schedule_from_config
    from dtrain.models import build_denoiser, build_model

    cfg = to_container(load_recipe("recipes/teacher/digits.yaml", TINY))
    torch.manual_seed(0)
    net = build_model(cfg["model"])
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "dtrain": {"format": 1, "recipe": cfg, "ema_tags": [], "kind": "teacher"}}, path)
    return path, build_denoiser(cfg["model"], schedule_from_config(cfg["schedule"]), net).eval()


@pytest.mark.timeout(120)
def test_dtrain_eval_writes_the_sweep(ckpt, tmp_path, capsys):
    from dtrain.cli import main

    path, den = ckpt
    out = tmp_path / "eval"
    rc = main(["eval", str(path), "--samplers", "ddim:1,2", "ddpm:2", "--num-samples", "30", "--batch-size", "16",
               "--out", str(out), "--seed", "4"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "FID vs NFE (guidance w = 1.5)" in table and "dpm++" not in table and "ddpm" in table
    rec = json.loads((out / "fid_vs_nfe.json").read_text())
    assert rec["guidance"] == 1.5 and rec["ref_stats"] == "digits:train" and rec["ref_count"] == 1347
    assert [(r["sampler"], r["nfe"], r["num"]) for r in rec["rows"]] == [("ddim", 1, 30), ("ddim", 2, 30),
                                                                         ("ddpm", 2, 30)]
    ext = build_extractor("digits")
    direct = fid_sweep(den, ["ddim:1,2", "ddpm:2"], num=30, batch_size=16, shape=(1, 8, 8), extractor=ext,
                       ref=load_ref("digits:train", ext), num_classes=10, guidance=1.5, seed=4, progress=False)
    assert [r["fid"] for r in rec["rows"]] == pytest.approx([r.fid for r in direct], rel=1e-9)
    assert (out / "fid_vs_nfe.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["ddim_nfe1.png", "ddim_nfe2.png", "ddpm_nfe2.png"]


def test_dtrain_eval_refuses_mismatched_stats_and_bad_specs(ckpt, tmp_path, capsys):
    from dtrain.cli import main

    path, _ = ckpt
    x = torch.randn(20, 3, 8, 8)
    RefStats(x.flatten(1).mean(0).double().numpy(), torch.cov(x.flatten(1).T).double().numpy(),
             {"extractor": "raw", "weights_sha256": "x", "num_features": 192, "resolution": [3, 8, 8],
              "count": 20}).save(tmp_path / "raw.npz")
    assert main(["eval", str(path), "--samplers", "ddim:1", "--num", "4", "--ref-stats", str(tmp_path / "raw.npz"),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "dtrain eval: --ref-stats: reference statistics" in err  # the file's own extractor (raw) is taken:
    assert "resolution: file has [3, 8, 8], evaluation uses [1, 8, 8]" in err  # what differs is the images
    assert "Traceback" not in err
    assert main(["eval", str(path), "--samplers", "ddim:1", "--num", "4", "--ref-stats", str(tmp_path / "raw.npz"),
                 "--extractor", "digits", "--out", str(tmp_path / "o")]) == 2  # named, it is checked against them
    assert "extractor: file has 'raw', evaluation uses 'digits'" in capsys.readouterr().err
    assert main(["eval", str(path), "--samplers", "nope:1", "--num", "4"]) == 2
    assert "dtrain eval: --samplers: unknown sampler 'nope'" in capsys.readouterr().err


def test_other_images_need_another_extractor_whose_stats_name_it(tmp_path, capsys):
    """3x32x32 images with the default 'digits' extractor failed on the injected digits:train statistics ("resolution:
    file has [1, 8, 8]"); a 'raw' statistics file without --extractor failed with "file has 'raw', evaluation uses
    'digits'". Now the first says which extractors fit, and the file's own extractor is taken."""
    from dtrain.cli import main
    from dtrain.config import load_recipe, to_container
    from dtrain.eval.fid import compute_ref_stats
    from dtrain.models import build_model

    cfg = to_container(load_recipe("recipes/teacher/patches.yaml", ["model.channels=16", "model.channel_mult=[1]",
                                                                     "model.num_res_blocks=1",
                                                                     "model.attn_resolutions=[]"]))
    torch.manual_seed(0)
    path = tmp_path / "rgb.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in build_model(cfg["model"]).state_dict().items()},
                "dtrain": {"format": 1, "recipe": cfg, "ema_tags": [], "kind": "teacher"}}, path)
    args = ["eval", str(path), "--samplers", "ddim:1", "--num", "4", "--batch-size", "4"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert ("dtrain eval: eval.feature_extractor: the 'digits' extractor (FID-digits) takes 1x8x8 images and this "
            "model makes 3x32x32: give --extractor raw") in capsys.readouterr().err
    raw = build_extractor("raw", shape=(3, 32, 32))
    compute_ref_stats(raw, [torch.rand(40, 3, 32, 32) * 2 - 1], source="noise").save(tmp_path / "raw.npz")
    assert main([*args, "--ref-stats", str(tmp_path / "raw.npz"), "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "fid_vs_nfe.json").read_text())["extractor"] == "raw"


@pytest.mark.timeout(120)
def test_a_rerun_scores_only_the_points_it_has_not(ckpt, tmp_path, monkeypatch, capsys):
    """Every point is kept in <out>/points/ as it is scored: a rerun (a preempted eval array task requeued) with
    more NFEs samples only the new point and reports the kept ones unchanged; another seed, or --recompute,
    scores everything again."""
    import dtrain.eval.sweep as sweep
    from dtrain.cli import main

    path, _ = ckpt
    out = tmp_path / "eval"
    sampled, real = [], sweep.generate
    monkeypatch.setattr(sweep, "generate", lambda den, name, n, *a, **kw: (sampled.append((name, n)),
                                                                          real(den, name, n, *a, **kw))[1])
    args = ["eval", str(path), "--num-samples", "20", "--batch-size", "10", "--out", str(out), "--seed", "4"]
    assert main([*args, "--samplers", "ddim:1,2"]) == 0
    first = json.loads((out / "fid_vs_nfe.json").read_text())["rows"]
    assert sampled == [("ddim", 1), ("ddim", 2)] and len(list((out / "points").glob("*.json"))) == 2
    from dtrain.eval.commands import _stats_sha256

    key = json.loads((out / "points" / "ddim_steps1.json").read_text())["key"]
    ref = load_ref("digits:train", build_extractor("digits"))
    assert key["ref_sha256"] == _stats_sha256(ref) and key["batch_size"] == 10  # the reference by its content
    other = RefStats(ref.mu + 1e-3, ref.sigma, ref.meta)  # regenerated at the same path, same count
    assert other.count == ref.count and _stats_sha256(other) != key["ref_sha256"]
    sampled.clear()
    capsys.readouterr()
    assert main([*args, "--samplers", "ddim:1,2,4"]) == 0
    said = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("FID sweep ")]  # not a terminal (a
    assert [ln.split(": FID ")[0] for ln in said] == ["FID sweep 1/3: ddim NFE 1", "FID sweep 2/3: ddim NFE 2",
                                                      "FID sweep 3/3: ddim NFE 4"]  # SLURM log): a line a point
    assert said[0].endswith("(cached: scored by an earlier run)") and said[2].endswith(" s)")
    again = json.loads((out / "fid_vs_nfe.json").read_text())["rows"]
    assert sampled == [("ddim", 4)] and again[:2] == first and again[2]["nfe"] == 4
    assert (out / "samples" / "ddim_nfe1.png").is_file()  # written when that point was scored
    sampled.clear()
    assert main([*args[:-1], "5", "--samplers", "ddim:1"]) == 0  # another seed: other samples
    assert main([*args, "--samplers", "ddim:1", "--recompute"]) == 0
    assert sampled == [("ddim", 1), ("ddim", 1)]
    sampled.clear()  # another batch size: a stochastic sampler's noise is drawn per global batch
    assert main([*args[:5], "5", *args[6:], "--samplers", "ddim:1"]) == 0
    assert sampled == [("ddim", 1)]
    assert main([*args, "--samplers", "ddim:1"]) == 0  # back to batch 10: the folder's point is this run's
    sampled.clear()  # another guidance scale: other samples (the key's guidance was never exercised)
    assert main([*args, "--samplers", "ddim:1", "--guidance", "3"]) == 0
    assert sampled == [("ddim", 1)]
    other = tmp_path / "same_path.ckpt"  # other weights written at the same path: the key's sha256
    ck = torch.load(path, weights_only=True)
    torch.save(ck, other)
    again = ["eval", str(other), *args[2:], "--samplers", "ddim:1"]
    assert main(again) == 0
    ck["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ck["state_dict"].items()}
    torch.save(ck, other)
    sampled.clear()
    assert main(again) == 0
    assert sampled == [("ddim", 1)]
    ck["state_dict"].update({f"ema.0.999.{k[4:]}": v + 0.01 for k, v in ck["state_dict"].items()
                             if k.startswith("net.")})  # one file, two sets of weights: the key's ema
    ck["dtrain"]["ema_tags"] = ["0.999"]
    torch.save(ck, other)
    sampled.clear()
    assert main(again) == 0 and main([*again, "--ema", "raw"]) == 0
    assert sampled == [("ddim", 1), ("ddim", 1)]


def test_two_bundles_of_one_name_do_not_share_the_default_folder(digits_bundle, tmp_path, monkeypatch, cli_error):
    """The default --out is runs/eval/<bundle name>: a second bundle called alike silently overwrote the first one's
    fid_vs_nfe.json, plot and sample grids."""
    import shutil

    from dtrain.cli import main

    monkeypatch.chdir(tmp_path)
    other = tmp_path / "elsewhere" / digits_bundle.name
    shutil.copytree(digits_bundle, other)
    args = ["--samplers", "ddim:1", "--num", "10", "--batch-size", "10"]
    assert main(["eval", str(digits_bundle), *args]) == 0
    assert main(["eval", str(digits_bundle), *args]) == 0  # the same model again: its folder
    err = cli_error("eval", str(other), *args)
    assert f"--out: the default folder runs/eval/{digits_bundle.name} holds the evaluation of another model" in err
    assert main(["eval", str(other), *args, "--out", str(tmp_path / "mine")]) == 0

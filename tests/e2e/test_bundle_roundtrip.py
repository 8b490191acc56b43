"""A real (tiny, few-step) teacher from ``dtrain fit`` -> checkpoint -> ``dtrain export`` -> bundle -> samples that
equal the training module's own samples bit for bit on CPU, for every EMA copy, with and without guidance."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dtrain.cli import main
from dtrain.export import bundle as B
from dtrain.export import checkpoint as C
from dtrain.export import commands
from dtrain.lit.common import DiffusionModule

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "teacher" / "digits.yaml"
OVERRIDES = ["model.channels=16", "trainer.max_steps=4", "trainer.accelerator=cpu", "trainer.devices=1",
             "trainer.sample_every_n_steps=0", "trainer.progress_bar=false", "logger.mode=disabled",
             "data.batch_size=32", "sampler.nfe=3", "ema.decays=[0.9,0.99]", "ema.stds=[0.1]", "name=rt"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("rt")
    assert main(["fit", str(RECIPE), *OVERRIDES, f"out_dir={tmp}"]) == 0
    ckpt = tmp / "rt" / "checkpoints" / "last.ckpt"
    module = DiffusionModule.load_checkpoint(ckpt).eval()  # the training module, restored from its checkpoint
    yield module, ckpt, tmp
    torch.set_num_threads(n)


@pytest.mark.parametrize("ema", ["0.9", "0.99", "std0.1", "raw"])
def test_export_load_sample_equals_training_module(trained, ema):
    module, ckpt, tmp = trained
    args = commands.add_export_args(argparse.ArgumentParser()).parse_args(
        [str(ckpt), "--out", str(tmp / f"b{ema}"), "--ema", ema])
    pipe = B.load_bundle(commands.run_export(args))
    tag = C.ema_tag(ema)
    labels = torch.tensor([0, 3, 7, 9, 10, 5])  # 10: the null class
    for kw in ({}, {"guidance": 1.0, "nfe": 5}, {"sampler": "ddpm", "nfe": 4}):
        ref = module.sample(labels=labels, ema=tag, generator=torch.Generator().manual_seed(5), **kw)
        got = pipe.sample(6, labels=labels, generator=torch.Generator().manual_seed(5), clip=False,
                          w=kw.get("guidance"), nfe=kw.get("nfe"), sampler=kw.get("sampler"))
        assert torch.equal(got, ref), kw
    assert pipe.info["weights"]["ema"] == tag and pipe.info["sampler"]["guidance"] == 2.0
    other = module.sample(labels=labels, ema="0_99" if tag != "0_99" else None,
                          generator=torch.Generator().manual_seed(5))
    mine = pipe.sample(6, labels=labels, generator=torch.Generator().manual_seed(5), clip=False)
    assert not torch.allclose(other, mine, atol=1e-4)  # the copies differ, so equality above means something


def test_bundle_metadata_from_real_checkpoint(trained):
    module, ckpt, tmp = trained
    out = C.export_checkpoint(ckpt, tmp / "meta", ema="auto")
    info = json.loads((out / "dtrain.json").read_text())
    assert info["weights"]["ema"] == module.default_ema == "0_9" and module.ema_tags == ["0_9", "0_99", "std0_100"]
    assert info["class_names"] == [str(i) for i in range(10)]
    assert info["image"] == {"shape": [1, 8, 8], "range": [-1.0, 1.0]}
    assert info["provenance"]["recipe"] == json.loads(json.dumps(module.recipe))
    assert info["provenance"]["global_step"] == 4 and info["provenance"]["kind"] == "teacher"
    assert info["model"]["param"] == "v" and info["model"]["clip_x0"] == 1.0 and info["schedule"]["kind"] == "cosine"
    assert info["weights"]["num_params"] == module.num_params()
    assert info["provenance"]["recipe_hash"] == torch.load(ckpt, weights_only=True)["dtrain"]["recipe_hash"]


def test_teacher_from_checkpoint_and_bundle(trained):
    module, ckpt, tmp = trained
    out = C.export_checkpoint(ckpt, tmp / "teach", ema="0.99")
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.05, 0.3, 0.6, 1.0], dtype=torch.float64)
    y = torch.tensor([1, 2, 3, 10])
    ref = module.denoiser_for("0_99")(x, t, y)
    for src in (out, ckpt):
        den, info = C.load_teacher(src, ema="0.99")
        assert torch.equal(den(x, t, y), ref) and info["ref"]["ema"] == "0_99"


def test_bf16_bundle_is_close_not_equal(trained):
    module, ckpt, tmp = trained
    pipe = B.load_bundle(C.export_checkpoint(ckpt, tmp / "bf16", ema="0.9", dtype="bf16"))
    labels = torch.arange(6)
    ref = module.sample(labels=labels, ema="0_9", generator=torch.Generator().manual_seed(1), guidance=1.0)
    got = pipe.sample(6, labels=labels, w=1.0, generator=torch.Generator().manual_seed(1), clip=False)
    assert not torch.equal(got, ref)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_cli_export_then_sample(trained):
    module, ckpt, tmp = trained
    assert main(["export", str(ckpt), "--out", str(tmp / "cli"), "--ema", "0.99", "--nfe", "2"]) == 0
    assert main(["export", str(ckpt), "--out", str(tmp / "cli")]) == 2  # exists: one line, no traceback
    assert main(["sample", str(tmp / "cli"), "--num", "12", "--seed", "4", "--out", str(tmp / "s.npz")]) == 0
    assert main(["sample", str(tmp / "cli"), "--num", "12", "--out", str(tmp / "grid.png")]) == 0
    z = np.load(tmp / "s.npz")
    labels = torch.arange(12) % 10
    ref = module.sample(labels=labels, ema="0_99", nfe=2, generator=torch.Generator().manual_seed(4))
    assert np.array_equal(z["samples"], ref.clamp(-1, 1).numpy()) and z["labels"].tolist() == labels.tolist()
    assert z["images"].shape == (12, 8, 8, 1) and z["images"].dtype == np.uint8
    assert (tmp / "grid.png").stat().st_size > 0
    for bs in ("5", "1"):  # x_T is one draw: a deterministic sampler's samples do not depend on the batch split
        assert main(["sample", str(tmp / "cli"), "--num", "12", "--seed", "4", "--batch-size", bs, "--out",
                     str(tmp / f"s{bs}.npz")]) == 0
        np.testing.assert_allclose(np.load(tmp / f"s{bs}.npz")["samples"], z["samples"], rtol=0, atol=1e-5)

"""Inference bundles: export from a format-1 checkpoint, load without pickle, sample bit-exactly, reject bad files."""

from __future__ import annotations

import argparse
import copy
import json
import math
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dtrain.diffusion.denoiser import Denoiser
from dtrain.diffusion.guidance import CFGDenoiser
from dtrain.diffusion.schedule import schedule_from_config
from dtrain.errors import InputError
from dtrain.export import bundle as B
from dtrain.export import checkpoint as C
from dtrain.export import commands
from dtrain.models import build_denoiser, build_model
from dtrain.samplers import run

# A tiny real UNet (digits-shaped but 4x4, 3 classes) keeps every test well under a second.
MODEL = {"name": "unet", "in_channels": 1, "resolution": 4, "channels": 8, "channel_mult": [1, 2],
         "num_res_blocks": 1, "attn_resolutions": [2], "num_heads": 2, "dropout": 0.0, "num_classes": 3,
         "param": "eps", "sigma_data": 0.5, "input_scaling": False, "clip_x0": None}
RECIPE = {"name": "t", "seed": 0, "teacher": None, "model": MODEL,
          "schedule": {"name": "ddpm", "T": 100, "kind": None, "beta_start": None, "beta_end": None},
          "sampler": {"name": "ddim", "nfe": 3, "spacing": None, "eta": None, "guidance": 1.0}}


def make_ckpt(path: Path, *, tags=("0_999",), model=None, kind="teacher", seed=0, **meta) -> tuple[dict, Path]:
    """A format-1 checkpoint as ``dtrain.lit`` writes it: raw net and EMA copies with different weights."""
    recipe = copy.deepcopy({**RECIPE, "model": model or MODEL})
    torch.manual_seed(seed)
    net = build_model(recipe["model"])
    sd = {f"net.{k}": v + 0.1 * torch.randn_like(v) for k, v in net.state_dict().items()}  # "trained" (no zeros)
    for j, tag in enumerate(tags):
        for k in net.state_dict():
            sd[f"ema.{tag}.{k}"] = sd[f"net.{k}"] + 0.02 * (j + 1) * torch.randn_like(sd[f"net.{k}"])
    ckpt = {"state_dict": sd, "global_step": 7, "epoch": 0,
            "dtrain": {"format": 1, "recipe": recipe, "ema_tags": list(tags), "kind": kind, "recipe_hash": "ab" * 32,
                       **meta}}
    torch.save(ckpt, path)
    return ckpt, path


def ema_net(ckpt: dict, tag: str | None) -> nn.Module:
    net = build_model(ckpt["dtrain"]["recipe"]["model"])
    pre = "net." if tag is None else f"ema.{tag}."
    net.load_state_dict({k[len(pre):]: v for k, v in ckpt["state_dict"].items() if k.startswith(pre)})
    return net.eval()


@pytest.fixture
def exported(tmp_path):
    ckpt, path = make_ckpt(tmp_path / "t.ckpt")
    out = C.export_checkpoint(path, tmp_path / "bundle")
    return ckpt, out


# ---------------------------------------------------------------------------------------------
# Round trip


@pytest.mark.parametrize("sampler,nfe", [("ddim", 3), ("ddpm", 4), ("heun", 3)])
def test_round_trip_bit_exact(exported, sampler, nfe):
    """export -> load -> sample equals sampling the checkpoint's EMA network directly, bit for bit."""
    ckpt, out = exported
    pipe = B.load_bundle(out)
    got = pipe.sample(6, nfe=nfe, sampler=sampler, generator=torch.Generator().manual_seed(1), clip=False)

    schedule = schedule_from_config(RECIPE["schedule"])
    den = build_denoiser(MODEL, schedule, ema_net(ckpt, "0_999"))
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(6, 1, 4, 4, generator=g) * float(schedule.sigma(schedule.t_max))
    ref = run(sampler, den, x_T, nfe, cond=torch.arange(6) % 3, generator=g)
    assert torch.equal(got, ref)
    raw = run(sampler, build_denoiser(MODEL, schedule, ema_net(ckpt, None)), x_T, nfe, cond=torch.arange(6) % 3,
              generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(got, raw)  # the EMA weights, not the raw ones, were exported
    assert torch.equal(pipe.sample(6, nfe=nfe, sampler=sampler, generator=torch.Generator().manual_seed(1)),
                       got.clamp(-1, 1))


def test_bundle_contents(exported):
    ckpt, out = exported
    assert sorted(p.name for p in out.iterdir()) == ["dtrain.json", "model.safetensors"]
    info = json.loads((out / "dtrain.json").read_text())
    assert info["format"] == 1 and info["kind"] == "denoiser" and info["model"] == MODEL
    assert info["schedule"] == {"name": "vp_discrete", "kind": "linear", "T": 100, "beta_start": 1e-4,
                                "beta_end": 0.02, "zero_terminal_snr": False}
    assert info["sampler"] == {"name": "ddim", "nfe": 3, "spacing": None, "eta": None, "guidance": 1.0,
                               "grid": None, "options": {}}
    assert info["class_names"] == ["0", "1", "2"]
    assert info["image"] == {"shape": [1, 4, 4], "range": [-1.0, 1.0]}
    w = info["weights"]
    assert w["ema"] == "0_999" and w["dtype"] == "float32" and w["file"] == "model.safetensors"
    assert w["sha256"] == B.sha256_file(out / "model.safetensors")
    tensors = load_file(out / "model.safetensors")
    assert w["num_params"] == sum(t.numel() for t in tensors.values())
    assert tensors.keys() == build_model(MODEL).state_dict().keys()
    assert all(torch.equal(v, ckpt["state_dict"]["ema.0_999." + k]) for k, v in tensors.items())
    p = info["provenance"]
    assert p["recipe"] == json.loads(json.dumps(ckpt["dtrain"]["recipe"])) and p["global_step"] == 7
    assert p["kind"] == "teacher" and p["source"].endswith("t.ckpt") and p["recipe_hash"] == "ab" * 32


def test_bf16_bundle(tmp_path):
    ckpt, path = make_ckpt(tmp_path / "t.ckpt")
    out = C.export_checkpoint(path, tmp_path / "b", dtype="bf16")
    assert load_file(out / "model.safetensors")["conv_in.weight"].dtype == torch.bfloat16
    pipe = B.load_bundle(out)
    w = pipe.net.conv_in.weight
    assert w.dtype == torch.float32
    assert torch.equal(w, ckpt["state_dict"]["ema.0_999.conv_in.weight"].bfloat16().float())
    assert not torch.equal(w, ckpt["state_dict"]["ema.0_999.conv_in.weight"])


def test_ema_selection(tmp_path):
    ckpt, path = make_ckpt(tmp_path / "t.ckpt", tags=("0_999", "0_9999", "std0_050"))
    with pytest.raises(C.CheckpointError, match=r"--ema: .*several EMAs.*0_9999"):
        C.export_checkpoint(path, tmp_path / "a")
    with pytest.raises(C.CheckpointError, match=r"no EMA '0_5'"):
        C.export_checkpoint(path, tmp_path / "a", ema=0.5)
    with pytest.raises(C.CheckpointError, match=r": method\.teacher_ema: no EMA '0_5'"):  # a teacher's: not --ema
        C.load_teacher(path, ema=0.5, field="method.teacher_ema")
    for ema, tag, prefix in [("0.9999", "0_9999", "ema.0_9999."), ("std0.050", "std0_050", "ema.std0_050."),
                             ("raw", None, "net.")]:
        out = C.export_checkpoint(path, tmp_path / str(ema), ema=ema)
        assert json.loads((out / "dtrain.json").read_text())["weights"]["ema"] == tag
        got = load_file(out / "model.safetensors")
        assert all(torch.equal(v, ckpt["state_dict"][prefix + k]) for k, v in got.items())
    _, path2 = make_ckpt(tmp_path / "d.ckpt", tags=("0_999", "0_9999"), default_ema="0.9999")
    out = C.export_checkpoint(path2, tmp_path / "d")
    assert json.loads((out / "dtrain.json").read_text())["weights"]["ema"] == "0_9999"


def test_export_overrides_and_refuses_nonempty(tmp_path):
    _, path = make_ckpt(tmp_path / "t.ckpt")
    out = C.export_checkpoint(path, tmp_path / "b", sampler={"name": "dpm++2m", "nfe": 5, "guidance": 2.0},
                              metrics={"fid": {"value": 3.5, "nfe": 5, "num": 1000}})
    info = json.loads((out / "dtrain.json").read_text())
    assert info["sampler"]["name"] == "dpm++2m" and info["sampler"]["nfe"] == 5 and info["sampler"]["guidance"] == 2
    assert info["provenance"]["metrics"]["fid"]["value"] == 3.5
    with pytest.raises(FileExistsError, match="--out"):
        C.export_checkpoint(path, out)
    C.export_checkpoint(path, out, overwrite=True)
    with pytest.raises(C.CheckpointError, match=r"sampler\.steps: unknown sampler field"):
        C.export_checkpoint(path, tmp_path / "c", sampler={"steps": 3})


@pytest.mark.parametrize("fails", ["weights", "dtrain.json"])
def test_an_overwrite_that_crashes_keeps_the_previous_bundle(tmp_path, monkeypatch, fails):
    """dtrain export --force (and every PD round's bundle) over a good bundle: a crash while writing either file
    leaves the old bundle loading with its checksum verified."""
    import safetensors.torch

    _, path = make_ckpt(tmp_path / "t.ckpt")
    out = C.export_checkpoint(path, tmp_path / "b")
    before = (out / "dtrain.json").read_text()
    _, other = make_ckpt(tmp_path / "u.ckpt", seed=1)

    def crash(*a, **k):
        raise KeyboardInterrupt

    if fails == "weights":
        monkeypatch.setattr(safetensors.torch, "save", crash)
    else:  # while writing dtrain.json (the weights' temp file is written by then)
        real = json.dumps
        monkeypatch.setattr(json, "dumps", lambda *a, **k: crash() if k.get("allow_nan") is False else real(*a, **k))
    with pytest.raises(KeyboardInterrupt):
        C.export_checkpoint(other, out, overwrite=True)
    monkeypatch.undo()
    assert (out / "dtrain.json").read_text() == before
    assert sorted(p.name for p in out.iterdir()) == ["dtrain.json", "model.safetensors"]  # no temp files left
    B.load_bundle(out, verify=True).sample(1, nfe=1)


def test_export_refuses_weights_and_defaults_the_bundle_cannot_use(tmp_path):
    """fp16 turned a weight above 65504 into inf without a word; --guidance was written for a model without classes
    (ignored) or of a kind without guidance (every default sample failed); a teacher bundle whose schedule does not
    rebuild gave a KeyError traceback to a student's checks."""
    ckpt, path = make_ckpt(tmp_path / "t.ckpt")
    ckpt["state_dict"]["ema.0_999.conv_in.weight"][0, 0, 0, 0] = 1e5
    torch.save(ckpt, path)
    with pytest.raises(B.BundleError, match=r"model\.safetensors: tensor 'conv_in\.weight': overflows float16 "
                                            r"\(values"):
        C.export_checkpoint(path, tmp_path / "b", dtype="fp16")
    assert not (tmp_path / "b").exists()
    C.export_checkpoint(path, tmp_path / "b", dtype="bf16")
    mlp = {"name": "mlp", "dim": 2, "hidden": 16, "depth": 1, "num_classes": 0, "param": "v"}
    _, g = make_ckpt(tmp_path / "g.ckpt", model=mlp)
    with pytest.raises(B.BundleError, match=r"sampler\.guidance: 3\.0, but the model has no classes"):
        C.export_checkpoint(g, tmp_path / "c", sampler={"guidance": 3.0})
    info = json.loads((tmp_path / "b" / "dtrain.json").read_text())
    info["schedule"]["name"] = "nope"
    (tmp_path / "b" / "dtrain.json").write_text(json.dumps(info))
    with pytest.raises(B.BundleError, match=r"dtrain\.json: schedule: cannot rebuild the schedule: .*'nope'"):
        C.read_schedule(tmp_path / "b")


def test_a_stored_grid_follows_the_sampler_and_nfe(tmp_path):
    """A checkpoint's grid (a PD student's, 4 DDIM steps) goes into the bundle with its sampler and NFE; an export
    asking for another NFE or sampler gets the default grid instead of a grid of another cost, and a dtrain.json
    whose grid and sampler.nfe disagree is refused naming sampler.grid."""
    grid = [1.0, 0.7, 0.4, 0.1, 0.0]
    _, path = make_ckpt(tmp_path / "t.ckpt", sampler={"name": "ddim", "nfe": 4, "grid": grid})
    for i, (override, want) in enumerate([(None, grid), ({"nfe": 8}, None), ({"name": "heun"}, None),
                                          ({"name": "ddim", "nfe": 4}, grid)]):
        out = C.export_checkpoint(path, tmp_path / f"b{i}", sampler=override)
        assert json.loads((out / "dtrain.json").read_text())["sampler"]["grid"] == want, override
    info = json.loads((tmp_path / "b0" / "dtrain.json").read_text())
    info["sampler"]["nfe"] = 8
    with pytest.raises(B.BundleError, match=r"sampler\.grid: 4 steps of 'ddim' cost 4 NFE, but sampler\.nfe is 8"):
        B.check_info(info)


def test_export_validates_weights_against_the_network(tmp_path):
    ckpt, path = make_ckpt(tmp_path / "t.ckpt")
    ckpt["dtrain"]["recipe"]["model"]["channels"] = 16  # the recipe no longer matches the weights
    torch.save(ckpt, path)
    with pytest.raises(C.CheckpointError, match=r"t\.ckpt: tensor 'time_emb\.[^']+': shape \(\d+, \d+\), the "
                       r"network built from dtrain\.json 'model' needs"):
        C.export_checkpoint(path, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    del ckpt["state_dict"]["ema.0_999.conv_in.bias"]
    torch.save(ckpt, path)
    with pytest.raises(C.CheckpointError, match=r"state_dict\.ema\.0_999\.conv_in\.bias: missing from EMA"):
        C.export_checkpoint(path, tmp_path / "b")


def test_mlp_bundle_holds_vectors(tmp_path, capsys):
    """A 2-D GMM model: shape (2,), no image range, no classes; .npz only."""
    mlp = {"name": "mlp", "dim": 2, "hidden": 16, "depth": 1, "num_classes": 0, "param": "v", "sigma_data": 1.0,
           "input_scaling": False, "clip_x0": None}
    ckpt, path = make_ckpt(tmp_path / "g.ckpt", model=mlp)
    pipe = B.load_bundle(C.export_checkpoint(path, tmp_path / "b"))
    assert pipe.info["image"] == {"shape": [2], "range": None} and pipe.class_names == []
    x = pipe.sample(5, nfe=2, generator=torch.Generator().manual_seed(0))
    sch = pipe.schedule
    g = torch.Generator().manual_seed(0)
    ref = run("ddim", build_denoiser(mlp, sch, ema_net(ckpt, "0_999")), torch.randn(5, 2, generator=g)
              * float(sch.sigma(sch.t_max)), 2)
    assert torch.equal(x, ref) and x.abs().max() > 1  # not clamped: no image range
    with pytest.raises(ValueError, match="not images"):
        pipe.to_uint8(x)
    with pytest.raises(ValueError, match="unconditional"):
        pipe.sample(2, labels=[0, 1])
    with pytest.raises(ValueError, match="w: guidance needs a class-conditional model"):
        pipe.sample(2, w=2.0)
    with pytest.raises(InputError, match=r"use \.npz"):
        commands.save_samples(tmp_path / "g.png", x, None, pipe)
    from dtrain.cli import main

    for bs in (16, 3):  # x_T is one draw for all: torch draws 16+ normals in another order than a few (and CUDA
        assert main(["sample", str(tmp_path / "b"), "--num", "16", "--nfe", "2", "--batch-size", str(bs),  # any
                     "--out", str(tmp_path / f"s{bs}.npz")]) == 0  # split), so batches of 3 gave other samples
    np.testing.assert_allclose(np.load(tmp_path / "s3.npz")["samples"], np.load(tmp_path / "s16.npz")["samples"],
                               rtol=0, atol=1e-6)
    one = pipe.sample(16, nfe=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "s16.npz")["samples"]), one)  # = one batch, seed 0
    with pytest.raises(InputError, match=r"noise: need a tensor of shape \[5, 2\]"):
        pipe.sample(5, noise=torch.zeros(4, 2))
    capsys.readouterr()
    for nfe, said in (("4", "nfe=3 (of 4 asked)"), ("5", "nfe=5 w=1")):  # heun: 2 calls a step, 1 the last
        assert main(["sample", str(tmp_path / "b"), "--num", "2", "--sampler", "heun", "--nfe", nfe, "--out",
                     str(tmp_path / "h.npz")]) == 0
        assert f"sampler=heun {said}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Pipeline behaviour


def test_labels_guidance_and_uint8(exported):
    ckpt, out = exported
    pipe = B.load_bundle(out)
    assert pipe.labels(None, 5).tolist() == [0, 1, 2, 0, 1]
    assert pipe.labels("2", 2).tolist() == [2, 2] and pipe.labels([np.int64(1), 3], 2).tolist() == [1, 3]
    with pytest.raises(ValueError, match="labels"):
        pipe.labels([4], 1)
    with pytest.raises(ValueError, match="need 3 labels"):
        pipe.labels([0, 1], 3)
    got = pipe.sample(4, nfe=2, labels=[0, 1, 2, 3], w=3.0, generator=torch.Generator().manual_seed(0), clip=False)
    sch = pipe.schedule
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(4, 1, 4, 4, generator=g) * float(sch.sigma(sch.t_max))
    guided = CFGDenoiser(build_denoiser(MODEL, sch, ema_net(ckpt, "0_999")), 3.0, null_label=3)
    assert torch.equal(got, run("ddim", guided, x_T, 2, cond=torch.tensor([0, 1, 2, 3])))
    plain = pipe.sample(4, nfe=2, labels=[0, 1, 2, 3], generator=torch.Generator().manual_seed(0), clip=False)
    assert not torch.allclose(got, plain)
    u8 = pipe.to_uint8(torch.tensor([-1.0, -2.0, 0.0, 1.0, 1.5, 0.5]))
    assert u8.tolist() == [0, 0, 128, 255, 255, 191] and u8.dtype == torch.uint8
    with pytest.warns(UserWarning, match=r"to_uint8: 2 of 3 samples are not finite"):
        pipe.to_uint8(torch.tensor([[0.0, math.nan], [0.0, 0.0], [math.inf, 0.0]]))


def test_default_grid_and_eta_from_bundle(tmp_path):
    _, path = make_ckpt(tmp_path / "t.ckpt")
    grid = [1.0, 0.5, 0.0]
    out = C.export_checkpoint(path, tmp_path / "b", sampler={"grid": grid, "nfe": 2, "eta": 1.0})
    pipe = B.load_bundle(out)
    seen = []
    pipe.sample(2, generator=torch.Generator().manual_seed(0), callback=lambda d: seen.append(float(d["t"])))
    assert seen == [1.0, 0.5]
    a = pipe.sample(2, generator=torch.Generator().manual_seed(0))
    b = pipe.sample(2, generator=torch.Generator().manual_seed(0), eta=0.0)
    assert not torch.equal(a, b)  # the bundle's eta = 1 was used by default
    seen.clear()
    pipe.sample(2, nfe=4, generator=torch.Generator().manual_seed(0), callback=lambda d: seen.append(float(d["t"])))
    assert len(seen) == 4  # another NFE builds its own grid


def test_registered_kind_is_used(exported, monkeypatch):
    _, out = exported
    monkeypatch.setattr(B.KINDS, "_items", dict(B.KINDS._items))

    class Halved(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.schedule = inner, inner.schedule

        def forward(self, x, t, cond=None):
            return 0.5 * self.inner(x, t, cond)

    B.register_kind("halved", B.PipelineKind(lambda net, s, cfg: Halved(build_denoiser(cfg, s, net)), guide=None))
    info = json.loads((out / "dtrain.json").read_text())
    (out / "dtrain.json").write_text(json.dumps({**info, "kind": "halved"}))
    pipe = B.load_bundle(out)
    assert isinstance(pipe.denoiser, Halved)
    with pytest.raises(ValueError, match="does not support guidance"):
        pipe.sample(2, nfe=1, labels=[0, 1], w=2.0)
    (out / "dtrain.json").write_text(json.dumps({**info, "kind": "flowmap9"}))
    with pytest.raises(B.BundleError, match=r"dtrain\.json: kind: unknown bundle kind 'flowmap9'.*denoiser"):
        B.load_bundle(out)


def test_loader_never_unpickles(exported, monkeypatch):
    _, out = exported

    def boom(*a, **k):
        raise AssertionError("pickle used")

    for mod, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(mod, name, boom)
    pipe = B.load_bundle(out)
    assert pipe.sample(2, nfe=1).shape == (2, 1, 4, 4)


# ---------------------------------------------------------------------------------------------
# Bad bundles: every failure names the file and the field


def _info(out):
    return json.loads((out / "dtrain.json").read_text())


def _write(out, info):
    (out / "dtrain.json").write_text(json.dumps(info))


def _paths(d, prefix=""):
    for k, v in d.items():
        yield prefix + k
        if isinstance(v, dict) and k in ("sampler", "image", "weights"):
            yield from _paths(v, prefix + k + ".")


@pytest.mark.parametrize("key", list(_paths({**{k: None for k in B._TOP}, **{s: dict.fromkeys(f)
                                                                                for s, f in B._SECTIONS.items()}})))
def test_missing_key_is_named(exported, key):
    _, out = exported
    info = _info(out)
    d = info
    *parents, leaf = key.split(".")
    for p in parents:
        d = d[p]
    del d[leaf]
    _write(out, info)
    with pytest.raises(B.BundleError, match=rf"dtrain\.json: {re.escape(key)}: missing"):
        B.load_bundle(out)


@pytest.mark.parametrize("edit,msg", [
    (lambda i: i.update(format=2), r"format: unsupported bundle format 2; this dtrain reads 1"),
    (lambda i: i.update(extra=1), r"extra: unknown key"),
    (lambda i: i["sampler"].update(nfe="4"), r"sampler\.nfe: expected int, got str"),
    (lambda i: i["sampler"].update(nfe=True), r"sampler\.nfe: expected int, got bool"),
    (lambda i: i["sampler"].update(nfe=0), r"sampler\.nfe: must be >= 1"),
    (lambda i: i["sampler"].update(name="dddim"), r"sampler\.name: unknown sampler 'dddim'"),
    (lambda i: i["sampler"].update(name="heun", eta=0.5), r"sampler\.eta: sampler 'heun' takes no option 'eta'"),
    (lambda i: i["sampler"].update(spacing="log"), r"sampler\.spacing: unknown spacing"),
    (lambda i: i["sampler"].update(grid=[1.0, 0.5]), r"sampler\.grid: must be strictly decreasing"),
    (lambda i: i["image"].update(shape=[1, 0, 4]), r"image\.shape"),
    (lambda i: i["image"].update(range=[1, -1]), r"image\.range"),
    (lambda i: i.update(class_names=["a"]), r"class_names: need 3 distinct strings"),
    (lambda i: i.update(class_names=["a", "a", "b"]), r"class_names: need 3 distinct strings"),
    (lambda i: i["model"].update(sigma_data=-1), r"model\.sigma_data: must be a number > 0, got -1"),
    (lambda i: i["model"].update(input_scaling="false"), r"model\.input_scaling: must be true or false, got 'false'"),
    (lambda i: i["sampler"].update(guidance=-2.0), r"sampler\.guidance: must be a finite number >= 0"),
    (lambda i: i["model"].update(param="epsilon"), r"model\.param: unknown parameterization"),
    (lambda i: i["model"].update(channels=16), r"model\.safetensors: tensor '[^']+': shape \(\d+, \d+\), the "
                                               r"network built from dtrain\.json 'model' needs \(\d+, \d+\)"),
    (lambda i: i["model"].update(num_classes=4), r"class_names: need 4 distinct strings"),
    (lambda i: (i["model"].update(resolution=5), i["image"].update(shape=[i["image"]["shape"][0], 5, 5])),
     r"dtrain\.json: model: cannot build the network: ValueError: model\.resolution 5 is not divisible"),
    (lambda i: i["model"].update(chanels=8), r"dtrain\.json: model: cannot build the network: .*chanels"),
    (lambda i: i["model"].update(name="dit"), r"dtrain\.json: model: cannot build the network: .*unknown model"),
    (lambda i: i["schedule"].update(T=-5), r"dtrain\.json: schedule: cannot rebuild the schedule"),
    (lambda i: i["weights"].update(sha256="0" * 64), r"model\.safetensors: weights\.sha256: checksum mismatch"),
    (lambda i: i["weights"].update(file="../x.safetensors"), r"weights\.file: must be 'model\.safetensors'"),
    (lambda i: i["weights"].update(num_params=5), r"dtrain\.json: weights\.num_params: 5, but .*holds \d+ parameters"),
    (lambda i: i["weights"].update(dtype="bfloat16"), r"model\.safetensors: tensor '.*': dtype torch\.float32, "
                                                      r"expected bfloat16"),
])
def test_edited_info_fails_clearly(exported, edit, msg):
    _, out = exported
    info = _info(out)
    edit(info)
    _write(out, info)
    with pytest.raises(B.BundleError, match=msg) as e:
        B.load_bundle(out)
    assert str(out) in str(e.value)


def test_weights_tampering(exported):
    _, out = exported
    f = out / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight
    f.write_bytes(bytes(data))
    with pytest.raises(B.BundleError, match=r"model\.safetensors: weights\.sha256: checksum mismatch"):
        B.load_bundle(out)
    assert B.load_bundle(out, verify=False).net is not None  # still a valid file, only the hash caught it
    f.unlink()
    with pytest.raises(B.BundleError, match=r"model\.safetensors: not found"):
        B.load_bundle(out)
    with pytest.raises(B.BundleError, match="not a bundle directory"):
        B.load_bundle(out / "dtrain.json")


def test_extra_tensor_in_weights_is_refused(exported):
    """A model.safetensors holding a tensor the network lacks (with a matching sha256) is refused naming it."""
    from safetensors.torch import save_file

    _, out = exported
    f = out / "model.safetensors"
    save_file({**load_file(f), "extra.weight": torch.ones(2)}, f, metadata={"format": "pt"})
    info = _info(out)
    info["weights"]["sha256"] = B.sha256_file(f)
    _write(out, info)
    with pytest.raises(B.BundleError, match=r"model\.safetensors: tensor 'extra\.weight': not in the network "
                       r"\(1 unexpected"):
        B.load_bundle(out)


def test_grid_with_a_repeated_time_is_refused(exported):
    """A sampler.grid repeating a time ([1, 0.5, 0.5, 0]: a zero-length step) is refused naming sampler.grid."""
    _, out = exported
    info = _info(out)
    info["sampler"].update(name="ddim", nfe=3, grid=[1.0, 0.5, 0.5, 0.0])  # 3 DDIM steps: the NFE matches
    _write(out, info)
    with pytest.raises(B.BundleError, match=r"dtrain\.json: sampler\.grid: must be strictly decreasing"):
        B.load_bundle(out)


def test_fuzz_truncated_files(exported):
    """Every truncation of either file fails with a BundleError naming it (weights: with and without the hash)."""
    _, out = exported
    info_b, w_b = (out / "dtrain.json").read_bytes(), (out / "model.safetensors").read_bytes()
    for n in sorted({*range(0, len(info_b), 37), len(info_b) - 2}):
        (out / "dtrain.json").write_bytes(info_b[:n])
        with pytest.raises(B.BundleError, match=r"dtrain\.json"):
            B.load_bundle(out)
    (out / "dtrain.json").write_bytes(info_b)
    header = 8 + int.from_bytes(w_b[:8], "little")
    cuts = {*range(0, header + 9, 23), *np.linspace(header, len(w_b) - 1, 25).astype(int).tolist(), 7, 8, 9}
    for n in sorted(cuts):
        (out / "model.safetensors").write_bytes(w_b[:n])
        for verify in (True, False):
            with pytest.raises(B.BundleError, match=r"model\.safetensors"):
                B.load_bundle(out, verify=verify)


def test_fuzz_byte_edits(exported):
    """Random byte edits either load (a still-valid value such as a digit of a float) or raise BundleError;
    never another exception. With the hash check, any edit of the weights fails."""
    _, out = exported
    rng = random.Random(0)
    info_b, w_b = (out / "dtrain.json").read_bytes(), (out / "model.safetensors").read_bytes()
    header = 8 + int.from_bytes(w_b[:8], "little")
    failed = {"json": 0, "header": 0}
    for i in range(120):
        which = "json" if i % 2 else "header"
        src = info_b if which == "json" else w_b
        data = bytearray(src)
        pos = rng.randrange(len(src) if which == "json" else header)
        data[pos] = rng.choice(b'0123456789{}[]":,.-eE azxn\x00\xff')
        (out / "dtrain.json").write_bytes(bytes(data) if which == "json" else info_b)
        (out / "model.safetensors").write_bytes(bytes(data) if which == "header" else w_b)
        try:
            B.load_bundle(out, verify=False)
        except B.BundleError as e:
            assert ("dtrain.json" if which == "json" else "model.safetensors") in str(e)
            failed[which] += 1
        if which == "header" and bytes(data) != w_b:
            with pytest.raises(B.BundleError, match="checksum mismatch"):
                B.load_bundle(out)
    assert failed["json"] > 10 and failed["header"] > 10, failed


# ---------------------------------------------------------------------------------------------
# Checkpoints and teachers


def test_read_checkpoint_errors(tmp_path):
    with pytest.raises(C.CheckpointError, match="checkpoint not found"):
        C.read_checkpoint(tmp_path / "nope.ckpt")
    torch.save({"state_dict": {}, "dtrain": {"format": 1}, "evil": argparse.Namespace(a=1)}, tmp_path / "p.ckpt")
    with pytest.raises(C.CheckpointError, match=r"p\.ckpt: cannot be read with torch\.load\(weights_only=True\)"):
        C.read_checkpoint(tmp_path / "p.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "l.ckpt")
    with pytest.raises(C.CheckpointError, match=r"l\.ckpt: dtrain: missing"):
        C.read_checkpoint(tmp_path / "l.ckpt")
    torch.save({"state_dict": {}, "dtrain": {"format": 9}}, tmp_path / "f.ckpt")
    with pytest.raises(C.CheckpointError, match=r"dtrain\.format: unsupported checkpoint format 9"):
        C.read_checkpoint(tmp_path / "f.ckpt")
    (tmp_path / "t.ckpt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(C.CheckpointError, match=r"t\.ckpt: not a readable torch checkpoint"):
        C.read_checkpoint(tmp_path / "t.ckpt")
    (tmp_path / "sharded.ckpt").mkdir()
    with pytest.raises(C.CheckpointError, match=r"sharded\.ckpt: empty checkpoint directory"):
        C.read_checkpoint(tmp_path / "sharded.ckpt")
    (tmp_path / "sharded.ckpt" / "x").write_text("")
    with pytest.raises(C.CheckpointError, match=r"not a sharded \(DeepSpeed / FSDP\) checkpoint directory"):
        C.read_checkpoint(tmp_path / "sharded.ckpt")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # export / eval of a run directory
    with pytest.raises(C.CheckpointError, match=r"run: a run directory, not a checkpoint: give one of its "):
        C.read_checkpoint(tmp_path / "run")
    _, path = make_ckpt(tmp_path / "s.ckpt", kind="sid")
    with pytest.raises(C.CheckpointError, match=r"dtrain\.kind: no bundle kind known for 'sid'"):
        C.export_checkpoint(path, tmp_path / "b")


def test_load_teacher_bundle_and_checkpoint_agree(exported, tmp_path):
    _, out = exported
    d_b, info_b = C.load_teacher(out)
    d_c, info_c = C.load_teacher(tmp_path / "t.ckpt")
    assert isinstance(d_b, Denoiser) and not any(p.requires_grad for p in d_b.parameters()) and not d_b.training
    x, t, y = torch.randn(3, 1, 4, 4), torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64), torch.tensor([0, 1, 3])
    assert torch.equal(d_b(x, t, y), d_c(x, t, y))
    assert info_b["ref"]["format"] == "bundle" and info_b["ref"]["sha256"] == info_b["weights"]["sha256"]
    assert info_c["ref"]["format"] == "checkpoint" and info_c["ref"]["sha256"] == B.sha256_file(tmp_path / "t.ckpt")
    assert info_b["ref"]["ema"] == info_c["ref"]["ema"] == "0_999"


def test_teacher_chain_in_provenance(exported, tmp_path):
    """teacher bundle -> student checkpoint records the ref -> the student's bundle names the teacher's hash."""
    _, teacher = exported
    _, ref = C.load_teacher(teacher)
    _, spath = make_ckpt(tmp_path / "pd.ckpt", kind="pd", seed=1, teacher=ref["ref"], metrics={"fid": 9.5},
                         sampler={"nfe": 2}, pd_round=3)
    student = C.export_checkpoint(spath, tmp_path / "student")
    p = _info(student)["provenance"]
    assert p["teacher"]["sha256"] == _info(teacher)["weights"]["sha256"] and p["teacher"]["format"] == "bundle"
    assert p["source"] == str(spath) and p["source_sha256"] == B.sha256_file(spath)  # the exact file exported
    assert p["metrics"] == {"fid": 9.5} and p["training"] == {"pd_round": 3} and p["kind"] == "pd"
    assert _info(student)["sampler"]["nfe"] == 2 and _info(student)["kind"] == "denoiser"
    _, sref = C.load_teacher(student)
    assert sref["ref"]["teacher"]["sha256"] == _info(teacher)["weights"]["sha256"]  # the chain continues


# ---------------------------------------------------------------------------------------------
# CLI bodies


def test_cli_export_and_sample(tmp_path, capsys):
    _, path = make_ckpt(tmp_path / "t.ckpt")
    (tmp_path / "m.json").write_text(json.dumps({"fid": {"value": 1.0, "nfe": 4}}))
    pe = commands.add_export_args(argparse.ArgumentParser())
    out = commands.run_export(pe.parse_args([str(path), "--out", str(tmp_path / "b"), "--nfe", "2",
                                             "--metrics", str(tmp_path / "m.json")]))
    assert "sampler=ddim@2" in capsys.readouterr().out
    ps = commands.add_sample_args(argparse.ArgumentParser())
    commands.run_sample(ps.parse_args([str(out), "--num", "5", "--out", str(tmp_path / "s.npz"), "--seed", "3",
                                       "--batch-size", "5", "--labels", "2,0"]))
    z = np.load(tmp_path / "s.npz")
    pipe = B.load_bundle(out)
    ref = pipe.sample(5, labels=[2, 0, 2, 0, 2], generator=torch.Generator().manual_seed(3))
    assert np.array_equal(z["samples"], ref.numpy()) and z["labels"].tolist() == [2, 0, 2, 0, 2]
    assert np.array_equal(z["images"], pipe.to_uint8(ref).permute(0, 2, 3, 1).numpy())
    commands.run_sample(ps.parse_args([str(out), "--num", "5", "--nfe", "1", "--out", str(tmp_path / "g.png")]))
    from PIL import Image

    im = np.asarray(Image.open(tmp_path / "g.png"))
    assert im.shape == (2 * 5 + 1, 3 * 5 + 1) and im.dtype == np.uint8  # 3 columns x 2 rows of 4x4, 1px gaps
    u8 = pipe.to_uint8(pipe.sample(5, nfe=1, generator=torch.Generator().manual_seed(0)))
    assert np.array_equal(im[6:10, 1:5], u8[3, 0].numpy())  # sample 3 sits in row 1, column 0
    with pytest.raises(InputError, match=r"\.png \(grid\) or \.npz"):
        commands.run_sample(ps.parse_args([str(out), "--num", "2", "--out", str(tmp_path / "x.jpg")]))


def test_autocast_sampling_stays_float32(exported):
    """Mixed precision goes through autocast: the network runs in bf16, the sampler state stays float32."""
    _, out = exported
    pipe = B.load_bundle(out)
    ref = pipe.sample(4, nfe=2, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", torch.bfloat16):
        got = pipe.sample(4, nfe=2, generator=torch.Generator().manual_seed(0))
    assert got.dtype == torch.float32 and not torch.equal(got, ref)
    assert (got - ref).abs().max() < 0.1

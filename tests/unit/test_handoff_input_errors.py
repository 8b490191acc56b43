"""Bad input to ``dtrain sample``, ``dtrain eval`` and ``dtrain export`` gives one line naming the flag or file (exit
code 2), never a traceback, and where it can before any sampling: a sampler, labels, times, NFE or device that do not
fit, an output path that cannot be written, an unknown extractor, spacing or built-in reference, a file that is not
a torch checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dtrain.cli import main

EVAL = ["--num", "4", "--batch-size", "4", "--samplers", "ddim:1", "--extractor", "digits", "--ref-stats",
        "digits:train"]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
PROC = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc (a folder nothing is written in)")


@pytest.fixture
def ckpt_bundle(digits_teacher, digits_bundle) -> tuple[Path, Path]:
    """(C, B): the 4-step digits teacher checkpoint and its bundle (``digits_teacher``, ``digits_bundle``:
    tests/conftest.py)."""
    return digits_teacher, digits_bundle


@pytest.fixture
def sample_error(cli_error):
    """``sample_error(bundle, out, *flags)``: ``dtrain sample`` fails with one line and writes no ``out``."""

    def run(bundle: Path, out: Path, *flags: str) -> str:
        err = cli_error("sample", str(bundle), "--num", "2", "--out", str(out), *flags)
        assert not out.is_file()
        return err

    return run


def test_sample_unknown_sampler(ckpt_bundle, tmp_path, sample_error) -> None:  # 1
    err = sample_error(ckpt_bundle[1], tmp_path / "g.png", "--sampler", "ddimm")
    assert "--sampler: unknown sampler 'ddimm'; choose one of" in err and "'ddim'" in err


@pytest.mark.parametrize("label", ["12", "-1", "cat"])
def test_sample_bad_labels(ckpt_bundle, tmp_path, label: str, sample_error) -> None:  # 2
    err = sample_error(ckpt_bundle[1], tmp_path / "g.png", "--labels", label)
    assert "--labels: need ints in [0, 10]" in err and err.endswith(f"got {label if label != 'cat' else repr(label)}")


def test_sample_times_must_decrease(ckpt_bundle, tmp_path, sample_error) -> None:  # 3
    err = sample_error(ckpt_bundle[1], tmp_path / "g.png", "--times", "0.2,0.5")
    assert "--times: must decrease strictly inside (0, t_max" in err


def test_sample_flow_map_sampler_on_a_denoiser(ckpt_bundle, tmp_path, sample_error) -> None:  # 4
    err = sample_error(ckpt_bundle[1], tmp_path / "g.png", "--sampler", "flowmap", "--nfe", "1")
    assert "--sampler: sampler 'flowmap' needs a flow-map student" in err
    assert "this bundle (kind 'denoiser')" in err and "'ddim'" in err.split("choose one of")[1]
    assert "'flowmap'" not in err.split("choose one of")[1]


def test_eval_flow_map_sampler_on_a_denoiser(ckpt_bundle, tmp_path, cli_error) -> None:  # 4
    err = cli_error("eval", str(ckpt_bundle[1]), *EVAL, "--samplers", "flowmap:1", "--out", str(tmp_path / "e"))
    assert "--samplers: sampler 'flowmap' needs a flow-map student" in err and "choose one of" in err
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("where", ["dir", pytest.param("proc", marks=PROC)])
def test_sample_out_not_writable(ckpt_bundle, tmp_path, where: str, cli_error) -> None:  # 5
    out = tmp_path / "grid.png" if where == "dir" else Path("/proc/dtrain_handoff_x.png")
    if where == "dir":
        out.mkdir()
    err = cli_error("sample", str(ckpt_bundle[1]), "--num", "2", "--nfe", "1", "--out", str(out))
    assert f"--out: {out} is a directory; give a file name" in err if where == "dir" else \
        f"--out: cannot create {out}: cannot write in /proc" in err


@pytest.mark.parametrize("cmd", ["sample", "eval"])
@pytest.mark.parametrize("device", ["gpu", pytest.param("cuda", marks=NO_GPU)])
def test_bad_device(ckpt_bundle, tmp_path, cmd: str, device: str, cli_error) -> None:  # 6
    flags = ["--num", "2", "--nfe", "1", "--out", str(tmp_path / "g.png")] if cmd == "sample" else \
        [*EVAL, "--out", str(tmp_path / "e")]
    err = cli_error(cmd, str(ckpt_bundle[1]), *flags, "--device", device)
    assert "--device: unknown device 'gpu'; use cpu, cuda" in err if device == "gpu" else \
        "--device: 'cuda', but this machine has no usable CUDA GPU; use cpu" in err


@pytest.mark.parametrize(("flag", "value", "least"), [("--num", "0", 2), ("--num", "1", 2), ("--batch-size", "0", 1)])
def test_eval_num_and_batch_size(ckpt_bundle, tmp_path, flag: str, value: str, least: int, cli_error) -> None:  # 7
    err = cli_error("eval", str(ckpt_bundle[1]), *EVAL, flag, value, "--out", str(tmp_path / "e"))
    assert f"{flag}: must be >= {least}" in err and err.endswith(f"got {value}")


def test_eval_unknown_spacing(ckpt_bundle, tmp_path, cli_error) -> None:  # 8
    err = cli_error("eval", str(ckpt_bundle[1]), *EVAL, "--spacing", "trailng", "--out", str(tmp_path / "e"))
    assert "--spacing: unknown spacing 'trailng'; choose one of" in err and "'trailing'" in err


@pytest.mark.parametrize("ref", [False, True])
def test_eval_unknown_extractor(ckpt_bundle, tmp_path, ref: bool, cli_error) -> None:  # 9
    flags = ["--num", "4", "--batch-size", "4", "--samplers", "ddim:1", *(["--ref-stats", "digits:train"] * ref)]
    err = cli_error("eval", str(ckpt_bundle[1]), *flags, "--extractor", "incpetion", "--out",
                    str(tmp_path / "e"))
    assert "--extractor: unknown feature extractor 'incpetion'; choose one of ['digits', 'inception', 'raw']" in err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_export_out_cannot_be_created(ckpt_bundle, cli_error) -> None:  # 10
    err = cli_error("export", str(ckpt_bundle[0]), "--out", "/proc/dtrain_handoff_x")
    assert "--out: cannot create /proc/dtrain_handoff_x: cannot write in /proc" in err


@pytest.mark.parametrize("nfe", ["0", "-2"])
def test_sample_nfe_below_one(ckpt_bundle, tmp_path, nfe: str, sample_error) -> None:  # 11
    err = sample_error(ckpt_bundle[1], tmp_path / "g.png", "--nfe", nfe)
    assert f"--nfe: must be >= 1, got {nfe}" in err


def test_sample_nfe_beyond_the_discrete_schedule(ckpt_bundle, tmp_path, sample_error) -> None:  # 11
    from dtrain.export.bundle import load_bundle

    T = load_bundle(ckpt_bundle[1]).schedule.discrete_steps
    err = sample_error(ckpt_bundle[1], tmp_path / "g.png", "--nfe", str(T + 1), "--sampler", "ddim")
    assert err.startswith(f"dtrain sample: --nfe: {T + 1} gives no grid; at most {T} for sampler 'ddim'"), err


def test_export_nfe_below_one(ckpt_bundle, tmp_path, cli_error) -> None:  # 11
    err = cli_error("export", str(ckpt_bundle[0]), "--out", str(tmp_path / "b"), "--nfe", "0")
    assert "--nfe: must be >= 1" in err and "dtrain.json" not in err and not (tmp_path / "b").exists()


@pytest.mark.parametrize("w", ["nan", "inf"])
def test_export_guidance_not_finite(ckpt_bundle, tmp_path, cli_error, w) -> None:
    err = cli_error("export", str(ckpt_bundle[0]), "--out", str(tmp_path / "b"), "--guidance", w)
    assert f"--guidance: must be a finite number (1: no guidance), got {w}" in err and not (tmp_path / "b").exists()


def test_eval_unknown_builtin_ref_stats(ckpt_bundle, tmp_path, cli_error) -> None:  # 12
    err = cli_error("eval", str(ckpt_bundle[1]), *EVAL, "--ref-stats", "digits:trian", "--out",
                    str(tmp_path / "e"))
    assert "--ref-stats: unknown built-in reference statistics 'digits:trian'" in err
    assert "['digits:train', 'digits:test', 'digits:all']" in err


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_eval_and_sample_seeds_out_of_range(ckpt_bundle, tmp_path, cli_error, seed) -> None:
    """dtrain sample took -1 (torch accepts any int64 seed) and 2^64 crashed in Generator.manual_seed."""
    err = cli_error("eval", str(ckpt_bundle[1]), *EVAL, "--seed", seed, "--out", str(tmp_path / "e"))
    assert err.endswith(f"--seed: must be in [0, 2^32), got {seed}")
    err = cli_error("sample", str(ckpt_bundle[1]), "--seed", seed, "--out", str(tmp_path / "s.npz"))
    assert err.endswith(f"--seed: must be in [0, 2^63), got {seed}")


@pytest.mark.parametrize("ema", ["0.99", "raw", "nonsense"])
def test_eval_ema_a_bundle_does_not_hold(ckpt_bundle, tmp_path, cli_error, ema) -> None:
    """A bundle holds one set of weights: another --ema was silently evaluated as the bundle's own."""
    err = cli_error("eval", str(ckpt_bundle[1]), *EVAL, "--ema", ema, "--out", str(tmp_path / "e"))
    assert f"--ema: {ckpt_bundle[1]} is a bundle of the 0_995 weights only, not {ema!r}" in err


def test_eval_default_out_names_the_run(ckpt_bundle, tmp_path, monkeypatch, capsys) -> None:
    """runs/<run>/checkpoints/last.ckpt evaluates into runs/eval/<run>-last (every run's last.ckpt had one folder)."""
    ckpt = ckpt_bundle[0]
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(ckpt), *EVAL]) == 0
    assert (tmp_path / "runs" / "eval" / f"{ckpt.parent.parent.name}-last" / "fid_vs_nfe.json").is_file()


@pytest.mark.parametrize("spacing", [None, "trailing"])
def test_eval_samples_a_bundles_grid_at_its_sampler_and_nfe(ckpt_bundle, tmp_path, monkeypatch, spacing) -> None:
    """dtrain eval hands the bundle's stored grid (a PD student's) to the sweep for its sampler and NFE, as
    dtrain sample uses it; --spacing asks for the default grids instead."""
    import json
    import shutil

    import dtrain.eval.sweep as sweep

    b = tmp_path / "b"
    shutil.copytree(ckpt_bundle[1], b)
    info = json.loads((b / "dtrain.json").read_text())
    info["sampler"].update(name="ddim", nfe=2, grid=[float(info["schedule"].get("t_max", 1.0) or 1.0), 0.3, 0.0])
    (b / "dtrain.json").write_text(json.dumps(info))
    seen = {}
    monkeypatch.setattr(sweep, "fid_sweep", lambda *a, **kw: seen.update(kw["grids"]) or [])
    flags = ["--spacing", spacing] if spacing else []
    assert main(["eval", str(b), *EVAL, "--out", str(tmp_path / "e"), *flags]) == 0
    assert {k: v.tolist() for k, v in seen.items()} == ({} if spacing else {("ddim", 2): info["sampler"]["grid"]})


def test_eval_out_is_a_file(ckpt_bundle, tmp_path, capsys, cli_error) -> None:  # 13
    out = tmp_path / "afile.txt"
    out.write_text("x")
    err = cli_error("eval", str(ckpt_bundle[1]), *EVAL, "--out", str(out))
    assert f"--out: {out} is a file, not a directory" in err
    assert capsys.readouterr().out == ""  # refused before the sweep (no table)


def test_export_out_is_a_file_with_force(ckpt_bundle, tmp_path, cli_error) -> None:  # 14
    out = tmp_path / "afile.txt"
    out.write_text("x")
    err = cli_error("export", str(ckpt_bundle[0]), "--out", str(out), "--force")
    assert f"--out: {out} is a file, not a bundle directory" in err and "pass overwrite / --force" not in err
    assert out.read_text() == "x"


def test_export_not_a_torch_file(tmp_path, cli_error) -> None:  # 15
    bad = tmp_path / "garbage.ckpt"
    bad.write_text("hello!!\n")
    err = cli_error("export", str(bad), "--out", str(tmp_path / "b"))
    assert f"{bad}: not a torch checkpoint" in err and "objects other than tensors" not in err


@pytest.fixture(scope="module")
def uncond_bundle(tmp_path_factory) -> Path:
    """The bundle of an untrained unconditional 8-channel digits UNet (a checkpoint written by hand: no training)."""
    from dtrain.config import load_recipe, to_container
    from dtrain.models import build_model

    cfg = to_container(load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "teacher" / "digits.yaml",
                                   ["model.num_classes=0", "model.channels=8", "sampler.guidance=1.0"]))
    net = build_model(cfg["model"])
    root = tmp_path_factory.mktemp("uncond")
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "global_step": 0,
                "dtrain": {"format": 1, "recipe": cfg, "ema_tags": [], "kind": "teacher"}}, root / "u.ckpt")
    assert main(["export", str(root / "u.ckpt"), "--out", str(root / "bundle")]) == 0
    return root / "bundle"


def test_sample_guidance_of_an_unconditional_model(uncond_bundle, tmp_path, sample_error) -> None:  # 16
    err = sample_error(uncond_bundle, tmp_path / "g.png", "--w", "2")
    assert err.startswith("dtrain sample: --w: guidance needs a class-conditional model; this bundle has no classes")


def test_sample_guidance_of_a_kind_without_it(ckpt_bundle, tmp_path, monkeypatch, sample_error) -> None:  # 16
    import json
    import shutil

    from dtrain.export import bundle as B
    from dtrain.models import build_denoiser

    monkeypatch.setattr(B.KINDS, "_items", dict(B.KINDS._items))
    B.register_kind("unguided", B.PipelineKind(lambda net, s, cfg: build_denoiser(cfg, s, net), guide=None))
    bundle = Path(shutil.copytree(ckpt_bundle[1], tmp_path / "b"))
    info = json.loads((bundle / "dtrain.json").read_text())
    (bundle / "dtrain.json").write_text(json.dumps({**info, "kind": "unguided"}))
    assert info["sampler"]["guidance"] == 2.0  # a default this kind cannot take: every plain sample failed
    err = sample_error(bundle, tmp_path / "g.png")
    assert ("dtrain.json: sampler.guidance: 2.0, but bundle kind 'unguided' has no guidance: the default must be 1"
            in err)
    (bundle / "dtrain.json").write_text(json.dumps({**info, "kind": "unguided",
                                                    "sampler": {**info["sampler"], "guidance": 1.0}}))
    err = sample_error(bundle, tmp_path / "g.png", "--w", "2")
    assert err.startswith("dtrain sample: --w: bundle kind 'unguided' does not support guidance")
    assert main(["sample", str(bundle), "--num", "2", "--nfe", "1", "--w", "1", "--out", str(tmp_path / "g.png")]) == 0


def test_eval_guidance_of_an_unconditional_model(uncond_bundle, tmp_path, capsys, cli_error) -> None:  # 16
    err = cli_error("eval", str(uncond_bundle), *EVAL, "--guidance", "2", "--out", str(tmp_path / "e"))
    assert err.startswith("dtrain eval: --guidance: guidance needs a class-conditional model; this model (kind "
                          "'denoiser') has no classes")
    assert capsys.readouterr().out == "" and not (tmp_path / "e").exists()  # refused before the sweep


def _ref_file(path: Path, **meta) -> Path:
    """Reference statistics of the digits extractor's 64 features at 1 x 8 x 8, with ``meta`` over its metadata."""
    from dtrain.eval.features import build_extractor
    from dtrain.eval.fid import RefStats

    ext = build_extractor("digits")
    n = meta.pop("features", ext.num_features)
    base = {"extractor": ext.name, "weights_sha256": ext.weights_sha256, "num_features": ext.num_features,
            "resolution": [1, 8, 8], "count": 20}
    return RefStats(np.zeros(n), np.eye(n), {**base, **meta}).save(path)


@pytest.mark.parametrize("bad", ["extractor", "features"])
def test_eval_ref_stats_that_do_not_fit_name_the_flag(ckpt_bundle, tmp_path, bad: str, cli_error) -> None:  # 17
    """--ref-stats, not the recipe field eval.ref_stats: the metadata check and the feature count alike."""
    ref = _ref_file(tmp_path / "ref.npz", **({"extractor": "raw"} if bad == "extractor" else {"features": 3}))
    flags = ["--num", "4", "--batch-size", "4", "--samplers", "ddim:1", "--extractor", "digits"]
    err = cli_error("eval", str(ckpt_bundle[1]), *flags, "--ref-stats", str(ref), "--out", str(tmp_path / "e"))
    assert err.startswith("dtrain eval: --ref-stats: ") and "eval.ref_stats" not in err
    assert ("reference statistics" in err and "extractor: file has 'raw', evaluation uses 'digits'" in err
            and "the same feature extractor and weights" in err) if bad == "extractor" else \
        "--ref-stats: 3 features, extractor 'digits' gives 64" in err


@pytest.mark.parametrize("key", ["eval.ref_stats", "--ref-stats"])
def test_ref_stats_mismatch_names_the_key_it_was_loaded_with(tmp_path, key: str) -> None:  # 17
    from dtrain.eval.features import build_extractor
    from dtrain.eval.fid import FID, RefStatsError, load_ref

    ext = build_extractor("digits")
    ref = load_ref(_ref_file(tmp_path / "ref.npz", resolution=[1, 16, 16]), ext, key=key)
    with pytest.raises(RefStatsError, match=rf"^{key}: reference statistics .*resolution: file has \[1, 16, 16\]"):
        FID(ext, ref, shape=(1, 8, 8))
    builtin = load_ref("digits:train", ext, key=key)
    with pytest.raises(RefStatsError, match=rf"^{key}: reference statistics .*resolution"):
        FID(ext, builtin, shape=(1, 16, 16))


@pytest.mark.parametrize("w", ["-3", "nan"])
def test_negative_guidance_is_refused(ckpt_bundle, tmp_path, w, sample_error, cli_error) -> None:
    """`--guidance -3` ran (class accuracy 0.03) and `--w -1` sampled: w >= 0 (1: none, 0: unconditional)."""
    err = sample_error(ckpt_bundle[1], tmp_path / "g.png", "--w", w)
    assert err.startswith(f"dtrain sample: --w: must be a number >= 0 (1: no guidance, 0: unconditional), got {w}")
    err = cli_error("eval", str(ckpt_bundle[1]), *EVAL, "--guidance", w, "--out", str(tmp_path / "e"))
    assert err.startswith(f"dtrain eval: --guidance: must be a number >= 0 (1: no guidance, 0: unconditional), got "
                          f"{float(w)}")


def test_sample_times_and_nfe_together_are_refused(ckpt_bundle, tmp_path, sample_error) -> None:
    """--times set the grid and --nfe was silently ignored."""
    err = sample_error(ckpt_bundle[1], tmp_path / "g.png", "--times", "0.6", "--nfe", "3")
    assert err.startswith("dtrain sample: --times: the grid's interior times set the steps")


def test_eval_default_out_tells_weights_and_guidance_apart(ckpt_bundle, tmp_path, monkeypatch) -> None:
    """Evaluations of one checkpoint with another --ema or --guidance overwrote each other's fid_vs_nfe.json."""
    ckpt = ckpt_bundle[0]
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(ckpt), *EVAL, "--ema", "raw", "--guidance", "1.5"]) == 0
    run = ckpt.parent.parent.name
    assert (tmp_path / "runs" / "eval" / f"{run}-last-emaraw-w1.5" / "fid_vs_nfe.json").is_file()
    assert not (tmp_path / "runs" / "eval" / f"{run}-last").exists()


def test_a_distilled_grid_left_for_another_warns(ckpt_bundle, tmp_path, monkeypatch) -> None:
    """A PD student's bundle stores the grid it was distilled for; sampling or evaluating it at another NFE ran on
    another grid without a word."""
    import json
    import shutil
    import warnings

    import dtrain.eval.sweep as sweep
    from dtrain.export.bundle import load_bundle

    b = tmp_path / "b"
    shutil.copytree(ckpt_bundle[1], b)
    info = json.loads((b / "dtrain.json").read_text())
    info["sampler"].update(name="ddim", nfe=2, grid=[float(info["schedule"].get("t_max", 1.0) or 1.0), 0.3, 0.0])
    (b / "dtrain.json").write_text(json.dumps(info))
    pipe = load_bundle(b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.sample(2, generator=torch.Generator().manual_seed(0))  # its own grid: quiet
    with pytest.warns(UserWarning, match=r"distilled for its own 2-step grid .* sampler 'ddim' at nfe 3 runs on "
                                         r"another grid"):
        pipe.sample(2, nfe=3, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(sweep, "fid_sweep", lambda *a, **kw: [])
    with pytest.warns(UserWarning, match=r"own 2-step grid \(ddim:2\); ddim:1, ddim:4 run on other grids"):
        argv = ["eval", str(b), *EVAL[:4], "--samplers", "ddim:1,2,4", *EVAL[6:], "--out", str(tmp_path / "e")]
        assert main(argv) == 0

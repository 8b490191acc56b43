"""Bad input to the scripts in tools/: one line naming the flag, field or file, exit code 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DIGITS = str(ROOT / "recipes" / "teacher" / "digits.yaml")


@pytest.fixture
def fails(capsys, load_tool):
    """``fails(name, argv, *words)``: tools/<name>.py exits 2 with one line ``<name>: ...`` holding every word."""

    def check(name: str, argv: list[str], *words: str) -> str:
        assert load_tool(name).main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"{name}: ") and "\n" not in err and "Traceback" not in err, err
        for w in words:
            assert w in err, err
        return err

    return check


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    sets = {"mixed": {"a.png": 8, "b.png": 16}, "bad": {"a.png": 8, "b.png": 0}, "one": {"a.png": 8}}
    for sub, files in sets.items():
        (d / sub).mkdir()
        for f, size in files.items():
            if size:
                Image.new("L", (size, size)).save(d / sub / f)
            else:
                (d / sub / f).write_bytes(b"not a png")
    (d / "index.json").write_text("{}")
    (d / "bundle").mkdir()
    torch.save({"state_dict": {"net.w": torch.zeros(3)}, "global_step": 1}, d / "train.ckpt")
    return d


@pytest.mark.parametrize("args, words", [
    (["--digits", "test", "--extractor", "incepton"], ["--extractor", "eval.feature_extractor", "incepton"]),
    (["--digits", "test", "--extractor", "inception"], ["--weights", "not set"]),
    (["--digits", "test", "--num", "1"], ["--num", "at least 2"]),
    (["--digits", "test", "--batch-size", "0"], ["--batch-size", ">= 1"]),
    (["--digits", "test", "--device", "gpu"], ["--device", "'gpu'"]),
    (["--folder", "{d}/mixed"], ["--folder", "b.png", "one size"]),
    (["--folder", "{d}/bad"], ["--folder", "b.png", "not a readable image"]),
    (["--folder", "{d}/one"], ["need at least 2"]),
    (["--shards", "{d}/none-{{000..001}}.tar"], ["--shards", "none-000.tar"]),
    (["--shards", "{d}/index.json"], ["--shards", "index.json", "not a dtrain shard index"]),
    (["--digits", "test", "--weights", "{d}/train.ckpt"], ["weights_path", "train.ckpt", "not a digits classifier"]),
    (["--digits", "test", "--extractor", "inception", "--weights", "{d}/train.ckpt"],
     ["weights_path", "train.ckpt", "not the FID Inception weights"]),
    (["--digits", "test", "--weights", "{d}/bundle"], ["weights_path", "bundle is a directory"]),
    (["--digits", "test", "--extractor", "inception", "--weights", "{d}/bundle"], ["weights_path", "is a directory"]),
])
def test_fid_ref_stats(fails, images, args, words):
    err = fails("fid_ref_stats", [a.format(d=images) for a in args] + ["--out", str(images / "o.npz")]
                + ["--device", "cpu"] * ("--device" not in args), *words)
    assert len(err) < 500, err


@pytest.fixture(scope="module")
def dcp_dir(tmp_path_factory) -> Path:
    import torch.distributed.checkpoint as dcp

    d = tmp_path_factory.mktemp("dcp") / "last.ckpt"
    dcp.save({"state_dict": {"net.w": torch.randn(64, 64)}}, checkpoint_id=str(d))
    distcp = next(d.glob("*.distcp"))
    distcp.write_bytes(distcp.read_bytes()[:100])  # truncated
    torch.save({"global_step": 1}, d / "meta.pt")  # Lightning's last write: the save finished, its shard broke later
    return d


def test_convert_ckpt(fails, tmp_path, dcp_dir):
    fails("convert_ckpt", [str(tmp_path / "nope"), str(tmp_path / "o.ckpt")], "nope", "not found")
    fails("convert_ckpt", [str(dcp_dir), str(tmp_path / "o.ckpt")], "last.ckpt", "distributed checkpoint")
    (tmp_path / "dir").mkdir()
    fails("convert_ckpt", [str(dcp_dir), str(tmp_path / "dir"), "--overwrite"], "out", "is a directory")
    assert not list(tmp_path.glob(".dir.tmp*"))
    (tmp_path / "file").write_text("x")
    fails("convert_ckpt", [str(dcp_dir), str(tmp_path / "file" / "o.ckpt")], "out", "not a directory")


def test_cd_grid(fails, dcp_dir, digits_flow_teacher):
    fails("cd_grid", [str(dcp_dir)], "last.ckpt", "distributed checkpoint")
    # a schedule without grids for some spacings: a row each saying why (it stopped at the first), 2 when none is
    fails("cd_grid", [str(digits_flow_teacher), "--num", "2", "--num-scales", "6", "--spacings", "lambda,rho"],
          "--spacings: none of 'lambda,rho' gives a consistency grid on the teacher's 'flow' schedule")
    fails("cd_grid", [str(dcp_dir), "--num", "-1"], "--num", ">= 1")
    fails("cd_grid", [str(dcp_dir), "--num", "0"], "--num", ">= 1")
    fails("cd_grid", [str(dcp_dir), "--threads", "-1"], "--threads", ">= 0")
    fails("cd_grid", [str(dcp_dir), "--spacings", "foo"], "--spacings", "'foo'", "lambda")
    fails("cd_grid", [str(dcp_dir), "--num-scales", "1"], "--num-scales", ">= 2")
    fails("cd_grid", [str(dcp_dir), "--refine", "1"], "--refine", ">= 2")  # were blamed on --spacings
    fails("cd_grid", [str(dcp_dir), "--solver", "heunn"], "--solver", "'heunn'", "dpm++2s")


@pytest.mark.parametrize("args, words", [
    (["--dry-run", "t.sbatch", DIGITS, "--gpus-per-node", "1", "--sbatch", '"x'], ["--sbatch", "No closing quotation"]),
    ([DIGITS, "trainer.devices=2"], ["RECIPE", "'trainer.devices=2'", "TEMPLATE RECIPE"]),
    (["--print-args", DIGITS, "--gpus-per-node", "1", "--nodes", "0"], ["--nodes", ">= 1", "got 0"]),
    (["--print-args", DIGITS, "--gpus-per-node", "-1"], ["--gpus-per-node", ">= 1", "got -1"]),
    (["--print-args", DIGITS, "trainer.num_nodes=-2", "--gpus-per-node", "1"], ["trainer.num_nodes", "got -2"]),
    (["--print-args", DIGITS, "trainer.devices=-3"], ["trainer.devices", ">= 1", "'auto'", "got -3"]),
    (["--print-args", DIGITS, "trainer.devices=0"], ["trainer.devices", ">= 1", "got 0"]),
    (["--dry-run", "t.sbatch", DIGITS, "eval.feature_extractor_weights_path=/no/w.pth", "--gpus-per-node", "1"],
     ["command line: eval.feature_extractor_weights_path: file not found: /no/w.pth"]),  # before the queue

    # a global batch the job's tasks do not divide, ddp_spawn under srun: refused before the job waits in the queue
    (["--dry-run", "t.sbatch", DIGITS, "trainer.global_batch_size=128", "trainer.devices=3", "trainer.accelerator=gpu"],
     ["command line: trainer.global_batch_size: 128 is not a multiple of 3 rank(s)"]),
    (["--dry-run", "t.sbatch", DIGITS, "strategy.name=ddp_spawn", "--gpus-per-node", "2"],
     ["strategy.name: ddp_spawn starts its own processes", "use ddp"]),
    # a layout in --sbatch won over the one the batch split was checked against
    (["--dry-run", "t.sbatch", DIGITS, "--gpus-per-node", "2", "--sbatch=--nodes=3"],
     ["--sbatch: '--nodes=3': the job layout comes from the recipe"]),
    (["--dry-run", "t.sbatch", DIGITS, "--gpus-per-node", "2", "--sbatch=--time=1:00:00 -N 2"], ["'-N'"]),
])
def test_slurm_submit(fails, args, words):
    fails("slurm_submit", args, *words)


def test_slurm_submit_device_ids(capsys, load_tool):
    assert load_tool("slurm_submit").main(["--print-args", DIGITS, "trainer.devices='0,1'"]) == 0
    assert capsys.readouterr().out.split() == ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2"]


@pytest.mark.parametrize("args, words", [
    ([], ["--out", "--overwrite-shipped", "digits_classifier.safetensors"]),
    (["--out", "dtrain/assets/digits_classifier.safetensors"], ["--out", "--overwrite-shipped"]),
    (["--out", "x.safetensors", "--epochs", "0"], ["--epochs", ">= 1"]),
    (["--out", "x.safetensors", "--batch-size", "0"], ["--batch-size", ">= 1"]),
    (["--out", "x.safetensors", "--width", "0"], ["--width", ">= 1"]),
    (["--out", "x.json"], ["--out", "need a .safetensors file"]),  # the record overwrote the weights
])
def test_train_digits_classifier(fails, monkeypatch, args, words):
    monkeypatch.chdir(ROOT)
    before = (ROOT / "dtrain" / "assets" / "digits_classifier.safetensors").stat().st_mtime_ns
    fails("train_digits_classifier", args, *words)
    assert (ROOT / "dtrain" / "assets" / "digits_classifier.safetensors").stat().st_mtime_ns == before

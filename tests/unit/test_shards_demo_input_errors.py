"""Bad input to ``dtrain shards`` and ``dtrain demo``: one line naming the flag or file, exit code 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dtrain.cli import main


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    p = tmp_path / "afile.txt"
    p.write_text("not a folder")
    return p


def test_shards_out_is_a_file(tmp_path: Path, a_file: Path, capsys) -> None:
    np.save(tmp_path / "x.npy", np.zeros((4, 8, 8), np.uint8))
    assert main(["shards", "npy", str(tmp_path / "x.npy"), "--out", str(a_file), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"--out: {a_file} is a file, not a directory" in err and "Traceback" not in err


@pytest.mark.parametrize("content", ["pickled", "text"])
def test_shards_unreadable_array_names_the_file(tmp_path: Path, content: str, capsys) -> None:
    bad = tmp_path / "bad.npy"
    if content == "pickled":
        np.save(bad, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    else:
        bad.write_text("images: 1\n")
    assert main(["shards", "npy", str(bad), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert f"{bad}: not a numpy .npy / .npz array file" in capsys.readouterr().err


def test_demo_out_is_a_file(a_file: Path, capsys) -> None:
    assert main(["demo", "--fast", "--out", str(a_file), "--stages", "shards"]) == 2
    assert f"--out: {a_file} is a file, not a directory" in capsys.readouterr().err


def test_demo_threads(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--fast", "--out", str(tmp_path / "d"), "--threads", "0"]) == 2
    assert "--threads: must be >= 1, not 0" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(("args", "words"), [
    (["patches", "--size", "500"], "--size: must be in [1, 427] for patches of sklearn's photos, got 500"),
    (["patches", "--size", "0"], "--size: must be in [1, 427]"),
    (["folder", "{imgs}", "--size", "0"], "--size: must be >= 1, got 0"),
])
def test_shards_size_out_of_range(tmp_path: Path, capsys, args, words) -> None:
    from PIL import Image

    (tmp_path / "imgs" / "c").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / "c" / "a.png")
    argv = [a.format(imgs=tmp_path / "imgs") for a in args]
    assert main(["shards", *argv, "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_shards_index_with_a_label_that_is_no_integer(tmp_path: Path, capsys) -> None:
    import io
    import tarfile

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, "PNG")
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for name, data in (("0.png", buf.getvalue()), ("0.cls", b"seven")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    assert main(["shards", "index", str(tmp_path / "s.tar"), "--out", str(tmp_path / "i.json"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "s.tar: 0.cls: a .cls label must be an integer, got b'seven'" in err

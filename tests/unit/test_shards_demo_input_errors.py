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

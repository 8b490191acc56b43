"""dtrain.fileio: the one atomic writer behind checkpoints, shard indexes, eval points, demo records and recipes."""

from __future__ import annotations

import json
import os

import pytest

from dtrain.fileio import replacing, write_json, write_text


def test_write_json_creates_parents_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a" / "b" / "point.json"
    assert write_json(path, {"fid": 1.5, "nfe": [1, 2]}) == path
    assert json.loads(path.read_text()) == {"fid": 1.5, "nfe": [1, 2]} and path.read_text().endswith("}\n")
    write_text(path, "second\n")
    assert path.read_text() == "second\n" and os.listdir(path.parent) == ["point.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "index.json"
    write_json(path, {"v": 1})
    with pytest.raises(OSError, match="disk full"), replacing(path, "w") as f:
        f.write('{"v": 2, "trunc')
        raise OSError("disk full")
    assert json.loads(path.read_text()) == {"v": 1} and os.listdir(tmp_path) == ["index.json"]


def test_the_temp_file_is_hidden_beside_the_target(tmp_path):
    """Seen mid-write: ``.<name>.tmp<pid>`` in the target's directory (what checkpoint resume cleans up)."""
    path = tmp_path / "last.ckpt"
    with replacing(path) as f:
        f.write(b"x")
        assert os.listdir(tmp_path) == [f".last.ckpt.tmp{os.getpid()}"] and not path.exists()
    assert path.read_bytes() == b"x"

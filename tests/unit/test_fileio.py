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
    """Seen mid-write: ``.<name>.tmp<host>.<pid>.<random>`` in the target's directory (what checkpoint resume
    cleans up)."""
    path = tmp_path / "last.ckpt"
    with replacing(path) as f:
        f.write(b"x")
        (tmp,) = os.listdir(tmp_path)
        assert tmp.startswith(".last.ckpt.tmp") and f".{os.getpid()}." in tmp and not path.exists()
    assert path.read_bytes() == b"x"


def test_concurrent_writers_of_one_file_each_rename_a_whole_file(tmp_path):
    """Every rank writes the run's recipe; ranks on other nodes (or in containers) can share a PID, threads always
    do. A temp name unique per PID only made one writer's rename fail with FileNotFoundError."""
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "recipe.yaml"

    def write(i: int) -> None:
        for _ in range(100):
            write_text(path, f"writer: {i}\n" * 50)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(4)))  # re-raises a writer's error
    lines = set(path.read_text().splitlines())
    assert len(lines) == 1 and os.listdir(tmp_path) == ["recipe.yaml"]


def test_text_is_utf8_whatever_the_locale(tmp_path):
    """OmegaConf reads recipes as UTF-8: under the C locale a locale-encoded write failed on 'café'."""
    import subprocess
    import sys

    code = "import sys; from dtrain.fileio import write_text; write_text(sys.argv[1], 'name: caf\\u00e9\\n')"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r.yaml")], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "r.yaml").read_bytes() == "name: café\n".encode()
    with pytest.raises(ValueError, match="mode must be 'wb' or 'w'"), replacing(tmp_path / "x", "a"):
        pass

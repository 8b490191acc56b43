"""Shard writing (dtrain.data.shards) and the shard stream (dtrain.data.wds) without a trainer.

Sample labels are unique ids in most tests, so "every sample exactly once" is checked on the ids.
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dtrain.data import shards as S
from dtrain.data.wds import WdsDataModule, WdsStream, rank_batches, resolve_shards, split_batches
from dtrain.errors import InputError


def _members(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for ti in tf:
            key, ext = ti.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(ti).read()
    return out


def _ids_dataset(tmp: Path, n: int, num_shards: int, size: int = 4, channels: int = 3) -> Path:
    """n random images whose label is their id (0..n-1), in ``num_shards`` shards; returns the folder."""
    shape = (n, size, size, channels) if channels == 3 else (n, size, size)
    x = np.random.default_rng(n).integers(0, 256, shape, dtype=np.uint8)
    S.write_shards(S.from_arrays(x, np.arange(n), [str(i) for i in range(n)]), tmp, num_shards=num_shards,
                   progress=False)
    return tmp


def _epoch(stream: WdsStream, workers: int, **kw) -> list[dict]:
    return list(DataLoader(stream, batch_size=None, num_workers=workers, **kw))


def _ids(batches: list[dict]) -> list[int]:
    return [int(v) for b in batches for v in b["y"]]


def _shard_of(root: Path) -> dict[int, int]:
    """Sample id -> number of the shard (in name order) that holds it."""
    return {int(key): s for s, path in enumerate(sorted(root.glob("*.tar"))) for key in _members(path)}


@pytest.fixture(autouse=True)
def _no_workers_left_behind():
    """A failing test keeps its DataLoader iterators alive (pytest holds the traceback), and with them their
    persistent workers: shut them down after each test, so the next tests do not share the cores with them (the exit
    itself ends them: dtrain.data._release_workers)."""
    yield
    import gc
    import multiprocessing

    if multiprocessing.active_children():
        from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

        for obj in gc.get_objects():
            if issubclass(type(obj), _MultiProcessingDataLoaderIter):  # not isinstance: no proxies' __class__
                obj._shutdown_workers()


# ---------------------------------------------------------------------------------------------
# Writing


def test_write_roundtrip_exact_and_reproducible(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (23, 6, 5, 3), dtype=np.uint8)
    y = rng.integers(0, 4, 23)
    lat = rng.standard_normal((23, 2, 3)).astype(np.float32)
    data = S.from_arrays(x, y, ["a", "b", "c", "d"])
    idx = S.write_shards(data, tmp_path / "a", shard_size=10, latents=lat, progress=False)
    assert [s["count"] for s in idx["shards"]] == [8, 8, 7]  # balanced, not 10/10/3
    assert idx["total"] == 23 and idx["image_size"] == [6, 5] and idx["channels"] == 3
    assert idx["classes"] == ["a", "b", "c", "d"] and idx["num_classes"] == 4
    assert idx["keys"] == ["png", "cls", "npy"] and idx["latent_shape"] == [2, 3]
    seen = set()
    for s in idx["shards"]:
        path = tmp_path / "a" / s["name"]
        assert s["sha256"] == S._sha256(path) and s["bytes"] == path.stat().st_size
        members = _members(path)
        assert len(members) == s["count"]
        for key, m in members.items():
            i = int(key)
            seen.add(i)
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(m["png"]))), x[i])
            assert int(m["cls"]) == y[i]
            np.testing.assert_array_equal(np.load(io.BytesIO(m["npy"])), lat[i])
    assert seen == set(range(23))
    again = S.write_shards(data, tmp_path / "b", shard_size=10, latents=lat, progress=False)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in idx["shards"]]
    unshuffled = S.write_shards(data, tmp_path / "c", shard_size=10, shuffle=False, progress=False)
    assert list(_members(tmp_path / "c" / unshuffled["shards"][0]["name"])) == [f"{i:08d}" for i in range(8)]


def test_balanced_counts():
    assert S.balanced_counts(1797, 500) == [450, 449, 449, 449]
    assert S.balanced_counts(10, num_shards=3) == [4, 3, 3]
    assert S.balanced_counts(5, 5) == [5]
    with pytest.raises(ValueError, match="num_shards"):
        S.balanced_counts(3, num_shards=4)


def test_from_arrays_layouts_and_errors():
    chw = np.random.default_rng(1).integers(0, 256, (4, 3, 5, 6), dtype=np.uint8)
    assert np.array_equal(S.from_arrays(chw).images, chw.transpose(0, 2, 3, 1))
    gray = np.random.default_rng(1).random((4, 1, 5, 6))
    assert S.from_arrays(gray).images.shape == (4, 5, 6)
    assert S.from_arrays(gray).images.dtype == np.uint8
    with pytest.raises(ValueError, match="uint8 or floats in"):
        S.from_arrays(np.full((2, 4, 4), 3.0))
    with pytest.raises(ValueError, match="labels"):
        S.from_arrays(chw, np.array([0, 1]))


def test_folder_source(tmp_path):
    rng = np.random.default_rng(2)
    imgs = {}
    for cls in ("dog", "cat"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for j in range(3):
            a = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(a).save(tmp_path / "img" / cls / f"{j}.png")
            imgs[(cls, j)] = a
    data = S.from_folder(tmp_path / "img")
    assert data.classes == ["cat", "dog"] and list(data.labels) == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(data.images[4], imgs[("dog", 1)])
    assert S.from_folder(tmp_path / "img", size=4, gray=True).images[0].shape == (4, 4)
    Image.fromarray(np.zeros((5, 9, 3), np.uint8)).save(tmp_path / "img" / "dog" / "odd.png")
    with pytest.raises(ValueError, match=r"odd\.png|shape \(5, 9, 3\)"):
        S.write_shards(S.from_folder(tmp_path / "img"), tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        S.from_folder(tmp_path / "nowhere")


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    """PIL's convert("L") clips 16-bit grayscale (PNG mode I;16) at 255: a ramp came out almost all white, in the
    shard reader and in `dtrain shards folder`. Both now scale by 255 / 65535."""
    ramp = np.linspace(0, 65535, 16).astype(np.uint16).reshape(4, 4)
    want = np.rint(ramp / 257.0).astype(np.uint8)
    (tmp_path / "img" / "a").mkdir(parents=True)
    Image.fromarray(ramp).save(tmp_path / "img" / "a" / "0.png")
    with Image.open(tmp_path / "img" / "a" / "0.png") as im:
        assert im.mode.startswith("I")  # what PNG decodes 16-bit gray as
        np.testing.assert_array_equal(S.image_array(im, "L"), want)
        np.testing.assert_array_equal(S.image_array(im, "RGB"), np.repeat(want[..., None], 3, axis=2))
    np.testing.assert_array_equal(S.from_folder(tmp_path / "img", gray=True).images[0], want)
    shard = tmp_path / "sh" / "train-000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tf:
        for name, data in (("0.png", (tmp_path / "img" / "a" / "0.png").read_bytes()), ("0.cls", b"0")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    S.index_existing([str(shard)], shard.parent / "index.json", progress=False)
    stream = WdsStream(resolve_shards(str(shard.parent / "index.json")), batch_size=1, shuffle=1)
    x = _epoch(stream, 0)[0]["x"]
    np.testing.assert_allclose(x[0, 0].numpy(), want / 127.5 - 1.0, atol=1e-6)
    assert x.min() == -1.0 and x.max() == 1.0


def test_cli_npy_and_errors(tmp_path, capsys):
    x = np.random.default_rng(3).integers(0, 256, (12, 3, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(12) % 3)
    np.save(tmp_path / "z.npy", np.ones((12, 5), np.float16))
    rc = S.main(["npy", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "--latents",
                 str(tmp_path / "z.npy"), "--num-shards", "2", "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 0
    idx = json.loads((tmp_path / "o" / "index.json").read_text())
    assert idx["total"] == 12 and idx["num_classes"] == 3 and idx["latent_dtype"] == "float16"
    assert S.main(["verify", str(tmp_path / "o" / "index.json"), "--quiet"]) == 0
    assert S.main(["npy", str(tmp_path / "missing.npy"), "--out", str(tmp_path / "p")]) == 2
    assert "missing.npy" in capsys.readouterr().err


def test_cli_counts_are_named_and_a_smaller_rewrite_leaves_no_stale_shards(tmp_path, capsys):
    """--count -5 gave numpy's 'negative dimensions are not allowed'; --shard-size 0 named Python arguments; a
    rewrite with fewer shards left the earlier write's last shards, which a pattern over the folder then read."""
    for argv, flag in ((["patches", "--count", "-5"], "--count: must be >= 1, got -5"),
                       (["digits", "--shard-size", "0"], "--shard-size: must be >= 1, got 0")):
        assert S.main([*argv, "--out", str(tmp_path / "x"), "--quiet"]) == 2
        assert f"dtrain shards: error: {flag}" in capsys.readouterr().err
    out = tmp_path / "d"
    assert S.main(["digits", "--num-shards", "5", "--out", str(out), "--quiet"]) == 0
    (out / "train-other.tar").write_bytes(b"not ours")  # not a shard name of this writer: kept
    assert S.main(["digits", "--num-shards", "2", "--out", str(out), "--quiet"]) == 0
    assert sorted(f.name for f in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "train-other.tar"]
    assert "removed 3 shard(s) of an earlier, larger write" in capsys.readouterr().err
    assert resolve_shards(str(out / "train-{000000..000001}.tar")).total == 1347


def test_digits_source_exact():
    """``all``: sklearn's images scaled to 0..255; the default ``train`` split holds exactly the images of
    ``digits_arrays("train")`` (FID-digits' reference), none of the held-out test split."""
    from sklearn.datasets import load_digits

    from dtrain.data.digits import digits_arrays

    d, ref = S.from_digits("all"), load_digits()
    assert d.images.shape == (1797, 8, 8) and d.images.dtype == np.uint8
    np.testing.assert_array_equal(d.images, np.round(ref.images * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(d.labels, ref.target)
    for split, n in (("train", 1347), ("test", 450)):
        got = S.from_digits(split) if split == "test" else S.from_digits()
        x, y = digits_arrays(split)
        assert len(got.labels) == n
        np.testing.assert_array_equal(got.images, np.round((x[:, 0].numpy() + 1) * 8 * 255 / 16).astype(np.uint8))
        np.testing.assert_array_equal(got.labels, y.numpy())


def test_patches_are_crops_of_the_labelled_photo():
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    d = S.from_patches(6, size=16, seed=5)
    assert d.images.shape == (6, 16, 16, 3) and len(d.classes) == 2
    np.testing.assert_array_equal(S.from_patches(6, size=16, seed=5).images, d.images)
    for img, k in zip(d.images, d.labels):
        photo = photos[k]
        rows, cols = np.nonzero((photo[:-15, :-15] == img[0, 0]).all(-1))
        assert any(np.array_equal(photo[r:r + 16, c:c + 16], img) for r, c in zip(rows, cols))


def test_cifar10_python_batches(tmp_path):
    rng = np.random.default_rng(4)
    rows = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        rows[name] = data
        with open(tmp_path / name, "wb") as f:  # the layout of the python-2 pickles: bytes keys
            pickle.dump({b"data": data, b"labels": [1, 2, 3], b"batch_label": b"x"}, f, protocol=2)
    with open(tmp_path / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)
    d = S.from_cifar10(tmp_path, "train")
    assert d.images.shape == (15, 32, 32, 3) and d.classes[3] == "c3" and list(d.labels[:3]) == [1, 2, 3]
    r = rows["data_batch_2"][1]  # R plane, then G, then B, each row-major 32x32
    assert d.images[4][5, 7].tolist() == [r[5 * 32 + 7], r[1024 + 5 * 32 + 7], r[2048 + 5 * 32 + 7]]
    assert len(S.from_cifar10(tmp_path, "test")) == 3

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        S.from_cifar10(tmp_path, "test")


def test_verify_and_index_existing(tmp_path):
    root = _ids_dataset(tmp_path / "d", 20, 3)
    assert S.verify_index(root / "index.json", progress=False) == []
    idx = S.index_existing([str(p) for p in sorted(root.glob("*.tar"))], tmp_path / "re.json", progress=False)
    assert [s["count"] for s in idx["shards"]] == [7, 7, 6] and idx["num_classes"] == 20
    assert resolve_shards(str(tmp_path / "re.json")).counts == [7, 7, 6]
    shard = root / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[-1500] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert any("sha256" in p for p in S.verify_index(root / "index.json", progress=False))
    (root / "train-000002.tar").unlink()
    assert any("missing" in p for p in S.verify_index(root / "index.json", progress=False))
    short = tmp_path / "short-000000.tar"  # cut mid-member: indexing names the file (was tarfile's raw traceback)
    short.write_bytes((root / "train-000000.tar").read_bytes()[:1700])
    with pytest.raises(ValueError, match=r"short-000000\.tar: not a readable tar shard \(truncated or corrupt\?\)"):
        S.index_existing([str(short)], tmp_path / "short.json", progress=False)


# ---------------------------------------------------------------------------------------------
# Resolving shard sets: failures name the path


def test_resolve_errors_name_the_path(tmp_path):
    root = _ids_dataset(tmp_path / "d", 10, 2)
    with pytest.raises(ValueError, match="expands to no shards"):
        resolve_shards("")
    with pytest.raises(FileNotFoundError, match=r"train-000002\.tar \(and 5 more of 8\)"):
        resolve_shards(str(root / "train-{000000..000007}.tar"))
    with pytest.raises(FileNotFoundError, match=r"\*\.tar \(globs such as \* are not expanded: give a brace range"):
        resolve_shards(str(root / "*.tar"))  # the files exist: the message must not read as if they were missing
    (root / "train-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"train-000001\.tar"):
        resolve_shards(str(root / "index.json"))
    with pytest.raises(ValueError, match="need a shard index"):
        resolve_shards(f"pipe:cat {root}/train-000000.tar")
    with pytest.raises(ValueError, match="not listed in the index"):
        resolve_shards(f"pipe:cat {root}/other-000000.tar", str(root / "index.json"))


def test_a_pattern_that_reads_part_of_the_index_says_so(tmp_path):
    """A brace range one short of the shards written (ImageNet's 1282 as {000000..001280}) read all but the last
    shard without a word; now it warns with both counts, and the full pattern (or the index) does not."""
    import warnings

    root = _ids_dataset(tmp_path / "d", 12, 3)
    with pytest.warns(UserWarning, match=r"reads 2 of the 3 shards its index .* \(8 of 12 samples\); data\.shards="):
        assert len(resolve_shards(str(root / "train-{000000..000001}.tar")).urls) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_shards(str(root / "train-{000000..000002}.tar"))
        resolve_shards(str(root / "index.json"))


def test_folders_that_reuse_shard_names_keep_their_own_counts(tmp_path):
    """Counts were looked up by file name in the index beside the *first* shard: 'a/train-*::b/train-*' (both
    folders written with the default prefix) read a's counts for b's shards, an epoch of 20 samples instead of 40
    (reversed: 20 of 60 slots were repeats). Each local shard is now looked up by its full path in its own
    folder's index; a copy elsewhere (a node's local disk) with an explicit index falls back to a unique name."""
    import shutil

    def five_classes(root: Path, n: int, size: int = 4) -> Path:
        x = np.random.default_rng(n).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        S.write_shards(S.from_arrays(x, np.arange(n) % 5), root, num_shards=2, progress=False)
        return root

    a, b = five_classes(tmp_path / "a", 10), five_classes(tmp_path / "b", 30)
    for first, second, counts in [(a, b, [5, 5, 15, 15]), (b, a, [15, 15, 5, 5])]:
        ss = resolve_shards(f"{first}/train-{{000000..000001}}.tar::{second}/train-{{000000..000001}}.tar")
        assert ss.counts == counts and ss.total == 40
        stream = WdsStream(ss, batch_size=4, shuffle=3, drop_last=False, labels=False)
        assert sum(len(batch["x"]) for batch in _epoch(stream, 2)) == 40
    # one index over both folders: looked up by path, not by the name the two share
    both = S.index_existing([str(a / "train-000000.tar"), str(b / "train-000000.tar")], tmp_path / "both.json",
                            progress=False)
    assert [sh["count"] for sh in both["shards"]] == [5, 15]
    assert resolve_shards(f"{{{a},{b}}}/train-000000.tar", str(tmp_path / "both.json")).counts == [5, 15]
    # a copy elsewhere: by name, when the index names that shard once; else an error naming both entries
    shutil.copytree(b, tmp_path / "scratch")
    assert resolve_shards(f"{tmp_path}/scratch/train-{{000000..000001}}.tar", str(b / "index.json")).counts == [15, 15]
    with pytest.raises(ValueError, match=r"lists 2 shards named train-000000\.tar .*ambiguous"):
        resolve_shards(f"{tmp_path}/scratch/train-000000.tar", str(tmp_path / "both.json"))
    # folders whose indexes describe other images fail naming both files
    five_classes(tmp_path / "c", 10, size=8)
    with pytest.raises(ValueError, match=r"indexes .*a/index\.json and .*c/index\.json differ in image_size"):
        resolve_shards(f"{a}/train-000000.tar::{tmp_path}/c/train-000000.tar")


def test_a_pattern_of_local_and_piped_shards_reads_the_local_index(tmp_path):
    """'a/train-0.tar::pipe:cat a/train-1.tar' took both counts from the index beside the first shard; the per-shard
    lookup must keep that (a remote shard looks in the index the local ones found), and unindexed local shards are
    scanned once each."""
    from unittest import mock

    import dtrain.data.stream as st

    root = _ids_dataset(tmp_path / "d", 30, 3)
    ss = resolve_shards(f"{root}/train-{{000000..000001}}.tar::pipe:cat {root}/train-000002.tar")
    assert ss.counts == [10, 10, 10]
    (root / "index.json").unlink()
    with mock.patch.object(st, "scan_shard", wraps=st.scan_shard) as scan:
        assert resolve_shards(f"{root}/train-{{000000..000002}}.tar").counts == [10, 10, 10]
    assert scan.call_count == 3


def test_counts_without_index_and_pipe_urls(tmp_path):
    root = _ids_dataset(tmp_path / "d", 15, 2)
    (root / "index.json").rename(tmp_path / "idx.json")
    local = resolve_shards(str(root / "train-{000000..000001}.tar"))  # counted from tar headers
    assert local.counts == [8, 7] and local.image_size == (4, 4) and local.channels == 3
    piped = resolve_shards(f"pipe:cat {root}/train-{{000000..000001}}.tar", str(tmp_path / "idx.json"))
    assert piped.counts == [8, 7] and piped.num_classes == 15
    stream = WdsStream(piped, batch_size=5, shuffle=4, drop_last=False)
    assert sorted(_ids(_epoch(stream, 2))) == list(range(15))


def test_shard_names_in_urls_and_index_fields(tmp_path):
    """Index lookups name .tar.gz shards in full (the pattern's names are looked up in the index); index fields
    of the wrong shape fail naming the field and the file."""
    from dtrain.data.stream import _shard_name

    assert _shard_name("gz/train-000001.tar.gz") == "train-000001.tar.gz"
    assert _shard_name("pipe:curl -s s3://b/train-000002.tgz") == "train-000002.tgz"
    assert _shard_name("pipe:cat /d/train-000003.tar") == "train-000003.tar"
    root = _ids_dataset(tmp_path / "d", 8, 2)
    good = json.loads((root / "index.json").read_text())
    for field, value, words in [("image_size", 8, "'image_size' must be [height, width]"),
                                ("image_size", [4, 0], "'image_size' must be [height, width]"),
                                ("channels", "1", "'channels' must be a positive int, got '1'")]:
        (root / "index.json").write_text(json.dumps({**good, field: value}))
        with pytest.raises(ValueError, match=r"index\.json: " + words.replace("[", r"\[")):
            S.read_index(root / "index.json")


@pytest.mark.parametrize(("n", "shards", "shuffle_shards", "world", "batch", "epoch_size"),
                         [(100, 1, True, 1, 32, None), (100, 1, True, 2, 16, None), (60, 3, False, 1, 16, None),
                          (20, 2, False, 1, 2, 10)])
def test_what_an_epoch_leaves_out_changes_with_the_epoch(tmp_path, n, shards, shuffle_shards, world, batch,
                                                         epoch_size):
    """The samples an epoch drops (each rank's drop_last remainder, the N mod W tail) or, with a shorter
    epoch_size, does not reach sat at fixed places of the shard sequence: with one shard or unshuffled shards the
    same samples were never trained on (4 of 100; 67 of the 1347 digits). The sequence now starts at a seeded
    offset each epoch: within a few epochs every sample is read, and each epoch still reads none twice."""
    ss = resolve_shards(str(_ids_dataset(tmp_path / "d", n, shards) / "index.json"))
    seen: set[int] = set()
    for epoch in range(8):
        ids = []
        for r in range(world):
            stream = WdsStream(ss, batch_size=batch, rank=r, world_size=world, epoch_size=epoch_size, shuffle=7,
                               shuffle_shards=shuffle_shards, seed=1)
            stream.epoch = epoch
            ids += _ids(_epoch(stream, 2))
        assert len(ids) == len(set(ids)) == world * len(stream) * batch  # no repeats; equal batches per rank
        seen |= set(ids)
    assert seen == set(range(n))


# ---------------------------------------------------------------------------------------------
# Splitting by rank and worker


def test_layout_helpers():
    assert rank_batches(10, 4, drop_last=False) == [4, 4, 2]
    assert rank_batches(10, 4, drop_last=True) == [4, 4]
    assert split_batches(5, 2) == [(0, 3), (3, 2)]
    assert split_batches(1, 3) == [(0, 1), (1, 0), (1, 0)]


@pytest.mark.parametrize(("n", "shards", "world", "workers"), [(48, 4, 2, 2), (50, 3, 2, 2), (47, 5, 3, 2),
                                                               (30, 3, 4, 0)])
def test_ranks_disjoint_equal_and_complete(tmp_path, n, shards, world, workers):
    """Each rank gets N // W samples in the same number of batches; together all but the N mod W tail."""
    ss = resolve_shards(str(_ids_dataset(tmp_path, n, shards) / "index.json"))
    per_rank = []
    for r in range(world):
        stream = WdsStream(ss, batch_size=4, rank=r, world_size=world, seed=3, shuffle=5, drop_last=False)
        batches = _epoch(stream, workers)
        assert len(batches) == len(stream)
        per_rank.append(_ids(batches))
    assert {len(ids) for ids in per_rank} == {n // world}
    everything = [i for ids in per_rank for i in ids]
    assert len(set(everything)) == len(everything) == n - n % world
    assert set(everything) <= set(range(n))


def test_rank_comes_from_the_trainer_not_env(tmp_path, monkeypatch):
    root = _ids_dataset(tmp_path, 16, 2)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    ids = []
    for r in range(2):
        dm = WdsDataModule(str(root / "index.json"), batch_size=4, num_workers=0, seed=1)
        dm.trainer = SimpleNamespace(global_rank=r, world_size=2, current_epoch=0, training=True)
        dm.setup("fit")
        assert (dm.stream.rank, dm.stream.world_size, len(dm.stream)) == (r, 2, 2)
        ids.append(_ids(list(dm.train_dataloader())))
    assert sorted(ids[0] + ids[1]) == list(range(16))


def test_spawned_workers_split_correctly(tmp_path):
    """Spawned workers inherit no rank env vars; the split rides on the pickled stream."""
    ss = resolve_shards(str(_ids_dataset(tmp_path, 24, 3) / "index.json"))
    rank0 = _ids(_epoch(WdsStream(ss, batch_size=3, rank=0, world_size=2, shuffle=4), 0))
    rank1 = _ids(_epoch(WdsStream(ss, batch_size=3, rank=1, world_size=2, shuffle=4), 2,
                        multiprocessing_context="spawn"))
    assert len(rank1) == 12 and sorted(rank0 + rank1) == list(range(24))


def test_epochs_reshuffle_deterministically(tmp_path):
    ss = resolve_shards(str(_ids_dataset(tmp_path, 40, 4) / "index.json"))
    stream = WdsStream(ss, batch_size=4, seed=7, shuffle=8)
    e0 = _ids(_epoch(stream, 2))
    stream.epoch = 1
    e1 = _ids(_epoch(stream, 2))
    assert sorted(e0) == sorted(e1) == list(range(40)) and e0 != e1
    stream.epoch = 0
    assert _ids(_epoch(stream, 2)) == e0
    same_seed = WdsStream(ss, batch_size=4, seed=7, shuffle=8)
    assert _ids(_epoch(same_seed, 2)) == e0
    assert _ids(_epoch(WdsStream(ss, batch_size=4, seed=8, shuffle=8), 2)) != e0


def test_read_order_epochs_visit_the_shards_in_a_new_order(tmp_path):
    """shuffle=1 (read order) still reads the shards in a seeded order that changes each epoch, not one fixed order."""
    root = _ids_dataset(tmp_path, 20, 4)
    shard = _shard_of(root)
    stream = WdsStream(resolve_shards(str(root / "index.json")), batch_size=5, seed=3, shuffle=1)
    orders = []
    for epoch in (0, 1, 2, 3, 0):
        stream.epoch = epoch
        seq = [shard[i] for i in _ids(_epoch(stream, 0))]
        orders.append(tuple(dict.fromkeys(seq)))
        assert seq == [s for s in orders[-1] for _ in range(5)]  # whole shards, one after another
    assert orders[4] == orders[0] and len(set(orders)) > 2


def test_one_shard_is_shuffled_anew_each_epoch(tmp_path):
    """One shard (or unshuffled shards) in an epoch that reads it all: each epoch's sample order is a new shuffle."""
    stream = WdsStream(resolve_shards(str(_ids_dataset(tmp_path, 24, 1) / "index.json")), batch_size=4, seed=5,
                       shuffle=24)
    assert not stream.ring_start  # no seeded start offset: only the in-block shuffle can differ
    epochs = []
    for epoch in (0, 1, 2):
        stream.epoch = epoch
        epochs.append(_ids(_epoch(stream, 0)))
    assert all(sorted(ids) == list(range(24)) for ids in epochs)
    assert len(set(map(tuple, epochs))) == 3


def test_resampled_ranks_draw_different_samples(tmp_path):
    """Resampled mode: each DDP rank draws its own shard stream, so the ranks train on different samples."""
    ss = resolve_shards(str(_ids_dataset(tmp_path, 40, 4) / "index.json"))
    drawn = []
    for rank in (0, 1):
        stream = WdsStream(ss, batch_size=4, resampled=True, epoch_size=48, world_size=2, rank=rank, shuffle=4,
                           seed=2)
        ids = []
        for epoch in range(3):
            stream.epoch = epoch
            ids += _ids(_epoch(stream, 0))
        drawn.append(sorted(ids))
    assert len(drawn[0]) == len(drawn[1]) == 72 and drawn[0] != drawn[1]


def test_resampled_epochs_continue_the_stream(tmp_path):
    ss = resolve_shards(str(_ids_dataset(tmp_path, 30, 3) / "index.json"))
    stream = WdsStream(ss, batch_size=4, resampled=True, epoch_size=24, world_size=2, rank=1, shuffle=6, seed=2)
    assert len(stream) == 3
    epochs = []
    for e in range(4):
        stream.epoch = e
        epochs.append(_ids(_epoch(stream, 2)))
    assert all(len(ids) == 12 for ids in epochs)
    assert len(set(map(tuple, epochs))) == 4  # the stream goes on rather than repeating
    stream.epoch = 2
    assert _ids(_epoch(stream, 2)) == epochs[2]  # and is a pure function of the epoch
    every = [i for ids in epochs for i in ids]
    assert set(every) <= set(range(30)) and len(set(every)) > 20


def test_decoding_normalisation_flip_and_latents(tmp_path):
    x = np.random.default_rng(9).integers(0, 256, (16, 4, 5), dtype=np.uint8)  # gray
    lat = np.random.default_rng(9).standard_normal((16, 3)).astype(np.float32)
    S.write_shards(S.from_arrays(x, np.arange(16)), tmp_path, num_shards=2, latents=lat, progress=False)
    ss = resolve_shards(str(tmp_path / "index.json"))
    plain = _epoch(WdsStream(ss, batch_size=8, latents=True, shuffle=4), 0)
    flipped = _epoch(WdsStream(ss, batch_size=8, latents=True, shuffle=4, flip=True), 0)
    n_flipped = 0
    for b, f in zip(plain, flipped):
        assert b["x"].shape == (8, 1, 4, 5) and b["x"].dtype == torch.float32
        for i, y in enumerate(b["y"].tolist()):
            ref = torch.from_numpy(x[y]).float() / 127.5 - 1
            torch.testing.assert_close(b["x"][i, 0], ref, rtol=0, atol=1e-6)
            torch.testing.assert_close(b["latent"][i], torch.from_numpy(lat[y]))
            assert f["y"][i] == y  # flips change pixels, not the order
            same, mirrored = torch.equal(f["x"][i, 0], ref), torch.equal(f["x"][i, 0], ref.flip(-1))
            assert same or mirrored
            n_flipped += mirrored and not same
    assert 3 <= n_flipped <= 13


# ---------------------------------------------------------------------------------------------
# Resume and bad data


@pytest.mark.timeout(30)  # ~1 s; a resume bug used to show as a 600 s hang
@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize(("workers", "consumed", "resampled"), [(2, 3, False), (2, 4, False), (3, 5, False),
                                                                (0, 2, False), (2, 3, True)])
def test_resume_yields_exactly_the_rest_of_the_epoch(tmp_path, workers, consumed, resampled):
    """A datamodule restored after `consumed` trained batches yields batches consumed.. of the full run."""
    root = _ids_dataset(tmp_path, 45, 4)

    def dm():
        m = WdsDataModule(str(root / "index.json"), batch_size=4, num_workers=workers, shuffle=6, flip=True,
                          drop_last=False, seed=11, resampled=resampled, epoch_size=44 if resampled else None)
        m.trainer = SimpleNamespace(global_rank=1, world_size=2, current_epoch=3, training=True)
        m.setup("fit")
        return m

    full = list(dm().train_dataloader())
    assert len(full) == 6  # 22 samples per rank in batches of 4: 5 full + 1 of 2
    first = dm()
    it = iter(first.train_dataloader())
    for _ in range(consumed):
        first.on_before_batch_transfer(next(it), 0)
    state = first.state_dict()
    assert state["epoch"] == 3 and state["consumed"] == consumed
    resumed = dm()
    resumed.load_state_dict(state)
    rest = list(resumed.train_dataloader())
    assert len(rest) == len(full) - consumed
    for a, b in zip(rest, full[consumed:]):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])
    done = dm()  # restored after the epoch's last batch: the next pass is the next data epoch, in full
    done.load_state_dict({**state, "consumed": len(full)})
    nxt = list(done.train_dataloader())
    assert len(nxt) == 6 and done.state_dict()["epoch"] == 4
    assert not all(torch.equal(a["y"], b["y"]) for a, b in zip(nxt, full))


@pytest.mark.timeout(30)
def test_without_a_trainer_epochs_go_forward_after_a_restore(tmp_path):
    """A custom loop (no Lightning trainer): each pass is the next data epoch. After a restore at epoch 3 the
    passes used to read epochs 3, then 1, 2, ... (the pass count), replaying data."""
    root = _ids_dataset(tmp_path, 40, 2)

    def dm() -> WdsDataModule:
        m = WdsDataModule(str(root / "index.json"), batch_size=4, num_workers=0, shuffle=5, seed=2)
        m.setup("fit")
        return m

    fresh = dm()
    epochs = []
    for _ in range(3):
        epochs.append({int(b["_wds"][0]) for b in fresh.train_dataloader()})
    assert epochs == [{0}, {1}, {2}]
    restored = dm()
    restored.load_state_dict({**fresh.state_dict(), "epoch": 3, "consumed": 5})
    passes = [[tuple(b["_wds"][:2]) for b in restored.train_dataloader()] for _ in range(3)]
    assert [p[0] for p in passes] == [(3, 5), (4, 0), (5, 0)] and list(map(len, passes)) == [5, 10, 10]


@pytest.mark.timeout(30)
def test_resume_layout_covers_the_shuffle_and_reads_older_checkpoints(tmp_path):
    """Another shuffle buffer (or shard shuffling, shard count or data seed) changes the order: the resume warns and
    skips the fraction; a layout saved before these keys existed restores the exact position."""
    import warnings

    root = _ids_dataset(tmp_path, 40, 4)

    def dm(shuffle, seed=1):
        m = WdsDataModule(str(root / "index.json"), batch_size=4, num_workers=0, seed=seed, shuffle=shuffle)
        m.setup("fit")
        return m

    a = dm(8)
    it = iter(a.train_dataloader())
    for _ in range(3):
        a.on_before_batch_transfer(next(it), 0)
    state = a.state_dict()
    b = dm(16)
    b.load_state_dict(state)
    with pytest.warns(UserWarning, match="another layout"):
        list(b.train_dataloader())
    s = dm(8, seed=2)
    s.load_state_dict(state)
    with pytest.warns(UserWarning, match=r"another layout .*'seed': 1.*'seed': 2"):
        assert len(list(s.train_dataloader())) == 7
    old = {**state, "layout": {k: v for k, v in state["layout"].items()
                               if k not in ("shuffle", "shuffle_shards", "shards")}}
    c = dm(8)
    c.load_state_dict(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list(c.train_dataloader())) == len(list(dm(8).train_dataloader())) - 3
    # an epoch that leaves samples out now starts at a seeded offset: a checkpoint from before (no ring_start)
    # read the old order, so its position no longer fits and the resume says so; one that reads all still fits
    for batch, fits in ((3, False), (4, True)):  # 40 samples: batches of 3 leave 1 out, of 4 none
        m = WdsDataModule(str(root / "index.json"), batch_size=batch, num_workers=0, seed=1, shuffle=8)
        m.setup("fit")
        it = iter(m.train_dataloader())
        m.on_before_batch_transfer(next(it), 0)
        saved = m.state_dict()
        assert saved["layout"]["ring_start"] is not fits
        saved["layout"].pop("ring_start")
        r = WdsDataModule(str(root / "index.json"), batch_size=batch, num_workers=0, seed=1, shuffle=8)
        r.setup("fit")
        r.load_state_dict(saved)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            list(r.train_dataloader())
        assert any("another layout" in str(w.message) for w in seen) is not fits


@pytest.mark.timeout(30)
def test_resume_with_another_layout_keeps_the_fraction(tmp_path):
    root = _ids_dataset(tmp_path, 40, 4)
    a = WdsDataModule(str(root / "index.json"), batch_size=4, num_workers=2, seed=1)
    a.setup("fit")
    it = iter(a.train_dataloader())
    for _ in range(5):
        a.on_before_batch_transfer(next(it), 0)
    b = WdsDataModule(str(root / "index.json"), batch_size=2, num_workers=0, seed=1)
    b.setup("fit")
    b.load_state_dict(a.state_dict())
    with pytest.warns(UserWarning, match="another layout"):
        assert len(list(b.train_dataloader())) == 10


def _corrupt_png(path: Path, key: str) -> None:
    """Rewrite ``path`` with the png of ``key`` replaced by garbage bytes of the same length."""
    with tarfile.open(path) as tf:
        members = [(ti, tf.extractfile(ti).read()) for ti in tf]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as out:
        for ti, data in members:
            if ti.name == f"{key}.png":
                data = b"\x89PNG garbage" + bytes(len(data) - 12)
            out.addfile(ti, io.BytesIO(data))


def test_bad_samples_are_skipped_counted_and_refilled(tmp_path, caplog):
    root = _ids_dataset(tmp_path, 40, 4)
    index = json.loads((root / "index.json").read_text())
    shard0 = root / index["shards"][0]["name"]
    keys = list(_members(shard0))
    _corrupt_png(shard0, keys[2])
    _corrupt_png(shard0, keys[5])
    shard2 = root / index["shards"][2]["name"]
    keys2 = list(_members(shard2))
    with tarfile.open(shard2) as tf:  # cut the shard inside the 7th sample's png
        cut = next(ti.offset_data + 20 for ti in tf if ti.name == f"{keys2[6]}.png")
    shard2.write_bytes(shard2.read_bytes()[:cut])
    dm = WdsDataModule(str(root / "index.json"), batch_size=4, num_workers=2, shuffle=5, seed=0)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 10 and all(b["x"].shape[0] == 4 for b in batches)
    for b in batches:
        dm.on_before_batch_transfer(b, 0)
    assert dm.bad_samples == 2 + 4  # two garbage pngs, the truncated shard's last 4 samples
    bad_ids = {int(keys[2]), int(keys[5])} | {int(k) for k in keys2[6:]}
    ids = _ids(batches)
    assert not bad_ids & set(ids)
    assert set(ids) == set(range(40)) - bad_ids  # every good sample once, repeats fill the 6 slots
    assert len(ids) == 40
    in_process = WdsDataModule(str(root / "index.json"), batch_size=4, num_workers=0, shuffle=5, seed=0)
    with caplog.at_level("WARNING", logger="dtrain.data.wds"):
        list(in_process.train_dataloader())  # the log names shard and key (worker processes log to stderr)
    assert f"skipped sample {keys[2]} of {shard0}" in caplog.text and "UnidentifiedImageError" in caplog.text
    assert f"skipped sample #9 of {shard2}" in caplog.text


def _rewrite(path: Path, change) -> None:
    """Rewrite the tar ``path`` with each member's bytes replaced by ``change(name, data)``."""
    with tarfile.open(path) as tf:
        members = [(ti, tf.extractfile(ti).read()) for ti in tf]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as out:
        for ti, data in members:
            data = change(ti.name, data)
            ti.size = len(data)
            out.addfile(ti, io.BytesIO(data))


def test_a_latent_of_another_shape_or_a_colour_image_in_gray_shards_is_a_bad_sample(tmp_path):
    """With the index's latent shape (and one channel) each such sample is skipped and counted (np.stack raised an
    error naming nothing; a red image became gray silently); without an index a batch of mixed latents fails
    naming the field."""
    x = np.random.default_rng(0).integers(0, 256, (16, 4, 4), dtype=np.uint8)
    lat = np.random.default_rng(0).standard_normal((16, 3)).astype(np.float32)
    S.write_shards(S.from_arrays(x, np.arange(16)), tmp_path, num_shards=1, latents=lat, shuffle=False,
                   progress=False)
    shard = tmp_path / "train-000000.tar"
    red, odd = io.BytesIO(), io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), [255, 0, 0], np.uint8)).save(red, format="PNG")
    np.save(odd, np.zeros(4, np.float32))
    _rewrite(shard, lambda name, data: {"00000003.npy": odd.getvalue(), "00000005.png": red.getvalue()}.get(name, data))
    dm = WdsDataModule(str(tmp_path / "index.json"), batch_size=4, latents=True, shuffle=1, seed=0)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    for b in batches:
        dm.on_before_batch_transfer(b, 0)
    assert dm.bad_samples == 2 and not {3, 5} & set(_ids(batches))
    (tmp_path / "index.json").unlink()
    stream = WdsStream(resolve_shards(str(shard)), batch_size=4, latents=True, shuffle=1, shuffle_shards=False)
    with pytest.raises(InputError, match=r"data.shards: latents of shapes \[\(3,\), \(4,\)\] in one batch"):
        _epoch(stream, 0)


def test_a_corrupt_header_or_a_cut_short_shard_without_an_index_fails_naming_it(tmp_path, capsys):
    """tarfile ends its listing at a bad header without an error: a shard with no index lost every sample after a
    corrupt member header (or its cut-off tail), unreported, and `dtrain shards index` wrote the short count."""
    from dtrain.cli import main

    root = _ids_dataset(tmp_path, 20, 2)
    (root / "index.json").unlink()
    a, b = sorted(root.glob("*.tar"))
    with tarfile.open(a) as tf:
        offsets = [ti.offset for ti in tf]
    data = bytearray(a.read_bytes())
    data[offsets[8] + 3] ^= 0xFF  # a name byte of the 5th sample's first member: its checksum fails
    a.write_bytes(bytes(data))
    b.write_bytes(b.read_bytes()[:len(b.read_bytes()) // 2])
    for shard, why in ((a, "a corrupt header"), (b, "cut short")):
        with pytest.raises(InputError, match=rf"data.shards: {shard} cannot be read as a tar shard \(ReadError: no "
                                             rf"end-of-archive block after \d+ samples \({why}"):
            resolve_shards(str(shard))
        assert main(["shards", "index", str(shard), "--out", str(tmp_path / "i")]) == 2
        assert f"{shard}: not a readable tar shard" in capsys.readouterr().err
    good = _ids_dataset(tmp_path / "good", 8, 1)  # TarWriter's shards end as they should
    assert S.scan_shard(good / "train-000000.tar")[0] == 8


def test_a_batch_with_nothing_decodable_is_filled_from_further_on(tmp_path):
    root = _ids_dataset(tmp_path, 8, 1)
    shard = root / "train-000000.tar"
    order = list(_members(shard))
    _corrupt_png(shard, order[0])
    _corrupt_png(shard, order[1])
    stream = WdsStream(resolve_shards(str(root / "index.json")), batch_size=2, shuffle=1, shuffle_shards=False)
    batches = _epoch(stream, 0)
    first = int(order[2])
    assert [b["y"].tolist() for b in batches] == [[first, first]] + [[int(k) for k in order[i:i + 2]]
                                                                     for i in (2, 4, 6)]
    assert [b["_wds"][2] for b in batches] == [2, 0, 0, 0]


def test_recipe_schema_validation_and_registry(tmp_path):
    """``data.name: wds`` in a recipe: the model must match the index; build_datamodule gives the datamodule."""
    from dtrain.config import RecipeError, load_recipe
    from dtrain.data import build_datamodule

    root = _ids_dataset(tmp_path, 12, 2)
    model = ["model.in_channels=3", "model.resolution=4", "model.channel_mult=[1]", "model.attn_resolutions=[]"]
    cfg = load_recipe(None, ["data.name=wds", f"data.shards={root}/index.json", "data.batch_size=3", *model])
    dm = build_datamodule(cfg.data, seed=cfg.seed)
    assert isinstance(dm, WdsDataModule) and dm.shape == (3, 4, 4) and dm.num_classes == 12
    dm.setup("fit")
    assert len(dm.stream) == 4
    with pytest.raises(RecipeError, match=r"model\.resolution: must be 4"):
        load_recipe(None, ["data.name=wds", f"data.shards={root}/index.json", *model, "model.resolution=8"])
    with pytest.raises(RecipeError, match=r"model\.num_classes: .* has 12 classes"):
        load_recipe(None, ["data.name=wds", f"data.shards={root}/index.json", *model, "model.num_classes=10"])
    with pytest.raises(RecipeError, match=r"data\.shards: required"):
        load_recipe(None, ["data.name=wds", *model])



def test_index_channels_follow_the_reader_and_rewrites_drop_the_old_index(tmp_path, monkeypatch):
    """An RGBA shard is indexed with 3 channels (the reader decodes it to RGB; 4 made the recipe check demand a
    4-channel model the data never gives); a rewrite of a shard folder that crashes leaves no index over the new
    shards, and ``shards index --out`` names a directory on one line."""
    from dtrain.cli import main

    with tarfile.open(tmp_path / "rgba.tar", "w") as tf:
        for i in range(3):
            buf = io.BytesIO()
            Image.fromarray(np.full((4, 4, 4), 9 * i, np.uint8), "RGBA").save(buf, "PNG")
            ti = tarfile.TarInfo(f"{i:06d}.png")
            ti.size = len(buf.getvalue())
            tf.addfile(ti, io.BytesIO(buf.getvalue()))
    assert S.index_existing([str(tmp_path / "rgba.tar")], tmp_path / "i.json", progress=False)["channels"] == 3
    root = _ids_dataset(tmp_path / "d", 12, 3)
    assert (root / "index.json").is_file()
    calls = []

    def crash(self, sample):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt

    import webdataset

    monkeypatch.setattr(webdataset.TarWriter, "write", crash)
    with pytest.raises(KeyboardInterrupt):
        _ids_dataset(root, 12, 2)
    monkeypatch.undo()
    assert not (root / "index.json").exists()
    assert main(["shards", "index", str(root / "train-000000.tar"), "--out", str(root)]) == 2

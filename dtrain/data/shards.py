"""Write WebDataset tar shards and their index; read and check an index (``dtrain shards``).

A sample is ``<key>.png`` (uint8 gray or RGB), ``<key>.cls`` (ASCII class index) and optionally
``<key>.npy`` (a precomputed latent). Shards hold balanced counts (they differ by at most one) and are
byte-reproducible: fixed tar metadata, mtime 0, PNG bytes from PIL. ``index.json`` beside them lists every
shard with its sample count and sha256, the image size, channels and class names; the reader
(``dtrain.data.wds``) takes the counts from it to split an epoch exactly across ranks and workers.

Sources: an image folder with one sub-folder per class, a numpy .npy/.npz array, sklearn's digits, 32x32
patches of sklearn's two sample photos, and the CIFAR-10 python pickle batches if you have them locally
(nothing is downloaded).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dtrain.errors import InputError, check_writable
from dtrain.fileio import replacing, write_json

__all__ = [
    "INDEX_NAME",
    "ImageSet",
    "write_shards",
    "read_index",
    "is_remote",
    "local_path",
    "one_index",
    "find_index",
    "image_array",
    "folder_index",
    "unbalanced_braces",
    "scan_shard",
    "split_key",
    "index_existing",
    "verify_index",
    "from_folder",
    "from_arrays",
    "from_npy",
    "from_digits",
    "from_patches",
    "from_cifar10",
    "add_shards_args",
    "run_shards",
    "main",
]

INDEX_NAME = "index.json"
INDEX_FORMAT = 1
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


# ---------------------------------------------------------------------------------------------
# Sources: an indexable set of uint8 images [H, W] or [H, W, C] with labels


@dataclass
class ImageSet:
    """``images[i]`` is a uint8 array [H, W] or [H, W, 1|3]; labels int64 [N] or None; classes names."""

    images: Sequence[np.ndarray]
    labels: np.ndarray | None = None
    classes: list[str] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.images)


class _FolderImages(Sequence):
    """Lazily loaded image files, each converted to ``mode`` and optionally resized."""

    def __init__(self, files: list[Path], mode: str, size: int | None) -> None:
        self.files, self.mode, self.size = files, mode, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):  # type: ignore[override]
        from PIL import Image

        try:
            with Image.open(self.files[i]) as im:
                arr = image_array(im, self.mode)
        except Exception as e:
            raise ValueError(f"{self.files[i]}: cannot read image: {e}") from None
        return _resize(arr, self.size) if self.size else arr


def _resize(arr: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` (bicubic) and centre-crop to size x size."""
    from PIL import Image

    im = Image.fromarray(arr)
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


def from_folder(root: str | Path, *, size: int | None = None, gray: bool = False) -> ImageSet:
    """``root/<class>/<image>``: classes are the sorted sub-folder names (hidden ones, e.g. .ipynb_checkpoints,
    left out), labels their positions. A class folder without images and images beside the class folders are
    refused: either would shift or drop labels without a word."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class sub-folders (expected {root}/<class>/<image files>)")
    if loose := sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS):
        raise ValueError(f"{root}: {len(loose)} image file(s) beside the class sub-folders ({loose[0]}, ...): move "
                         "them into a class folder (they would be left out)")
    files, labels = [], []
    for k, c in enumerate(classes):
        found = sorted(p for p in (root / c).rglob("*") if p.suffix.lower() in IMAGE_EXTS
                       and not any(part.startswith(".") for part in p.relative_to(root / c).parts))
        if not found:
            raise ValueError(f"{root / c}: a class folder with no image files ({', '.join(IMAGE_EXTS)}); remove "
                             "it (it would be a class with no samples)")
        files += found
        labels += [k] * len(found)
    return ImageSet(_FolderImages(files, "L" if gray else "RGB", size), np.asarray(labels, np.int64), classes,
                    f"folder:{root}")


def _as_uint8_images(x: np.ndarray, what: str) -> np.ndarray:
    """[N, H, W], [N, H, W, C] or [N, C, H, W] (C in 1, 3) uint8, or floats in [0, 1] -> uint8 [N, H, W(, C)]."""
    if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] == 3)):
        raise ValueError(f"{what}: expected images [N, H, W], [N, H, W, 1|3] or [N, 1|3, H, W], got {x.shape}")
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating) and x.size and 0.0 <= x.min() and x.max() <= 1.0:
        return np.round(x * 255).astype(np.uint8)
    raise ValueError(f"{what}: images must be uint8 or floats in [0, 1], got {x.dtype}")


def from_arrays(images: np.ndarray, labels: np.ndarray | None = None, classes: Sequence[str] = (),
                source: str = "arrays") -> ImageSet:
    """In-memory images (see ``_as_uint8_images`` for layouts) with optional integer labels."""
    x = _as_uint8_images(np.asarray(images), source)
    y = None
    if labels is not None:
        y = np.asarray(labels)
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
            raise ValueError(f"{source}: labels must be non-negative integers [N={len(x)}], got {y.dtype} {y.shape}")
        y = y.astype(np.int64)
    names = list(classes) or ([str(k) for k in range(int(y.max()) + 1)] if y is not None and len(y) else [])
    return ImageSet(x, y, names, source)


def from_npy(path: str | Path, labels: str | Path | None = None) -> ImageSet:
    """A .npy image array (labels from a second .npy), or a .npz with ``images``/``x`` and ``labels``/``y``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"array file not found: {path}")
    y = None
    if path.suffix == ".npz":
        with _np_load(path) as z:
            xk = next((k for k in ("images", "x") if k in z), None)
            if xk is None:
                raise ValueError(f"{path}: a .npz needs an 'images' (or 'x') array; it has {sorted(z.files)}")
            x = z[xk]
            yk = next((k for k in ("labels", "y") if k in z), None)
            y = z[yk] if yk else None
    else:
        x = _np_load(path)
    if labels is not None:
        if not Path(labels).is_file():
            raise FileNotFoundError(f"labels file not found: {labels}")
        y = _np_load(labels)
    return from_arrays(x, y, source=f"npy:{path}")


def _np_load(path: str | Path, **kw: Any) -> Any:
    """``np.load`` without pickles; a file numpy cannot read fails with its name."""
    try:
        return np.load(path, allow_pickle=False, **kw)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not a numpy .npy / .npz array file ({e})") from e


def from_digits(split: str = "train") -> ImageSet:
    """sklearn's handwritten 8x8 digits (values 0..16 scaled to 0..255), labels 0..9: ``split`` train (1347, the
    images FID-digits' classifier and reference statistics come from), test (450, its held-out floor) or all
    (1797, sklearn's order); the split of ``dtrain.data.digits.digits_arrays``."""
    from dtrain.data.digits import digits_arrays

    x, y = digits_arrays(split)  # value / 8 - 1 in [-1, 1]
    u8 = np.round((x[:, 0].numpy() + 1.0) * 8.0 * (255.0 / 16.0)).astype(np.uint8)
    return from_arrays(u8, y.numpy(), [str(k) for k in range(10)], f"sklearn:digits ({split} split)")


def from_patches(n: int = 4096, size: int = 32, seed: int = 0) -> ImageSet:
    """``n`` random size x size RGB crops of sklearn's two sample photos; the label is the photo."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(photos.images), n)
    out = np.empty((n, size, size, 3), np.uint8)
    for i, k in enumerate(which):
        img = photos.images[k]
        r, c = rng.integers(0, img.shape[0] - size + 1), rng.integers(0, img.shape[1] - size + 1)
        out[i] = img[r:r + size, c:c + size]
    names = [Path(f).stem for f in photos.filenames]
    return from_arrays(out, which, names, f"sklearn:sample_images:patches{size}:seed{seed}")


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR python batch holds (dicts, lists, bytes, numpy arrays)."""

    _ALLOWED = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                          ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")})  # encode: bytes, protocol 2

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def _load_cifar_pickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch not found: {path} (expected the python version, "
                                "cifar-10-batches-py/)")
    with open(path, "rb") as f:
        d = _CifarUnpickler(f, encoding="bytes").load()
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def from_cifar10(root: str | Path, split: str = "train") -> ImageSet:
    """CIFAR-10 from the python pickle batches in ``root`` (data_batch_1..5 / test_batch, batches.meta)."""
    root = Path(root)
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    if split not in names:
        raise ValueError(f"cifar10 split must be 'train' or 'test', not {split!r}")
    xs, ys = [], []
    for n in names[split]:
        d = _load_cifar_pickle(root / n)
        xs.append(np.asarray(d["data"], np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d["labels"], np.int64))
    classes = [str(k) for k in range(10)]
    if (root / "batches.meta").is_file():
        meta = _load_cifar_pickle(root / "batches.meta")
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta["label_names"]]
    return from_arrays(np.concatenate(xs), np.concatenate(ys), classes, f"cifar10:{root}:{split}")


# ---------------------------------------------------------------------------------------------
# Writing


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def balanced_counts(n: int, shard_size: int | None = None, num_shards: int | None = None) -> list[int]:
    """Per-shard counts that differ by at most one: ceil(n / shard_size) shards, or ``num_shards``."""
    if n < 1:
        raise ValueError("no samples to write")
    if num_shards is None:
        if shard_size is None or shard_size < 1:
            raise ValueError("give shard_size >= 1 or num_shards >= 1")
        num_shards = -(-n // shard_size)
    if not 1 <= num_shards <= n:
        raise ValueError(f"num_shards must be in [1, {n}] for {n} samples, not {num_shards}")
    return [n // num_shards + (i < n % num_shards) for i in range(num_shards)]


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled)


def write_shards(data: ImageSet, out_dir: str | Path, *, prefix: str = "train", shard_size: int | None = 1000,
                 num_shards: int | None = None, latents: np.ndarray | None = None, shuffle: bool = True,
                 seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Write ``data`` as ``out_dir/<prefix>-NNNNNN.tar`` plus ``out_dir/index.json``; returns the index.

    Samples are shuffled (seeded) before being cut into shards unless ``shuffle=False``; each keeps its
    source position as its key (``%08d``), so a sample can be traced back. ``latents[i]`` (any shape,
    stored as .npy) belongs to ``data.images[i]``.
    """
    from webdataset import TarWriter

    n = len(data)
    counts = balanced_counts(n, None if num_shards else shard_size, num_shards)
    if latents is not None and len(latents) != n:
        raise ValueError(f"latents: {len(latents)} rows for {n} images")
    if data.labels is not None and len(data.labels) != n:
        raise ValueError(f"labels: {len(data.labels)} for {n} images")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise ValueError(f"prefix must be letters, digits, '_' or '-' (no dots: they split tar keys), not {prefix!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX_NAME).unlink(missing_ok=True)  # a rewrite that crashes must not leave the old index over new shards
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    shards: list[dict[str, Any]] = []
    shape: tuple[int, ...] | None = None
    files = getattr(data.images, "files", None)  # a folder's: errors name the image file
    pos = 0
    with _progress(progress) as bar:
        task = bar.add_task(f"shards -> {out}", total=n)
        for s, count in enumerate(counts):
            name = f"{prefix}-{s:06d}.tar"
            with replacing(out / name) as f, TarWriter(f, encoder=False, mtime=0) as w:  # int mtime: no pax header
                for i in order[pos:pos + count]:
                    img = np.asarray(data.images[i])
                    if img.ndim == 3 and img.shape[-1] == 1:
                        img = img[..., 0]
                    what = str(files[i]) if files is not None else f"{data.source} sample {i}"
                    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[-1] == 3)):
                        raise ValueError(f"{what}: need uint8 [H, W] or [H, W, 3], got {img.dtype} {img.shape}")
                    if shape is None:
                        shape, first = img.shape, what
                    elif img.shape != shape:
                        raise ValueError(f"{what}: shape {img.shape} differs from the first image's {shape} ({first}); "
                                         f"resize them, e.g. --size")
                    sample = {"__key__": f"{int(i):08d}", "png": _png(img)}
                    if data.labels is not None:
                        sample["cls"] = str(int(data.labels[i])).encode()
                    if latents is not None:
                        sample["npy"] = _npy(latents[i])
                    w.write(sample)
                    bar.advance(task)
            shards.append({"name": name, "count": count, "sha256": _sha256(out / name),
                           "bytes": (out / name).stat().st_size})
            pos += count
    assert shape is not None
    keys = ["png"] + (["cls"] if data.labels is not None else []) + (["npy"] if latents is not None else [])
    index = {
        "format": INDEX_FORMAT,
        "total": n,
        "image_size": list(shape[:2]),
        "channels": 1 if len(shape) == 2 else 3,
        "classes": list(data.classes) if data.labels is not None else [],
        "num_classes": len(data.classes) if data.labels is not None else 0,
        "keys": keys,
        "latent_shape": list(np.shape(latents)[1:]) if latents is not None else None,
        "latent_dtype": str(np.asarray(latents[:1]).dtype) if latents is not None else None,
        "source": data.source,
        "shuffled_seed": seed if shuffle else None,
        "shards": shards,
    }
    write_json(out / INDEX_NAME, index, indent=1)
    # an earlier write of more shards under this prefix left the rest: a pattern over the folder would read them
    written = {sh["name"] for sh in shards}
    stale = sorted(f for f in out.glob(f"{prefix}-*.tar") if re.fullmatch(rf"{prefix}-\d{{6}}\.tar", f.name)
                   and f.name not in written)
    for f in stale:
        f.unlink()
    if stale:
        print(f"{out}: removed {len(stale)} shard(s) of an earlier, larger write ({stale[0].name} ...)",
              file=sys.stderr)
    return index


# ---------------------------------------------------------------------------------------------
# Reading an index, counting and verifying shards


def read_index(path: str | Path) -> dict[str, Any]:
    """Load and check an index json; adds ``urls`` (shard paths resolved against the index's folder)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard index not found: {path}")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: not a dtrain shard index (format {INDEX_FORMAT}); write one with `dtrain shards`")
    for k in ("shards", "image_size", "channels"):
        if k not in index:
            raise ValueError(f"{path}: index has no {k!r}")
    if not index["shards"]:
        raise ValueError(f"{path}: index lists no shards")
    for s in index["shards"]:
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not isinstance(s.get("count"), int):
            raise ValueError(f"{path}: every shard entry needs 'name' (str) and 'count' (int), got {s!r}")
    size = index["image_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise ValueError(f"{path}: 'image_size' must be [height, width] (positive ints), got {size!r}")
    if not isinstance(index["channels"], int) or isinstance(index["channels"], bool) or index["channels"] < 1:
        raise ValueError(f"{path}: 'channels' must be a positive int, got {index['channels']!r}")
    index["urls"] = [s["name"] if is_remote(s["name"]) else str(path.parent / s["name"]) for s in index["shards"]]
    return index


def is_remote(url: str) -> bool:
    """A ``pipe:`` command or a URL (``http://``, ``s3://``): not a local file (a path, ``file:`` or ``file://``)."""
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file:"))


def local_path(url: str) -> Path:
    """The file of a local shard: a plain path, ``file:PATH`` or ``file:///abs/PATH``."""
    return Path(url.removeprefix("file://") if url.startswith("file://") else url.removeprefix("file:"))


def one_index(shards: str | Sequence[str]) -> None:
    """Index files are not joined with ``::`` (nor listed): each is the whole of its shard set."""
    parts = shards.split("::") if isinstance(shards, str) else [str(u) for u in shards]
    if len(parts) > 1 and any(p.endswith(".json") for p in parts):
        raise InputError(f"data.shards: {shards!r} joins shard indexes; give one index.json, or the shards of several "
                         "folders as patterns joined with '::' (each folder's index.json beside its shards is read), "
                         "or index them together (`dtrain shards index`)")


def find_index(shards: str | Sequence[str], index: str | None = None) -> str | None:
    """The index json of ``shards`` (brace pattern, ``::``-joined patterns, list of URLs, or an index json): ``index``,
    else ``shards`` when it is a json, else the ``index.json`` beside the first shard when that is local; or None."""
    one_index(shards)
    if index or (isinstance(shards, str) and shards.endswith(".json")):
        return index or str(shards)
    from braceexpand import UnbalancedBracesError, braceexpand

    try:
        first = next(iter(braceexpand(shards.split("::")[0]) if isinstance(shards, str) else shards), "")
    except UnbalancedBracesError:
        raise unbalanced_braces(shards) from None
    return folder_index(local_path(first).parent) if first and not is_remote(first) else None


def folder_index(folder: Path) -> str | None:
    """The ``index.json`` of a folder of local shards, if there is one."""
    return str(folder / INDEX_NAME) if (folder / INDEX_NAME).is_file() else None


def unbalanced_braces(pattern: Any) -> InputError:
    """The error for a shard pattern whose braces do not close (braceexpand's own is a traceback)."""
    return InputError(f"data.shards: {pattern!r} has unbalanced braces; write a range as data/train-{{000000..000099}}"
                      ".tar")


def split_key(name: str) -> tuple[str | None, str]:
    """WebDataset's rule: the key is everything up to the first dot of the basename."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return ((f"{head}/{stem}" if head else stem) if dot else None), ext.lower()


def scan_shard(path: str | Path) -> tuple[int, list[str]]:
    """Number of samples in a local tar shard and the sorted extensions seen (headers only, no data read).

    ``tarfile`` ends its listing silently at a corrupt or cut-short header past the first one; the end-of-archive
    block (512 zero bytes) must follow the last member, else ``tarfile.ReadError``."""
    import tarfile

    n, exts, last = 0, set(), None
    with tarfile.open(path, "r:*") as tf:
        for ti in tf:
            key, ext = split_key(ti.name)
            if not ti.isreg() or key is None:
                continue
            exts.add(ext)
            if key != last:
                n, last = n + 1, key
        tf.fileobj.seek(tf.offset)
        end = tf.fileobj.read(512)
        if len(end) < 512 or any(end):
            why = "cut short" if len(end) < 512 else "a corrupt header"
            raise tarfile.ReadError(f"no end-of-archive block after {n} samples ({why} at byte {tf.offset})")
    return n, sorted(exts)


GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F")  # PIL modes read as one channel; others RGB


def image_array(im: Any, mode: str) -> np.ndarray:
    """A PIL image as uint8 [H, W] (``mode`` "L") or [H, W, 3] ("RGB"). 16-bit grayscale (PNG "I;16", "I") is
    scaled by 255 / 65535; PIL's ``convert`` clips it at 255, which turns almost every pixel white."""
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.clip(np.rint(np.asarray(im).astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
        return a if mode == "L" else np.repeat(a[..., None], 3, axis=2)
    return np.asarray(im if im.mode == mode else im.convert(mode))


def image_meta(data: bytes) -> dict[str, Any]:
    """{"image_size": [H, W], "channels": 1 | 3} of an encoded image, as the shard reader decodes it (grayscale
    modes to one channel, everything else, alpha or palette included, to RGB)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return {"image_size": [im.height, im.width], "channels": 1 if im.mode in GRAY_MODES else 3}


def index_existing(urls: Sequence[str], out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Write an index for shards made elsewhere (local files); image size and classes come from the data."""
    import tarfile

    out = Path(out)
    shards: list[dict[str, Any]] = []
    labels: set[int] = set()
    exts_all: set[str] = set()
    meta: dict[str, Any] | None = None
    with _progress(progress) as bar:
        task = bar.add_task("indexing", total=len(urls))
        for u in urls:
            if not Path(u).is_file():
                raise FileNotFoundError(f"shard not found: {u}")
            try:
                count, exts = scan_shard(u)
                exts_all |= set(exts)
                with tarfile.open(u, "r:*") as tf:
                    for ti in tf:
                        key, ext = split_key(ti.name)
                        if key is None or not ti.isreg():
                            continue
                        f = tf.extractfile(ti)
                        if ext == "cls":
                            raw = f.read()
                            try:
                                labels.add(int(raw))
                            except ValueError:
                                raise ValueError(f"{u}: {ti.name}: a .cls label must be an integer, got "
                                                 f"{raw[:20]!r}") from None
                        elif meta is None and ext in ("png", "jpg", "jpeg", "webp"):
                            meta = image_meta(f.read())
            except (tarfile.TarError, EOFError) as e:
                raise ValueError(f"{u}: not a readable tar shard (truncated or corrupt?): {e}") from None
            rel = os.path.relpath(u, out.parent)
            shards.append({"name": rel, "count": count, "sha256": _sha256(Path(u)), "bytes": Path(u).stat().st_size})
            bar.advance(task)
    if meta is None:
        raise ValueError("no decodable image member (png/jpg/webp) found in the shards")
    k = max(labels) + 1 if labels else 0
    index = {"format": INDEX_FORMAT, "total": sum(s["count"] for s in shards), **meta,
             "classes": [str(i) for i in range(k)],
             "num_classes": k, "keys": sorted(exts_all), "latent_shape": None, "latent_dtype": None,
             "source": "index_existing", "shuffled_seed": None, "shards": shards}
    write_json(out, index, indent=1)
    return index


def verify_index(path: str | Path, progress: bool = True) -> list[str]:
    """Problems found by re-hashing and re-counting every local shard of an index (empty list: all good)."""
    index = read_index(path)
    bad = []
    with _progress(progress) as bar:
        task = bar.add_task("verifying", total=len(index["urls"]))
        for url, s in zip(index["urls"], index["shards"]):
            bar.advance(task)
            if url.startswith("pipe:") or "://" in url:
                continue
            if not Path(url).is_file():
                bad.append(f"{url}: missing")
                continue
            if "sha256" in s and _sha256(Path(url)) != s["sha256"]:
                bad.append(f"{url}: sha256 differs from the index")
            try:
                count = scan_shard(url)[0]
            except Exception as e:
                bad.append(f"{url}: unreadable tar: {e}")
                continue
            if count != s["count"]:
                bad.append(f"{url}: {count} samples, index says {s['count']}")
    return bad


# ---------------------------------------------------------------------------------------------
# Command line: dtrain shards <source> ... --out DIR


def add_shards_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``dtrain shards`` sub-commands (one per source, plus ``index`` and ``verify``) on parser ``p``."""
    sub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")

    def writer(name: str, help: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help)
        s.add_argument("--out", required=True, help="output folder (shards + index.json)")
        s.add_argument("--prefix", default=None, help="shard file prefix (default: train; test for the sources "
                       "with --split test)")
        g = s.add_mutually_exclusive_group()
        g.add_argument("--shard-size", type=int, default=1000, help="max samples per shard (default 1000)")
        g.add_argument("--num-shards", type=int, help="number of shards (counts balanced)")
        s.add_argument("--latents", help=".npy array [N, ...] of precomputed latents, row i for sample i")
        s.add_argument("--no-shuffle", action="store_true", help="keep source order (default: seeded shuffle)")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--quiet", action="store_true", help="no progress bar")
        return s

    s = writer("folder", "an image folder with one sub-folder per class")
    s.add_argument("path")
    s.add_argument("--size", type=int, help="resize the shorter side and centre-crop to SIZE x SIZE")
    s.add_argument("--gray", action="store_true", help="store single-channel images")
    s = writer("npy", "a .npy image array (or .npz with images/labels)")
    s.add_argument("path")
    s.add_argument("--labels", help=".npy integer labels [N]")
    s = writer("digits", "sklearn's 8x8 handwritten digits (10 classes; --split train: 1347 images)")
    s.add_argument("--split", choices=["train", "test", "all"], default="train",
                   help="train (default; FID-digits' reference), test (its held-out 450) or all 1797")
    s = writer("patches", "random crops of sklearn's two sample photos (CIFAR-shaped)")
    s.add_argument("--count", type=int, default=4096)
    s.add_argument("--size", type=int, default=32)
    s = writer("cifar10", "CIFAR-10 python batches you have locally (cifar-10-batches-py)")
    s.add_argument("path")
    s.add_argument("--split", choices=["train", "test"], default="train")
    s = sub.add_parser("index", help="write index.json for existing local shards")
    s.add_argument("pattern", help="brace pattern, e.g. 'data/train-{000000..000009}.tar'")
    s.add_argument("--out", required=True, help="index json path")
    s.add_argument("--quiet", action="store_true")
    s = sub.add_parser("verify", help="re-hash and re-count the shards of an index")
    s.add_argument("index")
    s.add_argument("--quiet", action="store_true")
    return p


_SOURCES: dict[str, Callable[[argparse.Namespace], ImageSet]] = {
    "folder": lambda a: from_folder(a.path, size=a.size, gray=a.gray),
    "npy": lambda a: from_npy(a.path, a.labels),
    "digits": lambda a: from_digits(a.split),
    "patches": lambda a: from_patches(a.count, a.size, a.seed),
    "cifar10": lambda a: from_cifar10(a.path, a.split),
}


def main(argv: Sequence[str] | None = None) -> int:
    """``dtrain shards`` / ``tools/make_shards.py``: returns a process exit code."""
    p = argparse.ArgumentParser(prog="dtrain shards", description="Write WebDataset tar shards + index.json.")
    return run_shards(add_shards_args(p).parse_args(argv))


def run_shards(a: argparse.Namespace) -> int:
    """Run a parsed ``dtrain shards`` command; bad input prints one line naming the file (exit code 2)."""
    try:
        if a.source == "index":
            from braceexpand import braceexpand

            urls = list(braceexpand(a.pattern))
            check_writable(a.out, "--out")  # a file here (the writers' --out is a folder)
            idx = index_existing(urls, a.out, progress=not a.quiet)
            print(f"{a.out}: {len(idx['shards'])} shards, {idx['total']} samples")
            return 0
        if a.source == "verify":
            bad = verify_index(a.index, progress=not a.quiet)
            for b in bad:
                print(b, file=sys.stderr)
            print(f"{a.index}: {'OK' if not bad else f'{len(bad)} problem(s)'}")
            return 1 if bad else 0
        check_writable(a.out, "--out", directory=True)
        size = getattr(a, "size", None)
        if size is not None and not (1 <= size <= (427 if a.source == "patches" else size)):  # photos: 427 x 640
            raise ValueError(f"--size: must be in [1, 427] for patches of sklearn's photos, got {size}"
                             if a.source == "patches" else f"--size: must be >= 1, got {size}")
        for flag, v in (("--count", getattr(a, "count", None)), ("--shard-size", a.shard_size),
                        ("--num-shards", a.num_shards)):
            if v is not None and v < 1:
                raise ValueError(f"{flag}: must be >= 1, got {v}")
        data = _SOURCES[a.source](a)
        latents = None
        if a.latents:
            if not Path(a.latents).is_file():
                raise FileNotFoundError(f"latents file not found: {a.latents}")
            latents = _np_load(a.latents, mmap_mode="r")
        prefix = a.prefix or ("test" if getattr(a, "split", None) == "test" else "train")  # held-out: test-*.tar
        idx = write_shards(data, a.out, prefix=prefix, shard_size=a.shard_size, num_shards=a.num_shards,
                           latents=latents, shuffle=not a.no_shuffle, seed=a.seed, progress=not a.quiet)
    except (ValueError, FileNotFoundError, pickle.UnpicklingError) as e:
        print(f"dtrain shards: error: {e}", file=sys.stderr)
        return 2
    print(f"{a.out}: {len(idx['shards'])} shards, {idx['total']} samples, "
          f"{idx['image_size'][0]}x{idx['image_size'][1]}x{idx['channels']}, {idx['num_classes']} classes")
    return 0

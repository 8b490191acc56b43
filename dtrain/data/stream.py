"""Reading WebDataset shards for one rank: shard sets, the exact rank/worker layout, decoding, bad samples.

Kept free of Lightning so spawned DataLoader workers import little; ``dtrain.data.wds`` wraps it in a
LightningDataModule and documents the guarantees (split, equal counts, resume, bad data).
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from dtrain.data.shards import (
    GRAY_MODES,
    folder_index,
    image_array,
    image_meta,
    is_remote,
    local_path,
    one_index,
    read_index,
    scan_shard,
    split_key,
    unbalanced_braces,
)
from dtrain.errors import InputError, MissingFileError

__all__ = ["WdsStream", "ShardSet", "resolve_shards", "shard_urls", "check_local_shards", "rank_batches",
           "split_batches", "META", "peek_meta"]

log = logging.getLogger("dtrain.data.wds")
META = "_wds"  # batch key with (epoch, batch number in the rank's epoch, bad samples); stripped before the model
_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
_MAX_WARNINGS = 20  # per worker and epoch; the count keeps going


# ---------------------------------------------------------------------------------------------
# Shard sets


@dataclass
class ShardSet:
    """Resolved shard URLs, their sample counts, and what a sample holds (from the index)."""

    urls: list[str]
    counts: list[int]
    image_size: tuple[int, int]
    channels: int
    num_classes: int = 0
    classes: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    latent_shape: list[int] | None = None
    index: str | None = None

    @property
    def total(self) -> int:
        return sum(self.counts)


def _shard_name(url: str) -> str:
    """The tar file name inside a path or a ``pipe:`` command (to look counts up in the index)."""
    found = re.findall(r"[^/\s:'\"]+\.(?:tar\.gz|tgz|tar)\b", url)
    return found[-1] if found else url


def _expand(pattern: str | Sequence[str]) -> list[str]:
    from braceexpand import UnbalancedBracesError
    from webdataset.shardlists import expand_urls

    try:
        if isinstance(pattern, str):
            return expand_urls(pattern)
        return [u for p in pattern for u in expand_urls(str(p))]
    except UnbalancedBracesError:
        raise unbalanced_braces(pattern) from None


def shard_urls(shards: str | Sequence[str]) -> list[str]:
    """The shard URLs of a brace pattern, ``::``-joined list, list, or index json (the shards it lists)."""
    if isinstance(shards, str) and shards.endswith(".json"):
        return list(read_index(shards)["urls"])
    return [u for u in _expand(shards) if u.strip()]


def check_local_shards(urls: Sequence[str], index: str | None = None) -> None:
    """Fail naming the first local shard (``file:`` or plain path) of ``urls`` not on disk (``index``: their index)."""
    gone = [u for u in urls if not is_remote(u) and not local_path(u).is_file()]
    if gone:
        more = f" (and {len(gone) - 1} more of {len(urls)})" if len(gone) > 1 else ""
        where = f" listed in {index}" if index else ""
        if local_path(gone[0]).is_dir():
            raise InputError(f"data.shards: {gone[0]} is a folder, not a shard file{where}; give its shards "
                             f"({gone[0].rstrip('/')}/train-{{000000..000009}}.tar) or its index.json{more}")
        glob = " (globs such as * are not expanded: give a brace range like train-{000000..000099}.tar or an " \
               "index.json)" if any(c in gone[0] for c in "*?[") else ""
        raise MissingFileError(f"data.shards: shard file{where} not found: {gone[0]}{more}{glob}")


def resolve_shards(shards: str | Sequence[str], index: str | None = None) -> ShardSet:
    """Expand ``shards`` (brace pattern, ``::``-joined list, list, or an index json) and get counts.

    Counts come from the index (``index``, else the ``index.json`` beside each local shard; local shards are looked
    up by their full path, so folders that reuse shard names keep their own counts); local shards without an index
    are counted by reading their tar headers; remote (``pipe:``/http) shards need an index, where they are looked
    up by file name. Fails naming the pattern or path when nothing matches, a local shard is missing, counts are
    unknown, or the indexes of one pattern describe other images.
    """
    one_index(shards)
    if isinstance(shards, str) and shards.endswith(".json"):  # the index names the shards
        meta = read_index(shards)
        urls, counts = list(meta["urls"]), [s["count"] for s in meta["shards"]]
        check_local_shards(urls, shards)
        return _shard_set(urls, counts, meta, shards)
    urls = shard_urls(shards)
    if not urls:
        raise InputError(f"data.shards: pattern {shards!r} expands to no shards")
    check_local_shards(urls)
    seen: dict[str, str] = {}
    for u in urls:  # overlapping patterns would read some samples twice an epoch
        if (same := str(local_path(u).resolve()) if not is_remote(u) else u) in seen:
            raise InputError(f"data.shards: {shards!r} names the shard {seen[same]} twice ({u}); every shard must "
                             "appear once (check overlapping ranges of '::'-joined patterns)")
        seen[same] = u
    if index is None:  # each local shard's own index (looked up once per folder); remote ones: the first found
        folder = {u: local_path(u).parent for u in urls if not is_remote(u)}
        beside = {d: folder_index(d) for d in dict.fromkeys(folder.values())}
        where = [None if is_remote(u) else beside[folder[u]] for u in urls]
        found = next((w for w in where if w is not None), None)
        where = [found if is_remote(u) else w for u, w in zip(urls, where)]
        if any(w is None and is_remote(u) for u, w in zip(urls, where)):
            raise InputError("data.index: remote shards (pipe:, http://) need a shard index json with per-shard "
                             "counts (dtrain shards writes one; `dtrain shards index` indexes existing shards)")
    else:
        where = [index] * len(urls)
    metas = {i: read_index(i) for i in dict.fromkeys(w for w in where if w is not None)}
    lookups = {i: _IndexLookup(i, m) for i, m in metas.items()}
    scans = {u: _scan(str(local_path(u))) for u, i in zip(urls, where) if i is None}  # unindexed: read once
    counts = [lookups[i].count(u) if i is not None else scans[u][0] for u, i in zip(urls, where)]
    if not metas:  # no index at all: what a sample holds comes from the shards themselves
        keys = sorted({e for _, exts in scans.values() for e in exts})
        return _shard_set(urls, counts, {**peek_meta(str(local_path(urls[0]))), "keys": keys}, None)
    first, meta = next(iter(metas.items()))
    for other, m in metas.items():  # a ::-joined pattern over folders: their images and classes must agree
        for k in ("image_size", "channels", "num_classes", "latent_shape"):
            if m.get(k) != meta.get(k):
                raise InputError(f"data.shards: the indexes {first} and {other} differ in {k} ({meta.get(k)!r} vs "
                                 f"{m.get(k)!r}); index all the shards together (`dtrain shards index`) or read "
                                 "shards of one kind")
    for i, m in metas.items():  # a held-out split is fine; a cut-off range is not
        read = dict(zip((u for u, w in zip(urls, where) if w == i), (c for c, w in zip(counts, where) if w == i)))
        if len(read) < len(m["shards"]):
            warnings.warn(f"data.shards: {shards!r} reads {len(read)} of the {len(m['shards'])} shards its index "
                          f"{i} lists ({sum(read.values())} of {sum(s['count'] for s in m['shards'])} samples); "
                          f"data.shards={i} reads them all", stacklevel=1)  # one location: shown once per process
    return _shard_set(urls, counts, meta, first if len(metas) == 1 else " + ".join(metas))


class _IndexLookup:
    """Sample counts of an index's shards: a local shard by its full path (folders may reuse shard names), else (a
    remote shard, or a copy of the shards elsewhere, e.g. on a node's local disk) by its file name, which must then
    be unique in the index."""

    def __init__(self, index: str, meta: dict[str, Any]) -> None:
        self.index = index
        self.by_path: dict[str, int] = {}
        self.by_name: dict[str, list[tuple[str, int]]] = {}
        for u, s in zip(meta["urls"], meta["shards"]):
            if not is_remote(u):
                self.by_path[str(local_path(u).resolve())] = int(s["count"])
            self.by_name.setdefault(_shard_name(u), []).append((s["name"], int(s["count"])))

    def count(self, url: str) -> int:
        if not is_remote(url) and (n := self.by_path.get(str(local_path(url).resolve()))) is not None:
            return n
        hits = self.by_name.get(_shard_name(url), [])
        if len(hits) > 1:
            raise InputError(f"data.index: {self.index} lists {len(hits)} shards named {_shard_name(url)} "
                             f"({hits[0][0]}, {hits[1][0]}) and {url} is not one of its paths, so its count is "
                             "ambiguous; give the shards unique names, or each folder its own index")
        if not hits:
            raise InputError(f"data.shards: {url} is not listed in the index {self.index}; narrow the pattern to the "
                             "indexed shards or re-index them with `dtrain shards index`")
        return hits[0][1]


def _shard_set(urls: list[str], counts: list[int], meta: dict[str, Any], index: str | None) -> ShardSet:
    if any(c < 1 for c in counts):
        raise InputError(f"data.shards: shard {urls[counts.index(min(counts))]} holds no samples (an empty or "
                         "unfinished tar); remove it or narrow the pattern")
    h, w = meta["image_size"]
    return ShardSet(urls, counts, (int(h), int(w)), int(meta["channels"]), int(meta.get("num_classes", 0)),
                    list(meta.get("classes", [])), list(meta.get("keys", [])), meta.get("latent_shape"), index)


def _not_tar(url: str, e: Exception) -> InputError:
    why = (str(e).splitlines() or [""])[0].rstrip(":")  # tarfile's messages can run over several lines
    return InputError(f"data.shards: {url} cannot be read as a tar shard ({type(e).__name__}: {why}): not a tar, cut "
                      "short (an unfinished copy or write) or corrupt; give .tar files written by `dtrain shards` or "
                      "a shard index json")


def _scan(url: str) -> tuple[int, list[str]]:
    """``scan_shard``, failing with ``InputError`` naming the file when it is not a tar."""
    import tarfile

    try:
        return scan_shard(url)
    except tarfile.TarError as e:
        raise _not_tar(url, e) from None


def peek_meta(url: str) -> dict[str, Any]:
    """Image size and channels from the first image of a local shard (when there is no index)."""
    import tarfile

    try:
        with tarfile.open(url, "r:*") as tf:
            for ti in tf:
                key, ext = split_key(ti.name)
                if key is not None and ti.isreg() and ext in _IMAGE_EXTS:
                    meta = image_meta(tf.extractfile(ti).read())
                    return {"image_size": tuple(meta["image_size"]), "channels": meta["channels"]}
    except tarfile.TarError as e:
        raise _not_tar(url, e) from None
    raise InputError(f"data.shards: {url} holds no image member ({', '.join(_IMAGE_EXTS)})")


# ---------------------------------------------------------------------------------------------
# Layout: pure functions of the counts, so every rank and worker computes the same split


def rank_batches(per_rank: int, batch_size: int, drop_last: bool) -> list[int]:
    """Batch sizes of one rank's epoch: full batches, plus the partial one unless ``drop_last``."""
    sizes = [batch_size] * (per_rank // batch_size)
    if per_rank % batch_size and not drop_last:
        sizes.append(per_rank % batch_size)
    return sizes


def split_batches(n_batches: int, num_workers: int) -> list[tuple[int, int]]:
    """(first batch, number of batches) of each worker: contiguous runs, sizes differ by at most one."""
    out, first = [], 0
    for w in range(num_workers):
        n = n_batches // num_workers + (w < n_batches % num_workers)
        out.append((first, n))
        first += n
    return out


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


# ---------------------------------------------------------------------------------------------
# Reading: one item per raw position, good (dict of member bytes) or bad (_Bad)


@dataclass
class _Bad:
    url: str
    key: str
    reason: str


def _open_tar(url: str):
    import tarfile

    from webdataset.gopen import gopen

    if is_remote(url):
        stream = gopen(url, "rb")
        return tarfile.open(fileobj=stream, mode="r|*"), stream
    return tarfile.open(local_path(url), mode="r:*"), None


def _read_shard(url: str, start: int, stop: int) -> Iterator[dict[str, Any] | _Bad]:
    """Samples [start, stop) of one shard, exactly stop - start items; what cannot be read is _Bad."""
    i, reason = 0, None  # i: index of the sample being assembled
    tf = stream = None
    try:
        tf, stream = _open_tar(url)
        cur_key, cur = None, {}
        while i < stop:
            ti = tf.next()
            tf.members = []  # keep memory flat on long shards
            if ti is None:
                break
            key, ext = split_key(ti.name)
            if key is None or not ti.isreg():
                continue
            if key != cur_key:
                if cur_key is not None:
                    if i >= start:
                        yield {"__key__": cur_key, "__url__": url, **cur}
                    i += 1
                    if i >= stop:
                        break
                cur_key, cur = key, {}
            if i >= start:  # data of skipped samples is never read (seeked over on local files)
                cur[ext] = tf.extractfile(ti).read()
        if cur_key is not None and i < stop:  # the shard's last sample
            if i >= start:
                yield {"__key__": cur_key, "__url__": url, **cur}
            i += 1
    except Exception as e:  # unreadable member, truncated or missing shard, failed pipe
        reason = f"{type(e).__name__}: {e}"
    finally:
        for obj in (tf, stream):
            try:
                if obj is not None:
                    obj.close()
            except Exception:  # a pipe closed early may report SIGPIPE; the samples we needed are in
                pass
    if max(i, start) < stop:  # one line per shard that failed (the samples are also counted one by one)
        log.warning("shard %s: %s; skipping its samples %d..%d", url,
                    reason or f"ended after {i} samples, the index says more", max(i, start), stop - 1)
    for j in range(max(i, start), stop):
        yield _Bad(url, f"#{j}", reason or f"shard ended after {i} samples, the index says more")


# ---------------------------------------------------------------------------------------------
# The stream one rank reads


@dataclass
class _Decoded:
    x: np.ndarray  # uint8 [C, H, W]
    y: int | None
    latent: np.ndarray | None


class WdsStream(IterableDataset):
    """Batches for one rank; inside each DataLoader worker it reads that worker's run of the epoch.

    Set ``epoch`` and ``start`` (batches of this epoch already consumed) before ``iter()``; the
    datamodule does this. Yields dicts {"x", "y"?, "latent"?, "_wds": (epoch, batch number, bad samples)}.
    """

    def __init__(self, shards: ShardSet, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: int = 1000, shuffle_shards: bool = True, resampled: bool = False,
                 epoch_size: int | None = None, drop_last: bool = True, flip: bool = False, labels: bool = True,
                 latents: bool = False, num_classes: int = 0) -> None:
        super().__init__()
        self.num_classes = num_classes  # the model's (0: unknown), for the label check of shards without an index
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.shards, self.batch_size, self.rank, self.world_size = shards, batch_size, rank, world_size
        self.seed, self.shuffle, self.shuffle_shards, self.resampled = seed, max(1, shuffle), shuffle_shards, resampled
        self.drop_last, self.flip, self.labels, self.latents = drop_last, flip, labels, latents
        total = shards.total if epoch_size is None else epoch_size
        if not resampled and total > shards.total:
            raise InputError(f"data.epoch_size: {total} exceeds the {shards.total} samples of the shards; "
                             "set data.resampled=true to draw more")
        self.per_rank = total // world_size
        self.sizes = rank_batches(self.per_rank, batch_size, drop_last)
        if not self.sizes:
            raise InputError(f"data.batch_size: {batch_size} is more than the {self.per_rank} samples per rank "
                             f"({total} over {world_size} rank(s)); use data.batch_size <= {self.per_rank}")
        # an epoch that leaves samples out starts at a seeded offset (``_segments``)
        self.ring_start = not resampled and sum(self.sizes) * world_size != shards.total
        # (epoch, batches of it already consumed) in shared memory: persistent workers, forked or spawned,
        # read the values set in the main process each time a new epoch's iterator starts
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._position[0])

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._position[0] = value

    @property
    def start(self) -> int:
        return int(self._position[1])

    @start.setter
    def start(self, value: int) -> None:
        self._position[1] = value

    def __len__(self) -> int:
        return len(self.sizes)

    # -- layout ---------------------------------------------------------------------------------

    def worker_run(self, worker: int, num_workers: int) -> tuple[int, list[int]]:
        """(first output position of this worker's run within the rank's epoch, its batch sizes)."""
        first, n = split_batches(len(self.sizes), num_workers)[worker]
        return sum(self.sizes[:first]), self.sizes[first:first + n]

    def _segments(self, epoch: int, worker: int, num_workers: int, raw_pos: int) -> Iterator[tuple[int, int, int]]:
        """(shard, start, stop) pieces of this worker's raw stream from ``raw_pos`` on."""
        counts = self.shards.counts
        if self.resampled:
            rng, pos = _rng(self.seed, 1, self.rank, worker, num_workers), 0
            while True:
                for s in rng.integers(0, len(counts), 1024):
                    if pos + counts[s] > raw_pos:
                        yield int(s), max(0, raw_pos - pos), counts[s]
                    pos += counts[s]
        order = (_rng(self.seed, 0, epoch).permutation(len(counts)) if self.shuffle_shards
                 else np.arange(len(counts)))
        # an epoch that leaves samples out (the N mod W tail, each rank's drop_last remainder, a shorter epoch_size)
        # starts its sequence at a seeded offset into the shards (wrapping round): other samples are left out each
        # epoch, also with one shard or unshuffled shards. An epoch that reads everything starts at shard starts.
        rot = 0 if not self.ring_start else int(_rng(self.seed, 3, epoch).integers(self.shards.total))
        offset, _ = self.worker_run(worker, num_workers)
        g = (self.rank * self.per_rank + offset + raw_pos + rot) % self.shards.total  # position in the shards
        ends = np.cumsum([counts[s] for s in order])
        j = int(np.searchsorted(ends, g, side="right"))
        start = g - (int(ends[j - 1]) if j else 0)
        while True:  # the reader takes what it needs: at most one lap
            s = int(order[j % len(order)])
            yield s, start, counts[s]
            j, start = j + 1, 0

    def _raw(self, epoch: int, worker: int, num_workers: int, raw_pos: int) -> Iterator[dict[str, Any] | _Bad]:
        for s, start, stop in self._segments(epoch, worker, num_workers, raw_pos):
            yield from _read_shard(self.shards.urls[s], start, stop)

    # -- decoding -------------------------------------------------------------------------------

    def _decode(self, item: dict[str, Any] | _Bad, flip: bool) -> _Decoded | _Bad:
        if isinstance(item, _Bad):
            return item
        key, url = item["__key__"], item["__url__"]
        try:
            ext = next((e for e in _IMAGE_EXTS if e in item), None)
            if ext is None:
                return _Bad(url, key, f"no image member (.{', .'.join(_IMAGE_EXTS)})")
            mode = "L" if self.shards.channels == 1 else "RGB"
            with Image.open(io.BytesIO(item[ext])) as im:
                if mode == "L" and im.mode not in GRAY_MODES:  # gray into RGB shards is fine; colour to gray not
                    return _Bad(url, key, f"a colour image (mode {im.mode}) in shards of one channel")
                arr = image_array(im, mode)
            if arr.shape[:2] != self.shards.image_size:
                return _Bad(url, key, f"image is {arr.shape[0]}x{arr.shape[1]}, the index says "
                                      f"{self.shards.image_size[0]}x{self.shards.image_size[1]}")
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            if flip:
                arr = arr[:, :, ::-1]
            y = None
            if self.labels:
                if "cls" not in item:
                    return _Bad(url, key, "no .cls label")
                y = int(item["cls"])
                k = self.shards.num_classes or self.num_classes
                if k and not 0 <= y < k:
                    where = (f"of {self.shards.index} that model.num_classes matches" if self.shards.num_classes else
                             "of model.num_classes (these shards have no index to check them against at start)")
                    raise InputError(f"data.shards: sample {key} of {url} has label {y}, outside the {k} classes "
                                     f"(0..{k - 1}) {where}; fix the .cls labels or re-index the shards "
                                     f"(`dtrain shards index`)")
            lat = np.load(io.BytesIO(item["npy"]), allow_pickle=False) if self.latents else None
            want = self.shards.latent_shape
            if lat is not None and want is not None and list(lat.shape) != list(want):
                return _Bad(url, key, f"latent is {list(lat.shape)}, the index says {list(want)}")
            return _Decoded(np.ascontiguousarray(arr), y, lat)
        except InputError:
            raise
        except Exception as e:
            return _Bad(url, key, f"{type(e).__name__}: {e}")

    def _collate(self, items: list[_Decoded], meta: tuple[int, ...]) -> dict[str, Any]:
        x = torch.from_numpy(np.stack([d.x for d in items])).float().div_(127.5).sub_(1.0)
        out: dict[str, Any] = {"x": x}
        if self.labels:
            out["y"] = torch.tensor([d.y for d in items], dtype=torch.long)
        if self.latents:
            if len(shapes := {d.latent.shape for d in items}) > 1:  # no index to check each sample against
                raise InputError(f"data.shards: latents of shapes {sorted(shapes)} in one batch; write the shards "
                                 "with one latent shape (`dtrain shards` records it in the index)")
            out["latent"] = torch.from_numpy(np.stack([d.latent for d in items])).float()
        out[META] = meta
        return out

    # -- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            yield from self._iter()
        except InputError as e:  # bad data: in a worker, hand the one-line message to the main process (wds.py)
            if get_worker_info() is None:
                raise
            yield {META: (self.epoch, -1, 0, str(e))}

    def _iter(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, start = self.epoch, self.start
        # the DataLoader collects batch i from physical worker i mod n, starting at 0: after `start` batches
        # were consumed, physical worker p plays (logical) worker (p + start) mod n
        worker = (physical + start) % num_workers
        skip = start // num_workers + (worker < start % num_workers)
        _, sizes = self.worker_run(worker, num_workers)
        n_out = sum(sizes)  # outputs of this worker per epoch
        # output position q of this epoch's run sits at stream position origin + q
        origin = epoch * n_out if self.resampled else 0
        end = origin + n_out if not self.resampled else None
        q = origin + sum(sizes[:skip])
        S = self.shuffle
        raw = None
        block: list[_Decoded | _Bad] = []
        block_start = -1
        perm = flips = None
        batch: list[_Decoded | _Bad] = []
        last_good: list[_Decoded] = []
        b, n_warned = skip, 0
        while b < len(sizes):
            k_start = (q // S) * S
            if k_start != block_start:  # read the next block of raw samples and shuffle it
                blen = S if end is None else min(S, end - k_start)
                if raw is None:
                    raw = self._raw(epoch, worker, num_workers, k_start)
                items = [next(raw) for _ in range(blen)]
                rng = _rng(self.seed, 2, epoch if not self.resampled else 0, self.rank, worker, k_start // S)
                perm = rng.permutation(blen)
                flips = rng.random(blen) < 0.5 if self.flip else np.zeros(blen, bool)
                block, block_start = items, k_start
            j = int(perm[q - block_start])
            batch.append(self._decode(block[j], bool(flips[j])))
            q += 1
            if len(batch) == sizes[b]:
                good = [d for d in batch if isinstance(d, _Decoded)]
                bad = [d for d in batch if isinstance(d, _Bad)]
                for d in bad:
                    n_warned += 1
                    if n_warned <= _MAX_WARNINGS:
                        log.warning("skipped sample %s of %s: %s%s", d.key, d.url, d.reason,
                                    " (further skips of this worker this epoch are counted, not logged)"
                                    if n_warned == _MAX_WARNINGS else "")
                if bad:
                    pool = good or last_good or self._lookahead(epoch, worker, num_workers, q)
                    batch = [d if isinstance(d, _Decoded) else pool[i % len(pool)] for i, d in enumerate(batch)]
                last_good = good or last_good
                yield self._collate(batch, (epoch, b * num_workers + worker, len(bad)))  # type: ignore[arg-type]
                batch, b = [], b + 1

    def _lookahead(self, epoch: int, worker: int, num_workers: int, raw_pos: int) -> list[_Decoded]:
        """A good sample further on in this worker's stream, to fill a batch in which nothing decoded."""
        for n, item in enumerate(self._raw(epoch, worker, num_workers, raw_pos)):
            d = self._decode(item, False)
            if isinstance(d, _Decoded):
                return [d]
            if n >= min(self.shards.total, 100_000):  # one lap of the shards at most
                break
        raise RuntimeError(f"data: no decodable sample in this worker's stream from position {raw_pos} on "
                           f"(rank {self.rank}, worker {worker}); check the shards with `dtrain shards verify`")



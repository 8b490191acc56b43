"""Reference statistics for FID: feature mean / covariance over a dataset, computed once, saved as .npz.

    python tools/fid_ref_stats.py --digits train --out refs/digits_train.npz
    python tools/fid_ref_stats.py --folder data/cifar_png --extractor inception \
        --weights pt_inception-2015-12-05.pth --out refs/cifar_train.npz
    python tools/fid_ref_stats.py --shards 'shards/train-{000000..000009}.tar' --out refs/train.npz

The file records the extractor, its weights' sha256, the resolution and the count; ``dtrain eval`` and the
training callback refuse a file whose extractor, weights or resolution differ from theirs. Images are read as
uint8 and mapped to [-1, 1] like the training data; with torchrun, each rank reads every world-th image and
the sums are added (the statistics do not depend on the number of ranks).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's dtrain, not another installed one

import numpy as np
import torch

from dtrain.data.digits import digits_arrays
from dtrain.data.shards import GRAY_MODES, image_array
from dtrain.errors import InputError, check_writable
from dtrain.eval.features import build_extractor
from dtrain.eval.fid import compute_ref_stats, dist_rank
from dtrain.samplers.base import check_device

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def to_tensor(img, channels: int | None) -> torch.Tensor:
    """PIL image -> float [C, H, W] in [-1, 1] (uint8 / 127.5 - 1)."""
    mode = {1: "L", 3: "RGB"}.get(channels or (1 if img.mode in GRAY_MODES else 3))
    a = image_array(img, mode).astype(np.float32)  # as the shard reader decodes (16-bit gray scaled, not clipped)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(a / 127.5 - 1.0)


def same_size(x: torch.Tensor, shape: tuple[int, ...] | None, key: str, name: object) -> tuple[int, ...]:
    if shape is not None and tuple(x.shape) != shape:
        raise InputError(f"{key}: {name} is {list(x.shape)} (C, H, W), the first image {list(shape)}; all images "
                         f"need one size and channel count (--channels forces the channels)")
    return tuple(x.shape)


def folder_images(root: Path, channels: int | None) -> Iterator[torch.Tensor]:
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise InputError(f"--folder: {root} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXT)
    if not files:
        raise InputError(f"--folder: no images ({', '.join(IMAGE_EXT)}) under {root}")
    shape = None
    for p in files:
        try:
            with Image.open(p) as im:
                x = to_tensor(im, channels)
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"--folder: {p} is not a readable image ({e})") from None
        shape = same_size(x, shape, "--folder", p)
        yield x


def shard_images(pattern: str, channels: int | None) -> Iterator[torch.Tensor]:
    import tarfile

    import webdataset as wds
    from PIL import Image, UnidentifiedImageError

    urls: str | list[str] = pattern
    if pattern.endswith(".json"):  # an index (as data.shards takes it): the shards it lists
        from dtrain.data.stream import resolve_shards

        try:
            urls = resolve_shards(pattern).urls
        except (ValueError, OSError) as e:  # not an index, or a listed shard is missing
            raise InputError(f"--shards: {e}") from None
    shape, n = None, 0
    try:
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            key = next((k for k in sample if k.lower().lstrip(".") in {e[1:] for e in IMAGE_EXT}), None)
            if key is None:
                raise InputError(f"--shards: sample {sample.get('__key__')} has no image member ({sorted(sample)})")
            name = f"sample {sample.get('__key__')} of {sample.get('__url__')}"
            try:
                with Image.open(io.BytesIO(sample[key])) as im:
                    x = to_tensor(im, channels)
            except (UnidentifiedImageError, OSError) as e:
                raise InputError(f"--shards: {name}: not a readable image ({e})") from None
            shape, n = same_size(x, shape, "--shards", name), n + 1
            yield x
    except InputError:
        raise
    except (OSError, ValueError, tarfile.TarError) as e:
        raise InputError(f"--shards: cannot read {pattern}: {e}") from None
    if n == 0:
        raise InputError(f"--shards: no samples in {pattern}")


def batched(items: Iterator[torch.Tensor], batch_size: int, limit: int | None, rank: int, world: int
            ) -> Iterator[torch.Tensor]:
    """Every world-th item from ``rank`` (the first ``limit`` items overall), in batches."""
    buf: list[torch.Tensor] = []
    for i, x in enumerate(items):
        if limit is not None and i >= limit:
            break
        if i % world != rank:
            continue
        buf.append(x)
        if len(buf) == batch_size:
            yield torch.stack(buf)
            buf = []
    if buf:
        yield torch.stack(buf)


def reported(batches: Iterator[torch.Tensor], show: bool, every_s: float = 30.0) -> Iterator[torch.Tensor]:
    """``batches``, with a line on stderr every ``every_s`` seconds (and then at the end) saying how many images
    this rank has read: a 50k-image Inception pass takes minutes, and a SLURM log shows no bar."""
    import time

    n, t0, said = 0, time.perf_counter(), False
    last = t0
    for x in batches:
        yield x
        n += len(x)
        if show and (now := time.perf_counter()) - last >= every_s:
            print(f"fid_ref_stats: {n:,} images ({n / (now - t0):.0f}/s)", file=sys.stderr, flush=True)
            last, said = now, True
    if said:  # a long read: how it ended (a short one says nothing before its result or its error)
        print(f"fid_ref_stats: {n:,} images in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--digits", choices=["train", "test", "all"], help="sklearn digits split (8x8, 1 channel)")
    src.add_argument("--folder", type=Path, help="a folder of images (searched recursively)")
    src.add_argument("--shards", help="WebDataset shard pattern (or their index.json) with an image member "
                     "(png/jpg/webp)")
    ap.add_argument("--out", type=Path, required=True, help="output .npz")
    ap.add_argument("--extractor", default="digits", help="eval.feature_extractor (digits, inception, raw)")
    ap.add_argument("--weights", default=None, help="eval.feature_extractor_weights_path")
    ap.add_argument("--channels", type=int, choices=[1, 3], default=None, help="force grayscale or RGB")
    ap.add_argument("--num", "--num-images", dest="num", type=int, default=None,
                    help="use at most this many images (under torchrun write --num-images: torchrun reads --num as "
                    "its --numa-binding)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    try:
        run(args)
    except (InputError, FileNotFoundError) as e:
        print(f"fid_ref_stats: {e}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> None:
    if args.num is not None and args.num < 2:
        raise InputError(f"--num: FID statistics need at least 2 images, got {args.num}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size: need an integer >= 1, got {args.batch_size}")
    device = check_device(args.device, "--device")
    check_writable(args.out, "--out")
    if "RANK" in os.environ and not torch.distributed.is_initialized():  # launched by torchrun
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist_rank()
    if args.digits:
        x, _ = digits_arrays(args.digits)
        items: Iterator[torch.Tensor] = iter(x)
        source = f"sklearn digits, split {args.digits}"
    elif args.folder:
        items, source = folder_images(args.folder, args.channels), f"folder {args.folder}"
    else:
        items, source = shard_images(args.shards, args.channels), f"shards {args.shards}"
    first = next(items)
    items = (y for it in ([first], items) for y in it)
    extractor = build_extractor(args.extractor, args.weights, shape=tuple(first.shape),
                                key="--extractor (eval.feature_extractor)",
                                weights_key="--weights (eval.feature_extractor_weights_path)")
    try:
        stats = compute_ref_stats(extractor, reported(batched(items, args.batch_size, args.num, rank, world),
                                                      rank == 0), source, device=device,
                                  shape=tuple(first.shape))  # a rank without images (more ranks than images)
    except InputError:
        raise
    except ValueError as e:  # fewer than 2 images; images the extractor does not take
        raise InputError(f"{source}: {e}") from None
    if rank == 0:
        stats.save(args.out)
        print(json.dumps({"out": str(args.out), **stats.meta}, indent=2), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

"""Bodies of ``dtrain export`` and ``dtrain sample``; ``dtrain.cli`` adds the arguments and calls them.

    dtrain export runs/x/last.ckpt --out bundles/x [--ema 0.9999] [--dtype bf16] [--nfe 4] [--metrics m.json]
    dtrain sample bundles/x --num 64 --nfe 4 --out grid.png        (or --out samples.npz)
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from dtrain.errors import InputError

__all__ = ["add_export_args", "run_export", "add_sample_args", "run_sample", "save_samples", "check_samples_out"]


def add_export_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("ckpt", help="training checkpoint (.ckpt file, or a sharded DeepSpeed/FSDP directory)")
    p.add_argument("--out", required=True, help="bundle directory to create")
    p.add_argument("--ema", default="auto", help="EMA decay or std to export (e.g. 0.9999, std0.050) or 'raw'")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weight dtype in the bundle")
    p.add_argument("--sampler", default=None, help="default sampler name stored in the bundle")
    p.add_argument("--nfe", type=int, default=None, help="default number of network evaluations")
    p.add_argument("--guidance", type=float, default=None, help="default classifier-free guidance scale")
    p.add_argument("--metrics", default=None, help="JSON file of metrics to record (e.g. FID at an NFE)")
    p.add_argument("--force", action="store_true", help="write into an existing non-empty directory")
    return p


def run_export(args: argparse.Namespace) -> Path:
    from dtrain.export.checkpoint import export_checkpoint
    from dtrain.samplers import SAMPLERS

    if args.sampler is not None:
        SAMPLERS.get(args.sampler, "--sampler")
    if args.nfe is not None and args.nfe < 1:
        raise InputError(f"--nfe: must be >= 1 (network evaluations per sample), got {args.nfe}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise InputError(f"--guidance: must be a finite number (1: no guidance), got {args.guidance}")
    sampler = {k: v for k, v in (("name", args.sampler), ("nfe", args.nfe), ("guidance", args.guidance))
               if v is not None}
    metrics = None
    if args.metrics:
        try:
            metrics = json.loads(Path(args.metrics).read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"--metrics: cannot read {args.metrics}: {e}") from None
        if not isinstance(metrics, dict):
            raise InputError(f"--metrics: {args.metrics} must hold a JSON object")
    out = export_checkpoint(args.ckpt, args.out, ema=args.ema, dtype=args.dtype, sampler=sampler,
                            metrics=metrics, overwrite=args.force)
    info = json.loads((out / "dtrain.json").read_text())
    w, s = info["weights"], info["sampler"]
    print(f"wrote {out}: kind={info['kind']} model={info['model']['name']} ema={w['ema']} dtype={w['dtype']} "
          f"params={w['num_params']} sampler={s['name']}@{s['nfe']} sha256={w['sha256'][:16]}")
    return out


def add_sample_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("bundle", help="bundle directory (dtrain export)")
    p.add_argument("--num", type=int, default=64, help="number of samples")
    p.add_argument("--nfe", type=int, default=None, help="network evaluations (default: the bundle's)")
    p.add_argument("--times", default=None, help="comma-separated interior times of the sampling grid, e.g. 0.5 for "
                   "2-step consistency sampling through t = 0.5 (replaces --nfe)")
    p.add_argument("--sampler", default=None, help="sampler name (default: the bundle's)")
    p.add_argument("--labels", default=None, help="comma-separated class labels or names (default: cycle classes)")
    p.add_argument("--w", type=float, default=None, help="guidance scale (default: the bundle's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--nrow", type=int, default=None, help="grid images per row (default: sqrt of --num)")
    p.add_argument("--out", required=True, help="grid.png (an image grid) or samples.npz (arrays)")
    return p


def check_samples_out(out: str | Path, pipe: Any = None) -> Path:
    """``--out`` of samples: a .png grid (of a bundle with images; checked when ``pipe`` is given) or an .npz of
    arrays, else ``InputError``."""
    out = Path(out)
    if out.suffix not in (".png", ".npz"):
        raise InputError(f"--out: {out}: use a .png (grid) or .npz (arrays) file name")
    if pipe is not None and out.suffix == ".png" and (pipe.info["image"]["range"] is None or len(pipe.shape) != 3):
        raise InputError(f"--out: {out}: a .png grid needs image samples; use .npz for shape {pipe.shape}")
    return out


def save_samples(out: str | Path, x: Any, labels: Any, pipe: Any, nrow: int | None = None) -> Path:
    """.png: an image grid; .npz: ``samples`` (float32, as returned), ``labels``, and for images ``images``
    (uint8, N H W C)."""
    import numpy as np

    out = check_samples_out(out, pipe)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        arrays = {"samples": x.float().cpu().numpy()}
        if labels is not None:
            arrays["labels"] = labels.cpu().numpy()
        if pipe.info["image"]["range"] is not None and x.ndim == 4:
            arrays["images"] = pipe.to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()
        np.savez(out, **arrays)
    else:  # .png
        from PIL import Image

        from dtrain.data.images import tile

        Image.fromarray(tile(pipe.to_uint8(x).cpu(), nrow)).save(out)
    return out


def run_sample(args: argparse.Namespace) -> Path:
    """Every flag is checked (the output path and device first, then against the bundle) before sampling starts."""
    import torch

    from dtrain.errors import check_writable
    from dtrain.export.bundle import load_bundle
    from dtrain.samplers.base import check_device

    for flag, v in (("--num", args.num), ("--batch-size", args.batch_size), ("--nfe", args.nfe), ("--nrow", args.nrow)):
        if v is not None and v < 1:
            raise InputError(f"{flag}: must be >= 1, got {v}")
    if not 0 <= args.seed < 2**63:  # a torch generator's seed
        raise InputError(f"--seed: must be in [0, 2^63), got {args.seed}")
    times = None
    if getattr(args, "times", None) and args.nfe is not None:
        raise InputError("--times: the grid's interior times set the steps (len(times) + 1); give --times or --nfe, "
                         "not both")
    if getattr(args, "times", None):
        try:
            times = [float(v) for v in args.times.split(",") if v.strip()]
        except ValueError:
            raise InputError(f"--times: need comma-separated numbers, got {args.times!r}") from None
    check_writable(check_samples_out(args.out), "--out")
    device = check_device(args.device, "--device")
    pipe = load_bundle(args.bundle, device=device)
    sampler = pipe.check_sampler(args.sampler, "--sampler")
    check_samples_out(args.out, pipe)
    labels = None
    if args.labels is not None:
        vals = [v.strip() for v in args.labels.split(",") if v.strip()]
        parsed = [v if v in pipe.class_names else int(v) if v.lstrip("-").isdigit() else v for v in vals]
        labels = (parsed * args.num)[: args.num]
    cond = pipe.labels(labels, args.num, "--labels")
    pipe.check_guidance(args.w, "--w")
    if times is not None:
        pipe.times_grid(times, "--times")
    elif args.nfe is not None:
        pipe.check_nfe(args.nfe, sampler, "--nfe")
    g = torch.Generator(device).manual_seed(args.seed)
    z = torch.randn((args.num, *pipe.shape), generator=g, device=device)  # one draw: x_T is not batch-dependent
    xs = []
    for i in range(0, args.num, args.batch_size):
        b = min(args.batch_size, args.num - i)
        xs.append(pipe.sample(b, nfe=args.nfe, labels=None if cond is None else cond[i: i + b], w=args.w,
                              generator=g, sampler=args.sampler, times=times, noise=z[i: i + b]).cpu())
    out = save_samples(args.out, torch.cat(xs), cond, pipe, args.nrow)
    s = pipe.info["sampler"]
    steps = f"times={times}"
    if not times:  # a budget a 2-call-per-step sampler cannot spend exactly (heun at 4: 2 steps, 3 calls)
        from dtrain.samplers import SAMPLERS, steps_for_nfe

        asked = s["nfe"] if args.nfe is None else args.nfe
        spent = SAMPLERS.get(sampler).nfe(steps_for_nfe(sampler, asked))
        steps = f"nfe={spent}" + (f" (of {asked} asked)" if spent != asked else "")
    w = s.get("guidance", 1.0) if args.w is None else args.w
    print(f"wrote {out}: {args.num} samples, sampler={sampler} {steps} w={w:g} seed={args.seed}")
    return out

"""Body of ``dtrain eval``: a FID-vs-NFE sweep of a checkpoint or bundle; ``dtrain.cli`` adds the arguments,
loads the model (``dtrain.export``) and calls ``run_eval``.

    dtrain eval runs/x/checkpoints/last.ckpt --samplers ddim:1,2,4,8,16,32,64 dpm++2m:4,8 --num 10000
    torchrun --nproc-per-node 8 -m dtrain.cli eval bundles/x --samplers consistency:1,2 --num-samples 50000

Defaults come from the recipe's ``eval`` section stored with the model, then from these flags. Rank 0 prints
the table and writes ``<out>/fid_vs_nfe.{json,png}`` and ``<out>/samples/<sampler>_nfe<n>.png``; with W&B
(``--wandb offline|online``) it logs the table, the FID-vs-NFE line plot and a sample grid per point.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtrain import fileio
from dtrain.errors import InputError, check_writable

if TYPE_CHECKING:
    import torch

__all__ = ["add_eval_args", "run_eval", "Loader"]

Loader = Callable[..., "tuple[Any, dict[str, Any]]"]  # (path, ema=, device=) -> (denoiser, bundle info)
GuideFor = Callable[[str], "Callable[[Any, float, int], Any] | None"]  # bundle kind -> guide(model, w, null) or None


def add_eval_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("model", metavar="CKPT_OR_BUNDLE", help="training checkpoint or bundle directory")
    p.add_argument("--samplers", nargs="+", default=None, metavar="NAME:NFE,...",
                   help="e.g. ddim:1,2,4,8 dpm++2m:4,8 (any registered sampler; default: recipe eval.samplers)")
    p.add_argument("--num", "--num-samples", dest="num", type=int, default=None,
                   help="samples per point (default: recipe eval.num); under torchrun write --num-samples (torchrun "
                   "reads --num as its own --numa-binding)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per batch (default: recipe eval.batch_size)")
    p.add_argument("--ref-stats", default=None, help="reference .npz (tools/fid_ref_stats.py) or digits:train")
    p.add_argument("--extractor", default=None, help="feature extractor: digits, inception, raw")
    p.add_argument("--weights", default=None, help="feature extractor weights file (inception)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale w (default: the recipe's eval.guidance, "
                   "else sampler.guidance: 2 for the digits teacher; 1 = no guidance)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ema", default="auto", help="EMA decay/std or 'raw' (checkpoints)")
    p.add_argument("--spacing", default=None, help="grid spacing (default: the schedule's)")
    p.add_argument("--device", default=None, help="default: cuda (this rank's GPU) if available, else cpu")
    p.add_argument("--recompute", action="store_true", help="score every point again (by default a rerun with "
                   "the same model, samples and reference skips the points already in <out>/points/)")
    p.add_argument("--out", default=None,
                   help="output directory (default: runs/eval/<run>-<checkpoint> or runs/eval/<bundle>, "
                   "then -ema<tag> and -w<guidance> when those flags are given)")
    p.add_argument("--wandb", default=None, choices=["online", "offline", "disabled"],
                   help="W&B mode (default: the recipe's logger.mode, else disabled)")
    p.add_argument("--project", default=None, help="W&B project (default: the recipe's logger.project)")
    return p


def _ref_extractor(spec: str) -> str | None:
    """The extractor a reference-statistics file was made with (None for a built-in or an unreadable file: the
    checks after name those)."""
    from dtrain.eval.fid import RefStats, RefStatsError

    try:  # the metadata only: load_ref reads the arrays once, later
        name = RefStats.read_meta(spec).get("extractor") if Path(spec).is_file() else None
    except RefStatsError:
        return None
    return name if isinstance(name, str) else None


def _default(flag: Any, recipe_eval: dict[str, Any], key: str, fallback: Any) -> Any:
    if flag is not None:
        return flag
    v = recipe_eval.get(key)
    return fallback if v is None or v == [] else v


def _init_dist(device: str | None) -> torch.device:
    """Join torchrun's process group when launched by it; the device of this rank (``--device`` checked first)."""
    import torch

    from dtrain.samplers.base import check_device

    if device is not None:
        check_device(device, "--device")
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    dev = torch.device(f"cuda:{local}" if cuda and device in (None, "cuda") else (device or "cpu"))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if "RANK" in os.environ and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dev


def _done_points(folder: Path, key: Mapping[str, Any]) -> dict[tuple[str, int], Any]:
    """{(sampler, steps): row} of the points in ``folder`` scored with ``key`` (rank 0's view, sent to every rank)."""
    import torch

    from dtrain.eval.sweep import SweepRow

    done: dict[tuple[str, int], Any] = {}
    for f in sorted(folder.glob("*.json")):
        try:
            d = json.loads(f.read_text())
            if d.get("key") == key:
                row = SweepRow(**d["row"])
                done[(row.sampler, row.steps)] = row
        except (OSError, ValueError, TypeError, KeyError):
            continue  # a point written by another version, or cut short: scored again
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [done]
        torch.distributed.broadcast_object_list(box, 0)
        done = box[0]
    return done


def _other_model(folder: Path, model: str) -> str | None:
    """A model other than ``model`` (a resolved path) whose points ``folder`` holds."""
    for f in sorted(folder.glob("*.json")):
        try:
            theirs = json.loads(f.read_text())["key"]["model"]
        except (OSError, ValueError, TypeError, KeyError):
            continue
        if theirs != model:
            return str(theirs)
    return None


def _stats_sha256(ref: Any) -> str:
    """sha256 of reference statistics (mu, sigma as float64 bytes, and the count)."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for a in (ref.mu, ref.sigma):
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    h.update(str(ref.count).encode())
    return h.hexdigest()


def run_eval(args: argparse.Namespace, load: Loader, guide_for: GuideFor | None = None) -> list[Any]:
    """The sweep; returns the rows (every rank). ``guide_for(kind)``: how the model's bundle kind applies guidance
    (``dtrain.export.bundle.kind_guide``; None: classifier-free guidance)."""
    import torch

    from dtrain.diffusion.guidance import NO_NULL, reads_unlearned_null
    from dtrain.diffusion.timesteps import SPACINGS
    from dtrain.eval.features import BUILTIN_REFS, EXTRACTORS, WEIGHTS_KEY, build_extractor
    from dtrain.eval.fid import dist_rank, load_ref
    from dtrain.eval.grids import save_grid
    from dtrain.eval.report import check_wandb_login, log_wandb, logger_mode, plot_fid_vs_nfe, write_json
    from dtrain.eval.sweep import fid_sweep, parse_specs
    from dtrain.samplers import check_guidance_scale, check_sampler

    if args.num is not None and args.num < 2:
        raise InputError(f"--num: must be >= 2 (FID needs at least 2 samples), got {args.num}")
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.spacing is not None and args.spacing not in SPACINGS:
        raise InputError(f"--spacing: unknown spacing {args.spacing!r}; choose one of {list(SPACINGS)}")
    model = Path(str(args.model).rstrip("/"))  # runs/<run>/checkpoints/last.ckpt -> <run>-last, a bundle by name
    name = f"{model.parent.parent.name}-{model.stem}" if model.parent.name == "checkpoints" else model.stem
    if args.ema != "auto":  # evaluations of other weights or guidance of one model do not share a folder
        name += f"-ema{args.ema}"
    if args.guidance is not None:
        name += f"-w{args.guidance:g}"
    out = check_writable(Path(args.out or Path("runs") / "eval" / name), "--out", directory=True)
    device = _init_dist(args.device)
    rank, world = dist_rank()
    denoiser, info = load(args.model, ema=args.ema, device=device)
    recipe = (info.get("provenance") or {}).get("recipe") or {}
    ev = dict(recipe.get("eval") or {})
    specs = parse_specs(_default(args.samplers, ev, "samplers", None) or ["ddim:1,2,4,8,16,32"],
                        "--samplers" if args.samplers else "eval.samplers")
    for sampler, _ in specs:
        check_sampler(sampler, denoiser, "--samplers" if args.samplers else "eval.samplers",
                      what=f"this model (kind {info.get('kind')!r})")
    shape = tuple(int(s) for s in info["image"]["shape"])
    num_classes = len(info.get("class_names") or [])
    extractor_name = _default(args.extractor, ev, "feature_extractor", "digits")
    extractor_key = "--extractor" if args.extractor else "eval.feature_extractor"
    if args.extractor is None and args.ref_stats and (made := _ref_extractor(args.ref_stats)):  # the file says
        extractor_name, extractor_key = made, f"--ref-stats ({args.ref_stats})"  # which features it holds
    if extractor_name == "digits" and shape != (1, 8, 8):
        raise InputError(f"{extractor_key}: the 'digits' extractor (FID-digits) takes 1x8x8 images and this model "
                         f"makes {'x'.join(map(str, shape))}: give --extractor raw (pixels as features, no weights) "
                         f"or inception (its weights file), with --ref-stats from tools/fid_ref_stats.py")
    EXTRACTORS.get(extractor_name, extractor_key)  # the name now; its weights load after the cheaper checks
    ref_spec = _default(args.ref_stats, ev, "ref_stats", "digits:train" if extractor_name == "digits" else None)
    if ref_spec is None:
        raise InputError(f"--ref-stats: required for the {extractor_name!r} extractor: a .npz made with "
                         f"tools/fid_ref_stats.py (the built-in {', '.join(BUILTIN_REFS)} are for 'digits')")
    if args.guidance is not None:
        check_guidance_scale(args.guidance, "--guidance")
    if args.guidance is not None and args.guidance != 1.0 and num_classes == 0:
        raise InputError(f"--guidance: guidance needs a class-conditional model; this model (kind "
                         f"{info.get('kind')!r}) has no classes")
    guidance = _default(args.guidance, ev, "guidance", info["sampler"].get("guidance", 1.0))
    guide = guide_for(str(info.get("kind"))) if guide_for is not None else None
    if guide_for is not None and guide is None and float(guidance) != 1.0 and num_classes > 0:
        key = "--guidance" if args.guidance is not None else "eval.guidance / sampler.guidance"
        raise InputError(f"{key}: {guidance}, but bundle kind {info.get('kind')!r} does not support guidance "
                         f"(use 1)")
    if float(guidance) != 1.0 and reads_unlearned_null(info, guide):
        key = "--guidance" if args.guidance is not None else "eval.guidance / sampler.guidance"
        raise InputError(f"{key}: {guidance}: {NO_NULL}; use 1")
    seed = int(_default(args.seed, ev, "seed", 0))
    if not 0 <= seed < 2**32:  # the recipe's eval.seed range
        raise InputError(f"{'--seed' if args.seed is not None else 'eval.seed'}: must be in [0, 2^32), got {seed}")
    num, batch = int(_default(args.num, ev, "num", 1000)), int(_default(args.batch_size, ev, "batch_size", 250))
    if num < 2 or batch < 1:  # from the recipe
        raise InputError(f"eval.num / eval.batch_size: need num >= 2 and batch_size >= 1, got {num}, {batch}")
    extractor = build_extractor(extractor_name, _default(args.weights, ev, "feature_extractor_weights_path", None),
                                shape=shape, key=extractor_key,
                                weights_key="--weights" if args.weights else WEIGHTS_KEY).to(device)
    ref = load_ref(ref_spec, extractor, key="--ref-stats" if args.ref_stats else "eval.ref_stats")
    mode = args.wandb or logger_mode((recipe.get("logger") or {}).get("mode") or "disabled")
    check_wandb_login(mode, "--wandb" if args.wandb else "the recipe's logger.mode / WANDB_MODE")  # every rank: the
    # others would wait in the sweep's first collective for a rank 0 that stopped
    stored = info["sampler"]  # a bundle's own grid (a PD student's, consistency sample times) at its sampler and NFE
    grids = ({(stored["name"], int(stored["nfe"])): torch.tensor(stored["grid"], dtype=torch.float64)}
             if stored.get("grid") is not None and args.spacing is None else {})
    if stored.get("grid") is not None and info.get("kind") in ("denoiser", "guided_denoiser"):
        other = [f"{n}:{k}" for n, nfes in specs for k in nfes if (n, int(k)) not in grids]
        if other:  # a progressive-distillation student off the grid it was distilled for
            warnings.warn(f"{args.model}: this network was distilled for its own {len(stored['grid']) - 1}-step grid "
                          f"({stored['name']}:{stored['nfe']}); {', '.join(other)} run on other grids, where it was "
                          "not trained", stacklevel=2)
    # every point is kept in <out>/points/ as it is scored: a rerun (a requeued array task) skips the points whose
    # model, samples and reference it already scored. x_T and labels do not depend on batch or world size, but a
    # stochastic sampler's noise is drawn per global batch, so the batch size is part of the key; the reference
    # counts by its statistics' content (a file regenerated at the same path is another reference)
    key = {"model": str(Path(args.model).resolve()), "sha256": (info.get("ref") or {}).get("sha256"),
           "ema": (info.get("ref") or {}).get("ema"), "num": num, "seed": seed, "guidance": float(guidance),
           "batch_size": batch, "spacing": args.spacing,
           "grids": {f"{k[0]}:{k[1]}": v.tolist() for k, v in grids.items()},
           "extractor": extractor.name, "extractor_sha256": extractor.weights_sha256, "ref_stats": str(ref_spec),
           "ref_count": ref.count, "ref_sha256": _stats_sha256(ref)}
    if not args.out and (other := _other_model(out / "points", key["model"])):  # two bundles named alike
        raise InputError(f"--out: the default folder {out} holds the evaluation of another model ({other}); give "
                         f"this one its own --out")
    done = {} if args.recompute else _done_points(out / "points", key)
    upscale = max(1, 32 // shape[-1])

    def keep(row: Any) -> None:
        if rank == 0:
            point = {"key": dict(key), "row": row.to_dict()}
            fileio.write_json(out / "points" / f"{row.sampler}_steps{row.steps}.json", point)
            if row.grid is not None and row.grid.ndim == 4:
                save_grid(row.grid, out / "samples" / f"{row.sampler}_nfe{row.nfe}.png", upscale=upscale)

    rows = fid_sweep(denoiser, specs, num=num, batch_size=batch, shape=shape, extractor=extractor, ref=ref,
                     num_classes=num_classes, guidance=float(guidance), seed=seed, device=device,
                     spacing=args.spacing, ref_source=str(ref_spec), guide=guide, grids=grids, done=done,
                     on_row=keep)
    if rank == 0:
        run_info = {"model": str(args.model), "kind": info.get("kind"), "ema": (info.get("ref") or {}).get("ema"),
                    "num": num, "batch_size": batch, "seed": seed, "guidance": float(guidance), "world_size": world,
                    "extractor": extractor.name, "extractor_sha256": extractor.weights_sha256,
                    "ref_stats": str(ref_spec), "ref_count": ref.count, "device": str(device)}
        write_json(rows, out / "fid_vs_nfe.json", **run_info)
        plot_fid_vs_nfe(rows, out / "fid_vs_nfe.png", title=f"FID vs NFE: {name} ({num} samples)")
        if mode != "disabled":
            import wandb

            run = wandb.init(project=args.project or (recipe.get("logger") or {}).get("project", "dtrain"),
                             name=f"eval-{name}", mode=mode, dir=str(out), job_type="eval", config=run_info,
                             group=recipe.get("name"))  # with the training run's jobs (dtrain fit: group = name)
            log_wandb(rows, run)
            run.finish()
        print(f"wrote {out / 'fid_vs_nfe.json'}")
    return rows

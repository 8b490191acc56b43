"""Training checkpoints (format 1) -> inference bundles and teachers for students.

A format-1 checkpoint (``dtrain.lit``) is a dict with ``state_dict`` (``net.<param>`` for the raw network,
``ema.<tag>.<param>`` per EMA copy, tag = the decay or std with "." -> "_") and ``dtrain`` = {"format": 1,
"recipe": <resolved recipe>, "ema_tags": [...], "kind": "teacher" | "pd" | ..., + method info}. Optional
``dtrain`` keys read here: ``bundle_kind``, ``default_ema``, ``sampler`` (overrides of the recipe's),
``image`` ({"shape", "range"}), ``class_names``, ``git_commit``, ``recipe_hash``, ``metrics``, ``teacher``
(the ``info["ref"]`` that ``load_teacher`` returned). Read with ``torch.load(weights_only=True)`` only.

Sharded DeepSpeed / FSDP checkpoint directories are consolidated by ``dtrain.export.zero.consolidate(path)``
(which must return the same dict layout) before anything else here runs.
"""

from __future__ import annotations

import functools
import math
import pickle
import subprocess
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dtrain.errors import InputError, first_line
from dtrain.export.bundle import (
    INFO_FILE,
    BundleError,
    assemble,
    check_out,
    grid_nfe,
    load_bundle,
    read_info,
    save_bundle,
    sha256_file,
    sha256_tensors,
)

__all__ = [
    "CKPT_FORMAT",
    "BUNDLE_KINDS",
    "CheckpointError",
    "read_checkpoint",
    "read_model_section",
    "model_differences",
    "ema_tag",
    "select_weights",
    "bundle_info",
    "export_checkpoint",
    "load_teacher",
    "is_bundle",
]

CKPT_FORMAT = 1
# Training kind (ckpt["dtrain"]["kind"]) -> bundle kind, unless the checkpoint names ``bundle_kind`` itself.
BUNDLE_KINDS = {"teacher": "denoiser", "pd": "denoiser", "cd": "consistency", "ct": "consistency",
                "ict": "consistency", "meanflow": "meanflow", "ctm": "ctm"}
_KNOWN_META = {"format", "recipe", "ema_tags", "kind", "bundle_kind", "default_ema", "sampler", "image",
               "class_names", "git_commit", "recipe_hash", "metrics", "teacher"}


class CheckpointError(InputError):
    """A checkpoint problem: ``file: field: reason``."""

    def __init__(self, file: str | Path, field: str, reason: str) -> None:
        self.file, self.field, self.reason = str(file), field, reason
        super().__init__(f"{file}: {field}: {reason}" if field else f"{file}: {reason}")


def is_bundle(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / INFO_FILE).is_file()


def _consolidate(path: Path) -> dict[str, Any]:
    """A sharded checkpoint directory as one checkpoint dict (``dtrain.export.zero.consolidate``)."""
    from dtrain.export.zero import consolidate

    return consolidate(path)


def _sharded_meta(path: Path) -> dict[str, Any]:
    """A sharded checkpoint directory's metadata, with an empty ``state_dict`` (``_check_ckpt`` needs one)."""
    from dtrain.export.zero import sharded_meta

    return {**sharded_meta(path), "state_dict": {}}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and validate a format-1 training checkpoint (a file, or a sharded directory via the hook)."""
    path = Path(path)
    if is_bundle(path):
        raise CheckpointError(path, "", "is an inference bundle, not a training checkpoint")
    if path.is_dir():
        ckpt = _consolidate(path)
    elif not path.is_file():
        raise CheckpointError(path, "", "checkpoint not found")
    else:
        ckpt = _load_file(path)
    return _check_ckpt(ckpt, path)


def _load_file(path: Path, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` of a checkpoint file, or ``CheckpointError`` saying why it cannot be read.
    ``mmap``: the pickled structure is read, tensor data only mapped (metadata without the weights)."""
    with open(path, "rb") as f:
        head = f.read(2)
    if head != b"PK" and head[:1] != b"\x80":  # torch.save writes a zip archive (legacy: a pickle)
        raise CheckpointError(path, "", "not a torch checkpoint (torch.save writes a zip archive; this file "
                              f"starts with {head!r}): pass the .ckpt file of a dtrain training run")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and head == b"PK")
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1][:300]
        raise CheckpointError(path, "", f"cannot be read with torch.load(weights_only=True) (it holds objects "
                              f"other than tensors and plain containers): {first}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(path, "", f"not a readable torch checkpoint: {str(e)[:300]}") from None


def read_model_section(path: str | Path) -> dict[str, Any]:
    """The ``model`` section a checkpoint or bundle was trained with, from its metadata only (a bundle's
    dtrain.json; a checkpoint's ``dtrain.recipe.model``, its tensors mapped, never read; a sharded checkpoint
    directory's metadata (``dtrain.export.zero.sharded_meta``)."""
    path = Path(path)
    if is_bundle(path):
        return dict(read_info(path)["model"])
    if path.is_dir():
        return model_section(_sharded_meta(path), path)
    if not path.is_file():
        raise CheckpointError(path, "", "checkpoint not found")
    return model_section(_load_file(path, mmap=True), path)


def read_schedule(path: str | Path) -> dict[str, Any]:
    """The schedule (``Schedule.to_dict()``) a checkpoint or bundle was trained on, from its metadata only."""
    from dtrain.diffusion.schedule import make_schedule, schedule_from_config

    path = Path(path)
    if is_bundle(path):
        info = read_info(path)
        try:
            return make_schedule(**info["schedule"]).to_dict()
        except (ValueError, TypeError, KeyError) as e:
            raise BundleError(path / INFO_FILE, "schedule", f"cannot rebuild the schedule: {first_line(e)}") from None
    ckpt = _sharded_meta(path) if path.is_dir() else _load_file(path, mmap=True)
    recipe = _check_ckpt(ckpt, path)["dtrain"]["recipe"]
    try:
        return schedule_from_config(recipe["schedule"]).to_dict()
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(path, "dtrain.recipe.schedule", f"cannot rebuild the schedule: {first_line(e)}"
                              ) from None


def read_recipe(path: str | Path) -> dict[str, Any] | None:
    """The recipe a checkpoint or bundle was trained with (a bundle's provenance; None if it has none), from its
    metadata only."""
    path = Path(path)
    if is_bundle(path):
        recipe = (read_info(path).get("provenance") or {}).get("recipe")
        return recipe if isinstance(recipe, dict) else None
    ckpt = _sharded_meta(path) if path.is_dir() else _load_file(path, mmap=True)
    return dict(_check_ckpt(ckpt, path)["dtrain"]["recipe"])


def read_kind(path: str | Path) -> str | None:
    """The bundle kind a checkpoint or bundle holds ("denoiser", "consistency", ...), from its metadata only."""
    path = Path(path)
    if is_bundle(path):
        return str(read_info(path)["kind"])
    ckpt = _sharded_meta(path) if path.is_dir() else _load_file(path, mmap=True)
    meta = _check_ckpt(ckpt, path)["dtrain"]
    return meta.get("bundle_kind") or BUNDLE_KINDS.get(meta["kind"])


def model_section(ckpt: Any, path: str | Path) -> dict[str, Any]:
    """The ``model`` section of a checkpoint already loaded from ``path`` (its metadata validated)."""
    return dict(_check_ckpt(ckpt, Path(path))["dtrain"]["recipe"]["model"])


def model_differences(theirs: Mapping[str, Any], ours: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """The keys of two ``model`` sections whose values differ (keys only one of them has, and ``ignore``, aside)."""
    skip = set(ignore)
    return [k for k in theirs if k in ours and k not in skip and theirs[k] != ours[k]]


def _check_ckpt(ckpt: Any, path: Path) -> dict[str, Any]:
    if not isinstance(ckpt, dict):
        raise CheckpointError(path, "", f"expected a dict, got {type(ckpt).__name__}")
    if not isinstance(ckpt.get("state_dict"), Mapping):
        raise CheckpointError(path, "state_dict", "missing (not a Lightning checkpoint?)")
    meta = ckpt.get("dtrain")
    if not isinstance(meta, Mapping):
        raise CheckpointError(path, "dtrain", "missing: not a dtrain training checkpoint")
    if meta.get("format") != CKPT_FORMAT:
        raise CheckpointError(path, "dtrain.format", f"unsupported checkpoint format {meta.get('format')!r}; "
                              f"this dtrain reads {CKPT_FORMAT}")
    for key, typ in (("recipe", Mapping), ("ema_tags", list), ("kind", str)):
        if not isinstance(meta.get(key), typ):
            raise CheckpointError(path, f"dtrain.{key}", f"missing or not a {typ.__name__}")
    for sec in ("model", "schedule"):
        if not isinstance(meta["recipe"].get(sec), Mapping):
            raise CheckpointError(path, f"dtrain.recipe.{sec}", "missing")
    return ckpt


def ema_tag(value: str | float | None) -> str | None:
    """A user's EMA choice as a checkpoint tag (``dtrain.models.ema``): 0.9999 -> "0_9999", "std0.05" ->
    "std0_050"; "raw" -> None (the trained weights)."""
    from dtrain.models.ema import decay_tag, std_tag

    if value is None:
        return None
    s = str(value).strip()
    if s.lower() in ("raw", "net", "none"):
        return None
    try:
        return std_tag(float(s[3:].replace("_", "."))) if s.startswith("std") else decay_tag(float(s.replace("_", ".")))
    except ValueError:
        return s


def chosen_tag(meta: Mapping[str, Any], ema: str | float | None = "auto", path: str | Path = "checkpoint",
               field: str = "--ema") -> str | None:
    """The EMA tag (None: the raw weights) ``ema`` picks from a checkpoint's ``dtrain`` metadata: "auto" takes
    ``default_ema``, else the only EMA, else the raw weights when there is none; with several EMAs and no default it
    asks (``CheckpointError`` naming ``field``)."""
    if ema != "auto":
        return ema_tag(ema)
    if meta.get("default_ema") is not None:
        return ema_tag(meta["default_ema"])
    tags = [str(t) for t in meta.get("ema_tags") or []]
    if len(tags) > 1:
        raise CheckpointError(path, field, f"the checkpoint holds several EMAs; choose one of {tags} or 'raw'")
    return tags[0] if tags else None


def select_weights(ckpt: Mapping[str, Any], ema: str | float | None = "auto",
                   path: str | Path = "checkpoint", field: str = "--ema") -> tuple[dict[str, Tensor], str | None]:
    """The network weights of one EMA copy (``ema``: a decay/std or tag, "raw", or "auto": ``chosen_tag``) and
    its tag. An EMA copy must hold exactly the network's tensors."""
    sd, meta = ckpt["state_dict"], ckpt["dtrain"]
    tags = [str(t) for t in meta["ema_tags"]]
    tag = chosen_tag(meta, ema, path, field)
    net = {k[4:]: v for k, v in sd.items() if k.startswith("net.")}
    if not net:
        raise CheckpointError(path, "state_dict", "holds no 'net.*' weights")
    if tag is None:
        return net, None
    if tag not in tags:
        raise CheckpointError(path, field, f"no EMA {tag!r}; the checkpoint holds {tags} (or 'raw')")
    pre = f"ema.{tag}."
    avg = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
    for a, b, what in ((net, avg, "missing from"), (avg, net, "without a matching net.* tensor in")):
        if diff := sorted(set(a) - set(b)):
            raise CheckpointError(path, f"state_dict.{pre}{diff[0]}", f"{what} EMA {tag!r} ({len(diff)} tensors)")
    return avg, tag


def _jsonable(v: Any) -> Any:
    """Plain JSON values from checkpoint metadata (tensors and numpy scalars become numbers/lists)."""
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, Tensor):
        return _jsonable(v.tolist())
    if hasattr(v, "item") and callable(v.item):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, bool | int | float | str):
        return v
    return str(v)


def _image_from_model(model: Mapping[str, Any], path: Path) -> dict[str, Any]:
    if model.get("name") == "mlp" or ("dim" in model and "resolution" not in model):
        return {"shape": [int(model["dim"])], "range": None}
    if "in_channels" in model and "resolution" in model:
        r = int(model["resolution"])
        return {"shape": [int(model["in_channels"]), r, r], "range": [-1.0, 1.0]}
    raise CheckpointError(path, "dtrain.image", f"missing, and the sample shape cannot be inferred from model "
                          f"{model.get('name')!r}; the training module should record it")


@functools.cache
def git_commit() -> str | None:
    """The commit of the dtrain source that runs (``<sha>-dirty`` with uncommitted changes to tracked files), or
    None outside a git checkout; asked once per process."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    if not head:
        return None
    return f"{head}-dirty" if git("status", "--porcelain", "--untracked-files=no") else head


def bundle_info(
    ckpt: Mapping[str, Any],
    *,
    source: str | Path = "checkpoint",
    sampler: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """dtrain.json contents (without ``weights``) from a checkpoint; ``sampler`` overrides the default sampler."""
    from dtrain.diffusion.schedule import schedule_from_config

    path = Path(source)
    meta = ckpt["dtrain"]
    recipe = _jsonable(meta["recipe"])
    model = dict(recipe["model"])
    kind = meta.get("bundle_kind") or BUNDLE_KINDS.get(meta["kind"])
    if kind is None:
        raise CheckpointError(path, "dtrain.kind", f"no bundle kind known for {meta['kind']!r}; record "
                              f"dtrain.bundle_kind in the checkpoint (known: {sorted(BUNDLE_KINDS)})")
    try:
        schedule = schedule_from_config(recipe["schedule"]).to_dict()
    except Exception as e:
        raise CheckpointError(path, "dtrain.recipe.schedule", str(e)) from None
    rs = recipe.get("sampler") or {}
    samp = {"name": rs.get("name", "ddim"), "nfe": rs.get("nfe", 50), "spacing": rs.get("spacing"),
            "eta": rs.get("eta"), "guidance": float(rs.get("guidance", 1.0)), "grid": None, "options": {}}
    for src in (_jsonable(meta.get("sampler") or {}), dict(sampler or {})):
        for k, v in src.items():
            if k not in samp:
                raise CheckpointError(path, f"sampler.{k}", f"unknown sampler field; expected {sorted(samp)}")
            samp[k] = v
    if (samp["grid"] is not None and "grid" not in (sampler or {})
            and grid_nfe(samp["name"], samp["grid"]) not in (None, samp["nfe"])):
        samp["grid"] = None  # another sampler or NFE than the checkpoint's grid was made for: the default grid
    ncls = int(model.get("num_classes", 0) or 0)
    names = meta.get("class_names")
    class_names = [str(c) for c in names] if names is not None else [str(i) for i in range(ncls)]
    image = _jsonable(meta["image"]) if meta.get("image") is not None else _image_from_model(model, path)
    teacher = meta.get("teacher")
    if teacher is None and recipe.get("teacher"):
        teacher = {"path": str(recipe["teacher"])}
    provenance = {
        "kind": meta["kind"],
        "recipe": recipe,
        "recipe_hash": meta.get("recipe_hash"),
        "git_commit": meta.get("git_commit"),
        "global_step": _jsonable(ckpt.get("global_step")),
        "source": str(source),
        "teacher": _jsonable(teacher),
        "metrics": {**_jsonable(meta.get("metrics") or {}), **_jsonable(dict(metrics or {}))},
        "training": _jsonable({k: v for k, v in meta.items() if k not in _KNOWN_META}),
        "exported": {"by": _dtrain_version(), "git_commit": git_commit(),
                     "at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    }
    return {"kind": kind, "model": model, "schedule": schedule, "sampler": samp, "image": image,
            "class_names": class_names, "provenance": provenance}


def _dtrain_version() -> str:
    from dtrain import __version__

    return f"dtrain {__version__}"


def export_checkpoint(
    ckpt_path: str | Path,
    out: str | Path,
    *,
    ema: str | float | None = "auto",
    dtype: str = "fp32",
    sampler: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """``dtrain export``: checkpoint -> bundle. The weights are loaded into the rebuilt network first, so a
    bundle is only written when the loader will accept it; a bad ``out`` fails before the checkpoint is read."""
    check_out(out, overwrite)
    ckpt = read_checkpoint(ckpt_path)
    state, tag = select_weights(ckpt, ema, ckpt_path)
    info = bundle_info(ckpt, source=ckpt_path, sampler=sampler, metrics=metrics)
    # the exact file it came from (a sharded directory: its weights' sha256 is the bundle's weights.sha256)
    info["provenance"]["source_sha256"] = sha256_file(ckpt_path) if Path(ckpt_path).is_file() else None
    try:
        assemble(info, state, file=str(ckpt_path))
    except BundleError as e:
        raise CheckpointError(ckpt_path, e.field, e.reason) from None
    return save_bundle(out, state, info, dtype=dtype, ema=tag, overwrite=overwrite)


def load_teacher(path: str | Path, *, ema: str | float | None = "auto", device: torch.device | str = "cpu",
                 field: str = "--ema") -> tuple[Any, dict[str, Any]]:
    """A frozen teacher (the object samplers drive; a ``Denoiser`` for kind "denoiser") and its info.

    ``path`` is a bundle directory or a training checkpoint. ``info`` is the bundle's dtrain.json contents
    plus ``info["ref"]`` = {"path", "format", "sha256", "ema", "kind", "teacher"} (sha256: of the file; of the
    selected weights for a sharded checkpoint directory): a student stores that
    ref as ``ckpt["dtrain"]["teacher"]`` so its own bundle records the chain of hashes.
    """
    path = Path(path)
    if is_bundle(path):
        pipe = load_bundle(path, device=device)
        info = dict(pipe.info)
        held = info["weights"]["ema"]
        if ema not in ("auto", None) and ema_tag(ema) != held:  # a bundle holds one set of weights
            raise InputError(f"{field}: {path} is a bundle of the {held or 'raw'} weights only, not {ema!r}; export "
                             f"the one you want with dtrain export --ema, or use auto")
        ref = {"path": str(path.resolve()), "format": "bundle", "sha256": info["weights"]["sha256"],
               "ema": info["weights"]["ema"]}
    else:
        ckpt = read_checkpoint(path)
        state, tag = select_weights(ckpt, ema, path, field)
        info = bundle_info(ckpt, source=path)
        try:
            pipe = assemble(info, state, file=str(path), device=device)
        except BundleError as e:
            raise CheckpointError(path, e.field, e.reason) from None
        ref = {"path": str(path.resolve()), "format": "checkpoint",
               "sha256": sha256_file(path) if path.is_file() else sha256_tensors(state), "ema": tag}
    ref.update(kind=info["kind"], teacher=info["provenance"].get("teacher"))
    info["ref"] = ref
    return pipe.model, info

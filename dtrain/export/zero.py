"""Sharded checkpoints -> one fp32 format-1 checkpoint dict (what ``dtrain.export.checkpoint`` reads from a file).

Two layouts, each a directory Lightning writes in place of ``last.ckpt`` / ``step*.ckpt`` / ``hpc_ckpt_*.ckpt``:
- DeepSpeed ZeRO 1 / 2 / 3 (``DeepSpeedStrategy``): ``latest`` names a tag directory holding the model states
  (``mp_rank_00_model_states.pt``, or one ``zero_pp_rank_<r>_mp_rank_00_model_states.pt`` per rank in stage 3:
  buffers, parameter shapes, frozen parameters, and the rest of the Lightning checkpoint as client state) and
  one ``*zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` per rank with that rank's partition of the fp32 master
  weights. Trainable weights come from those fp32 partitions: stages 1 / 2 split each parameter group's flat
  fp32 vector across ranks (params back to back, alignment padding between groups); stage 3 splits every
  parameter on its own into ceil(numel / world) pieces, each rank's pieces back to back. Frozen parameters (EMA
  copies, a teacher) come from the model states: whole in stages 1 / 2 (stage 1 keeps them only in the module
  state, stage 2 also as ``frozen_param_fragments``), one fragment per rank in stage 3. A directory counts only
  once ``latest``, which DeepSpeed writes last, names its tag.
- torch distributed checkpoints (FSDP ``sharded_checkpoint``, fsdp2): ``.metadata`` + ``*.distcp`` shards and
  Lightning's ``meta.pt`` (the rest of the checkpoint, written last: a directory without it is refused).
Everything is read with ``torch.load(weights_only=True)``: DeepSpeed's loss-scaler objects and stage enum in
the optimizer files are read as inert stand-ins, nothing else is allowed to unpickle. Floating tensors come out
as fp32; prefixes the training module leaves out of its checkpoints (a student's frozen teacher) are dropped.
No DeepSpeed or Lightning import is needed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dtrain.export.checkpoint import CheckpointError

__all__ = ["consolidate", "is_sharded_checkpoint", "not_sharded", "sharded_meta", "ZeroCheckpointError"]

# Keys DeepSpeed adds to a model-states file next to the Lightning client state.
DEEPSPEED_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                  "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
                  "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config",
                  "ds_version", "checkpoint_parallel_dimensions", "mp_rank", "ds_steps"}
_MODEL = re.compile(r"(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt")
_OPTIM = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
LIGHTNING_META = "meta.pt"  # Lightning's non-tensor part of a distributed (DCP) checkpoint


class ZeroCheckpointError(CheckpointError):
    """A sharded checkpoint that cannot be consolidated: ``path: reason``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(path, "", reason)


class _Inert:
    """Stands in for a DeepSpeed object pickled into an optimizer file (loss scaler, ZeRO stage enum, fragment
    addresses): keeps its constructor arguments and state, runs nothing; ``int()`` gives an enum's value."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __int__(self) -> int:
        return int(self.args[0])


_STANDINS: set[str] = {"deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                       "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                       "deepspeed.utils.tensor_fragment.fragment_address"}
_UNSUPPORTED = re.compile(r"GLOBAL (deepspeed\.[\w.]+) was not an allowed global")


def _load(path: Path, mmap: bool = False) -> dict[str, Any]:
    """``torch.load(weights_only=True)``; a global under ``deepspeed.`` is read as an ``_Inert`` stand-in."""
    import pickle

    for _ in range(32):
        try:
            with torch.serialization.safe_globals([(_Inert, name) for name in sorted(_STANDINS)]):
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except pickle.UnpicklingError as e:
            m = _UNSUPPORTED.search(str(e))
            if m is None or m.group(1) in _STANDINS:
                raise ZeroCheckpointError(path, f"cannot be read with torch.load(weights_only=True): "
                                          f"{_reason(e)}") from None
            _STANDINS.add(m.group(1))
        except Exception as e:
            raise ZeroCheckpointError(path, f"not a readable torch file (truncated or corrupt?): "
                                      f"{_reason(e)}") from None
    if not isinstance(obj, dict):
        raise ZeroCheckpointError(path, f"expected a dict, got {type(obj).__name__}")
    return obj


def _reason(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return next((ln for ln in lines if "Unsupported global" in ln), lines[0] if lines else type(e).__name__)[:300]


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A DeepSpeed or distributed-checkpoint directory ``consolidate`` understands."""
    p = Path(path)
    return p.is_dir() and ((p / ".metadata").is_file() or _zero_dir(p) is not None)


UNFINISHED = ("a DeepSpeed checkpoint directory without its 'latest' file, which DeepSpeed writes last: an "
              "unfinished save (its shards may mix two steps)")


def _zero_dir(path: Path, check: bool = False) -> Path | None:
    """The tag directory holding the model-states files (``<path>/<latest tag>``, or ``path`` itself when its
    parent's ``latest`` names it); None when ``path`` is no DeepSpeed directory. ``check``: refuse a directory
    without ``latest`` (an unfinished save) or whose ``latest`` names no directory."""
    def has_states(d: Path) -> bool:
        return any(_MODEL.fullmatch(f.name) for f in d.iterdir())

    if (path / "latest").is_file():
        tag = (path / "latest").read_text().strip()
        if (path / tag).is_dir():
            return path / tag
        if check:
            raise ZeroCheckpointError(path, f"'latest' names tag {tag!r}, which is not a directory here "
                                      f"({sorted(f.name for f in path.iterdir())})")
        return path
    if has_states(path):
        found, parent = path, path.parent
    else:
        subs = [d for d in path.iterdir() if d.is_dir() and has_states(d)]
        found, parent = (subs[0] if len(subs) == 1 else None), path
    if found is not None and check:
        latest = parent / "latest"
        if not latest.is_file() or latest.read_text().strip() != found.name:
            raise ZeroCheckpointError(parent, UNFINISHED + (f"; if the save did finish, write its tag into "
                                                            f"{latest}: echo {found.name} > {latest}"))
    return found


def _by_rank(files: list[tuple[int, Path]], what: str, where: Path) -> list[Path]:
    ranks = sorted(r for r, _ in files)
    if ranks != list(range(len(ranks))):
        raise ZeroCheckpointError(where, f"{what} files for ranks {ranks}: some are missing")
    return [f for _, f in sorted(files)]


def _fp32(t: Any) -> Any:
    return t.float() if isinstance(t, Tensor) and t.is_floating_point() else t


def _zero_files(d: Path) -> tuple[list[Path], list[Path]]:
    """A DeepSpeed tag directory's model-states and optimizer-states files, each in rank order (ranks 0 .. n-1)."""
    models: list[tuple[int, Path]] = []
    optims: list[tuple[int, Path]] = []
    for f in d.iterdir():
        for pattern, found in ((_MODEL, models), (_OPTIM, optims)):
            if m := pattern.fullmatch(f.name):
                if int(m.group(2)) != 0:
                    raise ZeroCheckpointError(d, "model / pipeline parallel checkpoints (mp_rank > 0) are not "
                                              "supported")
                found.append((int(m.group(1) or 0), f))
    if not models or not optims:
        raise ZeroCheckpointError(d, f"not a DeepSpeed ZeRO checkpoint (needs *model_states.pt and "
                                  f"*zero_pp_rank_*_optim_states.pt; found {sorted(f.name for f in d.iterdir())})")
    return _by_rank(models, "model-states", d), _by_rank(optims, "optimizer-states", d)


def _zero_state_dict(d: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(fp32 state dict, client state of rank 0) of a DeepSpeed tag directory."""
    model_files, optim_files = _zero_files(d)
    model_states = [_load(f) for f in model_files]
    opt = [_load(f)["optimizer_state_dict"] for f in optim_files]
    stage, parts = int(opt[0]["zero_stage"]), opt[0]["partition_count"]
    world = max(parts) if isinstance(parts, list) else int(parts)
    if world != len(opt):
        raise ZeroCheckpointError(d, f"the optimizer states say {world} ranks but {len(opt)} files are present")
    ms0 = model_states[0]
    for key in ("module", "buffer_names", "param_shapes"):
        if key not in ms0:
            raise ZeroCheckpointError(d, f"model states lack {key!r}")
    sd: dict[str, Tensor] = {k: v for k, v in ms0["module"].items() if k in set(ms0["buffer_names"])}
    frozen = ms0.get("frozen_param_shapes") or {}
    if stage <= 2:
        if ms0.get("frozen_param_fragments") is not None:  # stage 2
            sd.update({name: ms0["frozen_param_fragments"][name] for name in frozen})
        else:  # stage 1 saves frozen parameters in the module state only
            trainable = {name for shapes in ms0["param_shapes"] for name in shapes}
            sd.update({k: v for k, v in ms0["module"].items() if k not in trainable and k not in sd})
        sd.update(_zero2_trainable(opt, ms0["param_shapes"], world, d))
    elif stage == 3:
        if len(model_states) != world:
            raise ZeroCheckpointError(d, f"stage 3 needs one model-states file per rank ({world}), found "
                                      f"{len(model_states)}")
        for name, shape in frozen.items():
            frags = [ms["frozen_param_fragments"][name].reshape(-1) for ms in model_states]
            sd[name] = torch.cat(frags).narrow(0, 0, math.prod(shape)).view(shape)
        sd.update(_zero3_trainable(opt, ms0["param_shapes"], world, d))
    else:
        raise ZeroCheckpointError(d, f"unknown ZeRO stage {stage}")
    for name, target in (ms0.get("shared_params") or {}).items():
        if target in sd:
            sd[name] = sd[target]
    client = {k: v for k, v in ms0.items() if k not in DEEPSPEED_KEYS}
    return {k: _fp32(v).clone() for k, v in sd.items()}, client


def _zero2_trainable(opt: list[dict[str, Any]], param_shapes: list[Mapping[str, Any]], world: int, d: Path
                     ) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    paddings = opt[0].get("param_alignment_paddings")
    for g, shapes in enumerate(param_shapes):
        flat = torch.cat([o["single_partition_of_fp32_groups"][g] for o in opt])
        pads = paddings[g] if paddings is not None else [0] * len(shapes)
        need = sum(math.prod(shape) for shape in shapes.values()) + sum(pads)
        align = 2 * world  # DeepSpeed pads every group to a multiple of 2 x world size
        if need > flat.numel() or math.ceil(need / align) != math.ceil(flat.numel() / align):
            raise ZeroCheckpointError(d, f"parameter group {g} holds {flat.numel()} fp32 values, its parameters "
                                      f"need {need}: shapes and partitions do not match")
        offset = 0
        for (name, shape), pad in zip(shapes.items(), pads):
            n = math.prod(shape)
            out[name] = flat.narrow(0, offset, n).view(shape)
            offset += n + pad
    return out


def _zero3_trainable(opt: list[dict[str, Any]], param_shapes: list[Mapping[str, Any]], world: int, d: Path
                     ) -> dict[str, Tensor]:
    flats = [torch.cat([t.reshape(-1) for t in o["fp32_flat_groups"]]) for o in opt]
    need = sum(math.ceil(math.prod(shape) / world) for shapes in param_shapes for shape in shapes.values())
    if any(f.numel() != need for f in flats):
        raise ZeroCheckpointError(d, f"the ranks hold {[f.numel() for f in flats]} fp32 values, the parameters "
                                  f"need {need} each: shapes and partitions do not match")
    out: dict[str, Tensor] = {}
    offset = 0
    for shapes in param_shapes:
        for name, shape in shapes.items():
            n = math.prod(shape)
            part = math.ceil(n / world)
            out[name] = torch.cat([f.narrow(0, offset, part) for f in flats]).narrow(0, 0, n).view(shape)
            offset += part
    return out


def _dcp_checkpoint(path: Path) -> dict[str, Any]:
    """A torch distributed checkpoint (Lightning FSDP sharded / ModelParallel) as one dict, on CPU: only the model's
    tensors are read (``state_dict.*`` / FSDP's ``model.*``; not the optimizer's, two to three times their size),
    straight into place (no full copy written to a temporary file and read back)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    _dcp_done(path)
    try:
        reader = dcp.FileSystemReader(str(path))
        meta = reader.read_metadata()
        tree: dict[str, Any] = {}
        for key, item in meta.state_dict_metadata.items():
            where = (meta.planner_data or {}).get(key) or tuple(key.split(".", 1))
            if where[0] not in ("state_dict", "model") or not isinstance(item, TensorStorageMetadata):
                continue
            node = tree
            for part in where[:-1]:
                node = node.setdefault(part, {})
            node[where[-1]] = torch.empty(item.size, dtype=item.properties.dtype)
        if not tree:
            raise ZeroCheckpointError(path, "the distributed checkpoint holds no 'state_dict' or 'model' tensors")
        dcp.load(tree, storage_reader=reader, no_dist=True)
    except ZeroCheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        if isinstance(e, CheckpointException):  # its str holds each rank's traceback: keep the first error
            e = next((f[0] for f in e.failures.values()), e)
        raise ZeroCheckpointError(path, f"cannot read the distributed checkpoint: {_reason(e)}") from None
    ckpt = {**_load(path / LIGHTNING_META), **tree}
    if "state_dict" not in ckpt and "model" in ckpt:  # FSDPStrategy's name for it (ModelParallelStrategy: state_dict)
        ckpt["state_dict"] = ckpt.pop("model")
    sd = ckpt.get("state_dict")
    if isinstance(sd, Mapping):
        ckpt["state_dict"] = {k: _fp32(v) for k, v in _flat(sd).items()}
    return ckpt


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one dict with dotted keys (a state dict saved nested reads back as the flat one)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def consolidate(path: str | Path) -> dict[str, Any]:
    """A sharded checkpoint directory -> the dict a format-1 ``.ckpt`` file holds, weights in fp32.

    ``ckpt["state_dict"]`` has ``net.*`` and ``ema.<tag>.*``; the optimizer state is left out (a consolidated
    checkpoint is for export, sampling and teachers; resume from the directory itself).
    """
    path = Path(path)
    if not path.is_dir():
        raise ZeroCheckpointError(path, "not a directory (a sharded checkpoint is one)")
    if (path / ".metadata").is_file():
        ckpt = _dcp_checkpoint(path)
        ckpt.pop("optimizer_states", None)
        for k in [k for k in ckpt if re.fullmatch(r"optimizer_\d+", k)]:
            del ckpt[k]
    else:
        sd, ckpt = _zero_state_dict(_deepspeed_tag(path))
        ckpt["state_dict"] = {k.removeprefix("_forward_module."): v for k, v in sd.items()}
    info = ckpt.pop("dtrain_sharded", None) or {}
    drop = tuple(info.get("unsaved_prefixes") or ())
    if drop:
        ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith(drop)}
    from dtrain.export.checkpoint import select_weights

    for tag in (ckpt.get("dtrain") or {}).get("ema_tags") or []:  # each copy holds exactly the network's tensors (one
        if not f"ema.{tag}.".startswith(drop or ("\0",)):  # that lost some would export a file nothing can load)
            select_weights(ckpt, tag, path)
    return ckpt


def _dcp_done(path: Path) -> None:
    if not (path / LIGHTNING_META).is_file():
        raise ZeroCheckpointError(path, f"a sharded (FSDP) checkpoint directory without its {LIGHTNING_META!r}, "
                                  f"which Lightning writes last: an unfinished save")


def not_sharded(path: Path) -> str:
    """Why a directory is not a sharded checkpoint (an empty one, a bundle, a run directory, something else)."""
    from dtrain.export.checkpoint import is_bundle

    if not any(path.iterdir()):
        return "empty checkpoint directory"
    if is_bundle(path):
        return "an inference bundle (dtrain export), not a training checkpoint"
    if (path / "checkpoints").is_dir():
        return ("a run directory, not a checkpoint: give one of its checkpoints/*.ckpt (to resume: --resume last "
                "with its recipe)")
    return ("a directory, but not a sharded (DeepSpeed / FSDP) checkpoint directory (no DeepSpeed 'latest' or "
            "*model_states.pt, no torch distributed checkpoint .metadata): give a .ckpt file or a sharded checkpoint")


def _deepspeed_tag(path: Path) -> Path:
    d = _zero_dir(path, check=True)
    if d is None:
        raise ZeroCheckpointError(path, not_sharded(path))
    return d


def sharded_meta(path: str | Path, *, complete: bool = False) -> dict[str, Any]:
    """The non-tensor part of a sharded checkpoint directory (``dtrain`` metadata, ``global_step``, ...) without
    consolidating it: FSDP's ``meta.pt``, or DeepSpeed rank 0's model states, memory-mapped (their tensors are
    never read). ``complete``: also refuse a directory with a shard file missing or cut short (a resume would load
    every shard; ``_dcp_shards_whole`` / ``_zero_shards_whole`` say what is checked)."""
    path = Path(path)
    if (path / ".metadata").is_file():
        _dcp_done(path)
        if complete:
            _dcp_shards_whole(path)
        return _load(path / LIGHTNING_META)
    d = _deepspeed_tag(path)
    first = next((f for f in sorted(d.iterdir()) if (m := _MODEL.fullmatch(f.name)) and int(m.group(1) or 0) == 0),
                 None)
    if first is None:
        raise ZeroCheckpointError(d, "no rank-0 model-states file")
    states = _load(first, mmap=True)
    if complete:
        _zero_shards_whole(d, states.get("dp_world_size"))
    return {k: v for k, v in states.items() if k not in DEEPSPEED_KEYS}


# Completeness, cheaply: file listings, sizes and zip directories; no tensor data is read. A shard damaged in place
# (same size, other bytes) is not caught here: the strategy's own load reads it.
def _dcp_shards_whole(path: Path) -> None:
    """Every file a distributed checkpoint's ``.metadata`` records is there and reaches the last byte recorded in
    it (``.metadata`` itself is written after every shard, so it is read whole or refused)."""
    import torch.distributed.checkpoint as dcp

    try:
        meta = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        raise ZeroCheckpointError(path / ".metadata", f"unreadable (truncated or corrupt?): {_reason(e)}") from None
    need: dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        f = path / name
        if not f.is_file():
            raise ZeroCheckpointError(f, "missing: the checkpoint's .metadata lists it (an incomplete copy?)")
        if f.stat().st_size < size:
            raise ZeroCheckpointError(f, f"truncated: {f.stat().st_size} bytes, the checkpoint's .metadata records "
                                      f"{size}")


def _zero_shards_whole(d: Path, world: Any) -> None:
    """A DeepSpeed tag directory holds one optimizer-states file per rank (``world``: rank 0's ``dp_world_size``),
    and one model-states file per rank in stage 3, each a whole zip file (``torch.save``'s format writes its zip
    directory last, so a truncated file has none)."""
    import zipfile

    models, optims = _zero_files(d)
    staged = any(f.name.startswith("zero_pp_rank_") for f in models)  # stage 3: every rank writes model states
    if isinstance(world, int):  # files of ranks past it: a larger run's earlier save in place, which DeepSpeed ignores
        if len(optims) < world or (staged and len(models) < world):
            raise ZeroCheckpointError(d, f"{len(optims)} optimizer-states and {len(models)} model-states files for a "
                                      f"run of {world} ranks (dp_world_size): some are missing")
        models, optims = models[:world], optims[:world]
    for f in (*models, *optims):
        try:
            zipfile.ZipFile(f).close()
        except (zipfile.BadZipFile, OSError) as e:
            raise ZeroCheckpointError(f, f"not a whole torch file (truncated?): {_reason(e)}") from None

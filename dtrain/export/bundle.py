"""Inference bundles: a directory with ``model.safetensors`` and ``dtrain.json``, loaded without pickle.

``dtrain.json`` (format 1) holds everything needed to rebuild and sample the model:
  format       bundle format version (this code reads 1)
  kind         how the network is used: "denoiser" (teachers, progressive-distillation students),
               "guided_denoiser" (guided PD) or a student kind registered in ``KINDS`` ("consistency",
               "meanflow", "ctm", ...)
  model        the recipe's ``model`` section (network name + kwargs and how its output is read: param,
               sigma_data, input_scaling, clip_x0, num_classes); rebuilt with ``dtrain.models``
  schedule     ``Schedule.to_dict()``
  sampler      default sampler: registered name, nfe, spacing, eta, guidance scale, explicit grid, options
  image        sample shape (C, H, W) or (D,), and the value range mapped to 0..255 (null: not images)
  class_names  one name per class (empty: unconditional)
  weights      file name, sha256 (checked on load), dtype, EMA tag, parameter count
  provenance   free-form: recipe, git commit, source checkpoint, teacher reference, metrics (FID at NFE)
Bad files fail with ``BundleError`` naming the file and the field. Importing this module must not import
Lightning, DeepSpeed, W&B or WebDataset (enforced by import-linter and a subprocess test).
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import math
import numbers
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dtrain.diffusion.guidance import NO_NULL, CFGDenoiser, WCondDenoiser, reads_unlearned_null
from dtrain.diffusion.param import PARAMS, terminal_snr_conflict
from dtrain.diffusion.schedule import Schedule, make_schedule
from dtrain.diffusion.timesteps import SPACINGS
from dtrain.errors import InputError, check_count, check_writable
from dtrain.fileio import replacing
from dtrain.registry import Registry
from dtrain.samplers.base import check_device, initial_noise, prior_std

__all__ = [
    "FORMAT",
    "INFO_FILE",
    "WEIGHTS_FILE",
    "BundleError",
    "PipelineKind",
    "KINDS",
    "KIND_MODULES",
    "register_kind",
    "kind_guide",
    "Pipeline",
    "check_info",
    "check_out",
    "read_info",
    "save_bundle",
    "load_bundle",
    "assemble",
    "initial_noise",
    "sha256_file",
]

FORMAT = 1
INFO_FILE = "dtrain.json"
WEIGHTS_FILE = "model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BundleError(InputError):
    """A bad bundle: ``file: field: reason``."""

    def __init__(self, file: str | Path, field: str, reason: str) -> None:
        self.file, self.field, self.reason = str(file), field, reason
        super().__init__(f"{file}: {field}: {reason}" if field else f"{file}: {reason}")


# ---------------------------------------------------------------------------------------------
# dtrain.json schema: section -> {key: allowed types}; None in a tuple allows null.

_Num = (int, float)
_TOP: dict[str, Any] = {
    "format": int, "kind": str, "model": dict, "schedule": dict, "sampler": dict, "image": dict,
    "class_names": list, "weights": dict, "provenance": dict,
}
_SECTIONS: dict[str, dict[str, Any]] = {
    "sampler": {"name": str, "nfe": int, "spacing": (str, None), "eta": (*_Num, None), "guidance": _Num,
                "grid": (list, None), "options": dict},
    "image": {"shape": list, "range": (list, None)},
    "weights": {"file": str, "sha256": str, "dtype": str, "ema": (str, None), "num_params": int},
}


def _type_ok(v: Any, types: Any) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    if v is None:
        return None in types
    if isinstance(v, bool):  # JSON true/false are not numbers here
        return bool in types
    return isinstance(v, tuple(t for t in types if t is not None))


def _tname(types: Any) -> str:
    types = types if isinstance(types, tuple) else (types,)
    names = {int: "int", float: "number", str: "string", list: "list", dict: "mapping", None: "null"}
    return " or ".join(dict.fromkeys(names.get(t, str(t)) for t in types))


def _check_keys(d: Mapping[str, Any], spec: Mapping[str, Any], prefix: str, file: str) -> None:
    for k in d:
        if k not in spec:
            raise BundleError(file, f"{prefix}{k}", f"unknown key; expected {sorted(spec)}")
    for k, types in spec.items():
        if k not in d:
            raise BundleError(file, f"{prefix}{k}", "missing")
        if not _type_ok(d[k], types):
            got = f"{type(d[k]).__name__}: {d[k]!r:.60}"
            raise BundleError(file, f"{prefix}{k}", f"expected {_tname(types)}, got {got}")


def _finite(v: Any) -> bool:
    """A finite real number (numpy's too), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _check_shape(model: Mapping[str, Any], shape: list[int], f: str) -> None:
    """image.shape against the network the model section builds: [dim] for vectors, [in_channels, res, res]."""
    if "dim" in model:
        want = [model["dim"]]
    elif "in_channels" in model:
        want = [model["in_channels"], *([model["resolution"]] * 2 if "resolution" in model else shape[1:3])]
    else:
        return
    if shape != want:
        raise BundleError(f, "image.shape", f"{shape} does not match the {model['name']!r} network in 'model' "
                          f"(needs {want})")


def grid_nfe(name: str, grid: Any) -> int | None:
    """Network evaluations sampler ``name`` spends on the time grid ``grid`` (its points, ending at 0); None for a
    sampler of another name than the registered ones (``check_info`` leaves its name to the sampling call)."""
    from dtrain.samplers import SAMPLERS

    return SAMPLERS.get(name, "sampler").nfe(len(grid) - 1) if name in SAMPLERS else None


def check_info(info: Any, file: str | Path = INFO_FILE) -> dict[str, Any]:
    """Validate a parsed ``dtrain.json``: types, required keys, format version and value ranges."""
    f = str(file)
    if not isinstance(info, dict):
        raise BundleError(f, "", f"top level must be a mapping, got {type(info).__name__}")
    if "format" in info and info["format"] != FORMAT:
        raise BundleError(f, "format", f"unsupported bundle format {info['format']!r}; this dtrain reads {FORMAT}")
    _check_keys(info, _TOP, "", f)
    for sec, spec in _SECTIONS.items():
        _check_keys(info[sec], spec, f"{sec}.", f)
    model, sampler, image, weights = info["model"], info["sampler"], info["image"], info["weights"]
    for sec in ("model", "schedule"):
        if not isinstance(info[sec].get("name"), str):
            raise BundleError(f, f"{sec}.name", "missing or not a string")
    if model.get("param", "eps") not in PARAMS:
        raise BundleError(f, "model.param", f"unknown parameterization {model.get('param')!r}; choose one of {PARAMS}")
    ncls = model.get("num_classes", 0)
    if not isinstance(ncls, int) or isinstance(ncls, bool) or ncls < 0:
        raise BundleError(f, "model.num_classes", f"must be an int >= 0, got {ncls!r}")
    names = info["class_names"]
    if len(names) != ncls or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise BundleError(f, "class_names", f"need {ncls} distinct strings (model.num_classes), got {names!r:.80}")
    sd = model.get("sigma_data", 1.0)  # build_denoiser's default
    if not (_finite(sd) and sd > 0):
        raise BundleError(f, "model.sigma_data", f"must be a number > 0, got {sd!r}")
    for key in ("input_scaling", "second_time", "w_cond"):
        if key in model and not isinstance(model[key], bool):
            raise BundleError(f, f"model.{key}", f"must be true or false, got {model[key]!r}")
    if sampler["nfe"] < 1:
        raise BundleError(f, "sampler.nfe", f"must be >= 1, got {sampler['nfe']}")
    if sampler["spacing"] is not None and sampler["spacing"] not in SPACINGS:
        raise BundleError(f, "sampler.spacing", f"unknown spacing {sampler['spacing']!r}; choose one of {SPACINGS}")
    g = sampler["guidance"]
    if not (_finite(g) and g >= 0):
        raise BundleError(f, "sampler.guidance", f"must be a finite number >= 0 (1: no guidance), got {g!r}")
    if g != 1 and (ncls == 0 or kind_guide(info["kind"], str(f)) is None):  # every default sample would fail
        why = "the model has no classes" if ncls == 0 else f"bundle kind {info['kind']!r} has no guidance"
        raise BundleError(f, "sampler.guidance", f"{g}, but {why}: the default must be 1")
    if g != 1 and reads_unlearned_null(info, kind_guide(info["kind"], str(f))):
        raise BundleError(f, "sampler.guidance", f"{g}, but {NO_NULL}: the default must be 1")
    if sampler["eta"] is not None and not (_finite(sampler["eta"]) and 0 <= sampler["eta"] <= 1):
        raise BundleError(f, "sampler.eta", f"must be null or a number in [0, 1], got {sampler['eta']!r}")
    clip = model.get("clip_x0")
    if clip is not None and not (_finite(clip) and clip > 0):
        raise BundleError(f, "model.clip_x0", f"must be null or a number > 0, got {clip!r}")
    grid = sampler["grid"]
    if grid is not None and (len(grid) < 2 or not all(_finite(t) for t in grid) or grid[-1] != 0
                             or any(a <= b for a, b in itertools.pairwise(grid))):
        raise BundleError(f, "sampler.grid", "must be strictly decreasing finite times ending in 0")
    if grid is not None and (cost := grid_nfe(sampler["name"], grid)) not in (None, sampler["nfe"]):
        raise BundleError(f, "sampler.grid", f"{len(grid) - 1} steps of {sampler['name']!r} cost {cost} NFE, but "
                          f"sampler.nfe is {sampler['nfe']}")
    shape = image["shape"]
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise BundleError(f, "image.shape", f"must be a non-empty list of positive ints, got {shape!r}")
    _check_shape(model, shape, f)
    rng = image["range"]
    if rng is not None and (len(rng) != 2 or not all(_finite(v) for v in rng) or not rng[0] < rng[1]):
        raise BundleError(f, "image.range", f"must be [low, high] with low < high, got {rng!r}")
    if weights["file"] != WEIGHTS_FILE:
        raise BundleError(f, "weights.file", f"must be {WEIGHTS_FILE!r}, got {weights['file']!r}")
    if not re.fullmatch(r"[0-9a-f]{64}", weights["sha256"]):
        raise BundleError(f, "weights.sha256", "must be 64 lowercase hex digits")
    if weights["dtype"] not in DTYPES:
        raise BundleError(f, "weights.dtype", f"must be one of {sorted(DTYPES)}, got {weights['dtype']!r}")
    return info


def read_info(path: str | Path) -> dict[str, Any]:
    """Parse and validate ``<bundle>/dtrain.json`` (plain JSON: no pickle anywhere)."""
    path = Path(path)
    file = path / INFO_FILE if path.is_dir() else path
    if not file.is_file():
        raise BundleError(file, "", "not found (a bundle is a directory with dtrain.json and model.safetensors)")
    try:
        info = json.loads(file.read_bytes().decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise BundleError(file, "", f"not valid JSON: {e}") from None
    return check_info(info, file)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tensors(state: Mapping[str, Tensor]) -> str:
    """sha256 of a state dict's content: every tensor's name, dtype, shape and bytes, in name order. The hash of a
    sharded checkpoint directory's weights, which has no single file to hash."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Kinds: how a network plus schedule becomes the object a sampler drives.


@dataclass(frozen=True)
class PipelineKind:
    """``build(net, schedule, model_cfg)`` returns what the sampler drives (a denoiser for "denoiser");
    ``guide(model, w, null_label)`` wraps it for classifier-free guidance (None: guidance unsupported)."""

    build: Callable[[nn.Module, Schedule, Mapping[str, Any]], Any]
    guide: Callable[[Any, float, int], Any] | None = CFGDenoiser
    doc: str = ""


def _build_denoiser(net: nn.Module, schedule: Schedule, model_cfg: Mapping[str, Any]) -> Any:
    from dtrain.models import build_denoiser

    return build_denoiser(dict(model_cfg), schedule, net=net)


KINDS: Registry[PipelineKind] = Registry("bundle kind")
KINDS.register("denoiser", PipelineKind(_build_denoiser, doc="D(x_t, t, cond) -> x0 (teachers, PD students)"))
KINDS.register("guided_denoiser", PipelineKind(_build_denoiser, lambda model, w, null_label: WCondDenoiser(model, w),
                                               doc="a denoiser taking the guidance scale w as an input (guided PD)"))


def _build_consistency(net: nn.Module, schedule: Schedule, model_cfg: Mapping[str, Any]) -> Any:
    from dtrain.samplers.few_step import ConsistencyModel

    return ConsistencyModel(_build_denoiser(net, schedule, model_cfg))


KINDS.register("consistency", PipelineKind(  # no guidance: CD / CT / iCT train no null class (no label dropout)
    _build_consistency, None, doc="f(x_t, t) / alpha(t_min) -> x0 over the model's denoiser (CD, CT, iCT students)"))


def _build_meanflow(net: nn.Module, schedule: Schedule, model_cfg: Mapping[str, Any]) -> Any:
    """On the flow schedule the network predicts u itself; on another (a teacher's) it is read as a denoiser there."""
    from dtrain.diffusion.schedule import FlowSchedule
    from dtrain.samplers.few_step import MeanFlowModel

    if isinstance(schedule, FlowSchedule):
        return MeanFlowModel(net, schedule)
    return MeanFlowModel(net, FlowSchedule(), _build_denoiser(net, schedule, model_cfg))


def _build_ctm(net: nn.Module, schedule: Schedule, model_cfg: Mapping[str, Any]) -> Any:
    from dtrain.samplers.few_step import CTMModel

    return CTMModel(_build_denoiser(net, schedule, model_cfg))


KINDS.register("meanflow", PipelineKind(
    _build_meanflow, doc="u(z, r, t): average velocity on the flow schedule; jump z_s = z_t - (t - s) u (MeanFlow)"))
KINDS.register("ctm", PipelineKind(
    _build_ctm, doc="G(x_t, t, s): DDIM step with the clean estimate g(x_t, t, s) of the model's denoiser (CTM)"))
# Kinds a third-party module registers, imported on first use: {kind: module} (dtrain's own are all above).
KIND_MODULES: dict[str, str] = {}


def register_kind(name: str, kind: PipelineKind) -> PipelineKind:
    """Add a bundle kind (students with other network signatures: consistency, meanflow, ctm, ...)."""
    return KINDS.register(name, kind)


def kind_guide(kind: str, file: str = INFO_FILE) -> Callable[[Any, float, int], Any] | None:
    """How bundle kind ``kind`` applies guidance w: ``guide(model, w, null_label)`` (CFG for denoisers, w as an input
    for guided PD students), or None where the kind has no guidance."""
    return _kind(kind, file).guide


def _kind(name: str, file: str) -> PipelineKind:
    if name not in KINDS and name in KIND_MODULES:
        import importlib

        importlib.import_module(KIND_MODULES[name])
    try:
        return KINDS.get(name)
    except KeyError as e:
        raise BundleError(file, "kind", str(e.args[0])) from None


# ---------------------------------------------------------------------------------------------
# The pipeline


class Pipeline:
    """A loaded model ready to sample: ``.net``, ``.denoiser`` (what samplers drive), ``.schedule``, ``.info``."""

    def __init__(self, model: Any, net: nn.Module, info: dict[str, Any], path: Path | None = None) -> None:
        self.model, self.net, self.info, self.path = model, net, info, path

    @property
    def denoiser(self) -> Any:
        return self.model

    @property
    def schedule(self) -> Schedule:
        return self.model.schedule

    @property
    def kind(self) -> str:
        return self.info["kind"]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.info["image"]["shape"])

    @property
    def class_names(self) -> list[str]:
        return list(self.info["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.info["class_names"])

    @property
    def device(self) -> torch.device:
        p = next(iter(self.net.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    def to(self, device: torch.device | str) -> Pipeline:
        self.net.to(check_device(device, "device"))
        return self

    def labels(self, labels: Any, n: int, key: str = "labels") -> Tensor | None:
        """Labels as a LongTensor [n]: None cycles through the classes 0..K-1; an int or a class name repeats;
        a sequence gives one per sample. The null label K (= number of classes) means unconditional. Bad labels
        raise ``InputError`` naming ``key`` (the argument, or a flag: ``--labels``)."""
        k = self.num_classes
        if k == 0:
            if labels is not None:
                raise InputError(f"{key}: this bundle's model is unconditional (no class_names)")
            return None
        if labels is None:
            return torch.arange(n) % k
        if getattr(labels, "ndim", None) == 0:  # a numpy or torch scalar
            labels = labels.item()
        if isinstance(labels, int | float | str):
            labels = [labels] * n
        if not isinstance(labels, Iterable):
            raise InputError(f"{key}: need an int, a class name or one per sample, got {labels!r:.80}")
        vals = labels.tolist() if isinstance(labels, Tensor) else list(labels)
        out = []
        for v in vals:
            if isinstance(v, str) and v in self.class_names:
                v = self.class_names.index(v)
            elif hasattr(v, "__index__") and not isinstance(v, bool):
                v = v.__index__()  # numpy integers
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= k:
                raise InputError(f"{key}: need ints in [0, {k}] ({k}: unconditional) or names from "
                                 f"{self.class_names[:10]}, got {v!r}")
            out.append(v)
        if len(out) != n:
            raise InputError(f"{key}: need {n} labels, got {len(out)}")
        return torch.tensor(out, dtype=torch.long)

    def check_guidance(self, w: float | None, key: str = "w") -> None:
        """A guidance scale w (None or 1: none) this bundle's model can take, else ``InputError`` naming ``key`` (the
        argument, or a flag: ``--w``): guidance needs classes, and a kind that guides."""
        if w is None or w == 1.0:
            return
        from dtrain.samplers import check_guidance_scale

        check_guidance_scale(w, key)
        if self.num_classes == 0:
            raise InputError(f"{key}: guidance needs a class-conditional model; this bundle has no classes")
        if self._guide() is None:
            raise InputError(f"{key}: bundle kind {self.kind!r} does not support guidance")
        if reads_unlearned_null(self.info, self._guide()):
            raise InputError(f"{key}: {w}: {NO_NULL}; use 1")

    def _guide(self) -> Callable[[Any, float, int], Any] | None:
        return kind_guide(self.kind, str(self.path / INFO_FILE) if self.path else INFO_FILE)

    def guided(self, cond: Tensor | None, w: float, key: str = "w") -> Any:
        """The model, wrapped for classifier-free guidance with scale w when it applies (errors name ``key``)."""
        w_range = ((self.info.get("provenance") or {}).get("training") or {}).get("pd", {}).get("w_range")
        if self.kind == "guided_denoiser" and w_range and not w_range[0] <= w <= w_range[1]:
            import warnings

            warnings.warn(f"{key}: {w} is outside the guidance range {w_range} this student was distilled on",
                          stacklevel=3)
        if cond is None or w == 1.0:
            return self.model
        self.check_guidance(w, key)
        return self._guide()(self.model, w, self.num_classes)  # type: ignore[misc]

    def check_sampler(self, name: str | None = None, key: str = "sampler") -> str:
        """The sampler name (None: the bundle's default) if it is registered and this bundle's model can run it; else
        an ``InputError`` naming ``key`` (the argument, or a flag: ``--sampler``) and the samplers this bundle runs."""
        from dtrain.samplers import check_sampler

        name = name or self.info["sampler"]["name"]
        check_sampler(name, self.model, key, what=f"this bundle (kind {self.kind!r})")
        return name

    def check_nfe(self, nfe: int, sampler: str | None = None, key: str = "nfe") -> None:
        """``InputError`` naming ``key`` (the argument, or a flag: ``--nfe``) where ``sampler`` (None: the bundle's)
        has no grid of ``nfe`` evaluations on this bundle's schedule (e.g. more steps than a discrete schedule has)."""
        name = self.check_sampler(sampler)
        s = self.info["sampler"]
        _default_grid(self.schedule, name, check_count(nfe, key, "network evaluations per sample"),
                      s["spacing"], key)

    def times_grid(self, times: Sequence[float], key: str = "times") -> Tensor:
        """The explicit grid [t_max, *times, 0] (float64) of ``sample(times=...)``; ``InputError`` naming ``key``
        unless it decreases strictly."""
        t_max = float(self.schedule.t_max)
        vals = times.tolist() if isinstance(times, Tensor) else times
        if not isinstance(vals, Iterable) or isinstance(vals, str) or not all(_finite(v) for v in vals):
            raise InputError(f"{key}: must be a sequence of numbers inside (0, t_max = {t_max}), got {times!r:.80}")
        grid = torch.tensor([t_max, *(float(v) for v in vals), 0.0], dtype=torch.float64)
        if not bool((grid[1:] < grid[:-1]).all()):
            raise InputError(f"{key}: must decrease strictly inside (0, t_max = {t_max}), got {list(times)}")
        return grid

    @torch.no_grad()
    def sample(
        self,
        n: int,
        nfe: int | None = None,
        labels: Any = None,
        w: float | None = None,
        generator: torch.Generator | None = None,
        *,
        sampler: str | None = None,
        spacing: str | None = None,
        eta: float | None = None,
        clip: bool = True,
        callback: Callable[[dict[str, Any]], None] | None = None,
        times: Sequence[float] | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """n samples as float32 [n, *shape]; images are clamped to ``image.range`` (e.g. [-1, 1]) unless
        ``clip=False``. Unset arguments take the bundle's defaults (``dtrain.json`` ``sampler``). ``times``: the
        interior times of an explicit grid [t_max, *times, 0] (e.g. multistep consistency sampling at chosen times);
        it replaces ``nfe`` and ``spacing``. ``noise``: the standard normal z [n, *shape] of x_T = sigma(t_max) z
        (default: drawn from ``generator``), e.g. one draw for many batches, so that a deterministic sampler's
        samples do not depend on the batch split."""
        from dtrain.samplers import check_eta, run

        s = self.info["sampler"]
        n = check_count(n, "n", "the number of samples")
        name = self.check_sampler(sampler)
        nfe = None if nfe is None else check_count(nfe, "nfe", "network evaluations per sample")
        if spacing is not None and spacing not in SPACINGS:
            raise InputError(f"spacing: unknown spacing {spacing!r}; choose one of {list(SPACINGS)}")
        if isinstance(w, Tensor):  # one scale for the batch: a 1-element tensor reads as its number
            if w.numel() != 1:
                raise InputError(f"w: one guidance scale for the whole batch (per-sample scales are not supported), "
                                 f"got a tensor of shape {list(w.shape)}")
            w = float(w)
        if w is not None and not _finite(w):
            raise InputError(f"w: the guidance scale must be a finite number (1: no guidance), got {w!r:.80}")
        if callback is not None and not callable(callback):
            raise InputError(f"callback: must be a function of the step's info dict, or None; got "
                             f"{type(callback).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise InputError(f"generator: must be a torch.Generator (e.g. torch.Generator({str(self.device)!r})"
                             f".manual_seed(0)) or None, got {type(generator).__name__}")
        grid = None
        if times is not None:
            grid = self.times_grid(times)
        elif s["grid"] is not None and name == s["name"] and spacing is None:
            if nfe is None or nfe == grid_nfe(name, s["grid"]):
                grid = torch.tensor(s["grid"], dtype=torch.float64)
        if grid is None and s["grid"] is not None and self.kind in ("denoiser", "guided_denoiser"):
            warnings.warn(f"this bundle's network was distilled for its own {len(s['grid']) - 1}-step grid (sampler "
                          f"{s['name']!r}, nfe {s['nfe']}); sampler {name!r} at nfe {nfe or s['nfe']}"
                          f"{f', spacing {spacing!r}' if spacing else ''} runs on another grid, where it was not "
                          "trained", stacklevel=2)
        nfe = s["nfe"] if nfe is None else nfe
        opts = dict(s["options"]) if name == s["name"] else {}
        eta = eta if eta is not None else (s["eta"] if name == s["name"] else None)
        if eta is not None:
            opts["eta"] = check_eta(name, eta)
        self.check_guidance(w)
        cond = self.labels(labels, n)
        if cond is not None:
            cond = cond.to(self.device)
        model = self.guided(cond, float(s["guidance"] if w is None else w))
        if grid is None:
            grid = _default_grid(model.schedule, name, nfe, spacing or s["spacing"], "nfe")
        if noise is None:
            x = initial_noise(model.schedule, n, self.shape, generator, self.device)  # the sampler's schedule
        elif not isinstance(noise, Tensor) or tuple(noise.shape) != (n, *self.shape):
            got = list(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise InputError(f"noise: need a tensor of shape {[n, *self.shape]} (n samples of the bundle's shape), "
                             f"got {got}")
        else:
            x = (noise.float() * prior_std(model.schedule)).to(self.device)
        x = run(name, model, x, nfe, cond=cond, generator=generator, callback=callback, grid=grid, **opts)
        rng = self.info["image"]["range"]
        return x.clamp(*rng) if clip and rng is not None else x

    def to_uint8(self, x: Tensor) -> Tensor:
        """Samples in ``image.range`` -> uint8 in 0..255, same layout ([n, C, H, W])."""
        rng = self.info["image"]["range"]
        if rng is None:
            raise ValueError("to_uint8: this bundle's samples are not images (image.range is null)")
        lo, hi = rng
        if x.ndim and (bad := int((~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).sum())):
            warnings.warn(f"to_uint8: {bad} of {len(x)} samples are not finite (NaN / inf): the model diverged? "
                          f"Their NaNs become 0 and infinities the range's ends", stacklevel=2)
        return ((x.float().clamp(lo, hi) - lo) * (255.0 / (hi - lo))).round().to(torch.uint8)

    def __repr__(self) -> str:
        s = self.info["sampler"]
        return (f"Pipeline(kind={self.kind!r}, model={self.info['model']['name']!r}, shape={self.shape}, "
                f"classes={self.num_classes}, sampler={s['name']!r}@{s['nfe']}, path={str(self.path)!r})")


def _default_grid(schedule: Schedule, name: str, nfe: int, spacing: str | None, key: str) -> Tensor:
    """The grid sampler ``name`` runs for ``nfe`` evaluations; ``InputError`` naming ``key`` (and the most NFE a
    discrete schedule allows) where there is none."""
    from dtrain.samplers import SAMPLERS, default_grid, steps_for_nfe

    spec, steps = SAMPLERS.get(name, "sampler"), steps_for_nfe(name, nfe)
    try:
        return default_grid(name, schedule, nfe, spacing)
    except ValueError as e:
        T = schedule.discrete_steps
        most = f"; at most {spec.nfe(T)} for sampler {name!r} on this {T}-step schedule" if T and steps > T else ""
        raise InputError(f"{key}: {nfe}{f' with spacing {spacing!r}' if spacing else ''} gives no grid{most} ({e})"
                         ) from None


# ---------------------------------------------------------------------------------------------
# Writing and reading


def _weights_dtype_name(dtype: str | torch.dtype) -> str:
    aliases = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
               "fp16": "float16", "float16": "float16", torch.float32: "float32", torch.bfloat16: "bfloat16",
               torch.float16: "float16"}
    if dtype not in aliases:
        raise ValueError(f"dtype: must be fp32, bf16 or fp16, got {dtype!r}")
    return aliases[dtype]


def check_out(out: str | Path, overwrite: bool = False) -> Path:
    """A bundle directory that ``save_bundle`` may write: new or empty (with ``overwrite``, any directory)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out: {out} is a file, not a bundle directory" + (" (--force only writes into an "
                              "existing directory)" if overwrite else ""))
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out: {out} exists and is not an empty directory (pass overwrite / --force)")
    return check_writable(out, "--out", directory=True)


def save_bundle(
    out: str | Path,
    state: Mapping[str, Tensor],
    info: Mapping[str, Any],
    *,
    dtype: str | torch.dtype = "fp32",
    ema: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``state`` (floating tensors cast to ``dtype``) and ``info`` (all of dtrain.json but ``weights``
    and ``format``) as a bundle. Both files are written in full to temporary names first (``dtrain.fileio``), then
    renamed into place back to back, ``dtrain.json`` last: a crash while writing leaves the previous bundle (or none)
    whole; a kill between the two renames leaves new weights beside the old dtrain.json, which loading refuses by
    their sha256. A tensor that is not finite after the cast (fp16 overflows above 65504) is refused."""
    from safetensors.torch import save

    out = check_out(out, overwrite)
    dname = _weights_dtype_name(dtype)
    tensors = {k: (v.detach().to("cpu", DTYPES[dname]) if v.is_floating_point() else v.detach().cpu()).contiguous()
               for k, v in state.items()}
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            why = (f"overflows {dname} (values beyond its range; export fp32 or bf16)"
                   if bool(torch.isfinite(state[k]).all()) else "holds NaN / inf (a diverged model?)")
            raise BundleError(out / WEIGHTS_FILE, f"tensor {k!r}", why)
    full = {"format": FORMAT, **{k: v for k, v in info.items() if k not in ("format", "weights")},
            "weights": {"file": WEIGHTS_FILE, "sha256": "0" * 64, "dtype": dname, "ema": ema,
                        "num_params": sum(t.numel() for t in tensors.values() if t.is_floating_point())}}
    check_info(json.loads(json.dumps(full)), out / INFO_FILE)  # never write what the loader would reject
    # one metadata key: safetensors writes its metadata map in hash order, so two keys made equal weights hash
    # differently from file to file (dtrain.json carries the bundle format)
    data = save(tensors, metadata={"format": "pt"})
    full["weights"]["sha256"] = hashlib.sha256(data).hexdigest()
    with replacing(out / INFO_FILE, "w") as info_f, replacing(out / WEIGHTS_FILE) as weights_f:  # exit: weights first
        weights_f.write(data)
        info_f.write(json.dumps(full, indent=2, allow_nan=False) + "\n")
        info_f.flush()  # both files on disk before either rename
        os.fsync(info_f.fileno())
    return out


def _read_weights(path: Path, info: Mapping[str, Any], verify: bool) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise BundleError(file, "", "not found")
    data = file.read_bytes()
    if verify:
        digest = hashlib.sha256(data).hexdigest()
        if digest != info["weights"]["sha256"]:
            raise BundleError(file, "weights.sha256",
                              f"checksum mismatch: dtrain.json says {info['weights']['sha256']}, the file has {digest}")
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as e:
        raise BundleError(file, "", f"not a valid safetensors file: {e}") from None


def _load_state(net: nn.Module, state: Mapping[str, Tensor], file: str, stored: str | None = None) -> None:
    """Strict, shape-checked load with messages naming the tensor; floats are cast to the net's dtype."""
    own = net.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing:
        raise BundleError(file, f"tensor {missing[0]!r}", f"missing ({len(missing)} missing: {missing[:5]})")
    if extra:
        raise BundleError(file, f"tensor {extra[0]!r}", f"not in the network ({len(extra)} unexpected: {extra[:5]})")
    for k, v in own.items():
        t = state[k]
        if tuple(t.shape) != tuple(v.shape):
            raise BundleError(file, f"tensor {k!r}", f"shape {tuple(t.shape)}, the network built from "
                              f"dtrain.json 'model' needs {tuple(v.shape)}")
        if t.is_floating_point() != v.is_floating_point() or (stored and t.is_floating_point()
                                                             and t.dtype != DTYPES[stored]):
            raise BundleError(file, f"tensor {k!r}", f"dtype {t.dtype}, expected {stored or v.dtype}")
    net.load_state_dict({k: state[k].to(own[k].dtype) for k in own}, strict=True)


def assemble(info: dict[str, Any], state: Mapping[str, Tensor], *, file: str = WEIGHTS_FILE,
             device: torch.device | str = "cpu", path: Path | None = None) -> Pipeline:
    """Build the network from ``info['model']``, load ``state`` and wrap it per ``info['kind']``."""
    from dtrain.models import build_model
    from dtrain.samplers import SAMPLERS, supported, unmet

    jf = str(path / INFO_FILE) if path is not None else INFO_FILE
    kind = _kind(info["kind"], jf)
    try:
        schedule = make_schedule(**info["schedule"])
    except Exception as e:
        raise BundleError(jf, "schedule", f"cannot rebuild the schedule: {e}") from None
    if (why := terminal_snr_conflict(info["model"].get("param", "eps"), schedule)) is not None:
        raise BundleError(jf, "model.param", why)  # sampling starts at t_max, where x0 would be nan
    s = info["sampler"]
    if s["name"] not in SAMPLERS:
        raise BundleError(jf, "sampler.name", f"unknown sampler {s['name']!r}; choose one of {SAMPLERS.names()}")
    params = inspect.signature(SAMPLERS.get(s["name"]).fn).parameters
    has_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for opt in [*s["options"], *(["eta"] if s["eta"] is not None else [])]:
        if opt not in params and not has_kw:
            raise BundleError(jf, f"sampler.{'eta' if opt == 'eta' else 'options.' + opt}",
                              f"sampler {s['name']!r} takes no option {opt!r}")
    try:
        net = build_model(dict(info["model"]))
    except Exception as e:
        raise BundleError(jf, "model", f"cannot build the network: {type(e).__name__}: {e}") from None
    _load_state(net, state, file, info["weights"]["dtype"] if "weights" in info else None)
    net.to(device=device).eval().requires_grad_(False)
    try:
        model = kind.build(net, schedule, info["model"])
    except Exception as e:
        raise BundleError(jf, "model", f"cannot build the {info['kind']!r} model: {type(e).__name__}: {e}") from None
    if isinstance(model, nn.Module):
        model.eval().requires_grad_(False)
    if (need := unmet(s["name"], model)) is not None:
        raise BundleError(jf, "sampler.name", f"sampler {s['name']!r} needs {need}; a {info['kind']!r} bundle runs "
                          f"{supported(model)}")
    if s["grid"] is not None and s["grid"][0] > float(model.schedule.t_max):
        raise BundleError(jf, "sampler.grid", f"must lie inside (0, t_max = {float(model.schedule.t_max)}], "
                          f"starts at {s['grid'][0]}")
    if s["grid"] is None:
        try:
            _default_grid(model.schedule, s["name"], s["nfe"], s["spacing"], "sampler.nfe")
        except InputError as e:
            raise BundleError(jf, "sampler.nfe", str(e).removeprefix("sampler.nfe: ")) from None
    return Pipeline(model, net, info, path)


def load_bundle(path: str | Path, *, device: torch.device | str = "cpu", verify: bool = True) -> Pipeline:
    """Load a bundle directory: validate ``dtrain.json``, check the weights' sha256, rebuild, load strictly.

    The network is float32 (bf16 bundles upcast exactly); for mixed precision sample under
    ``torch.autocast(device_type, torch.bfloat16)`` (the sampler state stays float32). Never unpickles.
    """
    path, device = Path(path), check_device(device, "device")
    if not path.is_dir():
        raise BundleError(path, "", "not a bundle directory (expected dtrain.json and model.safetensors)")
    info = read_info(path)
    state = _read_weights(path, info, verify)
    n = sum(t.numel() for t in state.values() if t.is_floating_point())
    pipe = assemble(info, state, file=str(path / WEIGHTS_FILE), device=device, path=path)  # names a wrong tensor
    if n != info["weights"]["num_params"]:  # the sha256 covers the weights file, not dtrain.json
        raise BundleError(str(path / INFO_FILE), "weights.num_params", f"{info['weights']['num_params']}, but "
                          f"{path / WEIGHTS_FILE} holds {n} parameters (dtrain.json edited or from another export?)")
    return pipe

"""Recipes: OmegaConf YAML validated against dataclass schemas before any process starts.

A recipe is one flat YAML file (sections below, at most 3 levels). ``base:`` lists files (relative to the
recipe) merged first, in order; then the file itself; then ``key=value`` overrides from the command line.
``model``, ``method`` and ``data`` pick their schema by ``name``. Every error names the file (or the
command line), the dotted key and the reason, e.g.
``recipes/teacher/digits.yaml: model.chanels: unknown key (did you mean 'channels'?)``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

__all__ = [
    "RecipeError",
    "Recipe",
    "load_recipe",
    "register_schema",
    "register_validator",
    "SCHEMAS",
    "to_container",
    "recipe_hash",
]


class RecipeError(ValueError):
    """A recipe problem: ``file: key: reason``."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source, self.key, self.reason = source, key, reason
        super().__init__(f"{source}: {key}: {reason}" if key else f"{source}: {reason}")


# ---------------------------------------------------------------------------------------------
# Schemas. Keep every key a user can write here (or in a section registered below).


@dataclass
class ScheduleCfg:
    """``dtrain.diffusion.schedule``; unset options keep the schedule's defaults."""

    name: str = "ddpm"
    kind: str | None = None  # vp_discrete / ddpm: linear | cosine
    T: int | None = None
    beta_start: float | None = None
    beta_end: float | None = None
    zero_terminal_snr: bool | None = None
    beta_min: float | None = None  # vp_linear
    beta_max: float | None = None
    s: float | None = None  # vp_cosine
    sigma_min: float | None = None  # edm / ve
    sigma_max: float | None = None
    t_min: float | None = None
    t_max: float | None = None


@dataclass
class ModelBase:
    """What every network section shares: how its output is read (the denoiser)."""

    name: str = "unet"
    param: str = "eps"  # eps | x0 | v | velocity | score | edm
    sigma_data: float = 0.5
    input_scaling: bool = False
    clip_x0: float | None = None
    num_classes: int = 0  # > 0: class-conditional, label num_classes is the null (CFG) class


@dataclass
class UNetCfg(ModelBase):
    """ADM/DDPM-style UNet (``dtrain.models.unet``)."""

    name: str = "unet"
    in_channels: int = 3
    resolution: int = 32
    channels: int = 128
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 2])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    num_heads: int = 4
    dropout: float = 0.1


@dataclass
class MLPCfg(ModelBase):
    """Residual MLP for low-dimensional data (GMM tests)."""

    name: str = "mlp"
    param: str = "eps"
    sigma_data: float = 1.0
    dim: int = 2
    hidden: int = 256
    depth: int = 4


@dataclass
class DenoisingCfg:
    """The teacher's denoising loss (``dtrain.methods.denoising``)."""

    name: str = "denoising"
    target: str | None = None  # loss space: eps | x0 | v | velocity; default: the model's param
    time_sampling: str = "uniform"  # uniform_discrete | uniform | lognormal | logit_normal
    p_mean: float = -1.2
    p_std: float = 1.2
    weighting: str = "none"  # none | min_snr | edm | snr_trunc
    snr_gamma: float = 5.0
    cfg_dropout: float = 0.1  # probability of replacing the label with the null class


@dataclass
class DigitsDataCfg:
    """sklearn's 8x8 handwritten digits, in memory (real images, no download)."""

    name: str = "digits"
    batch_size: int = 128
    split: str = "train"  # train | test | all
    num_workers: int = 0
    flip: bool = False


@dataclass
class GMMDataCfg:
    """Samples of the 2-D test Gaussian mixture (``dtrain.data.synthetic.default_gmm``)."""

    name: str = "gmm"
    batch_size: int = 512
    num_samples: int = 65536


@dataclass
class OptimCfg:
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0 disables
    impl: str = "auto"  # auto | fused | foreach | plain


@dataclass
class EmaCfg:
    """Exponential moving averages kept in the checkpoint; ``stds`` adds EDM2's power EMA (arXiv 2312.02696)."""

    decays: list[float] = field(default_factory=lambda: [0.999])
    stds: list[float] = field(default_factory=list)
    start_step: int = 0
    every: int = 1


@dataclass
class TrainerCfg:
    max_steps: int = 1000
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: Any = "auto"  # int, list or "auto"
    num_nodes: int = 1
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed | bf16-true
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 50
    ckpt_every_n_steps: int = 1000
    sample_every_n_steps: int = 0  # 0: no sample grids during training
    deterministic: bool = False
    compile: bool = False
    channels_last: bool = False
    tf32: bool = True
    progress_bar: bool = True


@dataclass
class StrategyCfg:
    """``dtrain.dist.strategy``: how processes share the model."""

    name: str = "auto"  # auto | ddp | ddp_spawn | fsdp | fsdp2 | deepspeed
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    find_unused_parameters: bool = False


@dataclass
class SamplerCfg:
    """The default sampler: sample grids during training, bundles' default."""

    name: str = "ddim"
    nfe: int = 50
    spacing: str | None = None
    eta: float | None = None
    guidance: float = 1.0


@dataclass
class EvalCfg:
    samplers: list[str] = field(default_factory=list)  # e.g. ["ddim:1,2,4,8", "dpm++2m:4,8"]
    num: int = 1000
    batch_size: int = 250
    feature_extractor: str = "digits"
    feature_extractor_weights_path: str | None = None
    ref_stats: str | None = None
    every_n_steps: int = 0
    seed: int = 0


@dataclass
class LoggerCfg:
    project: str = "dtrain"
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = "offline"  # online | offline | disabled


@dataclass
class Recipe:
    name: str = "run"
    seed: int = 0
    out_dir: str = "runs"
    teacher: str | None = None  # a checkpoint or an inference bundle directory
    model: Any = None
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    method: Any = None
    data: Any = None
    optim: OptimCfg = field(default_factory=OptimCfg)
    ema: EmaCfg = field(default_factory=EmaCfg)
    trainer: TrainerCfg = field(default_factory=TrainerCfg)
    strategy: StrategyCfg = field(default_factory=StrategyCfg)
    sampler: SamplerCfg = field(default_factory=SamplerCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    logger: LoggerCfg = field(default_factory=LoggerCfg)


SCHEMAS: dict[str, dict[str, type]] = {
    "model": {"unet": UNetCfg, "mlp": MLPCfg},
    "method": {"denoising": DenoisingCfg},
    "data": {"digits": DigitsDataCfg, "gmm": GMMDataCfg},
}
DEFAULT_NAMES = {"model": "unet", "method": "denoising", "data": "digits"}

Validator = Callable[[DictConfig], "list[tuple[str, str]]"]
VALIDATORS: list[Validator] = []


def register_schema(section: str, name: str, cls: type) -> type:
    """Add a named schema for ``model``, ``method`` or ``data`` (a dataclass with a ``name`` field)."""
    if not is_dataclass(cls) or "name" not in {f.name for f in fields(cls)}:
        raise TypeError(f"schema for {section}.{name} must be a dataclass with a 'name' field")
    SCHEMAS[section][name] = cls
    return cls


def register_validator(fn: Validator) -> Validator:
    """Add a check run on the merged recipe: returns (key, reason) pairs for what is wrong."""
    VALIDATORS.append(fn)
    return fn


# ---------------------------------------------------------------------------------------------
# Loading


def _read_yaml(path: Path, source: str) -> DictConfig:
    if not path.is_file():
        raise RecipeError(source, "", f"recipe file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml errors carry line numbers
        raise RecipeError(source, "", f"not valid YAML: {e}") from None
    if not isinstance(cfg, DictConfig):
        raise RecipeError(source, "", "a recipe must be a mapping of sections")
    return cfg


def _sources(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, DictConfig]]:
    """(source name, raw config) for the file's bases, recursively, then the file itself."""
    path = path.resolve()
    if path in seen:
        raise RecipeError(str(path), "base", "circular base reference")
    cfg = _read_yaml(path, str(path))
    bases = cfg.pop("base", None)
    out: list[tuple[str, DictConfig]] = []
    if bases is not None:
        bases = [bases] if isinstance(bases, str) else bases
        if not isinstance(bases, ListConfig | list):
            raise RecipeError(str(path), "base", "must be a file path or a list of them")
        for b in bases:
            out += _sources((path.parent / str(b)), (*seen, path))
    return [*out, (_display(path), cfg)]


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _suggest(key: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _schema_for(section: str, name: Any, source: str) -> Any:
    table = SCHEMAS[section]
    if name not in table:
        raise RecipeError(source, f"{section}.name", f"unknown {section} {name!r}; choose one of {sorted(table)}"
                          + _suggest(str(name), list(table)))
    return table[name]()


def _key_error(e: OmegaConfBaseException, source: str) -> RecipeError:
    key = str(getattr(e, "full_key", "") or "")
    if isinstance(e, ConfigKeyError):
        obj = getattr(e, "object_type", None)
        leaf = key.rsplit(".", 1)[-1]
        choices = [f.name for f in fields(obj)] if obj is not None and is_dataclass(obj) else []
        schema = f" for {obj.__name__}" if obj is not None else ""
        return RecipeError(source, key, f"unknown key{schema}" + _suggest(leaf, choices))
    if isinstance(e, ValidationError):
        msg = str(e).splitlines()[0]
        return RecipeError(source, key, f"wrong type: {msg}")
    return RecipeError(source, key, str(e).splitlines()[0])


def load_recipe(path: str | Path | None, overrides: Sequence[str] = (), *, validate: bool = True) -> DictConfig:
    """Load, merge and validate a recipe; returns a resolved, read-only DictConfig."""
    sources = _sources(Path(path)) if path is not None else []
    try:
        cli = OmegaConf.from_dotlist(list(overrides))
    except Exception as e:
        raise RecipeError("command line", "", f"bad override: {e}") from None
    sources.append(("command line", cli))
    for src, cfg in sources:  # top-level keys first: clearest message for a misspelt section
        for k in cfg:
            if k not in {f.name for f in fields(Recipe)}:
                raise RecipeError(src, str(k), "unknown section" + _suggest(str(k), [f.name for f in fields(Recipe)]))
    raw = OmegaConf.merge(*(c for _, c in sources)) if sources else OmegaConf.create()
    sections = {}
    for sec, default in DEFAULT_NAMES.items():
        name = OmegaConf.select(raw, f"{sec}.name", default=default)
        src = next((s for s, c in reversed(sources) if OmegaConf.select(c, f"{sec}.name") is not None), "recipe")
        sections[sec] = _schema_for(sec, name, src)
    merged = OmegaConf.structured(Recipe(**sections))
    for src, cfg in sources:
        try:
            merged = OmegaConf.merge(merged, cfg)
        except OmegaConfBaseException as e:
            raise _key_error(e, src) from None
    try:
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as e:
        raise _key_error(e, sources[-1][0] if sources else "recipe") from None
    if validate:
        where = sources[-2][0] if len(sources) > 1 else "recipe"
        for fn in VALIDATORS:
            for key, reason in fn(merged):
                raise RecipeError(_source_of(key, sources, where), key, reason)
    OmegaConf.set_readonly(merged, True)
    return merged


def _source_of(key: str, sources: list[tuple[str, DictConfig]], default: str) -> str:
    """The last source that sets ``key`` (for error messages)."""
    for src, cfg in reversed(sources):
        if OmegaConf.select(cfg, key, default=None) is not None:
            return src
    return default


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Plain dict of a recipe (for W&B config, bundles and hashing)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def recipe_hash(cfg: DictConfig) -> str:
    """Content hash of a resolved recipe (sha256 of its canonical YAML)."""
    import hashlib

    return hashlib.sha256(OmegaConf.to_yaml(cfg, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Built-in checks (registry names and cross-field rules). More live beside the code they guard.


@register_validator
def _check_core(cfg: DictConfig) -> list[tuple[str, str]]:
    from dtrain.diffusion.param import PARAMS
    from dtrain.diffusion.schedule import SCHEDULES
    from dtrain.diffusion.timesteps import SPACINGS, TIME_SAMPLERS
    from dtrain.samplers import SAMPLERS

    bad: list[tuple[str, str]] = []
    if cfg.schedule.name not in SCHEDULES:
        bad.append(("schedule.name", f"unknown schedule {cfg.schedule.name!r}; choose one of {sorted(SCHEDULES)}"))
    if cfg.model.param not in PARAMS:
        bad.append(("model.param", f"unknown parameterization {cfg.model.param!r}; choose one of {list(PARAMS)}"))
    if cfg.sampler.name not in SAMPLERS:
        bad.append(("sampler.name", f"unknown sampler {cfg.sampler.name!r}; choose one of {SAMPLERS.names()}"))
    if cfg.sampler.spacing is not None and cfg.sampler.spacing not in SPACINGS:
        bad.append(("sampler.spacing", f"unknown spacing {cfg.sampler.spacing!r}; choose one of {list(SPACINGS)}"))
    if cfg.method.name == "denoising":
        m = cfg.method
        if m.time_sampling not in TIME_SAMPLERS:
            bad.append(("method.time_sampling", f"unknown {m.time_sampling!r}; choose one of {list(TIME_SAMPLERS)}"))
        if m.target is not None and m.target not in PARAMS:
            bad.append(("method.target", f"unknown {m.target!r}; choose one of {list(PARAMS)}"))
        if not 0.0 <= m.cfg_dropout < 1.0:
            bad.append(("method.cfg_dropout", "must be in [0, 1)"))
    if cfg.logger.mode not in ("online", "offline", "disabled"):
        bad.append(("logger.mode", f"must be online, offline or disabled, not {cfg.logger.mode!r}"))
    if cfg.optim.lr_schedule not in ("constant", "cosine"):
        bad.append(("optim.lr_schedule", f"must be constant or cosine, not {cfg.optim.lr_schedule!r}"))
    if cfg.optim.lr <= 0:
        bad.append(("optim.lr", "must be > 0"))
    if cfg.trainer.max_steps < 1:
        bad.append(("trainer.max_steps", "must be >= 1"))
    if any(not 0 < d < 1 for d in cfg.ema.decays):
        bad.append(("ema.decays", "each decay must be in (0, 1)"))
    if cfg.teacher is not None and not Path(cfg.teacher).exists():
        bad.append(("teacher", f"file or bundle not found: {cfg.teacher}"))
    return bad

"""Recipes: OmegaConf YAML validated against dataclass schemas before any process starts.

A recipe is one flat YAML file (sections below, at most 3 levels). ``base:`` lists files (relative to the
recipe) merged first, in order; then the file itself; then ``key=value`` overrides from the command line.
``model``, ``method`` and ``data`` pick their schema by ``name``. Every error names the file (or the
command line), the dotted key and the reason, e.g.
``recipes/teacher/digits.yaml: model.chanels: unknown key (did you mean 'channels'?)``.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, Node, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from dtrain.errors import InputError, first_line

__all__ = [
    "RecipeError",
    "Recipe",
    "load_recipe",
    "key_source",
    "memory_samples",
    "register_schema",
    "register_validator",
    "SCHEMAS",
    "to_container",
    "recipe_hash",
    "check_inputs",
]


class RecipeError(InputError):
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
    c_scale: float | None = None  # flow: the network sees c_noise = c_scale t (default 1000)


@dataclass
class ModelBase:
    """What every network section shares: how its output is read (the denoiser)."""

    name: str = "unet"
    param: str = "eps"  # eps | x0 | v | velocity | score | edm
    sigma_data: float = 0.5
    input_scaling: bool = False
    clip_x0: float | None = None
    num_classes: int = 0  # > 0: class-conditional, label num_classes is the null (CFG) class
    second_time: bool = False  # flow-map students (meanflow, ctm): the network also embeds the target time


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
    head_channels: int = 0  # > 0: heads of this width (ADM: 64) instead of num_heads
    dropout: float = 0.1
    scale_shift: bool = True  # ADM's scale-shift norm; False: DDPM's additive time embedding
    resblock_updown: bool = False  # ADM's residual up/downsampling blocks
    w_cond: bool = False  # guidance scale w as an input (guided distillation students, method pd)
    grad_checkpoint: bool = False  # activation checkpointing per stage: less memory, ~1/3 more compute


@dataclass
class MLPCfg(ModelBase):
    """Residual MLP for low-dimensional data (GMM tests)."""

    name: str = "mlp"
    param: str = "eps"
    sigma_data: float = 1.0
    dim: int = 2
    hidden: int = 256
    depth: int = 4
    dropout: float = 0.0
    w_cond: bool = False  # guidance scale w as an input (guided distillation students, method pd)


@dataclass
class DenoisingCfg:
    """The teacher's denoising loss (``dtrain.methods.denoising``)."""

    name: str = "denoising"
    target: str | None = None  # loss space: eps | x0 | v | velocity; default: the model's param
    time_sampling: str = "uniform"  # uniform_discrete | uniform | lognormal | logit_normal
    p_mean: float | None = None  # unset: lognormal -1.2, 1.2 (EDM); logit_normal 0, 1 (SD3)
    p_std: float | None = None
    weighting: str = "none"  # none | min_snr | edm | snr_trunc | snr_plus_one
    snr_gamma: float = 5.0
    cfg_dropout: float = 0.1  # probability of replacing the label with the null class


@dataclass
class ProgressiveCfg:
    """Progressive distillation (``dtrain.methods.progressive``, arXiv 2202.00512), guided PD (arXiv 2210.03142)."""

    name: str = "pd"
    start_steps: int = 64  # N0: the teacher's DDIM grid (sampler.spacing) that the first round halves
    end_steps: int = 4  # the last round's student steps; rounds N0/2, N0/4, ..., end_steps
    round_steps: list[int] = field(default_factory=list)  # optimizer steps per round ([]: max_steps split evenly)
    weighting: str = "snr_trunc"  # snr_trunc = max(SNR, 1) | snr_plus_one = SNR + 1 | none | min_snr | edm
    target: str | None = None  # loss space: eps | x0 | v | velocity; default: the student's param
    cfg_dropout: float = 0.0  # labels replaced by the null class for teacher and student alike
    teacher_ema: str = "auto"  # the teacher checkpoint's EMA copy: auto | raw | a decay / std
    teacher_clip: bool = False  # targets from the teacher's x0 clipped by its model.clip_x0 (false: raw x0)
    guidance: list[float] = field(default_factory=list)  # guided PD: [w_min, w_max] (needs model.w_cond)
    eval: bool = True  # evaluate each round's student at its steps (eval.ref_stats: FID; gmm data: sliced W1)


@dataclass
class ConsistencyCfg:
    """Consistency distillation / training (``dtrain.methods.consistency``; arXiv 2303.01469, 2310.14189).
    ``name``: cd | ct | ict; unset (null) fields take the variant's defaults (``consistency.DEFAULTS``)."""

    name: str = "cd"
    init: str | None = None  # teacher | scratch: the student's first weights (cd: teacher, ct / ict: scratch)
    teacher_ema: str = "auto"  # the teacher checkpoint's EMA copy: auto | raw | a decay / std
    teacher_clip: bool = False  # targets from the teacher's x0 clipped by its model.clip_x0 (false: raw x0)
    solver: str = "heun"  # cd: the teacher's ODE step between adjacent times, ddim | heun | dpm++2s
    guidance: float = 1.0  # cd: the teacher's CFG scale (1: none)
    curriculum: str | None = None  # N(k): fixed | ct | ict
    num_scales: int | None = None  # N of the fixed curriculum (18)
    scales_start: int | None = None  # s0 of the ct / ict curricula
    scales_end: int | None = None  # s1 of the ct / ict curricula
    spacing: str = "rho"  # the training grid from t_min to t_max (dtrain.diffusion.timesteps)
    rho: float = 7.0
    time_sampling: str | None = None  # intervals: uniform | lognormal (iCT)
    p_mean: float | None = None  # lognormal: ln(sigma / alpha) ~ N(p_mean, p_std^2) (-1.1, 2.0)
    p_std: float | None = None
    distance: str | None = None  # l2 | l1 | pseudo_huber | lpips
    huber_c: float | None = None  # pseudo-Huber c (default 0.00054 sqrt(dim))
    weighting: str | None = None  # none | ict: 1 / (s_{n+1} - s_n), s = sigma / alpha
    target_ema: float | None = None  # decay of theta^- (0: stop-grad theta, iCT; ct curriculum: mu0 of CM's mu(k))
    sample_times: list[float] = field(default_factory=list)  # interior times of the default multistep grid


@dataclass
class MeanFlowCfg:
    """MeanFlow (``dtrain.methods.flow_map``, arXiv 2505.13447): u(z, r, t) on the flow schedule, JVP target. With a
    ``teacher`` its velocity replaces eps - x0 in the target (distillation); without one it trains from scratch."""

    name: str = "meanflow"
    init: str = "scratch"  # scratch | teacher: the teacher's network (its model and schedule), read on the flow
    time_sampling: str = "logit_normal"  # (r, t): two draws, t the larger; uniform | logit_normal
    p_mean: float = -0.4  # logit-normal mean and std (the paper's ImageNet setting)
    p_std: float = 1.0
    ratio: float = 0.25  # fraction of samples with r != t (the rest is plain flow matching)
    r_zero: float = 0.0  # fraction of those with r = 0: the 1-step map trained directly
    r_p_mean: float | None = None  # r's own logit-normal law (unset: t's); t keeps its draw, r = min(t, r) for a
    # fraction ratio of samples (r = t where r's draw is above t)
    r_p_std: float | None = None
    adaptive_p: float = 1.0  # adaptive weight sg(1 / (d + c)^p); 0: plain squared error
    adaptive_c: float = 1.0e-3  # the paper's c, on the squared L2 norm (the sum over elements)
    cfg_omega: float = 1.0  # CFG in training: v~ = omega v + kappa u_c + (1 - omega - kappa) u_null (1: off)
    cfg_kappa: float = 0.0
    cfg_dropout: float = 0.1  # labels replaced by the null class
    jvp: str = "detached"  # detached: no-grad JVP + ordinary forward | fused: gradient through the JVP
    teacher_ema: str = "auto"  # the teacher checkpoint's EMA copy (when ``teacher`` is set)
    teacher_clip: bool = False  # targets from the teacher's x0 clipped by its model.clip_x0 (false: raw x0)


@dataclass
class CTMCfg:
    """Consistency trajectory model (``dtrain.methods.flow_map``, arXiv 2310.02279): G(x_t, t, s) distilled from the
    ``teacher`` on its schedule, the student initialised from it."""

    name: str = "ctm"
    init: str = "teacher"  # teacher | scratch
    teacher_ema: str = "auto"
    teacher_clip: bool = False  # targets from the teacher's x0 clipped by its model.clip_x0 (false: raw x0)
    time_sampling: str | None = None  # rho (t, s, u on the rho = 7 grid's scale) | a sample_t kind for t; null: rho
    # on edm and ve, uniform on VP and flow schedules
    p_mean: float | None = None  # unset: lognormal -1.2, 1.2 (EDM); logit_normal 0, 1 (SD3)
    p_std: float | None = None
    solver: str = "heun"  # the teacher's ODE step t -> u: ddim | heun | dpm++2s
    teacher_steps: int = 1  # uniform teacher steps from t to u
    max_span: float | None = None  # bound on t - u in schedule time (null: u anywhere in [s, t), the paper's)
    s_zero_prob: float = 0.0  # probability of s = 0 (a 1-step jump) instead of s ~ U[0, t]
    compare: str = "zero"  # zero: both ends carried to t = 0 by G_sg(., s, 0) (the paper's) | s: compare at s
    distance: str = "l2"  # l2 | l1 | pseudo_huber
    huber_c: float | None = None
    dsm_weight: float = 1.0  # weight of the denoising (DSM) loss on g(x_t, t, t)
    dsm_weighting: str = "none"  # its weighting (dtrain.methods.denoising.WEIGHTINGS)
    cfg_dropout: float = 0.0  # labels replaced by the null class (teacher and student alike)
    target_ema: float = 0.0  # decay of the target network theta^- (0: the student itself without gradient)


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
class PatchesDataCfg:
    """Random crops of sklearn's two sample photos (RGB, CIFAR-shaped at size 32), in memory."""

    name: str = "patches"
    batch_size: int = 128
    num_samples: int = 8192
    size: int = 32
    flip: bool = True
    num_workers: int = 0


@dataclass
class WdsDataCfg:
    """WebDataset shards (``dtrain.data.wds``), written by ``dtrain shards``; README "Data" says what is exact."""

    name: str = "wds"
    shards: str = ""  # brace pattern, "::"-joined patterns, pipe: commands, or an index.json
    index: str | None = None  # shard index json; default: index.json beside local shards
    batch_size: int = 128
    num_workers: int = 2
    shuffle: int = 1000  # shuffle block in samples (1: read order)
    shuffle_shards: bool = True  # a new seeded shard order every epoch
    resampled: bool = False  # draw shards with replacement: an endless stream cut into epochs of epoch_size
    epoch_size: int | None = None  # samples per epoch over all ranks; default: all samples
    drop_last: bool = True
    flip: bool = False
    labels: bool = True
    latents: bool = False  # pass the .npy latents through as batch["latent"]
    mp_context: str | None = None  # DataLoader workers: fork | spawn | forkserver; default: the platform's


@dataclass
class OptimCfg:
    name: str = "adamw"  # adamw | radam (RAdam, arXiv 1908.03265: CM's and iCT's optimizer; decoupled weight decay)
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
    global_batch_size: int | None = None  # samples per optimizer step over all ranks: sets data.batch_size at launch
    log_every_n_steps: int = 50
    ckpt_every_n_steps: int = 1000
    keep_checkpoints: int = 0  # > 0: keep only the newest k periodic checkpoints (last.ckpt is kept too)
    sample_every_n_steps: int = 0  # 0: no sample grids during training
    deterministic: bool = False
    compile: bool = False
    channels_last: bool = False
    tf32: bool = True
    progress_bar: bool = True
    cpu_threads: int = 0  # > 0: torch.set_num_threads (CPU runs on a shared machine: 1 avoids OpenMP stalls)
    nan_guard: bool = True  # skip optimizer steps with a non-finite loss or gradient (dtrain.lit.guard)
    max_bad_steps: int = 10  # that many skipped steps in a row stop the run


@dataclass
class StrategyCfg:
    """``dtrain.dist.strategy``: how processes share the model (README "Scaling out / SLURM")."""

    name: str = "auto"  # auto | ddp | ddp_spawn | fsdp | fsdp2 | deepspeed
    find_unused_parameters: bool = False  # ddp / ddp_spawn
    zero_stage: int = 2  # deepspeed: 1 | 2 | 3
    offload_optimizer: bool = False  # deepspeed: optimizer states and step on the CPU
    offload_params: bool = False  # deepspeed stage 3: parameters on the CPU
    loss_scale: float = 0.0  # deepspeed 16-mixed: 0 = dynamic loss scaling, > 0 = this static scale
    initial_scale_power: int = 16  # dynamic loss scaling starts at 2^power
    loss_scale_window: int = 1000  # steps without overflow before the scale doubles
    hysteresis: int = 2  # overflows tolerated before the scale halves
    min_loss_scale: float = 1.0
    sharding: str = "full"  # fsdp: full | grad_op | hybrid | none; fsdp2: full | grad_op
    sharded_checkpoint: bool = False  # fsdp / fsdp2: one file per rank (a directory) instead of one full file
    timeout_min: int = 30  # process-group timeout


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
    """FID against NFE (``dtrain.eval``): ``dtrain eval`` defaults and the every-N-steps training sweep."""

    samplers: list[str] = field(default_factory=list)  # e.g. ["ddim:1,2,4,8", "dpm++2m:4,8"]
    num: int = 1000
    batch_size: int = 250
    feature_extractor: str = "digits"  # digits | inception | raw (dtrain.eval.features.EXTRACTORS)
    feature_extractor_weights_path: str | None = None  # inception: a local weights file (never downloaded)
    ref_stats: str | None = None  # .npz from tools/fid_ref_stats.py
    every_n_steps: int = 0  # > 0: FID sweep during training (dtrain.lit.eval_callback)
    seed: int = 0
    guidance: float | None = None  # CFG scale of the sweep; None: sampler.guidance


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
    "method": {"denoising": DenoisingCfg, "pd": ProgressiveCfg, "cd": ConsistencyCfg, "ct": ConsistencyCfg,
               "ict": ConsistencyCfg, "meanflow": MeanFlowCfg, "ctm": CTMCfg},
    "data": {"digits": DigitsDataCfg, "gmm": GMMDataCfg, "patches": PatchesDataCfg, "wds": WdsDataCfg},
}
DEFAULT_NAMES = {"model": "unet", "method": "denoising", "data": "digits"}
SCALARS = ("name", "seed", "out_dir", "teacher")  # the top-level keys that are not sections

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
    if len(cfg) == 0:
        raise RecipeError(source, "", "the recipe file is empty (a recipe sets sections such as model, method and "
                          "data, or names a base: recipe)")
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
            if not (path.parent / str(b)).is_file():
                raise RecipeError(_display(path), "base", f"file not found: {path.parent / str(b)}")
            out += [s for s in _sources((path.parent / str(b)), (*seen, path)) if s[0] not in {o[0] for o in out}]
    return [*out, (_display(path), cfg)]  # a base reached twice (a diamond) is merged once, where first reached


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _suggest(key: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _switched(sources: list[tuple[str, DictConfig]], final: Mapping[str, Any], sections: Mapping[str, Any]
              ) -> list[tuple[str, DictConfig]]:
    """Sources with a section of another kind than the final one (``final``: section -> name; a digits base under
    ``data.name=wds``) reduced to the keys the final kind's schema (``sections``) has (``batch_size`` carries over,
    ``split`` does not), so a child recipe or the command line can switch a section's kind."""
    current: dict[str, Any] = dict(DEFAULT_NAMES)
    out = []
    for src, cfg in sources:
        for sec in DEFAULT_NAMES:
            part = cfg.get(sec) if sec in cfg else None
            if isinstance(part, DictConfig) and part.get("name") is not None:
                current[sec] = part.get("name")
            if isinstance(part, DictConfig) and current[sec] != final[sec]:
                keep = {f.name for f in fields(sections[sec])} - {"name"}
                cfg = OmegaConf.merge(cfg, {})  # a copy
                cfg[sec] = {k: v for k, v in part.items_ex(resolve=False) if k in keep}
        out.append((src, cfg))
    return out


def _schema_for(section: str, name: Any, source: str) -> Any:
    table = SCHEMAS[section]
    if not isinstance(name, str) or name not in table:
        raise RecipeError(source, f"{section}.name", f"unknown {section} {name!r}; choose one of {sorted(table)}"
                          + _suggest(str(name), list(table)))
    return table[name]()


def _container_clash(base: DictConfig, cfg: DictConfig, source: str) -> RecipeError:
    """The error for a list set as a mapping (``ema.decays.0=0.5``: element overrides) or the other way round."""
    found = _clash(base, cfg, "")
    if found is None:
        return RecipeError(source, "recipe", "a list and a mapping meet in the merge")
    key, here = found
    if isinstance(here, ListConfig):
        return RecipeError(source, key, f"a list: give the whole list, e.g. {key}="
                           f"{json.dumps(OmegaConf.to_container(here), separators=(',', ':'))} "
                           f"(single elements such as {key}.0=... cannot be set)")
    return RecipeError(source, key, "a mapping of keys, not a list")


def _clash(base: Any, cfg: DictConfig, prefix: str) -> tuple[str, Any] | None:
    """(dotted key, base's node) of the first key of ``cfg`` whose container kind differs from ``base``'s."""
    for k, v in cfg.items_ex(resolve=False):
        key, here = f"{prefix}{k}", base.get(k) if isinstance(base, DictConfig) else None
        if isinstance(here, ListConfig | DictConfig) and isinstance(v, ListConfig | DictConfig) \
                and isinstance(v, ListConfig) != isinstance(here, ListConfig):
            return key, here
        if isinstance(v, DictConfig) and (inner := _clash(here, v, f"{key}.")) is not None:
            return inner
    return None


def _key_error(e: OmegaConfBaseException, source: str) -> RecipeError:
    key = str(getattr(e, "full_key", "") or "")
    if isinstance(e, ConfigKeyError):
        obj = getattr(e, "object_type", None)
        leaf = key.rsplit(".", 1)[-1]
        choices = [f.name for f in fields(obj)] if obj is not None and is_dataclass(obj) else []
        schema = f" for {obj.__name__}" if obj is not None else ""
        hint = _suggest(leaf, choices) or (f"; valid keys: {choices}" if choices else "")
        return RecipeError(source, key, f"unknown key{schema}" + hint)
    if isinstance(e, ValidationError):
        obj, leaf = getattr(e, "object_type", None), key.rsplit(".", 1)[-1]
        want = next((f.type for f in fields(obj) if f.name == leaf), None) if obj and is_dataclass(obj) else None
        if want is None and obj is not None and "." not in key:  # a whole section set to a non-mapping
            want = obj.__name__
        if want is None:
            return RecipeError(source, key, f"wrong type: {str(e).splitlines()[0]}")
        want = want if isinstance(want, str) else getattr(want, "__name__", str(want))
        if want.endswith("Cfg"):  # a whole section
            want = f"a section of {want}'s keys"
        value = getattr(e, "value", None)
        if isinstance(value, Node) and not isinstance(value, (DictConfig, ListConfig)):
            value = value._value()
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value)
        got = "null" if value is None else repr(value)
        return RecipeError(source, key, f"wrong type: expected {want}, got {got}")
    return RecipeError(source, key, str(e).splitlines()[0])


def load_recipe(path: str | Path | None, overrides: Sequence[str] = (), *, validate: bool = True) -> DictConfig:
    """Load, merge and validate a recipe; returns a resolved, read-only DictConfig."""
    sources = _sources(Path(path)) if path is not None else []
    for item in overrides:
        if "=" not in item or "" in item.split("=", 1)[0].strip().split("."):  # no key, or an empty part of one
            raise RecipeError("command line", item, "an override is key=value with a dotted key, e.g. "
                              "trainer.max_steps=1000")
    for item in overrides:  # one at a time, so a parse error names its item
        try:
            OmegaConf.from_dotlist([item])
        except Exception as e:
            raise RecipeError("command line", item.split("=", 1)[0], f"bad override value in {item!r}: "
                              f"{first_line(e)}") from None
    cli = OmegaConf.from_dotlist(list(overrides))
    sources.append(("command line", cli))
    for src, cfg in sources:  # top-level keys first: clearest message for a misspelt section
        for k in cfg:
            if k not in {f.name for f in fields(Recipe)}:
                raise RecipeError(src, str(k), "unknown section" + _suggest(str(k), [f.name for f in fields(Recipe)]))
            if k in DEFAULT_NAMES and cfg[k] is None:
                raise RecipeError(src, str(k), "must be a mapping of keys, not null (an empty 'section:' line, or "
                                  "its body commented out, sets it to null)")
            if k not in SCALARS and cfg[k] is not None and not isinstance(cfg[k], DictConfig):
                got = OmegaConf.to_container(cfg[k]) if isinstance(cfg[k], ListConfig) else cfg[k]
                raise RecipeError(src, str(k), f"a section: a mapping of keys (set one with {k}.<key>=value on the "
                                  f"command line), not {got!r}")
    raw = OmegaConf.create()
    for src, cfg in sources:
        try:
            raw = OmegaConf.merge(raw, cfg)
        except TypeError:  # omegaconf's "Cannot merge incompatible container types": a list meets a mapping
            raise _container_clash(raw, cfg, src) from None
    sections, names = {}, {}
    for sec, default in DEFAULT_NAMES.items():
        names[sec] = OmegaConf.select(raw, f"{sec}.name", default=default)
        src = next((s for s, c in reversed(sources) if OmegaConf.select(c, f"{sec}.name") is not None), "recipe")
        sections[sec] = _schema_for(sec, names[sec], src)
    sources = _switched(sources, names, sections)
    merged = OmegaConf.structured(Recipe(**sections))
    for src, cfg in sources:
        try:
            merged = OmegaConf.merge(merged, cfg)
        except OmegaConfBaseException as e:
            raise _key_error(e, src) from None
        except TypeError:
            raise _container_clash(merged, cfg, src) from None
    try:
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as e:  # the source that wrote the ${...}
        key = str(getattr(e, "full_key", "") or "")
        raise _key_error(e, _source_of(key, sources, sources[-1][0] if sources else "recipe")) from None
    if validate:
        where = sources[-2][0] if len(sources) > 1 else "recipe"
        for fn in [*VALIDATORS, _check_schedule_build]:  # the schedule last: the other checks say more
            for key, reason in fn(merged):
                raise RecipeError(_source_of(key, sources, where, also=_keys_named(reason, merged)), key, reason)
    OmegaConf.set_readonly(merged, True)
    return merged


def _source_of(key: str, sources: list[tuple[str, DictConfig]], default: str, also: Sequence[str] = ()) -> str:
    """The last source that sets ``key`` or one of the keys ``also`` (those a cross-field error names: an
    ``end_steps`` set on the command line is where ``start_steps: 64 must be method.end_steps (128) x 2^k`` comes
    from), for error messages."""
    for src, cfg in reversed(sources):
        if any(_sets(cfg, k) for k in (key, *also)):
            return src
    return default


def _sets(cfg: DictConfig, key: str) -> bool:
    """Whether one source sets the dotted ``key`` (to anything but null), read unresolved: a ``${...}`` that only
    resolves against the other sources counts as set here."""
    node: Any = OmegaConf.to_container(cfg, resolve=False)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return node is not None


def _keys_named(reason: str, cfg: DictConfig) -> list[str]:
    """The recipe keys (``section.key``) an error message names."""
    return [k for k in dict.fromkeys(re.findall(r"\b([a-z_]+\.[a-z_0-9]+)\b", reason))
            if OmegaConf.select(cfg, k, default=None, throw_on_missing=False) is not None]


def key_source(key: str, source: str, overrides: Sequence[str] = ()) -> str:
    """Where a loaded recipe's ``key`` came from, for errors raised after ``load_recipe``: "command line" when one of
    ``overrides`` sets it, else ``source``."""
    return _source_of(key, [("command line", OmegaConf.from_dotlist(list(overrides)))], source)


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Plain dict of a recipe (for W&B config, bundles and hashing)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def recipe_hash(cfg: DictConfig) -> str:
    """Content hash of a resolved recipe (sha256 of its canonical YAML)."""
    import hashlib

    return hashlib.sha256(OmegaConf.to_yaml(cfg, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Built-in checks (registry names and cross-field rules). More live beside the code they guard.


def _check_schedule_build(cfg: DictConfig) -> list[tuple[str, str]]:
    """The schedule builds: its constructor checks its ranges (schedule.T, t_min / t_max, betas, ...) and options."""
    from dtrain.diffusion.schedule import SCHEDULES, schedule_from_config

    if cfg.schedule.name not in SCHEDULES:
        return []
    kind = cfg.schedule.kind or "linear"
    if (cfg.schedule.name in ("ddpm", "vp_discrete") and kind != "linear"
            and (cfg.schedule.beta_start is not None or cfg.schedule.beta_end is not None)):
        return [("schedule.beta_start / beta_end", f"the {kind} schedule sets its own betas (Nichol & Dhariwal 2021, "
                 f"arXiv 2102.09672); the range is kind linear's")]  # bundles may hold them: make_schedule ignores
    try:
        schedule_from_config(cfg.schedule)
    except (ValueError, TypeError) as e:
        where, _, reason = str(e).partition(": ")
        return [(where, reason) if where.startswith("schedule") and reason else ("schedule", str(e))]
    return []


INFINITE_OK = ("method.max_span",)  # float keys where .inf means "no bound"


@register_validator  # first: the other checks compare numbers, and NaN passes or fails them under other keys
def _check_finite(cfg: DictConfig) -> list[tuple[str, str]]:
    """Every float of a recipe is a finite number (range checks written as ``x < 0`` let NaN and inf through)."""

    def walk(node: Any, prefix: str) -> Iterator[tuple[str, float]]:
        items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else enumerate(node)
        for k, v in items:
            key = (f"{prefix}.{k}" if prefix else str(k)) if isinstance(node, DictConfig) else f"{prefix}[{k}]"
            if isinstance(v, DictConfig | ListConfig):
                yield from walk(v, key)
            elif isinstance(v, float) and not math.isfinite(v) and not (math.isinf(v) and key in INFINITE_OK):
                yield key, v

    return [(key, f"must be a finite number, got {v}") for key, v in walk(cfg, "")][:1]


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
        if m.p_std is not None and m.p_std <= 0:
            bad.append(("method.p_std", "must be > 0"))
    name = str(cfg.name)
    if not name.strip() or not name.strip(".") or any(c in name for c in "/\\"):  # blank, ".", "..", a path
        bad.append(("name", f"the run's folder under out_dir: a non-empty name without '/', got {cfg.name!r}"))
    if cfg.logger.mode not in ("online", "offline", "disabled"):
        bad.append(("logger.mode", f"must be online, offline or disabled, not {cfg.logger.mode!r}"))
    if cfg.optim.lr_schedule not in ("constant", "cosine"):
        bad.append(("optim.lr_schedule", f"must be constant or cosine, not {cfg.optim.lr_schedule!r}"))
    if not 0 < cfg.optim.lr < math.inf:
        bad.append(("optim.lr", f"must be > 0 and finite, got {cfg.optim.lr}"))
    if not 0 <= cfg.optim.weight_decay < math.inf:
        bad.append(("optim.weight_decay", f"must be >= 0 and finite, got {cfg.optim.weight_decay}"))
    if not 0 <= cfg.seed < 2**32:
        bad.append(("seed", f"must be in [0, 2^32) (numpy's seed range), got {cfg.seed}"))
    if not 0 <= cfg.eval.seed < 2**32:
        bad.append(("eval.seed", f"must be in [0, 2^32), got {cfg.eval.seed}"))
    if cfg.eval.guidance is not None and not 0 <= cfg.eval.guidance < math.inf:
        bad.append(("eval.guidance", f"must be >= 0 (1: no guidance), got {cfg.eval.guidance}"))
    if cfg.trainer.max_steps < 1:
        bad.append(("trainer.max_steps", "must be >= 1"))
    if any(not 0 < d < 1 for d in cfg.ema.decays):
        bad.append(("ema.decays", "each decay must be in (0, 1)"))
    from dtrain.models.ema import ema_tags

    tags = ema_tags(cfg.ema.decays, cfg.ema.stds)
    if len(set(tags)) < len(tags):
        bad.append(("ema", f"two entries of ema.decays / ema.stds name the same copy: {tags}; drop one"))
    if cfg.teacher is not None and not Path(cfg.teacher).exists():
        bad.append(("teacher", f"file or bundle not found: {cfg.teacher}"))
    elif cfg.teacher is not None and Path(cfg.teacher).is_file():
        import zipfile

        if not zipfile.is_zipfile(cfg.teacher):  # torch.save's zip; a truncated file loses its central directory
            bad.append(("teacher", f"{cfg.teacher} is not a readable torch checkpoint (truncated or not a checkpoint)"))
    elif cfg.teacher is not None:
        from dtrain.export.bundle import INFO_FILE
        from dtrain.export.checkpoint import is_bundle
        from dtrain.export.zero import is_sharded_checkpoint

        if not (is_bundle(cfg.teacher) or is_sharded_checkpoint(cfg.teacher)):
            bad.append(("teacher", f"{cfg.teacher} is a directory but neither an inference bundle (no {INFO_FILE}) "
                        f"nor a sharded (DeepSpeed / FSDP) checkpoint; give a checkpoint file, a bundle directory "
                        f"(dtrain export) or a sharded checkpoint directory"))
    return bad


OPTIMIZERS = ("adamw", "radam")  # optim.name (dtrain.lit.common.DiffusionModule.configure_optimizers)
PRECISIONS = ("64-true", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
# Sample shapes of the in-memory data (dtrain.data.memory): name -> (model name, {model field: value}, labels)
_DATA_SHAPES: dict[str, Callable[[DictConfig], tuple[str, dict[str, int], int]]] = {
    "digits": lambda d: ("unet", {"in_channels": 1, "resolution": 8}, 10),
    "patches": lambda d: ("unet", {"in_channels": 3, "resolution": d.size}, 0),
    "gmm": lambda d: ("mlp", {"dim": 2}, 3),
}


def sample_shape(model: Any) -> tuple[int, ...]:
    """The shape of one sample of a recipe's ``model`` section: ``(dim,)`` for an MLP, else (C, H, W)."""
    if model["name"] == "mlp":
        return (int(model["dim"]),)
    return int(model["in_channels"]), int(model["resolution"]), int(model["resolution"])


DIGITS_SPLITS = {"train": 1347, "test": 450, "all": 1797}  # samples of each split (dtrain.data.digits)
PHOTO_SIZE = 427  # the smaller side of sklearn's sample photos, the largest patch (dtrain.data.memory.photo_patches)
MEMORY_BYTES = 8 << 30  # the most float32 pixels in-memory data may hold


def memory_samples(data: Any) -> int | None:
    """The number of samples of in-memory data (digits: its split; gmm, patches: ``num_samples``), else None."""
    if data.name not in _DATA_SHAPES:
        return None
    return DIGITS_SPLITS.get(data.split) if data.name == "digits" else data.get("num_samples")


@register_validator
def _check_memory_data(cfg: DictConfig) -> list[tuple[str, str]]:
    """In-memory data (digits, gmm, patches): split, sizes and worker counts, before the model is compared."""
    d, bad = cfg.data, []
    if d.name not in _DATA_SHAPES:
        return bad
    if d.name == "digits" and d.split not in DIGITS_SPLITS:
        return [("data.split", f"must be one of {list(DIGITS_SPLITS)}, not {d.split!r}")]
    if d.name == "patches" and not 1 <= d.size <= PHOTO_SIZE:
        return [("data.size", f"must be in [1, {PHOTO_SIZE}] (the patches are crops of {PHOTO_SIZE}x640 photos), "
                 f"not {d.size}")]
    if "num_samples" in d and d.num_samples < 1:
        return [("data.num_samples", f"must be >= 1, not {d.num_samples}")]
    if "num_workers" in d and d.num_workers < 0:
        return [("data.num_workers", f"must be >= 0 (0: load in the main process), not {d.num_workers}")]
    n = int(memory_samples(d))  # type: ignore[arg-type]
    if d.name == "patches" and n * 3 * d.size**2 * 4 > MEMORY_BYTES:
        bad.append(("data.num_samples", f"{n} patches of {d.size}x{d.size} take "
                    f"{n * 3 * d.size**2 * 4 / 2**30:.0f} GiB; use at most {MEMORY_BYTES // (12 * d.size**2)}"))
    if d.batch_size > n and cfg.trainer.get("global_batch_size") is None:  # else fit derives it (resolve_batch)
        bad.append(("data.batch_size", f"{d.batch_size} is more than the {n} samples of data {d.name!r}"
                    + (f" (split {d.split!r})" if d.name == "digits" else "") + f"; use at most {n}"))
    return bad


@register_validator
def _check_training(cfg: DictConfig) -> list[tuple[str, str]]:
    """Teacher training: network geometry, model vs data, loss weighting, EMA, optimizer and trainer fields."""
    from dtrain.methods.denoising import WEIGHTINGS
    from dtrain.models.ema import gamma_to_std

    bad: list[tuple[str, str]] = []
    m, d = cfg.model, cfg.data
    if m.name == "unet":
        levels = len(m.channel_mult)
        if levels == 0 or any(c < 1 for c in m.channel_mult):
            bad.append(("model.channel_mult", "must be a non-empty list of positive ints"))
        elif m.resolution % 2 ** (levels - 1):
            bad.append(("model.resolution", f"{m.resolution} is not divisible by 2^{levels - 1} "
                        f"({levels} levels in model.channel_mult)"))
        else:
            reached = [m.resolution // 2**i for i in range(levels)]
            if extra := [r for r in m.attn_resolutions if r not in reached]:
                bad.append(("model.attn_resolutions", f"{extra} not among the resolutions {reached}"))
            from dtrain.models.unet import head_split_error

            if split := head_split_error(m.channels, m.channel_mult, m.num_heads, m.head_channels, m.resolution,
                                         list(m.attn_resolutions)):
                bad.append(split)
        if m.channels % 2:
            bad.append(("model.channels", f"must be even (its sinusoidal time features are sin / cos pairs), got "
                        f"{m.channels}"))
        for key in ("channels", "num_res_blocks"):
            if m[key] < 1:
                bad.append((f"model.{key}", "must be >= 1"))
    elif m.name == "mlp":
        if m.hidden < 1 or min(m.hidden, 128) % 2:
            bad.append(("model.hidden", f"must be >= 1 and even below 128 (min(hidden, 128) sinusoidal time features, "
                        f"sin / cos pairs), got {m.hidden}"))
        if m.depth < 0:
            bad.append(("model.depth", f"must be >= 0 (residual blocks), got {m.depth}"))
    if "dropout" in m and not 0 <= m.dropout < 1:
        bad.append(("model.dropout", f"must be in [0, 1), got {m.dropout}"))
    if not m.sigma_data > 0:
        bad.append(("model.sigma_data", f"must be > 0 (the data's standard deviation), got {m.sigma_data}"))
    if m.clip_x0 is not None and not m.clip_x0 > 0:
        bad.append(("model.clip_x0", f"must be null (no clipping) or > 0 (x0 clamped to [-clip_x0, clip_x0]), got "
                    f"{m.clip_x0}"))
    if d.name in _DATA_SHAPES:
        want_model, fields_, labels = _DATA_SHAPES[d.name](d)
        if m.name != want_model:
            bad.append(("model.name", f"data {d.name!r} needs model {want_model!r}, not {m.name!r}"))
        else:
            for k, v in fields_.items():
                if m[k] != v:
                    bad.append((f"model.{k}", f"must be {v} for data {d.name!r}, not {m[k]}"))
        if m.num_classes not in (0, labels):
            bad.append(("model.num_classes", f"data {d.name!r} has {labels or 'no'} labels: use 0"
                        + (f" or {labels}" if labels else "")))
        if d.batch_size < 1:
            bad.append(("data.batch_size", "must be >= 1"))
    if cfg.method.name == "denoising":
        if not 0 < cfg.method.snr_gamma < math.inf:  # a clamp at <= 0 gives weights <= 0: no learning, or ascent
            bad.append(("method.snr_gamma", f"must be > 0 and finite, got {cfg.method.snr_gamma}"))
        if cfg.method.weighting not in WEIGHTINGS:
            bad.append(("method.weighting", f"unknown {cfg.method.weighting!r}; choose one of {list(WEIGHTINGS)}"))
        # (an eps or score network on such a schedule: _check_terminal_snr names the network instead)
        if cfg.method.weighting in WEIGHTINGS and cfg.method.weighting != "none" and m.param not in ("eps", "score"):
            import torch

            from dtrain.diffusion.schedule import schedule_from_config
            from dtrain.methods.denoising import loss_weight

            target = cfg.method.get("target") or m.get("param")
            try:
                s = schedule_from_config(cfg.schedule)
                w = loss_weight(cfg.method.weighting, s, torch.tensor([s.t_max], dtype=torch.float64), target,
                                snr_gamma=cfg.method.snr_gamma, sigma_data=m.get("sigma_data", 0.5))
            except Exception:  # a bad schedule or target is reported by its own check
                w = None
            if w is not None and not bool(torch.isfinite(w).all()):
                bad.append(("method.weighting", f"{cfg.method.weighting!r} on the {target!r} target is infinite at the "
                            f"schedule's t_max (alpha = 0 there): use min_snr or none, or a v / x0 target "
                            f"(method.target)"))
        if cfg.method.time_sampling == "uniform_discrete" and cfg.schedule.name not in ("ddpm", "vp_discrete"):
            bad.append(("method.time_sampling", f"'uniform_discrete' needs a discrete schedule (ddpm, vp_discrete), "
                        f"not {cfg.schedule.name!r}"))
    if bad_std := [s for s in cfg.ema.stds if not 0 < s < gamma_to_std(0.0)]:
        bad.append(("ema.stds", f"{bad_std}: each sigma_rel must be in (0, {gamma_to_std(0.0):.4f})"))
    if cfg.ema.every < 1:
        bad.append(("ema.every", "must be >= 1"))
    if cfg.optim.impl not in ("auto", "fused", "foreach", "plain"):
        bad.append(("optim.impl", f"must be auto, fused, foreach or plain, not {cfg.optim.impl!r}"))
    if cfg.optim.name not in OPTIMIZERS:
        bad.append(("optim.name", f"unknown optimizer {cfg.optim.name!r}; choose one of {list(OPTIMIZERS)}"))
    elif cfg.optim.name == "radam" and cfg.optim.impl == "fused":
        bad.append(("optim.impl", "torch's RAdam has no fused kernel: use auto (foreach), foreach or plain"))
    if cfg.optim.warmup_steps < 0 or not 0 <= cfg.optim.grad_clip < math.inf or not 0 <= cfg.optim.min_lr_ratio <= 1:
        bad.append(("optim", "need warmup_steps >= 0, grad_clip >= 0 (finite) and min_lr_ratio in [0, 1]"))
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        bad.append(("optim.betas", f"need two numbers in [0, 1), got {list(cfg.optim.betas)}"))
    if not cfg.optim.eps > 0:
        bad.append(("optim.eps", f"must be > 0, got {cfg.optim.eps}"))
    t = cfg.trainer
    if t.accelerator not in ("auto", "cpu", "gpu", "cuda", "mps"):
        bad.append(("trainer.accelerator", f"must be auto, cpu, gpu, cuda or mps, not {t.accelerator!r}"))
    if t.num_nodes < 1:
        bad.append(("trainer.num_nodes", f"must be >= 1, got {t.num_nodes}"))
    dev = t.devices
    if not (dev in ("auto", "-1") or (isinstance(dev, int) and not isinstance(dev, bool) and (dev >= 1 or dev == -1))
            or (isinstance(dev, str) and all(p.strip().isascii() and p.strip().isdecimal() for p in dev.split(",")
                                             if p.strip())
                and dev.strip(", ") and ("," in dev or int(dev) >= 1))  # "2": a count; "0,1" / "0,": ids
            or (isinstance(dev, ListConfig | list) and len(dev) > 0
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in dev))):
        bad.append(("trainer.devices", f"must be 'auto', a count >= 1 (-1: all), device ids [0, 1] or '0,1', "
                    f"got {dev!r}"))
    elif t.accelerator == "cpu" and (isinstance(dev, ListConfig | list) or (isinstance(dev, str) and "," in dev)):
        bad.append(("trainer.devices", f"{dev!r} are GPU ids; with trainer.accelerator=cpu give a count of "
                    "processes (e.g. 2)"))
    if cfg.sampler.nfe < 1:
        bad.append(("sampler.nfe", "must be >= 1 (network evaluations per sample)"))
    if cfg.sampler.eta is not None and not 0 <= cfg.sampler.eta <= 1:
        bad.append(("sampler.eta", f"must be null or in [0, 1], got {cfg.sampler.eta}"))
    if t.precision not in PRECISIONS:
        bad.append(("trainer.precision", f"must be one of {list(PRECISIONS)}, not {t.precision!r}"))
    for key in ("accumulate_grad_batches", "log_every_n_steps"):
        if t[key] < 1:
            bad.append((f"trainer.{key}", "must be >= 1"))
    for key in ("ckpt_every_n_steps", "sample_every_n_steps", "cpu_threads"):
        if t[key] < 0:
            bad.append((f"trainer.{key}", "must be >= 0 (0: off)"))
    if t.global_batch_size is not None and t.global_batch_size < 1:
        bad.append(("trainer.global_batch_size", "must be null (data.batch_size is per rank) or >= 1"))
    if t.keep_checkpoints < 0:
        bad.append(("trainer.keep_checkpoints", "must be >= 0 (0: keep every periodic checkpoint)"))
    if t.max_bad_steps < 1:
        bad.append(("trainer.max_bad_steps", "must be >= 1 (bad steps in a row that stop the run; "
                    "trainer.nan_guard=false turns the guard off)"))
    if cfg.sampler.guidance < 0:
        bad.append(("sampler.guidance", "must be >= 0 (1: no guidance)"))
    elif cfg.sampler.guidance != 1.0 and not cfg.model.get("num_classes", 0):
        bad.append(("sampler.guidance", f"{cfg.sampler.guidance} guides by class labels, which an unconditional "
                    "model (model.num_classes: 0) has none of; use 1.0"))
    from dtrain.diffusion.guidance import NO_NULL, learned_null

    if not cfg.model.get("w_cond", False) and learned_null(to_container(cfg)) is False:
        for key, w in (("sampler.guidance", cfg.sampler.guidance), ("eval.guidance", cfg.eval.guidance)):
            if w is not None and w != 1.0:
                bad.append((key, f"{w}: {NO_NULL}: use 1.0, or train with method.cfg_dropout > 0 (e.g. 0.1)"))
    return bad


@register_validator
def _check_eval(cfg: DictConfig) -> list[tuple[str, str]]:
    """The ``eval`` section: sampler specs, extractor name, sizes; a training sweep needs samplers and reference
    statistics (their files are checked at launch: ``check_inputs``)."""
    from dtrain.eval.features import BUILTIN_REFS, EXTRACTORS
    from dtrain.eval.sweep import parse_specs

    e, bad = cfg.eval, []
    try:
        parse_specs(list(e.samplers))
    except ValueError as err:
        bad.append(("eval.samplers", str(err).split(": ", 1)[-1]))
    if e.feature_extractor not in EXTRACTORS:
        bad.append(("eval.feature_extractor", f"unknown {e.feature_extractor!r}; choose one of {EXTRACTORS.names()}"))
    if e.num < 2 or e.batch_size < 1 or e.every_n_steps < 0:
        bad.append(("eval", "need num >= 2, batch_size >= 1 and every_n_steps >= 0"))
    if e.every_n_steps > 0:
        if not e.samplers:
            bad.append(("eval.samplers", "eval.every_n_steps > 0 needs at least one 'sampler:nfe,...' entry"))
        if e.ref_stats is None:
            bad.append(("eval.ref_stats", f"eval.every_n_steps > 0 needs reference statistics: a file from "
                        f"tools/fid_ref_stats.py, or one of {list(BUILTIN_REFS)}"))
    return bad


@register_validator
def _check_strategy(cfg: DictConfig) -> list[tuple[str, str]]:
    """The ``strategy`` section against trainer, precision and sampling (``dtrain.dist.strategy``)."""
    from dtrain.dist.strategy import check_strategy

    return check_strategy(cfg)


@register_validator
def _check_wds(cfg: DictConfig) -> list[tuple[str, str]]:
    """WebDataset fields; with a local index, the model must match its image size, channels and classes."""
    d, m, bad = cfg.data, cfg.model, []
    if d.name != "wds":
        return bad
    if not d.shards:
        return [("data.shards", "required: a shard pattern (data/train-{000000..000009}.tar) or an index.json")]
    if d.batch_size < 1 or d.num_workers < 0 or d.shuffle < 1 or (d.epoch_size is not None and d.epoch_size < 1):
        bad.append(("data", "need batch_size >= 1, num_workers >= 0, shuffle >= 1 and epoch_size >= 1"))
    if d.mp_context not in (None, "fork", "spawn", "forkserver"):
        bad.append(("data.mp_context", f"must be fork, spawn or forkserver, not {d.mp_context!r}"))
    if m.num_classes and not d.labels:
        bad.append(("data.labels", "a class-conditional model (model.num_classes > 0) needs labels"))
    from dtrain.data.shards import find_index, is_remote, read_index

    index = find_index(d.shards, d.index)
    if index is None or is_remote(index):
        return bad
    try:
        info = read_index(index)
    except (OSError, ValueError) as e:
        return [*bad, ("data.index" if d.index else "data.shards", str(e))]
    (h, w), c, k = info["image_size"], info["channels"], info.get("num_classes", 0)
    bad += _image_fit(m, (h, w), c, index)
    if m.num_classes not in (0, k):
        bad.append(("model.num_classes", f"{index} has {k or 'no'} classes: use 0" + (f" or {k}" if k else "")))
    n = int(d.epoch_size or sum(int(s["count"]) for s in info["shards"]))  # an epoch, over all ranks
    if d.drop_last and d.batch_size > n:  # (per rank it is n // ranks: the launch checks that)
        bad.append(("data.batch_size", f"{d.batch_size} is more than the {n} samples an epoch of {index} holds"))
    return bad


def _image_fit(m: DictConfig, size: Sequence[int], channels: int, where: str) -> list[tuple[str, str]]:
    """A UNet's resolution and in_channels against the images of ``where`` (an index or a shard)."""
    (h, w), bad = size, []
    if m.name == "unet":
        if h != w or m.resolution != h:
            bad.append(("model.resolution", f"must be {h} for the {h}x{w} images of {where}, not {m.resolution}"))
        if m.in_channels != channels:
            bad.append(("model.in_channels", f"must be {channels} for the images of {where}, not {m.in_channels}"))
    return bad


@register_validator
def _check_pd(cfg: DictConfig) -> list[tuple[str, str]]:
    """Progressive distillation: a round plan that fits trainer.max_steps, guidance vs model.w_cond, the grid.
    (``teacher`` may stay unset in a recipe file: ``dtrain fit ... teacher=<path>`` gives it; ``fit`` checks it.)"""
    from dtrain.diffusion.param import PARAMS
    from dtrain.methods.denoising import WEIGHTINGS

    m, bad = cfg.method, []
    if m.name != "pd":
        return [("model.w_cond", "w-conditioned networks are trained by guided progressive distillation "
                 "(method.name: pd with method.guidance)")] if cfg.model.get("w_cond", False) else []
    from dtrain.diffusion.schedule import schedule_from_config
    from dtrain.diffusion.timesteps import make_grid
    from dtrain.methods.progressive import round_plan

    if m.weighting not in WEIGHTINGS:
        bad.append(("method.weighting", f"unknown {m.weighting!r}; choose one of {list(WEIGHTINGS)}"))
    if m.target is not None and m.target not in PARAMS:
        bad.append(("method.target", f"unknown {m.target!r}; choose one of {list(PARAMS)}"))
    if not 0.0 <= m.cfg_dropout < 1.0:
        bad.append(("method.cfg_dropout", "must be in [0, 1)"))
    if m.guidance:
        if len(m.guidance) != 2 or not 0 <= m.guidance[0] <= m.guidance[1]:
            bad.append(("method.guidance", f"must be [w_min, w_max] with 0 <= w_min <= w_max, got {list(m.guidance)}"))
        elif not m.guidance[0] <= cfg.sampler.guidance <= m.guidance[1]:
            bad.append(("sampler.guidance", f"{cfg.sampler.guidance} is outside the trained range method.guidance "
                        f"{list(m.guidance)}"))
        if not cfg.model.get("w_cond", False):
            bad.append(("model.w_cond", "guided distillation (method.guidance) needs a w-conditioned student: true"))
        if cfg.model.num_classes == 0:
            bad.append(("method.guidance", "guided distillation needs a class-conditional model (model.num_classes)"))
    elif cfg.model.get("w_cond", False):
        bad.append(("model.w_cond", "a w-conditioned student needs method.guidance [w_min, w_max]"))
    try:
        round_plan(m, cfg.trainer.max_steps)
    except ValueError as e:
        key, _, reason = str(e).partition(": ")
        bad.append((key, reason))
    if cfg.ema.stds:
        bad.append(("ema.stds", "power EMAs span the whole run, but each round restarts the student's EMA: use "
                    "ema.decays"))
    try:
        make_grid(schedule_from_config(cfg.schedule), m.start_steps, cfg.sampler.spacing)
    except (ValueError, KeyError, TypeError) as e:
        bad.append(("sampler.spacing", f"the {m.start_steps}-step teacher grid cannot be built: {e}"))
    return bad


@register_validator
def _check_consistency(cfg: DictConfig) -> list[tuple[str, str]]:
    """Consistency models: option names, ranges, the training grid, sampling times inside the schedule. (A missing
    ``teacher`` fails in ``fit``, so recipes can leave it to the command line.)"""
    from dtrain.methods import consistency as C

    if cfg.method.name not in C.VARIANTS:
        return []
    m, bad = C.resolve(cfg.method), []
    for key, choices in (("init", ("teacher", "scratch")), ("solver", C.SOLVERS), ("curriculum", C.CURRICULA),
                         ("time_sampling", C.INTERVAL_SAMPLING), ("distance", C.DISTANCES),
                         ("weighting", C.WEIGHTINGS), ("spacing", C.GRID_SPACINGS)):
        if m[key] not in choices:
            bad.append((f"method.{key}", f"unknown {m[key]!r}; choose one of {list(choices)}"))
    if m["name"] != "cd" and m["guidance"] != 1.0:
        bad.append(("method.guidance", "only consistency distillation (cd) has a teacher to guide"))
    if m["guidance"] < 0 or (m["guidance"] != 1.0 and cfg.model.num_classes == 0):
        bad.append(("method.guidance", "must be >= 0, and != 1 only for a class-conditional model"))
    if not 0.0 <= m["target_ema"] < 1.0:
        bad.append(("method.target_ema", "must be in [0, 1) (0: the stop-grad student itself)"))
    if m["num_scales"] < 2 or m["scales_start"] < 1 or m["scales_end"] < m["scales_start"]:
        bad.append(("method.num_scales", "need num_scales >= 2 and 1 <= scales_start <= scales_end"))
    if m["p_std"] <= 0 or (m["huber_c"] is not None and m["huber_c"] <= 0):
        bad.append(("method.p_std", "p_std and huber_c must be > 0"))
    if bad:
        return bad
    # the grid's own keys are the recipe's method keys; a curriculum too short for its spacing is the spacing's fault
    bad = _loss_errors(lambda sch: C.ConsistencyLoss.from_config(cfg.method, sch, total_steps=cfg.trainer.max_steps),
                       cfg, fallback="method.spacing",
                       rename={"grid.rho": "method.rho", "method.num_scales": "method.spacing"})
    if bad:
        return bad
    from dtrain.diffusion.schedule import schedule_from_config

    try:
        sch = schedule_from_config(cfg.schedule)
    except Exception:  # a bad schedule is reported by its own check
        return bad
    for key in ("sampler.guidance", "eval.guidance"):
        w = OmegaConf.select(cfg, key)
        if w is not None and w != 1.0:
            bad.append((key, f"{w}: a consistency student trains no null class (no label dropout) to guide with; "
                        f"sample it at 1.0 (consistency distillation bakes a teacher's guidance in: method.guidance)"))
    import itertools

    ts = list(m["sample_times"])
    if not all(sch.t_min < t < sch.t_max for t in ts) or any(a <= b for a, b in itertools.pairwise(ts)):
        bad.append(("method.sample_times", f"must decrease strictly inside ({sch.t_min}, {sch.t_max}), got {ts}"))
    return bad


@register_validator
def _check_flow_map(cfg: DictConfig) -> list[tuple[str, str]]:
    """MeanFlow and CTM: the two-time network, MeanFlow's flow schedule and velocity output, option names and ranges;
    the few-step flow-map samplers only for these students. (CTM's missing ``teacher`` fails in ``fit``.)"""
    m, bad = cfg.method, []
    if m.name not in ("meanflow", "ctm"):
        if cfg.sampler.name in ("flowmap", "flowmap_gamma"):
            bad.append(("sampler.name", f"{cfg.sampler.name!r} drives flow-map students (method meanflow or ctm)"))
        return bad
    from dtrain.methods import flow_map as F

    if not cfg.model.second_time:
        bad.append(("model.second_time", f"must be true for method {m.name!r} (the network embeds the target time)"))
    if m.init not in ("teacher", "scratch"):
        bad.append(("method.init", f"unknown {m.init!r}; choose one of ['teacher', 'scratch']"))
    if m.name == "meanflow":
        if cfg.schedule.name != "flow" and m.init == "scratch":
            bad.append(("schedule.name", f"meanflow runs on the flow schedule (alpha = 1 - t, sigma = t), not "
                        f"{cfg.schedule.name!r}; a teacher on another schedule is read through it, and with "
                        f"method.init: teacher the student keeps the teacher's network and schedule"))
        if cfg.schedule.name == "flow" and cfg.model.param != "velocity":
            bad.append(("model.param", f"meanflow's network predicts an (average) velocity: use velocity, not "
                        f"{cfg.model.param!r}"))
        if m.jvp == "fused" and cfg.model.get("grad_checkpoint"):
            bad.append(("model.grad_checkpoint", "activation checkpointing cannot recompute through method.jvp "
                        "'fused' (torch.func.jvp); use jvp 'detached' or grad_checkpoint false"))
        if m.jvp == "fused" and cfg.strategy.name not in ("auto", "ddp", "ddp_spawn"):
            bad.append(("method.jvp", f"'fused' synchronises gradients by hand under DDP only; use 'detached' with "
                        f"strategy {cfg.strategy.name!r}"))
    elif not 0.0 <= m.target_ema < 1.0:
        bad.append(("method.target_ema", "must be in [0, 1) (0: the stop-grad student itself)"))
    loss_cls = F.MeanFlowLoss if m.name == "meanflow" else F.CTMLoss
    return bad + _loss_errors(lambda sch: loss_cls.from_config(m, cfg.model, sch), cfg)


def _loss_errors(build: Any, cfg: DictConfig, fallback: str = "method",
                 rename: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """The method options a loss checks itself (names, ranges, against the schedule), as (key, reason): the loss is
    built once here (``build(schedule)``), so the recipe fails at load, not at the first step. Its errors name their
    key (``rename`` maps a helper's key to the recipe's); one naming no method key is reported under ``fallback``. A
    bad schedule is its own check's to report."""
    from dtrain.diffusion.schedule import schedule_from_config

    try:
        schedule = schedule_from_config(cfg.schedule)
    except Exception:
        return []
    try:
        build(schedule)
    except (ValueError, KeyError, TypeError) as e:
        key, _, reason = str(e).partition(": ")
        key = (rename or {}).get(key, key)
        return [(key, reason) if key == "method" or key.startswith("method.") else (fallback, str(e))]
    return []


@register_validator
def _check_terminal_snr(cfg: DictConfig) -> list[tuple[str, str]]:
    """An eps (or score) network cannot give x0 = (x_t - sigma eps) / alpha where alpha(t_max) = 0: zero terminal
    SNR schedules and the flow schedule need v, x0, velocity or edm outputs (Lin et al. 2023, arXiv 2305.08891)."""
    from dtrain.diffusion.param import terminal_snr_conflict
    from dtrain.diffusion.schedule import schedule_from_config

    what = "progressive distillation's few-step student" if cfg.method.name == "pd" else "the network"
    try:
        sch = schedule_from_config(cfg.schedule)
        why = terminal_snr_conflict(cfg.model.param, sch, what)
    except Exception:  # a bad schedule is reported by its own check
        return []
    if why is not None:
        return [("model.param", why)]
    sde = [k for k, names in (("sampler.name", [cfg.sampler.name]),
                              ("eval.samplers", [str(v).split(":")[0] for v in cfg.eval.samplers or []]))
           if "euler_maruyama" in names]
    if sde and float(sch.alpha(sch.t_max)) == 0:  # f = alpha' / alpha of the reverse SDE: infinite at t_max
        return [(sde[0], f"euler_maruyama's reverse SDE needs alpha(t_max) > 0, and the {sch.name!r} schedule ends "
                         "at alpha = 0 (pure noise): use ddpm, ddim, dpm++2m or heun")]
    return []


def _check_eval_inputs(cfg: DictConfig, where: Any, here: bool = True) -> None:
    """The files a run's own FID evaluations read (progressive distillation scores every round's student against
    ``eval.ref_stats`` when it is set; ``eval.every_n_steps`` sweeps): there before training, not after a round."""
    from dtrain.eval.features import BUILTIN_REFS

    e, m = cfg.eval, cfg.method
    if m.get("distance") == "lpips":  # consistency models' LPIPS: the package (and, here, its backbone's weights:
        from dtrain.methods.consistency import lpips_missing  # a job script may set TORCH_HOME for the nodes)

        if (why := lpips_missing(weights=here)) is not None:
            raise RecipeError(where("method.distance"), "method.distance", why)
    weights = e.feature_extractor_weights_path
    if weights is not None and not Path(weights).is_file():
        raise RecipeError(where("eval.feature_extractor_weights_path"), "eval.feature_extractor_weights_path",
                          f"file not found: {weights}")
    rounds = m.name == "pd" and bool(m.get("eval", True)) and e.ref_stats is not None
    if not (rounds or e.every_n_steps > 0):
        return
    why = "progressive distillation scores each round's student" if rounds else "eval.every_n_steps > 0 sweeps"
    if e.ref_stats is not None and not (e.ref_stats in BUILTIN_REFS or Path(e.ref_stats).is_file()):
        off = ", or set method.eval=false" if rounds else ""
        raise RecipeError(where("eval.ref_stats"), "eval.ref_stats", f"file not found: {e.ref_stats} ({why} against "
                          f"it): make it with tools/fid_ref_stats.py{off}")
    if e.feature_extractor == "inception" and e.feature_extractor_weights_path is None:
        key = "eval.feature_extractor_weights_path"
        raise RecipeError(where(key), key, f"not set: {why} with the 'inception' extractor, which needs the FID "
                          f"Inception weights file (pt_inception-2015-12-05.pth; never downloaded)")
    for key, reason in _ref_fit(cfg):
        raise RecipeError(where(key), key, f"{reason} ({why})")


def _ref_fit(cfg: DictConfig) -> list[tuple[str, str]]:
    """``eval.feature_extractor`` and ``eval.ref_stats`` (its metadata only) against the model's samples: what a
    fit would find at its start (after W&B and the data came up), found by ``--dry-run`` too."""
    from dtrain.eval.features import BUILTIN_REFS, DigitsFeatures
    from dtrain.eval.fid import RefStats, RefStatsError

    e, shape = cfg.eval, list(sample_shape(cfg.model))
    if e.feature_extractor == "digits" and shape != list(DigitsFeatures.input_shape):
        return [("eval.feature_extractor", f"'digits' scores 1x8x8 images, and this model's samples are "
                 f"{'x'.join(map(str, shape))}: use 'raw' (pixels as features) or 'inception'")]
    if e.ref_stats is None or e.ref_stats in BUILTIN_REFS or not Path(e.ref_stats).is_file():
        return []  # a built-in's shape is the digits' (the extractor check above); a missing file: checked before
    try:
        meta = RefStats.read_meta(e.ref_stats)
    except RefStatsError as err:
        return [("eval.ref_stats", str(err).partition(": ")[2])]
    bad = [f"{k}: file has {meta.get(k)!r}, evaluation uses {v!r}"
           for k, v in (("extractor", e.feature_extractor), ("resolution", shape)) if meta.get(k) != v]
    return [("eval.ref_stats", f"{e.ref_stats} does not match this evaluation ({'; '.join(bad)}): recompute it "
             f"with tools/fid_ref_stats.py using the same eval.feature_extractor")] if bad else []


def check_inputs(cfg: DictConfig, source: str = "recipe", overrides: Sequence[str] = (), *, here: bool = True
                 ) -> None:
    """The local files a run reads (shards, FID reference statistics and weights) exist, and (``here``) the
    accelerator it asks for is on this machine: ``dtrain fit`` calls this before anything starts, ``--dry-run`` and
    ``tools/slurm_submit.py`` with ``here=False`` (a CPU login node submits GPU jobs). ``load_recipe`` does not, so
    recipes may name files made later. Raises ``RecipeError(where, key, reason)``: where is "command line" for a
    key one of ``overrides`` sets, else ``source``."""
    import torch

    def where(key: str) -> str:
        return key_source(key, source, overrides)

    if here and cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RecipeError(where("trainer.accelerator"), "trainer.accelerator",
                          f"{cfg.trainer.accelerator!r} but no CUDA GPU is available here; use cpu or auto")
    on_cpu = here and (cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available())
    if cfg.strategy.name in ("deepspeed", "fsdp") and on_cpu:  # accelerator auto on a machine without CUDA
        which = "DeepSpeed" if cfg.strategy.name == "deepspeed" else "FSDP"
        raise RecipeError(where("strategy.name"), "strategy.name", f"Lightning's {which} strategy runs on CUDA GPUs "
                          f"only, and no CUDA GPU is available here; use ddp or fsdp2")
    if cfg.strategy.name == "fsdp2" and on_cpu and tuple(map(int, torch.__version__.split(".")[:2])) < (2, 7):
        raise RecipeError(where("strategy.name"), "strategy.name", f"fsdp2 on the CPU needs torch >= 2.7 (torch "
                          f"{torch.__version__}'s FSDP2 records CUDA stream events); use ddp here, or fsdp2 on GPUs")
    _check_eval_inputs(cfg, where, here)
    d = cfg.data
    if d.name != "wds" or not d.shards or "://" in d.shards:
        return
    for key, index in (("data.index", d.index), ("data.shards", d.shards if d.shards.endswith(".json") else None)):
        if index and not Path(index).is_file():
            raise RecipeError(where(key), key, f"index file not found: {index}")
    from dtrain.data.shards import find_index, is_remote
    from dtrain.data.stream import check_local_shards, peek_meta, resolve_shards, shard_urls

    try:
        if find_index(d.shards, d.index) is not None:  # the model was compared with the index at load (_check_wds)
            resolve_shards(d.shards, d.index)  # reads the index only: shards missing or not listed in it fail here
            return
        urls = shard_urls(d.shards)
        check_local_shards(urls)
        if not urls or any(is_remote(u) for u in urls):
            return
        meta = peek_meta(first := urls[0].removeprefix("file:"))  # no index: the first image of the first shard
    except InputError as e:  # data.* errors of the data code (MissingFileError: a shard that is not there)
        key, _, reason = str(e).partition(": ")
        raise RecipeError(where(key), key, reason) from None
    for key, reason in _image_fit(cfg.model, meta["image_size"], meta["channels"], f"shard {first}"):
        raise RecipeError(where(key), key, reason)

"""The recipe's ``strategy`` section -> a Lightning strategy (and, for DeepSpeed, its config).

``strategy.name``:
- ``auto`` / ``ddp`` / ``ddp_spawn``: data parallel, every rank holds the whole model (Lightning DDPStrategy).
- ``fsdp``: Lightning ``FSDPStrategy`` (FSDP1, GPUs only). Each network and every ``*Block`` in it is an
  FSDP unit; ``sharding``: full | grad_op | hybrid | none; original parameters are kept (``use_orig_params``).
- ``fsdp2``: Lightning ``ModelParallelStrategy`` with torch's ``fully_shard`` (FSDP2, per-parameter DTensor
  shards over all ranks; also runs on CPU). ``sharding``: full (reshard after forward) | grad_op.
- ``deepspeed``: Lightning ``DeepSpeedStrategy``, ZeRO stage 1 / 2 / 3 (Rajbhandari et al. 2020, arXiv
  1910.02054), optimizer offload (ZeRO-Offload, arXiv 2101.06840; the step runs DeepSpeedCPUAdam) and parameter
  offload (stage 3), bf16 or fp16 with dynamic / static loss scaling; gradient accumulation
  (``trainer.accumulate_grad_batches``) and clipping (``optim.grad_clip``) run inside DeepSpeed.
``fsdp`` / ``deepspeed`` write a checkpoint directory for stage 3 / sharded checkpoints:
``dtrain.export.zero.consolidate`` (``tools/convert_ckpt.py``) turns it into one fp32 format-1 checkpoint.

EMA copies and teachers (frozen, never in the optimizer: ``configure_optimizers`` takes ``net`` only):
- ddp: full copies on every rank, averaged from the full weights (all ranks compute the same average).
- fsdp / fsdp2: every EMA copy is sharded exactly like ``net`` (same units, same flattening, same world), so
  each rank averages its own shard of the fp32 weights: no communication, 1/world of the memory; the
  checkpoint gathers them like ``net``. The teacher is an FSDP unit too under fsdp, and replicated under fsdp2.
- deepspeed stage 1 / 2: full fp32 copies on every rank (DeepSpeed casts modules to bf16 / fp16; the copies
  are cast back to fp32 after ``deepspeed.initialize``, before a checkpoint is restored). Under fp32 training
  they average the module weights (equal to the fp32 master weights); under bf16 / fp16 they average the fp32
  master weights, which costs one all-reduce of the model per EMA update (``ema.every`` amortises it).
- deepspeed stage 3: every EMA copy is partitioned like ``net`` and kept in fp32; each rank averages its own
  partition of the fp32 master weights (no communication). Checkpoints keep the fp32 partitions.
Sharded weights cannot be sampled on rank 0 alone, so recipes with sharded parameters (fsdp, fsdp2,
deepspeed stage 3) refuse ``trainer.sample_every_n_steps`` and ``eval.every_n_steps``: sample the consolidated
checkpoint instead (``dtrain export`` / ``dtrain eval``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "NAMES",
    "check_strategy",
    "fused_clip_conflict",
    "shards_parameters",
    "deepspeed_config",
    "build_strategy",
    "fsdp_unit_types",
    "configure_model",
    "zero_ema",
    "check_ema_alignment",
    "dense_weights",
]

NAMES = ("auto", "ddp", "ddp_spawn", "fsdp", "fsdp2", "deepspeed")
FSDP_SHARDING = {"full": "FULL_SHARD", "grad_op": "SHARD_GRAD_OP", "hybrid": "HYBRID_SHARD", "none": "NO_SHARD"}
FSDP2_SHARDING = {"full": True, "grad_op": False}  # reshard_after_forward
DEEPSPEED_PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")
FSDP2_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-true")  # Lightning's ModelParallelStrategy
FSDP_PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")  # Lightning's FSDPPrecision
# DeepSpeed's dynamic fp16 loss scaling (its config's "fp16" section): Lightning's GradScaler elsewhere takes none
SCALER_KEYS = {"initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1.0}


def shards_parameters(strategy: Mapping[str, Any]) -> bool:
    """Whether no rank holds the whole network during training (fsdp, fsdp2, deepspeed stage 3)."""
    name = strategy.get("name", "auto")
    return name in ("fsdp", "fsdp2") or (name == "deepspeed" and int(strategy.get("zero_stage", 2)) == 3)


def fused_clip_conflict(strategy: str, precision: str, grad_clip: float) -> str:
    """Why a fused AdamW cannot run with norm clipping here ("" when it can): it unscales 16-mixed gradients inside
    its step, after clipping would have seen them scaled; Lightning's mixed-precision plugin under fsdp2 refuses to
    clip for it. ``optim.impl: auto`` then picks foreach."""
    if grad_clip <= 0 or strategy == "deepspeed":  # DeepSpeed clips inside its engine
        return ""
    if precision == "16-mixed":
        return "under 16-mixed the fused AdamW unscales gradients inside its step, after clipping saw them scaled"
    if strategy == "fsdp2" and precision == "bf16-mixed":
        return "Lightning's mixed-precision plugin under fsdp2 refuses norm clipping with a fused optimizer"
    return ""


def check_strategy(cfg: Any) -> list[tuple[str, str]]:
    """(key, reason) for every invalid combination of ``strategy`` with ``trainer``, ``optim`` and sampling."""
    s, t = cfg.strategy, cfg.trainer
    if s.name not in NAMES:
        return [("strategy.name", f"unknown strategy {s.name!r}; choose one of {list(NAMES)}")]
    bad: list[tuple[str, str]] = []
    ds = s.name == "deepspeed"
    if ds and s.zero_stage not in (1, 2, 3):
        bad.append(("strategy.zero_stage", f"must be 1, 2 or 3, not {s.zero_stage}"))
    for key in ("offload_optimizer", "offload_params"):
        if s[key] and not ds:
            bad.append((f"strategy.{key}", f"offloading needs strategy.name=deepspeed, not {s.name!r}"))
    if ds and s.offload_optimizer and cfg.optim.get("name", "adamw") != "adamw":
        bad.append(("optim.name", f"an offloaded optimizer steps as DeepSpeedCPUAdam (AdamW), not "
                    f"{cfg.optim.name!r}: use optim.name=adamw or strategy.offload_optimizer=false"))
    if ds and s.offload_params and s.zero_stage != 3:
        bad.append(("strategy.offload_params", f"parameter offload needs ZeRO stage 3, not strategy.zero_stage="
                    f"{s.zero_stage}"))
    if s.name in ("deepspeed", "fsdp") and t.accelerator == "cpu":
        bad.append(("strategy.name", f"Lightning's {'DeepSpeed' if ds else 'FSDP'} strategy runs on CUDA GPUs only; "
                    f"with trainer.accelerator=cpu use ddp or fsdp2"))
    if ds and t.precision not in DEEPSPEED_PRECISIONS:
        bad.append(("trainer.precision", f"deepspeed supports {list(DEEPSPEED_PRECISIONS)}, not {t.precision!r}"))
    if s.name == "fsdp2" and t.precision not in FSDP2_PRECISIONS:
        bad.append(("trainer.precision", f"fsdp2 (Lightning's ModelParallelStrategy) supports "
                    f"{list(FSDP2_PRECISIONS)}, not {t.precision!r}"))
    if s.name == "fsdp" and t.precision not in FSDP_PRECISIONS:
        bad.append(("trainer.precision", f"fsdp supports {list(FSDP_PRECISIONS)}, not {t.precision!r}"))
    if s.find_unused_parameters and s.name not in ("auto", "ddp", "ddp_spawn"):
        bad.append(("strategy.find_unused_parameters", f"applies to ddp / ddp_spawn only, not {s.name!r} (it "
                    f"would be ignored)"))
    fp16 = t.precision in ("16-mixed", "16-true")
    if s.loss_scale < 0 or s.initial_scale_power < 0 or s.loss_scale_window < 1 or s.hysteresis < 1 \
            or s.min_loss_scale <= 0:
        bad.append(("strategy", "need loss_scale >= 0, initial_scale_power >= 0, loss_scale_window >= 1, "
                    "hysteresis >= 1 and min_loss_scale > 0"))
    elif s.loss_scale > 0 and not (ds and fp16):
        bad.append(("strategy.loss_scale", f"a static loss scale applies to deepspeed with fp16 only (strategy.name="
                    f"{s.name!r}, trainer.precision={t.precision!r})"))
    elif not (ds and fp16):
        for key, default in SCALER_KEYS.items():
            if s[key] != default:
                bad.append((f"strategy.{key}", f"DeepSpeed's fp16 loss scaling applies to deepspeed with 16-mixed / "
                            f"16-true only (strategy.name={s.name!r}, trainer.precision={t.precision!r}: it would be "
                            f"ignored); leave it at {default}"))
    sharding = FSDP_SHARDING if s.name == "fsdp" else FSDP2_SHARDING if s.name == "fsdp2" else {"full": None}
    if s.sharding not in sharding:
        what = f"for strategy.name={s.name}" if s.name in ("fsdp", "fsdp2") else "applies to fsdp / fsdp2 only"
        bad.append(("strategy.sharding", f"{s.sharding!r}: {what}; choose one of {list(sharding)}"))
    if s.sharded_checkpoint and s.name not in ("fsdp", "fsdp2"):
        bad.append(("strategy.sharded_checkpoint", "applies to fsdp / fsdp2 (deepspeed always writes a sharded "
                    "directory, ddp one file)"))
    if cfg.optim.impl == "fused" and (why := fused_clip_conflict(s.name, t.precision, cfg.optim.grad_clip)):
        bad.append(("optim.impl", f"fused with optim.grad_clip={cfg.optim.grad_clip}: {why}; use optim.impl=auto "
                    f"(foreach here) or optim.grad_clip=0"))
    if s.timeout_min < 1:
        bad.append(("strategy.timeout_min", "must be >= 1"))
    if cfg.method.name == "pd" and (ds or shards_parameters(s)):
        # each round hands the student the previous round's EMA: DeepSpeed keeps fp32 master weights (and casts the
        # teacher) out of reach of that load, and sharded EMA copies cannot be written to the round's bundle
        bad.append(("strategy.name", f"progressive distillation runs under ddp (or one device), not {s.name!r}: "
                    f"its round hand-over loads whole networks on every rank"))
    if ds and s.zero_stage == 3 and (why := _zero3_conflict(cfg.method)):
        bad.append(("strategy.zero_stage", f"{why}; use zero_stage 1 or 2, fsdp2 or ddp"))
    if shards_parameters(s):
        why = (f"needs the whole network on rank 0, but strategy {s.name!r}"
               + (" (ZeRO stage 3)" if ds else "") + " shards it across ranks; set it to 0 and sample the "
               "consolidated checkpoint (dtrain export / dtrain eval)")
        if t.sample_every_n_steps > 0:
            bad.append(("trainer.sample_every_n_steps", f"sampling during training {why}"))
        if cfg.eval.every_n_steps > 0:
            bad.append(("eval.every_n_steps", f"the FID sweep during training {why}"))
    return bad


def _zero3_conflict(method: Any) -> str | None:
    """Why a method's loss cannot run on ZeRO-3's partitioned parameters (its fetch hooks are autograd Functions
    without forward-mode rules, and they expect their own parameter objects), or None."""
    if method.name == "meanflow":
        return ("MeanFlow's JVP (torch.func.jvp) cannot pass ZeRO-3's parameter hooks, which have no forward-mode "
                "rule")
    if method.name == "ctm" and method.get("compare") == "zero":
        return ("CTM's jump to t = 0 with stop-gradient weights (method.compare: zero, torch.func.functional_call) "
                "cannot swap ZeRO-3's partitioned parameters; method.compare: s runs under ZeRO-3")
    return None


def deepspeed_config(cfg: Any, *, standalone: bool = False) -> dict[str, Any]:
    """The DeepSpeed config of a recipe (https://www.deepspeed.ai/docs/config-json/).

    Lightning fills ``gradient_accumulation_steps`` from ``trainer.accumulate_grad_batches``; ``standalone=True``
    adds it for ``deepspeed.initialize`` without Lightning (tests, tools).
    """
    s, t = cfg.strategy, cfg.trainer
    zero: dict[str, Any] = {"stage": int(s.zero_stage)}
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if s.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    conf: dict[str, Any] = {
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch's AdamW (configure_optimizers)
        "train_micro_batch_size_per_gpu": int(cfg.data.batch_size),
        "gradient_clipping": float(cfg.optim.grad_clip),
    }
    if t.precision.startswith("bf16"):
        conf["bf16"] = {"enabled": True}
    elif t.precision.startswith("16"):
        conf["fp16"] = {"enabled": True, "loss_scale": float(s.loss_scale), "initial_scale_power":
                        int(s.initial_scale_power), "loss_scale_window": int(s.loss_scale_window),
                        "hysteresis": int(s.hysteresis), "min_loss_scale": float(s.min_loss_scale)}
    if standalone:
        conf["gradient_accumulation_steps"] = int(t.accumulate_grad_batches)
    return conf


def fsdp_unit_types(model_cfg: Mapping[str, Any]) -> set[type[nn.Module]]:
    """The network class and its ``*Block`` classes: the FSDP units of ``fsdp`` (built on the meta device)."""
    from dtrain.models import build_model

    with torch.device("meta"):
        net = build_model(model_cfg)
    return {type(net), *(type(m) for m in net.modules() if type(m).__name__.endswith("Block"))}


def build_strategy(cfg: Any) -> Any:
    """A Lightning strategy (or "auto") for the recipe; ``check_strategy`` has accepted it."""
    s = cfg.strategy
    timeout = timedelta(minutes=int(s.timeout_min))
    if s.name == "auto":
        return "auto"
    if s.name in ("ddp", "ddp_spawn"):
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(start_method="spawn" if s.name == "ddp_spawn" else "popen",
                           find_unused_parameters=bool(s.find_unused_parameters), timeout=timeout)
    classes = _classes()
    if s.name == "fsdp":
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return classes["fsdp"](auto_wrap_policy=ModuleWrapPolicy(fsdp_unit_types(cfg.model)),
                               sharding_strategy=FSDP_SHARDING[s.sharding], use_orig_params=True,
                               state_dict_type="sharded" if s.sharded_checkpoint else "full", timeout=timeout)
    if s.name == "fsdp2":
        return classes["fsdp2"](reshard_after_forward=FSDP2_SHARDING[s.sharding],
                                save_distributed_checkpoint=bool(s.sharded_checkpoint), timeout=timeout)
    if s.name == "deepspeed":
        return classes["deepspeed"](config=deepspeed_config(cfg), timeout=timeout)
    raise ValueError(f"strategy.name: unknown strategy {s.name!r}; choose one of {list(NAMES)}")


# ---- EMA under sharded weights ------------------------------------------------------------------------------
def _emas(module: nn.Module) -> list[Any]:
    from dtrain.models.ema import EMA

    return [m for m in module.modules() if isinstance(m, EMA)]


def _float_buffers(net: nn.Module) -> list[Tensor]:
    return [b for b in net.buffers() if b.is_floating_point()]


def zero_ema(module: nn.Module) -> None:
    """Keep the module's EMA copies in fp32 and average DeepSpeed's fp32 master weights (see the module docstring).

    Call after ``deepspeed.initialize`` (which casts every parameter to bf16 / fp16 and, in stage 3, partitions
    it) and before a checkpoint is restored into the engine: the copies are reset to the network's fp32 weights.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param

    def targets(copy: nn.Module) -> list[Tensor]:
        return [q.ds_tensor if hasattr(q, "ds_tensor") else q for q in copy.parameters()] + _float_buffers(copy)

    def master(p: Tensor) -> Tensor:
        if hasattr(p, "ds_id"):  # stage 3: this rank's partition of the fp32 master weight
            return safe_get_local_fp32_param(p)
        if p.dtype == torch.float32:  # fp32 training: the module weight is the master weight
            return p
        full = safe_get_full_fp32_param(p)  # stage 1 / 2 under bf16 / fp16: gathered (an all-reduce)
        return full if full is not None else p.float()

    for ema in _emas(module):
        for tag in ema.tags:
            for q in ema[tag].parameters():
                if hasattr(q, "ds_tensor"):  # stage 3: the local partition; the empty placeholder follows
                    q.ds_tensor.data = q.ds_tensor.data.float()
                q.data = q.data.float()
            for b in _float_buffers(ema[tag]):
                b.data = b.data.float()
        dev = targets(ema[ema.tags[0]])[0].device  # offloaded partitions live on the CPU

        def sources(net: nn.Module, dev: torch.device = dev) -> list[Tensor]:
            out = [master(p) for p in net.parameters()] + [b.float() for b in _float_buffers(net)]
            return [t if t.device == dev else t.to(dev, non_blocking=True) for t in out]

        ema.sources, ema.targets = sources, targets
        with torch.no_grad():  # the copies start as the network (DeepSpeed's cast rounded them); a resume overwrites
            src = sources(net_of(module))
            for tag in ema.tags:
                torch._foreach_copy_(targets(ema[tag]), src)


def net_of(module: nn.Module) -> nn.Module:
    """The trained network the module's EMA averages (``DiffusionModule.net``)."""
    net = getattr(module, "net", None)
    if not isinstance(net, nn.Module):
        raise AttributeError(f"{type(module).__name__}: no 'net' module to average into the EMA")
    return net


def check_ema_alignment(module: nn.Module) -> None:
    """Every EMA target must pair with a source of the same size (the same shard of the same tensor)."""
    net = getattr(module, "net", None)
    if net is None:
        return
    src = [s.numel() for s in _local_views(_emas(module)[0].sources(net))] if _emas(module) else []
    for ema in _emas(module):
        for tag in ema.tags:
            dst = [d.numel() for d in _local_views(ema.targets(ema[tag]))]
            if dst != src:
                i = next((i for i, (a, b) in enumerate(zip(src, dst)) if a != b), min(len(src), len(dst)))
                raise RuntimeError(f"ema.{tag}: its shards do not line up with net's (tensor {i}: "
                                   f"{dst[i] if i < len(dst) else None} vs {src[i] if i < len(src) else None} "
                                   f"elements; {len(dst)} vs {len(src)} tensors): the EMA copy must be sharded "
                                   f"exactly like the network")


def _local_views(ts: list[Tensor]) -> list[Tensor]:
    return [t.to_local() if hasattr(t, "to_local") else t for t in ts]


def configure_model(module: Any) -> None:
    """``LightningModule.configure_model`` for fsdp2: ``fully_shard`` every ``*Block`` of ``net``, then ``net``,
    and each EMA copy the same way (so its DTensor shards line up with the network's). Other strategies: nothing.
    """
    strategy = module.trainer.strategy
    if not isinstance(strategy, _classes()["fsdp2"]) or getattr(module, "_dtrain_sharded", False):
        return
    from torch.distributed.fsdp import fully_shard

    mesh = strategy.device_mesh["data_parallel"]
    nets = [module.net, *(ema[tag] for ema in _emas(module) for tag in ema.tags)]
    for net in nets:
        dense_weights(net)  # FSDP2 shards contiguous parameters only (trainer.channels_last: the batches stay so)
        for m in net.modules():
            if m is not net and type(m).__name__.endswith("Block"):
                fully_shard(m, mesh=mesh, reshard_after_forward=strategy.reshard_after_forward)
        fully_shard(net, mesh=mesh, reshard_after_forward=strategy.reshard_after_forward)
    module._dtrain_sharded = True


# ---- the strategies (Lightning is imported on first use) ------------------------------------------------------
@functools.cache
def _classes() -> dict[str, type]:
    import lightning as L
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    class FSDP(FSDPStrategy):
        """``FSDPStrategy`` that clips by global norm (``optim.grad_clip``) through the root FSDP module (Lightning's
        FSDP precision plugin refuses norm clipping: ``torch.nn.utils.clip_grad_norm_`` is wrong on FSDP1 shards),
        and checks that the EMA shards line up with the network's."""

        def setup(self, trainer: L.Trainer) -> None:
            dense_weights(self.lightning_module)  # FSDP flattens parameters: contiguous ones (trainer.channels_last)
            super().setup(trainer)
            root = self.model

            def clip_grad_by_norm(optimizer: Any, clip_val: float) -> None:
                root.clip_grad_norm_(clip_val)  # the norm over every rank's shards (torch FSDP docs)

            self.precision_plugin.clip_grad_by_norm = clip_grad_by_norm
            check_ema_alignment(self.lightning_module)

    class FSDP2(ModelParallelStrategy):
        """``ModelParallelStrategy`` as pure FSDP2: one data-parallel mesh over all ranks, no tensor parallelism;
        ``DiffusionModule.configure_model`` shards (``dtrain.dist.strategy.configure_model``)."""

        def __init__(self, *, reshard_after_forward: bool = True, **kw: Any) -> None:
            super().__init__(**kw)
            self.reshard_after_forward = reshard_after_forward

        def setup_environment(self) -> None:
            self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
            super().setup_environment()

        def setup(self, trainer: L.Trainer) -> None:
            super().setup(trainer)
            check_ema_alignment(self.lightning_module)

    class DeepSpeed(DeepSpeedStrategy):
        """``DeepSpeedStrategy`` with fp32 EMA copies averaged from the fp32 master weights (``zero_ema``),
        DeepSpeedCPUAdam for an offloaded optimizer, and a note of the state-dict prefixes the module leaves out
        of its checkpoints (a student's teacher) for ``dtrain.export.zero.consolidate``."""

        def setup(self, trainer: L.Trainer) -> None:
            dense_weights(self.lightning_module)
            super().setup(trainer)  # deepspeed.initialize; a checkpoint is restored after this
            zero_ema(self.lightning_module)
            check_ema_alignment(self.lightning_module)

        def _init_optimizers(self) -> Any:
            opt, sched = super()._init_optimizers()
            offload = (self.config or {}).get("zero_optimization", {}).get("offload_optimizer")
            if offload and type(opt) is torch.optim.AdamW:
                opt, sched = _cpu_adamw(opt, sched)
            return opt, sched

        def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any = None) -> None:
            prefixes = list(getattr(self.lightning_module, "unsaved_prefixes", ()))
            checkpoint = {**checkpoint, "dtrain_sharded": {"strategy": "deepspeed", "unsaved_prefixes": prefixes}}
            super().save_checkpoint(checkpoint, filepath, storage_options)

    return {"fsdp": FSDP, "fsdp2": FSDP2, "deepspeed": DeepSpeed}


def dense_weights(module: nn.Module) -> nn.Module:
    """Weights (and buffers) back to the contiguous layout before sharding: ``deepspeed.initialize`` reads each one
    as bytes (``Tensor.view(torch.uint8)``), which a ``trainer.channels_last`` weight refuses ("stride(-1) must be
    1"), and FSDP / FSDP2 shard contiguous parameters only ("FSDP does not support non-contiguous parameters").
    Sharded weights live in flat buffers anyway; the batches stay channels_last."""
    return module.to(memory_format=torch.contiguous_format)


def _cpu_adamw(opt: torch.optim.AdamW, sched_cfg: Any) -> tuple[Any, Any]:
    """The same AdamW as DeepSpeedCPUAdam (AdamW mode), its LambdaLR rebuilt on it (DeepSpeed's offloaded step)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    keys = ("lr", "betas", "eps", "weight_decay")
    groups = [{"params": g["params"], **{k: g[k] for k in keys}, "lr": g.get("initial_lr", g["lr"])}
              for g in opt.param_groups]
    new = DeepSpeedCPUAdam(groups, adamw_mode=True, **{k: opt.defaults[k] for k in keys})
    if sched_cfg is not None:
        old = sched_cfg.scheduler
        if not isinstance(old, torch.optim.lr_scheduler.LambdaLR):
            raise TypeError(f"strategy.offload_optimizer: cannot move a {type(old).__name__} to DeepSpeedCPUAdam")
        sched_cfg.scheduler = torch.optim.lr_scheduler.LambdaLR(new, old.lr_lambdas)
    return new, sched_cfg

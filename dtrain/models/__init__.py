"""Networks by registry name, built from a recipe's ``model`` section (a plain mapping).

Every network is called as ``net(x, c_noise, cond)``; ``cond`` is a LongTensor of labels or None, and
label ``num_classes`` is the null class of classifier-free guidance. The section's denoiser fields
(``param``, ``sigma_data``, ``input_scaling``, ``clip_x0``) are read by ``build_denoiser``, not the network.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from dtrain.diffusion.denoiser import Denoiser
from dtrain.diffusion.schedule import Schedule
from dtrain.models.ema import EMA
from dtrain.models.mlp import MLP
from dtrain.models.unet import UNet
from dtrain.registry import Registry

__all__ = ["MODELS", "DENOISER_FIELDS", "ADDED_EMBEDDINGS", "TRAINING_ONLY", "build_model", "build_denoiser",
           "count_params", "UNet", "MLP", "EMA"]

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
MODELS.register("unet", UNet)
MODELS.register("mlp", MLP)

DENOISER_FIELDS = ("name", "param", "sigma_data", "input_scaling", "clip_x0")
# model keys that add a zero-initialised embedding to a network -> its state-dict prefix (UNet and MLP): a student
# with them set starts from a teacher without them (guided PD's w, a flow map's second time)
ADDED_EMBEDDINGS = {"w_cond": "w_emb.", "second_time": "s_emb."}
# model keys that change how a network trains, not its weights: a student, or a resumed run, may set them otherwise
TRAINING_ONLY = ("dropout", "grad_checkpoint")


def _plain(v: Any) -> Any:
    """Recipe values (DictConfig / ListConfig included) as plain Python values."""
    if isinstance(v, str | bytes) or not hasattr(v, "__iter__"):
        return v
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    return [_plain(x) for x in v]


def build_model(model_cfg: Mapping[str, Any]) -> nn.Module:
    """The network named by ``model_cfg["name"]``, with the section's other fields as its arguments."""
    cfg = _plain(model_cfg)
    cls = MODELS.get(cfg.get("name", "unet"), "model.name")
    kwargs = {k: v for k, v in cfg.items() if k not in DENOISER_FIELDS}
    accepted = inspect.signature(cls).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(f"model: {cfg.get('name')!r} takes no option(s) {unknown}; valid: {sorted(accepted)}")
    return cls(**kwargs)


def build_denoiser(model_cfg: Mapping[str, Any], schedule: Schedule, net: nn.Module | None = None) -> Denoiser:
    """``Denoiser(net, schedule, param, ...)`` from the section's denoiser fields (``net`` built when None)."""
    cfg = _plain(model_cfg)
    return Denoiser(
        build_model(cfg) if net is None else net,
        schedule,
        cfg.get("param", "eps"),
        sigma_data=float(cfg.get("sigma_data", 1.0)),
        input_scaling=bool(cfg.get("input_scaling", False)),
        clip_x0=cfg.get("clip_x0"),
    )


def count_params(net: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable)

"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2022, arXiv 2207.12598).

D_w = D(x, t, null) + w (D(x, t, cond) - D(x, t, null)): w = 1 is the plain conditional model,
w = 0 the unconditional one (diffusers' ``guidance_scale`` convention). Guidance in x0 equals
guidance in eps at fixed x_t, so every sampler works with it unchanged. w may be one number or one per
sample ([B], as guided distillation draws it). A ``Denoiser`` with ``clip_x0`` is read unclipped and the guided x0
clipped once (guide, then clip, as GLIDE / diffusers: clipping each branch first lets w > 1 leave the range); so is
a few-step student's (consistency, CTM, MeanFlow over a denoiser), whose output is affine in a clean estimate.

Guided distillation (Meng et al. 2023, arXiv 2210.03142) gives a student w as an input instead: its network
takes ``GuidedCond(labels, w)`` as ``cond`` (``model.w_cond``), and ``WCondDenoiser`` drives it at a fixed w
with one evaluation per step.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from dtrain.diffusion.denoiser import Denoiser, DenoiserLike, time_batch
from dtrain.diffusion.schedule import bcast

__all__ = ["CFGDenoiser", "GuidedCond", "WCondDenoiser", "learned_null", "reads_unlearned_null", "NO_NULL"]


NO_NULL = ("classifier-free guidance needs the unconditional (null-class) prediction, which this model never "
           "learned (trained with method.cfg_dropout 0, no labels dropped)")


def learned_null(recipe: Any) -> bool | None:
    """Whether a model trained by ``recipe`` (a mapping) learned the null class's prediction that
    ``CFGDenoiser`` reads: its training dropped labels (``method.cfg_dropout`` > 0). False only for a class-conditional
    model trained from scratch without dropout (its null-class embedding stays random); None where the recipe does
    not tell (none given, no classes, or a student started from a teacher that may have learned it)."""
    if not isinstance(recipe, dict) or not isinstance(method := recipe.get("method"), dict):
        return None
    p, model = method.get("cfg_dropout"), recipe.get("model")
    if not isinstance(p, int | float) or not isinstance(model, dict) or not model.get("num_classes"):
        return None
    return True if p > 0 else None if recipe.get("teacher") else False


def reads_unlearned_null(info: Any, guide: Any) -> bool:
    """Whether guiding the model of a bundle's ``info`` (dtrain.json: its ``provenance.recipe``) with ``guide``
    (its kind's, ``dtrain.export.bundle.kind_guide``; None: the default) reads a null class it never learned:
    classifier-free guidance of a model ``learned_null`` says False of (a w-conditioned student takes w instead)."""
    recipe = (info.get("provenance") or {}).get("recipe") if isinstance(info, dict) else None
    return guide in (None, CFGDenoiser) and learned_null(recipe) is False


class CFGDenoiser(nn.Module):
    """Guided denoiser; ``cond`` must be a LongTensor of labels and ``null_label`` the dropped class."""

    def __init__(self, denoiser: DenoiserLike, scale: float | Tensor, null_label: int) -> None:
        super().__init__()
        self.inner, self.null_label = denoiser, int(null_label)
        self.scale = scale if isinstance(scale, Tensor) else float(scale)

    @property
    def schedule(self):
        return self.inner.schedule

    def forward(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Tensor:
        clip = getattr(self.inner, "clip_x0", None)
        if clip is None:
            return self._guide(self.inner, x, (t,), cond)
        if isinstance(self.inner, Denoiser):
            return self._guide(partial(self.inner, clip=False), x, (t,), cond).clamp(-clip, clip)
        return self._affine(x, t, None, cond, clip)

    def jump(self, x: Tensor, t: Tensor | float, s: Tensor | float, cond: Any = None) -> Tensor:
        """The guided jump t -> s of a flow-map student (``dtrain.samplers.few_step``): a jump is affine in the
        network's output at fixed x_t, so this guides the network output (its clean estimate, clipped once, where
        the student clips one)."""
        if not hasattr(self.inner, "jump"):
            raise TypeError(f"CFGDenoiser.jump: {type(self.inner).__name__} is not a flow map (no jump)")
        clip = getattr(self.inner, "clip_x0", None)
        return self._guide(self.inner.jump, x, (t, s), cond) if clip is None else self._affine(x, t, s, cond, clip)

    def _affine(self, x: Tensor, t: Tensor | float, s: Tensor | float | None, cond: Any, clip: float) -> Tensor:
        """A few-step student whose output is p x + q x0_hat (``affine``, ``clean``): guide the unclipped x0_hat, clip
        the guided one, then apply the student's own map."""
        p, q = self.inner.affine(x, t, s)
        x0 = self._guide(partial(self.inner.clean, clip=False), x, (t, s), cond).clamp(-clip, clip)
        return p * x + q * x0

    def _guide(self, fn: Any, x: Tensor, times: tuple, cond: Any) -> Tensor:
        if cond is None or (not isinstance(self.scale, Tensor) and self.scale == 1.0):
            return fn(x, *times, cond)
        if not isinstance(cond, Tensor):
            raise TypeError(f"guidance: cond must be a LongTensor of labels, got {type(cond).__name__}")
        if isinstance(self.scale, Tensor) and self.scale.numel() not in (1, x.shape[0]):
            raise ValueError(f"guidance: {self.scale.numel()} scales for a batch of {x.shape[0]} (give one, or one "
                             f"per sample)")
        null = torch.full_like(cond, self.null_label)
        tb = [t if not isinstance(t, Tensor) or t.ndim == 0 else torch.cat([time_batch(t, x)] * 2) for t in times]
        both = fn(torch.cat([x, x]), *tb, torch.cat([cond, null]))
        d_c, d_u = both.chunk(2)
        w = bcast(self.scale, d_c) if isinstance(self.scale, Tensor) else self.scale
        return d_u + w * (d_c - d_u)


class GuidedCond(NamedTuple):
    """The ``cond`` of a w-conditioned network: labels (or None) and the guidance scale per sample [B]."""

    labels: Tensor | None
    w: Tensor


class WCondDenoiser(nn.Module):
    """A w-conditioned denoiser driven at guidance ``scale`` (a number or [B]): one network call per step."""

    def __init__(self, denoiser: DenoiserLike, scale: float | Tensor) -> None:
        super().__init__()
        self.inner = denoiser
        self.scale = scale if isinstance(scale, Tensor) else float(scale)

    @property
    def schedule(self):
        return self.inner.schedule

    def forward(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Tensor:
        w = self.scale.to(x.device, torch.float32) if isinstance(self.scale, Tensor) else torch.full(
            (x.shape[0],), self.scale, device=x.device)
        return self.inner(x, t, GuidedCond(cond, w.expand(x.shape[0])))

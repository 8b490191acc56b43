"""ADM/DDPM-style UNet: residual blocks with a time (and class) embedding, self-attention at chosen
resolutions, dropout (Ho et al. 2020, arXiv 2006.11239; Dhariwal & Nichol 2021, arXiv 2105.05233).

With ``scale_shift=False, num_heads=1, resblock_updown=False`` this is DDPM's network: the CIFAR-10 size
(channels 128, mult [1, 2, 2, 2], 2 blocks, attention at 16) has DDPM's 35.7M parameters. ADM adds
scale-shift normalisation (``scale_shift``), 64-channel heads (``head_channels``) and residual
up/downsampling (``resblock_updown``). Called as ``net(x, c_noise, cond)``; label ``num_classes`` is null. Flow maps
(``second_time``) take the target time too: ``net(x, c_noise, cond, c_noise_s)``. ``grad_checkpoint``: activation
checkpointing of every stage while training with gradients (Chen et al. 2016, arXiv 1604.06174): the stage's
activations are recomputed in the backward (dropout replayed), trading about a third more compute for memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dtrain.models.embeddings import ClassEmbedding, GuidanceEmbedding, TimeEmbedding, split_cond

__all__ = ["UNet", "ResBlock", "AttentionBlock"]


def norm(c: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups where the width allows (gcd(32, c) otherwise)."""
    return nn.GroupNorm(math.gcd(32, c), c, eps=1e-6)


def zero(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


class Resample(nn.Module):
    """2x nearest upsampling or 2x downsampling, with a 3x3 conv (``conv``) or without (avg pool)."""

    def __init__(self, c: int, mode: str, conv: bool = True) -> None:
        super().__init__()
        self.mode = mode
        stride = 2 if mode == "down" else 1
        self.conv = nn.Conv2d(c, c, 3, stride=stride, padding=1) if conv else None

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "up":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            return self.conv(x) if self.conv is not None else x
        return self.conv(x) if self.conv is not None else F.avg_pool2d(x, 2)


class ResBlock(nn.Module):
    """GN-SiLU-conv, + embedding (added, or ADM's scale-shift), GN-SiLU-dropout-conv (zero init), skip."""

    def __init__(
        self, c_in: int, c_out: int, emb: int, dropout: float = 0.0, scale_shift: bool = True, resample: str = ""
    ) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.resample = Resample(c_in, resample, conv=False) if resample else None
        self.emb = nn.Linear(emb, 2 * c_out if scale_shift else c_out)
        self.norm2, self.drop = norm(c_out), nn.Dropout(dropout)
        self.conv2 = zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.norm1(x))
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.conv1(h)
        e = self.emb(F.silu(emb))[:, :, None, None].to(h.dtype)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions (scaled dot product), output projection zero-init."""

    def __init__(self, c: int, heads: int) -> None:
        super().__init__()
        if c % heads:
            raise ValueError(f"model: {c} channels do not split into {heads} attention heads")
        self.heads = heads
        self.norm = norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = zero(nn.Conv2d(c, c, 1))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, C / heads]
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


def head_split_error(channels: int, channel_mult: Sequence[int], num_heads: int, head_channels: int,
                     resolution: int | None = None, attn_resolutions: Sequence[int] | None = None
                     ) -> tuple[str, str] | None:
    """(key, reason) when the attention heads do not divide the width of a level that has attention (those in
    ``attn_resolutions`` and the middle block; every level when the resolutions are not given), else None."""
    levels = range(len(channel_mult))
    if resolution is not None and attn_resolutions is not None:
        levels = [i for i in levels if resolution // 2**i in attn_resolutions or i == len(channel_mult) - 1]
    widths = sorted({channels * channel_mult[i] for i in levels})
    key, split = ("model.head_channels", head_channels) if head_channels > 0 else ("model.num_heads", num_heads)
    if split < 1 or any(w % split for w in widths):
        return key, f"must divide the width of every level with attention {widths}"
    return None


class UNet(nn.Module):
    """The denoising UNet; see the module docstring for the DDPM and ADM settings."""

    def __init__(
        self,
        in_channels: int = 3,
        resolution: int = 32,
        channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        num_heads: int = 4,
        head_channels: int = 0,
        dropout: float = 0.1,
        num_classes: int = 0,
        scale_shift: bool = True,
        resblock_updown: bool = False,
        w_cond: bool = False,
        second_time: bool = False,
        grad_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.grad_checkpoint = grad_checkpoint
        if resolution % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"model.resolution {resolution} is not divisible by 2^{len(channel_mult) - 1} "
                             f"(one halving per model.channel_mult entry after the first)")
        if bad := head_split_error(channels, channel_mult, num_heads, head_channels, resolution, attn_resolutions):
            raise ValueError(": ".join(bad))
        if channels % 2:
            raise ValueError(f"model.channels: must be even (its sinusoidal time features are sin / cos pairs), got "
                             f"{channels}")
        self.in_channels, self.resolution, self.num_classes = in_channels, resolution, num_classes
        emb = 4 * channels
        self.time_emb = TimeEmbedding(channels, emb)
        self.class_emb = ClassEmbedding(num_classes, emb) if num_classes > 0 else None
        self.w_cond = w_cond  # guided distillation: w is an input (arXiv 2210.03142), zero at initialisation
        self.w_emb = GuidanceEmbedding(channels, emb) if w_cond else None
        # flow maps (MeanFlow u(z, r, t), CTM G(x, t, s)): the target time, embedded from 0 at initialisation
        self.s_emb = TimeEmbedding(channels, emb, zero_init=True) if second_time else None

        def attn(c: int) -> AttentionBlock:
            return AttentionBlock(c, c // head_channels if head_channels else num_heads)

        def block(c_in: int, c_out: int, resample: str = "") -> ResBlock:
            return ResBlock(c_in, c_out, emb, dropout, scale_shift, resample)

        def resample(c: int, mode: str) -> nn.Module:
            return block(c, c, mode) if resblock_updown else Resample(c, mode)

        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips, c, res = [channels], channels, resolution
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [block(c, channels * mult)]
                c = channels * mult
                if res in attn_resolutions:
                    layers.append(attn(c))
                self.down.append(nn.ModuleList(layers))
                skips.append(c)
            if level < len(channel_mult) - 1:
                self.down.append(nn.ModuleList([resample(c, "down")]))
                skips.append(c)
                res //= 2
        self.mid = nn.ModuleList([block(c, c), attn(c), block(c, c)])
        self.up = nn.ModuleList()
        self.up_concat: list[bool] = []  # whether each up stage takes a skip connection
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                layers = [block(c + skips.pop(), channels * mult)]
                c = channels * mult
                if res in attn_resolutions:
                    layers.append(attn(c))
                self.up.append(nn.ModuleList(layers))
                self.up_concat.append(True)
            if level > 0:
                self.up.append(nn.ModuleList([resample(c, "up")]))
                self.up_concat.append(False)
                res *= 2
        self.out = nn.Sequential(norm(c), nn.SiLU(), zero(nn.Conv2d(c, in_channels, 3, padding=1)))

    def _run(self, layers: nn.ModuleList, h: Tensor, emb: Tensor) -> Tensor:
        # only where the stage's own weights train: a stop-gradient call of the network (CTM's G_sg through
        # torch.func.functional_call with detached weights) would be recomputed with the trainable ones, after the
        # call, and saved other tensors than its forward did
        if (self.grad_checkpoint and self.training and torch.is_grad_enabled()
                and any(p.requires_grad for p in layers.parameters())):
            return checkpoint(self._stage, layers, h, emb, use_reentrant=False)
        return self._stage(layers, h, emb)

    @staticmethod
    def _stage(layers: nn.ModuleList, h: Tensor, emb: Tensor) -> Tensor:
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x: Tensor, c_noise: Tensor, cond: Any = None, c_noise_s: Tensor | None = None) -> Tensor:
        """``c_noise_s``: the second time of a flow map (``second_time``); None means s = t."""
        labels, w = split_cond(cond, self.w_cond)
        emb = self.time_emb(c_noise)
        if self.s_emb is not None:
            emb = emb + self.s_emb(c_noise if c_noise_s is None else c_noise_s)
        if self.class_emb is not None:
            emb = emb + self.class_emb(labels, x.shape[0], x.device)
        if self.w_emb is not None:
            emb = emb + self.w_emb(w, x.shape[0], x.device)
        h = self.conv_in(x)
        hs = [h]
        for layers in self.down:
            h = self._run(layers, h, emb)
            hs.append(h)
        h = self._run(self.mid, h, emb)
        for layers, concat in zip(self.up, self.up_concat):
            if concat:
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(layers, h, emb)
        return self.out(h)

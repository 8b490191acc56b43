"""The denoiser: a network + schedule + parameterization seen as D(x_t, t, cond) -> x0_hat.

Samplers and students see only this object (k-diffusion's wrapper idea, EDM's preconditioning,
arXiv 2206.00364). The network is called as ``net(c_in * x_t, c_noise(t), cond)``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn

from dtrain.diffusion.param import Coeffs, check_param, convert, edm_c_in, to_x0_eps
from dtrain.diffusion.schedule import Schedule, as_t

__all__ = ["Denoiser", "DenoiserLike", "as_net_input", "time_batch"]


class DenoiserLike(Protocol):
    """Anything a sampler can drive: a schedule and x0 = D(x, t, cond)."""

    schedule: Schedule

    def __call__(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Tensor: ...


def time_batch(t: Tensor | float, x: Tensor) -> Tensor:
    """t (a scalar, [1] or [B]) as a float64 [B] tensor on x's device."""
    t = as_t(t).to(x.device)
    if t.numel() == 1:
        return t.reshape(1).expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t: {tuple(t.shape)} times for a batch of {x.shape[0]} (give one time, or one per sample)")
    return t


def as_net_input(net: Any, x: Tensor) -> Tensor:
    """``x`` in the network's own precision (its first parameter's floating dtype; a function: ``x``): a
    half-precision network (16-true) sampled from float32 noise, an fp32 copy (EMA, CD's and CTM's target network)
    fed the bf16 batch of DeepSpeed bf16 / bf16-true training, a float64 network (64-true)."""
    w = next(net.parameters(), None) if isinstance(net, nn.Module) else None
    return x.to(w.dtype) if w is not None and w.is_floating_point() and x.dtype != w.dtype else x


class Denoiser(nn.Module):
    """Wraps ``net`` predicting ``param`` under ``schedule``; ``forward`` returns x0_hat.

    Args:
        net: called as ``net(x_in, c_noise, cond)`` with c_noise a float [B] tensor.
        param: what the network predicts, one of ``dtrain.diffusion.param.PARAMS``.
        sigma_data: data standard deviation (EDM), used by the ``edm`` parameterization and c_in.
        input_scaling: feed c_in x_t with c_in = 1 / sqrt(alpha^2 sigma_data^2 + sigma^2).
        clip_x0: clamp x0_hat to [-clip_x0, clip_x0] (pixel-space models, DDPM's clip_denoised).
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: Schedule,
        param: str = "eps",
        *,
        sigma_data: float = 1.0,
        input_scaling: bool = False,
        clip_x0: float | None = None,
    ) -> None:
        super().__init__()
        self.net, self.schedule, self.param = net, schedule, check_param(param)
        self.sigma_data, self.input_scaling, self.clip_x0 = sigma_data, input_scaling, clip_x0
        self._at_time: dict[tuple, tuple[Coeffs, float]] = {}  # memo of one-time coefficients, see _scalar

    def _scalar(self, t: Tensor, derivatives: bool) -> tuple[Coeffs, float]:
        """(coefficients, c_noise) at one CPU time as Python floats: no device tensors or kernel launches
        per sampling step. Memoised per time value, since sampling revisits the same grid batch after batch."""
        key = (float(t), derivatives, self.schedule, self.sigma_data)
        hit = self._at_time.get(key)
        if hit is None:
            sch = self.schedule
            vals = sch.alpha_sigma(t) + ((sch.alpha_dot(t), sch.sigma_dot(t)) if derivatives else ())
            hit = Coeffs(*(float(v) for v in vals), sigma_data=self.sigma_data), float(sch.c_noise(t))
            if len(self._at_time) < 65536:
                self._at_time[key] = hit
        return hit

    def coeffs(self, t: Tensor | float, x: Tensor, derivatives: bool = True) -> Coeffs:
        """Coefficients at t: [B, 1, ...] tensors for a [B] t; floats for one time on the CPU (a grid point)."""
        t = as_t(t)
        if t.ndim == 0 and t.device.type == "cpu":
            return self._scalar(t, derivatives)[0]
        return Coeffs.at(self.schedule, t.to(x.device), x, self.sigma_data, derivatives)

    def raw(self, x: Tensor, t: Tensor | float, cond: Any = None, c: Coeffs | None = None, **net_kw: Any) -> Tensor:
        """The network output (in ``self.param`` units) at x_t; the network gets c_noise as float32 [B] (and
        ``net_kw``, e.g. a flow map's second time ``c_noise_s``)."""
        t = as_t(t)
        c = c or self.coeffs(t, x, derivatives=False)
        x_in = x
        if self.input_scaling:
            scale = edm_c_in(c.alpha, c.sigma, self.sigma_data)
            x_in = x * (scale.to(x.dtype) if isinstance(scale, Tensor) else scale)
        if t.ndim == 0 and t.device.type == "cpu":
            c_noise = torch.full((x.shape[0],), self._scalar(t, False)[1], dtype=torch.float32, device=x.device)
        else:
            c_noise = self.schedule.c_noise(t.to(x.device)).to(torch.float32)
            c_noise = c_noise.reshape(1).expand(x.shape[0]).contiguous() if c_noise.numel() == 1 else c_noise
        return self.net(as_net_input(self.net, x_in), c_noise, cond, **net_kw)

    def x0_eps(self, x: Tensor, t: Tensor | float, cond: Any = None, clip: bool = True, **net_kw: Any
               ) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) at x_t; ``clip=False`` skips ``clip_x0`` (a guided wrapper clips the combination)."""
        c = self.coeffs(t, x, derivatives=self.param == "velocity")
        out = self.raw(x, t, cond, c, **net_kw).to(x.dtype)
        x0, eps = to_x0_eps(self.param, out, x, c)
        if self.clip_x0 is not None and clip:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            eps = (x - c.alpha * x0) / c.sigma
        return x0, eps

    def forward(self, x: Tensor, t: Tensor | float, cond: Any = None, clip: bool = True) -> Tensor:
        return self.x0_eps(x, t, cond, clip)[0]

    def predict(self, x: Tensor, t: Tensor | float, cond: Any = None, kind: str = "x0") -> Tensor:
        """The prediction in any parameterization (eps, x0, v, velocity, score, edm)."""
        c = self.coeffs(t, x)
        x0, eps = self.x0_eps(x, t, cond)
        return convert(x0, "x0", check_param(kind), x, c) if kind != "eps" else eps

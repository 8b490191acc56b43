"""The denoising loss of a diffusion teacher, per sample [B].

For x_t = alpha x0 + sigma eps with t drawn by ``time_sampling``, the network (in its ``param``) is read in
the loss space ``target`` (eps / x0 / v / velocity / edm; default: the model's param) and compared with the
true target by mean squared error over the non-batch dimensions, times a weight w(t):

- ``none``: 1 in the target space (Ho et al. 2020, arXiv 2006.11239: eps; flow matching: velocity);
- ``min_snr``: min(SNR, gamma) in x0 units (Min-SNR-gamma, Hang et al. 2023, arXiv 2303.09556);
- ``snr_trunc``: max(SNR, 1) in x0 units (truncated SNR, Salimans & Ho 2022, arXiv 2202.00512);
- ``snr_plus_one``: SNR + 1 in x0 units (the same paper's "SNR+1": the v loss on VP schedules);
- ``edm``: lambda(sigma) = 1 / c_out^2 in x0 units (Karras et al. 2022, arXiv 2206.00364, Table 1),
  which is 1 in the ``edm`` (F) space.

A weight "in x0 units" multiplies ||x0_hat - x0||^2; it is carried to the target space by the exact
factor k(t) with ||target_hat - target||^2 = k ||x0_hat - x0||^2 at fixed x_t (eps: SNR; v: (SNR + 1)
on VP), which ``dtrain.diffusion.param.from_x0_eps`` gives as the image of (dx0, deps) = (1, -alpha/sigma).
Labels are replaced by the null class ``num_classes`` with probability ``cfg_dropout`` (Ho & Salimans 2022,
arXiv 2207.12598).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from dtrain.diffusion.denoiser import Denoiser
from dtrain.diffusion.param import Coeffs, check_param, convert, edm_skip_out, from_x0_eps
from dtrain.diffusion.schedule import Schedule
from dtrain.diffusion.timesteps import sample_t

__all__ = ["WEIGHTINGS", "LossOutput", "DenoisingLoss", "loss_weight", "drop_labels", "same_dropout"]

WEIGHTINGS = ("none", "min_snr", "snr_trunc", "snr_plus_one", "edm")


@contextmanager
def same_dropout(net: nn.Module, like: nn.Module, device: torch.device) -> Iterator[None]:
    """Run the block (a forward of ``net`` without gradient) with the dropout masks that the next forward of ``like``
    after it draws: torch's RNG (the CPU's and ``device``'s) is forked and restored, and each module of ``net`` runs
    in the train / eval mode of its counterpart in ``like`` (the same architecture; e.g. an EMA copy, which is kept
    in eval mode, then drops what the student drops). A stop-gradient target theta^- = sg(theta) is so the student's
    own function (iCT, arXiv 2310.14189; the consistency models' reference code replays the dropout RNG the same
    way), and MeanFlow's detached JVP differentiates the network its loss reads."""
    mods, ref = list(net.modules()), list(like.modules())
    modes = [m.training for m in mods]
    if len(mods) == len(ref):
        for m, r in zip(mods, ref, strict=True):
            m.training = r.training
    accel = {} if device.type == "cpu" else {"device_type": device.type}  # the CPU's RNG is always forked
    index = device.index if device.index is not None or not accel else getattr(torch, device.type).current_device()
    try:
        with torch.random.fork_rng(devices=[index] if accel else [], **accel):
            yield
    finally:
        for m, mode in zip(mods, modes, strict=True):
            m.training = mode


class LossOutput(NamedTuple):
    """Per-sample loss [B] and the times [B] it was taken at (for per-timestep logging)."""

    loss: Tensor
    t: Tensor


def loss_weight(
    kind: str, schedule: Schedule, t: Tensor, target: str, *, snr_gamma: float = 5.0, sigma_data: float = 0.5
) -> Tensor | None:
    """w(t) [B] (float64) in the ``target`` space; None for ``none``."""
    if kind == "none":
        return None
    c = Coeffs.at(schedule, t, t, sigma_data, derivatives=target == "velocity")  # [B] coefficients, float64
    if kind == "min_snr":
        w_x0 = schedule.snr(t).clamp(max=snr_gamma)
    elif kind == "snr_trunc":
        w_x0 = schedule.snr(t).clamp(min=1.0)
    elif kind == "snr_plus_one":
        w_x0 = schedule.snr(t) + 1.0
    elif kind == "edm":
        w_x0 = edm_skip_out(c.alpha, c.sigma, sigma_data)[1] ** -2
    else:
        raise ValueError(f"method.weighting: unknown {kind!r}; choose one of {list(WEIGHTINGS)}")
    one = torch.ones_like(t)
    k = from_x0_eps(target, one, -c.alpha / c.sigma, torch.zeros_like(t), c) ** 2
    # an eps target where alpha = 0 (zero terminal SNR) does not see x0 (k = 0): min_snr's weight min(snr, gamma) /
    # snr tends to 1 there (0 / 0 as written); the other weightings are infinite there, refused by the recipe check
    return torch.where((k == 0) & (w_x0 == 0), one, w_x0 / k)


def drop_labels(cond: Tensor, p: float, null_label: int, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by ``null_label`` with probability p (CFG training). The draws come from ``generator``
    on its own device (a CPU generator for GPU labels: copied over, no host sync)."""
    if p <= 0:
        return cond
    dev = generator.device if generator is not None else cond.device
    u = torch.rand(cond.shape, device=dev, generator=generator).to(cond.device, non_blocking=True)
    return torch.where(u < p, torch.full_like(cond, null_label), cond)


class DenoisingLoss:
    """Callable ``(denoiser, x0, cond) -> LossOutput(loss [B], t [B])``; see the module docstring."""

    def __init__(
        self,
        schedule: Schedule,
        param: str = "eps",
        *,
        target: str | None = None,
        time_sampling: str = "uniform",
        p_mean: float | None = None,
        p_std: float | None = None,
        weighting: str = "none",
        snr_gamma: float = 5.0,
        cfg_dropout: float = 0.0,
        num_classes: int = 0,
        sigma_data: float = 0.5,
    ) -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"method.weighting: unknown {weighting!r}; choose one of {list(WEIGHTINGS)}")
        self.schedule, self.param = schedule, check_param(param)
        self.target = check_param(target or param)
        self.time_sampling, self.p_mean, self.p_std = time_sampling, p_mean, p_std
        self.weighting, self.snr_gamma, self.sigma_data = weighting, snr_gamma, sigma_data
        self.cfg_dropout, self.num_classes = cfg_dropout, num_classes

    @classmethod
    def from_config(cls, method: Mapping[str, Any], model: Mapping[str, Any], schedule: Schedule) -> DenoisingLoss:
        """From a recipe's ``method`` (denoising) and ``model`` sections."""
        return cls(
            schedule, model.get("param", "eps"), target=method.get("target"),
            time_sampling=method.get("time_sampling", "uniform"), p_mean=method.get("p_mean"),
            p_std=method.get("p_std"), weighting=method.get("weighting", "none"),
            snr_gamma=method.get("snr_gamma", 5.0), cfg_dropout=method.get("cfg_dropout", 0.0),
            num_classes=model.get("num_classes", 0), sigma_data=model.get("sigma_data", 0.5),
        )  # fmt: skip

    def sample_t(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """Training times (float64 [n]); drawn on the CPU and copied without a host sync."""
        t = sample_t(self.schedule, n, self.time_sampling, generator=generator, p_mean=self.p_mean, p_std=self.p_std)
        return t.to(device, non_blocking=True)

    def __call__(
        self,
        denoiser: Denoiser,
        x0: Tensor,
        cond: Tensor | None = None,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """Per-sample loss at times ``t`` (drawn when None) with noise ``noise`` (drawn when None)."""
        t = self.sample_t(x0.shape[0], x0.device, generator) if t is None else t
        eps = torch.randn_like(x0) if noise is None else noise
        if cond is not None and self.num_classes > 0:
            cond = drop_labels(cond, self.cfg_dropout, self.num_classes)
        x_t = self.schedule.marginal(x0, eps, t)
        c = denoiser.coeffs(t, x0, derivatives="velocity" in (self.param, self.target))
        pred = convert(denoiser.raw(x_t, t, cond, c).float(), self.param, self.target, x_t, c)
        target = from_x0_eps(self.target, x0, eps, x_t, c)
        loss = (pred - target).square().flatten(1).mean(1)
        w = loss_weight(self.weighting, self.schedule, t, self.target, snr_gamma=self.snr_gamma,
                        sigma_data=self.sigma_data)
        return LossOutput(loss if w is None else loss * w.to(loss.dtype), t)

"""Data with exact answers, made locally: Gaussian mixtures with a closed-form denoiser.

For p_0 = sum_k w_k N(mu_k, s_k^2 I) and x_t = alpha x0 + sigma eps, p_t is the mixture of
N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I) and E[x0 | x_t] = sum_k r_k(x_t) (mu_k + alpha s_k^2 /
(alpha^2 s_k^2 + sigma^2) (x_t - alpha mu_k)), r_k the posterior responsibilities. One Gaussian is the
K = 1 case. Samplers driven by this denoiser are tested against the true distribution.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from dtrain.diffusion.schedule import Schedule, as_t

__all__ = ["GaussianMixture", "ExactDenoiser", "default_gmm", "sliced_wasserstein"]


class GaussianMixture:
    """Isotropic Gaussian mixture in D dimensions (float64)."""

    def __init__(self, means: Tensor, stds: Tensor | float, weights: Tensor | None = None) -> None:
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim == 1:
            self.means = self.means[None]
        K = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(K).clone()
        w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else torch.as_tensor(weights).double()
        if (w < 0).any() or abs(float(w.sum()) - 1) > 1e-6:  # float32 weights sum to 1 only to ~1e-7
            raise ValueError("GaussianMixture: weights must be non-negative and sum to 1")
        self.weights = w / w.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n samples (float32, [n, D]) and their component labels."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k, None] * z).float(), k

    def x0_mean(self, x: Tensor, alpha: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        """E[x0 | x_t] (float64); with ``labels`` the component is known (class-conditional), except where a label is
        outside [0, K) (the CFG null class, K by convention): there the unconditional mean."""
        x = x.double()
        a, s = alpha.double().reshape(-1, 1, 1), sigma.double().reshape(-1, 1, 1)  # [B, 1, 1]
        mu, sd = self.means[None], self.stds[None, :, None]  # [1, K, D], [1, K, 1]
        var = a**2 * sd**2 + s**2
        comp = mu + a * sd**2 / var * (x[:, None] - a * mu)  # [B, K, D]
        logp = (self.weights.log()[None] - 0.5 * ((x[:, None] - a * mu) ** 2).sum(-1) / var[..., 0]
                - 0.5 * self.dim * torch.log(2 * math.pi * var[..., 0]))
        r = torch.softmax(logp, dim=1)
        if labels is not None:
            labels = labels.long().to(x.device).expand(x.shape[0])
            known = (labels >= 0) & (labels < self.means.shape[0])
            r = torch.where(known[:, None], nn.functional.one_hot(labels.clamp(0, self.means.shape[0] - 1),
                                                                  self.means.shape[0]).double(), r)
        return (r[..., None] * comp).sum(1)

    def assign(self, x: Tensor) -> Tensor:
        """Most likely component of each clean sample."""
        logp = (self.weights.log()[None] - 0.5 * ((x.double()[:, None] - self.means[None]) ** 2).sum(-1)
                / self.stds[None] ** 2 - self.dim * self.stds.log()[None])
        return logp.argmax(1)

    def weight_error(self, x: Tensor) -> float:
        """Max |empirical - true| mixture weight after assigning samples to components."""
        counts = torch.bincount(self.assign(x), minlength=len(self.weights)).double()
        return float((counts / counts.sum() - self.weights).abs().max())

    def denoiser(self, schedule: Schedule, conditional: bool = False) -> ExactDenoiser:
        return ExactDenoiser(self, schedule, conditional)


class ExactDenoiser(nn.Module):
    """D(x, t, cond) = E[x0 | x_t] for a Gaussian mixture; a drop-in for ``dtrain.diffusion.denoiser.Denoiser``."""

    def __init__(self, gmm: GaussianMixture, schedule: Schedule, conditional: bool = False) -> None:
        super().__init__()
        self.gmm, self.schedule, self.conditional = gmm, schedule, conditional
        self.calls = 0

    def forward(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Tensor:
        self.calls += 1
        t = as_t(t).to(x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        shape = x.shape
        out = self.gmm.x0_mean(x.flatten(1).cpu(), self.schedule.alpha(t).cpu(),
                               self.schedule.sigma(t).cpu(), cond if self.conditional else None)
        return out.reshape(shape).to(device=x.device, dtype=x.dtype)


def default_gmm() -> GaussianMixture:
    """The 2-D test mixture: three well-separated components with unequal weights."""
    means = torch.tensor([[-1.0, -0.6], [1.0, -0.6], [0.0, 1.0]])
    return GaussianMixture(means, 0.15, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))


def sliced_wasserstein(x: Tensor, y: Tensor, n_proj: int = 128, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between two equal-size point clouds [N, D]."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(x.shape[1], n_proj, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=0, keepdim=True)
    px, py = (x.double() @ d).sort(0).values, (y.double() @ d).sort(0).values
    return float((px - py).abs().mean())

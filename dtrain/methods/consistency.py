"""Consistency distillation (CD), consistency training (CT) and improved CT (iCT): per-sample losses [B].

Song et al. 2023 (arXiv 2303.01469) and Song & Dhariwal 2023 (arXiv 2310.14189). The student is a
``dtrain.samplers.few_step.ConsistencyModel`` f_theta over a network in any parameterization and schedule; its
boundary f(x, t_min) = x is exact by construction (the derivation is in that module). Training times are a grid
t_min = t_1 < ... < t_N = t_max of N(k) points (``consistency_times``: Karras' rho = 7 spacing in sigma / alpha by
default, which is EDM's sigma grid on EDM's schedule; ``target_bias`` measures how far CD's chained teacher steps
on a grid end from the teacher's ODE, before training). Per sample an interval (t_n, t_{n+1}) is drawn and, with
x_{t_{n+1}} = alpha x0 + sigma z,

- ``cd``: x_hat_{t_n} is one step of the teacher's probability-flow ODE from x_{t_{n+1}} (``method.solver``: DDIM, Heun
  or DPM-Solver++(2S): the shared samplers' steps ``ddim_step`` / ``heun_step`` / ``dpm_solver_2s_step``, on the
  teacher's schedule, optionally with CFG);
- ``ct`` / ``ict``: x_hat_{t_n} = alpha_n x0 + sigma_n z, the same x0 and noise (no teacher);

and the loss is lambda_n d(f_theta(x_{t_{n+1}}, t_{n+1}), f_{theta^-}(x_hat_{t_n}, t_n)) with the target taken without
gradient from theta^- (an EMA of theta, or theta itself: iCT's stop-grad, ``target_ema = 0``). The target runs with the
student's dropout masks and train / eval mode (``dtrain.methods.denoising.same_dropout``), as the reference
implementations replay the dropout RNG: theta^- = sg(theta) is then the student's own function.

Variant defaults (``DEFAULTS``; a recipe's null fields take them):
- cd: teacher init, N = 18 fixed, uniform intervals, l2, lambda = 1 (CM's CIFAR-10 CD), target EMA 0.95 (CM's
  ImageNet-64 / LSUN value; its CIFAR-10 CD uses the stop-gradient target, 0; 0.95 measured better on digits);
- ct: CM's curriculum N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1, s0 = 2, s1 = 150, l2, and the target
  EMA's decay mu(k) = exp(s0 ln mu0 / N(k)) with mu0 = ``target_ema`` = 0.9 (under the ``ct`` curriculum, for any
  variant; ``ConsistencyLoss.target_decay``);
- ict: N(k) = min(s0 2^floor(k/K'), s1) + 1 with K' = floor(K / (log2 floor(s1/s0) + 1)), s0 = 10, s1 = 1280;
  intervals drawn with p(n) ~ erf((ln s_{n+1} - P_mean) / (sqrt 2 P_std)) - erf((ln s_n - P_mean) / (sqrt 2 P_std)),
  P_mean = -1.1, P_std = 2 (s = sigma / alpha); pseudo-Huber d = sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(dim);
  lambda_n = 1 / (s_{n+1} - s_n); no EMA target.
Distances: ``l2`` and ``l1`` are means over the non-batch dimensions, ``pseudo_huber`` uses the full L2 norm (as in
iCT), ``lpips`` needs the ``lpips`` package and its backbone weights available offline (``LPIPSDistance``).
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dtrain.diffusion.denoiser import DenoiserLike
from dtrain.diffusion.schedule import Schedule
from dtrain.diffusion.timesteps import make_grid
from dtrain.methods.denoising import LossOutput, same_dropout
from dtrain.samplers.ddim import ddim_step
from dtrain.samplers.dpm_solver import dpm_solver_2s_step
from dtrain.samplers.few_step import ConsistencyModel
from dtrain.samplers.heun import heun_step

__all__ = [
    "VARIANTS",
    "DEFAULTS",
    "SOLVERS",
    "CURRICULA",
    "DISTANCES",
    "WEIGHTINGS",
    "INTERVAL_SAMPLING",
    "GRID_SPACINGS",
    "resolve",
    "num_scales",
    "consistency_times",
    "interval_probs",
    "distance",
    "pseudo_huber_c",
    "teacher_step",
    "target_bias",
    "LPIPSDistance",
    "ConsistencyLoss",
]

VARIANTS = ("cd", "ct", "ict")
SOLVERS = ("ddim", "heun", "dpm++2s")
CURRICULA = ("fixed", "ct", "ict")
DISTANCES = ("l2", "l1", "pseudo_huber", "lpips")
WEIGHTINGS = ("none", "ict")
INTERVAL_SAMPLING = ("uniform", "lognormal")
GRID_SPACINGS = ("rho", "lambda", "geometric", "uniform", "quadratic", "linspace")  # grids that end at t_min
_COMMON = {"num_scales": 18, "p_mean": -1.1, "p_std": 2.0}
DEFAULTS: dict[str, dict[str, Any]] = {
    "cd": {**_COMMON, "init": "teacher", "curriculum": "fixed", "scales_start": 2, "scales_end": 150,
           "time_sampling": "uniform", "distance": "l2", "weighting": "none", "target_ema": 0.95},
    "ct": {**_COMMON, "init": "scratch", "curriculum": "ct", "scales_start": 2, "scales_end": 150,
           "time_sampling": "uniform", "distance": "l2", "weighting": "none", "target_ema": 0.9},
    "ict": {**_COMMON, "init": "scratch", "curriculum": "ict", "scales_start": 10, "scales_end": 1280,
            "time_sampling": "lognormal", "distance": "pseudo_huber", "weighting": "ict", "target_ema": 0.0},
}


def resolve(method: Mapping[str, Any]) -> dict[str, Any]:
    """A recipe's ``method`` section with unset (None) fields filled from the variant's ``DEFAULTS``."""
    m = dict(method)
    variant = m.get("name", "cd")
    if variant not in VARIANTS:
        raise ValueError(f"method.name: unknown consistency variant {variant!r}; choose one of {list(VARIANTS)}")
    return {**m, **{k: v for k, v in DEFAULTS[variant].items() if m.get(k) is None}}


def num_scales(curriculum: str, step: int, total: int, *, n: int = 18, s0: int = 2, s1: int = 150) -> int:
    """N(k): the number of grid points at training step k of K = ``total`` (see the module docstring)."""
    if curriculum == "fixed":
        return n
    k, K = max(0, step), max(1, total)
    if curriculum == "ct":  # arXiv 2303.01469, App. C
        return math.ceil(math.sqrt(min(k, K) / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1
    if curriculum == "ict":  # arXiv 2310.14189, Sec. 3.4
        k_prime = max(1, math.floor(K / (math.log2(math.floor(s1 / s0)) + 1)))
        return min(s0 * 2 ** (k // k_prime), s1) + 1
    raise ValueError(f"method.curriculum: unknown {curriculum!r}; choose one of {list(CURRICULA)}")


def consistency_times(schedule: Schedule, n: int, spacing: str = "rho", rho: float = 7.0) -> Tensor:
    """The training grid t_1 = t_min < ... < t_n = t_max (float64, increasing) from ``make_grid``."""
    if n < 2:
        raise ValueError(f"method.num_scales: need at least 2 grid points, got {n}")
    if spacing not in GRID_SPACINGS:
        raise ValueError(f"method.spacing: {spacing!r} does not end at the schedule's t_min (the boundary); "
                         f"choose one of {list(GRID_SPACINGS)}")
    ts = make_grid(schedule, n, spacing, rho=rho)[:-1].flip(0)
    if ts.numel() != n or float(ts[0]) != float(schedule.t_min):
        raise ValueError(f"method.spacing: {spacing!r} gives {ts.numel()} distinct times from {float(ts[0])}, "
                         f"need {n} from t_min = {schedule.t_min}")
    return ts


def _s(schedule: Schedule, t: Tensor) -> Tensor:
    """sigma / alpha = exp(-lambda): EDM's sigma of the scaled variable x_t / alpha."""
    return torch.exp(-schedule.lambda_(t))


def interval_probs(schedule: Schedule, ts: Tensor, kind: str = "uniform", p_mean: float = -1.1,
                   p_std: float = 2.0) -> Tensor:
    """Probabilities (float64 [n - 1]) of the intervals (t_i, t_{i+1}) of an increasing grid."""
    if kind == "uniform":
        return torch.full((ts.numel() - 1,), 1.0 / (ts.numel() - 1), dtype=torch.float64)
    if kind != "lognormal":
        raise ValueError(f"method.time_sampling: unknown {kind!r}; choose one of {list(INTERVAL_SAMPLING)}")
    cdf = torch.erf((torch.log(_s(schedule, ts)) - p_mean) / (math.sqrt(2) * p_std))
    p = cdf.diff()
    return p / p.sum()


def pseudo_huber_c(dim: int) -> float:
    """iCT's c = 0.00054 sqrt(d) for data of d dimensions (arXiv 2310.14189, Sec. 3.3)."""
    return 0.00054 * math.sqrt(dim)


def distance(kind: str, a: Tensor, b: Tensor, *, huber_c: float | None = None,
             lpips: nn.Module | None = None) -> Tensor:
    """d(a, b) per sample [B] (see the module docstring)."""
    if kind == "lpips":
        if lpips is None:
            raise ValueError("method.distance: 'lpips' needs an LPIPSDistance module")
        return lpips(a, b)
    d = (a - b).flatten(1)
    if kind == "l2":
        return d.square().mean(1)
    if kind == "l1":
        return d.abs().mean(1)
    if kind == "pseudo_huber":
        c = pseudo_huber_c(d.shape[1]) if huber_c is None else huber_c
        sq = d.square().sum(1)
        return sq / ((sq + c**2).sqrt() + c)  # = sqrt(sq + c^2) - c without float32 cancellation for sq << c^2
    raise ValueError(f"method.distance: unknown {kind!r}; choose one of {list(DISTANCES)}")


_LPIPS_BACKBONES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}  # torchvision


def lpips_missing(net: str = "vgg", *, weights: bool = True) -> str | None:
    """Why ``distance: lpips`` cannot run here (the package, or with ``weights`` its backbone's weights that dtrain
    never downloads), or None: checked at launch (``dtrain.config.check_inputs``) and by ``LPIPSDistance``."""
    from pathlib import Path

    import torch.hub

    if net not in _LPIPS_BACKBONES:
        return f"lpips backbone must be one of {sorted(_LPIPS_BACKBONES)}, got {net!r}"
    if importlib.util.find_spec("lpips") is None:
        return ("'lpips' needs the `lpips` package (pip install lpips) and its backbone weights in torch's cache; use "
                "l2, l1 or pseudo_huber otherwise")
    file = Path(torch.hub.get_dir()) / "checkpoints" / _LPIPS_BACKBONES[net]
    if weights and not file.is_file():
        return f"'lpips' needs the backbone weights {file} (dtrain never downloads at run time; copy the file there)"
    return None


class LPIPSDistance(nn.Module):
    """LPIPS (Zhang et al. 2018, arXiv 1801.03924) from the ``lpips`` package, on images in [-1, 1] resized to
    224 x 224 as in arXiv 2303.01469; grey images are repeated to RGB. Never downloads: the torchvision backbone's
    weights must already be in torch's hub cache ($TORCH_HOME/hub/checkpoints)."""

    def __init__(self, net: str = "vgg") -> None:
        super().__init__()
        if (why := lpips_missing(net)) is not None:
            raise ValueError(f"method.distance: {why}")
        import lpips  # type: ignore[import-not-found]

        self.net = lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.ndim != 4:
            raise ValueError(f"method.distance: 'lpips' needs images [B, C, H, W], got shape {tuple(a.shape)}")
        if a.shape[1] == 1:
            a, b = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)
        a, b = (torch.nn.functional.interpolate(v, size=224, mode="bilinear", align_corners=False) for v in (a, b))
        return self.net(a, b).flatten()


def teacher_step(solver: str, teacher: DenoiserLike, x: Tensor, t: Tensor, s: Tensor, cond: Any = None) -> Tensor:
    """One step of the teacher's probability-flow ODE from per-sample times t to s < t ([B] float64)."""
    if solver == "ddim":
        return ddim_step(teacher.schedule, x, teacher(x, t, cond), t, s)
    if solver == "heun":
        return heun_step(teacher, x, t, s, cond)[0]
    if solver == "dpm++2s":
        return dpm_solver_2s_step(teacher, x, t, s, cond)[0]
    raise ValueError(f"method.solver: unknown {solver!r}; choose one of {list(SOLVERS)}")


@torch.no_grad()
def target_bias(teacher: DenoiserLike, ts: Tensor, x: Tensor, cond: Any = None, *, solver: str = "dpm++2s",
                refine: int = 8) -> float:
    """RMS distance at t_min between CD's composite target down the grid ``ts`` (increasing; one ``solver`` step of the
    teacher per interval, from x at ``ts[-1]``) and the same ODE solved with ``refine`` steps per interval.

    A CD student is trained toward the chain's end, so this error is the floor of how well it can follow the
    teacher's ODE; it measures a grid before training (``tools/cd_grid.py``; recipes/cm/cd_digits.yaml's grid was
    chosen with it).
    """
    if refine < 2:
        raise ValueError(f"target_bias: refine must be >= 2 steps per interval, got {refine}")
    b, ts = x.shape[0], ts.to(x.device)
    coarse, fine = x, x
    for i in range(ts.numel() - 1, 0, -1):
        hi, lo = ts[i].expand(b), ts[i - 1].expand(b)
        coarse = teacher_step(solver, teacher, coarse, hi, lo, cond)
        sub = torch.linspace(float(ts[i]), float(ts[i - 1]), refine + 1, dtype=torch.float64, device=x.device)
        for a, c in itertools.pairwise(sub):
            fine = teacher_step(solver, teacher, fine, a.expand(b), c.expand(b), cond)
    return float((coarse - fine).double().square().mean().sqrt())


class ConsistencyLoss:
    """Callable ``(student, target, x0, cond, step=, teacher=) -> LossOutput(loss [B], t_{n+1} [B])``."""

    def __init__(
        self,
        schedule: Schedule,
        variant: str = "cd",
        *,
        total_steps: int = 1,
        solver: str = "heun",
        curriculum: str | None = None,
        num_scales: int | None = None,
        scales_start: int | None = None,
        scales_end: int | None = None,
        spacing: str = "rho",
        rho: float = 7.0,
        time_sampling: str | None = None,
        p_mean: float | None = None,
        p_std: float | None = None,
        distance: str | None = None,
        huber_c: float | None = None,
        weighting: str | None = None,
        lpips: nn.Module | None = None,
    ) -> None:
        given = {"curriculum": curriculum, "num_scales": num_scales, "scales_start": scales_start,
                 "scales_end": scales_end, "time_sampling": time_sampling, "p_mean": p_mean, "p_std": p_std,
                 "distance": distance, "weighting": weighting}
        o = resolve({"name": variant, **given})
        self.schedule, self.variant, self.total_steps = schedule, variant, int(total_steps)
        self.solver, self.spacing, self.rho, self.huber_c, self.lpips = solver, spacing, float(rho), huber_c, lpips
        self.curriculum, self.n, self.s0, self.s1 = o["curriculum"], o["num_scales"], o["scales_start"], o["scales_end"]
        self.time_sampling, self.p_mean, self.p_std = o["time_sampling"], o["p_mean"], o["p_std"]
        self.distance, self.weighting = o["distance"], o["weighting"]
        if solver not in SOLVERS:
            raise ValueError(f"method.solver: unknown {solver!r}; choose one of {list(SOLVERS)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"method.weighting: unknown {self.weighting!r}; choose one of {list(WEIGHTINGS)}")
        if self.distance not in DISTANCES:
            raise ValueError(f"method.distance: unknown {self.distance!r}; choose one of {list(DISTANCES)}")
        if self.weighting == "ict" and not float(schedule.alpha(schedule.t_max)) > 0:
            raise ValueError("method.weighting: ict's 1 / (s_{n+1} - s_n) is 0 on the top interval where "
                             "alpha(t_max) = 0 (s = sigma / alpha is infinite), so f(x, t_max), the one-step sampler's "
                             "call, would never train; use weighting uniform or a schedule with alpha(t_max) > 0")
        self._grids: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        for step in (0, self.total_steps):  # fail early on a bad spacing / curriculum, at its first and last N
            self.grid(self.scales(step))

    @classmethod
    def from_config(cls, method: Mapping[str, Any], schedule: Schedule, total_steps: int,
                    lpips: nn.Module | None = None) -> ConsistencyLoss:
        """From a recipe's ``method`` section (cd / ct / ict)."""
        m = resolve(method)
        keys = ("solver", "curriculum", "num_scales", "scales_start", "scales_end", "spacing", "rho", "time_sampling",
                "p_mean", "p_std", "distance", "huber_c", "weighting")
        return cls(schedule, m["name"], total_steps=total_steps, lpips=lpips, **{k: m[k] for k in keys if k in m})

    def scales(self, step: int) -> int:
        """N at training step ``step``."""
        return num_scales(self.curriculum, step, self.total_steps, n=self.n, s0=self.s0, s1=self.s1)

    def target_decay(self, mu0: float, step: int) -> float | None:
        """theta^-'s EMA decay at training step ``step``: CM's mu(k) = exp(s0 ln mu0 / N(k)) under the ``ct``
        curriculum (arXiv 2303.01469, App. C: mu0 at k = 0, towards 1 as N grows); None (the fixed ``mu0``) else.
        (openai/consistency_models divides by N(k) - 1, so its mu(0) is mu0^(s0 / (s0 - 1)): mu0^2 at s0 = 2.)"""
        if self.curriculum != "ct" or not mu0 > 0:
            return None
        return math.exp(self.s0 * math.log(mu0) / self.scales(step))

    def grid(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """(times [n] increasing, interval probabilities [n - 1], interval weights lambda [n - 1]), float64, cached."""
        if n not in self._grids:
            ts = consistency_times(self.schedule, n, self.spacing, self.rho)
            probs = interval_probs(self.schedule, ts, self.time_sampling, self.p_mean, self.p_std)
            w = 1.0 / _s(self.schedule, ts).diff() if self.weighting == "ict" else torch.ones_like(probs)
            self._grids[n] = (ts, probs, w)
        return self._grids[n]

    def sample_intervals(self, b: int, step: int, generator: torch.Generator | None = None
                         ) -> tuple[Tensor, Tensor, Tensor]:
        """(t_n, t_{n+1}, lambda_n) for b samples (float64, on the CPU)."""
        ts, probs, w = self.grid(self.scales(step))
        i = torch.multinomial(probs, b, replacement=True, generator=generator)
        return ts[i], ts[i + 1], w[i]

    def __call__(
        self,
        student: ConsistencyModel,
        target: ConsistencyModel,
        x0: Tensor,
        cond: Tensor | None = None,
        *,
        step: int = 0,
        teacher: DenoiserLike | None = None,
        noise: Tensor | None = None,
        intervals: tuple[Tensor, Tensor, Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """Per-sample loss at the intervals ``intervals`` (drawn when None) with noise ``noise`` (drawn when None)."""
        t_lo, t_hi, w = self.sample_intervals(x0.shape[0], step, generator) if intervals is None else intervals
        t_lo, t_hi, w = (v.to(x0.device, non_blocking=True) for v in (t_lo, t_hi, w))
        z = torch.randn_like(x0) if noise is None else noise
        x_hi = self.schedule.marginal(x0, z, t_hi)
        with torch.no_grad():
            if self.variant == "cd":
                if teacher is None:
                    raise ValueError("consistency distillation (method.name: cd) needs a teacher")
                x_lo = teacher_step(self.solver, teacher, x_hi, t_hi, t_lo, cond)
            else:
                x_lo = self.schedule.marginal(x0, z, t_lo)
            with same_dropout(target, student, x0.device):  # the student's masks (iCT's theta^- = sg(theta))
                tgt = target.consistency(x_lo, t_lo, cond)
        pred = student.consistency(x_hi, t_hi, cond)
        loss = distance(self.distance, pred.float(), tgt.float(), huber_c=self.huber_c, lpips=self.lpips)
        return LossOutput(loss * w.to(loss.dtype), t_hi)

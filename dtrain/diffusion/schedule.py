"""Noise schedules: the only home of alpha_t, sigma_t and lambda_t = log(alpha_t / sigma_t).

Every schedule defines x_t = alpha(t) x_0 + sigma(t) eps over its own time axis and shares one
convention: ``t = 0`` is clean data (alpha = 1, sigma = 0), samplers start at ``t_max`` and may jump
to 0 at the end. Values are computed in float64 whatever the input.

- ``DiscreteVP``: DDPM betas (Ho et al. 2020, arXiv 2006.11239) as a continuous object; knot i/T holds
  sqrt(alphas_cumprod[i-1]); alpha is linear between knots, so index grids reproduce DDPM exactly.
- ``VPLinear``: the continuous VP-SDE (Song et al. 2021, arXiv 2011.13456), beta(t) = b0 + (b1 - b0) t.
- ``VPCosine``: Nichol & Dhariwal 2021 (arXiv 2102.09672), alpha_bar(t) = f(t) / f(0).
- ``SigmaSchedule``: alpha = 1, sigma = t (VE, arXiv 2011.13456, and EDM, arXiv 2206.00364).
- ``FlowSchedule``: rectified flow, alpha = 1 - t, sigma = t (arXiv 2209.03003).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Schedule",
    "DiscreteVP",
    "VPLinear",
    "VPCosine",
    "SigmaSchedule",
    "FlowSchedule",
    "transition",
    "matched_time",
    "linear_betas",
    "cosine_betas",
    "rescale_zero_terminal_snr",
    "make_schedule",
    "schedule_from_config",
    "SCHEDULES",
]


def as_t(t: Tensor | float) -> Tensor:
    """Time as a float64 tensor (on the input's device when it is a tensor)."""
    if isinstance(t, Tensor):
        return t.to(torch.float64)
    return torch.tensor(float(t), dtype=torch.float64)


class Schedule(ABC):
    """x_t = alpha(t) x_0 + sigma(t) eps on t in [0, t_max]; t = 0 is clean data."""

    name: str = "schedule"
    t_min: float  # smallest t a sampler visits before its final jump to 0
    t_max: float  # where sampling starts
    discrete_steps: int | None = None  # T for DDPM-style schedules, else None

    @abstractmethod
    def alpha(self, t: Tensor | float) -> Tensor: ...

    @abstractmethod
    def sigma(self, t: Tensor | float) -> Tensor: ...

    @abstractmethod
    def t_from_lambda(self, lam: Tensor | float) -> Tensor:
        """Inverse of ``lambda_`` (log-SNR / 2)."""

    @abstractmethod
    def alpha_dot(self, t: Tensor | float) -> Tensor:
        """d alpha / dt."""

    @abstractmethod
    def sigma_dot(self, t: Tensor | float) -> Tensor:
        """d sigma / dt."""

    def alpha_dot_below(self, t: Tensor | float) -> Tensor:
        """d alpha / dt from below t: what a sampler stepping down from t integrates (``alpha_dot`` wherever the
        schedule is smooth; at a knot of a piecewise-linear one, the slope of the segment under it)."""
        return self.alpha_dot(t)

    def sigma_dot_below(self, t: Tensor | float) -> Tensor:
        """d sigma / dt from below t (``alpha_dot_below``)."""
        return self.sigma_dot(t)

    @abstractmethod
    def c_noise(self, t: Tensor | float) -> Tensor:
        """The time value the network sees: discrete VP its training index T t - 1, continuous VP 1000 t, EDM / VE
        250 ln sigma (about -1550 to 1100), flow ``c_scale`` t."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the schedule with ``make_schedule``."""

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(alpha(t), sigma(t)); schedules whose sigma derives from alpha evaluate alpha once."""
        return self.alpha(t), self.sigma(t)

    def lambda_(self, t: Tensor | float) -> Tensor:
        """lambda(t) = log(alpha / sigma): +inf at t = 0, -inf where alpha = 0."""
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    def snr(self, t: Tensor | float) -> Tensor:
        return (self.alpha(t) / self.sigma(t)) ** 2

    def marginal(self, x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
        """x_t = alpha x0 + sigma eps, broadcasting t of shape [B] over x0."""
        a, s = (bcast(v, x0) for v in (self.alpha(t), self.sigma(t)))
        return a * x0 + s * eps

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()})"


def _check_range(t_min: float, t_max: float, *, high: float = 1.0, high_open: bool = False) -> None:
    """``schedule.t_min`` / ``t_max``: 0 <= t_min < t_max <= ``high`` (< where open)."""
    if not (0 <= t_min < t_max and (t_max < high if high_open else t_max <= high)):
        hi = "<" if high_open else "<="
        raise ValueError(f"schedule.t_min / t_max: need 0 <= t_min < t_max {hi} {high}, got {t_min}, {t_max}")


def bcast(v: Tensor, like: Tensor) -> Tensor:
    """A scalar or [B] coefficient shaped to multiply ``like`` ([B, ...]), in ``like``'s dtype."""
    v = v.to(device=like.device, dtype=like.dtype)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


def transition(schedule: Schedule, t: Tensor | float, s: Tensor | float) -> tuple[Tensor, Tensor]:
    """(alpha_{t|s}, sigma_{t|s}^2) of q(x_t | x_s) for s < t (Kingma et al. 2021, arXiv 2107.00630)."""
    a_ts = schedule.alpha(t) / schedule.alpha(s)
    var = schedule.sigma(t) ** 2 - a_ts**2 * schedule.sigma(s) ** 2
    return a_ts, var.clamp_min(0.0)


def matched_time(src: Schedule, dst: Schedule, t: Tensor | float) -> tuple[Tensor, Tensor]:
    """(tau, k): the time tau on ``dst`` with the log-SNR of t on ``src`` (clamped to dst's [t_min, t_max]) and the
    factor k = sqrt((alpha_dst^2 + sigma_dst^2)(tau) / (alpha_src^2 + sigma_src^2)(t)) with x_dst = k x_src: where the
    log-SNRs match, k = alpha_dst / alpha_src = sigma_dst / sigma_src, as x / alpha = x0 + (sigma / alpha) eps is the
    same variable on both. Differentiable in t, forward-mode AD included."""
    t = as_t(t)
    tau = dst.t_from_lambda(src.lambda_(t)).clamp(dst.t_min, dst.t_max)
    (a, s), (a_d, s_d) = src.alpha_sigma(t), dst.alpha_sigma(tau)
    return tau, ((a_d**2 + s_d**2) / (a**2 + s**2)).sqrt()


# ---------------------------------------------------------------------------------------------
# VP schedules


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal's betas, clipped at ``max_beta`` (arXiv 2102.09672, eq. 17)."""
    i = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((i / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Shift and scale sqrt(alpha_bar) so the last step has SNR 0 (Lin et al. 2023, arXiv 2305.08891)."""
    a = alphas_cumprod.to(torch.float64).sqrt()
    a0, aT = a[0].clone(), a[-1].clone()
    a = (a - aT) * a0 / (a0 - aT)
    return a**2


class DiscreteVP(Schedule):
    """DDPM's discrete schedule as a continuous object.

    Knot ``i / T`` holds alpha = sqrt(alphas_cumprod[i - 1]) (knot 0 holds 1); the network sees the
    DDPM index ``t T - 1``. Grids made of knots (``timesteps.discrete_grid``) reproduce DDPM / DDIM /
    diffusers exactly (except that diffusers' DDIMScheduler steps to t - T // n, not to the grid's next point, which
    differs with trailing and linspace spacings where T % n != 0); between knots alpha is linear, so lambda stays
    monotone and invertible.
    """

    name = "vp_discrete"

    def __init__(
        self,
        alphas_cumprod: Tensor | None = None,
        *,
        kind: str = "linear",
        T: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        zero_terminal_snr: bool = False,
    ) -> None:
        self.kind, self.beta_start, self.beta_end = kind, beta_start, beta_end
        self.zero_terminal_snr = zero_terminal_snr
        if alphas_cumprod is None and (isinstance(T, bool) or not isinstance(T, int) or T < 2):
            raise ValueError(f"schedule.T: must be an int >= 2 (t runs over i / T, i = 1..T), got {T!r}")
        if alphas_cumprod is None and kind == "linear" and not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"schedule.beta_start / beta_end: need 0 < beta_start <= beta_end < 1, got {beta_start}, "
                             f"{beta_end}")
        if alphas_cumprod is None:
            if kind == "linear":
                betas = linear_betas(T, beta_start, beta_end)
            elif kind == "cosine":
                betas = cosine_betas(T)
            else:
                raise ValueError(f"schedule.kind: unknown discrete VP kind {kind!r}; choose 'linear' or 'cosine'")
            alphas_cumprod = torch.cumprod(1 - betas, 0)
        else:
            self.kind = "custom"
        ac = alphas_cumprod.detach().to(torch.float64).cpu()
        if (ac.ndim != 1 or ac.numel() < 2 or not bool((ac[1:] < ac[:-1]).all())
                or not bool(((ac >= 0) & (ac < 1)).all())):
            raise ValueError("alphas_cumprod must be a strictly decreasing 1-D sequence in [0, 1) of at least 2 values "
                             "(every beta > 0: a repeated value or a first value of 1 leaves a step with no noise)")
        if zero_terminal_snr:
            ac = rescale_zero_terminal_snr(ac)
        self.alphas_cumprod = ac
        self.T = self.discrete_steps = ac.numel()
        self.knots = torch.cat([torch.ones(1, dtype=torch.float64), ac.sqrt()])  # alpha at t = i / T
        self.slopes = self.knots.diff()  # knots[i + 1] - knots[i]
        self.t_min, self.t_max = 1.0 / self.T, 1.0

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Knots and slopes on ``device``, copied once per device (no host sync in a GPU training step)."""
        cache = self.__dict__.setdefault("_device_tables", {})
        if device not in cache:
            cache[device] = (self.knots.to(device), self.slopes.to(device))
        return cache[device]

    def _interp(self, t: Tensor, below: bool = False) -> tuple[Tensor, Tensor]:
        """alpha(t) by linear interpolation between knots, and the segment's slope in knot units: the segment above
        t, or (``below``) under it, which differ only at a knot."""
        u = t.clamp(0, 1) * self.T
        i = ((u.ceil() - 1).clamp_(min=0) if below else u.floor()).clamp_(max=self.T - 1)
        k = i.long()
        knots, slopes = self._tables(t.device)
        slope = slopes[k]
        return knots[k] + (u - i) * slope, slope

    def alpha(self, t: Tensor | float) -> Tensor:
        return self._interp(as_t(t))[0]

    def sigma(self, t: Tensor | float) -> Tensor:
        return (1 - self.alpha(t) ** 2).clamp_min(0).sqrt()

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        a = self.alpha(t)
        return a, (1 - a**2).clamp_min(0).sqrt()

    def alpha_dot(self, t: Tensor | float) -> Tensor:
        return self._interp(as_t(t))[1] * self.T

    def sigma_dot(self, t: Tensor | float) -> Tensor:
        return self._sigma_dot(as_t(t), False)

    def alpha_dot_below(self, t: Tensor | float) -> Tensor:
        return self._interp(as_t(t), True)[1] * self.T

    def sigma_dot_below(self, t: Tensor | float) -> Tensor:
        return self._sigma_dot(as_t(t), True)

    def _sigma_dot(self, t: Tensor, below: bool) -> Tensor:
        a, slope = self._interp(t, below)
        return -a * (slope * self.T) / (1 - a**2).sqrt()

    def t_from_lambda(self, lam: Tensor | float) -> Tensor:
        lam = as_t(lam)
        a = torch.sigmoid(2 * lam).sqrt()  # alpha^2 = sigmoid(2 lambda) on VP
        knots = self._tables(lam.device)[0]
        rev = knots.flip(0)  # increasing
        j = torch.searchsorted(rev, a.clamp(float(rev[0]), 1.0)).clamp(1, self.T)
        i = self.T - j  # knot index with knots[i] >= a >= knots[i + 1]
        lo, hi = knots[i], knots[i + 1]
        frac = ((lo - a) / (lo - hi)).nan_to_num(0.0).clamp(0, 1)
        return (i + frac) / self.T

    def c_noise(self, t: Tensor | float) -> Tensor:
        return as_t(t) * self.T - 1

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "custom":
            return {"name": self.name, "alphas_cumprod": self.alphas_cumprod.tolist()}
        betas = {"beta_start": self.beta_start, "beta_end": self.beta_end} if self.kind == "linear" else {}
        return {"name": self.name, "kind": self.kind, "T": self.T, **betas,  # cosine's betas are its own
                "zero_terminal_snr": self.zero_terminal_snr}


class VPLinear(Schedule):
    """Continuous VP-SDE: log alpha_bar(t) = -(b0 t + (b1 - b0) t^2 / 2) (arXiv 2011.13456)."""

    name = "vp_linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3) -> None:
        if not 0 < beta_min <= beta_max:
            raise ValueError(f"schedule.beta_min / beta_max: need 0 < beta_min <= beta_max, got {beta_min}, {beta_max}")
        _check_range(t_min, 1.0)
        self.b0, self.b1, self.t_min, self.t_max = beta_min, beta_max, t_min, 1.0

    def _log_ab(self, t: Tensor) -> Tensor:
        return -(self.b0 * t + 0.5 * (self.b1 - self.b0) * t**2)

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.exp(0.5 * self._log_ab(as_t(t)))

    def sigma(self, t: Tensor | float) -> Tensor:
        return (-torch.expm1(self._log_ab(as_t(t)))).sqrt()

    def lambda_(self, t: Tensor | float) -> Tensor:
        la = self._log_ab(as_t(t))
        return 0.5 * (la - torch.log(-torch.expm1(la)))

    def alpha_dot(self, t: Tensor | float) -> Tensor:
        t = as_t(t)
        return -0.5 * (self.b0 + (self.b1 - self.b0) * t) * self.alpha(t)

    def sigma_dot(self, t: Tensor | float) -> Tensor:
        t = as_t(t)
        return -self.alpha(t) * self.alpha_dot(t) / self.sigma(t)

    def t_from_lambda(self, lam: Tensor | float) -> Tensor:
        lam = as_t(lam)
        c = torch.nn.functional.softplus(-2 * lam)  # -log alpha_bar
        d = self.b1 - self.b0
        t = 2 * c / (self.b0 + (self.b0**2 + 2 * d * c).sqrt())
        return torch.where(torch.isposinf(c), c, t)  # lambda = -inf: t = inf (inf / inf as written)

    def c_noise(self, t: Tensor | float) -> Tensor:
        return as_t(t) * 1000

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "beta_min": self.b0, "beta_max": self.b1, "t_min": self.t_min}


class VPCosine(Schedule):
    """Continuous cosine schedule, alpha_bar(t) = f(t) / f(0), f = cos^2((t + s)/(1 + s) pi/2).

    ``t_max`` < 1 keeps alpha > 0 (the continuous analogue of clipping betas at 0.999).
    """

    name = "vp_cosine"

    def __init__(self, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946) -> None:
        if not s > 0:
            raise ValueError(f"schedule.s: the cosine offset must be > 0, got {s}")
        _check_range(t_min, t_max, high=1.0, high_open=True)
        self.s, self.t_min, self.t_max = s, t_min, t_max
        self._f0 = math.cos(s / (1 + s) * math.pi / 2)

    def _angle(self, t: Tensor) -> Tensor:
        return (t + self.s) / (1 + self.s) * math.pi / 2

    def alpha(self, t: Tensor | float) -> Tensor:
        return (torch.cos(self._angle(as_t(t))) / self._f0).clamp(0, 1)

    def sigma(self, t: Tensor | float) -> Tensor:
        return (1 - self.alpha(t) ** 2).clamp_min(0).sqrt()

    def alpha_dot(self, t: Tensor | float) -> Tensor:
        return -torch.sin(self._angle(as_t(t))) / self._f0 * math.pi / (2 * (1 + self.s))

    def sigma_dot(self, t: Tensor | float) -> Tensor:
        t = as_t(t)
        return -self.alpha(t) * self.alpha_dot(t) / self.sigma(t)

    def t_from_lambda(self, lam: Tensor | float) -> Tensor:
        a = torch.sigmoid(2 * as_t(lam)).sqrt()
        return (torch.acos((a * self._f0).clamp(-1, 1)) * 2 * (1 + self.s) / math.pi - self.s).clamp_min(0)

    def c_noise(self, t: Tensor | float) -> Tensor:
        return as_t(t) * 1000

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "s": self.s, "t_min": self.t_min, "t_max": self.t_max}


# ---------------------------------------------------------------------------------------------
# Variance-exploding (sigma) and flow schedules


class SigmaSchedule(Schedule):
    """alpha = 1, sigma = t on [sigma_min, sigma_max]: VE (arXiv 2011.13456) and EDM (arXiv 2206.00364).

    The two presets differ only in defaults that live elsewhere (grid, training noise, sigma_data):
    ``edm`` samples on the rho = 7 grid, ``ve`` on a geometric one.
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, name: str = "edm") -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"schedule: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.name, self.t_min, self.t_max = name, sigma_min, sigma_max

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.ones_like(as_t(t))

    def sigma(self, t: Tensor | float) -> Tensor:
        return as_t(t).clone()

    def alpha_dot(self, t: Tensor | float) -> Tensor:
        return torch.zeros_like(as_t(t))

    def sigma_dot(self, t: Tensor | float) -> Tensor:
        return torch.ones_like(as_t(t))

    def t_from_lambda(self, lam: Tensor | float) -> Tensor:
        return torch.exp(-as_t(lam))

    def c_noise(self, t: Tensor | float) -> Tensor:
        return 250 * torch.log(as_t(t).clamp_min(1e-20))  # EDM's c_noise = ln(sigma) / 4, times 1000

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sigma_min": self.t_min, "sigma_max": self.t_max}


class FlowSchedule(Schedule):
    """Rectified flow / flow matching: x_t = (1 - t) x_0 + t eps (arXiv 2209.03003, 2210.02747).

    The network sees c_noise = ``c_scale`` t (1000 by default). Students that differentiate the network in t
    (MeanFlow's JVP) may want a smaller scale: the sinusoidal time features then oscillate less over [0, 1].
    """

    name = "flow"

    def __init__(self, t_min: float = 0.0, t_max: float = 1.0, c_scale: float = 1000.0) -> None:
        if not c_scale > 0:
            raise ValueError(f"schedule.c_scale: must be > 0, got {c_scale}")
        _check_range(t_min, t_max)
        self.t_min, self.t_max, self.c_scale = t_min, t_max, float(c_scale)

    def alpha(self, t: Tensor | float) -> Tensor:
        return 1 - as_t(t)

    def sigma(self, t: Tensor | float) -> Tensor:
        return as_t(t).clone()

    def alpha_dot(self, t: Tensor | float) -> Tensor:
        return -torch.ones_like(as_t(t))

    def sigma_dot(self, t: Tensor | float) -> Tensor:
        return torch.ones_like(as_t(t))

    def t_from_lambda(self, lam: Tensor | float) -> Tensor:
        return torch.sigmoid(-as_t(lam))

    def c_noise(self, t: Tensor | float) -> Tensor:
        return as_t(t) * self.c_scale

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "t_min": self.t_min, "t_max": self.t_max}
        return d if self.c_scale == 1000.0 else {**d, "c_scale": self.c_scale}


# ---------------------------------------------------------------------------------------------
# Registry


def _vp_discrete(**kw: Any) -> DiscreteVP:
    return DiscreteVP(**kw)


SCHEDULES: dict[str, Any] = {
    "vp_discrete": _vp_discrete,
    "ddpm": _vp_discrete,
    "vp_linear": VPLinear,
    "vp_cosine": VPCosine,
    "edm": lambda **kw: SigmaSchedule(name="edm", **{"sigma_min": 0.002, "sigma_max": 80.0, **kw}),
    "ve": lambda **kw: SigmaSchedule(name="ve", **{"sigma_min": 0.01, "sigma_max": 50.0, **kw}),
    "flow": FlowSchedule,
}


def make_schedule(name: str, **kwargs: Any) -> Schedule:
    """Build a schedule by registry name; ``make_schedule(**s.to_dict())`` rebuilds ``s``."""
    if name not in SCHEDULES:
        raise KeyError(f"schedule.name: unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    if "alphas_cumprod" in kwargs:
        kwargs["alphas_cumprod"] = torch.as_tensor(kwargs["alphas_cumprod"], dtype=torch.float64)
    try:
        return SCHEDULES[name](**kwargs)
    except TypeError as e:
        bad = [k for k in kwargs if f"argument '{k}'" in str(e)] or sorted(kwargs)
        raise TypeError(f"schedule.{bad[0]}: schedule {name!r} has no option {bad[0]!r} (bad options {bad}: "
                        f"{e})") from None


def schedule_from_config(cfg: Any) -> Schedule:
    """Build from a recipe's ``schedule`` section (a mapping; unset ``None`` options keep defaults)."""
    d = {k: v for k, v in dict(cfg).items() if v is not None}
    return make_schedule(d.pop("name", "ddpm"), **d)

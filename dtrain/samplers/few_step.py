"""Few-step students at sampling time, shared by evaluation, the CLI and inference bundles.

Consistency models (Song et al. 2023, arXiv 2303.01469; iCT, Song & Dhariwal 2023, arXiv 2310.14189):

- ``ConsistencyModel`` turns any denoiser D (a network in any parameterization: eps, x0, v, velocity, edm)
  into a consistency function with the boundary condition built in. For x_t = alpha x0 + sigma eps and the
  boundary time t_min = ``schedule.t_min``, f is the DDIM step from t to t_min with D's x0 prediction:

      f(x_t, t) = p(t) x_t + q(t) D(x_t, t),   p = sigma_min / sigma_t,   q = alpha_min - p alpha_t

  (``dtrain.samplers.ddim.ddim_coeffs``). As D = c_skip^D x_t + c_out^D F is linear in the network output F,
  this is f = c_skip(t) x_t + c_out(t) F with c_skip = p + q c_skip^D and c_out = q c_out^D, and
  c_skip(t_min) = 1, c_out(t_min) = 0: **f(x, t_min) = x exactly** (t <= t_min is the identity by definition,
  so the equality does not hinge on the last bit of sigma(t_min) / sigma(t_min)). For EDM's schedule
  (alpha = 1) and D in EDM's parameterization, c_out = (sigma - sigma_min) sigma_data / sqrt(sigma^2 +
  sigma_data^2) is Song et al.'s (their App. C) and c_skip = (sigma_min sigma + sigma_data^2) / (sigma^2 +
  sigma_data^2) differs from theirs, sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2), only near sigma_min.
  A student initialised from a teacher's weights therefore starts as the teacher's one-step DDIM jump.
  f lives in x_{t_min} units (the trajectory's point at t_min); ``forward`` returns the clean-data equivalent
  f / alpha_min, so a ``ConsistencyModel`` is a drop-in denoiser: every sampler, CFG and the bundle kind
  "consistency" drive it unchanged.
- ``consistency``: multistep consistency sampling (arXiv 2303.01469, Alg. 1) on any grid t_0 > ... > t_{n-1} > 0:
  x0 = D(x, t_i), then x_{t_{i+1}} = alpha_{t_{i+1}|t_min} (alpha_min x0) + sigma_{t_{i+1}|t_min} z, the exact
  forward transition from the boundary; n steps are n network evaluations, and 1 step is DDIM's. The times are
  the grid's: ``dtrain.samplers.run("consistency", model, x, nfe, grid=...)`` or a bundle's ``sampler.grid``
  chooses them. The default grid (``consistency_grid``) is ``make_grid``'s without its point at t_min, where f is
  the identity and an evaluation would be wasted: n + 1 points of the spacing, the boundary dropped.

Flow maps (students that jump from any t to any s <= t; each wraps a network built with ``model.second_time``,
called as ``net(x, c_noise(t), cond, c_noise(s))``, s = t when the fourth argument is absent):

- ``MeanFlowModel`` (Geng et al. 2025, arXiv 2505.13447), on the flow schedule x_t = (1 - t) x0 + t eps: the
  network predicts the average velocity u(z_t, r, t) = (z_t - z_r) / (t - r), so a jump is z_r = z_t - (t - r) u;
  at r = t, u is the instantaneous velocity (a flow-matching model). Or the network is a two-time denoiser on
  another schedule (a teacher's), read at the same log-SNR: u = (z_t - x0_hat) / t.
- ``CTMModel`` (Kim et al. 2023, arXiv 2310.02279), on any schedule: G(x_t, t, s) is the DDIM step t -> s taken
  with the network's clean estimate g(x_t, t, s), G = p x_t + q g (``ddim_coeffs``; on VE, G = (s/t) x_t +
  (1 - s/t) g, the paper's eq. 4); at s = t, g is an ordinary denoiser and G(x, t, t) = x.
- ``flow_map``: n jumps down a grid (1 step: z_0 = Phi(z_1, 1, 0)); ``gamma`` > 0 is CTM's gamma-sampling, which
  jumps to an earlier time ``gamma_time(s)`` and noises forward to s (gamma = 1: consistency-style multistep).
Both models are ``DenoiserLike`` too (``model(x, t, cond)`` is the clean estimate at s = t), so every sampler
drives them; ``CFGDenoiser.jump`` guides a jump. Times are numbers, 0-d tensors or per-sample [B] tensors.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from dtrain.diffusion.denoiser import Denoiser, DenoiserLike, as_net_input, time_batch
from dtrain.diffusion.param import Coeffs, to_x0_eps
from dtrain.diffusion.schedule import FlowSchedule, Schedule, bcast, matched_time, transition
from dtrain.diffusion.timesteps import default_spacing, make_grid
from dtrain.samplers import SAMPLERS, SamplerSpec
from dtrain.samplers.base import Callback, on_grid, randn_like
from dtrain.samplers.ddim import ddim_coeffs

__all__ = ["ConsistencyModel", "consistency", "consistency_grid"]


class ConsistencyModel(nn.Module):
    """The consistency function over a denoiser D (see the module docstring); ``forward`` = f / alpha(t_min)."""

    def __init__(self, denoiser: DenoiserLike) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.schedule = denoiser.schedule
        self.t_min = float(self.schedule.t_min)
        if not self.t_min > 0:
            raise ValueError(f"consistency: the schedule's t_min must be > 0 (the boundary time), got {self.t_min}")
        self.alpha_min = float(self.schedule.alpha(self.t_min))

    def coeffs(self, t: Tensor | float, x: Tensor) -> tuple[Tensor, Tensor]:
        """(p, q) with f = p x + q D(x, t), broadcast against x; exactly (1, 0) for t <= t_min."""
        t = time_batch(t, x)
        p, q, _ = ddim_coeffs(self.schedule, t, torch.full_like(t, self.t_min))
        boundary = t <= self.t_min
        p = torch.where(boundary, torch.ones_like(p), p)
        q = torch.where(boundary, torch.zeros_like(q), q)
        return bcast(p, x), bcast(q, x)

    @property
    def clip_x0(self) -> float | None:
        return self.denoiser.clip_x0 if isinstance(self.denoiser, Denoiser) else None

    def clean(self, x: Tensor, t: Tensor | float, s: None = None, cond: Any = None, clip: bool = True) -> Tensor:
        """D(x_t, t), the denoiser's clean estimate f is affine in (``clip=False``: unclipped, for guidance)."""
        if isinstance(self.denoiser, Denoiser):
            return self.denoiser(x, t, cond, clip=clip)
        return self.denoiser(x, t, cond)

    def affine(self, x: Tensor, t: Tensor | float, s: None = None) -> tuple[Tensor, Tensor]:
        """(p, q) with ``forward`` = p x + q ``clean`` (``CFGDenoiser`` guides ``clean``, then clips once)."""
        p, q = self.coeffs(t, x)
        return (p, q) if self.alpha_min == 1.0 else (p / self.alpha_min, q / self.alpha_min)

    def consistency(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Tensor:
        """f(x_t, t): the point at t_min of the probability-flow trajectory through x_t; f(x, t_min) = x."""
        p, q = self.coeffs(t, x)
        return p * x + q * self.denoiser(x, t, cond)

    def forward(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Tensor:
        """The clean-data prediction f(x_t, t) / alpha(t_min) (what samplers and guidance read as x0)."""
        f = self.consistency(x, t, cond)
        return f if self.alpha_min == 1.0 else f / self.alpha_min


@torch.no_grad()
def consistency(
    denoiser: DenoiserLike,
    x: Tensor,
    grid: Tensor,
    *,
    cond: Any = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Multistep consistency sampling down ``grid``: one evaluation per step, fresh noise between steps.

    One normal draw of x's shape from ``generator`` per step that does not land on t = 0, after the model call.
    """
    sch = denoiser.schedule
    g, _ = on_grid(sch, grid)
    t_min = float(sch.t_min)
    a_min = float(sch.alpha(t_min))
    a_up, var_up = transition(sch, g[1:].clamp_min(t_min), torch.tensor(t_min, dtype=torch.float64))
    scale, std = (a_up * a_min).tolist(), var_up.sqrt().tolist()
    for i in range(len(g) - 1):
        x0 = denoiser(x, g[i], cond)
        x = scale[i] * x0 + std[i] * randn_like(x0, generator) if g[i + 1] > 0 else x0
        if callback is not None:
            callback({"i": i, "t": g[i], "s": g[i + 1], "x": x, "x0": x0})
    return x


def consistency_grid(schedule: Schedule, n: int, spacing: str | None = None) -> Tensor:
    """n evaluation times above t_min, then 0: ``make_grid(schedule, n)`` when its last evaluation lies above t_min
    (DDPM's trailing spacing), else ``make_grid(schedule, n + 1)`` without that boundary point t_min, where the
    model is the identity (continuous spacings, DDPM's leading and linspace). A discrete schedule has at most T
    steps: at n = T the grid is ``make_grid(schedule, T)``, its last evaluation at t_min. One step is from t_max
    (f(x_T, T)), also where DDPM's leading and linspace spacings would put their one point at the first index."""
    if n == 1 and (spacing or default_spacing(schedule)) in ("leading", "linspace"):
        return torch.tensor([float(schedule.t_max), 0.0], dtype=torch.float64)
    g = make_grid(schedule, n, spacing)
    if n == 1 or float(g[-2]) > schedule.t_min or (schedule.discrete_steps and n >= schedule.discrete_steps):
        return g
    g = make_grid(schedule, n + 1, spacing)
    return torch.cat([g[:-2], g[-1:]])


SAMPLERS.register("consistency", SamplerSpec(consistency, grid=consistency_grid, few_step=True,
                                             doc="Multistep consistency sampling (arXiv 2303.01469, Alg. 1)"))


# ---------------------------------------------------------------------------------------------
# Flow maps (MeanFlow, CTM): students that jump along the probability-flow ODE, x_s = Phi(x_t, t, s), s <= t


class MeanFlowModel(nn.Module):
    """MeanFlow's u(z, r, t) (Geng et al. 2025, arXiv 2505.13447) on the flow schedule, from a two-time network
    (``second_time``) predicting the average velocity (z_t - z_r) / (t - r); see the module docstring.

    ``denoiser``: the network read instead as a two-time ``Denoiser`` on its own schedule and parameterization (a
    teacher's, e.g. discrete VP and v): at the flow time's log-SNR (``matched_time``), its clean estimate
    x0_hat = g(k z, tau(t), tau(r)) gives u = (z - x0_hat) / t, so every jump is the flow's DDIM step with x0_hat (the
    CTM student's G read on the flow schedule), and a network copied from a teacher starts as the teacher's DDIM.
    """

    def __init__(self, net: nn.Module, schedule: Schedule, denoiser: Denoiser | None = None) -> None:
        super().__init__()
        if not isinstance(schedule, FlowSchedule):
            raise ValueError(f"meanflow: needs the flow schedule (schedule.name: flow), not {schedule.name!r}")
        if denoiser is not None and denoiser.net is not net:
            raise ValueError("meanflow: the denoiser must wrap the model's own network")
        self.net, self.schedule = net, schedule
        self._clean = CTMModel(denoiser) if denoiser is not None else None

    def u(self, z: Tensor, r: Tensor | float, t: Tensor | float, cond: Any = None, clip: bool = False) -> Tensor:
        """The average velocity over [r, t]; differentiable in (z, r, t), forward-mode AD included. ``clip``: clip
        the denoiser's x0_hat (``model.clip_x0``; sampling only, as for CTM)."""
        r, t = time_batch(r, z), time_batch(t, z)
        if self._clean is None:
            c = self.schedule.c_noise
            return self.net(as_net_input(self.net, z), c(t).float(), cond, c(r).float()).to(z.dtype)
        return (z - self.clean(z, t, r, cond, clip)) / bcast(t, z)

    @property
    def clip_x0(self) -> float | None:
        """The read-as-denoiser network's clip (``CFGDenoiser`` clips the guided estimate); None on a velocity net."""
        return None if self._clean is None else self._clean.clip_x0

    def clean(self, z: Tensor, t: Tensor | float, s: Tensor | float | None = None, cond: Any = None,
              clip: bool = True) -> Tensor:
        """x0_hat(z_t, t, s) of the read-as-denoiser network (s = None: t), which u and every jump are affine in."""
        t = time_batch(t, z)
        s = t if s is None else time_batch(s, z)
        own, eps = self._clean.schedule, 1e-9  # the flow's log-SNR is infinite at 0 and 1 (a JVP would give 0 * inf)
        (tau_t, k), (tau_s, _) = (matched_time(self.schedule, own, v.clamp(eps, 1 - eps)) for v in (t, s))
        return self._clean.g(z * bcast(k, z), tau_t, tau_s, cond, clip=clip)

    def affine(self, z: Tensor, t: Tensor | float, s: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
        """(p, q) with ``jump`` (``forward`` for s = None) = p z + q ``clean``: the flow's DDIM step t -> s."""
        t = time_batch(t, z)
        frac = torch.zeros_like(t) if s is None else time_batch(s, z) / t
        return bcast(frac, z), bcast(1 - frac, z)

    def jump(self, x: Tensor, t: Tensor | float, s: Tensor | float, cond: Any = None) -> Tensor:
        """z_s = z_t - (t - s) u(z_t, s, t)."""
        t, s = time_batch(t, x), time_batch(s, x)
        return x - bcast(t - s, x) * self.u(x, s, t, cond, clip=True)

    def forward(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Tensor:
        """The clean estimate of the instantaneous velocity u(z, t, t) (the denoiser view)."""
        t = time_batch(t, x)
        return to_x0_eps("velocity", self.u(x, t, t, cond, clip=True), x, Coeffs.at(self.schedule, t, x))[0]


class CTMModel(nn.Module):
    """CTM's G(x_t, t, s) (Kim et al. 2023, arXiv 2310.02279): the DDIM step t -> s with the clean estimate
    g(x_t, t, s) of a ``Denoiser`` over a two-time network (its parameterization, input scaling and ``clip_x0``,
    the clip applied only when ``clip``); see the module docstring."""

    def __init__(self, denoiser: Denoiser) -> None:
        super().__init__()
        self.denoiser = denoiser

    @property
    def schedule(self) -> Schedule:
        return self.denoiser.schedule

    @property
    def clip_x0(self) -> float | None:
        return self.denoiser.clip_x0

    def clean(self, x: Tensor, t: Tensor | float, s: Tensor | float | None = None, cond: Any = None,
              clip: bool = True) -> Tensor:
        """g(x_t, t, s) (s = None: t), which ``jump`` and ``forward`` are affine in."""
        return self.g(x, t, t if s is None else s, cond, clip)

    def affine(self, x: Tensor, t: Tensor | float, s: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
        """(p, q) with ``jump`` (``forward`` for s = None) = p x + q ``clean`` (``ddim_coeffs``; (1, 0) at s = t)."""
        t = time_batch(t, x)
        if s is None:
            return torch.zeros_like(x[:1]), torch.ones_like(x[:1])
        s = time_batch(s, x)
        p, q, _ = ddim_coeffs(self.schedule, t, s)
        p, q = torch.where(t == s, 1.0, p), torch.where(t == s, 0.0, q)
        return bcast(p, x), bcast(q, x)

    def g(self, x: Tensor, t: Tensor | float, s: Tensor | float, cond: Any = None, clip: bool = True) -> Tensor:
        """g(x_t, t, s); ``clip=False`` for training (no clamp, so no dead gradients)."""
        d = self.denoiser
        c_s = self.schedule.c_noise(time_batch(s, x)).float()
        if clip:
            return d.x0_eps(x, t, cond, c_noise_s=c_s)[0]
        c = d.coeffs(t, x, derivatives=d.param == "velocity")
        return to_x0_eps(d.param, d.raw(x, t, cond, c, c_noise_s=c_s).to(x.dtype), x, c)[0]

    def jump(self, x: Tensor, t: Tensor | float, s: Tensor | float, cond: Any = None, clip: bool = True) -> Tensor:
        """G(x_t, t, s) = p x_t + q g(x_t, t, s) (``ddim_coeffs``); G(x, t, t) = x exactly (at t = 0 too)."""
        p, q = self.affine(x, t, s)
        return p * x + q * self.g(x, t, s, cond, clip)

    def forward(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Tensor:
        """g(x_t, t, t): the denoiser view (what CTM's DSM loss trains)."""
        return self.g(x, t, t, cond)


def gamma_time(schedule: Schedule, s: Tensor | float, gamma: float) -> Tensor:
    """The time u <= s that CTM's gamma-sampling jumps to before noising back to s: a fraction gamma^2 of x_s's noise
    variance (in x / alpha units) is fresh, lambda(u) = lambda(s) - log(1 - gamma^2) / 2 (VE: u = sqrt(1 - gamma^2) s,
    arXiv 2310.02279, Sec. 5); gamma = 1 gives u = 0 (multistep consistency sampling)."""
    if gamma >= 1.0:
        return torch.zeros((), dtype=torch.float64)
    return schedule.t_from_lambda(schedule.lambda_(s) - 0.5 * math.log1p(-gamma**2))


@torch.no_grad()
def flow_map(
    model: Any,
    x: Tensor,
    grid: Tensor,
    *,
    cond: Any = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    gamma: float = 0.0,
) -> Tensor:
    """n jumps of a flow map down ``grid`` (n evaluations): x <- Phi(x, t_i, t_{i+1}); 1 step is z_0 = Phi(z_1, 1, 0).

    ``gamma`` > 0 is CTM's gamma-sampling: jump to ``gamma_time(t_{i+1})``, then noise forward to t_{i+1} with one
    normal draw of x's shape from ``generator`` (steps landing on t = 0 are plain jumps).
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"flow_map: gamma must be in [0, 1], got {gamma}")
    sch = model.schedule
    g, _ = on_grid(sch, grid)
    if not hasattr(model, "jump"):
        raise TypeError(f"flow_map sampler: needs a flow-map student (MeanFlow / CTM, with .jump), got "
                        f"{type(model).__name__}")
    for i in range(len(g) - 1):
        t, s = g[i], g[i + 1]
        if gamma > 0 and s > 0:
            u = gamma_time(sch, s, gamma)
            a, var = transition(sch, s, u)
            x = float(a) * model.jump(x, t, u, cond) + float(var.sqrt()) * randn_like(x, generator)
        else:
            x = model.jump(x, t, s, cond)
        if callback is not None:
            callback({"i": i, "t": t, "s": s, "x": x, "x0": x if s == 0 else None})
    return x


__all__ += ["MeanFlowModel", "CTMModel", "gamma_time", "flow_map"]
_FLOW_MAP = {"jump": "a flow-map student (MeanFlow, CTM: a model with .jump)"}
SAMPLERS.register("flowmap", SamplerSpec(flow_map, few_step=True, needs=_FLOW_MAP,
                                         doc="Flow-map jumps (MeanFlow, CTM): n steps, n NFE"))
SAMPLERS.register("flowmap_gamma", SamplerSpec(flow_map, {"gamma": 0.5}, few_step=True, needs=_FLOW_MAP,
                                               doc="CTM gamma-sampling, gamma = 0.5 (arXiv 2310.02279)"))

"""Flow-map students: MeanFlow and CTM losses, per sample [B]. The models are ``dtrain.samplers.few_step``'s
``MeanFlowModel`` (u(z, r, t)) and ``CTMModel`` (G(x_t, t, s)).

MeanFlow (Geng et al. 2025, arXiv 2505.13447), on the flow schedule z_t = (1 - t) x0 + t eps. The average velocity
u(z_t, r, t) = 1/(t - r) int_r^t v(z_tau, tau) dtau obeys u = v - (t - r) du/dt (differentiate (t - r) u = z_t - z_r
in t), with the total derivative du/dt = v d_z u + d_t u along the trajectory. The loss regresses u_theta on the
stop-gradient target v - (t - r) du_theta/dt, du_theta/dt by ``torch.func.jvp`` with tangents (v, 0, 1) on (z, r, t):
- v is the conditional velocity eps - x0 (training from scratch, as the paper), or a teacher's velocity at z_t
  (distillation: lower variance; a teacher on another schedule is read through ``Rescheduled``);
- (r, t): two ``time_sampling`` draws, t the larger; r = t (plain flow matching) except for a fraction ``ratio``,
  of which a fraction ``r_zero`` jumps to r = 0 (the 1-step map, trained directly; as CTM's ``s_zero_prob``). With
  ``r_p_mean`` / ``r_p_std``, r has its own logit-normal law and t keeps its draw: r = min(t, r) for the fraction
  ``ratio`` (so r = t also where r's draw lies above t; the paper's improved CIFAR-10 sampler in its PyTorch code,
  t ~ LN(-0.6, 1.6) and r ~ LN(-4, 1.6));
- adaptive weighting (the paper's Sec. 4.3): the paper weights the squared L2 norm S (a sum over the D elements) by
  sg(1 / (S + c)^p), c = ``adaptive_c`` = 1e-3 as the paper's code; here the per-sample error is the mean d = S / D,
  weighted by sg(1 / (d + c / D)^p), which is the paper's weighted loss times the constant D^(p - 1) (the same at
  p = 1; Adam does not see a constant factor);
- CFG in training (Sec. 4.2): v~ = omega v + kappa u(z, t, t | c) + (1 - omega - kappa) u(z, t, t | null) for labelled
  samples (the network's own predictions, no gradient), labels dropped to the null class with ``cfg_dropout``; with a
  teacher, the teacher is guided with scale omega instead;
- ``jvp="detached"``: the JVP runs without gradient and the loss takes an ordinary forward of the network (one extra
  forward; gradients flow through a plain forward, so every strategy synchronises them as usual);
  ``jvp="fused"``: the JVP's primal output carries the gradient (no extra forward; ``dtrain.lit.flow_map`` then
  all-reduces the gradients itself under DDP, since forward-mode AD is outside DDP's contract, pytorch#102197).
Attention inside the JVP runs on the math SDPA kernel (forward AD is not implemented for the flash kernels).

CTM (Kim et al. 2023, arXiv 2310.02279), on the teacher's schedule. For t > s, u in [s, t):
  x_est = G_theta(x_t, t, s),   x_target = G_theta^-(Solver_teacher(x_t, t -> u), u, s),
theta^- the student without gradient or an EMA of it (the caller's ``target``), both carried to time 0 by
G_sg(theta)(., s, 0) (``compare="zero"``, the paper's choice; ``"s"`` compares at s; these outer jumps use the
current weights without gradient also where ``target`` is an EMA), loss
d(x_est, x_target) plus ``dsm_weight`` times the denoising loss of g_theta(x_t, t, t) (the DSM auxiliary loss). The
teacher solves t -> u in ``teacher_steps`` uniform steps of the shared ``ddim`` / ``heun`` step
(``consistency.teacher_step``); ``max_span`` bounds t - u so a few steps stay accurate (CTM draws u anywhere in
[s, t); null keeps that). Times: CTM draws t, then s <= t, then u in [s, t] uniformly over the indices of its
discretised EDM grid (rho = 7); ``time_sampling: rho`` (the default on the sigma schedules edm and ve) draws them
uniformly on that grid's continuous scale (``dtrain.diffusion.timesteps.rho_times``), other kinds draw t by
``sample_t`` and s, u uniformly in schedule time (the default ``uniform`` on VP and flow schedules, where uniform t
is the usual law; on edm it would put 99% of t above sigma = 1). s is 0 with probability ``s_zero_prob``. CTM's
optional GAN term is not implemented.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dtrain.diffusion.denoiser import DenoiserLike
from dtrain.diffusion.param import Coeffs, from_x0_eps, velocity_ode
from dtrain.diffusion.schedule import Schedule, bcast, matched_time
from dtrain.diffusion.timesteps import TIME_SAMPLERS, rho_times, sample_t
from dtrain.methods.consistency import SOLVERS, distance, teacher_step
from dtrain.methods.denoising import WEIGHTINGS, DenoisingLoss, LossOutput, same_dropout
from dtrain.samplers.few_step import CTMModel, MeanFlowModel

__all__ = [
    "JVP_MODES",
    "MEANFLOW_TIMES",
    "CTM_COMPARE",
    "CTM_TIMES",
    "CTM_DISTANCES",
    "Rescheduled",
    "MeanFlowLoss",
    "CTMLoss",
    "meanflow_target",
]

JVP_MODES = ("detached", "fused")
MEANFLOW_TIMES = ("uniform", "logit_normal")
CTM_COMPARE = ("zero", "s")
CTM_TIMES = ("rho", *TIME_SAMPLERS)  # rho: t, s, u uniform on the rho = 7 grid's scale (CTM's grid indices)
CTM_DISTANCES = ("l2", "l1", "pseudo_huber")


def _noise_and_labels(x0: Tensor, cond: Tensor | None, p_drop: float, null: int, noise: Tensor | None,
                      generator: torch.Generator | None) -> tuple[Tensor, Tensor | None]:
    """Noise (``noise``, or drawn: from ``generator`` on the CPU when given) and the labels with each replaced by the
    null class with probability ``p_drop`` (CFG training)."""
    if noise is None:
        noise = (torch.randn_like(x0) if generator is None else
                 torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device))
    if cond is not None and p_drop > 0:
        keep = (torch.rand(cond.shape, generator=generator) >= p_drop).to(cond.device)
        cond = torch.where(keep, cond, torch.full_like(cond, null))
    return noise, cond


class Rescheduled(nn.Module):
    """A denoiser on another schedule: D'(x, t) = D(k x, tau), (tau, k) = ``matched_time(schedule, D.schedule, t)``,
    tau with the same log-SNR as t (clamped to D's [t_min, t_max]) and k = alpha_D / alpha = sigma_D / sigma."""

    def __init__(self, inner: DenoiserLike, schedule: Schedule) -> None:
        super().__init__()
        self.inner, self.schedule = inner, schedule

    def forward(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Tensor:
        tau, k = matched_time(self.schedule, self.inner.schedule, t)
        return self.inner(x * bcast(k, x), tau, cond)


def meanflow_target(model: MeanFlowModel, z: Tensor, r: Tensor, t: Tensor, v: Tensor, cond: Any = None,
                    fused: bool = False) -> tuple[Tensor, Tensor]:
    """(u_theta(z, r, t), target v - (t - r) du/dt without gradient); du/dt by ``torch.func.jvp`` along (v, 0, 1).

    ``fused``: u is the JVP's primal output (carries the gradient); else the JVP runs without gradient and u comes
    from an ordinary forward.
    """
    def fn(z_: Tensor, r_: Tensor, t_: Tensor) -> Tensor:
        return model.u(z_, r_, t_, cond)

    primals, tangents = (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t))
    with sdpa_kernel(SDPBackend.MATH):
        if fused:
            u, dudt = torch.func.jvp(fn, primals, tangents)
        else:  # with the masks of the forward below: u and du/dt of one network
            with torch.no_grad(), same_dropout(model, model, z.device):
                dudt = torch.func.jvp(fn, primals, tangents)[1]
    if not fused:
        u = fn(z, r, t)
    return u, (v - bcast(t - r, v) * dudt).detach()


def _check_cfg_training(cfg_dropout: float, num_classes: int, guided: bool) -> None:
    """The label dropout and training-time CFG options both flow-map losses share."""
    if not 0.0 <= cfg_dropout < 1.0:
        raise ValueError(f"method.cfg_dropout: must be in [0, 1), got {cfg_dropout}")
    if guided and num_classes == 0:
        raise ValueError("method.cfg_omega: CFG in training needs a class-conditional model (model.num_classes > 0)")


class MeanFlowLoss:
    """Callable ``(model, x0, cond, teacher=) -> LossOutput(loss [B], t [B])``; see the module docstring."""

    def __init__(
        self,
        schedule: Schedule,
        *,
        time_sampling: str = "logit_normal",
        p_mean: float = -0.4,
        p_std: float = 1.0,
        ratio: float = 0.25,
        r_zero: float = 0.0,
        r_p_mean: float | None = None,
        r_p_std: float | None = None,
        adaptive_p: float = 1.0,
        adaptive_c: float = 1e-3,
        cfg_omega: float = 1.0,
        cfg_kappa: float = 0.0,
        cfg_dropout: float = 0.1,
        num_classes: int = 0,
        jvp: str = "detached",
    ) -> None:
        if time_sampling not in MEANFLOW_TIMES:
            raise ValueError(f"method.time_sampling: {time_sampling!r}; choose one of {list(MEANFLOW_TIMES)}")
        if jvp not in JVP_MODES:
            raise ValueError(f"method.jvp: {jvp!r}; choose one of {list(JVP_MODES)}")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"method.ratio: the fraction of r != t samples must be in [0, 1], got {ratio}")
        if not 0.0 <= r_zero <= 1.0:
            raise ValueError(f"method.r_zero: the fraction of r = 0 among r != t must be in [0, 1], got {r_zero}")
        own_r = r_p_mean is not None or r_p_std is not None
        if own_r and time_sampling != "logit_normal":
            raise ValueError(f"method.r_p_mean: r's own law is logit-normal; it needs time_sampling logit_normal, not "
                             f"{time_sampling!r}")
        if r_p_std is not None and not r_p_std > 0:
            raise ValueError(f"method.r_p_std: must be > 0, got {r_p_std}")
        if not p_std > 0:
            raise ValueError(f"method.p_std: must be > 0, got {p_std}")
        if not adaptive_p >= 0:
            raise ValueError(f"method.adaptive_p: the adaptive weight's power must be >= 0, got {adaptive_p}")
        if not (adaptive_c > 0 or (adaptive_c == 0 and adaptive_p == 0)):
            raise ValueError(f"method.adaptive_c: the adaptive weight's offset must be > 0 (0 only with adaptive_p 0), "
                             f"got {adaptive_c}")
        _check_cfg_training(cfg_dropout, num_classes, cfg_omega != 1.0 or cfg_kappa != 0.0)
        self.r_law = ((p_mean if r_p_mean is None else r_p_mean, p_std if r_p_std is None else r_p_std)
                      if own_r else None)  # (mean, std) of r's own logit-normal law
        self.schedule, self.time_sampling, self.p_mean, self.p_std = schedule, time_sampling, p_mean, p_std
        self.ratio, self.r_zero, self.adaptive_p, self.adaptive_c, self.jvp = ratio, r_zero, adaptive_p, adaptive_c, jvp
        self.cfg_omega, self.cfg_kappa = cfg_omega, cfg_kappa
        self.cfg_dropout, self.num_classes = cfg_dropout, num_classes

    @classmethod
    def from_config(cls, method: Mapping[str, Any], model: Mapping[str, Any], schedule: Schedule) -> MeanFlowLoss:
        """From a recipe's ``method`` (meanflow) and ``model`` sections."""
        keys = ("time_sampling", "p_mean", "p_std", "ratio", "r_zero", "r_p_mean", "r_p_std", "adaptive_p",
                "adaptive_c", "cfg_omega", "cfg_kappa", "cfg_dropout", "jvp")
        return cls(schedule, num_classes=int(model.get("num_classes", 0) or 0),
                   **{k: method[k] for k in keys if k in method})

    def sample_times(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(r, t), float64 [n] on the CPU: two draws, t the larger, r = t except for a fraction ``ratio`` (r the
        smaller draw, or 0 for a fraction ``r_zero`` of them). With r's own law (``r_p_mean`` / ``r_p_std``) t is
        its own draw and r = min(t, r's draw)."""
        a, b = (sample_t(self.schedule, n, self.time_sampling, generator=generator, p_mean=m, p_std=sd)
                for m, sd in ((self.p_mean, self.p_std), self.r_law or (self.p_mean, self.p_std)))
        t, r = a if self.r_law else torch.maximum(a, b), torch.minimum(a, b)
        apart = torch.rand(n, generator=generator, dtype=torch.float64) < self.ratio
        if self.r_zero > 0:  # drawn only then: runs without it keep their random stream
            r = torch.where(torch.rand(n, generator=generator, dtype=torch.float64) < self.r_zero, 0.0, r)
        return torch.where(apart, r, t), t

    def __call__(
        self,
        model: MeanFlowModel,
        x0: Tensor,
        cond: Tensor | None = None,
        *,
        teacher: DenoiserLike | None = None,
        r: Tensor | None = None,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """Per-sample loss at times (r, t) and noise ``noise``, drawn (from ``generator``) when None."""
        if t is None or r is None:
            r, t = self.sample_times(x0.shape[0], generator)
        r, t = r.to(x0.device, torch.float64), t.to(x0.device, torch.float64)
        eps, labels = _noise_and_labels(x0, cond if self.num_classes > 0 else None, self.cfg_dropout,
                                        self.num_classes, noise, generator)
        z = self.schedule.marginal(x0, eps, t)
        c = Coeffs.at(self.schedule, t, x0)
        with torch.no_grad():
            if teacher is not None:
                v = velocity_ode(teacher(z, t, labels), z, c)
            else:
                v = from_x0_eps("velocity", x0, eps, z, c)
                if labels is not None and (self.cfg_omega != 1.0 or self.cfg_kappa != 0.0):
                    v = self._guided_velocity(model, z, t, v, labels)
        u, target = meanflow_target(model, z, r, t, v, labels, fused=self.jvp == "fused")
        d = (u.float() - target.float()).square().flatten(1).mean(1)
        if self.adaptive_p > 0:  # c / D: the paper's c is on the sum over the D = x0[0].numel() elements
            d = d / (d.detach() + self.adaptive_c / x0[0].numel()) ** self.adaptive_p
        return LossOutput(d, t)

    def _guided_velocity(self, model: MeanFlowModel, z: Tensor, t: Tensor, v: Tensor, labels: Tensor) -> Tensor:
        """omega v + kappa u(z, t, t | c) + (1 - omega - kappa) u(z, t, t | null) where the label was kept."""
        null = torch.full_like(labels, self.num_classes)
        u_c, u_n = model.u(torch.cat([z, z]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
        w, k = self.cfg_omega, self.cfg_kappa
        guided = w * v + k * u_c + (1 - w - k) * u_n
        kept = (labels != self.num_classes).reshape(-1, *([1] * (v.ndim - 1)))
        return torch.where(kept, guided, v)


class _SgJump(nn.Module):
    """``model.jump(x, s, 0)`` as a module (for ``torch.func.functional_call`` with detached weights)."""

    def __init__(self, model: CTMModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Any) -> Tensor:
        return self.model.jump(x, t, s, cond, clip=False)


class CTMLoss:
    """Callable ``(model, teacher, x0, cond, target=) -> LossOutput(loss [B], t [B])``; see the module docstring."""

    def __init__(
        self,
        schedule: Schedule,
        *,
        param: str = "v",
        sigma_data: float = 0.5,
        time_sampling: str | None = None,
        p_mean: float | None = None,
        p_std: float | None = None,
        solver: str = "heun",
        teacher_steps: int = 1,
        max_span: float | None = None,
        s_zero_prob: float = 0.0,
        compare: str = "zero",
        distance: str = "l2",
        huber_c: float | None = None,
        dsm_weight: float = 1.0,
        dsm_weighting: str = "none",
        cfg_dropout: float = 0.0,
        num_classes: int = 0,
    ) -> None:
        if solver not in SOLVERS:
            raise ValueError(f"method.solver: unknown {solver!r}; choose one of {list(SOLVERS)}")
        if compare not in CTM_COMPARE:
            raise ValueError(f"method.compare: {compare!r}; choose one of {list(CTM_COMPARE)}")
        if distance not in CTM_DISTANCES:
            raise ValueError(f"method.distance: {distance!r}; choose one of {list(CTM_DISTANCES)}")
        if dsm_weighting not in WEIGHTINGS:
            raise ValueError(f"method.dsm_weighting: {dsm_weighting!r}; choose one of {list(WEIGHTINGS)}")
        for key, value, ok, need in (("teacher_steps", teacher_steps, teacher_steps >= 1, ">= 1"),
                                     ("max_span", max_span, max_span is None or max_span > 0, "> 0 (or null)"),
                                     ("s_zero_prob", s_zero_prob, 0 <= s_zero_prob <= 1, "in [0, 1]"),
                                     ("p_std", p_std, p_std is None or p_std > 0, "> 0 (or null)"),
                                     ("dsm_weight", dsm_weight, dsm_weight >= 0, ">= 0"),
                                     ("huber_c", huber_c, huber_c is None or huber_c > 0, "> 0 (or null)")):
            if not ok:
                raise ValueError(f"method.{key}: must be {need}, got {value}")
        _check_cfg_training(cfg_dropout, num_classes, False)
        if time_sampling is None:
            time_sampling = "rho" if schedule.name in ("edm", "ve") else "uniform"
        if time_sampling not in CTM_TIMES:
            raise ValueError(f"method.time_sampling: unknown {time_sampling!r}; choose one of {list(CTM_TIMES)}")
        if time_sampling == "rho":
            rho_times(schedule, torch.zeros(1))  # a schedule without a rho scale fails here, naming the field
        self.schedule, self.time_sampling, self.p_mean, self.p_std = schedule, time_sampling, p_mean, p_std
        self.solver, self.teacher_steps, self.max_span, self.s_zero_prob = solver, teacher_steps, max_span, s_zero_prob
        self.compare, self.distance, self.huber_c, self.dsm_weight = compare, distance, huber_c, dsm_weight
        self.cfg_dropout, self.num_classes = cfg_dropout, num_classes
        self.dsm = DenoisingLoss(schedule, param, weighting=dsm_weighting, sigma_data=sigma_data)
        # the teacher's solve ends at u >= u_min > 0 (Heun's per-sample step needs sigma(u) > 0)
        self.u_min = float(schedule.t_min) if schedule.t_min > 0 else 1e-3 * float(schedule.t_max)

    @classmethod
    def from_config(cls, method: Mapping[str, Any], model: Mapping[str, Any], schedule: Schedule) -> CTMLoss:
        """From a recipe's ``method`` (ctm) and ``model`` sections."""
        keys = ("time_sampling", "p_mean", "p_std", "solver", "teacher_steps", "max_span", "s_zero_prob", "compare",
                "distance", "huber_c", "dsm_weight", "dsm_weighting", "cfg_dropout")
        return cls(schedule, param=model.get("param", "eps"), sigma_data=float(model.get("sigma_data", 0.5)),
                   num_classes=int(model.get("num_classes", 0) or 0), **{k: method[k] for k in keys if k in method})

    def sample_times(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(t, u, s), float64 [n] on the CPU, with s <= u <= t and u >= u_min."""
        if self.time_sampling == "rho":  # positions q (0: t_max, 1: t_min) uniform as CTM's grid indices
            q_t = torch.rand(n, generator=generator, dtype=torch.float64)
            a, b, c = torch.rand(3, n, generator=generator, dtype=torch.float64)
            zero = c < self.s_zero_prob
            q_s = torch.where(zero, torch.ones_like(q_t), q_t + a * (1 - q_t))  # s = 0: u anywhere down to t_min
            t, s, u = (rho_times(self.schedule, q) for q in (q_t, q_s, q_t + b * (q_s - q_t)))
            s = torch.where(zero, torch.zeros_like(t), s)
        else:
            t = sample_t(self.schedule, n, self.time_sampling, generator=generator, p_mean=self.p_mean,
                         p_std=self.p_std)
            a, b, c = torch.rand(3, n, generator=generator, dtype=torch.float64)
            s = torch.where(c < self.s_zero_prob, torch.zeros_like(t), a * t)
            u = s + b * (t - s)
        if self.max_span is not None:
            u = torch.maximum(u, t - self.max_span)
        return t, torch.minimum(torch.maximum(u, torch.full_like(u, self.u_min)), t), s

    def __call__(
        self,
        model: CTMModel,
        teacher: DenoiserLike,
        x0: Tensor,
        cond: Tensor | None = None,
        *,
        target: CTMModel | None = None,
        times: tuple[Tensor, Tensor, Tensor] | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """Per-sample loss at times (t, u, s) and noise ``noise``, drawn (from ``generator``) when None; the jump
        u -> s of the target by ``target`` (theta^-, e.g. an EMA copy; None: ``model`` without gradient)."""
        t, u, s = self.sample_times(x0.shape[0], generator) if times is None else times
        t, u, s = (v.to(x0.device, torch.float64) for v in (t, u, s))
        eps, labels = _noise_and_labels(x0, cond if self.num_classes > 0 else None, self.cfg_dropout,
                                        self.num_classes, noise, generator)
        x_t = self.schedule.marginal(x0, eps, t)
        zero = torch.zeros_like(s)
        with torch.no_grad():
            x_u, k = x_t, self.teacher_steps
            for i in range(k):  # uniform sub-steps t -> u
                a, b = t + (u - t) * (i / k), t + (u - t) * ((i + 1) / k)
                x_u = teacher_step(self.solver, teacher, x_u, a, b, labels)
            x_target = (model if target is None else target).jump(x_u, u, s, labels, clip=False)
            if self.compare == "zero":
                x_target = model.jump(x_target, s, zero, labels, clip=False)
        est = model.jump(x_t, t, s, labels, clip=False)
        if self.compare == "zero":  # G_sg(theta)(est, s, 0): gradient to est, none to the weights
            sg = {k: v.detach() for k, v in model.named_parameters(prefix="model")}
            est = torch.func.functional_call(_SgJump(model), sg, (est, s, zero, labels), strict=False)
        loss = distance(self.distance, est.float(), x_target.float(), huber_c=self.huber_c)
        if self.dsm_weight > 0:
            loss = loss + self.dsm_weight * self.dsm(model.denoiser, x0, labels, t=t, noise=eps).loss
        return LossOutput(loss, t)

"""Conversions between network parameterizations: one function each way.

With x_t = alpha x0 + sigma eps (Prop. 6.3.1 of arXiv 2510.21890):
  eps        the noise                                  (Ho et al. 2020, arXiv 2006.11239)
  x0         the clean sample
  v          alpha eps - sigma x0                       (Salimans & Ho 2022, arXiv 2202.00512)
  velocity   alpha' x0 + sigma' eps = dx_t/dt           (flow matching, arXiv 2210.02747)
  score      grad log p_t(x_t) = -eps / sigma
  edm        F with x0 = c_skip x_t + c_out F           (Karras et al. 2022, arXiv 2206.00364)
Every kind goes to (x0, eps) with ``to_x0_eps`` and back with ``from_x0_eps``; ``convert`` chains them.
Coefficients must already be broadcast to x_t's shape (see ``Coeffs.at``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from dtrain.diffusion.schedule import Schedule, bcast

PARAMS = ("eps", "x0", "v", "velocity", "score", "edm")

__all__ = ["PARAMS", "Coeffs", "to_x0_eps", "from_x0_eps", "convert", "edm_skip_out", "edm_c_in", "check_param",
           "terminal_snr_conflict", "velocity_ode"]


@dataclass(frozen=True)
class Coeffs:
    """alpha, sigma and their time derivatives at t, broadcast against a batch, plus sigma_data.

    Fields are tensors shaped for broadcasting (or plain floats); the derivatives may be left out
    (``None``) where no ``velocity`` conversion needs them.
    """

    alpha: Tensor | float
    sigma: Tensor | float
    alpha_dot: Tensor | float | None = None
    sigma_dot: Tensor | float | None = None
    sigma_data: float = 1.0

    @staticmethod
    def at(
        schedule: Schedule, t: Tensor | float, like: Tensor, sigma_data: float = 1.0, derivatives: bool = True,
        below: bool = False,
    ) -> Coeffs:
        """Coefficients at t (a scalar or [B]) in ``like``'s dtype and shape for broadcasting; ``below``: the
        derivatives from below t (``Schedule.alpha_dot_below``, for a step down from t)."""
        dots = (schedule.alpha_dot_below, schedule.sigma_dot_below) if below else (schedule.alpha_dot,
                                                                                    schedule.sigma_dot)
        vals = schedule.alpha_sigma(t) + (tuple(d(t) for d in dots) if derivatives else ())
        return Coeffs(*(bcast(v, like) for v in vals), sigma_data=sigma_data)

    def dots(self) -> tuple[Tensor | float, Tensor | float]:
        """(alpha_dot, sigma_dot); an error if they were left out."""
        if self.alpha_dot is None or self.sigma_dot is None:
            raise ValueError("param: 'velocity' needs alpha_dot and sigma_dot; build Coeffs.at(..., derivatives=True)")
        return self.alpha_dot, self.sigma_dot


def check_param(kind: str) -> str:
    if kind not in PARAMS:
        raise ValueError(f"param: unknown parameterization {kind!r}; choose one of {list(PARAMS)}")
    return kind


def terminal_snr_conflict(kind: str, schedule: Schedule, what: str = "the network") -> str | None:
    """Why an ``eps`` (or ``score``) network (``what``, in the message) cannot serve ``schedule`` (x0 = (x_t - sigma
    eps) / alpha, and alpha(t_max) = 0 on zero terminal SNR schedules and the flow; Lin et al. 2023,
    arXiv 2305.08891), or None."""
    if kind not in ("eps", "score"):
        return None
    alpha_end = float(schedule.alpha(schedule.t_max))
    if alpha_end > 1e-6:
        return None
    return (f"{kind!r} is undefined at zero terminal SNR: schedule {schedule.name!r} has alpha(t_max) = "
            f"{alpha_end:.3g}, so {what} cannot recover x0 there; use v, x0, velocity or edm")


def _edm_terms(alpha: Tensor | float, sigma: Tensor | float, sigma_data: float) -> tuple[Any, Any, Any, Any]:
    """(alpha, sigma, d2 = (alpha sigma_data)^2 + sigma^2, the inputs' dtype or None for floats), half-precision
    tensors widened to float32 (sigma^2 overflows float16 above sigma = 256)."""
    tensors = [v for v in (alpha, sigma) if isinstance(v, Tensor)]
    a, s = (v.float() if isinstance(v, Tensor) and v.element_size() < 4 else v for v in (alpha, sigma))
    return a, s, (a * sigma_data) ** 2 + s**2, tensors[0].dtype if tensors else None


def edm_skip_out(alpha: Tensor | float, sigma: Tensor | float, sigma_data: float) -> tuple[Tensor, Tensor]:
    """c_skip, c_out of EDM generalised to x_t = alpha x0 + sigma eps (arXiv 2206.00364, Table 1); formed in float32
    at least, returned in the inputs' dtype."""
    a, s, d2, dtype = _edm_terms(alpha, sigma, sigma_data)
    skip, out = a * sigma_data**2 / d2, s * sigma_data / d2**0.5
    return (skip.to(dtype), out.to(dtype)) if dtype is not None else (skip, out)


def edm_c_in(alpha: Tensor | float, sigma: Tensor | float, sigma_data: float) -> Tensor | float:
    """EDM's input scale c_in = 1 / sqrt((alpha sigma_data)^2 + sigma^2) (unit-variance network inputs); formed in
    float32 at least, returned in the inputs' dtype."""
    _, _, d2, dtype = _edm_terms(alpha, sigma, sigma_data)
    return d2**-0.5 if dtype is None else (d2**-0.5).to(dtype)


def to_x0_eps(kind: str, pred: Tensor, x_t: Tensor, c: Coeffs) -> tuple[Tensor, Tensor]:
    """(x0, eps) implied by a prediction of the given kind at x_t."""
    a, s = c.alpha, c.sigma
    if kind == "eps":
        return (x_t - s * pred) / a, pred
    if kind == "score":
        eps = -s * pred
        return (x_t - s * eps) / a, eps
    if kind == "x0":
        x0 = pred
    elif kind == "v":  # a^2 + s^2 need not be 1 (VE, flow): solve the 2x2 system
        n = a**2 + s**2
        x0 = (a * x_t - s * pred) / n
        return x0, (s * x_t + a * pred) / n
    elif kind == "velocity":
        a_dot, s_dot = c.dots()
        det = a * s_dot - s * a_dot
        return (s_dot * x_t - s * pred) / det, (a * pred - a_dot * x_t) / det
    elif kind == "edm":
        skip, out = edm_skip_out(a, s, c.sigma_data)
        x0 = skip * x_t + out * pred
    else:
        check_param(kind)
        raise AssertionError
    return x0, (x_t - a * x0) / s


def from_x0_eps(kind: str, x0: Tensor, eps: Tensor, x_t: Tensor, c: Coeffs) -> Tensor:
    """The prediction of the given kind that corresponds to (x0, eps) at x_t."""
    a, s = c.alpha, c.sigma
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return a * eps - s * x0
    if kind == "velocity":
        a_dot, s_dot = c.dots()
        return a_dot * x0 + s_dot * eps
    if kind == "score":
        return -eps / s
    if kind == "edm":
        skip, out = edm_skip_out(a, s, c.sigma_data)
        return (x0 - skip * x_t) / out
    check_param(kind)
    raise AssertionError


def convert(pred: Tensor, src: str, dst: str, x_t: Tensor, c: Coeffs) -> Tensor:
    """Convert a ``src`` prediction at x_t into the equivalent ``dst`` prediction."""
    if src == dst:
        check_param(src)
        return pred
    x0, eps = to_x0_eps(src, pred, x_t, c)
    return from_x0_eps(dst, x0, eps, x_t, c)


def velocity_ode(x0_hat: Tensor, x_t: Tensor, c: Coeffs) -> Tensor:
    """dx/dt of the probability-flow ODE given the denoiser's x0: alpha' x0 + sigma' eps_hat."""
    a_dot, s_dot = c.dots()
    eps = (x_t - c.alpha * x0_hat) / c.sigma
    return a_dot * x0_hat + s_dot * eps

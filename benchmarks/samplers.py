"""dtrain's DDIM and DPM-Solver++(2M) against diffusers' scheduler loops: wall time and output agreement.

Both sides drive the same small conv network (eps prediction, 3x32x32, batch 16) from the same x_T over the
same timesteps (trailing spacing, diffusers' float32 ``alphas_cumprod``); dtrain runs ``make_grid`` + the
sampler, diffusers ``set_timesteps`` + its ``step`` loop. Repeats are interleaved (dtrain and diffusers
alternate, which goes first alternates too) and the median is reported. CPU only.

    python benchmarks/samplers.py [--threads 2] [--repeats 7] [--nfe 10 25 50] [--out benchmarks/results/samplers.json]

A second pass with an identity network times the sampler loops alone (schedule coefficients, conversions,
step arithmetic): the part where the two implementations differ.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dtrain.diffusion.denoiser import Denoiser
from dtrain.diffusion.schedule import DiscreteVP
from dtrain.diffusion.timesteps import make_grid
from dtrain.samplers import ddim, dpm_solver_pp


class SmallConvNet(nn.Module):
    """eps_hat = x + 0.1 * (four 3x3 convolutions with a sinusoidal time embedding after the first).

    The identity term is the exact eps of N(0, I) data at low noise, so x0_hat stays O(1) and the
    agreement with diffusers is measured on O(1) outputs.
    """

    def __init__(self, ch: int = 32, emb: int = 32) -> None:
        super().__init__()
        self.emb = emb
        self.t_proj = nn.Linear(emb, ch)
        self.convs = nn.ModuleList([nn.Conv2d(3, ch, 3, padding=1), nn.Conv2d(ch, ch, 3, padding=1),
                                    nn.Conv2d(ch, ch, 3, padding=1), nn.Conv2d(ch, 3, 3, padding=1)])

    def forward(self, x: Tensor, t: Tensor, cond: object = None) -> Tensor:
        t = t.to(x.dtype).reshape(-1).expand(x.shape[0])
        freqs = torch.exp(-math.log(1e4) * torch.arange(self.emb // 2, device=x.device) / (self.emb // 2))
        e = t[:, None] * freqs[None]
        h = self.convs[0](x) + self.t_proj(torch.cat([e.sin(), e.cos()], 1))[:, :, None, None]
        for conv in self.convs[1:]:
            h = conv(torch.nn.functional.silu(h))
        return x + 0.1 * h


def dtrain_run(sampler: str, denoiser: Denoiser, x_T: Tensor, nfe: int) -> Tensor:
    grid = make_grid(denoiser.schedule, nfe, "trailing")
    if sampler == "ddim":
        return ddim(denoiser, x_T, grid)
    return dpm_solver_pp(denoiser, x_T, grid, order=2)


def diffusers_scheduler(sampler: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    kw = {"num_train_timesteps": 1000, "beta_schedule": "linear", "timestep_spacing": "trailing"}
    if sampler == "ddim":
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **kw)
    return DPMSolverMultistepScheduler(solver_order=2, algorithm_type="dpmsolver++", **kw)


@torch.no_grad()
def diffusers_run(sch, net: nn.Module, x_T: Tensor, nfe: int) -> Tensor:
    sch.set_timesteps(nfe)  # resets the multistep state too
    x = x_T
    for t in sch.timesteps:
        eps = net(x, t.expand(x.shape[0]), None)
        x = sch.step(eps, t, x).prev_sample
    return x



class Identity(nn.Module):
    """A network that costs ~nothing (eps_hat = x): the timing is then the sampler loop's own overhead."""

    def forward(self, x: Tensor, t: Tensor, cond: object = None) -> Tensor:
        return x


def bench(net: nn.Module, x_T: Tensor, ac: Tensor, nfes: list[int], repeats: int) -> list[dict]:
    """Median wall time of dtrain and diffusers per (sampler, NFE), interleaved, and the outputs' max |diff|."""
    den = Denoiser(net, DiscreteVP(alphas_cumprod=ac), "eps")  # diffusers' float32 alphas_cumprod (parity tests)
    schedulers = {s: diffusers_scheduler(s) for s in ("ddim", "dpm++2m")}
    runners = {
        "dtrain": lambda s, n: dtrain_run(s, den, x_T, n),
        "diffusers": lambda s, n: diffusers_run(schedulers[s], net, x_T, n),
    }
    cases = [(s, n) for s in ("ddim", "dpm++2m") for n in nfes]
    times: dict[tuple[str, int], dict[str, list[float]]] = {c: {"dtrain": [], "diffusers": []} for c in cases}
    diffs = {c: float((runners["dtrain"](*c) - runners["diffusers"](*c)).abs().max()) for c in cases}  # + warm-up
    for r in range(repeats):
        for c in cases:
            for who in ("dtrain", "diffusers") if r % 2 == 0 else ("diffusers", "dtrain"):
                t0 = time.perf_counter()
                runners[who](*c)
                times[c][who].append(time.perf_counter() - t0)
    rows = []
    for s, n in cases:
        a, b = statistics.median(times[(s, n)]["dtrain"]), statistics.median(times[(s, n)]["diffusers"])
        rows.append({"sampler": s, "nfe": n, "dtrain_s": round(a, 6), "diffusers_s": round(b, 6),
                     "ratio": round(a / b, 4), "max_abs_diff": diffs[(s, n)]})
        print(f"  {s:8s} nfe={n:3d}  dtrain {a * 1e3:8.2f} ms  diffusers {b * 1e3:8.2f} ms  ratio {a / b:.3f}  "
              f"max|diff| {diffs[(s, n)]:.2e}")
    return rows


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--nfe", type=int, nargs="+", default=[10, 25, 50])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "samplers.json"))
    args = p.parse_args()

    import diffusers
    from diffusers import DDIMScheduler

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ac = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod
    x_T = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    print("SmallConvNet (end-to-end):")
    rows = bench(SmallConvNet().eval(), x_T, ac, args.nfe, args.repeats)
    print("Identity network (sampler-loop overhead only):")
    overhead = bench(Identity(), x_T, ac, args.nfe, 3 * args.repeats)
    for r in overhead:
        r["dtrain_us_per_step"] = round(r["dtrain_s"] / r["nfe"] * 1e6, 1)
        r["diffusers_us_per_step"] = round(r["diffusers_s"] / r["nfe"] * 1e6, 1)
    result = {
        "results": rows,
        "overhead": overhead,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "diffusers": diffusers.__version__, "threads": torch.get_num_threads(),
                    "python": platform.python_version(), "load_avg_1m": round(os.getloadavg()[0], 2)},
        "setup": {"network": "SmallConvNet(ch=32): 4 conv3x3 + time embedding, eps prediction",
                  "shape": [args.batch, 3, 32, 32], "spacing": "trailing", "repeats": args.repeats,
                  "statistic": "median of interleaved repeats (dtrain/diffusers alternate, order alternates)",
                  "overhead": "same loops with an identity network, 3x the repeats"},
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

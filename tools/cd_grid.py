#!/usr/bin/env python
"""Pick a consistency-distillation grid before training: the teacher's composite target error per grid.

    python tools/cd_grid.py runs/teacher-digits/checkpoints/last.ckpt --num-scales 6,8,12,18 \
        --spacings lambda,uniform,rho --solver dpm++2s

For each grid (``method.num_scales`` points of ``method.spacing``) it prints the RMS distance at t_min between one
teacher step per interval, chained from x_T (the targets CD trains on) and the same ODE solved ``--refine`` times
finer (``dtrain.methods.consistency.target_bias``). A CD student is at best this far from the teacher's ODE; fewer
points mean fewer links for the student to propagate through, so take the smallest grid whose bias is small. The
digits recipe's choice (``recipes/cm/cd_digits.yaml``) came from this table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("teacher", help="teacher checkpoint or bundle")
    p.add_argument("--num-scales", default="6,8,12,18", help="comma-separated grid sizes N (points incl. t_min)")
    p.add_argument("--spacings", default="lambda,uniform,rho", help="comma-separated method.spacing values")
    p.add_argument("--solver", default="dpm++2s", help="method.solver: ddim, heun or dpm++2s")
    p.add_argument("--num", type=int, default=256, help="trajectories (classes cycle for a conditional teacher)")
    p.add_argument("--refine", type=int, default=8, help="steps per interval of the reference solve")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: small models on a shared "
                   "machine stall with more; 0 = torch's default)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from dtrain.errors import InputError
    from dtrain.export.checkpoint import load_teacher
    from dtrain.methods.consistency import GRID_SPACINGS, SOLVERS, consistency_times, target_bias
    from dtrain.samplers.base import initial_noise

    try:
        sizes = [int(v) for v in args.num_scales.split(",")]
    except ValueError:
        print(f"cd_grid: --num-scales: need comma-separated integers, got {args.num_scales!r}", file=sys.stderr)
        return 2
    bad = [v for v in args.spacings.split(",") if v not in GRID_SPACINGS]
    problems = [f"--num-scales: need integers >= 2, got {args.num_scales!r}" * (min(sizes) < 2),
                f"--spacings: unknown {','.join(bad)!r}; choose from {', '.join(GRID_SPACINGS)}" * bool(bad),
                f"--num: need an integer >= 1, got {args.num}" * (args.num < 1),
                f"--refine: need an integer >= 2 (steps per interval), got {args.refine}" * (args.refine < 2),
                f"--solver: unknown {args.solver!r}; choose from {', '.join(SOLVERS)}" * (args.solver not in SOLVERS),
                f"--threads: need an integer >= 0, got {args.threads}" * (args.threads < 0)]
    if any(problems):
        print(f"cd_grid: {next(m for m in problems if m)}", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        teacher, info = load_teacher(args.teacher)
    except (FileNotFoundError, InputError) as e:
        print(f"cd_grid: {e}", file=sys.stderr)
        return 2
    sch = teacher.schedule
    x = initial_noise(sch, args.num, info["image"]["shape"], torch.Generator().manual_seed(args.seed))
    k = info["model"].get("num_classes") or 0
    cond = torch.arange(args.num) % k if k else None
    print(f"{'spacing':10s} {'N':>3s} {'bias':>8s}   log-SNR of the grid (t_max first)")
    done = 0
    for spacing in args.spacings.split(","):
        for n in sizes:
            try:
                ts = consistency_times(sch, n, spacing)
                bias = target_bias(teacher, ts, x, cond, solver=args.solver, refine=args.refine)
            except ValueError as e:  # a grid this schedule cannot have: its row says why, the others go on
                print(f"{spacing:10s} {n:3d} {'-':>8s}   not on the {sch.name} schedule: {e}", flush=True)
                continue
            lam = " ".join(f"{float(v):+.1f}" for v in sch.lambda_(ts).flip(0))
            print(f"{spacing:10s} {n:3d} {bias:8.4f}   {lam}", flush=True)
            done += 1
    if not done:
        print(f"cd_grid: --spacings: none of {args.spacings!r} gives a consistency grid on the teacher's "
              f"{sch.name!r} schedule", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

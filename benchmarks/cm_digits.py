"""Consistency students of the digits teacher on CPU: FID-digits of CD and iCT at 1 and 2 steps, next to the teacher's
DDIM at 1 and 2 steps and the teacher's best (its lowest FID over DDIM / DPM-Solver++(2M) up to 64 NFE).

    python benchmarks/cm_digits.py [--num 2000] [--cd key=value ...] [--ict key=value ...]

The teacher is ``benchmarks/common.py: digits_teacher()`` (recipes/teacher/digits.yaml, cached in runs/bench); the
students are ``recipes/cm/cd_digits.yaml`` and ``recipes/cm/ict_digits.yaml`` trained through ``dtrain.lit.fit.fit``
(the code path of ``dtrain fit``) into runs/bench/{cd,ict}-digits, reused while their resolved recipe is unchanged.
Every point scores ``--num`` class-balanced samples without guidance (w = 1) against the FID-digits statistics of the
1347-image train split, from the same x_T (``dtrain.eval.sweep``); the teacher's points are cached in
runs/bench/fid_cache and shared with benchmarks/pd_digits.py (same teacher, num, seed). Two-step consistency sampling
is reported on the default grid (``consistency_grid``: t = 0.5 in the middle for this schedule) and at the middle time
that a scan on another seed (``--scan-num`` samples) picks, as Song et al. choose theirs. Goals (the issue's): 1-step
FID <= 2x the teacher's best, and <= 1/2 of the teacher's DDIM at the same NFE.
Writes benchmarks/results/cm_digits.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_RUNS, ROOT, cached_fid_rows, digits_teacher, fit_once, machine

from dtrain.eval.features import build_extractor
from dtrain.eval.fid import FID, load_ref
from dtrain.eval.sweep import fid_sweep, generate, global_batches
from dtrain.export.checkpoint import load_teacher, sha256_file

RESULTS = ROOT / "benchmarks" / "results"
QUIET = ["logger.mode=disabled", "trainer.progress_bar=false", "trainer.sample_every_n_steps=0"]


def student(recipe: str, teacher: Path, overrides: list[str]) -> tuple[Path, float | None]:
    """(last.ckpt, training seconds) of ``recipes/cm/<recipe>.yaml`` distilled from ``teacher``
    (``common.fit_once``: trained once per resolved recipe)."""
    from dtrain.config import load_recipe

    scratch = "method.init=scratch" in overrides  # CT / iCT from nothing: no teacher at all
    cfg = load_recipe(ROOT / "recipes" / "cm" / f"{recipe}.yaml",
                      [*([] if scratch else [f"teacher={teacher}"]), f"out_dir={BENCH_RUNS}", *QUIET, *overrides])
    out, seconds = fit_once(cfg)
    return out / "checkpoints" / "last.ckpt", seconds


@torch.no_grad()
def fid_on_grid(model, grid: torch.Tensor, *, num: int, batch_size: int, seed: int, ext, ref, shape) -> float:
    """FID of ``consistency`` sampling on an explicit grid (``fid_sweep`` takes spacings only)."""
    metric = FID(ext, ref, shape=shape, device="cpu", ref_source="digits:train")
    for x0, y in generate(model, "consistency", grid.numel() - 1, global_batches(num, batch_size), shape=shape,
                          num_classes=10, seed=seed, grid=grid):
        metric.update(x0, y)
    return float(metric.compute()["fid"])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scan-num", type=int, default=2000)
    ap.add_argument("--scan", default="0.2,0.3,0.4,0.5,0.6,0.7,0.8", help="middle times of the 2-step scan")
    ap.add_argument("--teacher-specs", default="ddim:1,2,4,8,16,32,64 dpm++2m:16,32")
    ap.add_argument("--cd", nargs="*", default=[], help="overrides of recipes/cm/cd_digits.yaml")
    ap.add_argument("--ict", nargs="*", default=[], help="overrides of recipes/cm/ict_digits.yaml")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    ap.add_argument("--out", type=Path, default=RESULTS / "cm_digits.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()

    teacher_ckpt = digits_teacher()
    trained = {name: student(f"{name}_digits", teacher_ckpt, getattr(args, name)) for name in ("cd", "ict")}
    ext = build_extractor("digits")
    ref = load_ref("digits:train", ext)
    teacher, tinfo = load_teacher(teacher_ckpt)
    shape = tuple(tinfo["image"]["shape"])
    kw = dict(num=args.num, batch_size=args.batch_size, shape=shape, extractor=ext, ref=ref, num_classes=10,
              guidance=1.0, seed=args.seed, ref_source="digits:train", progress=False)

    from dtrain.eval.sweep import parse_specs

    t0 = time.time()
    rows_t = cached_fid_rows(teacher, sha256_file(teacher_ckpt), parse_specs(args.teacher_specs), **kw)
    print(f"teacher rows: {[(r['sampler'], r['nfe'], round(r['fid'], 3)) for r in rows_t]} ({time.time() - t0:.0f} s)",
          flush=True)
    best = min(rows_t, key=lambda r: r["fid"])
    ddim = {r["nfe"]: r["fid"] for r in rows_t if r["sampler"] == "ddim"}
    students, goals = {}, {}
    for name, (ckpt, seconds) in trained.items():
        model, info = load_teacher(ckpt)
        rows = [r.to_dict() for r in fid_sweep(model, ["consistency:1,2"], **kw)]
        sch = model.schedule
        scan = {}
        for t in (float(v) for v in args.scan.split(",")):
            grid = torch.tensor([sch.t_max, t, 0.0], dtype=torch.float64)
            scan[t] = fid_on_grid(model, grid, num=args.scan_num, batch_size=args.batch_size, seed=args.seed + 1,
                                  ext=ext, ref=ref, shape=shape)
        t_mid = min(scan, key=scan.get)
        grid = torch.tensor([sch.t_max, t_mid, 0.0], dtype=torch.float64)
        chosen = fid_on_grid(model, grid, num=args.num, batch_size=args.batch_size, seed=args.seed, ext=ext, ref=ref,
                             shape=shape)
        fid = {r["nfe"]: r["fid"] for r in rows}
        students[name] = {
            "checkpoint": str(ckpt.relative_to(ROOT)), "sha256": sha256_file(ckpt),
            "global_step": info["provenance"]["global_step"], "recipe_hash": info["provenance"]["recipe_hash"],
            "overrides": getattr(args, name), "train_seconds": None if seconds is None else round(seconds, 1),
            "rows": rows,
            "two_step_chosen": {"t_mid": t_mid, "fid": chosen, "num": args.num,
                                "scan": {"num": args.scan_num, "seed": args.seed + 1, "fid": scan}},
        }
        goals[name] = {
            "1-step <= 2x teacher best": fid[1] <= 2 * best["fid"],
            "1-step / teacher best": fid[1] / best["fid"],
            "1-step <= teacher DDIM-1 / 2": fid[1] <= ddim[1] / 2,
            "teacher DDIM-1 / 1-step": ddim[1] / fid[1],
            "2-step <= teacher DDIM-2 / 2": min(fid[2], chosen) <= ddim[2] / 2,
            "teacher DDIM-2 / 2-step": ddim[2] / min(fid[2], chosen),
        }
        print(f"{name}: FID 1-step {fid[1]:.3f}, 2-step {fid[2]:.3f} (t_mid {t_mid}: {chosen:.3f})", flush=True)
    print(f"teacher: DDIM-1 {ddim[1]:.3f}, DDIM-2 {ddim[2]:.3f}, best {best['fid']:.3f} "
          f"({best['sampler']}@{best['nfe']})")

    record = {
        "benchmark": "FID-digits of consistency students (CD, iCT) vs the digits teacher",
        "command": "python benchmarks/cm_digits.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "teacher": {"checkpoint": str(teacher_ckpt.relative_to(ROOT)), "sha256": sha256_file(teacher_ckpt),
                    "ema": tinfo["ref"]["ema"], "global_step": tinfo["provenance"]["global_step"],
                    "recipe_hash": tinfo["provenance"]["recipe_hash"], "schedule": tinfo["schedule"]["name"],
                    "param": tinfo["model"]["param"], "rows": rows_t,
                    "best": {k: best[k] for k in ("sampler", "nfe", "fid")}},
        "students": students,
        "goals": goals,
        "extractor": {"name": "digits", "sha256": ext.weights_sha256},
        "reference": {"source": "digits:train", "count": ref.count},
        "num": args.num, "batch_size": args.batch_size, "seed": args.seed, "guidance": 1.0,
        "machine": machine(),
        "seconds": round(time.time() - t_start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()

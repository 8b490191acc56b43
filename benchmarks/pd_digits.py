"""Progressive distillation of the digits teacher: FID-digits of every round's student against the teacher's DDIM at the
same step counts and the teacher's best (Salimans & Ho 2022, arXiv 2202.00512).

    python benchmarks/pd_digits.py                      # teacher: benchmarks/common.digits_teacher() (cached)
    python benchmarks/pd_digits.py --num 2000 --overrides method.round_steps=[200] trainer.max_steps=1200

Trains ``recipes/pd/digits.yaml`` (64 -> 32 -> 16 -> 8 -> 4 -> 2 -> 1 steps) with ``dtrain.lit.fit.fit`` into
``runs/bench/pd-digits`` (reused when its resolved recipe is unchanged and all rounds are written), then scores with
``dtrain.eval.sweep.fid_sweep`` -- the same class-balanced x_T for every point, reference: FID-digits statistics of the
train split, no guidance (w = 1) -- each round's bundle at its step count (DDIM on the distilled grid: trailing
spacing nests, so it is the sampler's own grid), the teacher's DDIM at every round's step count and 64, and
DPM-Solver++(2M) at ``--teacher-dpm`` NFE (the teacher's points are cached in runs/bench/fid_cache and shared with
benchmarks/cm_digits.py). Writes benchmarks/results/pd_digits.json. Goal (issue 6): the 4-step student within 1.5x
the teacher's best FID and 2x better than the teacher's DDIM-4.
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

RECIPE = ROOT / "recipes" / "pd" / "digits.yaml"
RESULTS = Path(__file__).resolve().parent / "results"


def train(teacher: Path, overrides: list[str], threads: int) -> tuple[Path, float | None]:
    """The PD run directory and its training seconds (``common.fit_once``: trained once per resolved recipe)."""
    from dtrain.config import load_recipe

    cfg = load_recipe(RECIPE, [f"teacher={teacher}", f"out_dir={BENCH_RUNS}", "logger.mode=disabled",
                               "trainer.progress_bar=false", f"trainer.cpu_threads={threads}", *overrides])
    return fit_once(cfg)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=2000, help="samples per FID point")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    ap.add_argument("--teacher-dpm", default="16,32", help="NFE of the teacher's DPM-Solver++(2M) points")
    ap.add_argument("--overrides", nargs="*", default=[], help="recipe overrides for the PD run")
    ap.add_argument("--out", type=Path, default=RESULTS / "pd_digits.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    from dtrain.diffusion.timesteps import make_grid
    from dtrain.eval.features import build_extractor
    from dtrain.eval.fid import load_ref
    from dtrain.eval.sweep import fid_sweep
    from dtrain.export.bundle import load_bundle
    from dtrain.export.checkpoint import load_teacher, sha256_file

    teacher_ckpt = digits_teacher()
    run, train_seconds = train(teacher_ckpt, list(args.overrides), args.threads)
    rounds = json.loads((run / "rounds" / "rounds.json").read_text())
    ext = build_extractor("digits")
    ref = load_ref("digits:train", ext)
    common = dict(num=args.num, batch_size=args.batch_size, shape=(1, 8, 8), extractor=ext, ref=ref, num_classes=10,
                  guidance=1.0, seed=args.seed, progress=False, ref_source="digits:train")

    def score(den, specs) -> list[dict]:
        t0 = time.time()
        rows = [r.to_dict() for r in fid_sweep(den, specs, **common)]
        print(f"  {specs}: {[round(r['fid'], 3) for r in rows]} ({time.time() - t0:.0f} s)", flush=True)
        return rows

    teacher, tinfo = load_teacher(teacher_ckpt)
    steps = sorted({r["steps"] for r in rounds} | {64})
    print("teacher:", flush=True)
    t0 = time.time()
    dpm = [int(v) for v in args.teacher_dpm.split(",") if v]
    t_rows = cached_fid_rows(teacher, sha256_file(teacher_ckpt), [("ddim", steps), ("dpm++2m", dpm)], **common)
    print(f"  {[(r['sampler'], r['nfe'], round(r['fid'], 3)) for r in t_rows]} ({time.time() - t0:.0f} s)", flush=True)
    t_ddim = {r["nfe"]: r for r in t_rows if r["sampler"] == "ddim"}
    best = min(t_rows, key=lambda r: r["fid"])
    out_rounds = []
    print("students:", flush=True)
    for r in rounds:
        pipe = load_bundle(run / r["bundle"])  # relative to the run folder (an absolute path stays absolute)
        g = pipe.info["sampler"]["grid"]
        assert g == make_grid(pipe.schedule, r["steps"]).tolist(), "the distilled grid is the sampler's own"
        (row,) = score(pipe.denoiser, [("ddim", [r["steps"]])])
        out_rounds.append({"round": r["index"], "steps": r["steps"], "global_step": r["global_step"],
                           "train_seconds": r.get("seconds"),
                           "fid": row["fid"], "class_acc": row["class_acc"], "fid_in_training": r["metrics"].get("fid"),
                           "teacher_ddim_fid": t_ddim[r["steps"]]["fid"],
                           "teacher_ddim_class_acc": t_ddim[r["steps"]]["class_acc"], "bundle": r["bundle"]})
    four = next((r for r in out_rounds if r["steps"] == 4), None)
    recipe = json.loads(json.dumps(load_bundle(run / rounds[-1]["bundle"]).info["provenance"]["recipe"]))
    record = {
        "benchmark": "progressive distillation of the digits teacher, FID-digits per round",
        "command": "python benchmarks/pd_digits.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "recipe": str(RECIPE.relative_to(ROOT)), "overrides": list(args.overrides),
        "method": recipe["method"], "optim": recipe["optim"], "ema": recipe["ema"],
        "batch_size": recipe["data"]["batch_size"],
        "teacher": {"path": str(teacher_ckpt.relative_to(ROOT)), "sha256": tinfo["ref"]["sha256"],
                    "ema": tinfo["ref"]["ema"], "global_step": tinfo["provenance"]["global_step"],
                    "param": tinfo["model"]["param"], "schedule": tinfo["schedule"]["name"],
                    "rows": t_rows, "best": {k: best[k] for k in ("sampler", "nfe", "fid", "class_acc")}},
        "rounds": out_rounds,
        "goals": None if four is None else {
            "four_step_fid": four["fid"], "teacher_best_fid": best["fid"],
            "teacher_ddim4_fid": four["teacher_ddim_fid"],
            "within_1.5x_teacher_best": four["fid"] <= 1.5 * best["fid"],
            "ratio_to_teacher_best": four["fid"] / best["fid"],
            "2x_better_than_teacher_ddim4": 2 * four["fid"] <= four["teacher_ddim_fid"],
            "ratio_teacher_ddim4_to_student": four["teacher_ddim_fid"] / four["fid"]},
        "eval": {"num": args.num, "batch_size": args.batch_size, "seed": args.seed, "guidance": 1.0,
                 "reference": {"source": ref.meta.get("source", "digits:train"), "count": ref.count},
                 "extractor": {"name": "digits", "sha256": ext.weights_sha256}},
        "train_seconds": round(train_seconds, 1) if train_seconds is not None else "reused run (see rounds)",
        "seconds": round(time.time() - t_start, 1),
        "machine": machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["goals"], indent=2))
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()

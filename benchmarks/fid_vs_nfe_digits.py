"""FID-digits against NFE for the digits teacher: DDIM, DDPM and DPM-Solver++(2M) at NFE 1..256, plus the
real-vs-real floor (the test split against the train-split reference).

    dtrain fit recipes/teacher/digits.yaml                       # the teacher (runs/teacher-digits/)
    python benchmarks/fid_vs_nfe_digits.py --ckpt runs/teacher-digits/checkpoints/last.ckpt

Writes benchmarks/results/fid_vs_nfe_digits.{json,png} and _samples.png (the best point's first 100 samples,
one class per column). Reference: FID-digits statistics of the 1347-image
train split (what the teacher was trained on); samples: ``--num`` class-balanced samples, the same x_T for
every point (``dtrain.eval.sweep``), ``--guidance`` classifier-free guidance scales (w = 1: none).
FID is biased upwards at small sample counts: the floor uses 450 test images, the samples ``--num``, so the
floor also reports the FID of 450 teacher samples at the largest NFE for comparison.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's dtrain, not another installed one

import torch

from dtrain.data.digits import digits_arrays
from dtrain.eval.features import DIGITS_WEIGHTS, build_extractor
from dtrain.eval.fid import FID, load_ref
from dtrain.eval.grids import save_grid
from dtrain.eval.report import plot_fid_vs_nfe
from dtrain.eval.sweep import fid_sweep
from dtrain.export.checkpoint import load_teacher

RESULTS = Path(__file__).resolve().parent / "results"


def machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def plot(record: dict, path: Path) -> Path:
    """FID vs NFE, one line per (sampler, guidance), the real-vs-real floor dashed."""
    many = len(record["runs"]) > 1
    rows = [{**r, "label": f"{r['sampler']} (w={run['guidance']:g})" if many else r["sampler"]}
            for run in record["runs"] for r in run["rows"]]
    return plot_fid_vs_nfe(rows, path, floor=record["floor"]["fid"],
                           title=f"Digits teacher: FID-digits vs NFE ({record['num']} samples)")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="runs/teacher-digits/checkpoints/last.ckpt", help="teacher checkpoint or bundle")
    ap.add_argument("--ema", default="auto")
    ap.add_argument("--samplers", default="ddim,ddpm,dpm++2m")
    ap.add_argument("--nfes", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--num", type=int, default=10000)
    ap.add_argument("--batch-size", type=int, default=2500)
    ap.add_argument("--guidance", default=None, help="comma-separated CFG scales (default: the teacher's sampler)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=RESULTS / "fid_vs_nfe_digits.json")
    ap.add_argument("--replot", type=Path, default=None, help="only redraw the PNG from an existing results JSON")
    args = ap.parse_args(argv)
    if args.replot is not None:
        record = json.loads(args.replot.read_text())
        plot(record, args.replot.with_suffix(".png"))
        return record
    device = torch.device(args.device)
    t0 = time.time()

    teacher, info = load_teacher(args.ckpt, ema=args.ema, device=device)
    ext = build_extractor("digits").to(device)
    ref = load_ref("digits:train", ext, device)
    shape, k = tuple(info["image"]["shape"]), len(info["class_names"])
    scales = [float(w) for w in args.guidance.split(",")] if args.guidance else [float(info["sampler"]["guidance"])]

    # the floor: real test images against the train reference (450 vs 1347 images)
    test_x, test_y = digits_arrays("test")
    floor = FID(ext, ref, shape=shape, device=device)
    floor.update(test_x.to(device), test_y)
    floor_res = floor.compute()

    nfes = [int(n) for n in args.nfes.split(",")]
    specs = [(name, nfes) for name in args.samplers.split(",")]
    runs, best_grid, best_fid = [], None, float("inf")
    for w in scales:
        rows = fid_sweep(teacher, specs, num=args.num, batch_size=args.batch_size, shape=shape, extractor=ext,
                         ref=ref, num_classes=k, guidance=w, seed=args.seed, device=device, ref_source="digits:train",
                         grid_size=100)
        runs.append({"guidance": w, "rows": [r.to_dict() for r in rows]})
        for r in rows:
            if r.fid < best_fid and r.grid is not None:
                best_fid, best_grid = r.fid, r.grid[:100]
    # the same small-sample bias as the floor: the teacher's best point scored on 450 samples
    best = min((r for run in runs for r in run["rows"]), key=lambda r: r["fid"])
    small = fid_sweep(teacher, [(best["sampler"], [best["nfe"]])], num=len(test_y), batch_size=args.batch_size,
                      shape=shape, extractor=ext, ref=ref, num_classes=k,
                      guidance=next(run["guidance"] for run in runs if best in run["rows"]), seed=args.seed,
                      device=device, progress=False)[0]

    record = {
        "benchmark": "FID-digits vs NFE, digits teacher",
        "command": "python benchmarks/fid_vs_nfe_digits.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "teacher": {"path": str(args.ckpt), "ema": (info.get("ref") or {}).get("ema"),
                    "sha256": (info.get("ref") or {}).get("sha256"),
                    "global_step": (info.get("provenance") or {}).get("global_step"),
                    "recipe_hash": (info.get("provenance") or {}).get("recipe_hash"),
                    "schedule": info["schedule"].get("name"), "param": info["model"].get("param")},
        "extractor": {"name": "digits", "sha256": ext.weights_sha256,
                      "test_accuracy": json.loads(DIGITS_WEIGHTS.with_suffix(".json").read_text())["test_accuracy"]},
        "reference": {"source": ref.meta["source"], "count": ref.count},
        "floor": {"fid": floor_res["fid"], "count": floor_res["count"], "class_acc": floor_res.get("class_acc"),
                  "inception_score": floor_res.get("inception_score"),
                  "what": "real test split (450) vs train-split reference (1347)",
                  "teacher_same_count": {"sampler": small.sampler, "nfe": small.nfe, "num": small.num,
                                         "fid": small.fid}},
        "num": args.num, "batch_size": args.batch_size, "seed": args.seed,
        "runs": runs,
        "machine": machine(device),
        "seconds": round(time.time() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    save_grid(best_grid, args.out.with_name(args.out.stem + "_samples.png"), nrow=10, upscale=4)
    plot(record, args.out.with_suffix(".png"))
    print(f"floor {floor_res['fid']:.3f}; wrote {args.out} and {args.out.with_suffix('.png')}")
    return record


if __name__ == "__main__":
    main()

"""Flow-map students of the digits on CPU: FID-digits and class accuracy of MeanFlow and CTM at 1, 2 and 4 steps, next
to the teacher's DDIM at the same NFE and the teacher's best (its lowest FID over ``--teacher-specs``); plus the cost
of MeanFlow's two JVP modes.

    python benchmarks/flowmap_digits.py [--num 2000] [--meanflow-teacher] [--meanflow key=value ...]
        [--meanflow-init key=value ...] [--ctm key=value ...]

The teacher is ``benchmarks/common.py: digits_teacher()`` (recipes/teacher/digits.yaml, cached in runs/bench); the
students are ``recipes/flowmap/meanflow_digits.yaml`` and ``recipes/flowmap/ctm_digits.yaml`` trained through
``dtrain.lit.fit.fit`` (the code path of ``dtrain fit``) into runs/bench/{meanflow,ctm}-digits, reused while their
resolved recipe is unchanged. ``--meanflow-teacher`` gives MeanFlow the teacher's velocity (read on the flow schedule)
instead of eps - x0. ``meanflow_init`` is MeanFlow from the teacher's weights and velocity
(``recipes/flowmap/meanflow_teacher_digits.yaml``, runs/bench/meanflow-teacher-digits). Every point scores ``--num``
class-balanced samples without guidance (w = 1) against the FID-digits statistics of the 1347-image train split, from
the same x_T (``dtrain.eval.sweep``); the class accuracy is the FID-digits classifier's agreement with the requested
label. Students sample with ``flowmap`` (n jumps) and CTM also with ``flowmap_gamma`` (gamma = 0.5). Goals (the
consistency issue's): 1-step FID <= 2x the teacher's best, and <= 1/2 of the teacher's DDIM at the same NFE; the
1-step FID is also taken over ``--seeds`` (x_T and labels of each sample seed; ``one_step_seeds``), whose spread on
2000 samples (about +-0.05 here) is as large as many recipe changes.
``jvp_cost``: seconds per MeanFlow loss + backward on one process (batch 128, the recipe's network), ``detached``
(no-grad JVP + forward) against ``fused``. Everything runs on ``--threads`` torch threads (default 1). Writes
benchmarks/results/flowmap_digits.json (``summary``: FID and class accuracy per NFE of every model).
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
from dtrain.eval.fid import load_ref
from dtrain.eval.sweep import fid_sweep, parse_specs
from dtrain.export.checkpoint import load_teacher, sha256_file

RESULTS = ROOT / "benchmarks" / "results"
QUIET = ["logger.mode=disabled", "trainer.progress_bar=false", "trainer.sample_every_n_steps=0"]
NFES = (1, 2, 4)
SPECS = {"meanflow": ["flowmap:1,2,4"], "meanflow_init": ["flowmap:1,2,4"],
         "ctm": ["flowmap:1,2,4", "flowmap_gamma:2,4"]}


def student(recipe: str, overrides: list[str]) -> tuple[Path, float | None]:
    """(last.ckpt, training seconds) of ``recipes/flowmap/<recipe>.yaml`` (``common.fit_once``: trained once per
    resolved recipe; a reused run reports the seconds its training took)."""
    from dtrain.config import load_recipe

    cfg = load_recipe(ROOT / "recipes" / "flowmap" / f"{recipe}.yaml", [f"out_dir={BENCH_RUNS}", *QUIET, *overrides])
    out, seconds = fit_once(cfg)
    return out / "checkpoints" / "last.ckpt", seconds


def jvp_cost(overrides: list[str], repeats: int = 5) -> dict:
    """Seconds per MeanFlow loss + backward (batch 128) for each JVP mode, on this process's threads."""
    from dtrain.config import load_recipe
    from dtrain.lit.flow_map import MeanFlowModule

    out = {}
    x, y = torch.rand(128, 1, 8, 8) * 2 - 1, torch.arange(128) % 10
    for mode in ("detached", "fused"):
        cfg = load_recipe(ROOT / "recipes" / "flowmap" / "meanflow_digits.yaml", [*overrides, f"method.jvp={mode}"])
        torch.manual_seed(0)
        module = MeanFlowModule(cfg)
        model = module.denoiser_for(None)
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            module.loss_fn(model, x, y, generator=torch.Generator().manual_seed(i)).loss.mean().backward()
            times.append(time.perf_counter() - t0)
        out[mode] = round(sorted(times[1:])[repeats // 2], 3)  # median after one warm-up
    return {"seconds_per_step": out, "batch": 128, "threads": torch.get_num_threads(), "repeats": repeats}


def kept_source(earlier: dict, name: str) -> str:
    """What measured a student entry kept from an earlier record (``--only``): the source that record names, where
    that record's own run ("this run") is its command."""
    was = (earlier.get("sources") or {}).get(name)
    return earlier["command"] if was in (None, "this run") else was


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default="0,1,2,3", help="sample seeds of the students' 1-step FID (one_step_seeds)")
    ap.add_argument("--teacher-specs", default="ddim:1,2,4 dpm++2m:4,16")
    ap.add_argument("--meanflow", nargs="*", default=[], help="overrides of recipes/flowmap/meanflow_digits.yaml")
    ap.add_argument("--meanflow-teacher", action="store_true", help="MeanFlow distils the teacher's velocity")
    ap.add_argument("--meanflow-init", nargs="*", default=[],
                    help="overrides of recipes/flowmap/meanflow_teacher_digits.yaml (MeanFlow from the teacher)")
    ap.add_argument("--ctm", nargs="*", default=[], help="overrides of recipes/flowmap/ctm_digits.yaml")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (training runs on the recipe's cpu_threads)")
    ap.add_argument("--out", type=Path, default=RESULTS / "flowmap_digits.json")
    ap.add_argument("--only", nargs="+", choices=list(SPECS), default=None,
                    help="train and score only these students; the others' entries are kept from --out where it "
                         "exists (an earlier run against the same teacher weights), and the record names what each "
                         "entry comes from")
    args = ap.parse_args(argv)
    try:
        seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    except ValueError:
        ap.error(f"--seeds: comma-separated integers, not {args.seeds!r}")
    torch.set_num_threads(args.threads)
    t_start, machine_start = time.time(), machine()

    teacher_ckpt = digits_teacher()
    flow_ckpt = digits_teacher(recipe=ROOT / "recipes" / "teacher" / "digits_flow.yaml")
    mf_over = [*args.meanflow, *([f"teacher={teacher_ckpt}"] if args.meanflow_teacher else [])]
    plan = {"meanflow": ("meanflow_digits", mf_over, mf_over, "vp"),
            "meanflow_init": ("meanflow_teacher_digits", [f"teacher={flow_ckpt}", *args.meanflow_init],
                              args.meanflow_init, "flow"),
            "ctm": ("ctm_digits", [f"teacher={teacher_ckpt}", *args.ctm], args.ctm, "vp")}
    only = args.only or list(plan)
    earlier = json.loads(args.out.read_text()) if args.only and args.out.is_file() else None  # else: only these
    trained = {k: (student(r, over), given, tag) for k, (r, over, given, tag) in plan.items() if k in only}
    ext = build_extractor("digits")
    ref = load_ref("digits:train", ext)
    kw = dict(num=args.num, batch_size=args.batch_size, shape=(1, 8, 8), extractor=ext, ref=ref, num_classes=10,
              guidance=1.0, seed=args.seed, ref_source="digits:train", progress=False)

    teachers = {}
    for tag, ckpt in (("vp", teacher_ckpt), ("flow", flow_ckpt)):
        model, info = load_teacher(ckpt)
        sha = sha256_file(ckpt)
        rows = cached_fid_rows(model, sha, parse_specs(args.teacher_specs.split()), **kw)
        teachers[tag] = {
            "checkpoint": str(ckpt.relative_to(ROOT)), "sha256": sha, "ema": info["ref"]["ema"],
            "global_step": info["provenance"]["global_step"], "recipe_hash": info["provenance"]["recipe_hash"],
            "schedule": info["schedule"]["name"], "param": info["model"]["param"], "rows": rows,
            "best": {k: min(rows, key=lambda r: r["fid"])[k] for k in ("sampler", "nfe", "fid")},
            "ddim": {r["nfe"]: r["fid"] for r in rows if r["sampler"] == "ddim"}}
    students, goals, summary = {}, {}, {}
    sources: dict[str, str] = {}
    if earlier is not None:  # the kept students, scored against the same teacher weights (checked by their DDIM)
        for tag, t in teachers.items():
            was = earlier["teachers"][tag]["ddim"]
            if any(abs(was[str(n)] - f) > 1e-9 * f for n, f in t["ddim"].items()):
                sys.exit(f"--only: the {tag} teacher's DDIM FIDs differ from {args.out}'s: not the same weights")
        keep = [k for k in plan if k not in only]
        for k in keep:
            students[k], goals[k] = earlier["students"][k], earlier["goals"][k]
            summary.update({n: earlier["summary"][n] for n in (k, *(("ctm_gamma0.5",) if k == "ctm" else ()))})
            sources[k] = kept_source(earlier, k)
    for tag, t in teachers.items():
        summary[f"teacher_ddim_{tag}"] = {str(r["nfe"]): {k: r[k] for k in ("fid", "class_acc")} for r in t["rows"]
                                          if r["sampler"] == "ddim" and r["nfe"] in NFES}
    for name, ((ckpt, seconds), over, tag) in trained.items():
        model, info = load_teacher(ckpt)
        rows = [r.to_dict() for r in fid_sweep(model, SPECS[name], **kw)]
        fid = {r["nfe"]: r["fid"] for r in rows if r["sampler"] == "flowmap"}
        one = [fid[1] if seed == args.seed else fid_sweep(model, ["flowmap:1"], **{**kw, "seed": seed})[0].fid
               for seed in seeds]
        one_mean = sum(one) / len(one) if one else None
        summary[name] = {str(r["nfe"]): {k: r[k] for k in ("fid", "class_acc")} for r in rows
                         if r["sampler"] == "flowmap"}
        if name == "ctm":
            summary["ctm_gamma0.5"] = {str(r["nfe"]): {k: r[k] for k in ("fid", "class_acc")} for r in rows
                                       if r["sampler"] == "flowmap_gamma"}
        sources[name] = "this run"
        students[name] = {
            "checkpoint": str(ckpt.relative_to(ROOT)), "sha256": sha256_file(ckpt), "teacher": tag,
            "global_step": info["provenance"]["global_step"], "recipe_hash": info["provenance"]["recipe_hash"],
            "overrides": over, "train_seconds": None if seconds is None else round(seconds, 1), "rows": rows,
            "one_step_seeds": {"seeds": seeds, "fid": one, "mean": one_mean},
        }
        best, ddim = teachers[tag]["best"]["fid"], teachers[tag]["ddim"]
        goals[name] = {
            "1-step <= 2x teacher best": fid[1] <= 2 * best,
            "1-step mean over seeds <= 2x teacher best": one_mean is not None and one_mean <= 2 * best,
            "1-step <= teacher DDIM-1 / 2": fid[1] <= ddim[1] / 2,
            "2-step <= teacher DDIM-2 / 2": fid[2] <= ddim[2] / 2,
            "4-step <= teacher DDIM-4": fid[4] <= ddim[4],
        }
        print(f"{name} ({tag} teacher): FID " + ", ".join(f"{n}-step {fid[n]:.3f}" for n in NFES)
              + (f"; 1-step over seeds {args.seeds}: mean {one_mean:.3f}" if one else ""))
    for tag, t in teachers.items():
        print(f"{tag} teacher: " + ", ".join(f"DDIM-{n} {t['ddim'][n]:.3f}" for n in NFES)
              + f", best {t['best']['fid']:.3f} ({t['best']['sampler']}@{t['best']['nfe']})")

    record = {
        "benchmark": "FID-digits of flow-map students (MeanFlow, CTM) vs the digits teacher",
        "command": "python benchmarks/flowmap_digits.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "teacher": teachers["vp"],  # MeanFlow's and CTM's (the other digits benchmarks' teacher)
        "teachers": teachers,  # vp, and flow: MeanFlow from a teacher's weights (meanflow_init)
        "summary": summary,
        "students": students,
        "goals": goals,
        "sources": sources,  # per student: "this run", or the command of the run its entry was kept from
        "jvp_cost": jvp_cost(args.meanflow) if "meanflow" in only or earlier is None else earlier["jvp_cost"],
        "extractor": {"name": "digits", "sha256": ext.weights_sha256},
        "reference": {"source": "digits:train", "count": ref.count},
        "num": args.num, "batch_size": args.batch_size, "seed": args.seed, "guidance": 1.0,
        "machine": machine(), "loadavg_start": machine_start["loadavg"],
        "seconds": round(time.time() - t_start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()

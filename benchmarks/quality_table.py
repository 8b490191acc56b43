"""Quality per NFE of every method on the digits: one table from the digits benchmarks' results.

    python benchmarks/quality_table.py [--run]      # -> benchmarks/results/quality_table.md

Rows teacher-DDIM / teacher-DPM++ / PD / CD / iCT / MeanFlow / MeanFlow (flow teacher) / CTM, columns NFE 1, 2, 4, 8,
64, cells "FID-digits (class accuracy)", '-' where not measured. Read from benchmarks/results/:
``pd_digits.json`` (PD rounds), ``cm_digits.json`` (CD, iCT on the default sampling grid), ``flowmap_digits.json``
(MeanFlow, CTM with n flow-map jumps) and the teacher rows they carry; ``fid_vs_nfe_digits.json`` gives the teacher rows
only when no student benchmark has run (it scores another teacher checkpoint at another sample count). Values are
comparable only at the same teacher, sample count and seed: the settings of every source are listed under the table,
and a mismatch is flagged. The real-vs-real floor (the 450 test images against the 1347-image train reference) is
computed here. ``--run``: run the digits benchmarks whose results are missing (tens of CPU minutes each) and score
the teacher's missing DDIM / DPM-Solver++(2M) points at the students' settings (cached in runs/bench/fid_cache,
shared with pd_digits.py and cm_digits.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
NFES = (1, 2, 4, 8, 64)
ROWS = ("teacher-DDIM", "teacher-DPM++", "PD", "CD", "iCT", "MeanFlow", "MeanFlow (flow teacher)", "CTM")
SOURCES = {"pd": "pd_digits.json", "cm": "cm_digits.json", "flowmap": "flowmap_digits.json",
           "fid_vs_nfe": "fid_vs_nfe_digits.json", "teacher": "quality_table_teacher.json"}
Cell = dict[str, Any]  # {"fid": float, "class_acc": float | None, "source": str}


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _cell(fid: Any, acc: Any, source: str) -> Cell | None:
    try:
        return {"fid": float(fid), "class_acc": None if acc is None else float(acc), "source": source}
    except (TypeError, ValueError):
        return None


def _teacher_rows(rec: dict, source: str) -> dict[tuple[str, int], Cell]:
    out = {}
    for r in (rec.get("teacher") or {}).get("rows") or []:
        if isinstance(r, dict) and r.get("sampler") in ("ddim", "dpm++2m") and (c := _cell(
                r.get("fid"), r.get("class_acc"), source)) is not None:
            out[(r["sampler"], int(r.get("nfe", -1)))] = c
    return out


def settings(name: str, rec: dict) -> dict[str, Any]:
    """Teacher, sample count, seed and guidance of a result file (None where it does not say)."""
    t = rec.get("teacher") or {}
    ev = rec.get("eval") or {}
    num = rec.get("num", ev.get("num"))
    guidance = rec.get("guidance", ev.get("guidance"))
    if name == "fid_vs_nfe":
        guidance = 1.0
    return {"file": SOURCES[name], "teacher_sha256": (t.get("sha256") or "")[:12] or None,
            "teacher_step": t.get("global_step"), "num": num, "seed": rec.get("seed", ev.get("seed")),
            "guidance": guidance,  # the eval's batch (pd_digits.json's top-level batch_size is its training batch)
            "batch_size": ev.get("batch_size", rec.get("batch_size"))}


def collect(results: Path = RESULTS) -> tuple[dict[str, dict[int, Cell]], dict[str, dict[str, Any]], list[str]]:
    """(table: row -> NFE -> cell, settings of each source read, notes). Unknown formats are skipped with a note."""
    table: dict[str, dict[int, Cell]] = {r: {} for r in ROWS}
    used: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    teacher: dict[tuple[str, int], Cell] = {}
    recs = {k: _load(results / f) for k, f in SOURCES.items()}
    for name in ("pd", "cm", "flowmap"):
        rec = recs[name]
        if rec is None:
            notes.append(f"{SOURCES[name]}: not found or not JSON (run benchmarks/{SOURCES[name][:-5]}.py, or this "
                         f"script with --run)")
            continue
        before = sum(len(v) for v in table.values())
        try:
            if name == "pd":
                for r in rec.get("rounds") or []:
                    if (c := _cell(r.get("fid"), r.get("class_acc"), SOURCES[name])) is not None:
                        table["PD"][int(r["steps"])] = c
            elif name == "cm":
                for key, row in (("cd", "CD"), ("ict", "iCT")):
                    for r in ((rec.get("students") or {}).get(key) or {}).get("rows") or []:
                        if (c := _cell(r.get("fid"), r.get("class_acc"), SOURCES[name])) is not None:
                            table[row][int(r["nfe"])] = c
            else:
                summary = rec.get("summary") or {}
                keys = (("meanflow", "MeanFlow"), ("meanflow_init", "MeanFlow (flow teacher)"), ("ctm", "CTM"))
                for key, row in keys:
                    for nfe, v in (summary.get(key) or {}).items():
                        if (c := _cell(v.get("fid"), v.get("class_acc"), SOURCES[name])) is not None:
                            table[row][int(nfe)] = c
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            notes.append(f"{SOURCES[name]}: unreadable ({type(e).__name__}: {e}); skipped")
            continue
        rows = _teacher_rows(rec, SOURCES[name])
        teacher.update({k: v for k, v in rows.items() if k not in teacher})
        if rows or sum(len(v) for v in table.values()) > before:
            used[name] = settings(name, rec)
    if not teacher and (rec := recs["fid_vs_nfe"]) is not None:  # no student benchmark: the teacher sweep alone
        run = next((r for r in rec.get("runs") or [] if float(r.get("guidance", 0)) == 1.0), None)
        for r in (run or {}).get("rows") or []:
            if r.get("sampler") in ("ddim", "dpm++2m") and (c := _cell(r.get("fid"), r.get("class_acc"),
                                                                       SOURCES["fid_vs_nfe"])) is not None:
                teacher[(r["sampler"], int(r["nfe"]))] = c
        if teacher:
            used["fid_vs_nfe"] = settings("fid_vs_nfe", rec)
    for (sampler, nfe), c in teacher.items():
        table["teacher-DDIM" if sampler == "ddim" else "teacher-DPM++"][nfe] = c
    keys = {(s["teacher_sha256"], s["num"], s["seed"], s["guidance"]) for s in used.values()}
    if len(keys) > 1:
        notes.append("the sources differ in teacher, sample count, seed or guidance (see Settings): compare values "
                     "within one source only")
    return table, used, notes


def floor() -> dict[str, Any]:
    """FID-digits and class accuracy of the real test split (450 images) against the train-split reference."""
    from dtrain.data.memory import digits_arrays
    from dtrain.eval.features import build_extractor
    from dtrain.eval.fid import FID, load_ref

    ext = build_extractor("digits")
    x, y = digits_arrays("test")
    m = FID(ext, load_ref("digits:train", ext), shape=tuple(x.shape[1:]))
    m.update(x, y)
    res = m.compute()
    return {"fid": float(res["fid"]), "class_acc": res.get("class_acc"), "count": len(x)}


def fmt(c: Cell | None) -> str:
    if c is None:
        return "-"
    f = c["fid"]
    s = f"{f:.3f}" if f < 1 else f"{f:.2f}"
    return s + (f" ({100 * c['class_acc']:.1f}%)" if c["class_acc"] is not None else "")


def render(table: dict[str, dict[int, Cell]], used: dict[str, dict[str, Any]], notes: list[str],
           fl: dict[str, Any] | None) -> str:
    lines = ["# Quality per NFE on the digits", "",
             "FID-digits (lower is better) and, in parentheses, the share of samples the FID-digits classifier assigns "
             "to the requested class; no guidance (w = 1). '-': not measured. Written by "
             "`python benchmarks/quality_table.py` from benchmarks/results/*.json.", "",
             "| method | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
             "|---|" + "---:|" * len(NFES)]
    lines += [f"| {row} | " + " | ".join(fmt(table[row].get(n)) for n in NFES) + " |" for row in ROWS]
    lines.append("")
    if fl is not None:
        acc = f", class accuracy {100 * fl['class_acc']:.1f}%" if fl.get("class_acc") is not None else ""
        lines.append(f"Real-vs-real floor: FID-digits {fl['fid']:.3f} ({fl['count']} real test images against the "
                     f"1347-image train reference{acc}); FID is biased upwards at small sample counts, so this floor "
                     f"of 450 images lies above what more samples of a perfect model would score.")
        lines.append("")
    lines.append("Samplers: teacher-DDIM `ddim`, teacher-DPM++ `dpm++2m` (DPM-Solver++(2M)), PD the round's student "
                 "with DDIM on its own grid, CD / iCT `consistency` (default grid), MeanFlow / CTM `flowmap` "
                 "(n jumps). MeanFlow (flow teacher) starts from the weights of another teacher, "
                 "recipes/teacher/digits_flow.yaml (its rows are in flowmap_digits.json under teachers.flow).")
    lines.append("")
    lines.append("Settings (teacher checkpoint sha256 prefix and training step, samples per point, seed):")
    lines.append("")
    for s in used.values():
        lines.append(f"- {s['file']}: teacher {s['teacher_sha256']} (step {s['teacher_step']}), {s['num']} samples, "
                     f"seed {s['seed']}, guidance {s['guidance']}")
    if not used:
        lines.append("- none: no digits benchmark results found")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def run_missing(results: Path) -> None:
    """Run the digits benchmarks without results, then score the teacher's missing points at their settings."""
    for name in ("pd", "cm", "flowmap"):
        if not (results / SOURCES[name]).is_file():
            script = ROOT / "benchmarks" / f"{SOURCES[name][:-5]}.py"
            print(f"running {script.relative_to(ROOT)} (missing {SOURCES[name]})", flush=True)
            subprocess.run([sys.executable, str(script)], cwd=ROOT, check=False)
    _, used, _ = collect(results)
    students = [k for k in used if k != "fid_vs_nfe"]
    if not students:
        return
    s = used[students[0]]
    t = (_load(results / s["file"]) or {}).get("teacher") or {}
    from dtrain.eval.features import build_extractor
    from dtrain.eval.fid import load_ref
    from dtrain.export.checkpoint import load_teacher, sha256_file

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import cached_fid_rows

    ckpt = ROOT / str(t.get("checkpoint") or t.get("path") or "")
    if not ckpt.is_file() or sha256_file(ckpt)[:12] != s["teacher_sha256"]:
        print(f"teacher points not added: the teacher of {s['file']} ({ckpt}) is gone or changed")
        return
    import torch

    torch.set_num_threads(1)
    teacher, info = load_teacher(ckpt)
    ext = build_extractor("digits")
    bs = int(s.get("batch_size") or 500)  # part of the shared cache's key
    rows = cached_fid_rows(teacher, sha256_file(ckpt), [("ddim", list(NFES)), ("dpm++2m", list(NFES))],
                           num=int(s["num"]), batch_size=bs, seed=int(s["seed"]), guidance=1.0, extractor=ext,
                           ref=load_ref("digits:train", ext), ref_source="digits:train",
                           shape=tuple(info["image"]["shape"]), num_classes=10, progress=False)
    path = results / "quality_table_teacher.json"
    path.write_text(json.dumps({"benchmark": "teacher points of the quality table", "teacher": {
        "checkpoint": str(ckpt.relative_to(ROOT)), "sha256": sha256_file(ckpt),
        "global_step": info["provenance"]["global_step"], "rows": rows},
        "num": s["num"], "seed": s["seed"], "guidance": 1.0, "batch_size": bs}, indent=2) + "\n")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="store_true", help="run missing benchmarks and score missing teacher points")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, default=None, help="default: <results>/quality_table.md")
    ap.add_argument("--no-floor", action="store_true", help="skip the real-vs-real floor (no extractor needed)")
    args = ap.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if args.run:
        run_missing(args.results)
    table, used, notes = collect(args.results)
    extra = _load(args.results / SOURCES["teacher"])
    mine = settings("teacher", extra) if extra is not None else None
    if mine is not None and any(all(mine[k] == u[k] for k in ("teacher_sha256", "num", "seed")) for u in used.values()):
        for (sampler, nfe), c in _teacher_rows(extra, SOURCES["teacher"]).items():  # --run's points: the same setting
            table["teacher-DDIM" if sampler == "ddim" else "teacher-DPM++"].setdefault(nfe, c)
        used["teacher"] = mine
    md = render(table, used, notes, None if args.no_floor else floor())
    out = args.out or args.results / "quality_table.md"
    out.write_text(md)
    print(md)
    print(f"wrote {out}")
    return md


if __name__ == "__main__":
    main()

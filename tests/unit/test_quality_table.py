"""``benchmarks/quality_table.py`` reads every digits benchmark's result format into one NFE table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import quality_table as qt  # noqa: E402

TEACHER = {"sha256": "ab" * 32, "global_step": 1000,
           "rows": [{"sampler": "ddim", "nfe": 1, "fid": 12.0, "class_acc": 1.0},
                    {"sampler": "ddim", "nfe": 64, "fid": 0.07, "class_acc": 0.99},
                    {"sampler": "dpm++2m", "nfe": 8, "fid": 0.2, "class_acc": 0.995},
                    {"sampler": "ddpm", "nfe": 8, "fid": 3.0, "class_acc": 0.9}]}


def write(d: Path, name: str, rec: dict) -> None:
    (d / name).write_text(json.dumps(rec))


def test_reads_every_format_and_flags_mixed_settings(tmp_path):
    write(tmp_path, "pd_digits.json", {"teacher": TEACHER, "eval": {"num": 2000, "seed": 0, "guidance": 1.0},
                                       "rounds": [{"steps": 4, "fid": 0.5, "class_acc": 0.98},
                                                  {"steps": 1, "fid": 3.5, "class_acc": 0.9}]})
    write(tmp_path, "cm_digits.json", {"teacher": TEACHER, "num": 2000, "seed": 0, "guidance": 1.0, "students": {
        "cd": {"rows": [{"sampler": "consistency", "nfe": 1, "fid": 1.5, "class_acc": 0.97}]},
        "ict": {"rows": [{"sampler": "consistency", "nfe": 2, "fid": 2.5, "class_acc": None}]}}})
    write(tmp_path, "flowmap_digits.json", {"teacher": {**TEACHER, "rows": []}, "num": 500, "seed": 0, "guidance": 1.0,
                                            "summary": {"meanflow": {"1": {"fid": 4.0, "class_acc": 0.8}},
                                                        "meanflow_init": {"2": {"fid": 0.3, "class_acc": 0.99}},
                                                        "ctm": {"2": {"fid": 1.25, "class_acc": 0.95}}}})
    write(tmp_path, "fid_vs_nfe_digits.json", {"runs": [{"guidance": 1.0, "rows": [{"sampler": "ddim", "nfe": 2,
                                                                                    "fid": 9.9}]}]})
    table, used, notes = qt.collect(tmp_path)
    assert table["PD"] == {4: {"fid": 0.5, "class_acc": 0.98, "source": "pd_digits.json"},
                           1: {"fid": 3.5, "class_acc": 0.9, "source": "pd_digits.json"}}
    assert table["CD"][1]["fid"] == 1.5 and table["iCT"][2] == {"fid": 2.5, "class_acc": None,
                                                                "source": "cm_digits.json"}
    assert table["MeanFlow"][1]["fid"] == 4.0 and table["CTM"][2]["class_acc"] == 0.95
    assert table["MeanFlow (flow teacher)"] == {2: {"fid": 0.3, "class_acc": 0.99, "source": "flowmap_digits.json"}}
    assert set(table["teacher-DDIM"]) == {1, 64} and set(table["teacher-DPM++"]) == {8}  # no ddpm, no fid_vs_nfe
    assert set(used) == {"pd", "cm", "flowmap"}
    assert any("differ" in n for n in notes)  # flowmap scored 500 samples, the others 2000
    md = qt.render(table, used, notes, {"fid": 0.56, "class_acc": 0.998, "count": 450})
    assert "| PD | 3.50 (90.0%) | - | 0.500 (98.0%) | - | - |" in md
    assert "| iCT | - | 2.50 | - | - | - |" in md
    assert "Real-vs-real floor: FID-digits 0.560" in md


def test_missing_and_broken_files_leave_dashes_and_notes(tmp_path):
    (tmp_path / "cm_digits.json").write_text("{not json")
    write(tmp_path, "pd_digits.json", {"rounds": "unexpected"})
    write(tmp_path, "fid_vs_nfe_digits.json", {"teacher": {"sha256": "cd" * 32}, "num": 10000, "runs": [
        {"guidance": 2.0, "rows": [{"sampler": "ddim", "nfe": 1, "fid": 50.0}]},
        {"guidance": 1.0, "rows": [{"sampler": "ddim", "nfe": 1, "fid": 12.2, "class_acc": 1.0}]}]})
    table, used, notes = qt.collect(tmp_path)
    assert all(not table[r] for r in ("PD", "CD", "iCT", "MeanFlow", "CTM"))
    assert table["teacher-DDIM"] == {1: {"fid": 12.2, "class_acc": 1.0, "source": "fid_vs_nfe_digits.json"}}
    assert set(used) == {"fid_vs_nfe"} and any("cm_digits.json: not found or not JSON" in n for n in notes)
    md = qt.render(table, used, notes, None)
    assert "| CTM | - | - | - | - | - |" in md and "Real-vs-real" not in md


def test_flowmap_only_names_what_measured_a_kept_entry():
    """``flowmap_digits.py --only``: an entry kept from an earlier record is sourced to that record's command where it
    says "this run", and keeps an older source it already carried."""
    from benchmarks.flowmap_digits import kept_source

    earlier = {"command": "python benchmarks/flowmap_digits.py --only ctm",
               "sources": {"ctm": "this run", "meanflow": "python benchmarks/flowmap_digits.py (an older run)"}}
    assert kept_source(earlier, "ctm") == earlier["command"]
    assert kept_source(earlier, "meanflow") == "python benchmarks/flowmap_digits.py (an older run)"
    assert kept_source({"command": "c"}, "ctm") == "c"

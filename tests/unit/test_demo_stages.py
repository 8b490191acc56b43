"""``dtrain demo``'s stage graph without training: fake, valid records for the upstream stages, then the keys, the
eval plan and the failure paths of the optional stages (the flow teacher and the students)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from dtrain import demo as demo_mod
from dtrain.demo import FAST, OPTIONAL, STAGES, Demo, _Record
from dtrain.export.bundle import INFO_FILE, WEIGHTS_FILE


def _fake(d: Demo, stage: str) -> str:
    """A done record for ``stage`` whose outputs check out (a bundle with matching weights, or a file)."""
    key = d.key(stage)
    assert key is not None, stage
    if stage == "shards":
        p = d.out / "shards" / "index.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("{}")
        outputs = {"index": "shards/index.json"}
    else:
        b = d.out / "bundles" / stage
        b.mkdir(parents=True, exist_ok=True)
        (b / WEIGHTS_FILE).write_bytes(stage.encode())
        (b / INFO_FILE).write_text(json.dumps({"weights": {"sha256": hashlib.sha256(stage.encode()).hexdigest()}}))
        outputs = {"bundle": f"bundles/{stage}"}
    d._write_record(_Record(stage, key, "done", outputs, {}, 1.0, digest=f"{key}:{stage}"))
    return key


@pytest.fixture
def out(tmp_path: Path) -> Path:
    d = Demo(tmp_path, sizes=FAST, quiet=True)
    _fake(d, "shards")
    _fake(d, "teacher")
    return tmp_path


def test_each_student_waits_for_its_own_teacher(out: Path) -> None:
    d = Demo(out, sizes=FAST, quiet=True)
    assert all(d.key(s) is not None for s in ("pd", "cd", "ctm", "flow_teacher", "eval"))
    assert d.key("meanflow") is None and d._missing("meanflow") == ["flow_teacher"]
    assert [p["model"] for p in d._eval_plan()] == ["teacher"]
    eval_key = d.key("eval")
    _fake(d, "flow_teacher")
    assert d.key("meanflow") is not None and d.key("eval") != eval_key  # eval now scores the flow teacher
    _fake(d, "cd")
    _fake(d, "meanflow")
    assert [p["model"] for p in d._eval_plan()] == ["teacher", "flow_teacher", "cd", "meanflow"]
    assert set(d._inputs("eval")) == {"teacher", "flow_teacher", "cd", "meanflow"}
    assert set(OPTIONAL) == set(STAGES) - {"shards", "teacher", "eval", "report"}


def test_every_stage_is_described_and_every_student_sized() -> None:
    """A stage added to the pipeline needs its line on the terminal and (a trained one) its number of steps."""
    from dtrain.demo import _DESCRIBE, FULL, STUDENTS, TRAINED

    assert set(_DESCRIBE) == set(STAGES)
    for z in (FULL, FAST):
        assert all(z.steps(s) > 0 for s in TRAINED)
        assert all(isinstance(_DESCRIBE[s](Demo(Path("/nonexistent"), sizes=z, quiet=True)), str) for s in STAGES)
    assert {s.name for s in STUDENTS} >= {"pd", "cd", "ict", "meanflow", "ctm"}


def test_demo_runs_cap_the_ema_decay(out: Path) -> None:
    """The demo's runs are 150-600 steps: a recipe's longer EMA (iCT's 0.999, for 5400 steps) is capped at 0.995, so
    the student is not mostly its initial weights; shorter ones stay."""
    from dtrain.config import load_recipe

    d = Demo(out, sizes=FAST, quiet=True)
    assert list(load_recipe(demo_mod.RECIPES / "cm" / "ict_digits.yaml").ema.decays) == [0.999]  # what it caps
    assert d._recipe_container("ict")["ema"]["decays"] == [demo_mod.DEMO_EMA] == [0.995]
    assert d._recipe_container("pd")["ema"]["decays"] == [0.98]


def test_a_missing_stage_in_a_folder_of_the_other_sizes_says_so(tmp_path: Path) -> None:
    """`dtrain demo --out <a --fast demo> --stages report` (no --fast) asked to rerun the teacher (2 min) and every
    stage; the folder's own demo.json tells which sizes it holds."""
    from dataclasses import asdict

    from dtrain.demo import FULL, StageError

    (tmp_path / "demo.json").write_text(json.dumps({"sizes": asdict(FAST)}))
    with pytest.raises(StageError, match=r"--stages .* eval\b.*; .* holds a demo run at --fast \(add --fast to "
                                         r"use it\)"):
        Demo(tmp_path, sizes=FULL, stages=["eval"], quiet=True).run()
    assert Demo(tmp_path, sizes=FAST, quiet=True)._other_sizes_hint() == ""


def test_a_flow_teacher_that_does_not_load_fails_alone(out: Path, monkeypatch) -> None:
    """Its recipe missing: the flow teacher fails with the file's name, MeanFlow says its teacher failed, the
    summary is written and eval can still score the rest; exit code 1."""
    monkeypatch.setitem(demo_mod.TEACHERS, "flow_teacher", "teacher/no_such_recipe.yaml")
    d = Demo(out, sizes=FAST, stages=["flow_teacher", "meanflow"], quiet=True)
    assert d.run() == 1
    assert d.status["flow_teacher"] == "failed" and "no_such_recipe.yaml" in d.errors["flow_teacher"]
    assert d.status["meanflow"] == "failed"
    assert "needs the outputs of flow_teacher (flow_teacher failed above)" in d.errors["meanflow"]
    summary = json.loads((out / "demo.json").read_text())
    assert summary["stages"]["flow_teacher"] == "failed" and summary["stages"]["pd"] == "not selected"
    assert Demo(out, sizes=FAST, quiet=True).key("eval") is not None  # eval goes on without the flow models


def test_missing_teacher_of_a_selected_student_names_the_command(out: Path) -> None:
    d = Demo(out, sizes=FAST, stages=["meanflow"], quiet=True)
    assert d.run() == 1
    msg = d.errors["meanflow"]
    assert "needs the outputs of flow_teacher:" in msg and "failed above" not in msg
    assert f"dtrain demo --fast --out {out} --stages flow_teacher meanflow" in msg


def test_the_teacher_is_required(tmp_path: Path) -> None:
    """Unlike the optional stages, a missing teacher stops the demo with the command that makes it."""
    d = Demo(tmp_path, sizes=FAST, quiet=True)
    _fake(d, "shards")
    with pytest.raises(demo_mod.StageError, match="stage eval needs the outputs of teacher"):
        Demo(tmp_path, sizes=FAST, stages=["eval"], quiet=True).run()


def test_an_out_of_date_input_invalidates_everything_below(out: Path) -> None:
    """The shards gone: the teacher's record is done but its input is not, so no student (nor eval) has a key."""
    d = Demo(out, sizes=FAST, quiet=True)
    assert d.key("pd") is not None
    (out / "shards" / "index.json").unlink()
    d = Demo(out, sizes=FAST, quiet=True)
    assert d.key("teacher") is None and d.record("teacher").status == "done"
    assert d.key("pd") is None and d.key("eval") is None
    assert d._missing("pd") == ["shards", "teacher"]


def test_up_to_date_is_memoised_until_a_record_is_written(out: Path, monkeypatch) -> None:
    """A broken optional recipe is loaded, and a bundle's weights hashed, once per record written, not per look."""
    import dtrain.export.bundle as bundle

    monkeypatch.setitem(demo_mod.TEACHERS, "flow_teacher", "teacher/no_such_recipe.yaml")
    loads, hashes = [], []
    container, sha = Demo._recipe_container, bundle.sha256_file
    monkeypatch.setattr(Demo, "_recipe_container", lambda self, s: loads.append(s) or container(self, s))
    monkeypatch.setattr(bundle, "sha256_file", lambda p: hashes.append(p) or sha(p))
    d = Demo(out, sizes=FAST, quiet=True)
    for _ in range(3):
        assert [p["model"] for p in d._eval_plan()] == ["teacher"] and d.key("eval") is not None
    assert loads.count("flow_teacher") == 1 and len(hashes) == 1  # the teacher's bundle
    assert "no_such_recipe.yaml" in d._broken["flow_teacher"][0]
    _fake(d, "cd")  # a record written: everything is looked at afresh
    assert [p["model"] for p in d._eval_plan()] == ["teacher", "cd"] and loads.count("flow_teacher") == 2


def test_threads_and_logging_do_not_make_trained_stages_stale(out: Path) -> None:
    """--threads and --wandb change how a stage runs, not what it trains: a finished teacher stays up to date (a
    changed --threads retrained everything), while a setting that changes the weights (the seed) does not."""
    d = Demo(out, sizes=FAST, quiet=True)
    key = d.key("teacher")
    assert Demo(out, sizes=FAST, quiet=True, threads=2, wandb="offline").key("teacher") == key
    assert Demo(out, sizes=FAST, quiet=True, threads=2).key("pd") == d.key("pd")
    other = Demo(out, sizes=FAST.__class__(**{**FAST.__dict__, "seed": FAST.seed + 1}), quiet=True)
    assert other._key("teacher") != key


def test_stages_not_run_whose_inputs_changed_are_out_of_date_not_done(out: Path) -> None:
    """`--stages teacher eval report` after a teacher change: demo.json said 'done earlier' of the students trained
    on the old teacher, and eval dropped them without a word; now they are 'out of date' and eval names them."""
    d = Demo(out, sizes=FAST, quiet=True)
    _fake(d, "cd")
    _fake(d, "ctm")
    (out / "demo.json").write_text(json.dumps({"stages": {"cd": "ran", "ctm": "ran", "teacher": "ran"}}))
    rec = d.record("cd")
    d._write_record(_Record("cd", "a key of another teacher", "done", rec.outputs, {}, 1.0, digest="x"))
    d = Demo(out, sizes=FAST, quiet=True, stages=["eval"])
    assert d._stale() == ["cd"] and [p["model"] for p in d._eval_plan()] == ["teacher", "ctm"]
    d.status = {s: "not selected" for s in STAGES}
    d._write_summary(0.0)
    said = json.loads((out / "demo.json").read_text())["stages"]
    assert said["cd"] == "out of date" and said["ctm"] == "done earlier" and said["teacher"] == "done earlier"


def test_a_second_demo_into_a_busy_folder_is_refused(tmp_path: Path, capsys) -> None:
    """Two demos into one folder rewrote each other's runs (one resumed the other's checkpoint, one crashed)."""
    import fcntl

    from dtrain.cli import main

    with open(tmp_path / ".demo.lock", "w") as f:
        f.write('{"pid": 4242, "host": "node3", "job": null}')
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["demo", "--fast", "--out", str(tmp_path), "--stages", "shards"]) == 2
    assert (f"dtrain demo: --out: another dtrain demo is running in {tmp_path}; wait for it to end, or give this one "
            f"another --out (held by pid 4242 on node3)" in capsys.readouterr().err)
    assert not (tmp_path / "shards").exists()
    assert main(["demo", "--fast", "--out", str(tmp_path), "--stages", ","]) == 2
    assert "dtrain demo: --stages: no stage given" in capsys.readouterr().err


@pytest.mark.parametrize(("stop", "code", "said"), [(KeyboardInterrupt(), 130, "Ctrl-C"),
                                                     (SystemExit(1), 130, "Ctrl-C"),  # Lightning's Ctrl-C
                                                     (SystemExit(143), 143, "SIGTERM")])  # dtrain fit's SIGTERM
def test_a_signal_inside_a_stage_is_said_on_the_terminal(out: Path, monkeypatch, capsys, stop, code, said) -> None:
    """Lightning turns Ctrl-C into sys.exit(1) and dtrain fit SIGTERM into exit 143, both past the demo's handler and
    logged to demo.log only: the terminal showed nothing, or a traceback."""
    from dtrain.cli import main

    def stopped(self, stage, key):
        raise stop

    monkeypatch.setattr(Demo, "_run_trained", stopped)
    assert main(["demo", "--fast", "--out", str(out), "--stages", "cd"]) == code
    cap = capsys.readouterr()
    assert f"interrupted ({said}) in stage cd: rerun the same command to resume" in cap.out
    assert "Traceback" not in cap.err + cap.out


def test_a_moved_demo_folder_stays_up_to_date(out: Path, tmp_path_factory) -> None:
    """Stage keys held the folder's absolute paths (out_dir, the shards, the teacher bundle): a copied or moved demo
    retrained everything."""
    import shutil

    d = Demo(out, sizes=FAST, quiet=True)
    _fake(d, "cd")
    moved = tmp_path_factory.mktemp("elsewhere") / "demo"
    shutil.copytree(out, moved)
    m = Demo(moved, sizes=FAST, quiet=True)
    assert [m.key(s) for s in ("teacher", "cd", "eval")] == [d.key(s) for s in ("teacher", "cd", "eval")]
    assert m._up_to_date("teacher") is not None and m._up_to_date("cd") is not None
    assert str(out) not in json.dumps(m._recipe_container("cd")) and str(moved) in json.dumps(m._recipe_container("cd"))


def test_pd_rounds_of_a_moved_folder_are_found_in_it(tmp_path: Path) -> None:
    """rounds.json held absolute paths (now relative to the run): a PD stage resumed after the folder moved crashed on
    the rounds that ended before the move (not inside the new folder), failing on every rerun."""
    d = Demo(tmp_path / "new", sizes=FAST, quiet=True)
    run = d.out / "runs" / "pd"
    (run / "rounds").mkdir(parents=True)
    (run / "rounds" / "rounds.json").write_text(json.dumps([
        {"steps": 8, "bundle": str(tmp_path / "old" / "runs" / "pd" / "rounds" / "round00_8steps")},
        {"steps": 4, "bundle": str(run / "rounds" / "round01_4steps")},
        {"steps": 2, "bundle": "rounds/round02_2steps"}]))
    assert d._round_bundles(run) == {8: "runs/pd/rounds/round00_8steps", 4: "runs/pd/rounds/round01_4steps",
                                     2: "runs/pd/rounds/round02_2steps"}


def test_unfinished_students_are_not_called_out_of_date(out: Path) -> None:
    d = Demo(out, sizes=FAST, quiet=True)
    d._write_record(_Record("cd", d.key("cd"), "running", {}, {}, 1.0))  # cut off mid-stage: its key still holds
    d._write_record(_Record("ctm", "another teacher's key", "done", {}, {}, 1.0))
    assert Demo(out, sizes=FAST, quiet=True)._stale() == ["ctm"]


@pytest.mark.parametrize(("err", "said"), [
    (PermissionError(13, "Permission denied", "/data/cache.npz"), "cannot read or write /data/cache.npz: Permission"),
    (OSError(28, "No space left on device"), "cannot write in "),
])
def test_an_os_error_is_one_line_and_its_traceback_is_logged(tmp_path: Path, monkeypatch, capsys, err, said) -> None:
    from dtrain.cli import main

    def fails(self, stage, key):
        raise err

    monkeypatch.setattr(Demo, "_run_shards", fails)
    assert main(["demo", "--fast", "--out", str(tmp_path), "--stages", "shards"]) == 2
    msg = capsys.readouterr().err
    assert said in msg and f"(traceback in {tmp_path / 'demo.log'})" in msg and "Traceback" not in msg
    assert "Traceback" in (tmp_path / "demo.log").read_text()

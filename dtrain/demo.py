"""``dtrain demo``: the whole product end to end on CPU, with no account, GPU or download.

    dtrain demo                     # 8 min on an idle 2-core CPU: shards -> teachers -> students -> FID per NFE
    dtrain demo --fast              # 2 min smoke version (what tests/e2e/test_demo.py runs)
    dtrain demo --stages teacher pd eval report --out runs/mine

Stages (each one's outputs are listed in ``<out>/stages/<stage>.json``):

- ``shards``: sklearn's digits (the train split the FID-digits classifier was fit on) as WebDataset shards.
- ``teacher``: a class-conditional UNet (``recipes/teacher/digits.yaml``) trained on the shards, exported as a bundle.
- ``flow_teacher``: the same UNet on the rectified-flow schedule (``recipes/teacher/digits_flow.yaml``), the
  teacher whose weights MeanFlow starts from.
- ``pd``, ``cd``, ``ict``, ``meanflow``, ``ctm``: each student that exists (progressive distillation, arXiv
  2202.00512; consistency distillation, arXiv 2303.01469; improved consistency training, arXiv 2310.14189, whose
  loss needs no teacher: it starts from the teacher's weights; MeanFlow, arXiv 2505.13447; CTM, arXiv 2310.02279),
  from its recipe with its teacher's *bundle* as ``teacher:``, exported as a bundle.
- ``eval``: FID-digits and class accuracy per NFE of every bundle (teachers: DDIM and DPM-Solver++(2M) at several
  NFE; students: their own samplers), plus the real test split as the floor, and a 10 x 10 sample grid per model.
- ``report``: the FID-vs-NFE plot, ``results.md`` / ``results.json`` (the table and where every artefact is),
  an offline W&B run of the table, and the final table on the terminal.

Each demo recipe is the repository's recipe, resolved, with the data switched to the shards and the sizes of the
demo; it is written to ``<out>/recipes/<stage>.yaml`` (``dtrain fit <it> --resume auto`` continues that run,
``name=...`` trains it again beside). A stage is skipped when
its record's key (a content hash of its resolved recipe or settings and of its inputs' keys and weights) matches
and its outputs exist and check out (bundle weights against their sha256), so an interrupted demo resumes; a
training stage cut off in the middle resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dtrain.errors import check_writable
from dtrain.fileio import write_json

__all__ = ["STAGES", "STUDENTS", "Student", "Sizes", "FULL", "FAST", "Demo", "run_demo", "add_demo_args",
           "run_demo_cli"]

DEMO_FORMAT = 1
RECIPES = Path(__file__).resolve().parent.parent / "recipes"
REF = "digits:train"  # FID-digits reference: the split the shards hold


@dataclass(frozen=True)
class Student:
    """A student stage: its recipe (under ``recipes/``), the sampler it is scored with, its paper and the teacher
    stage whose bundle it distils."""

    name: str
    recipe: str
    sampler: str
    title: str
    teacher: str = "teacher"


STUDENTS: tuple[Student, ...] = (
    Student("pd", "pd/digits.yaml", "ddim", "progressive distillation (arXiv 2202.00512)"),
    Student("cd", "cm/cd_digits.yaml", "consistency", "consistency distillation (arXiv 2303.01469)"),
    Student("ict", "cm/ict_digits.yaml", "consistency",
            "improved consistency training: no teacher in the loss, started from its weights (arXiv 2310.14189)"),
    Student("meanflow", "flowmap/meanflow_teacher_digits.yaml", "flowmap",
            "MeanFlow from the flow teacher's weights (arXiv 2505.13447)", teacher="flow_teacher"),
    Student("ctm", "flowmap/ctm_digits.yaml", "flowmap", "consistency trajectory model (arXiv 2310.02279)"),
)
TEACHERS = {"teacher": "teacher/digits.yaml", "flow_teacher": "teacher/digits_flow.yaml"}  # stage -> recipe
TITLES = {"data": "real digits: the test split against the train split (the floor)",
          "teacher": "class-conditional UNet teacher, VP cosine (DDIM, DPM-Solver++(2M))",
          "flow_teacher": "the same UNet on the rectified-flow schedule (DDIM = Euler, DPM-Solver++(2M))",
          **{s.name: s.title for s in STUDENTS}}
STAGES: tuple[str, ...] = ("shards", *TEACHERS, *(s.name for s in STUDENTS), "eval", "report")
TRAINED = (*TEACHERS, *(s.name for s in STUDENTS))
# the demo goes on when one of these fails; eval scores each one that is up to date (and needs the teacher)
OPTIONAL = tuple(s for s in TRAINED if s != "teacher")


@dataclass(frozen=True)
class Sizes:
    """How much the demo trains and samples (``FULL`` and ``FAST``)."""

    teacher_steps: int
    teacher_batch: int
    teacher_warmup: int
    flow_teacher_steps: int  # batch and warmup: the teacher's
    pd_start: int  # the teacher's DDIM steps the first PD round halves
    pd_end: int  # the last round's student steps
    pd_round_steps: int  # optimizer steps per PD round
    cd_steps: int
    ict_steps: int
    meanflow_steps: int
    ctm_steps: int
    student_batch: int
    eval_num: int  # samples per FID point
    eval_batch: int
    teacher_samplers: tuple[str, ...]
    student_nfe: tuple[int, ...]
    ckpt_every: int
    shard_size: int = 500
    grid_rows: int = 10  # sample grids: rows x 10 classes
    seed: int = 0

    def steps(self, stage: str) -> int:
        if stage == "pd":
            return self.pd_round_steps * len(self.pd_rounds())
        return int(getattr(self, f"{stage}_steps"))

    def pd_rounds(self) -> list[int]:
        n, out = self.pd_start, []
        while n > self.pd_end:
            n //= 2
            out.append(n)
        return out


FULL = Sizes(teacher_steps=600, teacher_batch=128, teacher_warmup=50, flow_teacher_steps=600, pd_start=16, pd_end=2,
             pd_round_steps=80, cd_steps=150, ict_steps=150, meanflow_steps=300, ctm_steps=120, student_batch=64,
             eval_num=500, eval_batch=250, teacher_samplers=("ddim:2,4,8,16", "dpm++2m:4,8"), student_nfe=(1, 2, 4),
             ckpt_every=100)
FAST = Sizes(teacher_steps=300, teacher_batch=64, teacher_warmup=20, flow_teacher_steps=300, pd_start=8, pd_end=4,
             pd_round_steps=20, cd_steps=20, ict_steps=20, meanflow_steps=20, ctm_steps=20, student_batch=32,
             eval_num=200, eval_batch=200, teacher_samplers=("ddim:4,16", "dpm++2m:4,8"), student_nfe=(1, 2),
             ckpt_every=50, grid_rows=4)


DEMO_EMA = 0.995


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Terminal: rich when installed (a live bar per stage), plain lines otherwise


class _UI:
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        try:
            from rich.console import Console

            self.console: Any = Console(highlight=False)
        except ImportError:  # rich is a dependency, but the demo must not need it
            self.console = None

    def print(self, msg: str = "", style: str | None = None) -> None:
        if self.quiet:
            return
        if self.console is not None:
            self.console.print(msg, style=style, soft_wrap=True)
        else:
            print(_plain(msg), flush=True)

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        """A progress bar; yields ``update(completed, info="")``."""
        if self.quiet:
            yield lambda completed, info="": None
            return
        if self.console is None:
            state = {"last": -1.0}

            def update(completed: int, info: str = "") -> None:
                now = time.monotonic()
                if now - state["last"] >= 10 or completed >= total:
                    state["last"] = now
                    print(f"    {description}: {completed}/{total} {info}".rstrip(), flush=True)

            yield update
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("    {task.description}"), BarColumn(bar_width=30), MofNCompleteColumn(),
                      TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=self.console,
                      transient=True) as bar:
            tid = bar.add_task(description, total=total, info="")
            yield lambda completed, info="": bar.update(tid, completed=completed, info=info)

    def table(self, title: str, cols: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        if self.quiet:
            return
        if self.console is None:
            print(f"\n{title}\n" + _markdown_table(cols, rows), flush=True)
            return
        from rich.table import Table

        t = Table(title=title)
        for i, c in enumerate(cols):
            t.add_column(c, justify="left" if i < 2 else "right")
        for r in rows:
            t.add_row(*r)
        self.console.print(t)


def _plain(msg: str) -> str:
    """Rich markup ``[bold]...[/]`` stripped for plain output."""
    import re

    return re.sub(r"\[/?[a-z #0-9]*\]", "", msg)


def _markdown_table(cols: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _quiet_logs(log_file: Path) -> Iterator[None]:
    """Lightning's info lines, Python warnings and whatever libraries write to stderr (W&B) go to ``log_file``
    instead of the terminal while the demo runs; the demo's own display is on stdout."""
    import lightning.pytorch  # noqa: F401  (on import it adds its own console handler: replace it below)

    log_file.parent.mkdir(parents=True, exist_ok=True)
    stream = open(log_file, "a", buffering=1)  # closed in finally
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    names = ("lightning.pytorch", "lightning.fabric", "lightning", "py.warnings", "dtrain")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate) for n in names}
    for n in names:
        lg = logging.getLogger(n)
        lg.handlers, lg.propagate = [handler], False
    logging.getLogger("dtrain").setLevel(logging.INFO)
    logging.captureWarnings(True)
    env = {k: os.environ.get(k) for k in ("WANDB_SILENT", "WANDB_CONSOLE")}
    os.environ["WANDB_SILENT"], os.environ["WANDB_CONSOLE"] = "true", "off"
    stderr, sys.stderr = sys.stderr, stream
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield
    finally:
        sys.stderr = stderr
        logging.captureWarnings(False)
        for n, (hs, prop) in saved.items():
            lg = logging.getLogger(n)
            lg.handlers, lg.propagate = hs, prop
        handler.close()
        stream.close()
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _progress_callback(update: Callable[..., None], total: int) -> Any:
    """A Lightning callback that reports the global step (and the last logged loss) to ``update``."""
    import lightning as L

    class StepProgress(L.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            loss = trainer.callback_metrics.get("train/loss")
            update(min(trainer.global_step, total), f"loss {float(loss):.4f}" if loss is not None else "")

    return StepProgress()


# ---------------------------------------------------------------------------------------------
# The demo


class Interrupted(Exception):
    """The demo was stopped by a signal inside a stage (already reported); ``code`` is the exit code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _locked(out: Path) -> contextlib.AbstractContextManager[None]:
    """Hold ``out/.demo.lock`` for a run: a second demo into one folder would rewrite the first one's runs."""
    from dtrain.fileio import exclusive

    return exclusive(out / ".demo.lock", f"--out: another dtrain demo is running in {out}; wait for it to end, or "
                     "give this one another --out", StageError)


class StageError(RuntimeError):
    """A stage cannot run (missing inputs); the message says what to run."""


@dataclass
class _Record:
    stage: str
    key: str
    status: str  # running | done
    outputs: dict[str, str] = field(default_factory=dict)  # name -> path relative to the demo folder
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    digest: str = ""  # key + weights hashes: what downstream keys depend on


class Demo:
    """The demo's stages over one output folder; ``run()`` executes the selected ones, skipping valid ones."""

    def __init__(self, out: str | Path = "runs/demo", *, sizes: Sizes = FULL, stages: Sequence[str] | None = None,
                 threads: int = 1, wandb: str | None = None, force: bool = False, quiet: bool = False) -> None:
        self.out = Path(out).absolute()
        check_writable(self.out, "--out", directory=True)
        if threads < 1:
            raise StageError(f"--threads: must be >= 1, not {threads}")
        self.sizes = sizes
        bad = [s for s in (stages or ()) if s not in STAGES]
        if bad:
            raise StageError(f"--stages: unknown stage {bad[0]!r}; choose from {list(STAGES)}")
        self.selected = [s for s in STAGES if stages is None or s in stages]
        self.threads = threads
        self.wandb = _wandb_mode(wandb)
        self.force = force
        self.ui = _UI(quiet)
        self.status: dict[str, str] = {}  # stage -> ran | skipped | failed | unavailable | not selected | done
        # earlier (not selected now; an earlier run of the demo ran or skipped it)
        self.timings: dict[str, float] = {}
        self.errors: dict[str, str] = {}
        self._keys: dict[str, str | None] = {}  # these three memos are cleared whenever a record is written
        self._fresh: dict[str, _Record | None] = {}  # _up_to_date's answers
        self._broken: dict[str, tuple[str, str]] = {}  # optional stage whose recipe does not load -> (error, traceback)

    # ---- records ----------------------------------------------------------------------------
    def _record_path(self, stage: str) -> Path:
        return self.out / "stages" / f"{stage}.json"

    def record(self, stage: str) -> _Record | None:
        p = self._record_path(stage)
        try:
            return _Record(**json.loads(p.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _write_record(self, rec: _Record) -> None:
        write_json(self._record_path(rec.stage), asdict(rec), indent=1)
        self._keys, self._fresh, self._broken = {}, {}, {}

    def valid(self, stage: str, key: str | None = None) -> _Record | None:
        """The stage's record when it finished, its key matches (``key``; None: any) and its outputs check out."""
        rec = self.record(stage)
        if rec is None or rec.status != "done" or (key is not None and rec.key != key):
            return None
        from dtrain.export.bundle import INFO_FILE, WEIGHTS_FILE, sha256_file

        for rel in rec.outputs.values():
            p = self.out / rel
            if not p.exists():
                return None
            if p.is_dir() and (p / INFO_FILE).is_file():  # a bundle: weights must match their recorded hash
                try:
                    want = json.loads((p / INFO_FILE).read_text())["weights"]["sha256"]
                    if sha256_file(p / WEIGHTS_FILE) != want:
                        return None
                except (OSError, ValueError, KeyError):
                    return None
            elif p.is_file() and p.stat().st_size == 0:
                return None
        return rec

    def _rel(self, p: Path) -> str:
        return str(Path(p).absolute().relative_to(self.out))

    # ---- stage keys ---------------------------------------------------------------------------
    def key(self, stage: str) -> str | None:
        """The stage's key now (None when an input is missing): what a valid record must match."""
        if stage not in self._keys:
            self._keys[stage] = self._key(stage)
        return self._keys[stage]

    def _key(self, stage: str) -> str | None:
        if stage == "shards":
            return _hash({"format": DEMO_FORMAT, "stage": stage, "source": "sklearn digits, train split",
                          "shard_size": self.sizes.shard_size, "seed": self.sizes.seed})
        inputs = self._inputs(stage)
        if inputs is None:
            return None
        if stage in TRAINED:  # settings that do not change the trained weights (threads, logging) are left out
            r = self._recipe_container(stage)  # its paths relative to the folder: a moved demo stays up to date
            r = json.loads(json.dumps(r).replace(json.dumps(str(self.out))[1:-1], "<out>"))
            r.pop("logger", None)
            r["trainer"] = {k: v for k, v in r["trainer"].items()
                            if k not in ("cpu_threads", "progress_bar", "log_every_n_steps")}
            return _hash({"format": DEMO_FORMAT, "recipe": r, "inputs": inputs})
        return _hash({"format": DEMO_FORMAT, "stage": stage, "inputs": inputs, "settings": self._settings(stage)})

    @staticmethod
    def needs(stage: str) -> list[str]:
        """The stages whose outputs ``stage`` reads (eval also reads every optional model that is up to date)."""
        if stage in TEACHERS:
            return ["shards"]
        student = next((s for s in STUDENTS if s.name == stage), None)
        if student is not None:
            return ["shards", student.teacher]
        return {"shards": [], "eval": ["teacher"], "report": ["eval"]}[stage]

    def _missing(self, stage: str) -> list[str]:
        """The stages, upstream of ``stage``, that are not up to date (in pipeline order)."""
        out: set[str] = set()
        for up in self.needs(stage):
            if self._up_to_date(up) is None:
                out |= {up, *self._missing(up)}
        return [s for s in STAGES if s in out]

    def _inputs(self, stage: str) -> dict[str, str] | None:
        out = {}
        for up in self.needs(stage):
            rec = self._up_to_date(up)
            if rec is None:
                return None
            out[up] = rec.digest
        if stage == "eval":  # every model that finished is scored; its digest is part of the key
            for name in OPTIONAL:
                rec = self._up_to_date(name)
                if rec is not None:
                    out[name] = rec.digest
        return out

    def _up_to_date(self, stage: str) -> _Record | None:
        """The stage's valid record for its key now (memoised); None too for an optional stage that does not load."""
        if stage not in self._fresh:
            try:
                key = self.key(stage)
            except Exception as e:
                if stage not in OPTIONAL:
                    raise
                self._broken[stage], key = (f"{type(e).__name__}: {e}", traceback.format_exc()), None
            self._fresh[stage] = None if key is None else self.valid(stage, key)
        return self._fresh[stage]

    def _settings(self, stage: str) -> dict[str, Any]:
        z = self.sizes
        if stage == "eval":
            return {"num": z.eval_num, "batch": z.eval_batch, "seed": z.seed, "teacher": z.teacher_samplers,
                    "student_nfe": z.student_nfe, "ref": REF, "grid_rows": z.grid_rows, "guidance": 1.0}
        return {"wandb": self.wandb, "plot": _has("matplotlib")}

    # ---- recipes ------------------------------------------------------------------------------
    def _recipe_overrides(self, stage: str) -> tuple[str, list[str], int]:
        z = self.sizes
        if stage in TEACHERS:
            return TEACHERS[stage], [f"trainer.max_steps={z.steps(stage)}", f"optim.warmup_steps={z.teacher_warmup}"], \
                z.teacher_batch
        student = next(s for s in STUDENTS if s.name == stage)
        ov = [f"teacher={self.out / 'bundles' / student.teacher}", f"trainer.max_steps={z.steps(stage)}"]
        if stage == "pd":
            ov += [f"method.start_steps={z.pd_start}", f"method.end_steps={z.pd_end}",
                   f"method.round_steps=[{z.pd_round_steps}]", "method.eval=false"]
        return student.recipe, ov, z.student_batch

    def _recipe_container(self, stage: str) -> dict[str, Any]:
        """The resolved recipe of a training stage as a plain dict: the repository's recipe + the demo's sizes, the
        shards as data, W&B (or CSV when disabled) logging into the run directory."""
        from dtrain.config import load_recipe, to_container

        rel, overrides, batch = self._recipe_overrides(stage)
        src = RECIPES / rel
        if not src.is_file():
            raise StageError(f"{stage}: recipe {src} not found (the demo runs from a source checkout: "
                             f"pip install -e .)")
        common = [f"name={stage}", f"out_dir={self.out / 'runs'}", f"seed={self.sizes.seed}",
                  f"logger.mode={self.wandb}", "logger.project=dtrain-demo", "logger.name=null",
                  "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=1",
                  f"trainer.cpu_threads={self.threads}", "trainer.progress_bar=false",
                  "trainer.sample_every_n_steps=0", "trainer.log_every_n_steps=10",
                  f"trainer.ckpt_every_n_steps={self.sizes.ckpt_every}", "eval.every_n_steps=0"]
        d = to_container(load_recipe(src, [*common, *overrides]))
        # a warmup of at most a fifth of the (per round) training: the demo's runs are far shorter than the recipes'
        phase = self.sizes.pd_round_steps if stage == "pd" else int(d["trainer"]["max_steps"])
        d["optim"]["warmup_steps"] = min(int(d["optim"]["warmup_steps"]), phase // 5)
        # and EMA decays of at most DEMO_EMA (a window of 200 steps; iCT's 0.999 suits its recipe's 5400 steps)
        d["ema"]["decays"] = [min(float(b), DEMO_EMA) for b in d["ema"]["decays"] or []]
        d["data"] = {"name": "wds", "shards": str(self.out / "shards" / "index.json"), "batch_size": batch,
                     "num_workers": 1, "shuffle": 2000, "flip": False}
        d["logger"]["tags"] = [*d["logger"].get("tags", []), "demo"]
        return d

    def recipe(self, stage: str) -> Any:
        """Write ``<out>/recipes/<stage>.yaml`` and load it back through the validating loader."""
        from omegaconf import OmegaConf

        from dtrain.config import load_recipe

        path = self.out / "recipes" / f"{stage}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        body = OmegaConf.to_yaml(OmegaConf.create(self._recipe_container(stage)))
        path.write_text(f"# dtrain demo, stage {stage}: `dtrain fit {path} --resume auto` continues its run, "
                        f"`... name={stage}2` trains it again beside\n{body}")
        return load_recipe(path)

    # ---- stages ----------------------------------------------------------------------------------
    def run(self) -> int:
        """Run the selected stages; returns an exit code (1 when a stage failed)."""
        import torch

        self.out.mkdir(parents=True, exist_ok=True)
        t_all = time.perf_counter()
        prev_threads = torch.get_num_threads()
        z = self.sizes
        with _locked(self.out):
            torch.set_num_threads(self.threads)
            self.ui.print(f"[bold]dtrain demo[/] -> {self.out}  (teachers {z.teacher_steps} and "
                          f"{z.flow_teacher_steps} steps, students {', '.join(s.name for s in STUDENTS)}; W&B "
                          f"{self.wandb}; torch threads {self.threads}; details in {self.out / 'demo.log'})")
            try:
                with _quiet_logs(self.out / "demo.log"):
                    for i, stage in enumerate(STAGES):
                        self._stage(i, stage)
            finally:
                torch.set_num_threads(prev_threads)
            total = time.perf_counter() - t_all
            self._write_summary(total)
        failed = [s for s, v in self.status.items() if v == "failed"]
        self.ui.print(f"\n[bold]done[/] in {total / 60:.1f} min" + (f"; [red]failed: {', '.join(failed)}[/] "
                      f"(tracebacks in {self.out / 'demo.log'})" if failed else ""))
        return 1 if failed else 0

    def _stage(self, i: int, stage: str) -> None:
        head = f"[bold cyan][{i + 1}/{len(STAGES)}] {stage}[/]"
        if stage not in self.selected:
            self.status[stage] = "not selected"
            return
        if stage in (s.name for s in STUDENTS) and not self._available(stage):
            self.status[stage] = "unavailable"
            self.ui.print(f"{head}: not available in this dtrain (no recipe or training module); skipped")
            return
        rec = self._up_to_date(stage)
        if stage in self._broken:
            self._failed(stage, f"{head}: ", *self._broken[stage])
            return
        key = self.key(stage)
        if key is None:
            missing = self._missing(stage)
            failed = [m for m in missing if self.status.get(m) == "failed"]
            fast = " --fast" if self.sizes == FAST else ""
            msg = (f"stage {stage} needs the outputs of {', '.join(missing)}"
                   + (f" ({', '.join(failed)} failed above)" if failed else "")
                   + f": run `dtrain demo{fast} --out {self.out} --stages {' '.join(missing)} {stage}`"
                   + self._other_sizes_hint())
            if stage in OPTIONAL:
                self._failed(stage, f"{head}: ", msg)
                return
            raise StageError(msg)
        if rec is not None and not self.force:
            self.status[stage] = "skipped"
            self.ui.print(f"{head}: up to date, skipped ({_where(rec, self.out)})")
            return
        self.ui.print(f"{head}: {_DESCRIBE[stage](self)}")
        t0 = time.perf_counter()
        try:
            rec = (self._run_trained if stage in TRAINED else getattr(self, f"_run_{stage}"))(stage, key)
        except (KeyboardInterrupt, SystemExit) as e:  # dtrain fit ends a Ctrl-C in training with 130 (Lightning's
            term = isinstance(e, SystemExit) and e.code == 143  # before it: sys.exit(1)), SIGTERM with 143
            self.ui.print(f"    [yellow]interrupted ({'SIGTERM' if term else 'Ctrl-C'}) in stage {stage}: rerun the "
                          f"same command to resume[/]")
            raise Interrupted(143 if term else 130) from None
        except Exception as e:
            if stage not in OPTIONAL:
                raise
            self._failed(stage, "    ", f"{type(e).__name__}: {e}", traceback.format_exc())
            return
        rec.seconds = round(time.perf_counter() - t0, 1)
        rec.status = "done"
        self._write_record(rec)
        self.status[stage] = "ran"
        self.timings[stage] = rec.seconds
        self.ui.print(f"    done in {rec.seconds:.0f} s ({_where(rec, self.out)})")

    def _other_sizes_hint(self) -> str:
        """When the folder's last demo ran at the other sizes (--fast or not): say so (its outputs are not reused)."""
        try:
            before = json.loads((self.out / "demo.json").read_text()).get("sizes")
        except (OSError, ValueError, AttributeError):
            return ""
        def plain(z: Sizes) -> Any:
            return json.loads(json.dumps(asdict(z)))  # as demo.json holds them (tuples as lists)

        other = next((name for name, z in (("--fast", FAST), ("the full sizes", FULL)) if before == plain(z)), None)
        if other is None or before == plain(self.sizes):
            return ""
        return f"; {self.out} holds a demo run at {other}" + (" (add --fast to use it)" if other == "--fast" else "")

    def _failed(self, stage: str, prefix: str, msg: str, tb: str | None = None) -> None:
        """An optional stage that cannot run: reported (``tb`` in the log), and the demo goes on (its exit code: 1)."""
        if tb is not None:
            logging.getLogger("dtrain.demo").error("stage %s failed:\n%s", stage, tb)
        self.status[stage] = "failed"
        self.errors[stage] = msg
        self.ui.print(f"{prefix}[red]failed: {msg[:600]}[/]")

    def _available(self, stage: str) -> bool:
        from dtrain.lit.common import LIT_MODULES

        student = next(s for s in STUDENTS if s.name == stage)
        if not (RECIPES / student.recipe).is_file():
            return False
        try:
            from dtrain.config import load_recipe

            name = load_recipe(RECIPES / student.recipe, [f"teacher={self.out}"], validate=False).method.name
            return name in LIT_MODULES
        except Exception:
            return False

    def _run_shards(self, stage: str, key: str) -> _Record:
        from dtrain.data.shards import from_digits, write_shards

        data = from_digits("train")
        out = self.out / "shards"
        shutil.rmtree(out, ignore_errors=True)
        with self.ui.task("writing", len(data)) as update:
            index = write_shards(data, out, shard_size=self.sizes.shard_size, seed=self.sizes.seed, progress=False)
            update(len(data))
        outputs = {"index": self._rel(out / "index.json")}
        outputs.update({s["name"]: self._rel(out / s["name"]) for s in index["shards"]})
        info = {"samples": index["total"], "shards": len(index["shards"])}
        digest = _hash([key, [s["sha256"] for s in index["shards"]]])
        return _Record(stage, key, "running", outputs, info, digest=digest)

    def _run_trained(self, stage: str, key: str) -> _Record:
        """fit (resuming an interrupted run of the same key), then export the last checkpoint as a bundle."""
        from dtrain.export.checkpoint import export_checkpoint
        from dtrain.lit.fit import fit, run_dir

        cfg = self.recipe(stage)
        run = run_dir(cfg)
        last = run / "checkpoints" / "last.ckpt"
        old = self.record(stage)
        src = None  # the newest readable checkpoint of an interrupted run (last.ckpt, or a SIGTERM's hpc_ckpt_<n>)
        if old is not None and old.key == key and old.status == "running" and not self.force and run.is_dir():
            from dtrain.errors import InputError
            from dtrain.lit.checkpointing import resume_path

            try:
                src = resume_path(run, "auto")
            except InputError:  # none readable: start over
                src = None
        resume, resumed_from = src is not None, None
        if src is not None:
            import torch

            resumed_from = int(torch.load(src, map_location="cpu", weights_only=True).get("global_step", 0))
            self.ui.print(f"    resuming the interrupted run from step {resumed_from} ({src})")
        else:
            shutil.rmtree(run, ignore_errors=True)
            self._write_record(_Record(stage, key, "running"))
        total = int(cfg.trainer.max_steps)
        with self.ui.task("training", total) as update:
            fit(cfg, resume="last" if resume else None, callbacks=[_progress_callback(update, total)])
        bundle = export_checkpoint(last, self.out / "bundles" / stage, overwrite=True)
        info_json = json.loads((bundle / "dtrain.json").read_text())
        sha = info_json["weights"]["sha256"]
        outputs = {"recipe": self._rel(self.out / "recipes" / f"{stage}.yaml"), "checkpoint": self._rel(last),
                   "bundle": self._rel(bundle)}
        info = {"steps": total, "batch_size": int(cfg.data.batch_size), "kind": info_json["kind"],
                "params": info_json["weights"]["num_params"], "run": self._rel(run),
                "title": TITLES[stage], "resumed_from_step": resumed_from}
        if stage == "pd":  # every round's student is a bundle of its own (runs/pd/rounds/)
            here = self._round_bundles(run)
            info["rounds"] = [{"steps": n, "bundle": b} for n, b in here.items()]
            outputs.update({f"round_{n}": b for n, b in here.items()})
        return _Record(stage, key, "running", outputs, info, digest=_hash([key, sha]))

    def _round_bundles(self, run: Path) -> dict[int, str]:
        """{steps: bundle relative to the folder} of a PD run's finished rounds, found by name in the run's rounds/:
        rounds.json's paths are relative to the run (rounds/<name>), older ones absolute, where the folder was when
        each round ended (a moved demo resumes with rounds from before the move)."""
        rounds = json.loads((run / "rounds" / "rounds.json").read_text())
        return {int(r["steps"]): self._rel(run / "rounds" / Path(r["bundle"]).name) for r in rounds}

    # ---- evaluation -------------------------------------------------------------------------------
    def _eval_plan(self) -> list[dict[str, Any]]:
        """(model, bundle, sampler specs, spacing) for every bundle to score."""
        z = self.sizes
        plan = []
        for t in TEACHERS:
            if t == "teacher" or self._up_to_date(t) is not None:  # eval needs the teacher
                plan.append({"model": t, "bundle": self.out / "bundles" / t, "specs": list(z.teacher_samplers),
                             "title": TITLES[t]})
        for s in STUDENTS:
            rec = self._up_to_date(s.name)
            if rec is None:
                continue
            if s.name == "pd":
                for r in rec.info["rounds"]:
                    plan.append({"model": "pd", "bundle": self.out / r["bundle"], "specs": [f"ddim:{r['steps']}"],
                                 "title": s.title})
            else:
                plan.append({"model": s.name, "bundle": self.out / rec.outputs["bundle"],
                             "specs": [f"{s.sampler}:{','.join(str(n) for n in z.student_nfe)}"], "title": s.title})
        return plan

    def _stale(self) -> list[str]:
        """The optional models trained before on inputs that changed since (eval leaves them out)."""
        return [m for m in OPTIONAL if self._up_to_date(m) is None and (rec := self.record(m)) is not None
                and rec.status == "done" and rec.key != self.key(m)]

    def _run_eval(self, stage: str, key: str) -> _Record:
        import torch

        from dtrain.data.digits import digits_arrays
        from dtrain.eval.features import build_extractor
        from dtrain.eval.fid import FID, load_ref
        from dtrain.eval.grids import save_grid
        from dtrain.eval.sweep import fid_sweep, parse_specs
        from dtrain.export.bundle import load_bundle
        from dtrain.export.commands import save_samples

        z = self.sizes
        extractor = build_extractor("digits")
        ref = load_ref(REF, extractor)
        out = self.out / "eval"
        shutil.rmtree(out, ignore_errors=True)
        rows: list[dict[str, Any]] = []
        # the floor: real held-out digits against the same reference
        x, y = digits_arrays("test")
        metric = FID(extractor, ref, shape=(1, 8, 8), ref_source=REF)
        metric.update(x, y)
        res = metric.compute()
        rows.append({"model": "data", "method": TITLES["data"], "sampler": "-", "nfe": 0,
                     "fid": res["fid"], "class_acc": res.get("class_acc"), "num": len(x), "seconds": 0.0,
                     "bundle": None})
        plan = self._eval_plan()
        if stale := self._stale():  # trained before on inputs that changed since (a retrained teacher)
            fast = " --fast" if self.sizes == FAST else ""
            self.ui.print(f"    [yellow]not scored, out of date: {', '.join(stale)}[/] (their inputs changed); "
                          f"`dtrain demo{fast} --out {self.out} --stages {' '.join(stale)} eval report` retrains them")
        shutil.rmtree(self.out / "grids", ignore_errors=True)  # the grids of models no longer scored go too
        points = [(p, name, n) for p in plan for name, nfes in parse_specs(p["specs"]) for n in nfes]
        grids: dict[str, str] = {}
        best: dict[str, tuple[float, Any, str, int]] = {}
        pipes: dict[str, Any] = {}
        with self.ui.task("FID-digits", len(points)) as update:
            for k, (p, name, nfe) in enumerate(points):
                update(k, f"{p['model']} {name} NFE {nfe}")
                bkey = str(p["bundle"])
                if bkey not in pipes:
                    pipes[bkey] = load_bundle(p["bundle"])
                pipe = pipes[bkey]
                spacing = pipe.info["sampler"].get("spacing") if name == pipe.info["sampler"]["name"] else None
                (r,) = fid_sweep(pipe.denoiser, [(name, [nfe])], num=z.eval_num, batch_size=z.eval_batch,
                                 shape=pipe.shape, extractor=extractor, ref=ref, num_classes=pipe.num_classes,
                                 guidance=1.0, seed=z.seed, spacing=spacing, progress=False, ref_source=REF)
                if r.grid is not None:
                    save_grid(r.grid, out / p["model"] / f"{name}_nfe{r.nfe}.png", upscale=4)
                rows.append({"model": p["model"], "method": p["title"], "sampler": name, "nfe": r.nfe, "fid": r.fid,
                             "class_acc": r.class_acc, "num": r.num, "seconds": round(r.seconds, 2),
                             "bundle": self._rel(p["bundle"])})
                if p["model"] not in best or r.fid < best[p["model"]][0] or p["model"] == "pd":
                    best[p["model"]] = (r.fid, pipe, name, r.nfe)  # pd: the last round (fewest steps)
            update(len(points))
        # one 10-column grid per model (a column per class) at its best point (pd: its final student)
        for model, (_, pipe, name, nfe) in best.items():
            n = z.grid_rows * pipe.num_classes
            labels = [i % pipe.num_classes for i in range(n)]
            xs = pipe.sample(n, nfe=nfe, sampler=name, labels=labels, w=1.0,
                             generator=torch.Generator().manual_seed(z.seed))
            path = save_samples(self.out / "grids" / f"{model}.png", _upscale(xs, 4), torch.tensor(labels), pipe,
                                nrow=pipe.num_classes)
            grids[model] = self._rel(path)
            for r in rows:
                if r["model"] == model and r["sampler"] == name and r["nfe"] == nfe:
                    r["grid"] = grids[model]
        (out / "rows.json").parent.mkdir(parents=True, exist_ok=True)
        (out / "rows.json").write_text(json.dumps(rows, indent=1) + "\n")
        outputs = {"rows": self._rel(out / "rows.json"), **{f"grid_{m}": g for m, g in grids.items()}}
        return _Record(stage, key, "running", outputs, {"rows": rows, "grids": grids},
                       digest=_hash([key, rows]))

    # ---- report -----------------------------------------------------------------------------------
    def _run_report(self, stage: str, key: str) -> _Record:
        ev = self._up_to_date("eval")
        assert ev is not None  # the report's key exists only when eval is up to date
        rows = ev.info["rows"]
        out = self.out
        outputs: dict[str, str] = {}
        notes: list[str] = []
        plot = out / "fid_vs_nfe.png"
        if _has("matplotlib"):
            from dtrain.eval.report import plot_fid_vs_nfe

            floor = next((r["fid"] for r in rows if r["model"] == "data"), None)
            plot_fid_vs_nfe([{**r, "label": _label(r)} for r in rows if r["model"] != "data"], plot, floor=floor,
                            title=f"FID-digits vs NFE ({self.sizes.eval_num} samples per point)")
            outputs["plot"] = self._rel(plot)
        else:
            plot.unlink(missing_ok=True)
            notes.append("matplotlib is not installed: no FID-vs-NFE plot (pip install matplotlib)")
        wandb_dir = None
        if self.wandb != "disabled":
            wandb_dir = self._log_wandb(rows, ev.info["grids"], plot if "plot" in outputs else None)
            outputs["wandb"] = self._rel(wandb_dir)  # a rerun cut off after removing it reports again
        scored = {r["model"] for r in rows}
        models = {k: {**v, "grid": ev.info["grids"].get(k)} for k, v in self._models().items() if k in scored}
        results = {"format": DEMO_FORMAT, "rows": rows, "models": models, "sizes": asdict(self.sizes),
                   "eval": {"reference": REF, "extractor": "digits (FID-digits)", "guidance": 1.0,
                            "num": self.sizes.eval_num, "seed": self.sizes.seed}, "notes": notes}
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        outputs["json"] = self._rel(out / "results.json")
        (out / "results.md").write_text(self._markdown(rows, models, notes))
        outputs["markdown"] = self._rel(out / "results.md")
        info = {"notes": notes, "wandb": self._rel(wandb_dir) if wandb_dir else None}
        return _Record(stage, key, "running", outputs, info, digest=key)

    def _log_wandb(self, rows: list[dict[str, Any]], grids: dict[str, str], plot: Path | None) -> Path:
        """One offline (or online) W&B run with the table, the FID-vs-NFE line plot and every sample grid."""
        import wandb

        from dtrain.eval.report import log_wandb
        from dtrain.eval.sweep import SweepRow

        d = self.out / "report"
        shutil.rmtree(d / "wandb", ignore_errors=True)
        d.mkdir(parents=True, exist_ok=True)
        run = wandb.init(project="dtrain-demo", name="demo-report", mode=self.wandb, dir=str(d), job_type="eval",
                         config={"sizes": asdict(self.sizes), "reference": REF}, tags=["demo"])
        sweep = [SweepRow(_label(r), r["nfe"], r["nfe"], r["fid"], r["num"], r["seconds"], r["class_acc"])
                 for r in rows if r["model"] != "data"]
        log_wandb(sweep, run, prefix="demo")
        extra = {f"demo/grid/{m}": wandb.Image(str(self.out / g)) for m, g in grids.items()}
        if plot is not None:
            extra["demo/fid_vs_nfe_png"] = wandb.Image(str(plot))
        run.log(extra)
        run.finish()
        return d / "wandb"

    def _models(self) -> dict[str, Any]:
        out = {}
        for stage in TRAINED:
            rec = self.valid(stage)
            if rec is None:
                continue
            out[stage] = {**rec.info, "train_seconds": rec.seconds, **rec.outputs}
        return out

    def _markdown(self, rows: list[dict[str, Any]], models: dict[str, Any], notes: list[str]) -> str:
        z = self.sizes
        lines = ["# dtrain demo results\n",
                 f"FID-digits against sklearn digits' train split, {z.eval_num} samples per point (seed {z.seed}, "
                 f"class-balanced, no guidance); class accuracy by the FID-digits classifier (chance: 0.10).\n",
                 _markdown_table(*_table(rows, models)), "\n## Models\n",
                 _markdown_table(*self._model_table(models)), "\n## Artefacts\n", *self._artefacts(md=True)]
        if any(m.get("resumed_from_step") is not None for m in models.values()):
            notes = [*notes, "train s*: an interrupted run, resumed: the seconds of the resumed part"]
        lines += [f"\nNote: {n}\n" for n in notes]
        return "\n".join(lines) + "\n"

    def _model_table(self, models: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
        cols = ["model", "method", "training", "train s", "bundle", "sample grid"]
        rows = []
        for name, m in models.items():
            rows.append([name, TITLES[name], f"{m['steps']} steps x batch {m['batch_size']}",
                         f"{m['train_seconds']:.0f}" if m.get("train_seconds") is not None else "-",
                         f"`{m['bundle']}`", f"`{m['grid']}`" if m.get("grid") else "-"])
        return cols, rows

    def _artefacts(self, md: bool = False) -> list[str]:
        o = self.out
        items = [("shards", o / "shards"), ("recipes (dtrain fit <recipe> name=<new>)", o / "recipes"),
                 ("training runs (checkpoints, CSV or W&B logs)", o / "runs"),
                 ("bundles (dtrain sample)", o / "bundles"),
                 ("sample grids, one per model", o / "grids"), ("FID-vs-NFE plot", o / "fid_vs_nfe.png"),
                 ("sample grid per FID point", o / "eval"), ("table", o / "results.md"),
                 ("table + metadata", o / "results.json"), ("log", o / "demo.log")]
        return [f"- {what}: `{p}`" if md else f"  {what:48s} {p}" for what, p in items if p.exists()]

    def _write_summary(self, total: float) -> None:
        rep = self._up_to_date("report")
        try:  # a run of some --stages keeps what the earlier runs said of the others
            before = json.loads((self.out / "demo.json").read_text())
        except (OSError, ValueError):
            before = {}
        for stage, status in self.status.items():
            if status == "not selected" and (before.get("stages") or {}).get(stage) in ("ran", "skipped",
                                                                                         "done earlier",
                                                                                         "out of date"):
                if self._up_to_date(stage) is None:  # its inputs changed in this run (a new teacher)
                    self.status[stage] = "out of date"
                    continue
                self.status[stage] = "done earlier"
                if stage in (before.get("timings") or {}):
                    self.timings.setdefault(stage, before["timings"][stage])
        summary = {"out": str(self.out), "seconds": round(total, 1), "stages": self.status, "timings": self.timings,
                   "errors": self.errors, "sizes": asdict(self.sizes), "threads": self.threads,
                   "machine": {"cpus": os.cpu_count(), "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg")
                               else None}}
        (self.out / "demo.json").write_text(json.dumps(summary, indent=1) + "\n")
        if rep is None:
            self.ui.print("\nno up-to-date report: run the stages it needs (`--stages eval report`) for the table")
            return
        results = json.loads((self.out / "results.json").read_text())
        self.ui.print()
        self.ui.table("dtrain demo: FID-digits per NFE (lower is better)", *_table(results["rows"], results["models"]))
        self.ui.print("class acc: the FID-digits classifier's accuracy on class-conditional samples (chance 0.10)")
        if any(m.get("resumed_from_step") is not None for m in results["models"].values()):
            self.ui.print("train s*: an interrupted run, resumed: the seconds of the resumed part")
        names = ("data", *results["models"])
        width = max(map(len, names))
        for name in names:
            self.ui.print(f"  {name:{width}s}  {TITLES[name]}")
        self.ui.print("\n[bold]artefacts[/]")
        for line in self._artefacts():
            self.ui.print(line)
        for n in results.get("notes", []):
            self.ui.print(f"[yellow]note:[/] {n}")
        if self.wandb == "offline":
            runs = sorted(str(p) for p in self.out.glob("runs/*/wandb/offline-run-*"))
            runs += sorted(str(p) for p in self.out.glob("report/wandb/offline-run-*"))
            if runs:
                self.ui.print(f"\nW&B ran offline ({len(runs)} runs); upload them with:\n  wandb sync "
                              f"{self.out}/runs/*/wandb/offline-run-* {self.out}/report/wandb/offline-run-*")
        elif self.wandb == "disabled" and list(self.out.glob("runs/*/csv/metrics*.csv")):  # trained by this mode
            self.ui.print(f"\nW&B disabled: training scalars are CSV files in {self.out}/runs/*/csv/")


def _label(r: dict[str, Any]) -> str:
    if r["model"] in TEACHERS:
        return f"{r['model'].replace('_', ' ')} {r['sampler']}"
    return str(r["model"])


def _table(rows: list[dict[str, Any]], models: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    cols = ["model", "sampler", "NFE", "FID", "class acc", "train s"]
    out = []
    for r in rows:
        m = models.get(r["model"], {})
        secs = m.get("train_seconds")
        out.append([r["model"], r["sampler"], str(r["nfe"]) if r["nfe"] else "-",
                    f"{r['fid']:.3f}" if r["fid"] is not None and math.isfinite(r["fid"]) else "nan",
                    f"{r['class_acc']:.3f}" if r.get("class_acc") is not None else "-",
                    "-" if secs is None else f"{secs:.0f}" + ("*" if m.get("resumed_from_step") is not None else "")])
    return cols, out


def _where(rec: _Record, out: Path) -> str:
    main = next((rec.outputs[k] for k in ("bundle", "markdown", "index", "rows") if k in rec.outputs), None)
    return str(out / main) if main else str(out)


def _upscale(x: Any, k: int) -> Any:
    return x.repeat_interleave(k, -2).repeat_interleave(k, -1)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _wandb_mode(mode: str | None) -> str:
    """--wandb, else $WANDB_MODE (dryrun = offline), else offline; W&B itself missing -> disabled (CSV logs)."""
    m = (mode or os.environ.get("WANDB_MODE") or "offline").lower()
    m = {"dryrun": "offline", "run": "online"}.get(m, m)
    if m not in ("online", "offline", "disabled"):
        raise StageError(f"--wandb / WANDB_MODE: must be online, offline or disabled, not {m!r}")
    m = m if m == "disabled" or _has("wandb") else "disabled"
    if m == "online":
        from dtrain.errors import InputError
        from dtrain.eval.report import check_wandb_login

        try:
            check_wandb_login(m, "--wandb / WANDB_MODE")
        except InputError as e:
            raise StageError(str(e)) from None
    return m


_DESCRIBE: dict[str, Callable[[Demo], str]] = {
    "shards": lambda d: f"sklearn digits (train split) -> WebDataset shards in {d.out / 'shards'}",
    "teacher": lambda d: f"class-conditional UNet, {d.sizes.teacher_steps} steps of batch {d.sizes.teacher_batch}",
    "flow_teacher": lambda d: (f"the same UNet on the flow schedule, {d.sizes.flow_teacher_steps} steps of batch "
                               f"{d.sizes.teacher_batch}"),
    "pd": lambda d: (f"progressive distillation {d.sizes.pd_start} -> {' -> '.join(map(str, d.sizes.pd_rounds()))} "
                     f"steps, {d.sizes.pd_round_steps} steps per round"),
    "cd": lambda d: f"consistency distillation, {d.sizes.cd_steps} steps",
    "ict": lambda d: f"improved consistency training from the teacher's weights, {d.sizes.ict_steps} steps",
    "meanflow": lambda d: f"MeanFlow from the flow teacher's weights, {d.sizes.meanflow_steps} steps",
    "ctm": lambda d: f"consistency trajectory model, {d.sizes.ctm_steps} steps",
    "eval": lambda d: f"FID-digits and class accuracy per NFE, {d.sizes.eval_num} samples per point",
    "report": lambda d: "plot, tables, W&B",
}


def _default_out(fast: bool) -> str:
    """The demo's folder when ``--out`` is not given."""
    return "runs/demo-fast" if fast else "runs/demo"


def run_demo(out: str | Path | None = None, *, fast: bool = False, stages: Sequence[str] | None = None,
             threads: int = 1, wandb: str | None = None, force: bool = False, quiet: bool = False,
             sizes: Sizes | None = None) -> int:
    """Run the demo (``FAST`` or ``FULL`` sizes, or ``sizes``) into ``out``; returns an exit code."""
    sizes = sizes or (FAST if fast else FULL)
    out = out or _default_out(fast)
    return Demo(out, sizes=sizes, stages=stages, threads=threads, wandb=wandb, force=force, quiet=quiet).run()


def add_demo_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--fast", action="store_true", help="the 2-minute smoke version (tiny training and sample counts)")
    p.add_argument("--out", default=None, help="output folder (default: runs/demo, or runs/demo-fast with --fast)")
    p.add_argument("--stages", nargs="+", default=None, metavar="STAGE",
                   help=f"run only these stages (others' outputs are reused): {' '.join(STAGES)}")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    p.add_argument("--wandb", default=None, choices=["online", "offline", "disabled"],
                   help="W&B mode (default: $WANDB_MODE, else offline; disabled logs CSV files)")
    p.add_argument("--force", action="store_true", help="rerun the selected stages even when they are up to date")
    return p


def run_demo_cli(args: argparse.Namespace) -> int:
    stages = None
    if args.stages:
        stages = [s for a in args.stages for s in a.replace(",", " ").split()]
        if not stages:
            print(f"dtrain demo: --stages: no stage given; choose from {' '.join(STAGES)}", file=sys.stderr)
            return 2
    try:
        return run_demo(args.out, fast=args.fast, stages=stages, threads=args.threads, wandb=args.wandb,
                        force=args.force)
    except StageError as e:
        print(f"dtrain demo: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        return e.code
    except KeyboardInterrupt:
        print("dtrain demo: interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a quota, a permission: one line, the traceback in demo.log
        if e.errno is None:
            raise
        out = Path(args.out or _default_out(args.fast))
        with contextlib.suppress(OSError), open(out / "demo.log", "a") as log:
            log.write(traceback.format_exc())
        what = "write" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else "read or write"
        print(f"dtrain demo: cannot {what} {e.filename or 'in ' + str(out)}: {e.strerror or e} (traceback in "
              f"{out / 'demo.log'})", file=sys.stderr)
        return 2


"""Progressive distillation as one ``dtrain fit`` run: rounds N0 -> N0/2 -> ... -> ``method.end_steps`` (Salimans &
Ho 2022, arXiv 2202.00512), optionally after guided PD's stage 1 (Meng et al. 2023, arXiv 2210.03142).

The round of a global step comes from ``method.round_steps`` (``round_plan``). Round 0's teacher is the recipe's
``teacher`` (a checkpoint or a bundle) and the student starts from its weights (``method.teacher_ema``); a
w-conditioned student adds a zero-initialised w embedding. When a round ends, its EMA student (``ema.decays[0]``,
the raw network without EMA) is evaluated at its step count and written to the run directory:

    <run>/rounds/round00_32steps/   bundle (dtrain.json + model.safetensors, the next round's teacher) + eval.json
    <run>/rounds/rounds.json        every finished round: kind, steps, global step, metrics, bundle path (relative
                                    to <run>, so the folder may move)

then it becomes the next teacher (loaded back from that bundle, on every rank) and the next student's
initialisation; the student's EMA copies and the optimizer state restart, and the LR warmup / schedule and the EMA
schedule (``ema.start_step``, ``ema.every``) run per round. The last round ends after training (``on_train_end``), or,
in a fit resumed from the last step's checkpoint, where Lightning runs no training loop, at ``on_fit_end`` when the
job before did not write its bundle.
Checkpoints record the round (``ckpt["dtrain"]["pd"]``) and its teacher's weights hash; a resume in the middle of any
round reloads that round's teacher from the previous round's bundle after checking it is that teacher
(``round_teacher``; ``ProgressiveModule.check_resume`` runs the checks before the trainer starts). Per-step
randomness (times, noise, w, label dropout) comes from a generator seeded by (seed, rank, global step), so a resumed
run repeats the uninterrupted one exactly.
A checkpoint's default sampler is DDIM at the round's step count on its distilled grid, so ``dtrain export``
gives a bundle that samples the student as trained.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dtrain.diffusion.guidance import GuidedCond, WCondDenoiser
from dtrain.diffusion.timesteps import make_grid
from dtrain.errors import InputError
from dtrain.fileio import write_json
from dtrain.lit.common import DiffusionModule, lr_factor, on_root_device, say
from dtrain.methods.progressive import GuidanceLoss, ProgressiveLoss, Round, pd_grid, round_plan, sample_w
from dtrain.samplers.base import initial_noise

__all__ = ["ProgressiveModule", "round_lr", "round_teacher"]

ROUNDS_INDEX = "rounds.json"


def round_lr(step: int, *, bounds: tuple[tuple[int, int], ...], warmup: int, schedule: str, min_ratio: float) -> float:
    """``lr_factor`` restarted in every round ([start, end) pairs): warmup, then constant or cosine, per round."""
    start, end = next((b for b in bounds if step < b[1]), bounds[-1])
    return lr_factor(step - start, warmup=warmup, total=end - start, schedule=schedule, min_ratio=min_ratio)


def _plan_text(plan: Sequence[Round]) -> str:
    return ", ".join(f"{r.steps}-step [{r.start}, {r.end})" for r in plan)


def round_teacher(run: Path, plan: Sequence[Round], index: int, ref: Mapping[str, Any] | None) -> Path:
    """The teacher of round ``index`` (>= 1) that a checkpoint of that round was trained against (``ref``: its
    ``dtrain.teacher``, with the weights' sha256): round index - 1's bundle in the run folder ``run``, or, when that one
    is gone, the bundle at the path the checkpoint recorded. ``CheckpointError`` naming the run's bundle when it holds
    other weights (replaced: training would go on towards another target) or neither bundle is there."""
    from dtrain.export.bundle import read_info
    from dtrain.export.checkpoint import CheckpointError, is_bundle

    prev, ref = plan[index - 1], ref or {}
    own, want = run / "rounds" / prev.name, ref.get("sha256")
    what = f"the bundle of PD round {index}/{len(plan)}'s student, round {index + 1}'s teacher"
    redo = (f"resume from a checkpoint of step {prev.end} or earlier (--resume <file>), which writes it again, or "
            f"start a new run")
    if is_bundle(own):
        have = read_info(own)["weights"]["sha256"]
        if want is None or have == want:
            return own
        raise CheckpointError(own, "", f"{what}, holds weights sha256 {have[:12]}, not those the checkpoint was "
                              f"trained against ({want[:12]}, {ref.get('path')}): a resume would train on against "
                              f"another teacher; put that bundle back, {redo}")
    was = Path(ref["path"]) if ref.get("path") else None
    if was is not None and want is not None and is_bundle(was) and read_info(was)["weights"]["sha256"] == want:
        return was  # the folder was copied or moved without its rounds: the recorded bundle, checked by its hash
    seen = "" if was is None or was == own else \
        f" (the checkpoint's record of it, {was}, is {'another bundle' if is_bundle(was) else 'gone too'})"
    raise CheckpointError(own, "", f"{what}, is missing{seen}; put it back (a copy of that bundle), {redo}")


class ProgressiveModule(DiffusionModule):
    """The student (``net``, its EMAs), the frozen teacher of the current round (``teacher``, not checkpointed)
    and the round plan; see the module docstring. ``teacher`` overrides the recipe's round-0 teacher (any
    denoiser over the recipe's schedule, e.g. the exact mixture denoiser in tests)."""

    kind = "pd"
    unsaved_prefixes = ("teacher.",)

    def __init__(self, recipe: Any, teacher: Any = None) -> None:
        super().__init__(recipe, teacher)
        r, m, model = self.recipe, self.recipe["method"], self.recipe["model"]
        self.rounds: list[Round] = round_plan(m, int(r["trainer"]["max_steps"]))
        self.round = 0
        self.start_steps, self.spacing = int(m["start_steps"]), (r.get("sampler") or {}).get("spacing")
        self.w_range = (float(m["guidance"][0]), float(m["guidance"][1])) if m.get("guidance") else None
        kw = dict(weighting=m.get("weighting", "snr_trunc"), target=m.get("target"),
                  sigma_data=float(model.get("sigma_data", 0.5)), cfg_dropout=float(m.get("cfg_dropout", 0.0)))
        self.pd_loss = ProgressiveLoss(self.schedule, model.get("param", "eps"), num_classes=self.num_classes, **kw)
        self.guide_loss = (GuidanceLoss(self.schedule, model.get("param", "eps"), w_range=self.w_range,
                                        null_label=self.num_classes, **kw) if self.w_range else None)
        self._grids: dict[int, Tensor] = {}
        self._round_t0 = time.time()
        self._finished = -1  # the last round this process finished (wrote its bundle)
        if model.get("param", "eps") == "eps":
            warnings.warn("model.param: an eps-predicting student cannot take few large steps: x0 = (x_t - sigma eps) "
                          "/ alpha blows up at low SNR (Salimans & Ho 2022, Sec. 4); use model.param: v or x0 (the "
                          "student still starts from the teacher's weights)", stacklevel=2)
        off = [n for n in {rd.steps for rd in self.rounds}
               if not torch.equal(self.grid(n), make_grid(self.schedule, n, self.spacing))]
        if off:
            warnings.warn(f"sampler.spacing: the {sorted(off)}-step student grids (every k-th point of the "
                          f"{self.start_steps}-step teacher grid) are not make_grid(n, {self.spacing!r}); samples, "
                          f"the eval sweep's 'ddim:n' points, checkpoints and bundles use the distilled grid, other "
                          f"samplers make_grid's (a nested spacing: 'trailing' for ddpm schedules)", stacklevel=2)

    # ---- rounds -------------------------------------------------------------------------------------------
    @property
    def current(self) -> Round:
        return self.rounds[self.round]

    def grid(self, steps: int) -> Tensor:
        """The ``steps``-step grid of this run (nested in the ``start_steps`` teacher grid), float64."""
        if steps not in self._grids:
            self._grids[steps] = pd_grid(self.schedule, steps, self.start_steps, self.spacing)
        return self._grids[steps]

    @property
    def rounds_dir(self) -> Path:
        root = self.trainer.default_root_dir if self._trainer is not None else Path(self.recipe["out_dir"]) / \
            self.recipe["name"]
        return Path(root) / "rounds"

    @classmethod
    def distils(cls, recipe: Any) -> bool:
        return True

    @classmethod
    def copies_teacher(cls, recipe: Any) -> tuple[str, ...] | None:
        return ("w_cond",)  # round 0's student is the teacher's network, plus a w embedding when w-conditioned

    def ema_step(self, step: int) -> int:
        """Steps into the round: each round's EMA copies restart from its student (``ema.start_step`` and
        ``ema.every`` run per round, like the LR schedule)."""
        return step - self.current.start

    @classmethod
    def check_resume(cls, path: Path, ckpt: Mapping[str, Any], recipe: Mapping[str, Any], run: Path) -> None:
        """Before the trainer starts (``dtrain fit``, through ``resume_path``): the checkpoint ``path`` was trained on
        the recipe's round plan, and the teacher of its round (the previous round's bundle in the run folder ``run``)
        is the one it was trained against (``round_teacher``); else ``CheckpointError``. A checkpoint at the last
        step trains no more and reads no teacher."""
        from dtrain.export.checkpoint import CheckpointError

        super().check_resume(path, ckpt, recipe, run)
        meta = ckpt.get("dtrain") or {}
        info, plan = meta.get("pd") or {}, round_plan(recipe["method"], int(recipe["trainer"]["max_steps"]))
        saved = [Round(**r) for r in info.get("rounds", [])]
        if saved and saved != plan:
            raise CheckpointError(path, "method.round_steps", f"the checkpoint's rounds ({_plan_text(saved)}) are not "
                                  f"this recipe's ({_plan_text(plan)}; from method.start_steps, end_steps, guidance, "
                                  f"round_steps and trainer.max_steps); resume with the checkpoint's values, or start "
                                  f"a new run")
        k = int(info.get("round", 0))
        if 1 <= k < len(plan) and int(ckpt["global_step"]) < plan[-1].end:
            round_teacher(run, plan, k, meta.get("teacher"))

    def _load_teacher(self, index: int, source: Path | None = None) -> None:
        """The frozen teacher of round ``index``: the recipe's teacher, or round index - 1's bundle (``source``:
        where a resume found it, ``round_teacher``)."""
        if index == 0:
            given, ema = self.teacher_source(self._given_teacher), self.recipe["method"].get("teacher_ema", "auto")
        else:
            given, ema = source or self.rounds_dir / self.rounds[index - 1].name, "auto"
        self.teacher, self.teacher_ref = self.frozen_teacher(given, ema=ema)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.teacher is None:
            self._load_teacher(0)
            self.init_from_teacher(self.teacher, keep_own=True)  # a denoiser object without a network: warns

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        info = (checkpoint.get("dtrain") or {}).get("pd") or {}
        saved = [Round(**r) for r in info.get("rounds", [])]
        if saved and saved != self.rounds:  # (``dtrain fit`` refused it before: ``check_resume``)
            raise InputError(f"method.round_steps: the checkpoint's rounds ({_plan_text(saved)}) are not this "
                             f"recipe's ({_plan_text(self.rounds)})")
        self.round = int(info.get("round", 0))
        if self._trainer is None:
            return
        ref = (checkpoint.get("dtrain") or {}).get("teacher")
        if int(checkpoint["global_step"]) >= self.rounds[-1].end:  # nothing left to train: no teacher to read, and
            self.teacher_ref = ref if ref is not None else self.teacher_ref  # the last bundle records this one
        elif self.round == 0:
            self._load_teacher(0)
        else:
            self._load_teacher(self.round, round_teacher(self.rounds_dir.parent, self.rounds, self.round, ref))

    def on_train_start(self) -> None:
        super().on_train_start()
        self._round_t0 = time.time()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        # a round's last EMA update happened at the previous batch's end; a checkpoint taken there resumes here
        while self.round + 1 < len(self.rounds) and self.global_step >= self.current.end:
            self._finish_round(self.current)
            self.round += 1
            self._load_teacher(self.round)
            self.init_from_teacher(self.teacher, keep_own=True)
            for opt in self.trainer.optimizers:
                opt.state.clear()
            self._round_t0 = time.time()

    def on_train_end(self) -> None:
        if self.global_step >= self.rounds[-1].end and self.round == len(self.rounds) - 1:
            self._finish_round(self.current)

    def on_fit_end(self) -> None:
        # last.ckpt of the last step is written before the last round's bundle; a fit resumed from it runs no training
        # loop and no on_train_end, so a bundle the job before did not write (killed in between) is written here, on
        # the device the strategy's teardown took the module from
        last = self.rounds[-1]
        if self._finished == last.index or self.round != last.index or self.global_step < last.end:
            return
        done = self.trainer.is_global_zero and self._round_written(last)
        if self.trainer.strategy.broadcast(done, src=0):  # every rank evaluates its share, or none does
            return
        with on_root_device(self.trainer, self):
            self._finish_round(last)

    def _round_written(self, rnd: Round) -> bool:
        """Whether ``rounds.json`` lists ``rnd`` as finished at its end and its bundle is whole: its weights match its
        dtrain.json, and its eval.json is there."""
        from dtrain.export.bundle import read_info, sha256_file

        out = self.rounds_dir / rnd.name
        try:
            listed = any(e.get("index") == rnd.index and e.get("global_step") == rnd.end
                         for e in json.loads((self.rounds_dir / ROUNDS_INDEX).read_text()))
            weights = read_info(out)["weights"]
            return listed and (out / "eval.json").is_file() and sha256_file(out / weights["file"]) == weights["sha256"]
        except (OSError, ValueError, AttributeError, TypeError):  # absent, cut short, or not what this code writes
            return False

    def _finish_round(self, rnd: Round) -> None:
        """Evaluate the round's EMA student (every rank takes its share) and write its bundle (rank 0)."""
        tag = self.default_ema
        state = (self.ema[tag] if tag is not None else self.net).state_dict()  # type: ignore[index]
        metrics = self.evaluate_round(rnd) if self.recipe["method"].get("eval", True) else {}
        if self.trainer.is_global_zero:
            self._write_round(rnd, state, tag, metrics)
            score = "".join(f", {k} {v:.4g}" for k, v in metrics.items() if k in ("fid", "class_acc", "sliced_w1"))
            say(self.trainer, f"PD round {rnd.index + 1}/{len(self.rounds)} done at step {self.global_step}: "
                f"{rnd.steps}-step student{score} -> {self.rounds_dir / rnd.name}")
            for logger in self.trainer.loggers:
                logger.log_metrics({"round/index": rnd.index, "round/steps": rnd.steps,
                                    **{f"round/{k}": v for k, v in metrics.items() if isinstance(v, float | int)}},
                                   step=self.global_step)
        self._finished = rnd.index
        self.trainer.strategy.barrier("pd_round")

    def _write_round(self, rnd: Round, state: Mapping[str, Tensor], tag: str | None, metrics: dict[str, Any]) -> None:
        from dtrain.export.bundle import save_bundle
        from dtrain.export.checkpoint import bundle_info

        ck: dict[str, Any] = {"state_dict": {}, "global_step": self.global_step}
        self.on_save_checkpoint(ck)
        out = self.rounds_dir / rnd.name
        info = bundle_info(ck, source=f"{out.parent.parent} step {self.global_step} (ema {tag})", metrics=metrics)
        save_bundle(out, state, info, ema=tag, overwrite=True)
        entry = {**asdict(rnd), "global_step": self.global_step, "ema": tag, "metrics": metrics,
                 "bundle": f"rounds/{rnd.name}",  # relative to the run folder: it stays right when the folder moves
                 "seconds": round(time.time() - self._round_t0, 1)}  # training (+ eval) since the round (re)started
        write_json(out / "eval.json", entry)
        index = self.rounds_dir / ROUNDS_INDEX
        plan = [asdict(r) for r in self.rounds]
        # this run's earlier rounds only: a later round's entry (or another plan's) is from an earlier run in the
        # folder, or from before a resume that went back past it, and no longer holds
        done = [{**e, "bundle": f"rounds/{Path(str(e.get('bundle'))).name}"}  # (an older run's absolute paths too)
                for e in (json.loads(index.read_text()) if index.is_file() else [])
                if e["index"] < rnd.index and {k: e.get(k) for k in plan[0]} == plan[e["index"]]]
        write_json(index, sorted([*done, entry], key=lambda e: e["index"]))

    @torch.no_grad()
    def evaluate_round(self, rnd: Round) -> dict[str, Any]:
        """The round's EMA student with DDIM on its grid: FID (+ class accuracy) against ``eval.ref_stats``, or the
        sliced W1 distance and mixture-weight error on the 2-D GMM; {} when neither applies."""
        e, r = self.recipe["eval"], self.recipe
        w = float(e["guidance"] if e.get("guidance") is not None else r["sampler"].get("guidance", 1.0))
        base = self.denoiser_for(self.default_ema)
        den = self.guided(base, w) if self.num_classes > 0 and w != 1.0 else base
        grid, dev = self.grid(rnd.steps), self.device
        modes = {m: m.training for m in base.modules()}
        base.eval()
        try:
            if e.get("ref_stats"):
                return {**self._fid(den, rnd.steps, grid, e), "guidance": w}
            if r["data"]["name"] == "gmm":
                return self._gmm(den, grid, int(e["num"]), int(e["seed"]), dev)
            return {}
        finally:
            for m, was in modes.items():
                m.training = was

    def _fid(self, den: Any, steps: int, grid: Tensor, e: Mapping[str, Any]) -> dict[str, Any]:
        from dtrain.eval.features import build_extractor
        from dtrain.eval.fid import FID, dist_rank, load_ref
        from dtrain.eval.sweep import generate, global_batches

        ext = build_extractor(e["feature_extractor"], e.get("feature_extractor_weights_path"),
                              shape=self.sample_shape).to(self.device)
        ref = load_ref(e["ref_stats"], ext, self.device)
        metric = FID(ext, ref, shape=self.sample_shape, device=self.device, ref_source=str(e["ref_stats"]))
        score_labels = self.num_classes > 0 and ext.num_classes == self.num_classes
        batches = global_batches(int(e["num"]), int(e["batch_size"]), *dist_rank())
        for x0, y in generate(den, "ddim", steps, batches, shape=self.sample_shape, num_classes=self.num_classes,
                              seed=int(e["seed"]), device=self.device, grid=grid):
            metric.update(x0, y if score_labels else None)
        res = metric.compute()
        return {"fid": float(res["fid"]), "num": int(e["num"]), "ref_stats": str(e["ref_stats"]),
                **({"class_acc": float(res["class_acc"])} if res.get("class_acc") is not None else {})}

    def _gmm(self, den: Any, grid: Tensor, n: int, seed: int, device: torch.device) -> dict[str, Any]:
        from dtrain.data.synthetic import default_gmm, sliced_wasserstein
        from dtrain.samplers import ddim

        gmm = default_gmm()
        g = torch.Generator().manual_seed(seed)
        x_T = initial_noise(self.schedule, n, (gmm.dim,), g)
        labels = torch.multinomial(gmm.weights, n, replacement=True, generator=g) if self.num_classes > 0 else None
        x = ddim(den, x_T.to(device), grid, cond=None if labels is None else labels.to(device)).cpu()
        ref, _ = gmm.sample(n, generator=torch.Generator().manual_seed(seed + 1))
        return {"sliced_w1": sliced_wasserstein(x, ref), "weight_error": gmm.weight_error(x), "num": n}

    # ---- training -----------------------------------------------------------------------------------------
    def lr_lambda(self) -> Any:
        o = self.recipe["optim"]
        return partial(round_lr, bounds=tuple((rd.start, rd.end) for rd in self.rounds),
                       warmup=int(o["warmup_steps"]), schedule=o["lr_schedule"], min_ratio=float(o["min_lr_ratio"]))

    def compute_loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        rnd, x0, g = self.current, batch["x"], self.step_generator()
        labels = batch.get("y") if self.num_classes > 0 else None
        if rnd.kind == "guide":
            return self.guide_loss(self.denoiser, self.teacher, x0, self.grid(rnd.steps), labels,  # type: ignore[misc]
                                   generator=g)
        cond: Any = labels
        if self.w_range is not None:
            cond = GuidedCond(labels, sample_w(x0.shape[0], self.w_range, g, x0.device))
        return self.pd_loss(self.denoiser, self.teacher, x0, self.grid(2 * rnd.steps), cond, generator=g)

    # ---- sampling and checkpoints ----------------------------------------------------------------------------
    def guided(self, den: Any, w: float) -> Any:
        return WCondDenoiser(den, w) if self.w_range is not None else super().guided(den, w)

    @torch.no_grad()
    def sample(self, n: int | None = None, *, nfe: int | None = None, **kw: Any) -> Tensor:
        """Samples of the current round's student (default: its step count; DDIM on a round's step count samples the
        grid it was distilled on, ``sample_grids``)."""
        return super().sample(n, nfe=nfe or self.current.steps, **kw)

    def sample_grids(self) -> dict[tuple[str, int], Tensor]:
        return {("ddim", r.steps): self.grid(r.steps) for r in self.rounds}  # the grids the students learned

    def checkpoint_info(self) -> dict[str, Any]:
        rnd = self.current
        info: dict[str, Any] = {
            "teacher": self.teacher_ref,
            "sampler": {"name": "ddim", "nfe": rnd.steps, "eta": None, "grid": self.grid(rnd.steps).tolist()},
            "pd": {"round": rnd.index, "phase": rnd.kind, "student_steps": rnd.steps, "start_steps": self.start_steps,
                   "spacing": self.spacing, "w_range": list(self.w_range) if self.w_range else None,
                   "rounds": [asdict(rd) for rd in self.rounds]},
        }
        if self.w_range is not None:
            info["bundle_kind"] = "guided_denoiser"
        return info

"""Non-finite guard (dtrain.lit.guard): a NaN loss or an inf gradient skips the optimizer step (weights, AdamW moments
and step counts, EMA all unchanged), is counted (`train/bad_steps`) and logged naming the step; K bad steps in a row
stop the run with a message naming the step and the loss terms. Faults are injected into real `dtrain fit` runs."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from dtrain.lit.fit import fit
from dtrain.lit.guard import NonFiniteError, NonFiniteGuard

GMM = Path(__file__).resolve().parents[2] / "recipes" / "teacher" / "gmm.yaml"
SMALL = ["model.hidden=16", "model.depth=1", "data.batch_size=32", "data.num_samples=1024", "trainer.cpu_threads=1",
         "trainer.progress_bar=false", "logger.mode=disabled", "trainer.log_every_n_steps=1",
         "trainer.ckpt_every_n_steps=0", "optim.warmup_steps=0"]


def test_guard_counts_and_stops_after_k_in_a_row():
    g = NonFiniteGuard(max_bad=2)
    g.observe(torch.tensor([1.0, 2.0]))
    assert g.check(torch.tensor(3.0)) and not g.skipped
    g.observe(torch.tensor([1.0, math.nan, 2.0]))
    assert not g.check(torch.tensor(3.0)) and g.skipped and (g.total, g.in_a_row) == (1, 1)
    assert "loss=nan (1/3 samples non-finite)" in g.describe()
    g.report(7)  # one bad step: logged, not fatal
    g.observe(torch.tensor([1.0]))
    assert not g.check(torch.tensor(math.inf))  # finite loss, inf gradient
    with pytest.raises(NonFiniteError, match=r"step 8: .*grad_norm=inf.*max_bad_steps=2"):
        g.report(8)
    g.observe(torch.tensor([1.0]))
    assert g.check(torch.tensor(1.0)) and g.in_a_row == 0 and g.total == 2
    g.load_state_dict({})
    assert g.total == 0


def test_under_accumulation_the_message_names_the_bad_micro_batch():
    """A NaN in the first of a step's two micro-batches was described with the last one's finite loss
    (``loss=1.08, grad_norm=nan``: blaming the gradient); the step after describes only its own micro-batches."""
    g = NonFiniteGuard()
    g.observe(torch.tensor([1.0, math.nan]))
    g.observe(torch.tensor([1.0, 2.0]))
    assert not g.check(torch.tensor(math.nan))
    assert g.describe().startswith("micro-batch 1/2, loss=nan (1/2 samples non-finite)"), g.describe()
    g.observe(torch.tensor([3.0]))
    g.observe(torch.tensor([5.0]))
    assert g.check(torch.tensor(1.0)) and g.describe() == "micro-batch 2/2, loss=5, grad_norm=1"


def test_guard_off_checks_nothing():
    g = NonFiniteGuard(enabled=False)
    g.observe(torch.tensor([math.nan]))
    assert g.check(torch.tensor(math.nan)) and not g.skipped and g.total == 0


class Inject(L.Callback):
    """NaN into the batch (-> non-finite loss) or inf into a gradient at the given steps; snapshots the state
    around each step to see what changed."""

    def __init__(self, steps: set[int], where: str = "x") -> None:
        self.steps, self.where = steps, where
        self.changed: dict[int, dict[str, bool]] = {}

    @staticmethod
    def _state(trainer, module) -> dict[str, list[torch.Tensor]]:
        opt = trainer.optimizers[0]
        moments = [t.clone() for s in opt.state.values() for t in s.values()]
        return {"net": [p.detach().clone() for p in module.net.parameters()],
                "ema": [p.detach().clone() for p in module.ema.parameters()], "optimizer": moments}

    def _compare(self, trainer, module) -> None:  # after every hook of the previous step (the EMA update included)
        if getattr(self, "_before", None) is not None:
            after = self._state(trainer, module)
            self.changed[trainer.global_step - 1] = {
                k: len(v) != len(after[k]) or any(not torch.equal(a, b) for a, b in zip(v, after[k]))
                for k, v in self._before.items()}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._compare(trainer, module)
        self._before = self._state(trainer, module)
        if self.where == "x" and trainer.global_step in self.steps:
            batch["x"][0, 0] = math.nan

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if self.where == "grad" and trainer.global_step in self.steps:
            next(module.net.parameters()).grad[0] = math.inf

    def on_train_end(self, trainer, module):
        self._compare(trainer, module)


def _metric(run: Path, name: str) -> list[float]:
    with open(run / "csv" / "metrics.csv") as f:
        return [float(r[name]) for r in csv.DictReader(f) if r.get(name)]


@pytest.mark.parametrize("where", ["x", "grad"])
def test_bad_steps_are_skipped_counted_and_logged(tmp_path, caplog, one_thread, where):
    inject = Inject({3, 4}, where)
    with caplog.at_level(logging.WARNING, logger="dtrain.guard"):
        run = fit(GMM, [*SMALL, f"out_dir={tmp_path}", "trainer.max_steps=8"], callbacks=[inject])
    for step in range(8):
        bad = step in (3, 4)
        # a bad step changes nothing (step 0 creates the AdamW state, so compare its weights only)
        assert inject.changed[step]["net"] is not bad and inject.changed[step]["ema"] is not bad, (step, inject.changed)
        if step > 0:
            assert inject.changed[step]["optimizer"] is not bad, step
    msgs = [r.getMessage() for r in caplog.records if r.name == "dtrain.guard"]
    assert len(msgs) == 2 and msgs[0].startswith("step 3: non-finite") and "(2 in a row, 2 in this run)" in msgs[1]
    assert ("loss=nan (1/32 samples non-finite)" if where == "x" else "grad_norm=inf") in msgs[0]
    assert _metric(run, "train/bad_steps")[-1] == 2.0
    ck = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ck["global_step"] == 8 and ck["nan_guard"] == {"total": 2, "in_a_row": 0}
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values())


def test_k_bad_steps_in_a_row_stop_the_run(tmp_path, one_thread):
    with pytest.raises(NonFiniteError) as e:
        fit(GMM, [*SMALL, f"out_dir={tmp_path}", "trainer.max_steps=20", "trainer.max_bad_steps=3"],
            callbacks=[Inject(set(range(5, 20)))])
    msg = str(e.value)
    assert msg.startswith("step 7: non-finite loss or gradient (loss=nan (1/32 samples non-finite), grad_norm=nan)")
    assert "(3 in a row, 3 in this run)" in msg and "trainer.max_bad_steps=3 reached" in msg


def test_a_resume_goes_on_counting_bad_steps(tmp_path, one_thread):
    """The counters come back from the checkpoint (only their saving was tested): two bad steps before the save and
    one after the resume are three in a row."""
    over = [*SMALL, f"out_dir={tmp_path}", "trainer.max_bad_steps=3"]
    run = fit(GMM, [*over, "trainer.max_steps=4"], callbacks=[Inject({2, 3})])
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["nan_guard"] == {"total": 2,
                                                                                               "in_a_row": 2}
    with pytest.raises(NonFiniteError, match=r"\(3 in a row, 3 in this run\)"):
        fit(GMM, [*over, "trainer.max_steps=8"], resume="auto", callbacks=[Inject({4})])


def test_guard_off_lets_nan_through(tmp_path, one_thread):
    """The control: without the guard the same fault poisons the weights (so the test above can fail)."""
    run = fit(GMM, [*SMALL, f"out_dir={tmp_path}", "trainer.max_steps=5", "trainer.nan_guard=false"],
              callbacks=[Inject({3})])
    ck = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert not all(torch.isfinite(v).all() for v in ck["state_dict"].values())


def test_consistency_target_does_not_move_after_a_dropped_step(tmp_path, one_thread, fit_spied):
    """CD's target network theta^- averages in the weights at each step's start; after a step the guard dropped the
    weights did not move, so neither does theta^- (it moves again after the next good step)."""
    from dtrain.config import load_recipe
    from dtrain.data.synthetic import default_gmm
    from dtrain.diffusion.schedule import schedule_from_config
    from dtrain.lit.consistency import ConsistencyModule

    cfg = load_recipe(GMM.parents[1] / "cm" / "cd_gmm.yaml", [
        *SMALL, f"out_dir={tmp_path}", "trainer.max_steps=8", "trainer.accelerator=cpu", "trainer.devices=1"])
    module = ConsistencyModule(cfg, teacher=default_gmm().denoiser(schedule_from_config(cfg.schedule)))
    targets: dict[int, list[torch.Tensor]] = {}

    class Spy(L.Callback):  # runs before the module's hook: theta^- after the previous step's start
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            targets[trainer.global_step] = [p.detach().clone() for p in pl_module.target.parameters()]
            if trainer.global_step == 3:
                batch["x"][0, 0] = math.nan

    fit_spied(cfg, module, Spy())
    assert module.guard.total == 1
    moved = {k: any(not torch.equal(a, b) for a, b in zip(targets[k], targets[k + 1])) for k in range(7)}
    assert moved == {0: False, 1: True, 2: True, 3: True, 4: False, 5: True, 6: True}, moved  # 0: theta^- = net

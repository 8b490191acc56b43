"""``trainer.global_batch_size``: a recipe keeps its paper's batch per optimizer step on any number of GPUs; the
per-rank ``data.batch_size`` is derived at launch from the ranks Lightning will start (counted as Lightning does)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from dtrain.config import RecipeError, load_recipe
from dtrain.lit.fit import count_ranks, fit, resolve_batch

GMM = Path(__file__).resolve().parents[2] / "recipes" / "teacher" / "gmm.yaml"
QUIET = ["logger.mode=disabled", "trainer.progress_bar=false", "trainer.cpu_threads=1", "trainer.accelerator=cpu",
         "model.hidden=16", "model.depth=1", "data.num_samples=1024", "trainer.ckpt_every_n_steps=0"]


@pytest.mark.parametrize(("devices", "nodes"), [("auto", 1), (1, 1), (3, 1), ("2", 1), (2, 2), ("auto", 3)])
def test_ranks_are_counted_as_lightning_counts_them(devices, nodes):
    cfg = load_recipe(GMM, ["trainer.accelerator=cpu", f"trainer.devices={devices}", f"trainer.num_nodes={nodes}"])
    trainer = L.Trainer(accelerator="cpu", devices=devices, num_nodes=nodes, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    assert count_ranks(cfg) == trainer.num_devices * trainer.num_nodes


def test_gpu_ranks(monkeypatch):
    """'auto' and -1 take every visible GPU; device ids count one rank each; under SLURM the allocation decides."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    for devices, nodes, want in (("auto", 1, 8), (-1, 2, 16), ("'0,1,2'", 1, 3), ("[0,1]", 4, 8), (4, 1, 4)):
        cfg = load_recipe(GMM, ["trainer.accelerator=gpu", f"trainer.devices={devices}", f"trainer.num_nodes={nodes}"])
        assert count_ranks(cfg) == want, devices
    for k, v in {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "4(x2)",
                 "SLURM_JOB_NAME": "train", "SLURM_STEP_ID": "0"}.items():
        monkeypatch.setenv(k, v)
    assert count_ranks(load_recipe(GMM, ["trainer.accelerator=gpu", "trainer.devices=auto"])) == 8


def test_global_batch_sets_the_per_rank_batch(capsys):
    cfg = load_recipe(GMM, ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.accumulate_grad_batches=2",
                            "trainer.global_batch_size=64", "data.batch_size=512"])
    got, ranks = resolve_batch(cfg)
    assert ranks == 2 and got.data.batch_size == 16 and cfg.data.batch_size == 512  # the given recipe is unchanged
    cfg = load_recipe(GMM, ["trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=24"])
    assert resolve_batch(cfg)[0].data.batch_size == 24  # null: data.batch_size is per rank, as before


def test_a_global_batch_the_ranks_do_not_divide_names_the_field():
    over = ["trainer.accelerator=cpu", "trainer.devices=3", "trainer.global_batch_size=64"]
    with pytest.raises(RecipeError, match=r"^command line: trainer\.global_batch_size: 64 is not a multiple of 3 "
                                          r"rank\(s\) x 1 accumulation step\(s\)"):
        resolve_batch(load_recipe(GMM, over), "gmm.yaml", over)
    with pytest.raises(RecipeError, match=r"trainer\.global_batch_size: must be null .* or >= 1"):
        load_recipe(GMM, ["trainer.global_batch_size=0"])


def test_in_memory_data_is_checked_against_the_derived_batch():
    """The recipe's data.batch_size (512 in the gmm base) is replaced, so it is not held against the data at load;
    the derived batch is, naming the global batch."""
    over = ["trainer.accelerator=cpu", "trainer.devices=2", "data.num_samples=100"]
    cfg = load_recipe(GMM, [*over, "trainer.global_batch_size=64"])
    assert resolve_batch(cfg)[0].data.batch_size == 32
    with pytest.raises(RecipeError, match=r"^command line: trainer\.global_batch_size: 256 gives batches of 128 per "
                                          r"rank, more than the 50 samples per rank \(100 samples of data 'gmm' over "
                                          r"2 rank\(s\)\)"):
        resolve_batch(load_recipe(GMM, [*over, "trainer.global_batch_size=256"]), "gmm.yaml",
                      ["trainer.global_batch_size=256"])
    with pytest.raises(RecipeError, match=r"data\.batch_size: 512 is more than the 100 samples"):
        load_recipe(GMM, over)  # without a global batch the per-rank one is checked at load, as before


def test_fit_trains_on_the_derived_batch(tmp_path):
    """One rank accumulating 2 micro-batches of a global 48: batches of 24 reach the network; the run's recipe
    records the derived batch size."""
    seen: list[int] = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            seen.append(len(next(iter(batch.values()))))

    out = fit(GMM, [f"out_dir={tmp_path}", *QUIET, "trainer.max_steps=2", "trainer.accumulate_grad_batches=2",
                    "trainer.global_batch_size=48"], callbacks=[Probe()])
    assert seen == [24] * 4
    assert load_recipe(out / "recipe.yaml").data.batch_size == 24


def test_dry_run_says_the_batch_is_set_at_launch(capsys):
    fit(GMM, ["trainer.global_batch_size=64"], dry_run=True)
    assert "# data.batch_size: set at launch to trainer.global_batch_size 64 / (ranks x 1 accumulation step(s))" in \
        capsys.readouterr().out


def test_a_resume_compares_the_derived_batch(tmp_path, recwarn):
    """The checkpoint records the derived per-rank batch; the resume check compares it with the derived one, not with
    the recipe's replaced data.batch_size (which made in-memory data warn that its position had moved)."""
    over = [f"out_dir={tmp_path}", *QUIET, "trainer.global_batch_size=32", "trainer.ckpt_every_n_steps=2"]
    fit(GMM, [*over, "trainer.max_steps=2"])
    fit(GMM, [*over, "trainer.max_steps=4"], resume="last")
    assert not [w for w in recwarn if "in-memory data restarts" in str(w.message)]

"""``trainer.compile: true`` trains through TorchDynamo: the compiled training run equals the eager one.

Inductor's C++ code generation takes minutes on a busy 2-core CPU, so the graphs captured by Dynamo run under
the ``aot_eager`` backend here (capture, AOT autograd, functionalisation: everything but code generation);
on a GPU the recipe's default backend (inductor) is what ``tests/gpu`` and ``benchmarks/gpu.py`` time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dtrain.config import load_recipe

GMM = Path(__file__).resolve().parents[2] / "recipes" / "teacher" / "gmm.yaml"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _train(tmp_path: Path, compile_: bool) -> dict[str, torch.Tensor]:
    from dtrain.lit.fit import fit

    cfg = load_recipe(GMM, [f"out_dir={tmp_path}", f"name={'c' if compile_ else 'e'}", "model.hidden=16",
                            "model.depth=1", "data.batch_size=32", "data.num_samples=512", "trainer.max_steps=3",
                            "trainer.progress_bar=false", "logger.mode=disabled", "trainer.cpu_threads=1",
                            "trainer.accelerator=cpu", f"trainer.compile={str(compile_).lower()}"])
    out = fit(cfg)
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def test_compiled_training_matches_eager(tmp_path, monkeypatch, one_thread):
    import torch._dynamo

    calls: list[dict] = []
    compile_ = torch.compile

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return compile_(*args, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", spy)
    torch._dynamo.reset()
    frames = torch._dynamo.utils.counters["stats"]
    before = frames["unique_graphs"]
    compiled = _train(tmp_path, True)
    assert len(calls) == 1  # the network, compiled once in setup
    assert frames["unique_graphs"] > before  # Dynamo captured the forward
    eager = _train(tmp_path, False)
    assert compiled.keys() == eager.keys()
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-5, atol=1e-6, msg=k)
    assert compiled["net.out.2.weight"].abs().sum() > 0  # it trained: the zero-initialised output layer moved

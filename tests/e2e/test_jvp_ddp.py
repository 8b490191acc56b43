"""MeanFlow's JVP under Lightning DDP on 2 CPU ranks (gloo): gradient synchronisation is explicit and correct.

Each rank trains ``MeanFlowModule`` (``recipes/flowmap/meanflow_gmm.yaml``, a small MLP, float64) on its own half of
a fixed union batch per step, with the samples' noise and times carried in the batch, so a single process on the
union batch computes the same loss. Checked after every one of 4 steps (AdamW, gradient clipping, EMA):
- ``method.jvp: detached`` (no-grad JVP + ordinary forward) and ``fused`` (gradient through the JVP's primal output,
  DDP's reducer off for the step, gradients all-reduced by the module): both ranks hold identical weights, equal to
  the single-process run on the union batch to 1e-5 (measured: identical bits across ranks, < 1e-13 to the single run);
- negative control: ``fused`` without the module's all-reduce leaves the ranks apart, so the check can fail and the
  module's own all-reduce is what synchronises the fused JVP.

The test starts both ranks itself, as torchrun or srun would (``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT`` in the
environment, so Lightning launches nothing), and each rank runs the three configurations one after the other in one
process (one import of Lightning per rank; the gloo group outlives each ``fit``), while the test process runs the
single-process reference: ``python tests/e2e/test_jvp_ddp.py --out DIR --configs detached fused fused:nosync``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS, BATCH = 4, 16  # union batch per step; each of 2 ranks takes half


def _union_batches(steps: int = STEPS, batch: int = BATCH) -> list[dict]:
    """Fixed union batches: GMM samples with their own noise and MeanFlow times (r != t for half of them)."""
    import torch

    from dtrain.data.synthetic import default_gmm

    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(steps):
        x, _ = default_gmm().sample(batch, generator=g)
        t = torch.rand(batch, generator=g, dtype=torch.float64) * 0.9 + 0.05
        r = torch.where(torch.arange(batch) % 2 == 0, t * torch.rand(batch, generator=g, dtype=torch.float64), t)
        out.append({"x": x.double(), "noise": torch.randn(batch, 2, generator=g, dtype=torch.float64), "r": r, "t": t})
    return out


def run(out: Path, jvp: str, devices: int, sync: bool = True) -> None:
    """Train for STEPS steps on ``devices`` CPU ranks (this process is one of them when devices > 1); rank k writes
    its weights after every step to ``out/rank{k}.pt``."""
    import lightning as L
    import torch

    from dtrain.config import load_recipe
    from dtrain.lit.fit import build_trainer
    from dtrain.lit.flow_map import MeanFlowModule

    torch.set_num_threads(1)

    class Probe(MeanFlowModule):
        """MeanFlowModule reading each sample's noise and times from the batch; records its weights every step."""

        explicit_sync = sync

        def compute_loss(self, batch):
            out = self.loss_fn(self.denoiser_for(None), batch["x"], None, r=batch["r"], t=batch["t"],
                               noise=batch["noise"])
            return out.loss, out.t

        def on_train_batch_end(self, outputs, batch, batch_idx):
            super().on_train_batch_end(outputs, batch, batch_idx)
            self.history.append(torch.cat([p.detach().reshape(-1) for p in self.net.parameters()]).clone())

        def on_train_end(self):
            torch.save({"world": self.trainer.world_size, "history": self.history, "pid": os.getpid()},
                       out / f"rank{self.global_rank}.pt")

    class Halves(L.LightningDataModule):
        """Rank k of n gets rows [k B/n, (k+1) B/n) of each union batch."""

        def train_dataloader(self):
            k, n = self.trainer.global_rank, self.trainer.world_size
            per = BATCH // n
            halves = [{key: v[k * per:(k + 1) * per] for key, v in b.items()} for b in _union_batches()]
            return torch.utils.data.DataLoader(halves, batch_size=None)

    cfg = load_recipe(REPO / "recipes" / "flowmap" / "meanflow_gmm.yaml", [
        f"out_dir={out}", "name=run", "model.hidden=16", "model.depth=1", f"method.jvp={jvp}", "method.ratio=0.5",
        f"trainer.max_steps={STEPS}", "trainer.precision=64-true", "trainer.accelerator=cpu",
        f"trainer.devices={devices}", f"strategy.name={'ddp' if devices > 1 else 'auto'}",
        "trainer.progress_bar=false", "logger.mode=disabled",
        "trainer.ckpt_every_n_steps=0", "optim.lr=1e-2", "optim.grad_clip=1.0", "trainer.log_every_n_steps=1"])
    torch.manual_seed(0)
    module = Probe(cfg)
    module.history = []
    trainer = build_trainer(cfg, out / "run")
    trainer.fit(module, datamodule=Halves())


# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_ranks(tmp: Path, configs: list[str]) -> list[subprocess.Popen]:
    """Start 2 ranks (environment as torchrun sets it), each running ``configs`` ("jvp" or "jvp:nosync") in turn."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", "NODE_RANK": "0"}
    cmd = [sys.executable, str(Path(__file__)), "--out", str(tmp), "--configs", *configs]
    return [subprocess.Popen(cmd, env={**env, "LOCAL_RANK": str(k), "RANK": str(k)}, cwd=tmp,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]


def _collect(tmp: Path, procs: list[subprocess.Popen], configs: list[str]) -> dict[str, list[dict]]:
    """Each configuration's records of both ranks, after both processes exit cleanly."""
    import torch

    for p in procs:
        try:
            _, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-4000:]
    results = {}
    for c in configs:
        ranks = [torch.load(tmp / c.replace(":", "_") / f"rank{i}.pt", weights_only=True) for i in range(2)]
        assert [x["world"] for x in ranks] == [2, 2] and ranks[0]["pid"] != ranks[1]["pid"]
        results[c] = ranks
    return results


def _single(tmp: Path, jvp: str) -> list:
    import torch

    out = tmp / f"single_{jvp}"
    out.mkdir()
    run(out, jvp, devices=1)
    return torch.load(out / "rank0.pt", weights_only=True)["history"]


@pytest.mark.timeout(400)
def test_meanflow_jvp_ranks_stay_identical_and_match_the_union_batch(tmp_path):
    import torch

    configs = ["detached", "fused", "fused:nosync"]
    procs = _start_ranks(tmp_path, configs)  # the two ranks run while this process computes the reference
    try:
        single = _single(tmp_path, "detached")
    except BaseException:
        for p in procs:
            p.kill()
        raise
    results = _collect(tmp_path, procs, configs)
    assert len(single) == STEPS
    assert all((a - b).abs().max() > 1e-4 for a, b in itertools.pairwise(single))  # the weights move every step
    for jvp in ("detached", "fused"):
        ranks = results[jvp]
        r0, r1 = (r["history"] for r in ranks)
        assert len(r0) == len(r1) == STEPS
        for step, (a, b, ref) in enumerate(zip(r0, r1, single)):
            assert torch.equal(a, b), f"{jvp}: ranks differ after step {step + 1}"
            err = float((a - ref).abs().max())
            print(f"{jvp} step {step + 1}: max |DDP - single| = {err:.2e}")
            assert err < 1e-5, f"{jvp}: step {step + 1} differs from the single-process run by {err}"

    # negative control: the fused JVP without the module's all-reduce (DDP's reducer is off for the step)
    r0, r1 = (r["history"] for r in results["fused:nosync"])
    gap = float((r0[0] - r1[0]).abs().max())
    print(f"fused without explicit sync: ranks differ by {gap:.2e} after step 1")
    assert gap > 1e-4


if __name__ == "__main__":  # one rank, started by the test with torchrun's environment
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--configs", nargs="+", default=["detached"], help='"jvp" or "jvp:nosync", run in turn')
    a = ap.parse_args()
    for c in a.configs:
        jvp, _, flag = c.partition(":")
        (a.out / c.replace(":", "_")).mkdir(exist_ok=True)
        run(a.out / c.replace(":", "_"), jvp, devices=2, sync=flag != "nosync")

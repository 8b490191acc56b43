"""Two CPU processes (gloo) score exactly the samples one process scores: same FID, class accuracy and IS,
every sample counted once; reference statistics computed on two ranks equal the single-process ones."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dtrain.data.digits import digits_arrays
from dtrain.data.synthetic import GaussianMixture
from dtrain.diffusion.schedule import make_schedule
from dtrain.eval.features import build_extractor
from dtrain.eval.fid import compute_ref_stats
from dtrain.eval.sweep import fid_sweep

pytestmark = pytest.mark.usefixtures("one_thread")

NUM, BATCH = 203, 25  # 9 global batches, the last one short: ranks get 5 and 4 batches
SPECS = ["ddim:2,8", "ddpm:4"]


class NullAwareGMM(torch.nn.Module):
    """The exact class-conditional GMM denoiser; label K (the CFG null class) gives the unconditional one."""

    def __init__(self, gmm: GaussianMixture) -> None:
        super().__init__()
        sch = make_schedule("ddpm")
        self.schedule, self.cond, self.uncond = sch, gmm.denoiser(sch, True), gmm.denoiser(sch, False)
        self.K = len(gmm.weights)

    def forward(self, x, t, cond=None):
        if cond is None:
            return self.uncond(x, t)
        null = cond == self.K
        out = self.cond(x, t, cond.clamp_max(self.K - 1))
        return torch.where(null[:, None, None, None], self.uncond(x, t), out)


def sweep(out: Path, rank: int = 0) -> None:
    x, y = digits_arrays("train")
    den = NullAwareGMM(GaussianMixture(torch.stack([x[y == k].mean(0).flatten() for k in range(10)]), 0.25))
    ext = build_extractor("digits")
    ref = compute_ref_stats(ext, x[rank::2].split(100) if torch.distributed.is_initialized() else x.split(100))
    # more ranks than images (tools/fid_ref_stats.py --num-images 3 under torchrun): rank 1 has none, and failed
    few = compute_ref_stats(ext, [x[:3]] if rank == 0 else [], shape=(1, 8, 8))
    rows = fid_sweep(den, SPECS, num=NUM, batch_size=BATCH, shape=(1, 8, 8), extractor=ext, ref=ref,
                     num_classes=10, guidance=1.5, seed=11, progress=False)
    if rank == 0:
        out.write_text(json.dumps({"rows": [r.to_dict() for r in rows], "ref_mu": ref.mu.tolist(),
                                   "ref_sigma": ref.sigma.tolist(), "ref_count": ref.count,
                                   "few": [few.count, few.sigma.tolist()]}))


def worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sweep(Path(out), rank)
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_two_ranks_equal_one_process(tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    sweep(one)
    mp.spawn(worker, args=(2, free_port(), str(two)), nprocs=2, join=True)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["ref_count"] == a["ref_count"] == len(digits_arrays("train")[0])
    assert torch.allclose(torch.tensor(b["ref_sigma"]), torch.tensor(a["ref_sigma"]), rtol=0, atol=1e-12)
    assert a["few"][0] == b["few"][0] == 3
    assert torch.allclose(torch.tensor(b["few"][1]), torch.tensor(a["few"][1]), rtol=0, atol=1e-12)
    assert len(a["rows"]) == len(b["rows"]) == 3
    for ra, rb in zip(a["rows"], b["rows"]):
        assert (ra["sampler"], ra["nfe"], ra["num"]) == (rb["sampler"], rb["nfe"], rb["num"]) and rb["num"] == NUM
        assert abs(ra["fid"] - rb["fid"]) < 1e-4, (ra, rb)
        assert ra["class_acc"] == rb["class_acc"]
        assert abs(ra["inception_score"] - rb["inception_score"]) < 1e-9

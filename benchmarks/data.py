"""Data-loading throughput: WebDataset shards (``dtrain.data.wds``) against the same images in memory.

    python benchmarks/data.py                 # writes benchmarks/results/data.json
    python benchmarks/data.py --samples 8192 --workers 1 2 --out /tmp/data.json

Data: ``--samples`` 32x32 RGB patches of sklearn's sample photos (``dtrain shards patches``), in 8 shards
(PNG inside tar), batches of 256, shuffle blocks of 1000, random flips; the reader decodes, normalises and
batches inside its DataLoader workers (0 workers: in the main process). Reported per worker count: steady
samples/s (epochs 2.., persistent workers already running) and the first epoch's (worker start included).
The baseline is the in-memory datamodule path (``dtrain.data.memory.InMemoryBatches``, main process) over
the same pixels, already decoded and normalised: the ratio is shards / memory. Each number is the median
of ``--repeats`` runs, interleaved across configurations. The machine and its load average go into the
json: on a shared machine the numbers move with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's dtrain, not another installed one

import numpy as np
import torch

from dtrain.data.memory import InMemoryBatches
from dtrain.data.shards import from_patches, write_shards
from dtrain.data.wds import WdsDataModule

RESULTS = Path(__file__).resolve().parent / "results"


def wds_rates(index: Path, workers: int, batch: int, epochs: int) -> tuple[float, float]:
    """(first-epoch samples/s including worker start, steady samples/s over the next epochs)."""
    dm = WdsDataModule(str(index), batch_size=batch, num_workers=workers, shuffle=1000, flip=True, seed=0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    times, n = [], 0
    for _ in range(epochs):
        t, n = time.perf_counter(), 0
        for b in loader:
            n += len(b["x"])
        times.append(time.perf_counter() - t)
    del loader  # stops the persistent workers
    return n / times[0], n * (epochs - 1) / sum(times[1:])


def memory_rate(x: torch.Tensor, batch: int, epochs: int) -> float:
    data = InMemoryBatches({"x": x, "y": torch.zeros(len(x), dtype=torch.long)}, batch, flip=True)
    n_batches = epochs * (len(x) // batch)
    it = iter(data)
    t = time.perf_counter()
    n = sum(len(next(it)["x"]) for _ in range(n_batches))
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=8192)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="0: read in the main process")
    p.add_argument("--epochs", type=int, default=4, help="per run: one with worker start, the rest steady")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS / "data.json")
    a = p.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        data = from_patches(a.samples, 32, seed=0)
        t = time.perf_counter()
        index = write_shards(data, tmp, num_shards=8, progress=False)
        write_s = time.perf_counter() - t
        shard_mb = sum(s["bytes"] for s in index["shards"]) / 2**20
        x = torch.from_numpy(np.asarray(data.images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        mems, runs = [], {w: [] for w in a.workers}
        for _ in range(a.repeats):  # interleaved, so that a change in the machine's load hits every row alike
            mems.append(memory_rate(x, a.batch, a.epochs))
            for w in a.workers:
                runs[w].append(wds_rates(Path(tmp) / "index.json", w, a.batch, a.epochs))
        mem = statistics.median(mems)
        rows = []
        for w in a.workers:
            first, steady = statistics.median(r[0] for r in runs[w]), statistics.median(r[1] for r in runs[w])
            rows.append({"workers": w, "samples_per_s": round(steady), "first_epoch_samples_per_s": round(first),
                         "ratio_to_memory": round(steady / mem, 5)})
            print(f"wds, {w} worker(s): {steady:9.0f} samples/s steady, {first:9.0f} first epoch, "
                  f"{steady / mem:.4f} x memory")
    print(f"memory: {mem:9.0f} samples/s")
    result = {
        "benchmark": "data loading, 32x32 RGB PNG shards vs in-memory arrays",
        "command": "python benchmarks/data.py " + " ".join(f"--{k} {v}" for k, v in [
            ("samples", a.samples), ("batch", a.batch), ("epochs", a.epochs), ("repeats", a.repeats)])
        + " --workers " + " ".join(map(str, a.workers)),
        "data": {"samples": a.samples, "shards": 8, "image": [3, 32, 32], "format": "png in tar",
                 "shard_MiB": round(shard_mb, 2), "write_s": round(write_s, 2), "batch": a.batch,
                 "shuffle": 1000, "flip": True},
        "memory": {"samples_per_s": round(mem), "path": "dtrain.data.memory.InMemoryBatches, main process"},
        "wds": rows,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "loadavg_before": [round(v, 2) for v in load_before],
                    "loadavg_after": [round(v, 2) for v in os.getloadavg()]},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

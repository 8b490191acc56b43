"""The training run test_wds_ddp.py launches on 2 CPU ranks: ``python wds_ddp_script.py --shards ... --strategy ddp``.

Kept import-light at the top: under ddp_spawn, DataLoader workers are spawned and re-import this script.
"""

from __future__ import annotations

import argparse


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shards", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=5)
    p.add_argument("--fixed-shard-order", action="store_true")
    args = p.parse_args()

    import lightning as L
    import torch
    from test_wds_ddp import Recorder

    from dtrain.data.wds import SkippedSamplesLogger, WdsDataModule

    torch.set_num_threads(1)
    dm = WdsDataModule(args.shards, batch_size=args.batch, num_workers=2, shuffle=6, drop_last=False,
                       shuffle_shards=not args.fixed_shard_order, seed=5)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=args.strategy, max_epochs=args.epochs, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1, callbacks=[SkippedSamplesLogger()])
    trainer.fit(Recorder(args.out), datamodule=dm)


if __name__ == "__main__":
    main()

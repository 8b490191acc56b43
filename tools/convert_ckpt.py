#!/usr/bin/env python
"""Sharded training checkpoint (DeepSpeed ZeRO directory, FSDP / fsdp2 distributed checkpoint) -> one fp32 file.

    python tools/convert_ckpt.py runs/x/checkpoints/last.ckpt runs/x/last-fp32.ckpt

The output is an ordinary format-1 checkpoint (``state_dict`` with ``net.*`` and ``ema.<tag>.*`` in fp32,
``dtrain`` metadata, ``global_step``; no optimizer state), read by ``dtrain export``, ``dtrain eval`` and
student recipes' ``teacher:``. Those also take the directory itself (``dtrain.export.zero.consolidate``).
Needs neither DeepSpeed nor Lightning; every file is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a sharded checkpoint directory")
    p.add_argument("out", help="output .ckpt file")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    from dtrain.errors import InputError, check_writable
    from dtrain.export.checkpoint import read_checkpoint
    from dtrain.lit.checkpointing import atomic_save

    out = Path(args.out)
    try:
        if not Path(args.checkpoint).exists():
            raise InputError(f"checkpoint: {args.checkpoint} not found")
        if not Path(args.checkpoint).is_dir():
            raise InputError(f"checkpoint: {args.checkpoint}: not a sharded checkpoint directory")
        check_writable(out, "out")
        if out.exists() and not args.overwrite:
            raise InputError(f"out: {out} exists (--overwrite replaces it)")
        ckpt = read_checkpoint(args.checkpoint)  # consolidates, then checks the format-1 fields
    except InputError as e:  # CheckpointError, ZeroCheckpointError included
        print(f"convert_ckpt: {e}", file=sys.stderr)
        return 2
    atomic_save(ckpt, out)  # a run killed mid-write leaves no partial checkpoint
    n = sum(v.numel() for v in ckpt["state_dict"].values())
    print(f"wrote {out}: {len(ckpt['state_dict'])} tensors, {n:,} values (fp32), global_step "
          f"{ckpt.get('global_step')}, EMA {ckpt['dtrain']['ema_tags']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train the FID-digits feature extractor once: a small CNN on sklearn's digits (train split, fixed seed).

    python tools/train_digits_classifier.py --overwrite-shipped  # dtrain/assets/digits_classifier.{safetensors,json}
    python tools/train_digits_classifier.py --out my/digits.safetensors

The json records the test accuracy (the held-out 25% split) and the sha256 that reference statistics
carry (``dtrain.eval.fid``). Augmentation: random shifts of up to one pixel. CPU, about 20 s.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's dtrain, not another installed one

import torch
import torch.nn.functional as F

from dtrain.data.digits import digits_arrays
from dtrain.errors import InputError, check_writable
from dtrain.eval.features import DIGITS_WEIGHTS, DigitsNet, file_sha256


def shift(x: torch.Tensor, g: torch.Generator, pad: int = 1) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (background -1 fills the border)."""
    xp = F.pad(x, (pad,) * 4, value=-1.0)
    n, h, w = x.shape[0], x.shape[2], x.shape[3]
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=g)
    rows = (dy[:, None] + torch.arange(h))[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w))[:, None, :].expand(n, h, w)
    return xp[torch.arange(n)[:, None, None], 0, rows, cols][:, None]


@torch.no_grad()
def accuracy(net: DigitsNet, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((net(x).argmax(1) == y).double().mean())


def train(epochs: int, seed: int, width: int, lr: float, batch_size: int) -> tuple[DigitsNet, dict]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = digits_arrays("train")
    xt, yt = digits_arrays("test")
    net = DigitsNet(width=width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(y) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(net(shift(x[idx], g)), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0:
            net.eval()
            print(f"epoch {epoch + 1}: loss {loss.item():.4f} train acc {accuracy(net, x, y):.4f}", file=sys.stderr)
    net.eval()
    info = {"train_accuracy": accuracy(net, x, y), "test_accuracy": accuracy(net, xt, yt),
            "train_count": len(y), "test_count": len(yt)}
    return net, info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="output .safetensors (and .json beside it)")
    ap.add_argument("--overwrite-shipped", action="store_true", help=f"replace the shipped {DIGITS_WEIGHTS.name}")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    try:
        check_args(args)
    except InputError as e:
        print(f"train_digits_classifier: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # tiny convolutions: threads only add overhead (and results stay bitwise stable)
    t0 = time.time()
    net, info = train(args.epochs, args.seed, args.width, args.lr, args.batch_size)
    from safetensors.torch import save

    from dtrain.fileio import replacing, write_text

    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    meta = {"width": str(args.width), "test_accuracy": f"{info['test_accuracy']:.6f}"}
    with replacing(args.out) as f:  # whole or not at all, and readable by others (save_file writes mode 0600)
        f.write(save(state, metadata=meta))
    record = {
        "file": args.out.name,
        "sha256": file_sha256(args.out),
        "bytes": args.out.stat().st_size,
        "num_params": sum(p.numel() for p in net.parameters()),
        "num_features": net.num_features,
        **info,
        "data": "sklearn load_digits, stratified 75/25 split, random_state=0 (dtrain.data.digits.digits_arrays)",
        "input": "[B, 1, 8, 8] in [-1, 1] (value / 8 - 1)",
        "seed": args.seed, "epochs": args.epochs, "width": args.width, "lr": args.lr, "batch_size": args.batch_size,
        "torch": torch.__version__,
        "seconds": round(time.time() - t0, 1),
        "command": "python tools/train_digits_classifier.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    write_text(args.out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


def check_args(args: argparse.Namespace) -> None:
    for key in ("epochs", "width", "batch_size"):
        if getattr(args, key) < 1:
            raise InputError(f"--{key.replace('_', '-')}: need an integer >= 1, got {getattr(args, key)}")
    if not args.lr > 0:
        raise InputError(f"--lr: need a number > 0, got {args.lr}")
    if args.out is not None and args.out.suffix != ".safetensors":  # its record goes to <out>.json beside it
        raise InputError(f"--out: need a .safetensors file (the record is written beside it as .json), got "
                         f"{args.out}")
    shipped = args.out is None or args.out.resolve() == DIGITS_WEIGHTS.resolve()
    if shipped and not args.overwrite_shipped:
        raise InputError(f"--out: give the output .safetensors file, or pass --overwrite-shipped to replace the "
                         f"shipped {DIGITS_WEIGHTS} (reference statistics made with it stop matching)")
    args.out = check_writable(args.out or DIGITS_WEIGHTS, "--out")


if __name__ == "__main__":
    sys.exit(main())

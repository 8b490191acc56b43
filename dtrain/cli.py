"""``dtrain``: one entry point, thin subcommands that import their area only when run (``dtrain --help`` is fast).

    dtrain fit recipes/teacher/digits.yaml trainer.max_steps=2000 logger.mode=offline
    dtrain fit recipes/teacher/digits.yaml --dry-run        # resolved recipe + parameter count

Each subcommand is an ``_add_<name>(subparsers)`` function that registers its parser and sets ``func``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

__all__ = ["main", "build_parser"]


# ---- fit (teacher and student training: dtrain.lit) --------------------------------------------------------
def _add_fit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="train from a recipe", description="Train from a recipe (YAML) with "
                       "key=value overrides, e.g. trainer.max_steps=2000 logger.mode=offline.")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides (applied last)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and parameter count, check the "
                   "files a launch reads (not this machine's GPUs), then exit")
    p.add_argument("--resume", metavar="CKPT", help="resume from a checkpoint file; 'last': the run's newest readable "
                   "checkpoint; 'auto': that, or a fresh start when there is none (use it in job scripts)")
    p.set_defaults(func=_fit)


def _fit(args: argparse.Namespace) -> int:
    from dtrain.lit.fit import fit
    from dtrain.lit.guard import NonFiniteError

    try:
        out = fit(args.recipe, args.overrides, dry_run=args.dry_run, resume=args.resume)
    except FileNotFoundError as e:  # a missing checkpoint, shard or file (bad input at large: main)
        print(f"dtrain fit: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:  # the non-finite guard stopped the run (dtrain.lit.guard)
        print(f"dtrain fit: {e}", file=sys.stderr)
        return 3
    if not args.dry_run:
        print(f"run directory: {out}")
    return 0


# ---- eval (FID per sampler and NFE: dtrain.eval) -----------------------------------------------------------
def _add_eval(sub: argparse._SubParsersAction) -> None:
    from dtrain.eval.commands import add_eval_args

    p = sub.add_parser("eval", help="FID against NFE per sampler", description="FID-vs-NFE sweep of a checkpoint "
                       "or bundle: a table, a plot, sample grids, W&B; with torchrun, every rank samples its share.")
    add_eval_args(p).set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from dtrain.eval.commands import run_eval
    from dtrain.export.bundle import kind_guide
    from dtrain.export.checkpoint import load_teacher

    try:
        return _handoff(lambda a: run_eval(a, load_teacher, kind_guide), args)
    except FileNotFoundError as e:  # missing weights or files (bad input at large: main)
        print(f"dtrain eval: {e}", file=sys.stderr)
        return 2


# ---- sample (samples from a bundle: dtrain.export) --------------------------------------------------------
def _add_sample(sub: argparse._SubParsersAction) -> None:
    from dtrain.export.commands import add_sample_args

    p = sub.add_parser("sample", help="sample from an inference bundle", description="Sample from a bundle "
                       "(dtrain export) into an image grid (.png) or arrays (.npz).")
    add_sample_args(p).set_defaults(func=_sample)


def _sample(args: argparse.Namespace) -> int:
    from dtrain.export.commands import run_sample

    return _handoff(run_sample, args)


def _handoff(fn: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> int:
    """Run an export/sample body; an existing output is one clear line, no traceback (a bad bundle, checkpoint or
    flag is an ``InputError``: ``main`` prints it)."""
    try:
        fn(args)
    except FileExistsError as e:
        print(f"dtrain {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


# ---- export (checkpoint -> inference bundle: dtrain.export) -----------------------------------------------
def _add_export(sub: argparse._SubParsersAction) -> None:
    from dtrain.export.commands import add_export_args

    p = sub.add_parser("export", help="training checkpoint -> inference bundle", description="Write an "
                       "inference bundle (model.safetensors + dtrain.json) from a training checkpoint.")
    add_export_args(p).set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from dtrain.export.commands import run_export

    return _handoff(run_export, args)


# ---- shards (WebDataset shards: dtrain.data.shards, also tools/make_shards.py) ------------------------------
def _add_shards(sub: argparse._SubParsersAction) -> None:
    from dtrain.data.shards import add_shards_args

    p = sub.add_parser("shards", help="write WebDataset shards + index.json", description="Write WebDataset tar "
                       "shards (png, cls, optional npy latents) and index.json from an image folder, a numpy array, "
                       "sklearn digits / photo patches or local CIFAR-10 batches; index or verify shards.")
    add_shards_args(p).set_defaults(func=_shards)


def _shards(args: argparse.Namespace) -> int:
    from dtrain.data.shards import run_shards

    return run_shards(args)


# ---- demo (shards -> teachers -> students -> FID per NFE -> bundles, on CPU: dtrain.demo) ----------------
def _add_demo(sub: argparse._SubParsersAction) -> None:
    from dtrain.demo import add_demo_args

    p = sub.add_parser("demo", help="the whole pipeline on CPU in minutes",
                       description="Digits shards -> teachers (VP, flow) -> distilled students -> FID-digits per NFE "
                       "-> bundles, sample grids, plot and table. Rerunning skips the stages that are up to date.")
    add_demo_args(p).set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from dtrain.demo import run_demo_cli

    return run_demo_cli(args)


SUBCOMMANDS = [_add_fit, _add_eval, _add_sample, _add_export, _add_shards, _add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtrain", description="Train diffusion teachers and distill them.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    parser._subcommands = sub.choices  # type: ignore[attr-defined]
    return parser


# import name -> package of pyproject's `train` extra (the core install samples bundles only)
TRAIN_EXTRA = {"lightning": "lightning", "pytorch_lightning": "lightning", "lightning_fabric": "lightning",
               "deepspeed": "deepspeed", "wandb": "wandb", "webdataset": "webdataset", "omegaconf": "omegaconf",
               "torchmetrics": "torchmetrics", "torch_fidelity": "torch-fidelity", "sklearn": "scikit-learn",
               "scipy": "scipy", "rich": "rich", "matplotlib": "matplotlib", "torchvision": "torchvision",
               "braceexpand": "webdataset", "yaml": "omegaconf"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in a and not a.startswith("-") for a in extra):  # key=value after a flag: fit R --resume last k=v
        args.overrides = [*args.overrides, *extra]
    elif extra:  # the subcommand's usage, not the top level's
        takes = isinstance(getattr(args, "overrides", None), list)  # fit's key=value overrides
        odd = [a for a in extra if "=" not in a or a.startswith("-")] if takes else extra
        hint = f" ({odd[0]!r} is neither a flag of `dtrain {args.command}` nor a key=value override)" if takes else ""
        parser._subcommands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(odd)}{hint}")
    from dtrain.errors import InputError

    clean = False  # every rank ends the same way: process groups may be destroyed (not after one rank's error,
    try:  # where NCCL's destroy can wait for ranks that never come)
        code, clean = int(args.func(args) or 0), True
        return code
    except SystemExit:  # dtrain fit's signal stops: every rank stops at the same step
        clean = True
        raise
    except InputError as e:  # a bad recipe, flag or file (dtrain.errors): one clear line, no traceback
        print(f"dtrain {args.command}: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an inference-only install (pyproject: the `train` extra)
        missing = TRAIN_EXTRA.get((e.name or "").split(".")[0])
        if missing is None:
            raise
        print(f"dtrain {args.command}: needs {missing}, which this install lacks: pip install 'dtrain[train]' "
              f"(bundles need only the core install: dtrain sample, dtrain export, dtrain.load_bundle)",
              file=sys.stderr)
        return 2
    finally:
        if clean:
            _close_process_groups()


def _close_process_groups() -> None:
    """Destroy torch.distributed's process groups of a fit or an eval before the process exits (each rank for
    itself): groups left to the interpreter's exit have aborted a rank in gloo's teardown, failing a finished job."""
    dist = sys.modules.get("torch.distributed")  # never imported: nothing to close (no torch import for that)
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

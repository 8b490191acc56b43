#!/usr/bin/env python
"""Submit an sbatch template with the node and GPU counts of a recipe (one task per GPU).

    python tools/slurm_submit.py slurm/multi_node.sbatch recipes/teacher/imagenet64.yaml trainer.num_nodes=4 \
        trainer.devices=8 --sbatch "--time=48:00:00 --partition=gpu"
    python tools/slurm_submit.py --print-args recipes/teacher/cifar10.yaml trainer.devices=4   # the flags only

Runs ``sbatch --nodes=<trainer.num_nodes> --ntasks-per-node=<trainer.devices> --gpus-per-node=<same, 0 on cpu>
<--sbatch options> TEMPLATE RECIPE OVERRIDES``; options given later win, and the template's ``#SBATCH`` lines
lose to all of them. Inside the job ``dtrain fit`` reads the allocation and needs no flags.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path


def _fail(msg: str) -> int:
    print(f"slurm_submit: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("template", nargs="?", help="an sbatch script, e.g. slurm/multi_node.sbatch")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides (also passed on to dtrain fit)")
    p.add_argument("--nodes", type=int, help="instead of trainer.num_nodes")
    p.add_argument("--gpus-per-node", type=int, help="instead of trainer.devices")
    p.add_argument("--sbatch", default="", help='more sbatch options, e.g. "--time=4:00:00 -p gpu"')
    p.add_argument("--print-args", action="store_true", help="print the sbatch flags for the recipe and exit")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch command, do not run it")
    args = p.parse_args(argv)
    if args.print_args and args.template is not None and args.template.endswith((".yaml", ".yml")):
        args.overrides, args.recipe, args.template = [args.recipe, *args.overrides], args.template, None
    if "=" in args.recipe and not args.recipe.endswith((".yaml", ".yml")):
        return _fail(f"RECIPE: {args.recipe!r} is an override, not a recipe file; the arguments are "
                     f"TEMPLATE RECIPE [key=value ...] (TEMPLATE is left out only with --print-args)")
    try:
        extra = shlex.split(args.sbatch)
    except ValueError as e:
        return _fail(f"--sbatch: cannot split {args.sbatch!r} into options: {e}")
    import re

    layout = [o for o in extra if re.match(r"(--nodes|--ntasks-per-node|--ntasks|--gpus-per-node)(=|$)|-[Nn](\d|$)", o)]
    if layout:  # they would win over the recipe's layout after the batch split had been checked against it
        return _fail(f"--sbatch: {layout[0]!r}: the job layout comes from the recipe (trainer.num_nodes, "
                     f"trainer.devices) or this tool's --nodes / --gpus-per-node, which the batch check follows")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dtrain.config import RecipeError, check_inputs, key_source, load_recipe
    from dtrain.dist.slurm import job_layout, sbatch_args

    try:
        cfg = load_recipe(args.recipe, args.overrides)
        flags = sbatch_args(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node)
        if not args.print_args:  # the teacher and the files the job will read, before it waits in the queue
            from dtrain.lit.fit import check_teacher, per_rank_batch

            check_teacher(cfg, args.recipe, args.overrides)
            check_inputs(cfg, args.recipe, args.overrides, here=False)
            nodes, per_node = job_layout(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node)
            per_rank_batch(cfg, nodes * per_node, args.recipe, args.overrides)
            if cfg.strategy.name == "ddp_spawn":  # each srun task would spawn its own ranks (duplicates, a hang)
                raise RecipeError(key_source("strategy.name", args.recipe, args.overrides), "strategy.name",
                                  "ddp_spawn starts its own processes, but under "
                                  "SLURM srun starts one task per GPU; use ddp")
    except (RecipeError, ValueError) as e:
        return _fail(str(e))
    if args.print_args:
        print(" ".join(flags))
        return 0
    if args.template is None:
        p.error("TEMPLATE is required unless --print-args")
    cmd = ["sbatch", *flags, *extra, args.template, args.recipe, *args.overrides]
    print(shlex.join(cmd), flush=True)
    return 0 if args.dry_run else subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())

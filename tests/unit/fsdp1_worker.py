"""One rank of the raw FSDP1 CPU run test_strategy.py starts twice (gloo; Lightning's FSDPStrategy refuses CPU):
the GMM teacher wrapped the way ``strategy.name: fsdp`` wraps it (``fsdp_unit_types``, ``use_orig_params``), so
``net`` and each EMA copy are separate FSDP units with the same flat layout; the EMA averages each rank's shard.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python fsdp1_worker.py OUT STEPS

Writes ``OUT/full.pt`` (rank 0: the full state dict) and ``OUT/sharded/`` (a distributed checkpoint laid out
like Lightning's FSDPStrategy with ``state_dict_type="sharded"``: {"model": ...} + ``meta.pt``).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = ["model.hidden=32", "model.depth=2", "data.batch_size=64", "data.num_samples=4096", "ema.decays=[0.9]",
             "optim.lr=1e-2", "optim.warmup_steps=2", "optim.grad_clip=0.05", "logger.mode=disabled"]


def main() -> None:
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from dtrain.config import load_recipe
    from dtrain.data.memory import InMemoryBatches
    from dtrain.data.synthetic import default_gmm
    from dtrain.dist.strategy import check_ema_alignment, fsdp_unit_types
    from dtrain.lit.teacher import TeacherModule
    from dtrain.models import build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_recipe(ROOT / "recipes" / "teacher" / "gmm.yaml", OVERRIDES)
    torch.manual_seed(cfg.seed)
    module = TeacherModule(cfg)
    module.forward = lambda batch: module.compute_loss(batch)[0].mean()
    root = FSDP(module, auto_wrap_policy=ModuleWrapPolicy(fsdp_unit_types(cfg.model)), use_orig_params=True,
                device_id=torch.device("cpu"))
    check_ema_alignment(module)
    local, whole = (sum(p.numel() for p in net.parameters()) for net in (module.net, build_model(cfg.model)))
    assert local < whole, (local, whole)  # this rank holds a shard of net (and of each EMA copy)
    opt = module.configure_optimizers()
    optimizer, sched = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    x, _ = default_gmm().sample(4096, generator=torch.Generator().manual_seed(cfg.seed))
    batches = iter(InMemoryBatches({"x": x}, 64, seed=cfg.seed, rank=rank, world_size=world))
    torch.manual_seed(1000 + rank)
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        root(next(batches)).backward()
        root.clip_grad_norm_(cfg.optim.grad_clip)  # what dtrain's FSDP strategy does for optim.grad_clip
        optimizer.step()
        sched.step()
        module.ema.update(module.net, step)
    with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)):
        full = root.state_dict()
    if rank == 0:
        torch.save({k: v.clone() for k, v in full.items()}, out / "full.pt")
    with FSDP.state_dict_type(root, StateDictType.SHARDED_STATE_DICT):
        dcp.save({"model": root.state_dict()}, checkpoint_id=str(out / "sharded"))
    if rank == 0:  # Lightning's meta.pt: the checkpoint without its tensors
        ckpt = {"state_dict": {}, "global_step": steps, "epoch": 0}
        module.on_save_checkpoint(ckpt)
        del ckpt["state_dict"]
        torch.save(ckpt, out / "sharded" / "meta.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()

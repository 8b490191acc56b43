"""One rank of the raw-DeepSpeed CPU run test_zero.py starts twice (gloo): a GMM teacher with an EMA trained
with ``deepspeed.initialize`` from ``dtrain.dist.strategy.deepspeed_config``, then checkpointed the way Lightning's
DeepSpeedStrategy does it (client state = the checkpoint dict without ``state_dict`` / ``optimizer_states``).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python zero_worker.py OUT STAGE PRECISION STEPS

Writes into OUT: ``ckpt/`` (the DeepSpeed checkpoint), and from rank 0 ``inrun.pt``: the weights of net and
EMA gathered at the end of training, and samples drawn from the in-run model on every rank (a fixed generator).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    out, stage, precision, steps = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    import deepspeed
    import deepspeed.ops
    import torch

    # The CPU accelerator's shared-memory all-reduce is a C++ op built on first use (minutes on 2 cores); gloo
    # does the same job here.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    torch.set_num_threads(1)
    from dtrain.config import load_recipe
    from dtrain.data.memory import InMemoryBatches
    from dtrain.data.synthetic import default_gmm
    from dtrain.dist.strategy import check_ema_alignment, deepspeed_config, zero_ema
    from dtrain.lit.teacher import TeacherModule

    cfg = load_recipe(ROOT / "recipes" / "teacher" / "gmm.yaml", [
        "strategy.name=deepspeed", f"strategy.zero_stage={stage}", f"trainer.precision={precision}",
        "model.hidden=32", "model.depth=2", "data.batch_size=64", "data.num_samples=4096", "ema.decays=[0.9]",
        "optim.lr=1e-2", "optim.warmup_steps=2", f"trainer.max_steps={steps}", "logger.mode=disabled"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    deepspeed.init_distributed("gloo")
    torch.manual_seed(cfg.seed)
    module = TeacherModule(cfg)
    opt = module.configure_optimizers()
    module.forward = lambda batch: module.compute_loss(batch)[0].mean()  # what Lightning redirects to
    engine, *_ = deepspeed.initialize(model=module, optimizer=opt["optimizer"],
                                      lr_scheduler=opt["lr_scheduler"]["scheduler"],
                                      model_parameters=[p for p in module.parameters() if p.requires_grad],
                                      config=deepspeed_config(cfg, standalone=True))
    zero_ema(module)
    check_ema_alignment(module)
    x, _ = default_gmm().sample(4096, generator=torch.Generator().manual_seed(cfg.seed))
    dtype = {"bf16-mixed": torch.bfloat16}.get(precision, torch.float32)  # Lightning's convert_input
    batches = iter(InMemoryBatches({"x": x}, 64, seed=cfg.seed, rank=rank, world_size=world))
    history = [master_weights(module)]  # the fp32 master weights of net after every step
    torch.manual_seed(1000 + rank)
    for step in range(1, steps + 1):
        batch = {k: v.to(dtype) for k, v in next(batches).items()}
        engine.backward(engine(batch))
        engine.step()
        module.ema.update(module.net, step)
        history.append(master_weights(module))
    checkpoint = {"global_step": steps, "epoch": 0, "state_dict": None, "optimizer_states": None}
    module.on_save_checkpoint(checkpoint)  # ckpt["dtrain"], as Lightning calls it before the strategy saves
    checkpoint = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
    checkpoint["dtrain_sharded"] = {"strategy": "deepspeed", "unsaved_prefixes": []}
    engine.save_checkpoint(str(out / "ckpt"), client_state=checkpoint, tag="checkpoint")

    # the in-run model: gathered fp32 weights and samples (every rank takes part in the ZeRO-3 gathers)
    with deepspeed.zero.GatheredParameters([*module.net.parameters(), *module.ema.parameters()], enabled=stage == 3):
        weights = {k: v.detach().float().clone() for k, v in module.state_dict().items()}
        samples = {}
        for ema in (None, module.default_ema):
            if ema is None and precision != "32-true":
                continue  # the raw net computes in bf16 in the engine; the checkpoint holds its fp32 master weights
            samples[str(ema)] = module.sample(256, nfe=8, ema=ema, generator=torch.Generator().manual_seed(7))
    weights.update({f"net.{k}": v for k, v in history[-1].items()})

    # a resume: a fresh engine, EMA made fp32 first (zero_ema), then the checkpoint restores the EMA shards exactly
    torch.manual_seed(cfg.seed + 1)  # other initial weights
    fresh = TeacherModule(cfg)
    opt = fresh.configure_optimizers()
    fresh.forward = lambda batch: fresh.compute_loss(batch)[0].mean()
    engine2, *_ = deepspeed.initialize(model=fresh, optimizer=opt["optimizer"],
                                       model_parameters=[p for p in fresh.parameters() if p.requires_grad],
                                       config=deepspeed_config(cfg, standalone=True))
    zero_ema(fresh)
    _, client = engine2.load_checkpoint(str(out / "ckpt"), tag="checkpoint")
    tag = module.default_ema
    restored = all(torch.equal(a, b) and a.dtype == torch.float32 for a, b in
                   zip(fresh.ema.targets(fresh.ema[tag]), module.ema.targets(module.ema[tag])))
    restored &= client["global_step"] == steps
    if rank == 0:
        torch.save({"weights": weights, "samples": samples, "history": history, "restored": restored},
                   out / "inrun.pt")
    # leave together: a rank whose peer already tore gloo down can abort at exit ("terminate called ...")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def master_weights(module) -> dict:
    """The full fp32 master weights of ``module.net`` (a collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in module.net.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[name] = (full if full is not None else p).detach().float().clone()
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()

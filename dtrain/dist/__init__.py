"""Distributed training: ``strategy`` (the recipe's ddp / fsdp / fsdp2 / deepspeed -> a Lightning strategy, the
DeepSpeed config, EMA copies under sharded weights) and ``slurm`` (the allocation as the trainer's topology,
requeue on a signal, sbatch flags from a recipe). Lightning and DeepSpeed are imported only when used."""

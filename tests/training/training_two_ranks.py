"""Run by the deepspeed launcher with 2 CPU ranks: ZeRO-3, frozen params, activation checkpointing, a save.

Each rank trains on its half of the rows (3 micro-batches of 1 row) and writes rank<r>.pt to --out.
"""

import argparse

import torch

from training import Engine, EngineConfig, OptimConfig, ScheduleConfig
from training import backend_deepspeed
from training.distributed import exit_without_teardown, strip_local_rank_arg

from training_tiny import lm_loss, make_model, make_rows, partition_everything_under_zero3, split

partition_everything_under_zero3(backend_deepspeed)

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
args = parser.parse_args(strip_local_rank_arg())  # the launcher adds --local_rank=N

cfg = EngineConfig(backend="deepspeed", zero_stage=3, activation_checkpointing=True, grad_accum_steps=3)
optim = OptimConfig(lr=1e-2, grad_clip=0.5)
sched = ScheduleConfig(warmup_steps=1, decay="cosine", min_lr_ratio=0.1)
engine = Engine(make_model(frozen=("embed", "blocks.0")), cfg, optim, sched, 6, args.out)
# partitioned for real: each rank holds only a slice of every weight
assert all(p.ds_tensor.numel() < p.ds_numel for p in engine.module.parameters()), "ZeRO-3 did not partition"
losses = []
for step in range(3):
    rows = make_rows(step, 6)
    mine = {k: v[3 * engine.rank: 3 * engine.rank + 3] for k, v in rows.items()}
    losses.append(engine.train_step(split(mine, 3), lm_loss).loss)
engine.save_checkpoint({"ranks": engine.world_size})
weights = engine.trainable_state_dict()
torch.save({"losses": losses, "steps": engine.step, "weights": weights}, f"{args.out}/rank{engine.rank}.pt")
engine.close()
print(f"rank {engine.rank}: trained, saved and closed", flush=True)
exit_without_teardown(0)  # an abort at interpreter exit failed this test once in CI (stop 10)

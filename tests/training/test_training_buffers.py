"""Buffers of trainable modules (BatchNorm running statistics) are trained state: saved, resumed, loaded;
buffers of frozen modules are not."""
import torch
from torch import nn

from training import Engine, EngineConfig, OptimConfig, ScheduleConfig
from training.module_state import trained_buffers

SCHED = ScheduleConfig(warmup_steps=0, decay="constant")


class WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.BatchNorm1d(4)  # frozen module: its statistics are not trained state
        self.frozen.requires_grad_(False)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.norm(self.proj(self.frozen(x)))


def _loss(model, batch):
    out = model(batch["x"])
    return (out ** 2).sum(), out.numel()


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(8, 4, generator=g) * 3 + 1}


def test_trained_buffers_are_those_of_trainable_modules():
    names = set(trained_buffers(WithNorm()))
    assert names == {"norm.running_mean", "norm.running_var", "norm.num_batches_tracked"}


def test_running_statistics_are_checkpointed_and_resumed(tmp_path):
    engine = Engine(WithNorm(), EngineConfig(), OptimConfig(lr=1e-2), SCHED, total_steps=4, run_dir=tmp_path)
    for s in range(2):
        engine.train_step([_batch(s)], _loss)
    assert "norm.running_mean" in engine.trainable_state_dict()
    saved_mean = engine.module.norm.running_mean.clone()
    assert not torch.equal(saved_mean, torch.zeros(4))
    engine.save_checkpoint({})

    fresh = Engine(WithNorm(), EngineConfig(), OptimConfig(lr=1e-2), SCHED, total_steps=4, run_dir=tmp_path)
    fresh.resume()
    assert torch.equal(fresh.module.norm.running_mean, saved_mean)
    assert int(fresh.module.norm.num_batches_tracked) == 2
    assert torch.equal(fresh.module.frozen.running_mean, torch.zeros(4))  # frozen module: not restored, not saved

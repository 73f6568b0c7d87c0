"""herd's training engine, shared by every recipe; it imports nothing else of the project.

    from training import Engine, EngineConfig, OptimConfig, ScheduleConfig
    engine = Engine(model, EngineConfig(), OptimConfig(), ScheduleConfig(), total_steps, run_dir)
    extra = engine.resume() or {}
    result = engine.train_step(micro_batches, loss_fn)   # loss_fn(model, batch) -> (loss_sum, n_tokens)
    engine.save_checkpoint({"data_position": ...})
    engine.close()

A recipe's steps go through the one training loop, ``training.loop.fit(engine, task, cadence, state, logger)``:
it shards each step's examples across ranks and micro-batches, logs, evaluates, checkpoints and stops.

DeepSpeed is imported only when ``EngineConfig.backend == "deepspeed"``.
"""

from .checkpoint import read_weights
from .config import EngineConfig, OptimConfig, ScheduleConfig
from .engine import Engine, StepResult
from .errors import CheckpointError, TrainingError
from .metrics import MetricsLogger, plot_curves, read_metrics, summary_table
from .progress import Progress
from .schedule import lr_factor

__all__ = [
    "Engine", "StepResult", "EngineConfig", "OptimConfig", "ScheduleConfig", "TrainingError", "CheckpointError",
    "MetricsLogger", "plot_curves", "read_metrics", "summary_table", "Progress", "lr_factor", "read_weights",
]

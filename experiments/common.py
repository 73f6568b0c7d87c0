"""Config fields every recipe shares (the top of each experiment YAML), and the end of a training step they share."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass
class RunConfig:
    experiment: str = field(default="experiment", metadata={"help": "name; outputs go to <output_dir>/<experiment>/<time>/"})
    recipe: str = field(default="", metadata={"help": "which recipe runs this YAML (experiments/recipes/)"})
    seed: int = field(default=0, metadata={"help": "seed for init, data order and sampling"})
    output_dir: str = field(default="runs", metadata={"help": "root folder of run outputs"})
    resume: Union[bool, str] = field(default=False, metadata={
        "help": "true: continue the newest run of this experiment from its latest checkpoint; or a run folder"})


def end_of_step(cfg, engine, progress, state: dict, step: int, last_loss: float) -> Optional[dict]:
    """After training step `step` of `cfg.steps`: checkpoint every `cfg.checkpoint_every` steps, at the last step and
    where `cfg.stop_after_steps` stops the run early. Returns None to go on, or (progress and engine closed) the
    summary of a stopped run, which `resume=true` continues."""
    stop = cfg.stop_after_steps is not None and cfg.stop_after_steps <= step < cfg.steps
    if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop:
        engine.save_checkpoint(state)
    if not stop:
        return None
    progress.close()
    engine.close()
    return {"stopped_at_step": step, "planned_steps": cfg.steps, "last_loss": last_loss}

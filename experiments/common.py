"""Config fields every recipe shares (the top of each experiment YAML)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass
class RunConfig:
    experiment: str = field(default="experiment", metadata={"help": "name; outputs go to <output_dir>/<experiment>/<time>/"})
    recipe: str = field(default="", metadata={"help": "which recipe runs this YAML (experiments/recipes/)"})
    seed: int = field(default=0, metadata={"help": "seed for init, data order and sampling"})
    output_dir: str = field(default="runs", metadata={"help": "root folder of run outputs"})
    resume: Union[bool, str] = field(default=False, metadata={
        "help": "true: continue the newest run of this experiment from its latest checkpoint; or a run folder"})


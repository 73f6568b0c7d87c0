"""Recipe registry: the `recipe:` key of an experiment YAML names one of these modules.

Each recipe module defines `Config` (a dataclass; see experiments/config.py for the validation rules)
and `run(config, run_dir: Path) -> dict` returning the run summary.
"""
from __future__ import annotations

import difflib
import importlib

from ..config import ConfigError

RECIPES = {
    "text_pretrain": "experiments.recipes.text_pretrain",
    "sft": "experiments.recipes.sft",
    "reward_model": "experiments.recipes.reward_model",
    "dpo": "experiments.recipes.dpo",
    "rejection_sampling": "experiments.recipes.rejection_sampling",
    "posttrain_demo": "experiments.recipes.posttrain_demo",
    "clip_pretrain": "experiments.recipes.clip_pretrain",
    "base_lm": "experiments.recipes.base_lm",
    "image_adapter": "experiments.recipes.image_adapter",
    "vqa_eval": "experiments.recipes.vqa_eval",
    "joint_adapter": "experiments.recipes.joint_adapter",
    "bestrq_pretrain": "experiments.recipes.bestrq_pretrain",
    "speech_adapter": "experiments.recipes.speech_adapter",
    "speech_eval": "experiments.recipes.speech_eval",
}


def get_recipe(name):
    if not isinstance(name, str) or name not in RECIPES:
        close = difflib.get_close_matches(str(name), RECIPES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"key 'recipe': unknown recipe {name!r}{hint}; known: {', '.join(RECIPES)}")
    return importlib.import_module(RECIPES[name])

"""Runs a validated experiment: picks the run folder (new or resumed), writes the resolved config,
calls the recipe, writes and prints the summary."""
from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

import torch

from training.distributed import broadcast_object, init_distributed, is_rank0
from training.metrics import summary_table

from .config import ConfigError, dump_yaml, to_dict
from .run_dir import find_resume_dir, mark_latest, new_run_dir

# Sections whose change makes a checkpoint incompatible with the config it is resumed under.
_RESUME_MUST_MATCH = ("model", "tokenizer")


def run_experiment(recipe, config) -> dict:
    created_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and init_distributed()
    try:
        return _run(recipe, config)
    finally:
        if created_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run(recipe, config) -> dict:
    run_dir = _choose_run_dir(config)
    if is_rank0():  # a resumed run keeps its original config.yaml next to the one it resumed with
        name = "config.yaml" if not (run_dir / "config.yaml").exists() else "config.resumed.yaml"
        (run_dir / name).write_text(dump_yaml(config))
        print(f"herd: run folder {run_dir}", flush=True)
    summary = recipe.run(config, run_dir)
    if is_rank0():
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        mark_latest(run_dir)
        print(summary_table(dict(_flatten(summary)), title=f"\n{config.experiment}: {run_dir}"), flush=True)
    return summary


def _choose_run_dir(config) -> Path:
    resume_dir = find_resume_dir(config.output_dir, config.experiment, config.resume)
    if resume_dir is not None:
        _check_resume_compatible(resume_dir, config)
        return resume_dir
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _shared_new_run_dir(config)
    return new_run_dir(config.output_dir, config.experiment)


def _shared_new_run_dir(config) -> Path:
    """Under a multi-process launcher, rank 0 creates the folder and every rank gets its name."""
    name = str(new_run_dir(config.output_dir, config.experiment)) if is_rank0() else None
    return Path(broadcast_object(name))


def _check_resume_compatible(run_dir: Path, config) -> None:
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"resume: {saved_path} is missing; cannot check the run's model config")
    saved = yaml.safe_load(saved_path.read_text()) or {}
    current = to_dict(config)
    for section in _RESUME_MUST_MATCH:
        diffs = _diff(saved.get(section), current.get(section), section)
        if diffs:
            raise ConfigError(f"resume: the config differs from the checkpointed run {run_dir} in "
                              f"{'; '.join(diffs[:3])} (start a new run instead of resume=true)")


def _diff(a, b, path) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}")
        return out
    return [] if a == b else [f"{path}: {a!r} (checkpoint) vs {b!r} (now)"]


def _flatten(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + ".")
        else:
            yield key, v

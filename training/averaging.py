"""Model averaging: weight snapshots saved atomically as safetensors, and their (weighted) mean.

Used for the Polyak average of the annealing snapshots (paper Sec 3.4) and for averaging compatible
checkpoints of post-training stages (Sec 4.1).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def snapshot_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"step_{step:08d}.safetensors"


def save_snapshot(state_dict: dict[str, torch.Tensor], folder: Path, step: int) -> str:
    """Write `folder/step_XXXXXXXX.safetensors` via a temp file + rename; returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = snapshot_path(folder, step)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp))
    os.replace(tmp, path)
    return str(path)


def average_state_dicts(paths: Sequence[Path], weights: Optional[Sequence[float]] = None) -> dict[str, torch.Tensor]:
    """Weighted mean (weights normalised to sum 1; default uniform) of safetensors files with the same
    tensor names and shapes. Accumulates in float32, returns each tensor in its stored dtype."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("average_state_dicts: no checkpoints given")
    weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(paths):
        raise ValueError(f"average_state_dicts: {len(weights)} weights for {len(paths)} checkpoints")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"average_state_dicts: weights must be >= 0 with a positive sum, got {weights}")
    total = sum(weights)
    out: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    reference = None
    for path, w in zip(paths, weights):
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint to average not found: {path}")
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if reference is None:
                reference = (path, names)
            elif names != reference[1]:
                diff = sorted(names ^ reference[1])[:5]
                raise ValueError(f"cannot average {path} with {reference[0]}: tensor names differ (e.g. {diff})")
            for name in names:
                t = f.get_tensor(name)
                if name in out and out[name].shape != t.shape:
                    raise ValueError(f"cannot average {path}: tensor {name} has shape {tuple(t.shape)}, "
                                     f"{reference[0]} has {tuple(out[name].shape)}")
                dtypes.setdefault(name, t.dtype)
                contrib = t.float() * (w / total)
                out[name] = contrib if name not in out else out[name].add_(contrib)
    return {k: v.to(dtypes[k]) for k, v in out.items()}

"""`herd average`: the (weighted) mean of compatible checkpoints, written as a loadable folder."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Sequence

from safetensors.torch import save_file

from training.averaging import average_state_dicts

from .config import ConfigError

WEIGHTS = "model.safetensors"
# Files that make an averaged folder usable as the checkpoint it came from (HF config, tokenizer, chat template).
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model")


def _weights_file(path: Path) -> Path:
    if path.is_file() and path.suffix == ".safetensors":
        return path
    if path.is_dir() and (path / WEIGHTS).is_file():
        return path / WEIGHTS
    if path.is_dir() and (path / "model.safetensors.index.json").is_file():
        raise ConfigError(f"{path}: sharded checkpoints cannot be averaged yet (save it unsharded first)")
    raise ConfigError(f"{path}: not a .safetensors file or a folder with {WEIGHTS}")


def average_checkpoints(paths: Sequence[Path], weights: Optional[Sequence[float]], out: Path) -> Path:
    """Average `paths` (same tensor names and shapes) into out/model.safetensors (via a temp file)."""
    if len(paths) < 2:
        raise ConfigError("herd average needs at least two checkpoints")
    if weights is not None and len(weights) != len(paths):
        raise ConfigError(f"--weights: {len(weights)} weights for {len(paths)} checkpoints")
    files = [_weights_file(Path(p)) for p in paths]
    try:
        averaged = average_state_dicts(files, weights)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS + ".tmp")
    save_file(averaged, str(tmp))
    tmp.replace(out / WEIGHTS)
    first = Path(paths[0]) if Path(paths[0]).is_dir() else Path(paths[0]).parent
    for name in SIDE_FILES:
        if (first / name).is_file() and (first / name).resolve() != (out / name).resolve():
            shutil.copy2(first / name, out / name)
    return out

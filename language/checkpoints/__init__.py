"""Checkpoint conversion for the Llama model: Hugging Face safetensors (load and save), GGUF (llama.cpp)
and Meta's original `params.json` + `consolidated.*.pth` (load). Every loader returns a `Llama` whose
state dict uses Hugging Face names; `load_pretrained` picks the loader from what a path holds."""
from __future__ import annotations

from pathlib import Path

import torch


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded as asked: the message names the file, tensor and shapes."""


from .gguf import load_gguf  # noqa: E402  (the loaders import CheckpointError from here)
from .hf import load_hf, save_hf  # noqa: E402
from .meta import load_meta  # noqa: E402

__all__ = ["CheckpointError", "load_pretrained", "load_hf", "save_hf", "load_gguf", "load_meta"]

_LOOKED_FOR = ("a .gguf file (or a folder holding exactly one)",
               "a folder with config.json + model.safetensors or model.safetensors.index.json (Hugging Face)",
               "a folder with params.json + consolidated.*.pth (Meta)")


def load_pretrained(path, *, dtype: torch.dtype = torch.float32, device="cpu"):
    """Load a `Llama` from `path`: a GGUF file, an HF folder or a Meta folder (picked from the contents)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".gguf" or _starts_with(path, b"GGUF"):
            return load_gguf(path, dtype=dtype, device=device)
        raise CheckpointError(f"{path}: not a checkpoint file this loader knows; looked for "
                              + "; ".join(_LOOKED_FOR))
    if (path / "config.json").is_file():
        return load_hf(path, dtype=dtype, device=device)
    if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        return load_meta(path, dtype=dtype, device=device)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return load_gguf(ggufs[0], dtype=dtype, device=device)
    found = sorted(p.name for p in path.iterdir())
    shown = ", ".join(found[:10]) + (f" ... ({len(found)} entries)" if len(found) > 10 else "")
    raise CheckpointError(f"{path}: no checkpoint found; looked for " + "; ".join(_LOOKED_FOR)
                          + f". The folder holds: {shown or 'nothing'}")


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic

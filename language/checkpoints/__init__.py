"""Checkpoint readers for the Llama model: Hugging Face safetensors (read and save), GGUF (llama.cpp) and Meta's
original `params.json` + `consolidated.*.pth`. A reader is pure: file -> `Contents` (the config and the tensors
under Hugging Face names, read on demand); `read_checkpoint` picks the reader from what a path holds, and
`Llama.from_pretrained` is the one build step."""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from .errors import CheckpointError
from .gguf import read_gguf
from .hf import Contents, check_entries, read_entry, read_hf, save_hf
from .meta import read_meta

__all__ = ["CheckpointError", "Contents", "read_checkpoint", "check_entries", "read_entry", "read_hf", "save_hf",
           "read_gguf", "read_meta"]

_LOOKED_FOR = ("a .gguf file (or a folder holding exactly one)",
               "a folder with config.json + model.safetensors or model.safetensors.index.json (Hugging Face)",
               "a folder with params.json + consolidated.*.pth (Meta)")


def read_checkpoint(path, files: ExitStack) -> Contents:
    """The checkpoint at `path`: a GGUF file, an HF folder or a Meta folder (picked from the contents). Files the
    tensors are read from stay open in `files`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".gguf" or _starts_with(path, b"GGUF"):
            return read_gguf(path)
        raise CheckpointError(f"{path}: not a checkpoint file this loader knows; looked for "
                              + "; ".join(_LOOKED_FOR))
    if (path / "config.json").is_file():
        return read_hf(path, files)
    if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        return read_meta(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return read_gguf(ggufs[0])
    found = sorted(p.name for p in path.iterdir())
    shown = ", ".join(found[:10]) + (f" ... ({len(found)} entries)" if len(found) > 10 else "")
    raise CheckpointError(f"{path}: no checkpoint found; looked for " + "; ".join(_LOOKED_FOR)
                          + f". The folder holds: {shown or 'nothing'}")


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic

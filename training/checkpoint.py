"""Checkpoint folders on disk: atomic publication, a verified manifest, keep-last pruning, safe loading.

Layout (``run_dir/checkpoints/step_00000123/``)::

    model.safetensors   trainable weights only, fp32, names as in the model (frozen weights are not saved:
                        the recipe records where the frozen base comes from in extra_state)
    optimizer.pt        torch backend: {"state_dict": AdamW state, "param_names": {...}}
    scheduler.pt        LambdaLR state (numbers only)
    rng.pt              {"world_size": W, "ranks": [RNG state of each rank]} (see rng.py)
    deepspeed/ds/...    deepspeed backend: DeepSpeed's own files (partitioned optimizer state), see below
    state.json          {"format", "step", "extra_state", "backend", ..., "manifest": {relpath: {bytes, sha256}}}

Every ``.pt`` written by this package holds only tensors and plain Python values and is read back with
``torch.load(..., weights_only=True)``. DeepSpeed 0.19.8 writes, under ``deepspeed/``:

* ``ds/mp_rank_00_model_states.pt`` (stages 0-2) or ``ds/zero_pp_rank_<r>_mp_rank_00_model_states.pt``
  (stage 3, one per rank): trainable module weights (frozen ones excluded), ds_config, counters, the LR
  schedule's state (unused: ours is scheduler.pt) and, at stage 0, the AdamW state. Plain data: these load
  with ``weights_only=True``.
* ``ds/[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` (stages 1-3, one per rank): fp32 master
  partitions + Adam moments. Real pickles: they hold DeepSpeed objects (``LossScaler``, ``ZeroStageEnum``,
  ``tensor_fragment.fragment_address``) and need ``weights_only=False``.
* ``zero_to_fp32.py`` / ``zero_to_torch.py``: DeepSpeed's recovery scripts (stages 1-3).

Only DeepSpeed reads its files (``engine.load_checkpoint``, ``weights_only=False`` inside), and only after
their sizes and sha256 matched this folder's manifest.

Atomicity: everything is written to ``step_XXXXXXXX.tmp-<pid>/``, fsynced, then ``os.replace``d to its final
name; ``state.json`` is written last. A folder counts as a checkpoint only with the final name and a
readable ``state.json``, so a crash mid-write leaves earlier checkpoints intact; stale ``*.tmp-*`` folders
are removed by the next save.
"""

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

FORMAT = "herd-checkpoint/1"
CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.json"
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
_STEP_RE = re.compile(r"^step_(\d{8})$")


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def tmp_dir_name(step: int, pid: int) -> str:
    return f"{step_dir_name(step)}.tmp-{pid}"


# ---------------------------------------------------------------------------------------------- discovery

def read_state(folder: Path) -> dict[str, Any]:
    """The parsed ``state.json`` of a checkpoint folder; CheckpointError if missing or unreadable."""
    path = Path(folder) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a complete checkpoint)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "manifest" not in state:
        raise CheckpointError(f"{path}: not a {FORMAT} state file")
    return state


def list_complete(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint under ``run_dir/checkpoints``, oldest first."""
    root = checkpoints_root(run_dir)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = _STEP_RE.match(child.name)
            if m and child.is_dir():
                try:
                    read_state(child)
                except CheckpointError:
                    continue
                found.append((int(m.group(1)), child))
    return sorted(found)


def latest_complete(run_dir: Path) -> Path | None:
    done = list_complete(run_dir)
    return done[-1][1] if done else None


# ---------------------------------------------------------------------------------------------- writing

def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def build_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes", "sha256"}}`` for every file under ``folder`` except state.json."""
    manifest = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != STATE_FILE:
            manifest[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return manifest


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and directory under ``folder`` (and ``folder`` itself)."""
    for path in sorted(Path(folder).rglob("*"), key=lambda p: len(p.parts), reverse=True):
        _fsync_path(path)
    _fsync_path(Path(folder))


def write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` of tensors/plain values only (loadable with ``weights_only=True``)."""
    torch.save(obj, path)


def save_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``tensors`` (contiguous CPU copies) to a safetensors file."""
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt", "written_by": "herd.training"})


def remove_stale_tmp(root: Path) -> None:
    """Delete half-written ``*.tmp-*`` folders left by an interrupted save."""
    if root.is_dir():
        for child in root.iterdir():
            if ".tmp-" in child.name and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)


def publish(tmp: Path, state: dict[str, Any]) -> Path:
    """Write ``state.json`` (with the manifest of ``tmp``) last, fsync, and rename ``tmp`` to its final name.

    ``state`` gets ``format`` and ``manifest`` added. An existing folder of the same step is replaced.
    """
    final = tmp.parent / tmp.name.split(".tmp-")[0]
    state = dict(state, format=FORMAT, manifest=build_manifest(tmp), saved_at=time.time())
    write_json(tmp / STATE_FILE, state)
    fsync_tree(tmp)
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old.tmp-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def prune(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints; returns the deleted folders."""
    done = list_complete(run_dir)
    doomed = [folder for _, folder in done[:-keep_last]] if keep_last > 0 else []
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
    return doomed


# ---------------------------------------------------------------------------------------------- reading

def verify(folder: Path, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check every manifest entry's size and sha256; CheckpointError naming the first bad file."""
    folder = Path(folder)
    state = read_state(folder) if state is None else state
    for rel, meta in state["manifest"].items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {folder / STATE_FILE})")
        size = path.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"{path}: size mismatch, expected {meta['bytes']} bytes, found {size} "
                                  f"(truncated or overwritten)")
        digest = sha256_file(path)
        if digest != meta["sha256"]:
            raise CheckpointError(f"{path}: sha256 mismatch, expected {meta['sha256']}, found {digest} "
                                  f"(corrupted)")
    return state


def load_torch(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; CheckpointError naming the file on failure."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"{path}: cannot be loaded with weights_only=True ({e})") from None


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes stored in a safetensors file (reads the header only)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


def check_weights_match(path: Path, expected: dict[str, tuple[int, ...]], limit: int = 5) -> None:
    """CheckpointError listing the first mismatching names/shapes between ``path`` and ``expected``."""
    found = weight_shapes(path)
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    wrong = [f"{n}: checkpoint {list(found[n])} vs model {list(expected[n])}"
             for n in expected if n in found and tuple(found[n]) != tuple(expected[n])]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} trainable weights missing from the checkpoint, e.g. {missing[:limit]}")
        if unexpected:
            parts.append(f"{len(unexpected)} checkpoint weights not trainable in the model, e.g. {unexpected[:limit]}")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches, e.g. {wrong[:limit]}")
        raise CheckpointError(f"{path} does not match the model: " + "; ".join(parts))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on CPU."""
    try:
        return load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


def read_weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The verified trainable weights of a checkpoint folder (for recipes that start from one)."""
    verify(checkpoint_dir)
    return load_weights(Path(checkpoint_dir) / WEIGHTS_FILE)

"""Mixed precision and device placement of batches.

``fp32``: everything in fp32. ``bf16``: matmuls run in bf16 under ``torch.autocast`` while the master
weights, their gradients and the gradient accumulation stay fp32 (torch backend: parameters are fp32 and
autocast only casts op inputs; DeepSpeed: parameters are bf16 copies of fp32 master weights held by ZeRO,
with ``data_types.grad_accum_dtype = fp32``). Autocast also keeps reductions such as the cross-entropy
in fp32 under both backends.
"""

import contextlib
from typing import Any

import torch


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; ``cuda`` without CUDA is an error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("engine.device=cuda but torch.cuda.is_available() is False")
        return torch.device("cuda", local_rank)
    if device == "cpu":
        return torch.device("cpu")
    raise ValueError(f"engine.device must be auto, cpu or cuda, got {device!r}")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward-pass context for ``precision`` ("fp32": a no-op; "bf16": bf16 autocast)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"engine.precision must be fp32 or bf16, got {precision!r}")


def move_batch(batch: Any, device: torch.device, float_dtype: torch.dtype | None = None) -> Any:
    """Recursively move the tensors of a (nested dict/list/tuple) batch to ``device``.

    Floating-point tensors are also cast to ``float_dtype`` when given (DeepSpeed bf16 keeps its
    parameters in bf16, so float inputs such as images must match); integer/bool tensors keep their dtype.
    """
    if isinstance(batch, torch.Tensor):
        if float_dtype is not None and batch.is_floating_point():
            return batch.to(device=device, dtype=float_dtype, non_blocking=True)
        return batch.to(device=device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_batch(v, device, float_dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [move_batch(v, device, float_dtype) for v in batch]
        return type(batch)(moved) if not hasattr(batch, "_fields") else type(batch)(*moved)
    return batch

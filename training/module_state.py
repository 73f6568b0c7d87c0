"""Which tensors of a partly frozen model make up its trained state.

Trainable parameters, plus the persistent buffers of every submodule that owns a trainable parameter
itself (e.g. a BatchNorm's running statistics inside a trainable encoder). Buffers of fully frozen
modules (a frozen LM, a frozen random-projection quantizer) are not trained state and are not saved.
"""
from __future__ import annotations

import torch
from torch import nn


def trained_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """name -> buffer, for persistent buffers of submodules with a directly owned trainable parameter."""
    out = {}
    for prefix, sub in module.named_modules():
        if not any(p.requires_grad for p in sub.parameters(recurse=False)):
            continue
        for name, buf in sub.named_buffers(recurse=False):
            if buf is not None and name not in sub._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf
    return out


def copy_into(module: nn.Module, state: dict[str, torch.Tensor], names) -> None:
    """Copy state[name] into the module's parameter or buffer of that name, for each name in names."""
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    with torch.no_grad():
        for name in names:
            target = tensors[name]
            target.copy_(state[name].to(target.device, target.dtype).reshape(target.shape))

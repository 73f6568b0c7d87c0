"""Activation checkpointing: recompute each block's activations during backward instead of storing them.

The hook the engine expects from a model, tried in this order:

1. ``model.gradient_checkpointing_enable()`` if the model defines it (the model decides what to wrap);
2. otherwise every child of each ``nn.ModuleList`` whose attribute name is ``layers`` or ``blocks``,
   anywhere in the module tree (e.g. ``model.layers.3``, ``model.vision.blocks.0``), is wrapped.

Wrapping replaces the block instance's ``forward`` with one that calls
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: state-dict names do not change, keyword
arguments pass through, and blocks whose inputs need no gradient (frozen LM layers before the first
trainable adapter) still give gradients to the trainable parameters inside them. Under ZeRO-3 the
recompute re-gathers the partitioned weights through DeepSpeed's module hooks.
"""

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import TrainingError

BLOCK_LIST_NAMES = ("layers", "blocks")


def _checkpointed_forward(original_forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return original_forward(*args, **kwargs)
    return checkpoint(original_forward, *args, use_reentrant=False, **kwargs)


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` for every child of a ModuleList named ``layers``/``blocks`` in ``model``."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES:
            found.extend((f"{name}.{i}", block) for i, block in enumerate(module))
    return found


def enable_activation_checkpointing(model: nn.Module) -> str:
    """Turn on activation checkpointing for ``model``; returns a one-line description of what was done."""
    hook = getattr(model, "gradient_checkpointing_enable", None)
    if callable(hook):
        hook()
        return f"{type(model).__name__}.gradient_checkpointing_enable()"
    blocks = find_blocks(model)
    if not blocks:
        raise TrainingError(
            f"engine.activation_checkpointing=True but {type(model).__name__} has neither a "
            f"gradient_checkpointing_enable() method nor an nn.ModuleList named {' or '.join(BLOCK_LIST_NAMES)}")
    for _, block in blocks:
        if not getattr(block, "_herd_checkpointed", False):
            block.forward = functools.partial(_checkpointed_forward, block.forward)
            block._herd_checkpointed = True
    return f"checkpointed {len(blocks)} blocks ({blocks[0][0]} ... {blocks[-1][0]})"

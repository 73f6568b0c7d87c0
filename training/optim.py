"""AdamW over the trainable parameters only, without weight decay on 1-D parameters (norms, biases), with
optional per-parameter LR multipliers (``OptimConfig.lr_scale``: e.g. faster adapter gates).

Frozen parameters (``requires_grad=False``) never enter a param group, so they get no optimizer state and
are never stepped. Group order is fixed (decay, no-decay, then scaled groups as first met; each in
``named_parameters`` order), so the optimizer's integer parameter ids map to the same names in every run;
``param_group_names`` records it.
"""

from typing import Optional

import torch
from torch import nn

from .config import OptimConfig
from .errors import TrainingError


def _scale_key(name: str, lr_scale: Optional[dict[str, float]]) -> Optional[str]:
    """The first key of ``lr_scale`` found in the parameter name, or None."""
    return next((k for k in (lr_scale or {}) if k in name), None)


def param_group_names(model: nn.Module, lr_scale: Optional[dict[str, float]] = None) -> dict[str, list[str]]:
    """``{"decay": [names of trainable >= 2-D params], "no_decay": [names of trainable 1-D params]}``; with
    ``lr_scale``, a parameter whose name contains one of its keys (the first that matches) goes to
    ``"<decay|no_decay> x<factor> <key>"`` instead."""
    groups: dict[str, list[str]] = {"decay": [], "no_decay": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            group, key = "decay" if param.ndim >= 2 else "no_decay", _scale_key(name, lr_scale)
            if key is not None:
                group = f"{group} x{float(lr_scale[key]):g} {key}"
            groups.setdefault(group, []).append(name)
    if not any(groups.values()):
        raise TrainingError(f"{type(model).__name__} has no parameter with requires_grad=True: nothing to train")
    return groups


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with one group per non-empty entry of :func:`param_group_names`, in that order;
    a scaled group's LR is ``optim.lr * factor`` (the schedule multiplies every group alike)."""
    params = dict(model.named_parameters())
    groups = []
    for names in param_group_names(model, optim.lr_scale).values():
        if names:
            first = params[names[0]]
            key = _scale_key(names[0], optim.lr_scale)
            groups.append({"params": [params[n] for n in names],
                           "weight_decay": optim.weight_decay if first.ndim >= 2 else 0.0,
                           "lr": optim.lr * (optim.lr_scale[key] if key is not None else 1.0)})
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)

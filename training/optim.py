"""AdamW over the trainable parameters only, without weight decay on 1-D parameters (norms, biases).

Frozen parameters (``requires_grad=False``) never enter a param group, so they get no optimizer state and
are never stepped. Group order is fixed (decay first, then no-decay; each in ``named_parameters`` order), so
the optimizer's integer parameter ids map to the same names in every run; ``param_group_names`` records it.
"""

import torch
from torch import nn

from .config import OptimConfig
from .errors import TrainingError


def param_group_names(model: nn.Module) -> dict[str, list[str]]:
    """``{"decay": [names of trainable >= 2-D params], "no_decay": [names of trainable 1-D params]}``."""
    groups: dict[str, list[str]] = {"decay": [], "no_decay": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups["decay" if param.ndim >= 2 else "no_decay"].append(name)
    if not groups["decay"] and not groups["no_decay"]:
        raise TrainingError(f"{type(model).__name__} has no parameter with requires_grad=True: nothing to train")
    return groups


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with one group per non-empty entry of :func:`param_group_names`, in that order."""
    params = dict(model.named_parameters())
    groups = []
    for group_name, names in param_group_names(model).items():
        if names:
            wd = optim.weight_decay if group_name == "decay" else 0.0
            groups.append({"params": [params[n] for n in names], "weight_decay": wd})
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)

"""Which parameters train in each stage (paper Sec 7: the language model stays frozen in every vision and
speech stage; the image encoder trains in adapter pre-training, annealing and SFT; only adapters when asked).

A composed model names its parameter groups through `parameter_groups() -> {group: [modules]}`: "language_model",
"encoder" and "adapters", or per modality "encoder:<modality>" / "adapters:<modality>" (any group may be empty;
a policy's `modalities` limits training to those modalities' groups, e.g. a speech stage on a model whose
image adapters were trained before). Frozen groups are also kept in
eval mode while the model trains (`keep_frozen_in_eval`), so a frozen module never changes behaviour
between training and evaluation (dropout, batch statistics).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

GROUPS = ("language_model", "encoder", "adapters")


@dataclass
class FreezePolicy:
    """What trains besides nothing: the language model never does."""
    train_encoder: bool = field(default=True, metadata={"help": "update the modality encoder (paper: yes)"})
    train_adapters: bool = field(default=True, metadata={"help": "update projector, cross-attention / adapter layers"})
    modalities: Optional[list[str]] = field(default=None, metadata={
        "help": "train only these modalities' parts (e.g. [speech]); null = every modality's"})


STAGES: dict[str, dict] = {
    "adapter_pretrain": dict(train_encoder=True, train_adapters=True),
    "anneal": dict(train_encoder=True, train_adapters=True),
    "sft": dict(train_encoder=True, train_adapters=True),  # with the instruct LM hot-swapped in
    "reward_model": dict(train_encoder=True, train_adapters=True),  # vision parts unfrozen, language frozen
    "adapters_only": dict(train_encoder=False, train_adapters=True),
    "frozen": dict(train_encoder=False, train_adapters=False),  # evaluation / inference
}


def stage_policy(name: str, **overrides) -> FreezePolicy:
    """The policy of a named stage, with field overrides (e.g. from the YAML)."""
    if name not in STAGES:
        close = difflib.get_close_matches(name, STAGES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown training stage '{name}'{hint}; known stages: {', '.join(STAGES)}")
    return FreezePolicy(**{**STAGES[name], **overrides})


def apply_freezing(model: nn.Module, policy: FreezePolicy | str) -> FreezePolicy:
    """Set requires_grad per group (language model always False) and refresh the train/eval modes."""
    if isinstance(policy, str):
        policy = stage_policy(policy)
    groups = _groups(model)
    for group, modules in groups.items():
        for module in modules:
            module.requires_grad_(_trains(group, policy))
    model.train(model.training)
    return policy


def _trains(group: str, policy: FreezePolicy) -> bool:
    kind, _, modality = group.partition(":")
    if kind == "language_model":
        return False
    wanted = policy.train_encoder if kind == "encoder" else policy.train_adapters
    if not wanted or policy.modalities is None or not modality:
        return wanted
    return modality in policy.modalities or (modality == "tokens" and bool(policy.modalities))


def frozen_modules(model: nn.Module) -> list[nn.Module]:
    """Modules of the groups none of whose parameters train (the language model always)."""
    out = []
    for group, modules in _groups(model).items():
        params = [p for m in modules for p in m.parameters()]
        if group == "language_model" or not any(p.requires_grad for p in params):
            out.extend(modules)
    return out


def keep_frozen_in_eval(model: nn.Module) -> None:
    """Put every frozen group in eval mode (call after `model.train(...)`)."""
    for module in frozen_modules(model):
        module.eval()


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of everything that trains; what an optimizer should receive."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def parameter_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    """{"language_model" | "encoder" | "adapters": {"total": n, "trainable": n}}, every modality's groups of a
    kind together (shared tensors counted once per kind)."""
    by_kind: dict[str, dict[int, nn.Parameter]] = {g: {} for g in GROUPS}
    for group, modules in _groups(model).items():
        by_kind[group.partition(":")[0]].update({id(p): p for m in modules for p in m.parameters()})
    return {kind: {"total": sum(p.numel() for p in params.values()),
                   "trainable": sum(p.numel() for p in params.values() if p.requires_grad)}
            for kind, params in by_kind.items()}


def _groups(model: nn.Module) -> dict[str, list[nn.Module]]:
    if not hasattr(model, "parameter_groups"):
        raise TypeError(f"{type(model).__name__} has no parameter_groups(); freezing needs the groups {GROUPS}")
    groups = model.parameter_groups()
    unknown = sorted(g for g in groups if g.partition(":")[0] not in GROUPS)
    if unknown:
        raise ValueError(f"parameter groups {unknown} are not among {GROUPS} (optionally ':<modality>')")
    return {g: [m for m in modules if m is not None] for g, modules in groups.items()}

"""Typed configuration of the training engine: optimizer, LR schedule and engine (backend, precision, ...).

Plain dataclasses, validated by the recipes' YAML loader from their type hints. Valid ranges live in
``field(metadata={"range": (lo, hi)})`` (inclusive) and a one-line help in ``metadata={"help": ...}``.
Cross-field rules that a type hint cannot express are checked by :func:`validate`. (No
``from __future__ import annotations`` here: ``dataclasses.fields(...).type`` stays a real type.)
"""

from dataclasses import dataclass, field
from typing import Literal


def _f(default, help: str, range: tuple | None = None, factory=None):
    """A dataclass field with ``help`` (and optionally ``range``) metadata."""
    metadata = {"help": help}
    if range is not None:
        metadata["range"] = range
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class OptimConfig:
    """AdamW over the trainable parameters (Llama 3 pre-training values by default, Sec 3.4)."""

    lr: float = _f(3e-4, "peak learning rate", (0.0, 10.0))
    betas: list[float] = _f(None, "AdamW (beta1, beta2)", factory=lambda: [0.9, 0.95])
    eps: float = _f(1e-5, "AdamW epsilon", (0.0, 1.0))
    weight_decay: float = _f(0.1, "decoupled weight decay; never applied to 1-D params (norms, biases)", (0.0, 10.0))
    grad_clip: float = _f(1.0, "clip the global gradient L2 norm to this value; 0 = off", (0.0, 1e6))
    lr_scale: dict[str, float] = _f(None, "LR multipliers by parameter name: {substring: factor}; a parameter "
                                    "takes the factor of the first key found in its name (e.g. "
                                    "{cross_attn_attn_gate: 10.0}); 0 = never updated", factory=dict)

    def __post_init__(self):
        bad = {k: v for k, v in self.lr_scale.items() if not k or not isinstance(v, (int, float)) or v < 0}
        if bad:
            raise ValueError(f"key 'lr_scale': {bad}: each entry must be a non-empty name substring -> factor >= 0")


@dataclass
class ScheduleConfig:
    """Linear warm-up, then decay to ``min_lr_ratio`` x peak, then an optional linear anneal to 0."""

    warmup_steps: int = _f(100, "steps of linear warm-up from lr/warmup_steps to lr", (0, 10**9))
    decay: Literal["cosine", "linear", "constant"] = _f("cosine", "shape of the decay after warm-up")
    min_lr_ratio: float = _f(0.01, "LR at the end of the decay, as a fraction of the peak", (0.0, 1.0))
    anneal_steps: int = _f(0, "last steps: LR linearly from its value to 0 (Llama 3 annealing)", (0, 10**9))


@dataclass
class EngineConfig:
    """How the engine runs: backend, device, precision, ZeRO stage, accumulation, checkpoints."""

    backend: Literal["torch", "deepspeed"] = _f("torch", "plain PyTorch (one process) or DeepSpeed ZeRO")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto = cuda when available, else cpu")
    precision: Literal["fp32", "bf16"] = _f(
        "fp32", "bf16 = bf16 compute with fp32 master weights and FP32 gradient accumulation")
    zero_stage: int = _f(0, "DeepSpeed ZeRO stage (deepspeed backend only)", (0, 3))
    grad_accum_steps: int = _f(1, "micro-batches per optimizer step", (1, 10**6))
    activation_checkpointing: bool = _f(
        False, "recompute block activations in backward (see activation_checkpointing.py)")
    max_nonfinite_in_a_row: int = _f(
        5, "consecutive skipped non-finite steps tolerated before TrainingError", (0, 10**6))
    keep_last: int = _f(3, "complete checkpoints kept under run_dir/checkpoints", (1, 10**6))
    compile: bool = _f(False, "torch.compile the model (torch backend)")


def validate(engine: EngineConfig, optim: OptimConfig, schedule: ScheduleConfig, total_steps: int) -> None:
    """Check the cross-field rules; raise ``ValueError`` naming the offending key."""
    if len(optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in optim.betas):
        raise ValueError(f"optim.betas must be two values in [0, 1), got {optim.betas}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if schedule.warmup_steps + schedule.anneal_steps > total_steps:
        raise ValueError(
            f"schedule.warmup_steps ({schedule.warmup_steps}) + schedule.anneal_steps ({schedule.anneal_steps}) "
            f"exceed total_steps ({total_steps})")
    if engine.backend == "torch" and engine.zero_stage != 0:
        raise ValueError(f"engine.zero_stage={engine.zero_stage} needs engine.backend=deepspeed (got torch)")
    if engine.backend == "deepspeed" and engine.compile:
        raise ValueError("engine.compile is only supported with engine.backend=torch")
    if engine.backend == "deepspeed" and engine.precision == "bf16" and engine.zero_stage == 0:
        raise ValueError(
            "engine.precision=bf16 with engine.backend=deepspeed needs engine.zero_stage >= 1: DeepSpeed without "
            "ZeRO accumulates bf16 gradients in bf16, and this project requires FP32 accumulation (paper Sec 7.3)")

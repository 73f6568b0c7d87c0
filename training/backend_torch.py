"""Plain-PyTorch backend: one process, one device, fp32 master weights (bf16 via autocast).

Gradients are accumulated unnormalised (each micro-batch backpropagates its *sum* of token losses into
fp32 ``.grad``), then multiplied once by ``1 / total_tokens`` before clipping, which gives the exact
token-weighted mean whatever the micro-batch split. Multi-process runs use the DeepSpeed backend.
"""

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from .activation_checkpointing import enable_activation_checkpointing
from .config import EngineConfig, OptimConfig, ScheduleConfig
from .distributed import env_world
from .errors import CheckpointError, TrainingError
from .module_state import copy_into, trained_buffers
from .optim import build_optimizer, param_group_names
from .precision import autocast, move_batch, resolve_device
from .schedule import build_scheduler


class TorchBackend:
    """Owns device placement, the optimizer, the scheduler and the update of one training step."""

    name = "torch"

    def __init__(self, module: nn.Module, engine: EngineConfig, optim: OptimConfig, schedule: ScheduleConfig,
                 total_steps: int):
        if env_world()[1] > 1:
            raise TrainingError("engine.backend=torch runs in one process, but WORLD_SIZE > 1: "
                                "use engine.backend=deepspeed for multi-process runs")
        self.cfg, self.optim_cfg = engine, optim
        self.rank, self.world_size = 0, 1
        self.device = resolve_device(engine.device)
        self.module = module.to(self.device)
        self.checkpointing = enable_activation_checkpointing(module) if engine.activation_checkpointing else None
        self.optimizer = build_optimizer(module, optim)
        self.scheduler = build_scheduler(self.optimizer, schedule, total_steps)
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.model = torch.compile(module) if engine.compile else module

    # ------------------------------------------------------------------------------------------ step
    def autocast(self):
        return autocast(self.device, self.cfg.precision)

    def prepare_batch(self, batch: Any) -> Any:
        return move_batch(batch, self.device)

    def backward(self, loss: torch.Tensor, is_last: bool) -> None:
        loss.backward()

    def step(self, grad_scale: float, skip: bool) -> tuple[float, bool]:
        """Scale grads by ``grad_scale``, clip, step optimizer + scheduler. Returns ``(grad_norm, applied)``.

        ``skip`` (or a non-finite norm) drops the gradients without any update.
        """
        norm = float("nan")
        if not skip:
            grads = [p.grad for p in self.trainable if p.grad is not None]
            torch._foreach_mul_(grads, grad_scale)
            max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
            norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)) if grads else 0.0
        applied = math.isfinite(norm)
        if applied:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, applied

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------------------------------ state
    def _trained(self) -> dict[str, torch.Tensor]:
        out = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        out.update(trained_buffers(self.module))
        return out

    def trainable_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(t.shape) for n, t in self._trained().items()}

    def trainable_state_dict(self, rank0_only: bool = False) -> dict[str, torch.Tensor]:
        """Trainable parameters + buffers of trainable modules (BatchNorm statistics), CPU copies."""
        return {n: t.detach().to("cpu", copy=True) for n, t in self._trained().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        copy_into(self.module, state, state.keys())

    def save_state(self, folder: Path) -> None:
        """Write ``optimizer.pt`` (AdamW state + the parameter names behind its integer ids)."""
        ckpt.save_torch({"state_dict": self.optimizer.state_dict(),
                         "param_names": param_group_names(self.module, self.optim_cfg.lr_scale)},
                        folder / ckpt.OPTIMIZER_FILE)

    def load_state(self, folder: Path, state: dict[str, Any]) -> None:
        """Restore trainable weights from ``model.safetensors`` and the optimizer from ``optimizer.pt``."""
        path = folder / ckpt.WEIGHTS_FILE
        ckpt.check_weights_match(path, self.trainable_shapes())
        weights = ckpt.load_weights(path)
        copy_into(self.module, weights, weights.keys())
        saved = ckpt.load_torch(folder / ckpt.OPTIMIZER_FILE)
        if saved.get("param_names") != param_group_names(self.module, self.optim_cfg.lr_scale):
            raise CheckpointError(f"{folder / ckpt.OPTIMIZER_FILE}: optimizer parameter groups do not match "
                                  f"the model's trainable parameters (frozen/trainable split changed?)")
        self.optimizer.load_state_dict(saved["state_dict"])

    def close(self) -> None:
        pass

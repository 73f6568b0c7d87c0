"""DeepSpeed backend: ZeRO stages 0-3, bf16 with FP32 gradient accumulation, one or many processes.

Launch: standalone (one process; the launch variables are filled in on 127.0.0.1), or through the
``deepspeed`` launcher / ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` read from the environment; the
launcher's ``--local_rank`` argument can be dropped with ``distributed.strip_local_rank_arg``). Process
group: nccl on GPU, gloo on CPU (``DS_ACCELERATOR=cpu`` is set when the device is the CPU). ``close()``
destroys the group only if this backend created it.

What is handed to ``deepspeed.initialize``: the model, a ``torch.optim.AdamW`` over the trainable parameters
only (frozen ones get no optimizer state, never enter ZeRO's partitions, and are not saved), our LambdaLR
schedule (DeepSpeed steps it only on applied steps), and :func:`deepspeed_config`.

Token-weighted loss: each micro-batch backpropagates its unnormalised loss sum with
``backward(scale_wrt_gas=False)`` and the accumulation boundary set by hand (so any number of
micro-batches works); DeepSpeed averages gradients over ranks, so at the step they are multiplied by
``world_size / total_tokens_of_all_ranks``. Where that multiplication happens depends on the optimizer
DeepSpeed picked: ZeRO 1-3 optimizers divide by their loss scale right before clipping, so the scale is
set to ``total_tokens / world_size`` for that step only (``override_loss_scale``); the bf16 ZeRO-1
``BF16_Optimizer`` has its fp32 gradient buffers scaled in place; stage 0 (fp32) scales ``param.grad`` and
clips here. The result equals the torch backend's token-weighted mean (tested).

Non-finite steps: the engine poisons the last micro-batch's loss with NaN when it decided to skip; every
DeepSpeed optimizer then sees a non-finite gradient norm and drops the step (``bf16.check_grad_overflow``
is on), and ``was_step_applied()`` confirms it.
"""

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint as ckpt
from .activation_checkpointing import enable_activation_checkpointing
from .config import EngineConfig, OptimConfig, ScheduleConfig
from .distributed import ensure_single_process_env, env_world, launched
from .errors import CheckpointError, TrainingError
from .module_state import copy_into, trained_buffers
from .optim import build_optimizer
from .precision import autocast, move_batch, resolve_device
from .schedule import build_scheduler

DS_SUBDIR = "deepspeed"
DS_TAG = "ds"


def deepspeed_config(engine: EngineConfig, optim: OptimConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for an engine config (micro-batch size 1 is bookkeeping only)."""
    bf16 = engine.precision == "bf16"
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": engine.grad_accum_steps,
        "train_batch_size": engine.grad_accum_steps * world_size,
        # Stage 0 runs the plain torch optimizer: this backend clips there itself (after token scaling).
        "gradient_clipping": optim.grad_clip if engine.zero_stage > 0 else 0.0,
        "zero_optimization": {"stage": engine.zero_stage},
        "bf16": {"enabled": bf16, "check_grad_overflow": True} if bf16 else {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if bf16:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}  # paper Sec 7.3: FP32 gradient accumulation
    if engine.zero_stage == 3:
        cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False  # we gather fp32 ourselves
    return cfg


class DeepSpeedBackend:
    """Wraps a ``deepspeed.DeepSpeedEngine``; same methods as ``TorchBackend``."""

    name = "deepspeed"

    def __init__(self, module: nn.Module, engine: EngineConfig, optim: OptimConfig, schedule: ScheduleConfig,
                 total_steps: int):
        self.cfg, self.optim_cfg = engine, optim
        if not launched():
            ensure_single_process_env()
        _, _, local_rank = env_world()
        self.device = resolve_device(engine.device, local_rank)
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed  # imported late: it reads DS_ACCELERATOR once

        if os.environ.get("HERD_DEEPSPEED_LOG", "warning").lower() != "info":
            logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        accel = deepspeed.get_accelerator().device_name()
        if accel != self.device.type:
            raise TrainingError(f"engine.device resolves to {self.device.type} but DeepSpeed's accelerator is "
                                f"{accel!r}: set DS_ACCELERATOR={self.device.type} before importing deepspeed")
        self.created_group = False
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo",
                                       auto_mpi_discovery=False, verbose=False)
            self.created_group = True
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

        self.checkpointing = enable_activation_checkpointing(module) if engine.activation_checkpointing else None
        optimizer = build_optimizer(module.to(self.device), optim)
        scheduler = build_scheduler(optimizer, schedule, total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(engine, optim, self.world_size), dist_init_required=False)
        self.model = self.engine  # forward through the engine (ZeRO-3 hooks, DeepSpeed bookkeeping)
        self.module = self.engine.module
        self.zero_stage = engine.zero_stage
        self.trainable = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self._ds = deepspeed
        self._set_loss_scale(1.0)

    # ------------------------------------------------------------------------------------------ step
    def autocast(self):
        return autocast(self.device, self.cfg.precision)

    def prepare_batch(self, batch: Any) -> Any:
        return move_batch(batch, self.device)

    def backward(self, loss: torch.Tensor, is_last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(is_last)
        self.engine.backward(loss, scale_wrt_gas=False)

    def _set_loss_scale(self, scale: float) -> None:
        if hasattr(self.engine.optimizer, "override_loss_scale"):
            self.engine.optimizer.override_loss_scale(scale)

    def step(self, grad_scale: float, skip: bool) -> tuple[float, bool]:
        """Scale by ``grad_scale * world_size``, clip, step. Returns ``(grad_norm, applied)``."""
        factor = grad_scale * self.world_size
        opt = self.engine.optimizer
        if self.zero_stage == 0:  # the plain torch optimizer: param.grad holds the rank-averaged sum
            params = [p for _, p in self.trainable]
            grads = [p.grad for p in params if p.grad is not None]
            norm = float("nan")
            if not skip:
                torch._foreach_mul_(grads, factor)
                max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
                norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if grads else 0.0
            if not torch.isfinite(torch.tensor(norm)):
                self.engine.zero_grad()
                return norm, False
            self.engine.step()
            return norm, self.engine.was_step_applied()
        if hasattr(opt, "override_loss_scale"):  # ZeRO 1-3: grads are divided by the loss scale before clipping
            self._set_loss_scale(1.0 / factor)
            try:
                self.engine.step()
            finally:
                self._set_loss_scale(1.0)
        else:  # BF16_Optimizer (ZeRO-1 + bf16): fp32 gradient buffers, clipped inside step()
            for flat in opt.fp32_groups_gradients_flat:
                flat.mul_(factor)
            self.engine.step()
        applied = self.engine.was_step_applied()
        norm = self.engine.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        if skip and applied:
            raise TrainingError("DeepSpeed applied a step that had to be skipped (the poisoned loss did not reach "
                                "any trainable parameter's gradient)")
        return norm, applied

    def current_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    # ------------------------------------------------------------------------------------------ state
    def trainable_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {n: tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape) for n, p in self.trainable}
        shapes.update({n: tuple(b.shape) for n, b in trained_buffers(self.module).items()})
        return shapes

    def trainable_state_dict(self, rank0_only: bool = False) -> dict[str, torch.Tensor]:
        """Full fp32 master weights of the trainable parameters (a collective: every rank must call)."""
        shapes = self.trainable_shapes()
        keep = not rank0_only or self.rank == 0
        out = {}
        for name, p in self.trainable:
            full = p.detach() if self.zero_stage == 0 else self._ds.utils.safe_get_full_fp32_param(p)
            if full is None:
                raise TrainingError(f"DeepSpeed has no fp32 master copy of trainable parameter {name}")
            if keep:
                out[name] = full.to("cpu", torch.float32, copy=True).reshape(shapes[name])
        if keep:  # buffers (BatchNorm statistics) are replicated, never partitioned
            out.update({n: b.detach().to("cpu", copy=True) for n, b in trained_buffers(self.module).items()})
        return out

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Overwrite trainable weights: the fp32 master copies and the module's parameters (a collective)."""
        import contextlib
        with torch.no_grad():
            for name, p in self.trainable:
                value = state[name]
                if self.zero_stage > 0:
                    self._ds.utils.safe_set_full_fp32_param(p, value.to(p.device, torch.float32))
                gather = (self._ds.zero.GatheredParameters([p], modifier_rank=0) if self.zero_stage == 3
                          else contextlib.nullcontext())
                with gather:
                    if self.zero_stage < 3 or self.rank == 0:
                        p.data.copy_(value.to(p.device, p.dtype).reshape(p.data.shape))
        copy_into(self.module, state, [n for n in trained_buffers(self.module) if n in state])

    def save_state(self, folder: Path) -> None:
        """DeepSpeed's own checkpoint (partitioned optimizer state) under ``folder/deepspeed/ds`` (all ranks)."""
        self.engine.save_checkpoint(str(folder / DS_SUBDIR), tag=DS_TAG, client_state={}, save_latest=False,
                                    exclude_frozen_parameters=True)

    def load_state(self, folder: Path, state: dict[str, Any]) -> None:
        """Check names/shapes against ``model.safetensors``, then let DeepSpeed restore weights + optimizer."""
        ckpt.check_weights_match(folder / ckpt.WEIGHTS_FILE, self.trainable_shapes())
        saved_stage, saved_world = state.get("zero_stage"), state.get("world_size")
        if saved_stage != self.zero_stage or (self.zero_stage > 0 and saved_world != self.world_size):
            raise CheckpointError(
                f"{folder}: written with zero_stage={saved_stage}, world_size={saved_world}; this run has "
                f"zero_stage={self.zero_stage}, world_size={self.world_size}. DeepSpeed's partitioned optimizer "
                f"state cannot be resharded here: start a new run from {ckpt.WEIGHTS_FILE} instead")
        path, _ = self.engine.load_checkpoint(str(folder / DS_SUBDIR), tag=DS_TAG, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"{folder / DS_SUBDIR / DS_TAG}: DeepSpeed could not load this checkpoint")

    def close(self) -> None:
        if hasattr(self.engine, "destroy"):
            self.engine.destroy()
        if self.created_group and dist.is_initialized():
            # DeepSpeed's wrapper also drops its cached groups, so a later engine in this process starts clean.
            self._ds.comm.destroy_process_group()
            self.created_group = False
        if self.device.type == "cpu":
            remove_shm_allreduce_buffer(self.rank)


def remove_shm_allreduce_buffer(rank: int) -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer.

    On CPU, when every rank is local (the launcher sets LOCAL_SIZE), DeepSpeed's shm all-reduce
    (ops/csrc/cpu/comm/shm.cpp) creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>
    (~70 MB) and never unlinks it, so every multi-rank CPU run left its buffers in memory-backed /dev/shm for good
    (15 GB after a day of test runs on a 24 GB machine). After the run nothing opens them again, and the mappings
    that remain in this process outlive the name."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    try:
        (Path("/dev/shm") / name).unlink(missing_ok=True)
    except OSError as e:  # never fail a finished run over it
        logging.getLogger(__name__).warning("could not remove /dev/shm/%s: %s", name, e)

"""The training engine every recipe uses: one call per optimizer step, checkpoints, exact resume.

``Engine.train_step(micro_batches, loss_fn)`` runs forward/backward over the micro-batches of one step,
normalises by the total number of tokens of all of them (and of all ranks), clips, and steps the optimizer
and the LR schedule. ``loss_fn(model, batch) -> (loss_sum, n_tokens)`` returns the *sum* of per-token losses
of one micro-batch and how many tokens they cover, so the step's loss is the exact token-weighted mean
whatever the split into micro-batches.

Non-finite steps: when the step's loss or gradient norm is NaN/inf (or it covers no token) the update is
dropped: gradients are zeroed, the optimizer, the schedule and ``Engine.step`` do not move, a warning is
logged and ``StepResult.skipped`` is True. More than ``max_nonfinite_in_a_row`` such steps in a row raise
``TrainingError``. The data for a skipped step is consumed: the recipe's data position moves on.

The engine never switches the model between ``train()`` and ``eval()``: that stays with the recipe (which
may keep a frozen part in eval mode on purpose).
"""

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import checkpoint as ckpt
from . import distributed as distr
from .config import EngineConfig, OptimConfig, ScheduleConfig, validate
from .errors import CheckpointError, TrainingError
from .rng import get_rng_state, seed_everything, set_rng_state

log = logging.getLogger("herd.training")

LossFn = Callable[[nn.Module, dict], tuple[torch.Tensor, "int | torch.Tensor"]]


@dataclasses.dataclass
class StepResult:
    """What one ``train_step`` did (identical on every rank)."""

    loss: float         # token-weighted mean loss over all micro-batches and ranks
    grad_norm: float    # global L2 norm of the token-mean gradient before clipping (NaN when skipped early)
    lr: float           # learning rate of this step (param group 0)
    tokens: int         # tokens covered by the loss, all micro-batches and ranks
    skipped: bool       # True when the update was dropped (non-finite loss/grad norm, or no token)
    step_time_s: float  # wall time of the whole step

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Engine:
    """Backend-agnostic training loop step + checkpointing.

    Attributes: ``model`` (the module to call for forward: possibly compiled or a DeepSpeed engine),
    ``module`` (the underlying ``nn.Module``), ``device``, ``step`` (optimizer steps done),
    ``skipped_total`` (non-finite steps dropped so far), ``rank``/``world_size``.
    """

    def __init__(self, model: nn.Module, engine: EngineConfig, optim: OptimConfig, schedule: ScheduleConfig,
                 total_steps: int, run_dir: Path, seed: int = 0):
        validate(engine, optim, schedule, total_steps)
        self.cfg, self.total_steps, self.run_dir, self.seed = engine, total_steps, Path(run_dir), seed
        seed_everything(seed)
        if engine.backend == "torch":
            from .backend_torch import TorchBackend
            self.backend = TorchBackend(model, engine, optim, schedule, total_steps)
        else:
            from .backend_deepspeed import DeepSpeedBackend
            self.backend = DeepSpeedBackend(model, engine, optim, schedule, total_steps)
        self.model, self.module, self.device = self.backend.model, self.backend.module, self.backend.device
        self.rank, self.world_size = self.backend.rank, self.backend.world_size
        self.step = 0
        self.skipped_total = 0
        self._nonfinite_in_a_row = 0
        self._closed = False
        if self.backend.checkpointing:
            log.info("activation checkpointing: %s", self.backend.checkpointing)

    # ------------------------------------------------------------------------------------------ training
    def train_step(self, micro_batches: list[dict], loss_fn: LossFn, *, advance_schedule: bool = True) -> StepResult:
        """One optimizer step over ``micro_batches`` (see the module docstring).

        ``advance_schedule=False`` trains at the current LR and leaves the LR schedule where it is (extra
        steps outside the planned schedule, e.g. a context stage repeated after a failed NIAH check)."""
        if not micro_batches:
            raise ValueError("train_step needs at least one micro-batch")
        t0 = time.perf_counter()
        lr = self.backend.current_lr()
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = torch.zeros((), dtype=torch.float64, device=self.device)
        skip = False
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with self.backend.autocast():
                loss_sum, n_tokens = loss_fn(self.model, self.backend.prepare_batch(batch))
            if loss_sum.ndim != 0:
                raise TrainingError(f"loss_fn must return a scalar loss sum, got shape {tuple(loss_sum.shape)}")
            loss_total += loss_sum.detach().double()
            tokens += n_tokens.detach().double() if torch.is_tensor(n_tokens) else float(n_tokens)
            if last:  # decide before the last backward, so a skip can poison it (see backend_deepspeed.py)
                stats = distr.all_reduce_sum(torch.stack([loss_total, tokens]))
                loss_total, tokens = stats[0], stats[1]
                skip = not bool(torch.isfinite(loss_total)) or tokens.item() <= 0
                if skip:
                    loss_sum = loss_sum * float("nan")
            self.backend.backward(loss_sum, is_last=last)
        n_tok = int(tokens.item())
        mean_loss = loss_total.item() / n_tok if n_tok > 0 else float("nan")
        grad_norm, applied = self.backend.step(grad_scale=1.0 / max(n_tok, 1), skip=skip)
        if applied:
            self.step += 1
            self._nonfinite_in_a_row = 0
            if not advance_schedule:
                self._rewind_schedule()
        else:
            self._record_skip(mean_loss, grad_norm, n_tok)
        return StepResult(loss=mean_loss, grad_norm=grad_norm, lr=lr, tokens=n_tok, skipped=not applied,
                          step_time_s=time.perf_counter() - t0)

    def _rewind_schedule(self) -> None:
        """Undo the scheduler's last step: the next step runs at the LR this one used."""
        sched = self.backend.scheduler
        sched.last_epoch -= 1
        factors = [fn(sched.last_epoch) for fn in sched.lr_lambdas]
        for group, base, factor in zip(sched.optimizer.param_groups, sched.base_lrs, factors):
            group["lr"] = base * factor
        sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]

    def _record_skip(self, loss: float, grad_norm: float, tokens: int) -> None:
        self.skipped_total += 1
        self._nonfinite_in_a_row += 1
        why = "no token in the step" if tokens <= 0 else f"loss={loss}, grad_norm={grad_norm}"
        if self.rank == 0:
            log.warning("skipped step %d (%s): %d in a row, %d in total", self.step, why,
                        self._nonfinite_in_a_row, self.skipped_total)
        if self._nonfinite_in_a_row > self.cfg.max_nonfinite_in_a_row:
            raise TrainingError(
                f"{self._nonfinite_in_a_row} non-finite steps in a row at step {self.step} ({why}), more than "
                f"engine.max_nonfinite_in_a_row={self.cfg.max_nonfinite_in_a_row}: lower the LR, check the data, "
                f"or resume from an earlier checkpoint under {ckpt.checkpoints_root(self.run_dir)}")

    @property
    def lr(self) -> float:
        """The learning rate the next step will use."""
        return self.backend.current_lr()

    # ------------------------------------------------------------------------------------------ weights
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 trainable weights on CPU, named as in the model (gathered under ZeRO-3: call on all ranks)."""
        return self.backend.trainable_state_dict(rank0_only=False)

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Overwrite the trainable weights (e.g. with a Polyak average); names as ``trainable_state_dict``
        (a collective under ZeRO-3: call on all ranks). The optimizer state is left as it is."""
        expected = self.backend.trainable_shapes()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise CheckpointError(f"load_trainable_state_dict: {len(missing)} trainable tensors missing, e.g. {missing[:3]}")
        bad = [f"{n}: {tuple(state[n].shape)} vs {expected[n]}" for n in expected if tuple(state[n].shape) != expected[n]]
        if bad:
            raise CheckpointError(f"load_trainable_state_dict: shape mismatch {bad[:3]}")
        self.backend.load_trainable_state_dict(state)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, extra_state: dict) -> Path:
        """Atomically write ``run_dir/checkpoints/step_<step>/`` and keep the last ``keep_last``; all ranks call.

        ``extra_state``: JSON-able recipe state (data position, frozen base path, ...), returned by ``resume``.
        """
        try:
            json.dumps(extra_state)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"extra_state must be JSON-serialisable: {e}") from None
        root = ckpt.checkpoints_root(self.run_dir)
        tmp_name = None
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_tmp(root)
            tmp_name = ckpt.tmp_dir_name(self.step, os.getpid())
            (root / tmp_name).mkdir()
        tmp = root / distr.broadcast_object(tmp_name)
        weights = self.backend.trainable_state_dict(rank0_only=True)
        self.backend.save_state(tmp)  # optimizer.pt, or DeepSpeed's files (every rank writes its partition)
        rng_states = distr.gather_objects(get_rng_state())
        final = None
        if self.rank == 0:
            ckpt.save_weights(weights, tmp / ckpt.WEIGHTS_FILE)
            ckpt.save_torch(self.backend.scheduler.state_dict(), tmp / ckpt.SCHEDULER_FILE)
            ckpt.save_torch({"world_size": self.world_size, "ranks": rng_states}, tmp / ckpt.RNG_FILE)
        distr.barrier()  # every rank's files are in tmp before rank 0 hashes them
        if self.rank == 0:
            final = ckpt.publish(tmp, {
                "step": self.step, "extra_state": extra_state, "backend": self.backend.name,
                "zero_stage": self.cfg.zero_stage, "world_size": self.world_size, "precision": self.cfg.precision,
                "skipped_total": self.skipped_total, "total_steps": self.total_steps})
            for old in ckpt.prune(self.run_dir, self.cfg.keep_last):
                log.info("removed old checkpoint %s", old)
        final = Path(distr.broadcast_object(str(final)))
        distr.barrier()
        return final

    def resume(self, checkpoint_dir: Path | None = None) -> dict | None:
        """Restore model, optimizer, schedule, RNG states and step; returns the checkpoint's ``extra_state``.

        Without ``checkpoint_dir``, the latest complete checkpoint under ``run_dir/checkpoints``; None when
        there is none. Raises ``CheckpointError`` on a corrupted file or a model mismatch.
        """
        folder = Path(checkpoint_dir) if checkpoint_dir is not None else ckpt.latest_complete(self.run_dir)
        if folder is None:
            return None
        state = ckpt.verify(folder)
        if state.get("backend") != self.backend.name:
            raise CheckpointError(f"{folder}: written by backend {state.get('backend')!r}, this run uses "
                                  f"{self.backend.name!r}; start from {ckpt.WEIGHTS_FILE} with "
                                  f"training.checkpoint.read_weights instead")
        self.backend.load_state(folder, state)
        self.backend.scheduler.load_state_dict(ckpt.load_torch(folder / ckpt.SCHEDULER_FILE))
        rng = ckpt.load_torch(folder / ckpt.RNG_FILE)
        ranks = rng["ranks"]
        if rng["world_size"] != self.world_size:
            log.warning("%s: RNG states of %d ranks, this run has %d: every rank takes rank 0's",
                        folder, rng["world_size"], self.world_size)
        set_rng_state(ranks[self.rank] if rng["world_size"] == self.world_size else ranks[0])
        self.step = int(state["step"])
        self.skipped_total = int(state.get("skipped_total", 0))
        self._nonfinite_in_a_row = 0
        if self.rank == 0:
            log.info("resumed from %s at step %d", folder, self.step)
        return state["extra_state"]

    # ------------------------------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Release the backend; destroys the process group if this engine created it. A second call does nothing."""
        if not self._closed:
            self._closed = True
            self.backend.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

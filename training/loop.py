"""The one training loop: what every recipe's optimizer steps go through.

A recipe hands ``fit`` a ``Task`` (its data, loss and evaluation) and an ``Engine``; the loop owns the rest:

- the global batch of step s is ``task.rows(s)`` (a list of examples, the same on every rank and a pure
  function of s, so a resumed run sees the data an uninterrupted one would);
- data parallelism: rank r of R trains on ``rows[r::R]``, so ranks see disjoint rows whose union is the
  global batch; each rank splits its share into ``engine.cfg.grad_accum_steps`` micro-batches
  (``share[k::accum]``) and ``task.collate`` turns each into tensors (in ``workers`` DataLoader processes
  when asked). One rank with accumulation a and a ranks without accumulation see the same micro-batches;
- ``Engine.train_step`` turns the micro-batches' loss sums into the exact token-weighted mean over all
  micro-batches and ranks, clips, steps, and drops non-finite steps;
- ``metrics.jsonl`` (loss, lr, grad_norm, tokens, skipped, the task's ``step_metrics``), progress output,
  evaluation every ``eval_every`` steps (``task.evaluate``; the last step is left to the recipe's final
  evaluation), checkpoints every ``checkpoint_every`` steps and at the end, and an early stop after
  ``stop_after_steps`` steps with a checkpoint that ``resume=true`` continues (the engine is closed then: the
  run ends there).

The step counter is ``state["step"]`` (optimizer steps done, data consumed); the recipe keeps whatever else it
must resume (JSON-able) in the same ``state`` dict, which every checkpoint saves.

A run whose length depends on what it measures (text pre-training: a stage whose needle-in-a-haystack check fails
trains more steps at a held LR) gives the task ``done(state)``: the loop then runs until it is true (``steps`` only
sizes the progress bar), builds each step's batches right before the step (its rows may follow ``state``), and asks
``schedule_advances(step)`` whether the LR schedule moves.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional, Protocol, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .distributed import is_rank0
from .engine import Engine, StepResult
from .errors import TrainingError
from .metrics import MetricsLogger
from .progress import Progress


class Task(Protocol):
    """What a recipe supplies to ``fit``. Only ``rows``, ``collate`` and ``loss`` are required."""

    def rows(self, step: int) -> Sequence[Any]:
        """The examples of optimizer step ``step`` for all ranks together (any picklable items)."""

    def collate(self, rows: Sequence[Any]) -> dict:
        """One micro-batch of this rank: examples -> tensors (runs in a DataLoader worker when workers > 0)."""

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, Any]:
        """(sum of the per-token losses of the micro-batch, number of tokens they cover)."""


@dataclasses.dataclass
class Cadence:
    """When the loop evaluates, checkpoints and stops (from the recipe's YAML)."""

    steps: int                               # optimizer steps of the whole run
    checkpoint_every: int = 100
    eval_every: Optional[int] = None         # None: no periodic evaluation
    stop_after_steps: Optional[int] = None   # stop early (with a checkpoint) after this many steps
    print_every: Optional[int] = None        # progress lines when not in a terminal; None: about 10 per run

    @classmethod
    def of(cls, cfg, steps: Optional[int] = None, print_every: Optional[int] = None) -> "Cadence":
        """From a recipe config's `steps`, `checkpoint_every`, `eval_every` and `stop_after_steps` (the keys every
        recipe YAML uses); `steps` overrides a step count the recipe derives (e.g. from epochs)."""
        return cls(cfg.steps if steps is None else steps, cfg.checkpoint_every, getattr(cfg, "eval_every", None),
                   cfg.stop_after_steps, print_every)


@dataclasses.dataclass
class FitResult:
    state: dict                              # the recipe's state; state["step"] = steps done
    stopped: bool                            # stop_after_steps ended the run before its last step (engine closed)
    last: Optional[StepResult]               # the last step's result (None when no step ran)
    train_time_s: float                      # wall time spent in this session's steps (data included)
    planned_steps: int

    @property
    def last_loss(self) -> float:
        return self.last.loss if self.last is not None else float("nan")

    def stopped_summary(self) -> dict:
        """What a run stopped by stop_after_steps reports (resume=true continues it)."""
        return {"stopped_at_step": self.state["step"], "planned_steps": self.planned_steps,
                "last_loss": self.last_loss}


def shard(rows: Sequence[Any], rank: int, world_size: int, grad_accum_steps: int) -> list[list[Any]]:
    """This rank's micro-batches of a global batch: rows[rank::world_size] split into grad_accum_steps parts."""
    if len(rows) < world_size * grad_accum_steps:
        raise TrainingError(f"a step of {len(rows)} examples cannot feed {world_size} ranks x "
                            f"{grad_accum_steps} micro-batches (engine.grad_accum_steps): raise the batch size")
    mine = list(rows)[rank::world_size]
    return [mine[k::grad_accum_steps] for k in range(grad_accum_steps)]


class _StepBatches(Dataset):
    """Item s = this rank's collated micro-batches of step s (a DataLoader can prepare them ahead)."""

    def __init__(self, task: Task, rank: int, world_size: int, grad_accum_steps: int):
        self.task, self.rank, self.world_size, self.accum = task, rank, world_size, grad_accum_steps

    def __len__(self) -> int:  # the sampler decides which steps are read
        raise TypeError("_StepBatches is read through an explicit sampler")

    def __getitem__(self, step: int) -> list[dict]:
        parts = shard(self.task.rows(step), self.rank, self.world_size, self.accum)
        return [self.task.collate(part) for part in parts]


def fit(engine: Engine, task: Task, cadence: Cadence, state: dict, logger: MetricsLogger, *, desc: str = "train",
        workers: int = 0, seed: int = 0) -> FitResult:
    """Train from ``state["step"]`` to ``cadence.steps`` (or the early stop); see the module docstring.

    Optional task methods: ``step_metrics() -> dict`` (extra fields of each step's record, e.g. means the loss
    function collected), ``after_step(step, result, state) -> dict | None`` (right after the step: moves the
    task's own state, e.g. snapshots for averaging; what it returns joins the step's record), ``evaluate(step) ->
    dict`` (periodic evaluation; the task restores train mode), ``done(state)`` and ``schedule_advances(step)``
    (see the module docstring)."""
    state.setdefault("step", state.pop("position", engine.step))  # checkpoints written before the loop had no "step"
    if state["step"] and is_rank0():
        print(f"herd: resumed at step {state['step']} of {cadence.steps}", flush=True)
    progress = Progress(cadence.steps, initial=state["step"],
                        print_every=cadence.print_every or max(1, cadence.steps // 10), desc=desc)
    batches = _StepBatches(task, engine.rank, engine.world_size, engine.cfg.grad_accum_steps)
    done = getattr(task, "done", None)
    if done is None:
        loader = DataLoader(batches, batch_size=None, sampler=range(state["step"], cadence.steps),
                            num_workers=workers, generator=torch.Generator().manual_seed(seed))
    elif workers:
        raise TrainingError("a task with done(state) builds each step's batches from its state: use workers=0")
    else:
        loader = (batches[state["step"]] for _ in iter(lambda: done(state), True))
    step_metrics = getattr(task, "step_metrics", None)
    evaluate = getattr(task, "evaluate", None)
    after_step = getattr(task, "after_step", None)
    schedule_advances = getattr(task, "schedule_advances", None)
    result, stopped, train_time = None, False, 0.0
    t0 = time.perf_counter()
    try:
        for micro in loader:
            advance = schedule_advances(state["step"]) if schedule_advances is not None else True
            result = engine.train_step(micro, task.loss, advance_schedule=advance)
            state["step"] += 1
            step = state["step"]
            train_time += time.perf_counter() - t0
            progress.update(step, result.loss, result.tokens)
            record = {"loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm, "tokens": result.tokens,
                      "skipped": result.skipped, **(step_metrics() if step_metrics else {})}
            if after_step is not None:
                record.update(after_step(step, result, state) or {})
            periodic = cadence.eval_every and step % cadence.eval_every == 0 and step < cadence.steps
            if evaluate is not None and periodic:
                record.update(evaluate(step))
            logger.log(step, record)
            finished = done(state) if done is not None else step == cadence.steps
            stopped = cadence.stop_after_steps is not None and step >= cadence.stop_after_steps and not finished
            if step % cadence.checkpoint_every == 0 or finished or stopped:
                engine.save_checkpoint(state)
            if stopped:
                break
            t0 = time.perf_counter()
    except BaseException:
        engine.close()  # a failed run releases its process group; the last checkpoint stays for resume=true
        raise
    finally:
        progress.close()
    if stopped:
        engine.close()
    return FitResult(state, stopped, result, round(train_time, 1), cadence.steps)

"""Plumbing shared by the post-training recipes (sft, reward_model, dpo, rejection_sampling, posttrain_demo).

- config sections: where the model and tokenizer come from, the step budget, final-model averaging;
- `load_lm` / `load_tokenizer_and_format`: an HF folder, a GGUF file, a Meta folder, or a run folder
  (its `final/`), or a preset from scratch;
- `train`: a post-training run through the one training loop (`training.loop.fit`: deterministic batches
  from the step number, so a resumed run equals an uninterrupted one; each rank trains on its share of a
  step's examples), plus averaging of the last snapshots into the final model.
Held-out evaluation (prompt files, task accuracy, noise estimates) is in experiments/text/posttrain_eval.py.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from language import Llama
from language.chat_data import DataError
from language.chat_format import ChatFormat, chat_format_for
from language.checkpoints import save_hf
from language.tokenizer import Tokenizer, load_tokenizer
from training.averaging import average_state_dicts, save_snapshot, snapshot_path
from training.config import OptimConfig
from training.distributed import is_rank0
from training.engine import Engine
from training.loop import Cadence, fit
from training.metrics import MetricsLogger, plot_curves

from ..config import ConfigError, ExistingPath
from .posttrain_eval import write_json
from ..recipes.text_pretrain import ModelSection, build_model

__all__ = ["ModelSection", "TokenizerSection", "TrainSection", "AverageSection"]


# ----------------------------------------------------------------------------------------------------
# Config sections
# ----------------------------------------------------------------------------------------------------


@dataclass
class TokenizerSection:
    path: Optional[ExistingPath] = field(default=None, metadata={
        "help": "tokenizer file or folder; null = the one next to model.init_from"})


@dataclass
class TrainSection:
    steps: Optional[int] = field(default=None, metadata={"range": (1, None), "help": "optimizer steps; null = epochs over the data"})
    epochs: float = field(default=1.0, metadata={"range": (0.0, None), "help": "passes over the data when steps is null"})
    batch_size: int = field(default=16, metadata={"range": (1, None), "help": "examples (SFT: packed rows) per optimizer step"})


@dataclass
class AverageSection:
    snapshots: int = field(default=1, metadata={"range": (1, None), "help": "final model = mean of the last N snapshots (1 = off)"})
    every: int = field(default=10, metadata={"range": (1, None), "help": "steps between those snapshots"})


def post_training_optim(lr: float) -> Callable[[], OptimConfig]:
    """Default OptimConfig factory: the given peak LR (paper: 1e-5 for SFT and DPO), no weight decay."""
    return lambda: OptimConfig(lr=lr, weight_decay=0.0)


# ----------------------------------------------------------------------------------------------------
# Models and tokenizers
# ----------------------------------------------------------------------------------------------------


def resolve_checkpoint(path) -> Path:
    """A run folder (holding final/) means its final model; anything else is used as it is."""
    path = Path(path)
    return path / "final" if (path / "final").is_dir() else path


def load_lm(section: ModelSection, vocab_size: int) -> Llama:
    """The policy / base model: `section.init_from` (resolved), else the preset from scratch."""
    if section.init_from:
        section = replace(section, init_from=str(resolve_checkpoint(section.init_from)))
    model = build_model(section, vocab_size)
    if model.config.vocab_size < vocab_size:
        raise ConfigError(f"model: vocabulary of {model.config.vocab_size} < the tokenizer's {vocab_size}")
    return model


def load_tokenizer_and_format(tok: TokenizerSection, model: ModelSection) -> tuple[Tokenizer, ChatFormat]:
    source = tok.path or (resolve_checkpoint(model.init_from) if model.init_from else None)
    if source is None:
        raise ConfigError("tokenizer.path: needed when model.init_from is null (a model from scratch)")
    try:
        tokenizer = load_tokenizer(source)
        return tokenizer, chat_format_for(tokenizer)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"tokenizer: {e}") from None


def save_lm(model_config, weights: dict[str, torch.Tensor], tokenizer: Tokenizer, folder: Path) -> Path:
    """Write trained LM weights (names as the model's) as an HF folder + the tokenizer: what the next
    stage loads with model.init_from."""
    final = Llama(model_config)
    missing, unexpected = final.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if model_config.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"final weights do not match the model: missing {missing}, unexpected {unexpected}")
    save_hf(final, folder)
    tokenizer.save(folder)
    return folder


# ----------------------------------------------------------------------------------------------------
# Deterministic data order
# ----------------------------------------------------------------------------------------------------


class EpochStream:
    """Items of epoch e come from `make_epoch(e)` (e.g. a permutation drawn from (seed, e), or packed rows);
    epochs follow each other. `take(start, n)` gives items start..start+n-1 of that endless stream, so a
    step's batch is a pure function of the step number."""

    def __init__(self, make_epoch: Callable[[int], list]):
        self.make_epoch = make_epoch
        self._epochs: list[list] = []

    def _epoch(self, e: int) -> list:
        while len(self._epochs) <= e:
            items = self.make_epoch(len(self._epochs))
            if not items:
                raise DataError("an epoch of training data is empty")
            self._epochs.append(items)
        return self._epochs[e]

    def epoch_size(self, e: int = 0) -> int:
        return len(self._epoch(e))

    def take(self, start: int, n: int) -> list:
        out, e, offset = [], 0, start
        while offset >= self.epoch_size(e):
            offset -= self.epoch_size(e)
            e += 1
        while len(out) < n:
            items = self._epoch(e)
            out += items[offset:offset + n - len(out)]
            e, offset = e + 1, 0
        return out


def permutation(n: int, seed: int, epoch: int) -> list[int]:
    return np.random.default_rng((seed, epoch)).permutation(n).tolist()


def steps_for(train: TrainSection, items_per_epoch: int) -> int:
    if train.steps is not None:
        return train.steps
    steps = math.ceil(train.epochs * items_per_epoch / train.batch_size)
    if steps < 1:
        raise ConfigError("train: epochs x data size gives no step; raise train.epochs or set train.steps")
    return steps


# ----------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------


class StepMetrics:
    """Where a loss function leaves per-step metrics (means over micro-batches) for the metrics log."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}

    def add(self, **values: float) -> None:
        for k, v in values.items():
            self.values.setdefault(k, []).append(float(v))

    def pop(self) -> dict[str, float]:
        out = {k: float(np.mean(v)) for k, v in self.values.items()}
        self.values = {}
        return out


@dataclass
class TrainResult:
    engine: Engine
    state: dict
    stopped: bool  # stop_after_steps reached before the end (the engine is closed)
    steps: int
    last_loss: float
    wall_time_s: float


@dataclass
class _PostTrainingTask:
    """The loop's view of a post-training recipe (training/loop.py): examples, collation, loss, evaluation,
    and snapshots of the last steps for averaging."""
    rows: Callable[[int], list]
    collate: Callable[[list], dict]
    loss: Callable
    run_dir: Path
    engine: Engine
    average: "AverageSection"
    total_steps: int
    evaluate_module: Optional[Callable[[torch.nn.Module], dict]] = None
    metrics: Optional[StepMetrics] = None

    def step_metrics(self) -> dict:
        return self.metrics.pop() if self.metrics else {}

    def evaluate(self, step: int) -> dict:
        return _evaluate(self.evaluate_module, self.engine.module) if self.evaluate_module else {}

    def after_step(self, step: int, result, state: dict) -> None:
        avg = self.average
        snapshot_from = self.total_steps - (avg.snapshots - 1) * avg.every
        if avg.snapshots > 1 and step >= snapshot_from and (self.total_steps - step) % avg.every == 0:
            weights = self.engine.trainable_state_dict()  # a collective under ZeRO-3: every rank calls
            path = save_snapshot(weights, self.run_dir / "average", step) if is_rank0() else \
                snapshot_path(self.run_dir / "average", step)
            state["snapshots"] = (state["snapshots"] + [str(path)])[-avg.snapshots:]


def train(cfg, run_dir: Path, model: torch.nn.Module, *, total_steps: int, rows_at: Callable[[int], list],
          collate: Callable[[list], dict], loss_fn, evaluate: Optional[Callable[[torch.nn.Module], dict]] = None,
          metrics: Optional[StepMetrics] = None) -> TrainResult:
    """Run `total_steps` optimizer steps through the training loop (training.loop.fit). `rows_at(i)` -> the
    examples of step i for all ranks (deterministic in i), `collate(examples)` -> one micro-batch;
    `evaluate(module)` -> {eval_*: value} every `cfg.eval_every` steps; `cfg` provides optim, schedule, engine,
    average, eval_every, checkpoint_every, stop_after_steps, seed, experiment."""
    t0 = time.time()
    try:
        engine = Engine(model, cfg.engine, cfg.optim, cfg.schedule, total_steps=total_steps, run_dir=run_dir,
                        seed=cfg.seed)
    except ValueError as e:
        raise ConfigError(f"{e} (this run has {total_steps} steps)") from None
    state = engine.resume() or {"step": 0, "snapshots": []}
    task = _PostTrainingTask(rows_at, collate, loss_fn, run_dir, engine, cfg.average, total_steps, evaluate, metrics)
    model.train()
    fitted = fit(engine, task, Cadence.of(cfg, steps=total_steps), state, MetricsLogger(run_dir), desc=cfg.experiment,
                 seed=cfg.seed)
    if not fitted.stopped:
        snapshots = [Path(p) for p in state["snapshots"] if Path(p).is_file()]
        if len(snapshots) > 1:
            engine.load_trainable_state_dict(average_state_dicts(snapshots))
            state["averaged_snapshots"] = len(snapshots)
    return TrainResult(engine, state, fitted.stopped, state["step"], fitted.last_loss, round(time.time() - t0, 1))


def _evaluate(evaluate, module) -> dict:
    was_training = module.training
    module.eval()
    try:
        return evaluate(module)
    finally:
        module.train(was_training)


def finish_stage(outcome, run_dir: Path, summary: dict, save: Callable[[Path], object]) -> dict:
    """The end of a finished post-training run: averaging/timing fields, `save(run_dir / "final")`, the
    summary next to the final model, the loss curve; closes the engine. Returns `summary`."""
    summary["averaged_snapshots"] = outcome.state.get("averaged_snapshots", 1)
    summary["train_wall_time_s"] = outcome.wall_time_s
    save(run_dir / "final")
    write_json(run_dir / "final" / "herd_summary.json", summary)
    if is_rank0() and (run_dir / "metrics.jsonl").is_file():
        plot_curves(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    outcome.engine.close()
    return summary

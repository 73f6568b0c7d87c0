"""Supervised fine-tuning (paper Sec 4.1.3): cross-entropy on assistant tokens only, dialogs packed.

Data: a chat JSONL (`{"messages": [...]}` per line, see language/chat_data.py). Each epoch shuffles the
dialogs (seeded) and packs them first-fit into rows of `data.seq_len` tokens; every dialog is its own
document (attention never crosses dialogs) and only its assistant content + closing token carry a loss.
Bad rows are counted and skipped with a warning naming file:line; a file of mostly bad rows stops the run.

Evaluation: greedy exact-match task accuracy on held-out prompts with reference answers (`eval.path`),
before training and at the end (plus every `eval_every` steps). The final model (optionally the average
of the last `average.snapshots` snapshots) is saved as an HF folder + tokenizer in `final/`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from language.chat_data import first_fit_rows, load_chat_jsonl, pack_rows
from training.config import EngineConfig, OptimConfig, ScheduleConfig
from training.losses import sft_loss

from ..common import RunConfig
from ..config import ConfigError, ExistingPath
from ..text.posttrain import (AverageSection, EpochStream, ModelSection, TokenizerSection, TrainSection,
                               finish_stage, load_lm, load_tokenizer_and_format, permutation, post_training_optim,
                               save_lm, steps_for, train)
from ..text.posttrain_eval import TaskEval, TaskEvalSection, report_dict


@dataclass
class DataSection:
    train: Optional[ExistingPath] = field(default=None, metadata={"help": "chat JSONL to train on (required)"})
    seq_len: int = field(default=4096, metadata={"range": (8, None), "help": "packed row length; longer dialogs are skipped"})
    max_bad_fraction: float = field(default=0.5, metadata={"range": (0.0, 1.0), "help": "stop when more rows than this are bad"})


@dataclass
class Config(RunConfig):
    recipe: str = "sft"
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=lambda: TrainSection(batch_size=8))
    eval: TaskEvalSection = field(default_factory=TaskEvalSection)
    average: AverageSection = field(default_factory=AverageSection)
    optim: OptimConfig = field(default_factory=post_training_optim(1e-5))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.1))
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval_every: int = field(default=100, metadata={"range": (1, None)})
    checkpoint_every: int = field(default=100, metadata={"range": (1, None)})
    stop_after_steps: Optional[int] = field(default=None, metadata={"range": (1, None), "help": "stop with a checkpoint (resume=true continues)"})


def packed_stream(dialogs, seq_len: int, seed: int) -> EpochStream:
    """Rows of dialog indices; epoch e packs a (seed, e) permutation of the dialogs first-fit."""
    def epoch(e):
        order = permutation(len(dialogs), seed, e)
        return [[order[i] for i in row] for row in first_fit_rows([len(dialogs[i].ids) for i in order], seq_len)]
    return EpochStream(epoch)


def sft_step_loss(model, batch: dict):
    logits = model(batch["tokens"], positions=batch["positions"], doc_ids=batch["doc_ids"])
    return sft_loss(logits, batch["labels"])


def run(cfg: Config, run_dir: Path) -> dict:
    if not cfg.data.train:
        raise ConfigError("data.train: a chat JSONL is required")
    tokenizer, fmt = load_tokenizer_and_format(cfg.tokenizer, cfg.model)
    model = load_lm(cfg.model, tokenizer.vocab_size)
    if cfg.data.seq_len > model.config.max_seq_len:
        raise ConfigError(f"data.seq_len {cfg.data.seq_len} exceeds the model's context {model.config.max_seq_len}")
    dialogs, report = load_chat_jsonl(cfg.data.train, fmt, max_len=cfg.data.seq_len,
                                      max_bad_fraction=cfg.data.max_bad_fraction)
    task_eval = TaskEval(cfg.eval, fmt, tokenizer, model.config.max_seq_len)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    stream = packed_stream(dialogs, cfg.data.seq_len, cfg.seed)
    total_steps = steps_for(cfg.train, stream.epoch_size(0))

    def rows_at(step: int) -> list:  # packed rows (lists of dialog indices)
        return stream.take(step * cfg.train.batch_size, cfg.train.batch_size)

    def collate(rows: list) -> dict:
        b = pack_rows(dialogs, rows, cfg.data.seq_len, pad_id=pad_id)
        return {"tokens": b.tokens, "labels": b.labels, "doc_ids": b.doc_ids, "positions": b.positions}

    initial = task_eval.initial(run_dir, model)
    outcome = train(cfg, run_dir, model, total_steps=total_steps, rows_at=rows_at, collate=collate,
                    loss_fn=sft_step_loss, evaluate=task_eval.metrics)
    summary = {"steps": outcome.steps, "planned_steps": total_steps, "last_loss": outcome.last_loss,
               "data": report_dict(report), "dialogs": len(dialogs), "rows_per_epoch": stream.epoch_size(0)}
    if outcome.stopped:
        return {"stopped_at_step": outcome.steps, **summary}
    summary.update(task_eval.summary(initial, task_eval.final(run_dir, outcome.engine.module)))
    weights = outcome.engine.trainable_state_dict()
    return finish_stage(outcome, run_dir, summary, lambda final: save_lm(model.config, weights, tokenizer, final))

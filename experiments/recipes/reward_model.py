"""Reward model (paper Sec 4.1.2): a scalar head on the language model, Bradley-Terry loss without margin.

Data: preference rows (`prompt`, `chosen`, `rejected`, optional `edited`) or ranked rows (`prompt`,
`responses` best first), see language/chat_data.py. Each example becomes one row: the prompt once, then
its 2-3 responses in a shuffled order (a new order every epoch), each response attending to the prompt
and itself only; the reward is read at each response's last token. Every ranked pair i < j adds
-log sigmoid(r_i - r_j) (plus `reward_penalty` * r^2 if set).

Evaluation: pairwise accuracy on held-out rows (`data.eval`): per example the fraction of its ranked pairs
ordered correctly, averaged over examples, with its standard error over examples; also the accuracy of
best vs worst. The final model is saved in `final/` as the LM (HF folder) + `reward_head.safetensors`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from language import Llama
from language.chat_data import load_preference_jsonl, reward_row
from language.reward_model import HEAD_FILE, RewardModel, collate_reward_rows
from training.config import EngineConfig, OptimConfig, ScheduleConfig
from training.losses import bradley_terry_loss, pairwise_accuracy

from ..common import RunConfig
from ..config import ConfigError, ExistingPath
from ..text.posttrain import (AverageSection, EpochStream, ModelSection, StepMetrics, TokenizerSection,
                               TrainSection, finish_stage, load_lm, load_tokenizer_and_format, permutation,
                               post_training_optim, resolve_checkpoint, steps_for, train)
from ..text.posttrain_eval import binomial_se, report_dict, write_json


EVAL_SHUFFLE = 2**31 - 1  # shuffle seeds of held-out rows: (seed, EVAL_SHUFFLE, i); training uses (seed, epoch, i)


@dataclass
class DataSection:
    train: Optional[ExistingPath] = field(default=None, metadata={"help": "preference / ranked JSONL (required)"})
    eval: Optional[ExistingPath] = field(default=None, metadata={"help": "held-out preference / ranked JSONL"})
    max_len: int = field(default=4096, metadata={"range": (8, None), "help": "longest reward row (prompt + all responses)"})
    max_bad_fraction: float = field(default=0.5, metadata={"range": (0.0, 1.0)})
    eval_batch_size: int = field(default=32, metadata={"range": (1, None)})


@dataclass
class Config(RunConfig):
    recipe: str = "reward_model"
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=lambda: TrainSection(batch_size=16))
    reward_penalty: float = field(default=0.0, metadata={"range": (0.0, None), "help": "weight of r^2 per reward (0 = off)"})
    average: AverageSection = field(default_factory=AverageSection)
    optim: OptimConfig = field(default_factory=post_training_optim(1e-5))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.1))
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval_every: int = field(default=100, metadata={"range": (1, None)})
    checkpoint_every: int = field(default=100, metadata={"range": (1, None)})
    stop_after_steps: Optional[int] = field(default=None, metadata={"range": (1, None)})


def build_reward_model(section: ModelSection, vocab_size: int) -> RewardModel:
    """A reward-model folder keeps its head; a plain LM (or a preset from scratch) gets a new one."""
    rm = RewardModel(load_lm(section, vocab_size))
    if section.init_from:
        head = resolve_checkpoint(section.init_from) / HEAD_FILE
        if head.is_file():
            rm.load_head(head)
    return rm


def save_reward_model(module: RewardModel, weights: dict, tokenizer, folder: Path) -> Path:
    """The trained weights (names as the RewardModel's) in a fresh CPU model, saved with the tokenizer;
    a frozen untied lm_head (not in `weights`) is copied from the training module."""
    final = RewardModel(Llama(module.config))
    missing, unexpected = final.load_state_dict(weights, strict=False)
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    tied = {"lm.lm_head.weight"} if module.config.tie_embeddings else set()
    if set(missing) - frozen - tied or unexpected:
        raise RuntimeError(f"final weights do not match the reward model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, p in final.named_parameters():
            if name in frozen:
                p.copy_(module.get_parameter(name).detach().cpu())
    final.save_pretrained(folder)
    tokenizer.save(folder)
    return folder


@torch.no_grad()
def pairwise_eval(rm: RewardModel, examples, *, seed: int, batch_size: int, pad_id: int) -> dict:
    """Held-out accuracy: per-example share of ranked pairs ordered correctly (ties count wrong), its mean
    and standard error over examples; best-vs-worst accuracy; total pairs."""
    was_training = rm.training
    rm.eval()
    per_example, best_vs_worst, pairs = [], [], 0
    device = rm.score.weight.device
    try:
        for start in range(0, len(examples), batch_size):
            rows = [reward_row(ex, shuffle_seed=(seed, EVAL_SHUFFLE, start + i)) for i, ex in
                    enumerate(examples[start:start + batch_size])]
            batch = {k: v.to(device) for k, v in collate_reward_rows(rows, pad_id).items()}
            rewards, valid = rm.score_rows(batch)
            for r, v in zip(rewards, valid):
                correct, n = pairwise_accuracy(r[v][None], None)
                per_example.append(int(correct) / int(n))
                pairs += int(n)
                best_vs_worst.append(float(r[v][0] > r[v][-1]))
    finally:
        rm.train(was_training)
    acc = float(np.mean(per_example))
    se = float(np.std(per_example, ddof=1) / np.sqrt(len(per_example))) if len(per_example) > 1 else float("nan")
    bw = float(np.mean(best_vs_worst))
    return {"pairwise_accuracy": acc, "std_error": se, "examples": len(per_example), "pairs": pairs,
            "best_vs_worst_accuracy": bw, "best_vs_worst_std_error": binomial_se(bw, len(best_vs_worst)),
            "above_chance": bool(acc - 0.5 > 2 * se), "per_example": per_example}


def run(cfg: Config, run_dir: Path) -> dict:
    if not cfg.data.train:
        raise ConfigError("data.train: a preference / ranked JSONL is required")
    tokenizer, fmt = load_tokenizer_and_format(cfg.tokenizer, cfg.model)
    rm = build_reward_model(cfg.model, tokenizer.vocab_size)
    max_len = min(cfg.data.max_len, rm.config.max_seq_len)
    load = dict(max_len=max_len, max_reward_len=max_len, max_bad_fraction=cfg.data.max_bad_fraction)
    examples, report = load_preference_jsonl(cfg.data.train, fmt, **load)
    eval_examples, eval_report = load_preference_jsonl(cfg.data.eval, fmt, **load) if cfg.data.eval else ([], None)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    stream = EpochStream(lambda e: [(e, i) for i in permutation(len(examples), cfg.seed, e)])
    total_steps = steps_for(cfg.train, len(examples))
    metrics = StepMetrics()

    def rows_at(step: int) -> list[tuple[int, int]]:  # (epoch, example index)
        return stream.take(step * cfg.train.batch_size, cfg.train.batch_size)

    def collate(part: list[tuple[int, int]]) -> dict:
        return collate_reward_rows([reward_row(examples[i], shuffle_seed=(cfg.seed, e, i)) for e, i in part], pad_id)

    def loss_fn(model, batch):
        rewards, valid = model.score_rows(batch)
        loss_sum, n_pairs = bradley_terry_loss(rewards, valid, reward_penalty=cfg.reward_penalty)
        correct, _ = pairwise_accuracy(rewards.detach(), valid)
        metrics.add(pair_accuracy=float(correct) / max(int(n_pairs), 1), reward_mean=float(rewards.detach()[valid].mean()))
        return loss_sum, n_pairs

    def evaluate(module) -> dict:
        if not eval_examples:
            return {}
        result = pairwise_eval(module, eval_examples, seed=cfg.seed, batch_size=cfg.data.eval_batch_size, pad_id=pad_id)
        return {"eval_pairwise_accuracy": result["pairwise_accuracy"]}

    outcome = train(cfg, run_dir, rm, total_steps=total_steps, rows_at=rows_at, collate=collate, loss_fn=loss_fn,
                    evaluate=evaluate, metrics=metrics)
    summary = {"steps": outcome.steps, "planned_steps": total_steps, "last_loss": outcome.last_loss,
               "data": report_dict(report), "train_examples": len(examples)}
    if outcome.stopped:
        return {"stopped_at_step": outcome.steps, **summary}
    module = outcome.engine.module
    if eval_examples:
        result = pairwise_eval(module, eval_examples, seed=cfg.seed, batch_size=cfg.data.eval_batch_size, pad_id=pad_id)
        write_json(run_dir / "eval_final.json", result)
        summary.update({"eval_data": report_dict(eval_report),
                        **{k: v for k, v in result.items() if k != "per_example"}})
    weights = outcome.engine.trainable_state_dict()
    return finish_stage(outcome, run_dir, summary, lambda final: save_reward_model(module, weights, tokenizer, final))

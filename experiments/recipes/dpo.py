"""Direct preference optimisation (paper Sec 4.1.4): DPO against a frozen reference, plus NLL on chosen.

Data: preference / ranked rows (language/chat_data.py); the best response is `chosen`, the worst
`rejected`. Per example: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) with sequence log-probs
summed over the response's content tokens only (header and end-of-turn / end-of-message tokens are
masked out of the DPO term), plus `nll_coef` times the per-token NLL of the chosen response (content +
closing token, as SFT trains it). The reference model (default: the starting policy) is run once over
the training data before the first step; its log-probs are kept in `reference_logprobs.pt` (a resumed
run reuses them) and the reference model is dropped.

Evaluation: greedy exact-match task accuracy on held-out prompts (`eval.path`) before and after.
The final model is saved in `final/` (HF folder + tokenizer).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from language.chat_data import load_preference_jsonl
from language.packing import IGNORE_INDEX
from training.config import EngineConfig, OptimConfig, ScheduleConfig
from training.losses import dpo_objective, token_logprobs
from training.precision import autocast, resolve_device

from ..common import RunConfig
from ..config import ConfigError, ExistingPath
from ..text.posttrain import (AverageSection, EpochStream, ModelSection, StepMetrics, TokenizerSection,
                               TrainSection, finish_stage, load_lm, load_tokenizer_and_format, permutation,
                               post_training_optim, resolve_checkpoint, save_lm, steps_for, train)
from ..text.posttrain_eval import TaskEval, TaskEvalSection, report_dict

REFERENCE_FILE = "reference_logprobs.pt"


@dataclass
class DataSection:
    train: Optional[ExistingPath] = field(default=None, metadata={"help": "preference / ranked JSONL (required)"})
    max_len: int = field(default=4096, metadata={"range": (8, None), "help": "longest prompt + response"})
    max_bad_fraction: float = field(default=0.5, metadata={"range": (0.0, 1.0)})


@dataclass
class Config(RunConfig):
    recipe: str = "dpo"
    model: ModelSection = field(default_factory=ModelSection)
    reference: Optional[ExistingPath] = field(default=None, metadata={"help": "frozen reference model; null = the starting policy"})
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    beta: float = field(default=0.1, metadata={"range": (0.0, None), "help": "DPO temperature (paper: 0.1)"})
    nll_coef: float = field(default=0.2, metadata={"range": (0.0, None), "help": "weight of the chosen response's NLL (paper: 0.2)"})
    train: TrainSection = field(default_factory=lambda: TrainSection(batch_size=16))
    eval: TaskEvalSection = field(default_factory=TaskEvalSection)
    average: AverageSection = field(default_factory=AverageSection)
    optim: OptimConfig = field(default_factory=post_training_optim(1e-5))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.1))
    engine: EngineConfig = field(default_factory=EngineConfig)
    reference_batch_size: int = field(default=32, metadata={"range": (1, None), "help": "pairs per reference forward"})
    eval_every: int = field(default=100, metadata={"range": (1, None)})
    checkpoint_every: int = field(default=100, metadata={"range": (1, None)})
    stop_after_steps: Optional[int] = field(default=None, metadata={"range": (1, None)})


def collate_pairs(examples, pad_id: int) -> dict[str, torch.Tensor]:
    """B examples -> 2B right-padded rows (chosen rows first, then rejected):
    tokens (2B, T); labels (2B, T) next-token targets on response tokens (content + closer), else -100;
    dpo_mask (2B, T) True where the label is a content token (no header, no closing token)."""
    seqs = [ex.sequence(0) for ex in examples] + [ex.sequence(len(ex.responses) - 1) for ex in examples]
    t = max(len(s.ids) for s in seqs)
    tokens = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), t), IGNORE_INDEX, dtype=torch.long)
    dpo_mask = torch.zeros((len(seqs), t), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids = torch.tensor(s.ids, dtype=torch.long)
        n = len(s.ids)
        tokens[i, :n] = ids
        target = torch.tensor(s.target_mask[1:], dtype=torch.bool)
        labels[i, :n - 1] = torch.where(target, ids[1:], IGNORE_INDEX)
        dpo_mask[i, :n - 1] = torch.tensor(s.content_mask[1:], dtype=torch.bool)
    return {"tokens": tokens, "labels": labels, "dpo_mask": dpo_mask}


def pair_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> DPO log-probs of chosen (B,) and rejected (B,), chosen NLL sum (B,) and its token count (B,)."""
    logits = model(batch["tokens"])
    per_token = token_logprobs(logits, batch["labels"])                   # (2B, T), 0 where no label
    dpo = (per_token * batch["dpo_mask"]).sum(1)
    b = per_token.shape[0] // 2
    nll_mask = batch["labels"][:b] != IGNORE_INDEX
    return dpo[:b], dpo[b:], -(per_token[:b] * nll_mask).sum(1), nll_mask.sum(1)


@torch.no_grad()
def reference_logprobs(reference, examples, *, batch_size: int, pad_id: int, precision: str = "fp32") -> torch.Tensor:
    """(N, 2) content log-probs of chosen and rejected under the frozen reference model (run under the
    same precision as the policy's training forward)."""
    reference.eval()
    device = next(reference.parameters()).device
    out = []
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate_pairs(examples[start:start + batch_size], pad_id).items()}
        with autocast(device, precision):
            chosen, rejected, _, _ = pair_logprobs(reference, batch)
        out.append(torch.stack([chosen, rejected], 1).float().cpu())
    return torch.cat(out)


def run(cfg: Config, run_dir: Path) -> dict:
    if not cfg.data.train:
        raise ConfigError("data.train: a preference / ranked JSONL is required")
    tokenizer, fmt = load_tokenizer_and_format(cfg.tokenizer, cfg.model)
    policy = load_lm(cfg.model, tokenizer.vocab_size)
    max_len = min(cfg.data.max_len, policy.config.max_seq_len)
    examples, report = load_preference_jsonl(cfg.data.train, fmt, max_len=max_len,
                                             max_bad_fraction=cfg.data.max_bad_fraction)
    task_eval = TaskEval(cfg.eval, fmt, tokenizer, policy.config.max_seq_len)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    ref = _reference(cfg, run_dir, policy, examples, pad_id, tokenizer.vocab_size)
    stream = EpochStream(lambda e: permutation(len(examples), cfg.seed, e))
    total_steps = steps_for(cfg.train, len(examples))
    metrics = StepMetrics()

    def rows_at(step: int) -> list[int]:
        return stream.take(step * cfg.train.batch_size, cfg.train.batch_size)

    def collate(part: list[int]) -> dict:
        return {**collate_pairs([examples[i] for i in part], pad_id), "reference": ref[part]}

    def loss_fn(model, batch):
        chosen, rejected, nll_sum, n_tokens = pair_logprobs(model, batch)
        ref_logps = batch["reference"]
        loss_sum, n, values = dpo_objective(chosen, rejected, ref_logps[:, 0], ref_logps[:, 1], nll_sum, n_tokens,
                                            beta=cfg.beta, nll_coef=cfg.nll_coef)
        metrics.add(**values)
        return loss_sum, n

    initial = task_eval.initial(run_dir, policy)
    outcome = train(cfg, run_dir, policy, total_steps=total_steps, rows_at=rows_at, collate=collate, loss_fn=loss_fn,
                    evaluate=task_eval.metrics, metrics=metrics)
    summary = {"steps": outcome.steps, "planned_steps": total_steps, "last_loss": outcome.last_loss,
               "data": report_dict(report), "pairs": len(examples), "beta": cfg.beta, "nll_coef": cfg.nll_coef}
    if outcome.stopped:
        return {"stopped_at_step": outcome.steps, **summary}
    summary.update(task_eval.summary(initial, task_eval.final(run_dir, outcome.engine.module)))
    weights = outcome.engine.trainable_state_dict()
    return finish_stage(outcome, run_dir, summary, lambda final: save_lm(policy.config, weights, tokenizer, final))


def _reference(cfg: Config, run_dir: Path, policy, examples, pad_id: int, vocab_size: int) -> torch.Tensor:
    """Reference log-probs (N, 2), computed once and kept in the run folder."""
    path = run_dir / REFERENCE_FILE
    if path.is_file():
        ref = torch.load(path, weights_only=True)
        if ref.shape == (len(examples), 2):
            return ref
        print(f"herd: {path} does not match the data ({tuple(ref.shape)}); recomputing", flush=True)
    if cfg.reference:
        from dataclasses import replace
        model = load_lm(replace(cfg.model, init_from=str(resolve_checkpoint(cfg.reference))), vocab_size)
    else:
        model = copy.deepcopy(policy)  # the starting policy, before any step
    ref = reference_logprobs(model.to(resolve_device(cfg.engine.device)), examples,
                             batch_size=cfg.reference_batch_size, pad_id=pad_id, precision=cfg.engine.precision)
    del model
    tmp = path.with_suffix(".tmp")
    torch.save(ref, tmp)
    tmp.replace(path)
    return ref

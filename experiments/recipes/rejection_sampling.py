"""Rejection sampling (paper Sec 4.2.2): K samples per prompt, scored by the reward model, best kept.

Per batch of prompts: the prompts are prefilled once and their KV cache is shared by the K samples of
each (language/sampling.py); each prompt's samples are then scored in one reward row (the prompt once,
every sample attending to the prompt and itself, language/reward_model.py). The best-scoring complete
sample (it ended with a stop token and is not blank) becomes an SFT row.

Outputs in the run folder:
  best.jsonl     new SFT data: {"messages": prompt + [best sample], "score": ...}
  pairs.jsonl    preference rows: best vs worst-scoring distinct sample (for DPO / the next RM)
  samples.jsonl  every sample with its score (and correctness when the prompt row had a reference)
  scores.png     histogram of all sample scores vs the chosen ones; metrics.jsonl per batch
When prompts carry reference answers, the summary compares the accuracy of the chosen samples with that
of plain samples (the mean over all K), with the standard error of the per-prompt difference.
Resumable: progress is checkpointed every `checkpoint_every` batches; the same seed gives the same files.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from language.chat_data import RankedExample, Response, reward_row
from language.chat_format import Message, RenderedDialog
from language.reward_model import RewardModel, collate_reward_rows
from language.sampling import sample_k
from language.synthetic_tasks import is_correct
from training.metrics import MetricsLogger
from training.precision import resolve_device
from training.progress import Progress

from ..common import RunConfig
from ..config import ConfigError, ExistingPath
from ..text.posttrain import ModelSection, TokenizerSection, load_lm, load_tokenizer_and_format, resolve_checkpoint
from ..text.posttrain_eval import load_prompts, paired_improvement, report_dict, write_json


@dataclass
class DataSection:
    prompts: Optional[ExistingPath] = field(default=None, metadata={"help": "prompt JSONL (a trailing assistant turn = reference answer); required"})
    max_prompts: Optional[int] = field(default=None, metadata={"range": (1, None), "help": "use the first N prompts"})
    max_bad_fraction: float = field(default=0.5, metadata={"range": (0.0, 1.0)})


@dataclass
class SamplingSection:
    k: int = field(default=10, metadata={"range": (1, None), "help": "samples per prompt (paper: 10-30)"})
    temperature: float = field(default=1.0, metadata={"range": (0.0, None)})
    top_p: float = field(default=1.0, metadata={"range": (0.0, 1.0)})
    max_new_tokens: int = field(default=256, metadata={"range": (1, None)})
    prompts_per_batch: int = field(default=8, metadata={"range": (1, None), "help": "prompts decoded together (x k rows)"})
    score_batch_size: int = field(default=8, metadata={"range": (1, None), "help": "reward rows per reward-model forward"})


@dataclass
class Config(RunConfig):
    recipe: str = "rejection_sampling"
    model: ModelSection = field(default_factory=ModelSection)
    reward_model: Optional[ExistingPath] = field(default=None, metadata={"help": "reward-model folder (required)"})
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    checkpoint_every: int = field(default=10, metadata={"range": (1, None), "help": "batches between progress checkpoints"})
    stop_after_batches: Optional[int] = field(default=None, metadata={"range": (1, None)})


OUTPUTS = ("samples.jsonl", "best.jsonl", "pairs.jsonl")


def response_for(fmt, prompt_messages: list[Message], prompt: RenderedDialog, text: str) -> Optional[Response]:
    """The sample as a rendered assistant response after the prompt, or None when it cannot be one
    (blank, or the rendering does not extend the prompt)."""
    if not text.strip():
        return None
    try:
        full = fmt.render(prompt_messages + [Message("assistant", text)])
    except ValueError:
        return None
    n = len(prompt.ids)
    if full.ids[:n] != prompt.ids or len(full.ids) == n:
        return None
    return Response(full.ids[n:], full.target_mask[n:], full.content_mask[n:])


@torch.no_grad()
def score_samples(rm: RewardModel, prompts: list[RenderedDialog], responses: list[list[Optional[Response]]], *,
                  batch_size: int, pad_id: int, seed) -> list[list[Optional[float]]]:
    """Rewards per sample (None where the response is None). A prompt's responses share one reward row, split
    into several rows when prompt + all of them exceed the reward model's context."""
    rows, where = [], []  # where[r] = (prompt index, sample indices of row r)
    limit = rm.config.max_seq_len
    for p, (prompt, resp) in enumerate(zip(prompts, responses)):
        group, length = [], len(prompt.ids)
        for j, r in enumerate(resp):
            if r is None or len(prompt.ids) + len(r.ids) > limit:
                continue
            if group and length + len(r.ids) > limit:
                rows.append(RankedExample(prompt, [resp[i] for i in group]))
                where.append((p, group))
                group, length = [], len(prompt.ids)
            group.append(j)
            length += len(r.ids)
        if group:
            rows.append(RankedExample(prompt, [resp[i] for i in group]))
            where.append((p, group))
    scores: list[list[Optional[float]]] = [[None] * len(r) for r in responses]
    device = rm.score.weight.device
    rm.eval()
    for start in range(0, len(rows), batch_size):
        chunk = [reward_row(ex, shuffle_seed=(*seed, start + i)) for i, ex in enumerate(rows[start:start + batch_size])]
        rewards, valid = rm.score_rows({k: v.to(device) for k, v in collate_reward_rows(chunk, pad_id).items()})
        for (p, group), r, v in zip(where[start:start + batch_size], rewards.tolist(), valid.tolist()):
            for slot, j in enumerate(group):  # rank order = the order the responses were given in
                scores[p][j] = r[slot] if v[slot] else None
    return scores


def run(cfg: Config, run_dir: Path) -> dict:
    if not cfg.data.prompts:
        raise ConfigError("data.prompts: a prompt JSONL is required")
    if not cfg.reward_model:
        raise ConfigError("reward_model: the folder of a trained reward model is required")
    tokenizer, fmt = load_tokenizer_and_format(cfg.tokenizer, cfg.model)
    device = resolve_device(cfg.device)
    policy = load_lm(cfg.model, tokenizer.vocab_size).to(device).eval()
    try:
        rm = RewardModel.from_pretrained(resolve_checkpoint(cfg.reward_model), device=device).eval()
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"reward_model: {e}") from None
    if rm.config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"reward_model: its vocabulary ({rm.config.vocab_size}) is smaller than the tokenizer's "
                          f"({tokenizer.vocab_size}); it was trained with another tokenizer")
    s = cfg.sampling
    if s.max_new_tokens >= policy.config.max_seq_len:
        raise ConfigError(f"sampling.max_new_tokens {s.max_new_tokens} leaves no room for a prompt")
    prompts, report = load_prompts(cfg.data.prompts, fmt, max_prompt_len=policy.config.max_seq_len - s.max_new_tokens,
                                   max_bad_fraction=cfg.data.max_bad_fraction)
    prompts = prompts[:cfg.data.max_prompts]
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    n_batches = -(-len(prompts) // s.prompts_per_batch)
    done = _resume(run_dir, cfg.resume)
    logger = MetricsLogger(run_dir)
    progress = Progress(n_batches, initial=done, print_every=max(1, n_batches // 10), desc=cfg.experiment)
    for b in range(done, n_batches):
        chunk = prompts[b * s.prompts_per_batch:(b + 1) * s.prompts_per_batch]
        samples = sample_k(policy, [p.ids for p in chunk], k=s.k, max_new_tokens=s.max_new_tokens,
                           temperature=s.temperature, top_p=s.top_p, stop_ids=fmt.stop_ids,
                           seed=cfg.seed * 1_000_003 + b, pad_id=pad_id)
        texts = [[tokenizer.decode(x.ids, skip_special=True) for x in row] for row in samples]
        rendered = [RenderedDialog(p.ids, [False] * len(p.ids), [False] * len(p.ids)) for p in chunk]
        responses = [[response_for(fmt, p.messages, r, t) for t in row] for p, r, row in zip(chunk, rendered, texts)]
        scores = score_samples(rm, rendered, responses, batch_size=s.score_batch_size, pad_id=pad_id, seed=(cfg.seed, b))
        records = [_record(p, row_texts, row_samples, row_scores)
                   for p, row_texts, row_samples, row_scores in zip(chunk, texts, samples, scores)]
        _append(run_dir, records)
        valid = [x for r in records for x in r["scores"] if x is not None]
        logger.log(b + 1, {"score_mean": float(np.mean(valid)) if valid else float("nan"),
                           "best_score_mean": _mean([r["best_score"] for r in records if r["best"] is not None])})
        progress.update(b + 1, float(np.mean(valid)) if valid else float("nan"), sum(len(x.ids) for row in samples for x in row))
        stop = cfg.stop_after_batches is not None and b + 1 >= cfg.stop_after_batches and b + 1 < n_batches
        if (b + 1) % cfg.checkpoint_every == 0 or b + 1 == n_batches or stop:
            _checkpoint(run_dir, b + 1)
        if stop:
            progress.close()
            return {"stopped_at_batch": b + 1, "batches": n_batches}
    progress.close()
    summary = summarize(run_dir, s.k)
    summary["data"] = report_dict(report)
    write_json(run_dir / "rejection_sampling_summary.json", summary)
    return summary


def _record(prompt, texts: list[str], samples, scores: list[Optional[float]]) -> dict:
    candidates = [j for j, (x, sc) in enumerate(zip(samples, scores)) if sc is not None and x.stopped]
    best = max(candidates, key=lambda j: scores[j]) if candidates else None
    record = {"line": prompt.line, "kind": prompt.kind, "prompt": [m.__dict__ for m in prompt.messages],
              "samples": texts, "scores": scores, "stopped": [x.stopped for x in samples], "best": best,
              "best_score": scores[best] if best is not None else None}
    if prompt.reference is not None:
        record["reference"] = prompt.reference
        record["correct"] = [is_correct(prompt.reference, t) for t in texts]
    return record


def _append(run_dir: Path, records: list[dict]) -> None:
    with open(run_dir / "samples.jsonl", "a") as f_all, open(run_dir / "best.jsonl", "a") as f_best, \
            open(run_dir / "pairs.jsonl", "a") as f_pairs:
        for r in records:
            f_all.write(json.dumps(r) + "\n")
            if r["best"] is None:
                continue
            prompt = [{"role": m["role"], "content": m["content"]} for m in r["prompt"]]
            best_text = r["samples"][r["best"]]
            f_best.write(json.dumps({"messages": prompt + [{"role": "assistant", "content": best_text}],
                                     "score": r["best_score"], "kind": r["kind"]}) + "\n")
            others = [j for j, sc in enumerate(r["scores"]) if sc is not None
                      and r["samples"][j].strip() != best_text.strip()]
            if others:
                worst = min(others, key=lambda j: r["scores"][j])
                f_pairs.write(json.dumps({"prompt": prompt, "chosen": {"role": "assistant", "content": best_text},
                                          "rejected": {"role": "assistant", "content": r["samples"][worst]},
                                          "kind": r["kind"]}) + "\n")


def _checkpoint(run_dir: Path, batches_done: int) -> None:
    """checkpoints/step_<batches>/state.json with the output files' sizes (written atomically)."""
    root = run_dir / "checkpoints"
    root.mkdir(exist_ok=True)
    final = root / f"step_{batches_done:08d}"
    tmp = root / f"step_{batches_done:08d}.tmp-{os.getpid()}"
    tmp.mkdir()
    sizes = {name: (run_dir / name).stat().st_size for name in OUTPUTS}
    (tmp / "state.json").write_text(json.dumps({"batches_done": batches_done, "sizes": sizes}))
    os.replace(tmp, final)
    for old in root.iterdir():
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def _resume(run_dir: Path, resume) -> int:
    """Batches already done; output files are cut back to the last checkpoint (a crash mid-batch)."""
    root = run_dir / "checkpoints"
    states = sorted(root.glob("step_*/state.json")) if resume and root.is_dir() else []
    if not states:
        for name in OUTPUTS:
            (run_dir / name).write_text("")
        return 0
    state = json.loads(states[-1].read_text())
    for name, size in state["sizes"].items():
        with open(run_dir / name, "r+b") as f:
            f.truncate(size)
    print(f"herd: resumed after {state['batches_done']} batches", flush=True)
    return int(state["batches_done"])


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _stats(values) -> dict:
    v = np.asarray(values, dtype=float)
    if not len(v):
        return {"n": 0}
    p10, p50, p90 = np.percentile(v, [10, 50, 90])
    return {"n": len(v), "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "p10": float(p10),
            "median": float(p50), "p90": float(p90), "max": float(v.max())}


def summarize(run_dir: Path, k: int) -> dict:
    """Counts, score distribution (all samples vs chosen) with a histogram, and accuracy when references exist."""
    records = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines() if line]
    all_scores = [x for r in records for x in r["scores"] if x is not None]
    best_scores = [r["best_score"] for r in records if r["best"] is not None]
    summary = {"prompts": len(records), "k": k, "samples": sum(len(r["samples"]) for r in records),
               "kept": len(best_scores), "no_valid_sample": len(records) - len(best_scores),
               "unfinished_samples": sum(not s for r in records for s in r["stopped"]),
               "scores_all": _stats(all_scores), "scores_best": _stats(best_scores)}
    judged = [r for r in records if "correct" in r and r["best"] is not None]
    if judged:
        best = [float(r["correct"][r["best"]]) for r in judged]
        mean_sample = [float(np.mean(r["correct"])) for r in judged]
        summary.update({
            "accuracy_best_of_k": float(np.mean(best)),
            "accuracy_plain_sample": float(np.mean(mean_sample)),
            "accuracy_first_sample": float(np.mean([float(r["correct"][0]) for r in judged])),
            "accuracy_any_of_k": float(np.mean([float(any(r["correct"])) for r in judged])),
            "best_vs_plain": paired_improvement(best, mean_sample) if len(judged) > 1 else None})
    _histogram(all_scores, best_scores, run_dir / "scores.png")
    return summary


def _histogram(all_scores, best_scores, path: Path) -> None:
    if not all_scores:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(min(all_scores), max(all_scores) + 1e-6, 30)
    ax.hist(all_scores, bins=bins, alpha=0.6, label=f"all samples ({len(all_scores)})")
    ax.hist(best_scores, bins=bins, alpha=0.6, label=f"kept, best of K ({len(best_scores)})")
    ax.set_xlabel("reward")
    ax.set_ylabel("count")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

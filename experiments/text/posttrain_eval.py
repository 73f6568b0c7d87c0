"""Held-out evaluation shared by the post-training recipes: prompt files with reference answers, greedy
exact-match task accuracy, and the noise estimates the summaries report.

    prompts, report = load_prompts("eval.jsonl", fmt, max_prompt_len=224)  # bad rows: as language.chat_data
    result = task_accuracy(model, prompts, fmt, tokenizer, max_new_tokens=32)
    paired_improvement(after["correct"], before["correct"])               # mean, std error, passed
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from language.chat_data import BadRow, DataError, LoadReport, load_jsonl_rows
from language.chat_format import ChatFormat, Message
from language.generation import generate
from language.synthetic_tasks import is_correct
from language.tokenizer import Tokenizer
from training.distributed import is_rank0

from ..config import ConfigError, ExistingPath


@dataclass
class TaskEvalSection:
    path: Optional[ExistingPath] = field(default=None, metadata={"help": "held-out chat JSONL whose last assistant turn is the reference answer"})
    max_examples: int = field(default=200, metadata={"range": (1, None)})
    max_new_tokens: int = field(default=32, metadata={"range": (1, None)})
    batch_size: int = field(default=64, metadata={"range": (1, None), "help": "prompts per generation batch"})


def report_dict(report: LoadReport) -> dict:
    return {"path": report.path, "rows": report.total, "kept": report.kept,
            "skipped": {k: v for k, v in report.counts.items() if v}}


def write_json(path: Path, data) -> None:
    if is_rank0():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------------------------------
# Prompts with reference answers, and task accuracy
# ----------------------------------------------------------------------------------------------------


@dataclass
class PromptExample:
    messages: list[Message]  # the prompt (no trailing assistant turn)
    ids: list[int]  # rendered with the assistant generation header
    reference: Optional[str]  # the reference answer, if the row had one
    line: int
    kind: str = ""


def _prompt_row(row: dict, fmt: ChatFormat, max_prompt_len: int) -> tuple[list[Message], list[int], Optional[str]]:
    raw = row.get("messages", row.get("prompt"))
    if not isinstance(raw, list) or not raw:
        raise BadRow("malformed", "needs 'messages' (or 'prompt'): a non-empty list of messages")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRow("malformed", f"message {i} needs string 'role' and 'content'")
        messages.append(Message(m["role"], m["content"]))
    reference = None
    if messages[-1].role == "assistant":
        reference = messages.pop().content
        if not reference.strip():
            raise BadRow("empty_assistant", "the reference answer (last assistant turn) is empty")
    if not messages:
        raise BadRow("malformed", "no prompt before the reference answer")
    roles = getattr(fmt, "ROLES", None)
    unknown = [m.role for m in messages if roles is not None and m.role not in roles]
    if unknown:
        raise BadRow("unknown_role", f"unknown role {unknown[0]!r}; this chat format knows {list(roles)}")
    try:
        ids = fmt.render(messages, add_generation_prompt=True).ids
    except ValueError as e:
        raise BadRow("unknown_role" if "unknown role" in str(e) else "render_error", str(e)) from None
    if len(ids) > max_prompt_len:
        raise BadRow("too_long", f"the prompt has {len(ids)} tokens > {max_prompt_len} (context minus max_new_tokens)")
    return messages, ids, reference


def load_prompts(path, fmt: ChatFormat, *, max_prompt_len: int, max_bad_fraction: float = 0.5
                 ) -> tuple[list[PromptExample], LoadReport]:
    """Rows `{"messages": [...]}` or `{"prompt": [...]}`; a trailing assistant turn is the reference answer;
    an optional "kind" labels the row. Bad rows: counted, skipped with a `DataWarning` naming file:line;
    more than `max_bad_fraction` bad rows -> `DataError` (as `language.chat_data` loaders)."""
    def parse(row: dict, line: int) -> PromptExample:
        messages, ids, reference = _prompt_row(row, fmt, max_prompt_len)
        return PromptExample(messages, ids, reference, line, str(row.get("kind", "")))
    return load_jsonl_rows(path, parse, max_bad_fraction)


@torch.no_grad()
def task_accuracy(model, examples: list[PromptExample], fmt: ChatFormat, tokenizer: Tokenizer, *,
                  max_new_tokens: int, batch_size: int = 64) -> dict:
    """Greedy answers to `examples` (all with references) scored by exact match (whitespace-stripped).
    Returns accuracy, its binomial std error, n, per-kind accuracy and the per-example `correct` list."""
    if any(e.reference is None for e in examples):
        raise DataError("task accuracy needs a reference answer (last assistant turn) on every eval row")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    correct: list[bool] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        outs = generate(model, [e.ids for e in chunk], max_new_tokens=max_new_tokens, stop_ids=fmt.stop_ids,
                        pad_id=pad)
        correct += [is_correct(e.reference, tokenizer.decode(o, skip_special=True)) for e, o in zip(chunk, outs)]
    kinds: dict[str, list[bool]] = {}
    for e, c in zip(examples, correct):
        kinds.setdefault(e.kind or "all", []).append(c)
    acc = float(np.mean(correct)) if correct else float("nan")
    return {"accuracy": acc, "std_error": binomial_se(acc, len(correct)), "n": len(correct),
            "by_kind": {k: float(np.mean(v)) for k, v in sorted(kinds.items())}, "correct": correct}


class TaskEval:
    """Held-out task accuracy of a model on `section.path` (prompts with reference answers).

    `metrics(module)` -> {"eval_accuracy": ...} for the metrics log; `initial` / `final` also write the
    full result (per-example `correct`) to run_dir/eval_initial.json / eval_final.json (a resumed run
    reads the initial one back instead of re-evaluating a model that has moved on)."""

    def __init__(self, section: TaskEvalSection, fmt: ChatFormat, tokenizer: Tokenizer, context_len: int):
        self.section, self.fmt, self.tokenizer = section, fmt, tokenizer
        self.examples: list[PromptExample] = []
        self.report: Optional[LoadReport] = None
        if section.path:
            if section.max_new_tokens >= context_len:
                raise ConfigError(f"eval.max_new_tokens {section.max_new_tokens} leaves no room for a prompt "
                                  f"in the model's context of {context_len}")
            self.examples, self.report = load_prompts(section.path, fmt,
                                                      max_prompt_len=context_len - section.max_new_tokens)
            self.examples = self.examples[:section.max_examples]

    def __bool__(self) -> bool:
        return bool(self.examples)

    def run(self, module) -> dict:
        was_training = module.training
        module.eval()
        try:
            return task_accuracy(module, self.examples, self.fmt, self.tokenizer,
                                 max_new_tokens=self.section.max_new_tokens, batch_size=self.section.batch_size)
        finally:
            module.train(was_training)

    def metrics(self, module) -> dict:
        return {"eval_accuracy": self.run(module)["accuracy"]} if self else {}

    def initial(self, run_dir: Path, module) -> Optional[dict]:
        if not self:
            return None
        path = Path(run_dir) / "eval_initial.json"
        if path.is_file():
            return json.loads(path.read_text())
        result = self.run(module)
        write_json(path, result)
        return result

    def final(self, run_dir: Path, module) -> Optional[dict]:
        if not self:
            return None
        result = self.run(module)
        write_json(Path(run_dir) / "eval_final.json", result)
        return result

    def summary(self, initial: Optional[dict], final: Optional[dict]) -> dict:
        """Accuracy before/after with noise estimates, for a recipe's summary."""
        if not self or final is None:
            return {}
        out = {"eval_data": report_dict(self.report), "eval_examples": final["n"],
               "accuracy_final": final["accuracy"], "accuracy_final_std_error": final["std_error"],
               "accuracy_by_kind": final["by_kind"]}
        if initial is not None:
            out["accuracy_initial"] = initial["accuracy"]
            out["improvement"] = paired_improvement(final["correct"], initial["correct"])
        return out


# ----------------------------------------------------------------------------------------------------
# Noise estimates
# ----------------------------------------------------------------------------------------------------


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def paired_improvement(after, before, *, z: float = 2.0) -> dict:
    """Mean of per-example differences (after - before, e.g. 0/1 correctness on the same prompts), its
    standard error over examples, and `passed`: the mean exceeds `z` standard errors (and 0)."""
    d = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError("paired_improvement needs two equally long sequences of at least 2 values")
    mean = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(len(d)))
    return {"before": float(np.mean(before)), "after": float(np.mean(after)), "improvement": mean,
            "std_error": se, "n": len(d), "z": mean / se if se > 0 else (math.inf if mean > 0 else 0.0),
            "passed": bool(mean > 0 and mean > z * se)}

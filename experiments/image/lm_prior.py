"""Text-only pre-training of an image model's random language model on the task's own text (questions and answers,
or captions), before the adapters train.

The paper's adapters join a capable frozen LM that already knows language and the answer priors of a question
("How many ...?" -> a number). A random tiny LM knows neither, so the gated cross-attention path, the only thing
that trains, first learns those text priors itself, as constant image-independent outputs, and never the image
(measured: quickstart.yaml's comment). This stage gives the LM the text first: the training samples in the exact
prompt layout with the `<|image|>` token and the image dropped (= the recipe's `blind` control), loss on the same
labelled tokens. Afterwards the LM is frozen again; what the adapters can still add is what only the image holds.

What the LM may learn there is a choice (`redraw_answers`). Each question's own answer (0, the default) also teaches
it which colour goes with which shape in the training scenes, a prior the held-out colour-shape pairs contradict
(it answers them ~0% blind, and the adapters must overturn it). A redrawn answer comes from the training answers of
questions of the same form (the question with its colour and shape words masked: "What shape is the _ object?"),
so at 1 the LM learns what a question asks for and its answer frequencies, not the scenes' attribute
co-occurrences; in between, those co-occurrences are only a leaning. Measured on the image quickstart
(experiments/image/quickstart.yaml): at 1, held-out shape answers rise (27-38% -> 56-60%) but yes/no falls to chance.

Batches come from the training samples at their own seeded positions (never the global RNG), so the stage is
reproducible, and a resumed run loads the saved LM instead of repeating it.
"""
from __future__ import annotations

import random
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import torch

from training.schedule import lr_factor


@dataclass
class PriorPretrainSection:
    steps: int = field(default=0, metadata={"range": (0, None), "help": "text-only steps of a preset LM; 0 = off"})
    lr: float = field(default=3e-3, metadata={"range": (0.0, 1.0), "help": "peak AdamW learning rate"})
    warmup_steps: int = field(default=20, metadata={"range": (0, None)})
    batch_size: int = field(default=32, metadata={"range": (1, None), "help": "samples per step"})
    seed: int = field(default=0, metadata={"help": "which questions of a sample are asked"})
    redraw_answers: float = field(default=0.0, metadata={
        "range": (0.0, 1.0), "help": "fraction of answers redrawn from the training answers of questions of the "
                                     "same form (colour/shape words masked): 1 = the LM learns no co-occurrences"})


class AnswersByForm:
    """Answers pooled per question form: the question with the given attribute words (and their plurals) masked,
    "What shape is the _ object?". redraw(qa, rng) -> the QA with an answer drawn from its form's pool (training
    frequencies); a form outside the pools keeps its answer."""

    def __init__(self, qas: Iterable, words: Iterable[str]):
        alternatives = sorted(set(words), key=len, reverse=True)  # longest first: no word masks part of one
        alternation = "|".join(map(re.escape, alternatives))
        self._pattern = re.compile(rf"\b(?:{alternation})(?:es|s)?\b") if alternatives else None  # plurals too
        self.pools: dict[str, list[str]] = defaultdict(list)
        for qa in qas:
            self.pools[self.form(qa.question)].append(qa.answer)

    def form(self, question: str) -> str:
        return self._pattern.sub("_", question) if self._pattern else question

    def redraw(self, qa, rng: random.Random):
        pool = self.pools.get(self.form(qa.question))
        return replace(qa, answer=rng.choice(pool)) if pool else qa


def without_image(sample: dict, image_token_id: int) -> dict:
    """A training sample {"tokens", "labels", "images", "id"} with its `<|image|>` tokens and images removed."""
    keep = [i for i, t in enumerate(sample["tokens"]) if t != image_token_id]
    return {"tokens": [sample["tokens"][i] for i in keep], "labels": [sample["labels"][i] for i in keep],
            "images": [], "id": sample.get("id")}


def prior_pretrain(model, batch_at: Callable[[int, random.Random], dict], loss_fn, section: PriorPretrainSection,
                   log: Callable[[str], None] = print) -> dict:
    """Train model.language_model (a `language.Llama` inside a MultimodalModel) for section.steps steps on
    text-only batches; batch_at(step, rng) -> a collated batch without images. Leaves every LM parameter frozen
    and the LM in eval mode. Returns {"prior_loss_first", "prior_loss_last" (per-token loss, mean of the first /
    last 10 steps), "seconds"}."""
    lm = model.language_model
    t0 = time.time()
    rng = random.Random(section.seed)
    params = list(lm.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=section.lr, betas=(0.9, 0.98), weight_decay=0.0)
    losses = []
    lm.train()
    try:
        for step in range(section.steps):
            batch = batch_at(step, rng)
            loss, n = loss_fn(model, batch)
            for group in optimizer.param_groups:
                group["lr"] = section.lr * lr_factor(step, warmup_steps=section.warmup_steps, total_steps=section.steps,
                                                     decay="cosine", min_lr_ratio=0.05, anneal_steps=0)
            optimizer.zero_grad(set_to_none=True)
            (loss / n.clamp(min=1)).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(float(loss.detach()) / max(int(n), 1))
            if (step + 1) % 50 == 0 or step + 1 == section.steps:
                recent = losses[-50:]
                log(f"herd: LM prior pre-training {step + 1}/{section.steps}: loss {sum(recent) / len(recent):.3f}")
    finally:
        for p in params:
            p.requires_grad_(False)
        lm.eval()
    return {"prior_loss_first": sum(losses[:10]) / len(losses[:10]),
            "prior_loss_last": sum(losses[-10:]) / len(losses[-10:]), "seconds": round(time.time() - t0, 1)}

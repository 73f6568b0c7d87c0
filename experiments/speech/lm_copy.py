"""Copy pre-training of a speech model's language model, on text only, before adapter training.

A tiny LM that has never seen the task cannot follow "Repeat after me", and a frozen LM that cannot copy
leaves the adapter nothing to steer (paper Sec 8 freezes a capable Llama 3). This stage teaches the LM the
speech prompt layout itself: the ASR prompt (system instruction, `start, placeholder * n, end` as the user
turn, the transcript as the answer) with the placeholders holding the LM's own embeddings of the
transcript's tokens (or of a random sequence of its words), each repeated a random number of times (audio
arrives at ~2.5 placeholders per token at 80 ms) between a few zero "silence" vectors, optionally with
Gaussian noise. The LM and the audio start / end
marker rows (`extra_token_embeddings`) train on the answer tokens; afterwards the LM is frozen again and the
adapter only has to map speech to where the LM reads (token embeddings).

The stage draws from its own seeded generators (never the global RNG), so it is reproducible and a resumed
adapter run, which loads the saved LM instead of repeating the stage, continues exactly.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch

from adapters.multimodal import MultimodalModel, SpeechInputs
from adapters.speech_prompts import SpeechPrompter, collate_examples
from language.model import Llama


@dataclass
class CopyPretrainSection:
    steps: int = field(default=0, metadata={"range": (0, None), "help": "text-only copy steps of the LM; 0 = off"})
    lr: float = field(default=3e-3, metadata={"range": (0.0, 1.0), "help": "peak AdamW learning rate"})
    warmup_steps: int = field(default=20, metadata={"range": (0, None)})
    batch_size: int = field(default=32, metadata={"range": (1, None), "help": "transcripts per step"})
    repeat_min: int = field(default=1, metadata={"range": (1, None), "help": "fewest placeholders per token"})
    repeat_max: int = field(default=4, metadata={"range": (1, None), "help": "most placeholders per token"})
    silence_max: int = field(default=2, metadata={"range": (0, None), "help": "most zero vectors before/after"})
    noise: float = field(default=0.0, metadata={
        "range": (0.0, 10.0), "help": "Gaussian noise on the span, times the embedding std"})
    fill: Literal["repeat", "silence", "repeat_gap"] = field(default="repeat", metadata={
        "help": "a token's further placeholders: repeats of it (ambiguous counts: 'zero zero' vs 'zero'), zeros, "
                "or repeats followed by one zero vector (a boundary: 'zero zero' = 2 runs)"})
    random_words: float = field(default=0.0, metadata={
        "range": (0.0, 1.0), "help": "fraction of examples that copy a random word sequence (1 to the longest "
                                    "transcript's length, words of the transcripts) instead of a transcript"})
    seed: int = field(default=0)

    def __post_init__(self):
        if self.repeat_max < self.repeat_min:
            raise ValueError(f"copy_pretrain: repeat_max {self.repeat_max} < repeat_min {self.repeat_min}")


def draw_texts(pool: Sequence[str], n: int, random_words: float, rng: random.Random) -> list[str]:
    """n texts to copy: transcripts of the pool, or with probability random_words a random sequence of 1 to
    (the pool's longest transcript) words of the pool."""
    words = sorted({w for t in pool for w in t.split()})
    longest = max(len(t.split()) for t in pool)
    out = []
    for _ in range(n):
        if rng.random() < random_words:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, longest))))
        else:
            out.append(rng.choice(pool))
    return out


def copy_batch(prompter: SpeechPrompter, token_ids: Sequence[Sequence[int]], texts: Sequence[str],
               section: CopyPretrainSection, rng: random.Random, language: str = "en"):
    """(tokens (B, T), labels (B, T), span_ids (B, L), span_lengths (B,)) for a batch of transcripts: span_ids
    holds the token id at each placeholder (-1: silence), `tokens` the prompt with a span of that length, labels
    the house convention of `collate_examples` (labels[t]: the target after position t)."""
    spans, examples = [], []
    for ids, text in zip(token_ids, texts):
        span = [-1] * rng.randint(0, section.silence_max)
        for t in ids:
            n = rng.randint(section.repeat_min, section.repeat_max)
            span += [t] * n if section.fill != "silence" else [t] + [-1] * (n - 1)
            if section.fill == "repeat_gap":
                span.append(-1)
        span += [-1] * rng.randint(0, section.silence_max)
        if not span:
            span = [-1]
        spans.append(span)
        examples.append(prompter.example(len(span), text, language))
    tokens, labels, _ = collate_examples(examples)
    lengths = torch.tensor([len(s) for s in spans])
    span_ids = torch.full((len(spans), int(lengths.max())), -1, dtype=torch.long)
    for i, s in enumerate(spans):
        span_ids[i, :len(s)] = torch.tensor(s)
    return tokens, labels, span_ids, lengths


def span_embeddings(lm: Llama, span_ids: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    """span_ids (B, L) (-1: silence) -> the LM's token embeddings (B, L, dim), zero at silence, plus noise."""
    table = lm.model.embed_tokens
    values = table(span_ids.clamp(min=0)) * (span_ids >= 0)[..., None].to(table.weight.dtype)
    if noise > 0:
        std = float(table.weight.detach().float().std())
        values = values + noise * std * torch.randn(values.shape, generator=generator).to(values)
    return values


def copy_pretrain(model: MultimodalModel, prompter: SpeechPrompter, tokenizer, texts: Sequence[str],
                  section: CopyPretrainSection, log: Callable[[str], None] = print,
                  targets: Sequence[str] | None = None) -> dict:
    """Train model.language_model and the extra token embeddings (only the audio start / end marker rows get a
    gradient, so only they change) on the copy task for section.steps steps; leaves every LM parameter frozen
    (requires_grad False) and the LM in eval mode.
    With `targets` (one per text: AST's translations) the answer is the target, not the span's text: the LM
    learns to translate what the span holds (the paper's LM arrives able to translate).
    Returns {"copy_loss_first", "copy_loss_last" (mean of the first / last 10 steps' per-token loss), "seconds"}."""
    lm = model.language_model
    if not texts:
        raise ValueError("copy_pretrain: no transcripts to copy")
    if targets is not None and (len(targets) != len(texts) or section.random_words):
        raise ValueError("copy_pretrain: targets need one per text and random_words 0")
    t0 = time.time()
    rng, generator = random.Random(section.seed), torch.Generator().manual_seed(section.seed)
    pool = list(texts)
    params = list(lm.parameters()) + list(model.extra_token_embeddings.parameters())
    was_trainable = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=section.lr, betas=(0.9, 0.98), weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < section.warmup_steps:
            return section.lr * (step + 1) / section.warmup_steps
        progress = (step - section.warmup_steps) / max(1, section.steps - section.warmup_steps)
        return section.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    losses = []
    lm.train()
    try:
        for step in range(section.steps):
            if targets is None:
                batch = answers = draw_texts(pool, section.batch_size, section.random_words, rng)
            else:
                picked = [rng.randrange(len(pool)) for _ in range(section.batch_size)]
                batch, answers = [pool[i] for i in picked], [targets[i] for i in picked]
            tokens, labels, span_ids, lengths = copy_batch(prompter, [tokenizer.encode(t) for t in batch], answers,
                                                           section, rng)
            speech = SpeechInputs(embeddings=span_embeddings(lm, span_ids, section.noise, generator),
                                  embedding_lengths=lengths)
            loss, n = model.loss_sum(tokens, labels, speech=speech)
            n = int(n)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            (loss / n).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(float(loss.detach()) / n)
            if (step + 1) % 50 == 0 or step + 1 == section.steps:
                log(f"herd: copy pre-training {step + 1}/{section.steps}: loss {sum(losses[-50:]) / len(losses[-50:]):.3f}")
    finally:
        for p, trainable in zip(params, was_trainable):
            p.requires_grad_(trainable)
        for p in lm.parameters():
            p.requires_grad_(False)
        lm.eval()
    return {"copy_loss_first": sum(losses[:10]) / len(losses[:10]), "copy_loss_last": sum(losses[-10:]) / len(losses[-10:]),
            "seconds": round(time.time() - t0, 1)}

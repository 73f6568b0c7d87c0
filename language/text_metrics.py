"""Text metrics: token-weighted perplexity of a model on packed batches, and the add-one unigram
baseline measured on exactly the same targets.

A model is either an nn.Module called as `model(tokens, positions=..., doc_ids=...)` (language.model.Llama)
or a plain callable `logits_fn(tokens, positions, doc_ids)`; both return logits (B, T, V).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .packing import IGNORE_INDEX, PackedBatch, eval_batches


def model_device(model) -> torch.device:
    """The device of a module's first parameter; CPU for plain callables and parameterless modules."""
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def logits_of(model, tokens: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """tokens, positions, doc_ids (B, T) -> logits (B, T, V) from a module or a plain callable."""
    if isinstance(model, nn.Module):
        out = model(tokens, positions=positions, doc_ids=doc_ids)
    else:
        out = model(tokens, positions, doc_ids)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if out.dim() != 3 or out.shape[:2] != tokens.shape:
        raise ValueError(f"text_metrics: the model returned shape {tuple(out.shape)}, expected logits "
                         f"(B, T, V) for tokens {tuple(tokens.shape)}")
    return out


def _fields(batch):
    if isinstance(batch, PackedBatch):
        return batch.tokens, batch.labels, batch.positions, batch.doc_ids
    try:
        return batch["tokens"], batch["labels"], batch.get("positions"), batch.get("doc_ids")
    except (TypeError, KeyError) as e:
        raise TypeError("text_metrics: a batch must be a PackedBatch or a dict with tokens and labels") from e


@torch.no_grad()
def perplexity(model, batches: Iterable, *, device=None) -> float:
    """exp(sum of next-token NLL / number of targets) over every label != -100 of every batch.

    batches: PackedBatch or dicts with tokens, labels (B, T) and optional positions, doc_ids (B, T).
    The model runs in eval mode (its mode is restored). Logits are upcast to float32 for the loss.
    """
    device = device if device is not None else model_device(model)
    was_training = getattr(model, "training", None)
    if was_training:
        model.eval()
    nll, count = 0.0, 0
    try:
        for batch in batches:
            tokens, labels, positions, doc_ids = _fields(batch)
            b, t = tokens.shape
            if positions is None:
                positions = torch.arange(t).expand(b, t)
            if doc_ids is None:
                doc_ids = torch.zeros(b, t, dtype=torch.long)
            tokens, labels = tokens.to(device), labels.to(device)
            logits = logits_of(model, tokens, positions.to(device), doc_ids.to(device))
            nll += float(F.cross_entropy(logits.float().reshape(b * t, -1), labels.reshape(-1),
                                         ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
    finally:
        if was_training:
            model.train()
    if count == 0:
        raise ValueError("perplexity: the batches hold no targets (every label is -100)")
    return math.exp(nll / count)


def target_counts(token_docs: Sequence[Sequence[int]], vocab_size: int) -> np.ndarray:
    """(vocab_size,) int64: counts of the tokens a model predicts, i.e. every token of every document
    except its first (bos is never a target; eos is)."""
    targets = [np.asarray(d[1:], dtype=np.int64) for d in token_docs if len(d) > 1]
    flat = np.concatenate(targets) if targets else np.zeros(0, np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
        raise ValueError(f"target_counts: token ids outside [0, {vocab_size})")
    return np.bincount(flat, minlength=vocab_size)


def unigram_baseline_perplexity(train_token_docs: Sequence[Sequence[int]], val_token_docs: Sequence[Sequence[int]],
                                vocab_size: int, *, seq_len: Optional[int] = None) -> float:
    """Perplexity of an add-one smoothed unigram model, comparable to `perplexity`.

    p(v) = (c(v) + 1) / (N + vocab_size), c = `target_counts(train_token_docs)` (every train token but
    each document's first), N = sum(c). Scored as exp(mean of -log p(target)) over the val targets:
    with seq_len, exactly the labels != -100 of `eval_batches(val_token_docs, seq_len, ...)`, the batches
    on which model perplexity is measured (a target lost where packing cuts a long document is lost
    here too); without seq_len, every val token but each document's first.
    """
    counts = target_counts(train_token_docs, vocab_size)
    logp = np.log(counts + 1.0) - math.log(counts.sum() + vocab_size)
    if seq_len is None:
        val_counts = target_counts(val_token_docs, vocab_size)
    else:
        val_counts = np.zeros(vocab_size, np.int64)
        for b in eval_batches(val_token_docs, seq_len, batch_size=64):
            lab = b.labels[b.labels != IGNORE_INDEX].numpy()
            if lab.size and lab.max() >= vocab_size:
                raise ValueError(f"unigram_baseline_perplexity: val token ids outside [0, {vocab_size})")
            val_counts += np.bincount(lab, minlength=vocab_size)
    n = int(val_counts.sum())
    if n == 0:
        raise ValueError("unigram_baseline_perplexity: the val documents hold no targets")
    return math.exp(-float((val_counts * logp).sum()) / n)

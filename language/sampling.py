"""K samples per prompt with the prompt encoded once (rejection sampling, Sec 4.2.2).

    samples = sample_k(model, prompts, k=8, max_new_tokens=32, temperature=1.0, stop_ids=fmt.stop_ids, seed=0)
    samples[i][j].ids, samples[i][j].stopped      # sample j of prompt i

The B prompts are left-padded into one batch and prefilled once; the KV cache is then repeated K times
per row (`KVCache.repeat_interleave`) and the B*K continuations decode together, each with its own
sample of the first token. So a prompt costs one prefill however many samples are drawn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from .generation import left_pad, model_device, prefill, sample_next


@dataclass
class Sample:
    ids: list[int]  # generated tokens, stop token excluded
    stopped: bool  # ended with a stop token (False: cut at max_new_tokens)


def sample_k(model: nn.Module, prompts: Sequence[Sequence[int]], *, k: int, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, stop_ids: Iterable[int] = (),
             seed: Optional[int] = None, pad_id: int = 0) -> list[list[Sample]]:
    """`k` samples for each of the B prompts -> B lists of k `Sample`s (same arguments as `generate`)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("sample_k needs at least one prompt, and every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"context of {model.config.max_seq_len} tokens (config.max_seq_len)")
    stop_ids = frozenset(stop_ids)
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            tokens, attention_mask = left_pad(prompts, pad_id, device)
            batch, prompt_len = tokens.shape
            cache = model.new_cache(batch, prompt_len + max_new_tokens)
            logits = prefill(model, tokens, attention_mask, cache)              # (B, V): one prefill per prompt
            cache = cache.repeat_interleave(k)                                  # (B*K) rows share each prompt
            logits = logits.repeat_interleave(k, dim=0)
            rows = batch * k
            if attention_mask is not None:
                next_position = attention_mask.sum(-1, keepdim=True).repeat_interleave(k, dim=0)
                step_mask = torch.ones(rows, 1, dtype=torch.bool, device=device)
            else:
                next_position = torch.full((rows, 1), prompt_len, device=device)
                step_mask = None
            generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
            outputs: list[list[int]] = [[] for _ in range(rows)]
            done = [False] * rows
            token = sample_next(logits, temperature, top_p, generator)
            for step in range(max_new_tokens):
                for row, tok in enumerate(token.tolist()):
                    if done[row]:
                        continue
                    if tok in stop_ids:
                        done[row] = True
                    else:
                        outputs[row].append(tok)
                if all(done) or step + 1 == max_new_tokens:
                    break
                logits = model(token[:, None], positions=next_position + step, attention_mask=step_mask,
                               cache=cache)
                token = sample_next(logits[:, -1], temperature, top_p, generator)
    finally:
        model.train(was_training)
    return [[Sample(outputs[i * k + j], done[i * k + j]) for j in range(k)] for i in range(batch)]

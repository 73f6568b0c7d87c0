"""Batched autoregressive generation with the static KV cache: greedy, temperature and top-p sampling.

Prompts of different lengths are left-padded into one (B, T) batch, so every row's last prompt token
sits in the last column: one prefill fills the cache and gives each row's first next-token logits,
then each step feeds one token per row. A row stops at its first stop id (the stop token is NOT
returned and NOT streamed); finished rows keep riding along in the batch (their tokens are ignored)
until every row is done or `max_new_tokens` is reached.

A prompt plus `max_new_tokens` longer than the model's context (`config.max_seq_len`) is an error
naming both lengths; callers that want a shorter budget (the chat demo) shrink it themselves.

Per step the host reads the B new tokens once (for stop checks and streaming). On CUDA it does so
*after* launching the next step's forward, so the Python work of one step can overlap the kernels
of the next (as far as the forward itself does not wait for the device); that costs one unused
step when all rows stop, so on CPU it reads first.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from .kv_cache import KVCache

TokenCallback = Callable[[int, int], None]  # (row, token id), called for every returned token, in order


def generate(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, stop_ids: Iterable[int] = (),
             seed: Optional[int] = None, on_token: Optional[TokenCallback] = None,
             pad_id: int = 0) -> list[list[int]]:
    """Continue each prompt; returns the new tokens per prompt (stop token excluded).

    model: a `Llama` (or anything with its `forward(tokens, positions=, attention_mask=, cache=, logits_to_keep=)`,
        `new_cache(batch, max_len)` and `config.max_seq_len`); it is put in eval mode for the call.
    prompts: B lists of token ids, each non-empty; lengths may differ (left-padded with `pad_id`,
        which is masked out, so its value does not change the result).
    temperature: 0 = greedy (argmax); > 0 samples from softmax(logits / temperature).
    top_p: nucleus sampling, keeps the smallest set of most likely tokens whose probability mass
        reaches top_p (1.0 = off; ignored when greedy).
    seed: seeds a private `torch.Generator` so sampling is reproducible (None: torch's global RNG).
    on_token(row, token): called as each token is produced (streaming); never for a stop token.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    longest = max(len(p) for p in prompts)
    context = model.config.max_seq_len
    if longest + max_new_tokens > context:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} = "
                         f"{longest + max_new_tokens} tokens exceeds the model's context of {context} "
                         f"tokens (config.max_seq_len); shorten the prompt or lower max_new_tokens")
    outputs: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0:
        return outputs

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            _decode_loop(model, prompts, outputs, max_new_tokens, temperature, top_p, frozenset(stop_ids),
                         seed, on_token, pad_id)
    finally:
        model.train(was_training)
    return outputs


def _decode_loop(model, prompts, outputs, max_new_tokens, temperature, top_p, stop_ids, seed, on_token, pad_id):
    device = model_device(model)
    tokens, attention_mask = left_pad(prompts, pad_id, device)
    batch, prompt_len = tokens.shape
    cache = model.new_cache(batch, prompt_len + max_new_tokens)
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)

    logits = prefill(model, tokens, attention_mask, cache)
    # Decode steps pass each row's RoPE position; a padded batch also passes a one-column mask, which
    # makes the model mask the cached padding. Without padding no mask is passed, so attention runs
    # unmasked (on CUDA, SDPA with GQA and a mask falls back to its slow math kernel).
    next_position = (attention_mask.sum(-1, keepdim=True) if attention_mask is not None
                     else torch.full((batch, 1), prompt_len, device=device))
    step_mask = torch.ones(batch, 1, dtype=torch.bool, device=device) if attention_mask is not None else None
    overlap = overlap_steps(device)

    def next_tokens(token, step):  # token (B,) at decode step `step` -> the tokens after it (B,)
        logits = model(token[:, None], positions=next_position + step, attention_mask=step_mask, cache=cache)
        return sample_next(logits[:, -1], temperature, top_p, generator)

    token = sample_next(logits, temperature, top_p, generator)  # (B,)
    done = [False] * batch
    for step in range(max_new_tokens):
        last = step + 1 == max_new_tokens
        if overlap and not last:
            following = next_tokens(token, step)
        for row, tok in enumerate(token.tolist()):  # the one host sync per step
            if done[row]:
                continue
            if tok in stop_ids:
                done[row] = True
                continue
            outputs[row].append(tok)
            if on_token is not None:
                on_token(row, tok)
        if all(done) or last:
            return
        token = following if overlap else next_tokens(token, step)


def prefill(model: nn.Module, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor],
            cache: KVCache) -> torch.Tensor:
    """Run the prompt through the model, filling `cache`; tokens (B, T) -> next-token logits (B, vocab).
    Only the last position goes through the output projection (`logits_to_keep=1`)."""
    return model(tokens, attention_mask=attention_mask, cache=cache, logits_to_keep=1)[:, -1]


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, vocab) -> token ids (B,): argmax when temperature == 0, else a (nucleus) sample."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs  # probability of the strictly more likely tokens
    # keep token i iff the tokens before it hold less than top_p: the smallest set reaching top_p
    # (the most likely token always stays); multinomial renormalises what is kept
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)  # (B, 1) index into the sorted order
    return order.gather(-1, choice).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """B prompts -> tokens (B, T) left-padded with pad_id, and attention_mask (B, T) bool (False at
    padding), or None when all prompts have the same length."""
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, longest - len(prompt):] = True
    if bool(mask.all()):
        return tokens.to(device), None
    return tokens.to(device), mask.to(device)


def overlap_steps(device: torch.device) -> bool:
    """Launch step t+1 before reading step t's tokens: worth it where kernels run asynchronously."""
    return device.type == "cuda"


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device

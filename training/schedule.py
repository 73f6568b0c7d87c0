"""Learning-rate schedule: linear warm-up, cosine/linear/constant decay, optional linear anneal to 0.

Step ``s`` (0-based: the optimizer step being taken) uses ``peak_lr * lr_factor(s, ...)``:

* warm-up, ``s < warmup_steps``: ``(s + 1) / warmup_steps`` (the first step already moves);
* decay, up to ``decay_end = total_steps - anneal_steps``: progress ``p = (s - warmup) / (decay_end - warmup)``
  in [0, 1]; cosine ``m + (1 - m) * (1 + cos(pi p)) / 2``, linear ``1 - (1 - m) p``, constant ``1``
  (``m = min_lr_ratio``); so the factor is ``m`` at ``decay_end``;
* anneal, ``s >= decay_end``: ``f(decay_end) * (total_steps - s) / anneal_steps``: linear from the decay's
  final value down to 0 at ``total_steps`` (Llama 3 Sec 3.4.3), never below 0 past the end.
"""

import functools
import math

import torch

from .config import ScheduleConfig


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, decay: str, min_lr_ratio: float,
              anneal_steps: int) -> float:
    """Multiplier of the peak LR for 0-based optimizer step ``step`` (see the module docstring)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_end = total_steps - anneal_steps

    def decayed(s: int) -> float:
        span = decay_end - warmup_steps
        p = 1.0 if span <= 0 else min(max((s - warmup_steps) / span, 0.0), 1.0)
        if decay == "cosine":
            return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
        if decay == "linear":
            return 1.0 - (1.0 - min_lr_ratio) * p
        if decay == "constant":
            return 1.0
        raise ValueError(f"schedule.decay must be cosine, linear or constant, got {decay!r}")

    if anneal_steps > 0 and step >= decay_end:
        return decayed(decay_end) * max(total_steps - step, 0) / anneal_steps
    return decayed(step)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_factor` to every param group (its state_dict holds only numbers)."""
    fn = functools.partial(lr_factor, warmup_steps=schedule.warmup_steps, total_steps=total_steps,
                           decay=schedule.decay, min_lr_ratio=schedule.min_lr_ratio,
                           anneal_steps=schedule.anneal_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=fn)

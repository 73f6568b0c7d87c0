"""Rotary position embeddings for the speech encoder and adapter (half-split layout, as Hugging Face
Llama). speech/ imports nothing of the project, so this is a small standalone copy of the idea in
language/rope.py without the Llama 3.1 long-context scaling. Angles are computed in float32.

Positions count from 0 at each utterance's first frame; padding sits at the end of a row, so a padded
batch gives every valid frame the same position it has when its utterance runs alone.
"""
from __future__ import annotations

import torch


def rotary_cos_sin(length: int, head_dim: int, theta: float, device=None, dtype=torch.float32):
    """cos, sin of shape (1, 1, length, head_dim) for positions 0..length-1, cast to `dtype`."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype)[None, None], angles.sin().to(dtype)[None, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated in the half-split convention: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin

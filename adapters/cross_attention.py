"""Gated cross-attention from text to image states (paper Sec 7.2; Llama 3.2 Vision's adapter layer).

One block = pre-norm GQA cross-attention (RMSNorm on every query and key head) + its own SwiGLU MLP, each
added to the residual through a tanh gate initialised to 0, so a fresh block is the identity.
Parameter names equal transformers' `MllamaCrossAttentionDecoderLayer` (`cross_attn.q_proj`,
`cross_attn.q_norm`, `cross_attn_attn_gate`, `mlp.gate_proj`, ...): an Mllama import only renames the
layer index.

Rows (text tokens) that see no image get exactly zero from the whole block, attention AND MLP, as in
Meta's reference implementation (llama-models `CrossAttention.forward` multiplies the attention output by
`full_text_row_masked_out_mask`). transformers' Mllama (checked in 5.23) masks only the MLP: its
`_prepare_cross_attention_mask` un-masks such rows so they attend uniformly to every image token,
padding included, and `MllamaCrossAttentionDecoderLayer` adds that attention output to the residual
through the attention gate. Text before the first image and text-only samples in an image batch therefore
leak image information there. `transformers_empty_rows=True` reproduces that leak, for parity checks
against transformers only.

Image keys/values depend only on the image states, so `project_kv` computes them once per image set
and generation reuses them at every decode step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from language.model import RMSNorm, SwiGLU


class CrossAttentionKV(NamedTuple):
    """Normalised keys and values of one block, (B, n_kv_heads, S, head_dim) each (S: image tokens)."""
    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class CrossAttentionMask:
    """What a block needs to mask, built once per forward and shared by every block.

    keys (B, 1, T, S) bool: True where text token t may attend to image token s. A row that sees no image
        is all True (a softmax never meets an all-masked row; that row's output is dropped).
    row_visible (B, T, 1) bool: True where the token sees at least one image token.
    """
    keys: torch.Tensor
    row_visible: torch.Tensor

    @staticmethod
    def build(cross_attention_mask: torch.Tensor, tokens_per_tile: int) -> "CrossAttentionMask":
        """cross_attention_mask (B, T, N_img, N_tiles) (1/True = token t sees that tile of that image)
        -> the mask over the flattened image tokens (image, tile, token: S = N_img * N_tiles * tokens_per_tile)."""
        if cross_attention_mask.ndim != 4:
            raise ValueError(f"cross_attention_mask must be (B, T, N_img, N_tiles), got shape "
                             f"{tuple(cross_attention_mask.shape)}")
        tiles = cross_attention_mask.bool().flatten(2)  # (B, T, N_img * N_tiles)
        row_visible = tiles.any(-1, keepdim=True)  # (B, T, 1)
        keys = tiles.repeat_interleave(tokens_per_tile, dim=-1) | ~row_visible
        return CrossAttentionMask(keys=keys[:, None], row_visible=row_visible)

    def rows(self, start: int, end: int) -> "CrossAttentionMask":
        """The mask of text positions start..end-1."""
        return CrossAttentionMask(self.keys[:, :, start:end], self.row_visible[:, start:end])


class CrossAttention(nn.Module):
    """GQA attention from text hidden states (queries) to projected image states (keys/values), no RoPE."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, norm_eps: float):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads {n_heads} must be a multiple of n_kv_heads {n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, norm_eps)
        self.k_norm = RMSNorm(head_dim, norm_eps)

    def project_kv(self, image_states: torch.Tensor) -> CrossAttentionKV:
        """image_states (B, S, dim) -> keys (RMS-normalised per head) and values (B, n_kv, S, head_dim)."""
        b, s, _ = image_states.shape
        k = self.k_proj(image_states).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(image_states).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return CrossAttentionKV(self.k_norm(k), v)

    def forward(self, x: torch.Tensor, kv: CrossAttentionKV, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, dim), mask (B, 1, T, S) bool -> (B, T, dim)."""
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2))
        keys, values, gqa = kv.keys, kv.values, self.n_heads != self.n_kv_heads
        if gqa and q.is_cuda:  # masked GQA runs in SDPA's math kernel: share heads by copy for a fused kernel
            group = self.n_heads // self.n_kv_heads
            keys, values, gqa = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1), False
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class GatedCrossAttentionBlock(nn.Module):
    """h + tanh(attn_gate) * xattn(norm(h)), then + tanh(mlp_gate) * mlp(norm(.)); rows that see no image
    get exactly zero from both terms (unless `transformers_empty_rows`, see the module docstring)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, ffn_dim: int,
                 norm_eps: float = 1e-5, transformers_empty_rows: bool = False):
        super().__init__()
        self.cross_attn = CrossAttention(dim, n_heads, n_kv_heads, head_dim, norm_eps)
        self.input_layernorm = RMSNorm(dim, norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = SwiGLU(dim, ffn_dim)
        self.post_attention_layernorm = RMSNorm(dim, norm_eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))
        self.transformers_empty_rows = transformers_empty_rows

    @classmethod
    def for_language_model(cls, config, **kwargs) -> "GatedCrossAttentionBlock":
        """A block as wide as the language model `config` (a `LlamaConfig`), as in Mllama."""
        return cls(config.dim, config.n_heads, config.n_kv_heads, config.head_dim, config.ffn_dim,
                   config.norm_eps, **kwargs)

    def project_kv(self, image_states: torch.Tensor) -> CrossAttentionKV:
        """image_states (B, S, dim) -> this block's keys/values (compute once per image set)."""
        return self.cross_attn.project_kv(image_states)

    def forward(self, h: torch.Tensor, kv: CrossAttentionKV, mask: CrossAttentionMask) -> torch.Tensor:
        """h (B, T, dim) -> (B, T, dim)."""
        attn = self.cross_attn(self.input_layernorm(h), kv, mask.keys)
        if not self.transformers_empty_rows:
            attn = torch.where(mask.row_visible, attn, 0.0)
        h = h + self.cross_attn_attn_gate.tanh() * attn
        mlp = torch.where(mask.row_visible, self.mlp(self.post_attention_layernorm(h)), 0.0)
        return h + self.cross_attn_mlp_gate.tanh() * mlp

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Fresh adapter: normal(0, std) projections, unit norms, gates 0 (the block is the identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        self.cross_attn_attn_gate.zero_()
        self.cross_attn_mlp_gate.zero_()


# ---------------------------------------------------------------- where the blocks go

def default_positions(n_layers: int, every: int = 4) -> list[int]:
    """One block per `every` LM layers (at least one), placed as in Llama 3.2 Vision (Meta's fusion schedule,
    counted from the last layer). A position p means "before LM layer p": 32 layers, every=4 ->
    [3, 7, ..., 31], i.e. a block after layers 2, 6, ..., 30, so an LM layer always follows the last block
    (Mllama-11B numbers these text layers [3, 8, ..., 38])."""
    if every < 1:
        raise ValueError(f"cross-attention interval must be >= 1, got {every}")
    n_blocks = max(1, n_layers // every)
    return list(range(n_layers))[::-1][::every][:n_blocks][::-1]


def positions_from_mllama(cross_attention_layers, n_total_layers: int) -> list[int]:
    """Mllama's `cross_attention_layers` (indices among ALL text layers, self + cross) -> our positions
    (the self-attention layer each block runs before; n_self_layers = after the last one)."""
    layers = sorted(int(c) for c in cross_attention_layers)
    if len(set(layers)) != len(layers) or any(not 0 <= c < n_total_layers for c in layers):
        raise ValueError(f"cross_attention_layers {list(cross_attention_layers)} must be distinct indices "
                         f"in 0..{n_total_layers - 1}")
    return [c - j for j, c in enumerate(layers)]


def positions_to_mllama(positions) -> list[int]:
    """Inverse of `positions_from_mllama`: [3, 7, ..., 31] -> [3, 8, ..., 38]."""
    return [p + j for j, p in enumerate(sorted(positions))]

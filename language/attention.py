"""Grouped-query self-attention with RoPE and the masks the project needs.

Masks (`AttentionMask`), built once per forward and shared by all layers:
- plain causal: SDPA's `is_causal` (no mask tensor at all);
- packed documents (`doc_ids`): a token sees earlier tokens of its own document only. On CUDA this is
  a flex-attention block mask (no dense T x T tensor); elsewhere a boolean (B, 1, T, S) mask;
- left padding and KV-cache offsets: a boolean mask over cached keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import KVCache
from .rope import apply_rope

_flex_attention = None


def _compiled_flex():
    global _flex_attention
    if _flex_attention is None:
        from torch.nn.attention.flex_attention import flex_attention
        _flex_attention = torch.compile(flex_attention, dynamic=False)
    return _flex_attention


@dataclass
class AttentionMask:
    """What a layer needs to mask attention: exactly one of the three forms is active."""
    is_causal: bool = False
    dense: Optional[torch.Tensor] = None  # (B, 1, T, S) bool, True = may attend
    block: Optional[object] = None  # flex_attention BlockMask

    @staticmethod
    def build(n_queries: int, offset: int, doc_ids: Optional[torch.Tensor], key_valid: Optional[torch.Tensor],
              device: torch.device, use_flex: bool = False) -> "AttentionMask":
        """Causal mask for queries at positions offset..offset+T-1 over keys 0..offset+T-1.

        doc_ids (B, T): document id per token (no cache only); key_valid (B, S): False at padded keys.
        """
        n_keys = offset + n_queries
        if doc_ids is None and key_valid is None:
            if offset == 0:
                return AttentionMask(is_causal=True)
            if n_queries == 1:
                return AttentionMask()  # one new token sees the whole cache
        if doc_ids is not None and offset:
            raise ValueError("document masks (doc_ids) cannot be combined with a filled KV cache")
        if doc_ids is not None and key_valid is None and use_flex:
            return AttentionMask(block=_document_block_mask(doc_ids))
        q_pos = torch.arange(offset, n_keys, device=device)
        k_pos = torch.arange(n_keys, device=device)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None]  # (1, T, S)
        if doc_ids is not None:
            allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])
        if key_valid is not None:
            allowed = allowed & key_valid[:, None, :n_keys]
            # a padded query that sees no valid key attends to itself (its output is never used),
            # so softmax never meets an all-masked row
            allowed = allowed | (k_pos[None, :] == q_pos[:, None])[None]
        return AttentionMask(dense=allowed[:, None])


def _document_block_mask(doc_ids: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask

    def same_doc_causal(b, h, q, kv):
        return (kv <= q) & (doc_ids[b, q] == doc_ids[b, kv])

    batch, length = doc_ids.shape
    return create_block_mask(same_doc_causal, batch, None, length, length, device=doc_ids.device)


class Attention(nn.Module):
    """GQA self-attention, no biases. Parameter names follow Hugging Face Llama (q_proj, k_proj, ...)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, layer_idx: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttentionMask,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        """x (B, T, dim) -> (B, T, dim)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        gqa = self.n_heads != self.n_kv_heads
        if mask.block is not None:
            out = _compiled_flex()(q, k, v, block_mask=mask.block, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, is_causal=mask.is_causal,
                                                 enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

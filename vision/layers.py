"""Building blocks of the image encoder: pre-LN ViT blocks (optionally tanh-gated), the block stack that
hands back intermediate outputs, the tile-aware position embeddings and Mllama's padding mask.

Module and parameter names are those of `transformers`' Mllama vision model, so its checkpoints load as is.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import VisionConfig


class VisionAttention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention`."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.width, config.width, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.width, config.width, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.width, config.width, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.width, config.width, bias=config.out_bias)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, L, width), mask: additive (B, 1, L, L) or None -> (B, L, width)."""
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        if mask is not None and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class VisionMLP(nn.Module):
    """fc2(act(fc1(x))) with biases; act is exact GELU (or CLIP's QuickGELU)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.quick_gelu = config.activation == "quick_gelu"
        self.fc1 = nn.Linear(config.width, config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.quick_gelu else F.gelu(h)
        return self.fc2(h)


class EncoderLayer(nn.Module):
    """Pre-LN block: x + g_attn * attn(ln(x)), then x + g_ffn * mlp(ln(x)); g = tanh(gate) when gated, else 1."""

    def __init__(self, config: VisionConfig, gated: bool = False):
        super().__init__()
        self.gated = gated
        self.self_attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.input_layernorm = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.width, eps=config.norm_eps)
        if gated:
            self.gate_attn = nn.Parameter(torch.full((1,), float(config.global_gate_init)))
            self.gate_ffn = nn.Parameter(torch.full((1,), float(config.global_gate_init)))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, L, width) -> (B, L, width)."""
        h = self.self_attn(self.input_layernorm(x), mask)
        x = x + (self.gate_attn.tanh() * h if self.gated else h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * h if self.gated else h)


class LayerStack(nn.Module):
    """A list of blocks (`layers.N.*`) that can also return the outputs of chosen blocks."""

    def __init__(self, config: VisionConfig, n_layers: int, gated: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config, gated) for _ in range(n_layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                keep: Sequence[int] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x (B, L, width) -> (output (B, L, width), [output of block i for i in keep], in keep's order)."""
        kept = {}
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
            if i in keep:
                kept[i] = x
        return x, [kept[i] for i in keep]


class AspectRatioEmbedding(nn.Module):
    """One gated vector per (tile layout, tile slot), added to every token of that tile (pre-/post-tile)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.max_num_tiles = config.max_num_tiles
        self.width = config.width
        self.embedding = nn.Embedding(config.max_aspect_ratio_id + 1, config.max_num_tiles * config.width)
        self.gate = nn.Parameter(torch.zeros(1))
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x (B, T, L, width), aspect_ratio_ids (B,) -> x + tanh(gate) * embedding (B, T, 1, width); T <= max tiles."""
        n_tiles = x.shape[1]
        emb = self.embedding(aspect_ratio_ids).view(-1, self.max_num_tiles, 1, self.width)[:, :n_tiles]
        return x + self.gate.tanh() * emb


class TilePositionEmbedding(nn.Module):
    """Gated mix of a per-token position embedding shared by all tiles and a per-(layout, tile, token) one:
    x + (1 - tanh(gate)) * embedding + tanh(gate) * tile_embedding[aspect ratio id]."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.max_num_tiles = config.max_num_tiles
        self.seq_len = config.seq_len
        self.width = config.width
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(config.width ** -0.5 * torch.randn(config.seq_len, config.width))
        self.tile_embedding = nn.Embedding(config.max_aspect_ratio_id + 1,
                                           config.max_num_tiles * config.seq_len * config.width)
        nn.init.normal_(self.tile_embedding.weight, std=0.02)

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x (B, T, seq_len, width), aspect_ratio_ids (B,) -> same shape; T <= max tiles."""
        n_tiles = x.shape[1]
        gate = self.gate.tanh()
        x = x + (1 - gate) * self.embedding
        tiles = self.tile_embedding(aspect_ratio_ids).view(-1, self.max_num_tiles, self.seq_len, self.width)
        return x + gate * tiles[:, :n_tiles]


def padding_attention_mask(tile_valid: torch.Tensor, tokens_per_tile: int, real_tokens: int,
                           dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Mllama's encoder mask over the tokens of all tiles of an image: additive (B, 1, T*L, T*L), or None
    when every token is real.

    tile_valid (B, T) bool: False for padding tiles; tokens at position >= real_tokens within a tile are
    padding too. As in Mllama (and Meta's reference code) only pairs of two padding tokens are blocked:
    real tokens attend to every token, padding included, and padding tokens attend to real ones only
    (an image with no real token attends uniformly). Pretrained checkpoints were trained with this mask.
    """
    b, n_tiles = tile_valid.shape
    if real_tokens == tokens_per_tile and bool(tile_valid.all()):
        return None
    position = torch.arange(tokens_per_tile, device=tile_valid.device)
    padding = ~tile_valid[:, :, None] | (position >= real_tokens)          # (B, T, L)
    padding = padding.reshape(b, n_tiles * tokens_per_tile)
    both_padding = padding[:, :, None] & padding[:, None, :]                # (B, T*L, T*L)
    mask = torch.zeros(both_padding.shape, dtype=dtype, device=tile_valid.device)
    return mask.masked_fill_(both_padding, torch.finfo(dtype).min).unsqueeze(1)

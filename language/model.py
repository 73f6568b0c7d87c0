"""The dense Llama 3 decoder: pre-norm RMSNorm, GQA attention with RoPE, SwiGLU, no biases.

State-dict names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`, ...), so
an HF checkpoint loads as is and the composed multimodal model can wrap this one unchanged.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, AttentionMask
from .checkpoints import CheckpointError, check_entries, read_checkpoint, read_entry
from .config import LlamaConfig
from .kv_cache import KVCache
from .rope import rope_cos_sin, rope_inv_freq


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config.dim, config.n_heads, config.n_kv_heads, config.head_dim, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = SwiGLU(config.dim, config.ffn_dim)

    def forward(self, h, cos, sin, mask: AttentionMask, cache: Optional[KVCache] = None):
        """h (B, T, dim) -> (B, T, dim)."""
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


# Called after decoder layer i with the hidden states (B, T, dim); returns the states to continue with.
# The multimodal model uses it to insert cross-attention layers without touching the language model.
LayerHook = Callable[[int, torch.Tensor], torch.Tensor]


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm: tokens -> normalised hidden states."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.register_buffer("inv_freq", self.fresh_inv_freq(), persistent=False)
        self.gradient_checkpointing = False
        # Packed-document masks through flex attention (no dense T x T mask): None = on CUDA for T >= 1024.
        self.use_flex_attention: Optional[bool] = None

    def forward(self, tokens: Optional[torch.Tensor] = None, *, inputs_embeds: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None, doc_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
                layer_hook: Optional[LayerHook] = None) -> torch.Tensor:
        """tokens (B, T) or inputs_embeds (B, T, dim) -> hidden (B, T, dim) after the final norm.

        positions (B, T): RoPE positions (default: continue from the cache, or 0..T-1).
        doc_ids (B, T): packed-document ids; a token attends only within its document.
        attention_mask (B, T): False at padding (left-padded batches for generation).
        cache: KV cache, written at positions cache.length.. and advanced by T.
        """
        h = self.embed_tokens(tokens) if inputs_embeds is None else inputs_embeds
        b, t, _ = h.shape
        offset = cache.length if cache is not None else 0
        if cache is not None:
            cache.check_room(t)
        if positions is None:
            positions = self._default_positions(b, t, offset, attention_mask, cache, h.device)
        key_valid = None
        if cache is not None:
            if attention_mask is not None:
                cache.key_valid[:, offset:offset + t] = attention_mask
                cache.has_padding = cache.has_padding or not bool(attention_mask.all())
            if cache.has_padding:
                key_valid = cache.key_valid
        elif attention_mask is not None:
            key_valid = attention_mask
        use_flex = self.use_flex_attention
        if use_flex is None:
            use_flex = h.is_cuda and t >= 1024
        mask = AttentionMask.build(t, offset, doc_ids, key_valid, h.device, use_flex=use_flex)
        cos, sin = rope_cos_sin(self.inv_freq, positions, h.dtype)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, mask, cache, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache)
            if layer_hook is not None:
                h = layer_hook(i, h)
        if cache is not None:
            cache.advance(t)
        return self.norm(h)

    def fresh_inv_freq(self, device=None) -> torch.Tensor:
        """The RoPE inverse frequencies (head_dim // 2,) in float32, recomputed from the config."""
        c = self.config
        inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
        return inv_freq if device is None else inv_freq.to(device)

    def _apply(self, fn, recurse=True):
        """Module casts (.to(bf16), .half()) must not round the RoPE frequencies: they stay float32."""
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = self.fresh_inv_freq(self.inv_freq.device)
        return self

    @staticmethod
    def _default_positions(b, t, offset, attention_mask, cache, device):
        if attention_mask is None and (cache is None or not cache.has_padding):
            return torch.arange(offset, offset + t, device=device).expand(b, t)
        # left padding: a row's position counts only its real tokens so far
        valid = attention_mask if attention_mask is not None else torch.ones(b, t, dtype=torch.bool, device=device)
        before = cache.key_valid[:, :offset].sum(-1, keepdim=True) if cache is not None and offset else 0
        return (before + valid.long().cumsum(-1) - 1).clamp(min=0)


class Llama(nn.Module):
    """Causal language model: `LlamaModel` plus the output projection `lm_head` (tied or not)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module, std: float = 0.02) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def forward(self, tokens: Optional[torch.Tensor] = None, *, logits_to_keep: int = 0, **kwargs) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab), or (B, k, vocab) for the last k positions when
        logits_to_keep=k > 0 (prefill needs only the last). Keyword arguments as `LlamaModel.forward`."""
        hidden = self.model(tokens, **kwargs)
        return self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)

    def new_cache(self, batch_size: int, max_len: Optional[int] = None, dtype=None) -> KVCache:
        """An empty KV cache on this model's device (default length: the config's max_seq_len)."""
        weight = self.lm_head.weight
        return KVCache.for_model(self.config, batch_size, max_len or self.config.max_seq_len,
                                 dtype or weight.dtype, weight.device)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each decoder layer in the backward pass (activation checkpointing)."""
        self.model.gradient_checkpointing = True

    def num_parameters(self) -> int:
        """Distinct parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_pretrained(cls, path, *, dtype: torch.dtype = torch.float32, device="cpu") -> "Llama":
        """Load an HF folder (config.json + safetensors), a GGUF file or a Meta folder
        (params.json + consolidated.*.pth); the format is picked from what `path` holds. The model is built on
        the meta device and each tensor assigned once it is read (names and shapes checked first)."""
        with ExitStack() as files:
            contents = read_checkpoint(path, files)
            with torch.device("meta"):
                model = cls(contents.config)
            expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
            entries = check_entries(contents, expected)
            state = {name: read_entry(name, entry, expected[name]).to(device=device, dtype=dtype)
                     for name, entry in entries.items()}
        tied = contents.config.tie_embeddings
        if tied:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        if tied:  # assign=True gave lm_head its own Parameter: share the embedding again
            model.lm_head.weight = model.model.embed_tokens.weight
        model.model.inv_freq = model.model.fresh_inv_freq(device)  # non-persistent: built on meta, recomputed here
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise CheckpointError(f"{contents.source}: tensors the loader does not fill are still on the meta "
                                  f"device: {left[:5]}")
        return model.eval()

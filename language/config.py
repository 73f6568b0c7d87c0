"""Llama model configuration and the named presets (paper Table 3, Llama 3.2, SmolLM2, tiny test sizes)."""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class RopeScaling:
    """Llama 3.1 RoPE frequency scaling (long-context): low frequencies divided by `factor`,
    high ones kept, a smooth blend in between."""
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass
class LlamaConfig:
    """Shape of a dense Llama decoder. `head_dim` defaults to dim // n_heads."""
    vocab_size: int = field(default=128256, metadata={"range": (1, None), "help": "vocabulary size incl. special tokens"})
    dim: int = field(default=4096, metadata={"range": (1, None), "help": "model (residual) width"})
    n_layers: int = field(default=32, metadata={"range": (1, None), "help": "number of transformer blocks"})
    n_heads: int = field(default=32, metadata={"range": (1, None), "help": "query heads"})
    n_kv_heads: int = field(default=8, metadata={"range": (1, None), "help": "key/value heads (GQA)"})
    ffn_dim: int = field(default=14336, metadata={"range": (1, None), "help": "SwiGLU hidden width"})
    norm_eps: float = field(default=1e-5, metadata={"range": (0.0, 1.0), "help": "RMSNorm epsilon"})
    rope_theta: float = field(default=500000.0, metadata={"range": (1.0, None), "help": "RoPE base"})
    rope_scaling: Optional[RopeScaling] = field(default=None, metadata={"help": "Llama 3.1 RoPE scaling; null = off"})
    max_seq_len: int = field(default=8192, metadata={"range": (1, None), "help": "longest context the model is used at"})
    tie_embeddings: bool = field(default=False, metadata={"help": "share input embedding and output projection"})
    head_dim: Optional[int] = field(default=None, metadata={"range": (1, None), "help": "per-head width; null = dim // n_heads"})

    def __post_init__(self):
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}; set head_dim")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown LlamaConfig keys: {unknown}")
        return cls(**d)


_LLAMA31_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)
_LLAMA32_SCALING = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)

PRESETS: dict[str, dict] = {
    # Paper Table 3 (Llama 3.1 release: 128K context with RoPE scaling).
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                      rope_scaling=_LLAMA31_SCALING, max_seq_len=131072),
    "llama3-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                       rope_scaling=_LLAMA31_SCALING, max_seq_len=131072),
    "llama3-405b": dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim=53248,
                        rope_scaling=_LLAMA31_SCALING, max_seq_len=131072),
    # Llama 3.2 text models: tied embeddings.
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, tie_embeddings=True,
                        rope_scaling=_LLAMA32_SCALING, max_seq_len=131072),
    "llama3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192, tie_embeddings=True,
                        rope_scaling=_LLAMA32_SCALING, max_seq_len=131072),
    # SmolLM2-135M (Llama architecture; docs/DATA.md): the real weights available offline.
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                         rope_theta=100000.0, tie_embeddings=True, max_seq_len=8192),
    # Tiny sizes for tests and CPU runs.
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=512),
    "tiny-scaled": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=192,
                        rope_theta=10000.0, max_seq_len=1024,
                        rope_scaling=dict(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position=64)),
    "tiny-lm": dict(vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=768,
                    rope_theta=10000.0, tie_embeddings=True, max_seq_len=1024),
}


def preset(name: str, **overrides) -> LlamaConfig:
    """Config of a named preset, with field overrides. Unknown name -> error listing the presets."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown model preset '{name}'{hint}; known presets: {', '.join(PRESETS)}")
    fields = dict(PRESETS[name])
    fields.update(overrides)
    return LlamaConfig(**fields)

"""The speech adapter (paper Sec 8, ~100M): Conformer output (40 ms frames) -> conv (kernel 3, stride 2:
80 ms frames) -> one rotary Transformer layer -> LayerNorm -> linear to the LM embedding width. Its
outputs are written into the LM input sequence at the audio placeholder positions
(adapters/speech_inputs.py); there is no cross-attention.

The Transformer layer is pre-norm and bidirectional: x + MHSA(LayerNorm(x)) with rotary q/k and padded
keys masked, then x + FFN(x) (LayerNorm, Linear, SiLU, Linear) — the same attention and FFN modules as
the Conformer. Padded frames are zeroed before the convolution, so a padded batch gives each utterance
exactly what it gets alone; padded output frames are zero.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from speech.conformer import FeedForward, SelfAttention
from speech.features import valid_mask
from speech.rotary import rotary_cos_sin


@dataclass
class SpeechAdapterConfig:
    """Adapter shape (defaults: the paper's adapter on the 1B Conformer into an 8B LM)."""
    encoder_dim: int = field(default=1536, metadata={"range": (1, None), "help": "Conformer output width"})
    dim: int = field(default=3072, metadata={"range": (1, None), "help": "adapter Transformer width"})
    n_heads: int = field(default=24, metadata={"range": (1, None), "help": "attention heads"})
    ffn_dim: int = field(default=4096, metadata={"range": (1, None), "help": "FFN hidden width"})
    lm_dim: int = field(default=4096, metadata={"range": (1, None), "help": "LM embedding width (output)"})
    conv_kernel: int = field(default=3, metadata={"range": (1, None), "help": "downsampling conv kernel"})
    conv_stride: int = field(default=2, metadata={"range": (1, None), "help": "downsampling factor"})
    rope_theta: float = field(default=10000.0, metadata={"range": (1.0, None), "help": "rotary base"})
    dropout: float = field(default=0.0, metadata={"range": (0.0, 1.0), "help": "attention / FFN dropout"})
    norm_eps: float = field(default=1e-5, metadata={"range": (0.0, 1.0), "help": "LayerNorm epsilon"})
    span_position: float = field(default=0.0, metadata={
        "range": (0.0, 100.0), "help": "amplitude (in LM token-embedding stds) of a fixed sinusoidal code of each "
                                       "placeholder's index in its audio span, added to the adapter outputs "
                                       "(span_position_code); 0 = off"})

    def __post_init__(self):
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"SpeechAdapterConfig: dim {self.dim} must split into {self.n_heads} heads of even width")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    # Paper Sec 8: dim 3072, FFN 4096, on the 1536-wide Conformer, into Llama 3 8B (4096).
    "paper": dict(encoder_dim=1536, dim=3072, n_heads=24, ffn_dim=4096, lm_dim=4096),
    "small": dict(encoder_dim=256, dim=512, n_heads=8, ffn_dim=1024, lm_dim=576),
    "tiny": dict(encoder_dim=64, dim=64, n_heads=4, ffn_dim=128, lm_dim=64),
}


def preset(name: str, **overrides) -> SpeechAdapterConfig:
    """Config of a named preset with field overrides (e.g. lm_dim=the LM's dim)."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown speech adapter preset '{name}'{hint}; known presets: {', '.join(PRESETS)}")
    return SpeechAdapterConfig(**{**PRESETS[name], **overrides})


class SpeechAdapter(nn.Module):
    """hidden (B, T, encoder_dim) + lengths (B,) -> embeddings (B, T', lm_dim) + lengths (B,), with
    T' = output_lengths(T) = (T + 2 * (kernel // 2) - kernel) // stride + 1 (= ceil(T / 2) for 3 / 2)."""

    def __init__(self, config: SpeechAdapterConfig):
        super().__init__()
        c = self.config = config
        self.conv = nn.Conv1d(c.encoder_dim, c.dim, c.conv_kernel, stride=c.conv_stride, padding=c.conv_kernel // 2)
        self.attn_norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.attn = SelfAttention(c.dim, c.n_heads, c.dropout)
        self.ffn = FeedForward(c.dim, c.ffn_dim, c.dropout, c.norm_eps)
        self.final_norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.proj = nn.Linear(c.dim, c.lm_dim)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        c = self.config
        return (lengths + 2 * (c.conv_kernel // 2) - c.conv_kernel) // c.conv_stride + 1

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor):
        c = self.config
        if hidden.dim() != 3 or hidden.shape[-1] != c.encoder_dim:
            raise ValueError(f"SpeechAdapter expects (B, T, {c.encoder_dim}), got {tuple(hidden.shape)}")
        bad = ((lengths < 1) | (lengths > hidden.shape[1])).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"utterance {bad[0]} of the batch has length {int(lengths[bad[0]])}, outside "
                             f"1..{hidden.shape[1]} encoder frames")
        hidden = hidden * valid_mask(lengths, hidden.shape[1])[..., None].to(hidden.dtype)
        x = self.conv(hidden.transpose(1, 2)).transpose(1, 2)  # (B, T', dim)
        out_lengths = self.output_lengths(lengths)
        valid = valid_mask(out_lengths, x.shape[1])
        rotary = rotary_cos_sin(x.shape[1], c.dim // c.n_heads, c.rope_theta, x.device, x.dtype)
        x = x + self.attn(self.attn_norm(x), valid[:, None, None, :], rotary)
        x = x + self.ffn(x)
        out = self.proj(self.final_norm(x))
        return out * valid[..., None].to(out.dtype), out_lengths

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def span_position_code(length: int, dim: int, base: float = 100.0, device=None) -> torch.Tensor:
    """(length, dim) fixed sinusoidal code of positions 0..length-1 (sin on even, cos on odd channels), unit
    amplitude. Added to an audio span's placeholders, it makes a value the LM copies carry where it was read, which
    rotary attention alone does not: a copier then finds the next token by position, not only by content (a digit
    that recurs in a string otherwise sends it back to the first occurrence)."""
    position = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    frequency = torch.exp(-math.log(base) * torch.arange(0, dim, 2, device=device) / dim)
    code = torch.zeros(length, dim, device=device)
    code[:, 0::2] = torch.sin(position * frequency)
    code[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return code

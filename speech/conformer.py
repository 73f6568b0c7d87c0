"""The Conformer speech encoder (paper Sec 8): log-mel (B, T, 80) -> stride-4 stacking + projection
(40 ms frames) -> Conformer blocks -> (B, ceil(T/4), dim).

A block, as torchaudio.models.Conformer's layer (Gulati et al. 2020):
    x = x + 1/2 FFN1(x)               Macaron half-step: LayerNorm, Linear, SiLU, Linear
    x = x + MHSA(LayerNorm(x))        rotary position embeddings on q and k (`rotary=False`: none)
    x = x + Conv(x)                   LayerNorm, pointwise (2 dim), GLU, depthwise (kernel 7), norm, SiLU, pointwise
    x = x + 1/2 FFN2(x)
    x = LayerNorm(x)
With `rotary=False` a block computes exactly what torchaudio's layer computes given the same weights
(`block_state_from_torchaudio` converts them; tested).

Padding never influences valid frames: attention masks padded keys, the depthwise convolution reads zeros
at padded frames, and the convolution's BatchNorm takes its batch statistics over valid frames only
(`MaskedBatchNorm1d`; `conv_norm="layernorm"` is the batch-independent alternative). torchaudio's layer
does none of the last two, so it matches this block on padded batches only where padding is not read.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .features import FrameStacker, valid_mask
from .rotary import apply_rotary, rotary_cos_sin

CONV_NORMS = ("batchnorm", "layernorm")


@dataclass
class ConformerConfig:
    """Shape of the Conformer encoder (defaults: the paper's ~1B encoder)."""
    n_mels: int = field(default=80, metadata={"range": (1, None), "help": "input feature channels"})
    stack: int = field(default=4, metadata={"range": (1, None), "help": "frames stacked per encoder frame"})
    dim: int = field(default=1536, metadata={"range": (1, None), "help": "model width"})
    n_layers: int = field(default=24, metadata={"range": (1, None), "help": "Conformer blocks"})
    n_heads: int = field(default=24, metadata={"range": (1, None), "help": "attention heads"})
    ffn_dim: int = field(default=4096, metadata={"range": (1, None), "help": "hidden width of each Macaron FFN"})
    conv_kernel: int = field(default=7, metadata={"range": (1, None), "help": "depthwise kernel (odd)"})
    conv_norm: str = field(default="batchnorm", metadata={"help": "batchnorm (masked, as torchaudio) | layernorm"})
    rotary: bool = field(default=True, metadata={"help": "rotary position embeddings in attention"})
    rope_theta: float = field(default=10000.0, metadata={"range": (1.0, None), "help": "rotary base"})
    dropout: float = field(default=0.0, metadata={"range": (0.0, 1.0), "help": "dropout in every sub-module"})
    norm_eps: float = field(default=1e-5, metadata={"range": (0.0, 1.0), "help": "LayerNorm / BatchNorm epsilon"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute blocks in backward"})

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"ConformerConfig: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.rotary and (self.dim // self.n_heads) % 2:
            raise ValueError(f"ConformerConfig: head_dim {self.dim // self.n_heads} must be even for rotary")
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"ConformerConfig: conv_kernel must be odd ('same' padding), got {self.conv_kernel}")
        if self.conv_norm not in CONV_NORMS:
            raise ValueError(f"ConformerConfig: conv_norm must be one of {CONV_NORMS}, got {self.conv_norm!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ConformerConfig":
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown ConformerConfig keys: {unknown}")
        return cls(**d)


PRESETS: dict[str, dict] = {
    # Paper Sec 8: 24 layers, dim 1536, two Macaron FFNs of 4096, conv kernel 7, 24 rotary heads.
    "conformer-1b": dict(dim=1536, n_layers=24, n_heads=24, ffn_dim=4096, conv_kernel=7),
    # CPU-sized encoders for the quickstart and tests.
    "small": dict(dim=256, n_layers=6, n_heads=4, ffn_dim=1024, conv_kernel=7),
    "tiny": dict(dim=64, n_layers=2, n_heads=4, ffn_dim=128, conv_kernel=7),
}


def preset(name: str, **overrides) -> ConformerConfig:
    """Config of a named preset with field overrides. Unknown name -> error listing the presets."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown Conformer preset '{name}'{hint}; known presets: {', '.join(PRESETS)}")
    return ConformerConfig(**{**PRESETS[name], **overrides})


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. the recompute of a checkpointed block)."""
    return torch._C._current_graph_task_id() != -1


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over (B, C, T) whose batch statistics use only valid frames (valid (B, T) bool).
    Same parameters and buffers as nn.BatchNorm1d; equal to it when nothing is padded. Running
    statistics are not updated again when a checkpointed block is recomputed in backward."""

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        xf = x.float()
        if self.training or not self.track_running_stats:
            weights = (torch.ones_like(xf[:, :1]) if valid is None else valid[:, None, :].float())  # (B, 1, T)
            count = weights.sum()
            mean = (xf * weights).sum((0, 2)) / count
            var = ((xf - mean[:, None]).pow(2) * weights).sum((0, 2)) / count
            if self.training and self.track_running_stats and not _in_backward():
                self._update_running_stats(mean, var, count)
        else:
            mean, var = self.running_mean.float(), self.running_var.float()
        y = (xf - mean[:, None]) * torch.rsqrt(var[:, None] + self.eps)
        if self.affine:
            y = y * self.weight.float()[:, None] + self.bias.float()[:, None]
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean, var, count):
        self.num_batches_tracked += 1
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * (count / (count - 1).clamp(min=1))
        self.running_mean.mul_(1 - momentum).add_(momentum * mean.to(self.running_mean.dtype))
        self.running_var.mul_(1 - momentum).add_(momentum * unbiased.to(self.running_var.dtype))


class FeedForward(nn.Module):
    """LayerNorm, Linear(dim, hidden), SiLU, dropout, Linear(hidden, dim), dropout: (B, T, dim) -> same."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, eps: float = 1e-5):
        super().__init__()
        self.layer_norm = nn.LayerNorm(dim, eps=eps)
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.linear2(self.dropout(F.silu(self.linear1(self.layer_norm(x))))))


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention with biases and optional rotary q/k."""

    def __init__(self, dim: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = n_heads, dim // n_heads, dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, rotary: Optional[tuple] = None) -> torch.Tensor:
        """x (B, T, dim); attn_mask (B, 1, 1, T) bool, True = key may be attended; rotary: (cos, sin)
        each (1, 1, T, head_dim) or None -> (B, T, dim)."""
        b, t, d = x.shape
        q, k, v = (proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class ConvolutionModule(nn.Module):
    """LayerNorm, pointwise (dim -> 2 dim), GLU, depthwise conv (kernel k, 'same'), norm, SiLU,
    pointwise (dim -> dim), dropout: (B, T, dim) -> same. Padded frames are zeroed before the depthwise
    convolution so they never leak into valid frames."""

    def __init__(self, dim: int, kernel: int, norm: str = "batchnorm", dropout: float = 0.0, eps: float = 1e-5):
        super().__init__()
        self.layer_norm = nn.LayerNorm(dim, eps=eps)
        self.pointwise_in = nn.Linear(dim, 2 * dim)
        self.depthwise = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = MaskedBatchNorm1d(dim, eps=eps) if norm == "batchnorm" else nn.LayerNorm(dim, eps=eps)
        self.pointwise_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        h = F.glu(self.pointwise_in(self.layer_norm(x)), dim=-1)
        h = h * valid[..., None].to(h.dtype)
        h = self.depthwise(h.transpose(1, 2))  # (B, dim, T)
        if isinstance(self.norm, MaskedBatchNorm1d):
            h = self.norm(h, valid).transpose(1, 2)
        else:
            h = self.norm(h.transpose(1, 2))
        return self.dropout(self.pointwise_out(F.silu(h)))


class ConformerBlock(nn.Module):
    """One Conformer block (see the module docstring): (B, T, dim) -> (B, T, dim)."""

    def __init__(self, config: ConformerConfig):
        super().__init__()
        c = config
        self.ffn1 = FeedForward(c.dim, c.ffn_dim, c.dropout, c.norm_eps)
        self.attn_norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.attn = SelfAttention(c.dim, c.n_heads, c.dropout)
        self.attn_dropout = nn.Dropout(c.dropout)
        self.conv = ConvolutionModule(c.dim, c.conv_kernel, c.conv_norm, c.dropout, c.norm_eps)
        self.ffn2 = FeedForward(c.dim, c.ffn_dim, c.dropout, c.norm_eps)
        self.final_norm = nn.LayerNorm(c.dim, eps=c.norm_eps)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, rotary: Optional[tuple] = None) -> torch.Tensor:
        """x (B, T, dim), valid (B, T) bool, rotary (cos, sin) or None."""
        x = x + 0.5 * self.ffn1(x)
        x = x + self.attn_dropout(self.attn(self.attn_norm(x), valid[:, None, None, :], rotary))
        x = x + self.conv(x, valid)
        x = x + 0.5 * self.ffn2(x)
        return self.final_norm(x)


class ConformerEncoder(nn.Module):
    """features (B, T, n_mels) + lengths (B,) -> hidden (B, ceil(T/stack), dim) + lengths ceil(lengths/stack).
    Padded output frames are zero."""

    def __init__(self, config: ConformerConfig):
        super().__init__()
        self.config = config
        self.stacker = FrameStacker(config.n_mels, config.dim, config.stack)
        self.input_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(ConformerBlock(config) for _ in range(config.n_layers))
        self.gradient_checkpointing = config.gradient_checkpointing

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Encoder frames for `lengths` feature frames."""
        return self.stacker.output_lengths(lengths)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor):
        c = self.config
        if features.dim() != 3 or features.shape[-1] != c.n_mels:
            raise ValueError(f"ConformerEncoder expects features (B, T, {c.n_mels}), got {tuple(features.shape)}")
        if lengths.shape != features.shape[:1]:
            raise ValueError(f"lengths must be ({features.shape[0]},), got {tuple(lengths.shape)}")
        bad = ((lengths < 1) | (lengths > features.shape[1])).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"utterance {bad[0]} of the batch has length {int(lengths[bad[0]])}, outside "
                             f"1..{features.shape[1]} feature frames")
        x, out_lengths = self.stacker(features, lengths.to(features.device))
        x = self.input_dropout(x)
        valid = valid_mask(out_lengths, x.shape[1])
        rotary = None
        if c.rotary:
            rotary = rotary_cos_sin(x.shape[1], c.dim // c.n_heads, c.rope_theta, x.device, x.dtype)
        for block in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, valid, rotary, use_reentrant=False)
            else:
                x = block(x, valid, rotary)
        return x * valid[..., None].to(x.dtype), out_lengths

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each block in the backward pass (activation checkpointing)."""
        self.gradient_checkpointing = True

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def block_state_from_torchaudio(layer_state: dict) -> dict:
    """State dict of a torchaudio.models.conformer.ConformerLayer -> the same weights named for
    `ConformerBlock` (pointwise Conv1d kernels (out, in, 1) become Linear weights (out, in))."""
    s = dict(layer_state)
    out = {}
    for ffn in ("ffn1", "ffn2"):
        for ta, ours in (("0", "layer_norm"), ("1", "linear1"), ("4", "linear2")):
            for p in ("weight", "bias"):
                out[f"{ffn}.{ours}.{p}"] = s[f"{ffn}.sequential.{ta}.{p}"]
    for p in ("weight", "bias"):
        out[f"attn_norm.{p}"] = s[f"self_attn_layer_norm.{p}"]
        out[f"final_norm.{p}"] = s[f"final_layer_norm.{p}"]
        out[f"conv.layer_norm.{p}"] = s[f"conv_module.layer_norm.{p}"]
        out[f"attn.out_proj.{p}"] = s[f"self_attn.out_proj.{p}"]
        for name, chunk in zip(("q_proj", "k_proj", "v_proj"), s[f"self_attn.in_proj_{p}"].chunk(3, dim=0)):
            out[f"attn.{name}.{p}"] = chunk
        out[f"conv.pointwise_in.{p}"] = s[f"conv_module.sequential.0.{p}"].squeeze(-1) if p == "weight" \
            else s[f"conv_module.sequential.0.{p}"]
        out[f"conv.depthwise.{p}"] = s[f"conv_module.sequential.2.{p}"]
        out[f"conv.pointwise_out.{p}"] = s[f"conv_module.sequential.5.{p}"].squeeze(-1) if p == "weight" \
            else s[f"conv_module.sequential.5.{p}"]
    for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        out[f"conv.norm.{p}"] = s[f"conv_module.sequential.3.{p}"]
    return out

"""Speech front end: 16 kHz waveform -> 80-dim log-mel frames (25 ms window, 10 ms hop) -> normalised
-> stride-4 frame stacking + linear projection (40 ms frames). Lengths travel with every tensor.

Log-mel choice: `torchaudio.transforms.MelSpectrogram` (batched, runs on the GPU, no per-utterance loop;
Kaldi `fbank` works one utterance at a time). Settings: n_fft = win_length = 400 (25 ms), hop 160 (10 ms),
Hann window, power 2, HTK mel scale from 0 to 8 kHz, and **center=False**: frame j covers samples
[160 j, 160 j + 400), so an utterance of n >= 400 samples has 1 + (n - 400) // 160 frames and none of
them reads a padded sample (a padded batch gives each utterance exactly the frames it gets alone).
Values are log(mel + 1e-6), computed in float32 whatever the autocast state.

Normalisation (`FeatureConfig.normalization`):
- "utterance": each utterance's mel channels to zero mean / unit variance over its own valid frames;
- "global": (x - mean) / std with per-channel statistics gathered over a data set (`FeatureStats`,
  saved/loaded as safetensors and kept as buffers of `LogMelFrontend`, so they travel with checkpoints);
- "none": raw log-mel.
Padded frames are zero after every variant.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch
import torchaudio
from einops import rearrange
from torch import nn

SAMPLE_RATE = 16000
NORMALIZATIONS = ("utterance", "global", "none")


def valid_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """lengths (B,) -> (B, max_len) bool, True at valid (non-padded) positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def resampled_length(n_samples: int, orig_rate: int, target_rate: int = SAMPLE_RATE) -> int:
    """Samples after `resample` (torchaudio's rule: ceil(n * target / orig))."""
    return math.ceil(n_samples * target_rate / orig_rate)


def resample(waveform: torch.Tensor, orig_rate: int, target_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """(..., N) float waveform at `orig_rate` -> (..., resampled_length(N)) at `target_rate` (windowed sinc,
    torchaudio.functional.resample). Returned unchanged when the rates agree."""
    if orig_rate <= 0 or target_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {target_rate}")
    if orig_rate == target_rate:
        return waveform
    return torchaudio.functional.resample(waveform.float(), orig_rate, target_rate)


@dataclass
class FeatureConfig:
    """Log-mel front-end settings (defaults: the paper's 80-dim, 25 ms / 10 ms features at 16 kHz)."""
    sample_rate: int = field(default=SAMPLE_RATE, metadata={"range": (1, None), "help": "input sample rate (Hz)"})
    n_mels: int = field(default=80, metadata={"range": (1, None), "help": "mel channels"})
    win_ms: float = field(default=25.0, metadata={"range": (1.0, None), "help": "analysis window (ms)"})
    hop_ms: float = field(default=10.0, metadata={"range": (1.0, None), "help": "frame hop (ms)"})
    normalization: str = field(default="utterance", metadata={"help": "utterance | global | none"})
    norm_eps: float = field(default=1e-5, metadata={"range": (0.0, 1.0), "help": "variance floor"})

    def __post_init__(self):
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"FeatureConfig.normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")

    @property
    def win_length(self) -> int:
        return round(self.sample_rate * self.win_ms / 1000)

    @property
    def hop_length(self) -> int:
        return round(self.sample_rate * self.hop_ms / 1000)

    def num_frames(self, n_samples: torch.Tensor | int):
        """Feature frames for `n_samples` samples (0 when shorter than one window)."""
        if isinstance(n_samples, torch.Tensor):
            return torch.where(n_samples >= self.win_length, (n_samples - self.win_length) // self.hop_length + 1, 0)
        return (n_samples - self.win_length) // self.hop_length + 1 if n_samples >= self.win_length else 0


class FeatureStats:
    """Per-channel mean / std of valid feature frames over a data set (float64 running sums)."""

    def __init__(self, n_mels: int = 80):
        self.total = torch.zeros(n_mels, dtype=torch.float64)
        self.total_sq = torch.zeros(n_mels, dtype=torch.float64)
        self.count = 0

    def update(self, features: torch.Tensor, lengths: torch.Tensor) -> None:
        """Add the valid frames of features (B, T, n_mels) with lengths (B,)."""
        frames = features[valid_mask(lengths, features.shape[1])].double().cpu()  # (N, n_mels)
        self.total += frames.sum(0)
        self.total_sq += frames.pow(2).sum(0)
        self.count += frames.shape[0]

    @classmethod
    def from_batches(cls, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n_mels: int = 80) -> "FeatureStats":
        """Statistics of an iterable of (features (B, T, n_mels), lengths (B,)) pairs (raw log-mel)."""
        stats = cls(n_mels)
        for features, lengths in batches:
            stats.update(features, lengths)
        return stats

    @property
    def mean(self) -> torch.Tensor:
        self._check_nonempty()
        return (self.total / self.count).float()

    def std(self, eps: float = 1e-5) -> torch.Tensor:
        self._check_nonempty()
        var = (self.total_sq / self.count - (self.total / self.count).pow(2)).clamp(min=0)
        return (var + eps).sqrt().float()

    def _check_nonempty(self):
        if self.count == 0:
            raise ValueError("FeatureStats has seen no frames: update() it with some features first")

    def save(self, path) -> None:
        from safetensors.torch import save_file
        save_file({"total": self.total, "total_sq": self.total_sq,
                   "count": torch.tensor([self.count], dtype=torch.int64)}, str(path))

    @classmethod
    def load(cls, path) -> "FeatureStats":
        from safetensors.torch import load_file
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"feature statistics file not found: {path}")
        tensors = load_file(str(path))
        missing = {"total", "total_sq", "count"} - set(tensors)
        if missing:
            raise ValueError(f"{path}: not a FeatureStats file (missing {sorted(missing)})")
        stats = cls(tensors["total"].numel())
        stats.total, stats.total_sq = tensors["total"].double(), tensors["total_sq"].double()
        stats.count = int(tensors["count"][0])
        return stats


def normalize_per_utterance(features: torch.Tensor, lengths: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """features (B, T, C): each row to zero mean / unit variance per channel over its valid frames;
    padded frames become 0. Pure silence (zero variance) gives zeros, not NaN."""
    mask = valid_mask(lengths, features.shape[1])[..., None].to(features.dtype)  # (B, T, 1)
    count = lengths.clamp(min=1).to(features.dtype)[:, None, None]
    mean = (features * mask).sum(1, keepdim=True) / count
    var = ((features - mean).pow(2) * mask).sum(1, keepdim=True) / count
    return (features - mean) * torch.rsqrt(var + eps) * mask


class LogMelFrontend(nn.Module):
    """waveform (B, N) or (N,) float at `config.sample_rate` + sample lengths (B,) -> normalised log-mel
    features (B, T, n_mels) float32 and frame lengths (B,). A 1-D waveform is a batch of one."""

    def __init__(self, config: Optional[FeatureConfig] = None, stats: Optional[FeatureStats] = None):
        super().__init__()
        self.config = config = config or FeatureConfig()
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=config.sample_rate, n_fft=config.win_length, win_length=config.win_length,
            hop_length=config.hop_length, n_mels=config.n_mels, power=2.0, center=False)
        if config.normalization == "global" and stats is None:
            raise ValueError("FeatureConfig.normalization='global' needs FeatureStats (FeatureStats.load(path))")
        mean = stats.mean if stats is not None else torch.zeros(config.n_mels)
        std = stats.std(config.norm_eps) if stats is not None else torch.ones(config.n_mels)
        if mean.numel() != config.n_mels:
            raise ValueError(f"FeatureStats has {mean.numel()} channels, the front end makes {config.n_mels}")
        self.register_buffer("global_mean", mean)
        self.register_buffer("global_std", std)

    def log_mel(self, waveform: torch.Tensor, lengths: Optional[torch.Tensor] = None):
        """Raw log-mel (no normalisation): (B, T, n_mels) float32, frame lengths (B,); padded frames 0."""
        if waveform.dim() == 1:
            waveform = waveform[None]
        if waveform.dim() != 2:
            raise ValueError(f"waveform must be (B, N) or (N,), got shape {tuple(waveform.shape)}")
        b, n = waveform.shape
        if lengths is None:
            lengths = torch.full((b,), n, dtype=torch.long, device=waveform.device)
        lengths = lengths.to(device=waveform.device, dtype=torch.long)
        if lengths.shape != (b,) or bool((lengths > n).any()):
            raise ValueError(f"lengths {lengths.tolist()} do not fit a waveform batch of shape {(b, n)}")
        too_short = (lengths < self.config.win_length).nonzero().flatten().tolist()
        if too_short:
            i = too_short[0]
            raise ValueError(f"utterance {i} of the batch has {int(lengths[i])} samples, shorter than one "
                             f"{self.config.win_ms:g} ms window ({self.config.win_length} samples)")
        with torch.autocast(waveform.device.type, enabled=False):
            mel = self.mel(waveform.float())  # (B, n_mels, T)
            features = torch.log(mel + 1e-6).transpose(1, 2)
        frame_lengths = self.config.num_frames(lengths)
        return features * valid_mask(frame_lengths, features.shape[1])[..., None], frame_lengths

    def forward(self, waveform: torch.Tensor, lengths: Optional[torch.Tensor] = None):
        """-> features (B, T, n_mels) normalised per config, frame lengths (B,)."""
        features, frame_lengths = self.log_mel(waveform, lengths)
        mode = self.config.normalization
        if mode == "utterance":
            features = normalize_per_utterance(features, frame_lengths, self.config.norm_eps)
        elif mode == "global":
            mask = valid_mask(frame_lengths, features.shape[1])[..., None]
            features = (features - self.global_mean) / self.global_std * mask
        return features, frame_lengths


def stack_frames(features: torch.Tensor, lengths: torch.Tensor, stack: int):
    """features (B, T, C) -> (B, ceil(T / stack), stack * C), lengths ceil(lengths / stack).

    Stacked frame i is the concatenation of frames stack*i .. stack*i + stack-1 (frame-major). Padded
    frames are zeroed first, so a partial last group is filled with zeros exactly as when the utterance
    runs alone."""
    b, t, _ = features.shape
    features = features * valid_mask(lengths, t)[..., None].to(features.dtype)
    pad = (-t) % stack
    if pad:
        features = torch.nn.functional.pad(features, (0, 0, 0, pad))
    stacked = rearrange(features, "b (t s) c -> b t (s c)", s=stack)
    return stacked, (lengths + stack - 1) // stack


class FrameStacker(nn.Module):
    """Stride-`stack` frame stacking + linear projection: (B, T, in_dim) -> (B, ceil(T/stack), out_dim),
    lengths -> ceil(lengths / stack). With 10 ms frames and stack 4: 40 ms frames. Padded outputs are 0."""

    def __init__(self, in_dim: int = 80, out_dim: int = 1536, stack: int = 4):
        super().__init__()
        self.stack = stack
        self.proj = nn.Linear(stack * in_dim, out_dim)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return (lengths + self.stack - 1) // self.stack

    def forward(self, features: torch.Tensor, lengths: torch.Tensor):
        stacked, out_lengths = stack_frames(features, lengths, self.stack)
        out = self.proj(stacked)
        return out * valid_mask(out_lengths, out.shape[1])[..., None].to(out.dtype), out_lengths

"""Waveform augmentation for training on synthetic speech.

    waveforms = telephone_band(waveforms, lengths, fraction=0.5)   # (B, T) at 16 kHz, some rows band-limited

`telephone_band` gives a random `fraction` of the utterances the bandwidth of 8 kHz telephone audio (the real
Asterisk prompts): each chosen row is resampled to 8 kHz and back with torchaudio's windowed-sinc resampler,
which removes everything above 4 kHz. Draws from the global torch RNG (saved and restored with a checkpoint).
"""
from __future__ import annotations

import torch
import torchaudio.functional as AF


def telephone_band(waveforms: torch.Tensor, lengths: torch.Tensor, fraction: float, sample_rate: int = 16000,
                   band_rate: int = 8000) -> torch.Tensor:
    """waveforms (B, T) at sample_rate, lengths (B,) -> (B, T): rows picked with probability `fraction`
    resampled to band_rate and back (length kept; samples past a row's length stay zero)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"telephone_band fraction must lie in [0, 1], got {fraction}")
    if fraction == 0.0:
        return waveforms
    picked = torch.rand(waveforms.shape[0]) < fraction
    if not picked.any():
        return waveforms
    rows = waveforms[picked]
    narrow = AF.resample(AF.resample(rows, sample_rate, band_rate), band_rate, sample_rate)
    t = waveforms.shape[1]
    narrow = narrow[:, :t] if narrow.shape[1] >= t else torch.nn.functional.pad(narrow, (0, t - narrow.shape[1]))
    inside = torch.arange(t, device=waveforms.device)[None] < lengths[picked].to(waveforms.device)[:, None]
    out = waveforms.clone()
    out[picked] = narrow * inside
    return out

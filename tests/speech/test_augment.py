"""speech/augment.py: telephone_band removes what lies above 4 kHz from the rows it picks, and only from those."""
import math

import pytest
import torch

from speech.augment import telephone_band


def _tones(n_rows: int, n: int = 16000) -> torch.Tensor:
    t = torch.arange(n) / 16000
    return torch.stack([torch.sin(2 * math.pi * 1000 * t) + torch.sin(2 * math.pi * 6000 * t)] * n_rows)


def test_band_limits_picked_rows_and_keeps_padding():
    waves = _tones(3)
    lengths = torch.tensor([16000, 8000, 16000])
    out = telephone_band(waves, lengths, 1.0)
    spectrum = torch.fft.rfft(out[0]).abs()
    assert out.shape == waves.shape and spectrum[6000] < 1e-3 * spectrum[1000]  # 6 kHz gone, 1 kHz kept
    assert spectrum[1000] > 0.95 * torch.fft.rfft(waves[0]).abs()[1000]
    assert out[1, 8000:].abs().max() == 0  # past its length a row stays silent


def test_fraction_zero_is_identity_and_bad_fraction_is_refused():
    waves = _tones(4)
    assert telephone_band(waves, torch.full((4,), 16000), 0.0) is waves
    torch.manual_seed(0)
    half = telephone_band(waves, torch.full((4,), 16000), 0.5)
    changed = [not torch.equal(half[i], waves[i]) for i in range(4)]
    assert any(changed) and not all(changed)  # seed 0 picks some rows, not all
    with pytest.raises(ValueError, match="fraction"):
        telephone_band(waves, torch.full((4,), 16000), 1.5)

"""Log-mel front end, normalisation, global statistics, resampling and frame stacking."""
import math

import pytest
import torch
import torchaudio

from speech.features import (FeatureConfig, FeatureStats, FrameStacker, LogMelFrontend, normalize_per_utterance,
                             resample, resampled_length, stack_frames, valid_mask)


def sine(freq, seconds, rate=16000, phase=0.0):
    t = torch.arange(int(seconds * rate)) / rate
    return 0.5 * torch.sin(2 * math.pi * freq * t + phase)


def test_log_mel_shapes_and_frame_count():
    frontend = LogMelFrontend(FeatureConfig(normalization="none"))
    wave = torch.randn(2, 16000) * 0.1
    features, lengths = frontend(wave, torch.tensor([16000, 8000]))
    # center=False: 1 + (n - 400) // 160 frames
    assert features.shape == (2, 98, 80) and features.dtype == torch.float32
    assert lengths.tolist() == [98, 48]
    assert features[1, 48:].abs().sum() == 0
    single, single_len = frontend(wave[0])
    assert single.shape == (1, 98, 80) and single_len.tolist() == [98]


def test_a_tone_lands_in_its_mel_channel():
    frontend = LogMelFrontend(FeatureConfig(normalization="none"))
    features, _ = frontend(sine(1000.0, 0.5))
    bank = torchaudio.functional.melscale_fbanks(201, 0.0, 8000.0, 80, 16000)  # (freq bins, mels), 40 Hz bins
    expected = int(bank[1000 // 40].argmax())
    assert (features[0].argmax(-1) == expected).all()


def normalisation_rounding(raw: torch.Tensor, normalised: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Float32 rounding bound of per-utterance normalisation, per element: raw (T, C) log-mel, normalised (T, C).

    A sum of T float32 terms carries at most T * u * sum|x| of rounding (u the unit roundoff), however the
    terms are ordered, so the channel mean is off by <= T * u * mean|x| and the variance by <= 3 T * u * var;
    over the channel's std that is T * u * (mean|x| / std + 2 |normalised|) (first order). Batched and
    single-utterance calls sum in different orders (vector widths differ by CPU), so only this bound holds
    on every machine; channels of near-constant log-mel (std ~ sqrt(eps)) amplify it most.
    """
    frames, u = raw.shape[0], torch.finfo(torch.float32).eps / 2
    std = (raw.var(0, unbiased=False) + eps).sqrt()
    return frames * u * (raw.abs().mean(0) / std + 2 * normalised.abs()) + 4 * u * normalised.abs()


@pytest.mark.parametrize("normalization", ["none", "utterance"])
def test_padded_batch_equals_each_utterance_alone(normalization):
    torch.manual_seed(0)
    frontend = LogMelFrontend(FeatureConfig(normalization=normalization))
    waves = [sine(300.0, 1.0) + 0.01 * torch.randn(16000), sine(700.0, 0.61), torch.randn(5000) * 0.2]
    lengths = torch.tensor([len(w) for w in waves])
    batch = torch.zeros(3, 16000)
    for i, w in enumerate(waves):
        batch[i, :len(w)] = w
    batch[1, len(waves[1]):] = 5.0  # garbage in the padding must not matter
    features, frame_lengths = frontend(batch, lengths)
    raw_features, _ = frontend.log_mel(batch, lengths)
    for i, w in enumerate(waves):
        alone, alone_len = frontend(w)
        n = int(alone_len[0])
        assert frame_lengths[i] == n
        # The STFT and mel projection work frame by frame: equal to rounding; normalising sums over frames.
        tolerance = 1e-6 * (1 + alone[0].abs())
        if normalization == "utterance":
            tolerance = tolerance + normalisation_rounding(raw_features[i, :n], alone[0])
        assert ((features[i, :n] - alone[0]).abs() <= tolerance).all(), (features[i, :n] - alone[0]).abs().max()


def test_per_utterance_normalisation_and_silence():
    torch.manual_seed(0)
    frontend = LogMelFrontend(FeatureConfig(normalization="utterance"))
    features, lengths = frontend(torch.randn(2, 8000), torch.tensor([8000, 6000]))
    valid = features[1, :lengths[1]]
    torch.testing.assert_close(valid.mean(0), torch.zeros(80), atol=1e-4, rtol=0)
    torch.testing.assert_close(valid.std(0, unbiased=False), torch.ones(80), atol=1e-3, rtol=0)
    assert features[1, lengths[1]:].abs().sum() == 0
    silent, _ = frontend(torch.zeros(4000))
    assert torch.isfinite(silent).all() and silent.abs().max() == 0


def test_global_statistics_save_load_and_normalise(tmp_path):
    torch.manual_seed(0)
    raw = LogMelFrontend(FeatureConfig(normalization="none"))
    batches = [raw(torch.randn(2, 6000) * s, torch.tensor([6000, 4000])) for s in (0.1, 0.5, 1.0)]
    stats = FeatureStats.from_batches(batches)
    frames = torch.cat([f[valid_mask(n, f.shape[1])] for f, n in batches]).double()
    assert stats.count == frames.shape[0]
    torch.testing.assert_close(stats.mean, frames.mean(0).float())
    torch.testing.assert_close(stats.std(0.0), frames.std(0, unbiased=False).float(), atol=1e-5, rtol=1e-5)
    stats.save(tmp_path / "stats.safetensors")
    loaded = FeatureStats.load(tmp_path / "stats.safetensors")
    assert loaded.count == stats.count and torch.equal(loaded.total, stats.total)

    frontend = LogMelFrontend(FeatureConfig(normalization="global"), loaded)
    wave = torch.randn(1, 6000) * 0.3
    features, lengths = frontend(wave)
    expected = (raw.log_mel(wave)[0] - stats.mean) / stats.std(1e-5)
    torch.testing.assert_close(features, expected)
    assert set(frontend.state_dict()) >= {"global_mean", "global_std"}  # stats travel with checkpoints
    with pytest.raises(ValueError, match="needs FeatureStats"):
        LogMelFrontend(FeatureConfig(normalization="global"))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        FeatureStats.load(tmp_path / "missing.safetensors")


def test_bad_inputs_are_named():
    frontend = LogMelFrontend()
    with pytest.raises(ValueError, match="utterance 1 .* 300 samples"):
        frontend(torch.randn(2, 1000), torch.tensor([1000, 300]))
    with pytest.raises(ValueError, match="lengths"):
        frontend(torch.randn(2, 1000), torch.tensor([1000, 2000]))
    with pytest.raises(ValueError, match="normalization"):
        FeatureConfig(normalization="per-speaker")


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resample_to_16k_keeps_the_tone(rate):
    wave = sine(440.0, 0.5, rate)
    out = resample(wave, rate)
    assert out.shape[-1] == resampled_length(wave.shape[-1], rate) == math.ceil(wave.shape[-1] * 16000 / rate)
    reference = sine(440.0, out.shape[-1] / 16000)[:out.shape[-1]]
    middle = slice(400, out.shape[-1] - 400)  # the filter's edges see zero padding
    assert (out[middle] - reference[middle]).abs().max() < 0.02
    assert resample(wave, 16000) is wave


def test_stack_frames_order_lengths_and_padding():
    features = torch.arange(2 * 10 * 3, dtype=torch.float32).view(2, 10, 3)
    stacked, lengths = stack_frames(features, torch.tensor([10, 5]), 4)
    assert stacked.shape == (2, 3, 12) and lengths.tolist() == [3, 2]
    torch.testing.assert_close(stacked[0, 1], features[0, 4:8].flatten())
    # partial group: frames 8, 9 then zeros; row 1 keeps frame 4 only in its second group
    torch.testing.assert_close(stacked[0, 2], torch.cat([features[0, 8:10].flatten(), torch.zeros(6)]))
    torch.testing.assert_close(stacked[1, 1], torch.cat([features[1, 4], torch.zeros(9)]))


def test_frame_stacker_padding_invariance():
    torch.manual_seed(0)
    stacker = FrameStacker(80, 32, 4)
    a, b = torch.randn(37, 80), torch.randn(22, 80)
    batch = torch.randn(2, 37, 80)  # padding filled with noise
    batch[0], batch[1, :22] = a, b
    out, lengths = stacker(batch, torch.tensor([37, 22]))
    assert out.shape == (2, 10, 32) and lengths.tolist() == [10, 6]
    alone, _ = stacker(b[None], torch.tensor([22]))
    torch.testing.assert_close(out[1, :6], alone[0])
    assert out[1, 6:].abs().sum() == 0
    torch.testing.assert_close(normalize_per_utterance(batch, torch.tensor([37, 22]))[1, 22:], torch.zeros(15, 80))

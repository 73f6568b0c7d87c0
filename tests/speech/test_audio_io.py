"""speech/audio_io.py: formats, channels and rates in; every bad input rejected with the file named."""
import math
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from speech.audio_io import AudioConfig, AudioError, AudioWarning, load_audio, load_audio_chunks, rms_dbfs, \
    save_audio


def _tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    mono = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return mono if channels == 1 else np.stack([mono * (1 + 0.1 * c) for c in range(channels)], axis=1)


def _dominant_hz(x: torch.Tensor, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x.numpy()))
    return float(np.fft.rfftfreq(x.numel(), 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize("suffix,rate,channels", [
    (".wav", 8000, 1), (".wav", 44100, 2), (".flac", 22050, 1), (".flac", 48000, 2), (".ogg", 16000, 1),
    (".ogg", 32000, 2)])
def test_formats_channels_and_rates_become_mono_16k(tmp_path, suffix, rate, channels):
    path = tmp_path / f"tone{suffix}"
    sf.write(path, _tone(0.5, rate, 1000.0, channels), rate)
    audio = load_audio(path)
    assert audio.waveform.dtype == torch.float32 and audio.waveform.ndim == 1
    assert audio.sample_rate == 16000 and audio.source_rate == rate and audio.channels == channels
    assert abs(audio.waveform.numel() - 8000) <= 1
    assert abs(_dominant_hz(audio.waveform, 16000) - 1000.0) <= 4.0
    assert not audio.silent and -25 < audio.rms_dbfs < -5


def test_resampling_is_torchaudios_and_stereo_is_the_channel_mean(tmp_path):
    data = _tone(0.3, 44100, 700.0, channels=2)
    path = tmp_path / "s.wav"
    sf.write(path, data, 44100, subtype="FLOAT")
    # float64 reference: the float32 resampler sums 475 taps of sum |x * k| <= 0.32 * 1.6 = 0.5 (kernel rounded to
    # float32 too): rounding <= 475 * u * 0.5 = 1.4e-5; the first channel alone is off by 1.5e-2, rolloff 0.945 by 5e-4
    expected = torchaudio.functional.resample(torch.from_numpy(data.mean(axis=1)).double(), 44100, 16000)
    assert torch.allclose(load_audio(path).waveform.double(), expected, rtol=0, atol=2e-5)


def test_missing_empty_corrupt_and_unsupported_files_are_named(tmp_path):
    cases = {}
    cases["missing"] = tmp_path / "nope.wav"
    (empty := tmp_path / "empty.wav").write_bytes(b"")
    cases["empty"] = empty
    sf.write(good := tmp_path / "good.wav", _tone(0.5, 16000), 16000)
    (corrupt := tmp_path / "corrupt.wav").write_bytes(good.read_bytes()[:4] + b"\x00" * 40 + b"garbage" * 50)
    cases["corrupt"] = corrupt
    (text := tmp_path / "notes.txt").write_text("this is not audio\n" * 20)
    cases["unsupported_format"] = text
    (mp4 := tmp_path / "clip.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(200))
    cases["unsupported_format "] = mp4
    for reason, path in cases.items():
        with pytest.raises(AudioError) as e:
            load_audio(path)
        assert e.value.reason == reason.strip() and str(path) in str(e.value), (reason, str(e.value))


def test_header_only_wav_is_empty(tmp_path):
    path = tmp_path / "zero_frames.wav"
    sf.write(path, np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="zero_frames.wav: no audio samples") as e:
        load_audio(path)
    assert e.value.reason == "empty"


def test_nan_and_inf_samples_are_rejected_with_their_position(tmp_path):
    data = _tone(0.5, 16000)
    data[4000] = np.nan
    data[5000] = np.inf
    sf.write(path := tmp_path / "nan.wav", data, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"nan.wav: 2 NaN/inf samples \(first at sample 4000, 0.250 s\)") as e:
        load_audio(path)
    assert e.value.reason == "non_finite"


def test_too_short_is_rejected_and_the_minimum_is_configurable(tmp_path):
    sf.write(path := tmp_path / "short.flac", _tone(0.05, 16000), 16000)
    with pytest.raises(AudioError, match=r"short.flac: too short: 0.050 s < min_seconds 0.1 s") as e:
        load_audio(path)
    assert e.value.reason == "too_short"
    assert load_audio(path, AudioConfig(min_seconds=0.04)).waveform.numel() == 800


def test_sample_rate_outside_8_to_48_khz_is_rejected(tmp_path):
    sf.write(path := tmp_path / "hi.wav", _tone(0.5, 96000), 96000)
    with pytest.raises(AudioError, match=r"hi.wav: sample rate 96000 Hz outside the supported 8000-48000 Hz"):
        load_audio(path)


def test_ten_minute_file_is_rejected_or_chunked_per_policy(tmp_path):
    rate = 8000
    data = _tone(600.0, rate, 300.0, amp=0.2)
    data[: 60 * rate] = 0.0  # the first minute is silent
    sf.write(path := tmp_path / "lecture.wav", data, rate)
    with pytest.raises(AudioError, match=r"lecture.wav: too long: 600.0 s > max_seconds 30.0 s") as e:
        load_audio(path)
    assert e.value.reason == "too_long"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pieces = load_audio_chunks(path, AudioConfig(long_policy="chunk", max_seconds=45.0, silence_policy="keep"))
    assert len(pieces) == 14 and all(p.duration <= 45.0 for p in pieces)
    assert sum(p.waveform.numel() for p in pieces) == 600 * 16000
    assert [round(p.offset, 3) for p in pieces[:2]] == [0.0, round(600 / 14, 3)]
    assert pieces[0].silent and not pieces[1].silent  # piece 0 = 0-42.9 s, all silence
    assert sum(issubclass(w.category, AudioWarning) for w in caught) == 1
    with pytest.raises(AudioError, match=r"lecture.wav: silence \(piece at 0.0 s\)|lecture.wav: silence"):
        load_audio_chunks(path, AudioConfig(long_policy="chunk", max_seconds=45.0))


def test_pure_silence_is_skipped_or_kept_per_policy(tmp_path):
    sf.write(path := tmp_path / "silence.wav", np.zeros(16000, np.float32), 16000)
    with pytest.raises(AudioError, match=r"silence.wav: silence: RMS -inf dBFS < silence_dbfs -60") as e:
        load_audio(path)
    assert e.value.reason == "silent"
    with pytest.warns(AudioWarning, match="silence.wav"):
        kept = load_audio(path, AudioConfig(silence_policy="keep"))
    assert kept.silent and kept.waveform.abs().max() == 0
    quiet = _tone(1.0, 16000, amp=1e-4)  # -83 dBFS: dithered-silence level
    sf.write(path2 := tmp_path / "quiet.flac", quiet, 16000)
    with pytest.raises(AudioError, match="quiet.flac: silence"):
        load_audio(path2)


def test_rms_and_save_round_trip(tmp_path):
    assert math.isclose(rms_dbfs(torch.full((100,), 0.5)), 20 * math.log10(0.5), abs_tol=1e-9)
    wave = torch.from_numpy(_tone(0.4, 16000, 523.0))
    path = save_audio(tmp_path / "sub" / "x.flac", wave)
    back = load_audio(path).waveform
    assert back.shape == wave.shape and (back - wave).abs().max() < 1e-4


def test_bad_config_values_are_refused():
    with pytest.raises(ValueError, match="long_policy"):
        AudioConfig(long_policy="truncate")
    with pytest.raises(ValueError, match="silence_policy"):
        AudioConfig(silence_policy="drop")
    with pytest.raises(ValueError, match="min_seconds"):
        AudioConfig(min_seconds=5.0, max_seconds=1.0)

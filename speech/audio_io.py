"""Audio files -> mono float32 waveforms at 16 kHz, with every bad input rejected by name.

    audio = load_audio("clip.flac")                       # Audio; audio.waveform (T,) float32 at 16 kHz
    pieces = load_audio_chunks("talk.wav", AudioConfig(long_policy="chunk", max_seconds=30))

Anything soundfile (libsndfile) reads goes in: WAV, FLAC, OGG/Vorbis, MP3, AIFF, ...; any number of
channels (averaged to mono); input rates `min_rate`..`max_rate` (8-48 kHz), resampled with torchaudio's
windowed-sinc resampler (`torchaudio.transforms.Resample`, i.e. `torchaudio.functional.resample` with its
kernel cached per rate pair).

Every rejection is an `AudioError` whose message starts with the file and whose `reason` is one of
`REASONS`. Checks run in this order: missing file, empty file, unreadable file (a known audio container
whose header is broken -> "corrupt"; anything else -> "unsupported_format"), no samples, sample rate
out of range, too short, too long (policy "reject"; with "chunk" the waveform is cut into equal pieces
of at most `max_seconds`), NaN/inf samples, silence (RMS below `silence_dbfs`; policy "skip" rejects,
"keep" warns with `AudioWarning` and returns it with `silent=True`).
"""
from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf
import torch

SAMPLE_RATE = 16_000
REASONS = ("missing", "empty", "corrupt", "unsupported_format", "sample_rate", "too_short", "too_long",
           "non_finite", "silent")

# First bytes of containers libsndfile knows: a file starting with one of these that libsndfile cannot
# open has a broken header ("corrupt"); any other unreadable file is an unsupported format.
_MAGIC = (b"RIFF", b"RIFX", b"RF64", b"fLaC", b"OggS", b"FORM", b".snd", b"ID3", b"\xff\xfb", b"\xff\xf3",
          b"\xff\xf2", b"caff", b"NIST", b"riff")
_AUDIO_SUFFIXES = {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".snd",
                   ".caf", ".w64", ".rf64"}


class AudioError(ValueError):
    """A file that cannot be used as speech input; the message names the file, `reason` is in REASONS."""

    def __init__(self, path, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{path}: {detail}")
        self.path, self.reason, self.detail = str(path), reason, detail


class AudioWarning(UserWarning):
    """A file that is used but looks wrong (silence kept by policy): `file: detail`."""


@dataclass
class AudioConfig:
    """How files are read and which ones are refused."""
    sample_rate: int = field(default=SAMPLE_RATE, metadata={"help": "output rate (Hz)"})
    min_rate: int = field(default=8_000, metadata={"help": "lowest input sample rate accepted (Hz)"})
    max_rate: int = field(default=48_000, metadata={"help": "highest input sample rate accepted (Hz)"})
    min_seconds: float = field(default=0.1, metadata={"help": "shorter files are rejected (too_short)"})
    max_seconds: float = field(default=30.0, metadata={"help": "longer files are rejected or chunked (long_policy)"})
    long_policy: Literal["reject", "chunk"] = field(default="reject", metadata={
        "help": "files over max_seconds: reject, or cut into equal pieces of at most max_seconds"})
    silence_dbfs: float = field(default=-60.0, metadata={"help": "RMS below this (dB full scale) counts as silence"})
    silence_policy: Literal["keep", "skip"] = field(default="skip", metadata={
        "help": "silent files: skip (AudioError 'silent') or keep (AudioWarning, Audio.silent=True)"})

    def __post_init__(self):
        if self.long_policy not in ("reject", "chunk"):
            raise ValueError(f"long_policy must be 'reject' or 'chunk', not {self.long_policy!r}")
        if self.silence_policy not in ("keep", "skip"):
            raise ValueError(f"silence_policy must be 'keep' or 'skip', not {self.silence_policy!r}")
        if not 0 < self.min_seconds < self.max_seconds:
            raise ValueError(f"need 0 < min_seconds ({self.min_seconds}) < max_seconds ({self.max_seconds})")
        if self.long_policy == "chunk" and self.max_seconds < 2 * self.min_seconds:
            raise ValueError("long_policy 'chunk' needs max_seconds >= 2 * min_seconds")


@dataclass
class Audio:
    """A loaded waveform: `waveform` (T,) float32 at `sample_rate`; where it came from and what it was."""
    waveform: torch.Tensor
    sample_rate: int
    path: str
    source_rate: int
    channels: int
    rms_dbfs: float
    silent: bool = False
    offset: float = 0.0  # seconds into the file (chunks)

    @property
    def duration(self) -> float:
        return self.waveform.shape[-1] / self.sample_rate


def audio_info(path) -> sf._SoundFileInfo:
    """soundfile's header info, with an `AudioError` (missing / empty / corrupt / unsupported_format)."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "missing", "no such audio file")
    if path.stat().st_size == 0:
        raise AudioError(path, "empty", "empty file (0 bytes)")
    try:
        return sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        with open(path, "rb") as f:
            head = f.read(12)
        if head.startswith(_MAGIC) or head[8:12] in (b"WAVE", b"AIFF", b"AIFC"):
            raise AudioError(path, "corrupt", f"corrupt or truncated audio header ({e})") from e
        known = "WAV, FLAC, OGG, MP3, AIFF, ... (anything libsndfile reads)"
        what = f"suffix {path.suffix!r} " if path.suffix.lower() not in _AUDIO_SUFFIXES else ""
        raise AudioError(path, "unsupported_format", f"unsupported audio format {what}(soundfile: {e}); "
                                                     f"supported: {known}") from e


def load_audio(path, config: AudioConfig | None = None) -> Audio:
    """Read, check, downmix and resample one file -> Audio with waveform (T,) at config.sample_rate.

    With long_policy "chunk", a file over max_seconds comes back whole (use `load_audio_chunks` or
    `split_audio` to cut it); with "reject" it raises AudioError("too_long") before reading the samples.
    """
    cfg = config or AudioConfig()
    return _with_silence_check(_read(Path(path), cfg), cfg)


def load_audio_chunks(path, config: AudioConfig | None = None) -> list[Audio]:
    """Like `load_audio`, but with long_policy "chunk" a file over max_seconds is cut into equal pieces of
    at most max_seconds (and at least max_seconds / 2); `Audio.offset` gives each start. Silence is judged
    per piece."""
    cfg = config or AudioConfig()
    audio = _read(Path(path), cfg)
    pieces = split_audio(audio, cfg.max_seconds) if audio.duration > cfg.max_seconds else [audio]
    return [_with_silence_check(piece, cfg) for piece in pieces]


def probe_audio(path, config: AudioConfig | None = None):
    """The header-level checks of `load_audio` without decoding (missing, empty, corrupt, unsupported,
    sample rate, too short, too long under policy "reject"); returns soundfile's info."""
    cfg = config or AudioConfig()
    info = audio_info(path)
    if info.frames <= 0:
        raise AudioError(path, "empty", "no audio samples (header only)")
    if not cfg.min_rate <= info.samplerate <= cfg.max_rate:
        raise AudioError(path, "sample_rate", f"sample rate {info.samplerate} Hz outside the supported "
                                              f"{cfg.min_rate}-{cfg.max_rate} Hz")
    seconds = info.frames / info.samplerate
    if seconds < cfg.min_seconds:
        raise AudioError(path, "too_short", f"too short: {seconds:.3f} s < min_seconds {cfg.min_seconds} s")
    if seconds > cfg.max_seconds and cfg.long_policy == "reject":
        raise AudioError(path, "too_long", f"too long: {seconds:.1f} s > max_seconds {cfg.max_seconds} s "
                                           f"(long_policy 'chunk' cuts such files into pieces)")
    return info


def _read(path: Path, cfg: AudioConfig) -> Audio:
    probe_audio(path, cfg)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioError(path, "corrupt", f"cannot decode the samples ({e})") from e
    if data.shape[0] == 0:
        raise AudioError(path, "empty", "no audio samples could be decoded")
    bad = ~np.isfinite(data)
    if bad.any():
        first = int(np.argwhere(bad)[0][0])
        raise AudioError(path, "non_finite", f"{int(bad.sum())} NaN/inf samples (first at sample {first}, "
                                             f"{first / rate:.3f} s)")
    mono = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
    return Audio(resample(mono, rate, cfg.sample_rate), cfg.sample_rate, str(path), rate, data.shape[1], 0.0)


def split_audio(audio: Audio, max_seconds: float) -> list[Audio]:
    """Cut audio into ceil(duration / max_seconds) pieces of (nearly) equal length."""
    total = audio.waveform.shape[-1]
    n = max(1, math.ceil(total / (max_seconds * audio.sample_rate)))
    bounds = [round(i * total / n) for i in range(n + 1)]
    return [replace(audio, waveform=audio.waveform[a:b].clone(), offset=audio.offset + a / audio.sample_rate)
            for a, b in zip(bounds[:-1], bounds[1:])]


def rms_dbfs(waveform: torch.Tensor) -> float:
    """Root-mean-square level of a waveform in dB relative to full scale (1.0); -inf for all zeros."""
    rms = float(waveform.double().pow(2).mean().sqrt()) if waveform.numel() else 0.0
    return 20.0 * math.log10(rms) if rms > 0 else -math.inf


def _with_silence_check(audio: Audio, cfg: AudioConfig) -> Audio:
    level = rms_dbfs(audio.waveform)
    audio = replace(audio, rms_dbfs=level, silent=level < cfg.silence_dbfs)
    if audio.silent:
        where = f" (piece at {audio.offset:.1f} s)" if audio.offset else ""
        detail = f"silence{where}: RMS {level:.1f} dBFS < silence_dbfs {cfg.silence_dbfs}"
        if cfg.silence_policy == "skip":
            raise AudioError(audio.path, "silent", detail)
        warnings.warn(f"{audio.path}: {detail} (kept: silence_policy 'keep')", AudioWarning, stacklevel=3)
    return audio


_RESAMPLERS: dict[tuple[int, int], torch.nn.Module] = {}
_RESAMPLERS_LOCK = threading.Lock()


def resample(waveform: torch.Tensor, source_rate: int, target_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """(..., T) float waveform from source_rate to target_rate (torchaudio sinc interpolation, Hann window,
    6 zero crossings: the defaults of torchaudio.functional.resample); the kernel is cached per rate pair."""
    if source_rate == target_rate:
        return waveform.float()
    key = (int(source_rate), int(target_rate))
    with _RESAMPLERS_LOCK:
        module = _RESAMPLERS.get(key)
        if module is None:
            import torchaudio  # deferred: importing torchaudio costs ~1 s
            module = _RESAMPLERS[key] = torchaudio.transforms.Resample(*key)
    with torch.no_grad():
        return module(waveform.float())


def save_audio(path, waveform: torch.Tensor | np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write a mono (T,) float waveform (clipped to [-1, 1]); the suffix picks the format (.flac: 16-bit)."""
    path = Path(path)
    data = waveform.detach().cpu().numpy() if isinstance(waveform, torch.Tensor) else np.asarray(waveform)
    data = np.clip(data.astype(np.float32).reshape(-1), -1.0, 1.0)
    subtype = "PCM_16" if path.suffix.lower() in (".flac", ".wav") else None
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, sample_rate, subtype=subtype)
    return path

"""Offline speech synthesis with espeak-ng, loaded from the PyPI `espeakng-loader` wheel through ctypes.

    wave = synthesize("four seven one two", Voice("en-us", "f3", rate=160, pitch=60))   # (T,) float32, 16 kHz
    voices = list_voices()          # [VoiceInfo(identifier="gmw/en-US", language="en-us", ...), ...]
    variants = list_variants()      # ["Alex", "Alicia", ..., "f1", ..., "m8", ...]
    waves = synthesize_many([(text, voice), ...], workers=2)       # a process pool, same results

Thread and process safety: espeak-ng is one global synthesiser per process (voice, parameters, output
callback, wave-generator state in C statics), so every call here holds a module lock: threads are safe
but serialised. For parallel generation use processes (`synthesize_many(workers=N)`, or
`synthetic.write_dataset(workers=N)`: fork-based pools, each worker with its own espeak state). The
library runs in AUDIO_OUTPUT_SYNCHRONOUS mode: `espeak_Synth` returns when the text is spoken, the
samples arriving through the synth callback as 22,050 Hz int16, scaled to [-1, 1] and resampled to 16 kHz.

Determinism: with `fresh=True` (default) the library is reloaded and its noise reseeded before each
utterance (see `_Engine`), so a (text, voice) pair always gives the same samples, in any process and
after any other utterance; this reseeds libc's `rand()` as a side effect. Cost: about 3 ms per utterance.

A voice is a language voice (`en-us`, `en` = British, `en-gb-scotland`, `es`, ...) plus an optional
variant (`f3`, `m2`, `klatt`, ...: timbre, pitch range, formants) and per-utterance rate (words per
minute, 80-450; espeak's default 175) and pitch (0-100; default 50). `Voice.name` is espeak's
`language+variant` spelling. An unknown variant is an error here (espeak itself would ignore it).
"""
from __future__ import annotations

import _ctypes
import atexit
import ctypes
import multiprocessing
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

SAMPLE_RATE = 16_000
ESPEAK_RATE = 22_050

# espeak_AUDIO_OUTPUT, espeak_PARAMETER, espeak_POSITION_TYPE and flag values from speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_PARAM_RATE, _PARAM_PITCH = 1, 3
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EE_OK = 0
_RAND_SEED = 12345  # noise (breath, Klatt aspiration) seed after every (re)load
_LIBC = ctypes.CDLL(None)

# Variants that are sound effects rather than speakers (whisper, echo robots, a deliberately broken
# "fast" test, formant sets with zeroed formants): left out of `list_variants()` unless asked for.
EFFECT_VARIANTS = frozenset({
    "whisper", "whisperf", "croak", "Demonic", "Tweaky", "fast", "UniRobot", "anikaRobot", "AnxiousAndy",
    "Mr serious", "RicishayMax", "RicishayMax2", "RicishayMax3", "kaukovalta", "robosoft", "robosoft2",
    "robosoft3", "robosoft4", "robosoft5", "robosoft6", "robosoft7", "robosoft8"})

# Language voices per language used by the synthetic sets (all ship with espeak-ng 1.52).
ENGLISH_VOICES = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
                  "en-029", "en-us-nyc")
SPANISH_VOICES = ("es", "es-419")


class EspeakError(RuntimeError):
    """espeak-ng could not be loaded or refused a voice / text (the message says which)."""


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker setting: language voice + variant, speaking rate (wpm) and pitch (0-100)."""
    language_voice: str
    variant: str = ""
    rate: int = 175
    pitch: int = 50

    @property
    def name(self) -> str:
        """espeak's voice spelling, e.g. `en-us+f3` (the speaker identity; rate/pitch excluded)."""
        return f"{self.language_voice}+{self.variant}" if self.variant else self.language_voice


@dataclass(frozen=True)
class VoiceInfo:
    """An installed language voice as espeak_ListVoices reports it."""
    name: str         # "English (Great Britain)"
    language: str     # "en-gb": the language tag
    identifier: str   # "gmw/en": file under espeak-ng-data/lang
    gender: int       # 0 none, 1 male, 2 female

    @property
    def voice(self) -> str:
        """What Voice.language_voice takes (the file name, lower case: "en", "en-us", "es-419"); espeak
        does not find every voice by its language tag ("en-gb" is not a voice name, "en" is)."""
        return self.identifier.rsplit("/", 1)[-1].lower()


class _EspeakVoiceStruct(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_char_p), ("identifier", ctypes.c_char_p),
                ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte),
                ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int), ("spare", ctypes.c_void_p)]


_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _Engine:
    """The process's espeak-ng: a private copy of the shared library, its callback and the collected samples.

    espeak-ng's wave generator keeps state between utterances in C statics (the pitch-flutter phase, the
    automatic gain, the echo buffer), so the same text and voice come out differently depending on what
    was spoken before, and `espeak_Initialize` seeds its noise generator (breath, Klatt aspiration) from
    the clock. `reset()` unloads the library, loads it afresh (every static back to its initial value)
    and seeds the noise (espeak's own generator and libc's `rand`, used by the Klatt voices) with a
    constant: with `fresh=True` (the default) each utterance depends only on its text and voice. The
    library is copied to a private temporary file first so that no other user of libespeak-ng in the
    process keeps it loaded (dlclose would then not reset anything). A reset costs about 3 ms.
    """

    def __init__(self):
        try:
            import espeakng_loader
            source, self.data_path = espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
        except (ImportError, RuntimeError) as e:
            raise EspeakError(f"cannot find espeak-ng in the espeakng-loader wheel ({e}); "
                              "install it with `pip install espeakng-loader`") from e
        self.tmpdir = tempfile.mkdtemp(prefix="herd-espeak-")
        atexit.register(shutil.rmtree, self.tmpdir, True)
        self.path = os.path.join(self.tmpdir, "libespeak-ng.so")
        self.chunks: list[np.ndarray] = []
        self.callback = _SYNTH_CALLBACK(self._collect)  # kept referenced: the library holds the pointer
        self.lib = None
        self._variants = None
        try:
            shutil.copyfile(source, self.path)
            self._load()
        except (OSError, EspeakError):  # e.g. a noexec temporary folder: use the wheel's file itself
            self.path = source
            self._load()

    def _load(self):
        try:
            lib = ctypes.CDLL(self.path, mode=os.RTLD_LOCAL)
        except OSError as e:
            raise EspeakError(f"cannot load {self.path} ({e})") from e
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_EspeakVoiceStruct))
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path.encode(), _INITIALIZE_DONT_EXIT)
        if rate != ESPEAK_RATE:
            raise EspeakError(f"espeak_Initialize with data {self.data_path} returned {rate} "
                              f"(expected {ESPEAK_RATE} Hz)")
        lib.espeak_SetSynthCallback(self.callback)
        lib.espeak_ng_SetRandSeed(_RAND_SEED)  # Initialize seeds the noise generator from the clock
        _LIBC.srand(_RAND_SEED)  # the Klatt voices draw noise from libc's rand()
        self.lib = lib

    def reset(self):
        """Unload and reload the library: every C static back to its initial value."""
        self.lib.espeak_Terminate()
        _ctypes.dlclose(self.lib._handle)
        self.lib = None
        self._load()

    def _collect(self, samples, count, events) -> int:
        if samples and count > 0:
            self.chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
        return 0  # 0 = go on

    def synth(self, text: str, voice: Voice, fresh: bool) -> np.ndarray:
        if voice.variant and voice.variant not in self.variant_names():  # espeak would ignore it silently
            raise EspeakError(f"espeak-ng has no voice {voice.name!r}: unknown variant {voice.variant!r} "
                              f"(see list_variants())")
        if fresh:
            self.reset()
        lib = self.lib
        if lib.espeak_SetVoiceByName(voice.name.encode()) != _EE_OK:
            raise EspeakError(f"espeak-ng has no voice {voice.name!r} (see list_voices() / list_variants())")
        lib.espeak_SetParameter(_PARAM_RATE, int(voice.rate), 0)
        lib.espeak_SetParameter(_PARAM_PITCH, int(voice.pitch), 0)
        data = text.encode("utf-8") + b"\0"
        self.chunks = []
        err = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if err != _EE_OK:
            raise EspeakError(f"espeak_Synth failed with error {err} for {text[:60]!r} ({voice.name})")
        lib.espeak_Synchronize()
        chunks, self.chunks = self.chunks, []
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)

    def variant_names(self) -> frozenset[str]:
        if self._variants is None:
            self._variants = frozenset(v.identifier.decode().split("/", 1)[1] for v in self.list_voices(True))
        return self._variants

    def list_voices(self, variants: bool) -> list[_EspeakVoiceStruct]:
        spec = None
        if variants:
            spec = _EspeakVoiceStruct()
            spec.languages = b"variant"
            spec = ctypes.byref(spec)
        found, table = [], self.lib.espeak_ListVoices(spec)
        i = 0
        while table[i]:
            found.append(table[i].contents)
            i += 1
        return found


_ENGINE: _Engine | None = None
_LOCK = threading.Lock()


def _reset_after_fork():  # a lock copied while held by another thread would never be released in the child
    global _LOCK
    _LOCK = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


def _engine() -> _Engine:
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = _Engine()
    return _ENGINE


def preload() -> None:
    """Load espeak-ng in this process now. Call before forking workers: they then share this process's
    private library copy (a worker that loads its own leaves a temporary folder behind, since pool
    workers exit without running atexit handlers)."""
    with _LOCK:
        _engine()


def synthesize_int16(text: str, voice: Voice, fresh: bool = True) -> np.ndarray:
    """espeak's raw output: (T,) int16 at 22,050 Hz (empty for text with nothing to say). fresh=True
    reloads the library first, so the result depends only on text and voice (see `_Engine`)."""
    if not text.strip():
        raise EspeakError(f"nothing to synthesise: empty text for voice {voice.name!r}")
    with _LOCK:
        return _engine().synth(text, voice, fresh)


def synthesize(text: str, voice: Voice, sample_rate: int = SAMPLE_RATE, fresh: bool = True) -> torch.Tensor:
    """Text -> (T,) float32 waveform in [-1, 1] at sample_rate (default 16 kHz)."""
    samples = synthesize_int16(text, voice, fresh)
    if samples.size == 0:
        raise EspeakError(f"espeak-ng produced no audio for {text[:60]!r} ({voice.name})")
    wave = torch.from_numpy(samples.astype(np.float32) / 32768.0)
    if sample_rate == ESPEAK_RATE:
        return wave
    from .audio_io import resample
    return resample(wave, ESPEAK_RATE, sample_rate)


def list_voices(language_prefix: str = "") -> list[VoiceInfo]:
    """Installed language voices (141 in espeak-ng 1.52), optionally those whose language tag starts with
    the prefix."""
    with _LOCK:
        raw = _engine().list_voices(variants=False)
        infos = [VoiceInfo(v.name.decode(), v.languages[1:].split(b"\0")[0].decode(), v.identifier.decode(),
                           int(v.gender)) for v in raw]
    return [v for v in infos if v.language.startswith(language_prefix)]


def list_variants(include_effects: bool = False) -> list[str]:
    """Variant names usable after `+` (`f3`, `m2`, `klatt`, `Alex`, ...); sound-effect variants
    (EFFECT_VARIANTS) only when asked for."""
    with _LOCK:
        names = _engine().variant_names()
    return sorted(n for n in names if include_effects or n not in EFFECT_VARIANTS)


# ----------------------------------------------------------------------------------------------------
# Process-parallel synthesis


def _worker_init():
    torch.set_num_threads(1)  # each worker is one core; no OpenMP pools inherited across fork


def _worker_synth(job: tuple[str, Voice, int]) -> np.ndarray:
    text, voice, rate = job
    return synthesize(text, voice, rate).numpy()


def synthesize_many(jobs: Sequence[tuple[str, Voice]], sample_rate: int = SAMPLE_RATE, workers: int = 1,
                    chunksize: int = 16) -> list[torch.Tensor]:
    """Synthesise many (text, voice) pairs, in order; workers > 1 uses a fork-based process pool."""
    if workers <= 1 or len(jobs) < 2 * chunksize:
        return [synthesize(t, v, sample_rate) for t, v in jobs]
    preload()
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, initializer=_worker_init) as pool:
        out = pool.map(_worker_synth, [(t, v, sample_rate) for t, v in jobs], chunksize=chunksize)
    return [torch.from_numpy(w) for w in out]

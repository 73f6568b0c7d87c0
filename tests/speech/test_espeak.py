"""speech/espeak.py: espeak-ng through ctypes from the espeakng-loader wheel."""
import threading

import numpy as np
import pytest
import torch

from speech.espeak import ENGLISH_VOICES, SPANISH_VOICES, EspeakError, Voice, list_variants, list_voices, \
    synthesize, synthesize_int16, synthesize_many


def test_synthesis_gives_16k_float_speech_of_plausible_length():
    wave = synthesize("four seven one two", Voice("en-us", "f3"))
    assert wave.dtype == torch.float32 and wave.ndim == 1
    seconds = wave.numel() / 16000
    assert 0.6 < seconds < 3.0
    assert 0.05 < wave.abs().max() <= 1.0
    raw = synthesize_int16("four seven one two", Voice("en-us", "f3"))
    assert raw.dtype == np.int16 and abs(raw.size / 22050 - seconds) < 0.01


def test_same_input_same_output_and_voices_differ():
    """espeak keeps state across utterances (flutter phase, gain, clock-seeded noise); fresh=True resets it."""
    text = "turn on the kitchen light"
    a = synthesize(text, Voice("en-us", "m2"))
    synthesize("something else first", Voice("es", "f4"))
    assert torch.equal(a, synthesize(text, Voice("en-us", "m2")))
    klatt = [synthesize_int16(text, Voice("en", "Reed")) for _ in range(2)]  # Klatt noise from libc rand()
    assert np.array_equal(*klatt)
    stateful = [synthesize_int16(text, Voice("en-us"), fresh=False) for _ in range(3)]
    assert not all(np.array_equal(stateful[0], s) for s in stateful[1:])
    b = synthesize(text, Voice("en-us", "f3"))
    c = synthesize(text, Voice("en-gb-scotland", "m2"))
    for other in (b, c):
        assert other.shape != a.shape or not torch.allclose(other, a, atol=1e-3)


def test_rate_changes_duration_and_pitch_changes_the_signal():
    text = "please open the front door now"
    slow = synthesize(text, Voice("en-us", rate=120))
    fast = synthesize(text, Voice("en-us", rate=260))
    assert fast.numel() < 0.7 * slow.numel()
    low = synthesize(text, Voice("en-us", pitch=20))
    high = synthesize(text, Voice("en-us", pitch=80))
    assert not (low.shape == high.shape and torch.allclose(low, high))


def test_spanish_voice_speaks_spanish_text():
    assert synthesize("enciende la luz de la cocina", Voice("es", "m3")).numel() > 8000


def test_voice_and_variant_lists():
    voices = list_voices()
    assert set(ENGLISH_VOICES) | set(SPANISH_VOICES) <= {v.voice for v in voices}
    assert len(voices) > 100 and {"en-gb", "en-us", "es"} <= {v.language for v in voices}
    assert all(v.language.startswith("es") for v in list_voices("es"))
    variants = list_variants()
    assert {"f1", "f3", "m2", "m7", "klatt"} <= set(variants) and "whisper" not in variants
    assert len(variants) >= 70 and "whisper" in list_variants(include_effects=True)
    for name in variants:  # every listed variant is usable
        synthesize_int16("yes", Voice("en-us", name))


def test_bad_voice_and_empty_text_are_refused():
    with pytest.raises(EspeakError, match="no voice 'en-us\\+nosuchvariant'"):
        synthesize("hello", Voice("en-us", "nosuchvariant"))
    with pytest.raises(EspeakError, match="no voice 'xx-nowhere'"):
        synthesize("hello", Voice("xx-nowhere"))
    with pytest.raises(EspeakError, match="empty text"):
        synthesize("   ", Voice("en-us"))


def test_threads_are_serialised_and_get_their_own_audio():
    jobs = [("one two three", Voice("en-us", "f2")), ("turn off the fan", Voice("en", "m4")),
            ("nine eight", Voice("es", "f1")), ("lock the door", Voice("en-029", "m1"))] * 3
    expected = [synthesize(t, v) for t, v in jobs]
    results = [None] * len(jobs)

    def run(i):
        results[i] = synthesize(*jobs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, e) for r, e in zip(results, expected))


def test_process_pool_matches_sequential():
    jobs = [(f"{w} {x}", Voice("en-us", v)) for w, x, v in
            zip(["one", "two", "three", "four"] * 4, ["five", "six"] * 8, ["f1", "m1", "m3", "f4"] * 4)]
    sequential = synthesize_many(jobs, workers=1)
    parallel = synthesize_many(jobs, workers=2, chunksize=2)
    assert len(parallel) == 16 and all(torch.equal(a, b) for a, b in zip(sequential, parallel))

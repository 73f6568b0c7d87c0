"""speech/speech_dataset.py: the issue's bad inputs in one manifest; skip / replace; collate padding."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from speech.audio_io import AudioConfig
from speech.manifests import DataError, DataWarning, Utterance
from speech.speech_dataset import SpeechDataset, collate_speech


def _tone(seconds, rate, amp=0.3):
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * 330 * t)).astype(np.float32)


def _write_set(folder, bad=True):
    """8 good files (formats, rates, stereo) + the bad inputs of the acceptance list; -> manifest path."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []

    def add(name, text, **extra):
        rows.append({"id": name.split(".")[0], "audio": name, "text": text, "language": "en", **extra})

    for i, (suffix, rate, ch) in enumerate([(".wav", 8000, 1), (".flac", 16000, 1), (".ogg", 22050, 2),
                                            (".wav", 44100, 2), (".flac", 48000, 1), (".wav", 16000, 1),
                                            (".flac", 11025, 1), (".wav", 32000, 1)]):
        data = _tone(0.3 + 0.1 * i, rate)
        sf.write(folder / f"good{i}{suffix}", np.stack([data, data], 1) if ch == 2 else data, rate)
        add(f"good{i}{suffix}", f"utterance {i}", translation=f"t{i}", translation_language="en")
    if bad:
        (folder / "empty.wav").write_bytes(b"")
        add("empty.wav", "empty")
        (folder / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(100))
        add("corrupt.wav", "corrupt header")
        (folder / "notes.txt").write_text("not audio at all\n" * 10)
        add("notes.txt", "unsupported format")
        sf.write(folder / "short.wav", _tone(0.05, 16000), 16000)
        add("short.wav", "fifty milliseconds")
        sf.write(folder / "long.wav", _tone(600.0, 8000, 0.1), 8000)
        add("long.wav", "ten minutes")
        nan = _tone(0.5, 16000)
        nan[100:110] = np.nan
        sf.write(folder / "nan.wav", nan, 16000, subtype="FLOAT")
        add("nan.wav", "nan samples")
        sf.write(folder / "silence.wav", np.zeros(16000, np.float32), 16000)
        add("silence.wav", "pure silence")
    manifest = folder / "set.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def test_bad_inputs_are_skipped_counted_and_named(tmp_path):
    manifest = _write_set(tmp_path / "set")
    with pytest.warns(DataWarning) as caught:
        ds = SpeechDataset(manifest)
    messages = [str(w.message) for w in caught]
    for name, reason, line in [("empty.wav", "empty", 9), ("corrupt.wav", "corrupt", 10),
                               ("notes.txt", "unsupported_format", 11), ("short.wav", "too_short", 12),
                               ("long.wav", "too_long", 13)]:
        assert any(name in m and f"set.jsonl:{line}: skipped ({reason}): " in m for m in messages), (name, messages)
    assert dict(ds.scan_counts) == {"empty": 1, "corrupt": 1, "unsupported_format": 1, "too_short": 1, "too_long": 1}
    assert len(ds) == 10  # 8 good + nan + silence: their samples are only seen when loaded
    with pytest.warns(DataWarning) as caught:
        items = [ds[i] for i in range(len(ds))]
    messages = [str(w.message) for w in caught]
    assert any("nan.wav" in m and "skipped (non_finite): " in m and "10 NaN/inf samples" in m for m in messages)
    assert any("silence.wav" in m and "skipped (silent)" in m for m in messages)
    assert [it is None for it in items] == [False] * 8 + [True, True]
    assert ds.stats == {"loaded": 8, "non_finite": 1, "silent": 1}
    good = items[0]
    assert good["waveform"].dtype == torch.float32 and good["waveform"].numel() == round(0.3 * 16000)
    assert good["text"] == "utterance 0" and good["translation"] == "t0" and good["source"].endswith("set.jsonl:1")
    assert items[2]["waveform"].numel() == round(0.5 * 16000)  # 22.05 kHz stereo ogg -> 16 kHz mono


def test_replace_keeps_batches_full_and_skip_drops(tmp_path):
    manifest = _write_set(tmp_path / "set")
    with pytest.warns(DataWarning):
        skip = SpeechDataset(manifest)
        replace = SpeechDataset(manifest, on_bad="replace")
        batch = collate_speech([skip[i] for i in (0, 8, 9)])
        assert batch["skipped"] == 2 and batch["ids"] == ["good0"]
        item = replace[8]  # nan.wav -> silence.wav -> wraps to good0
    assert item["id"] == "good0" and replace.stats["non_finite"] == 1 and replace.stats["silent"] == 1


def test_collate_pads_and_keeps_lengths(tmp_path):
    ds = SpeechDataset(_write_set(tmp_path / "set", bad=False))
    loader = DataLoader(ds, batch_size=3, collate_fn=lambda b: collate_speech(b, pad_to_multiple=640))
    batches = list(loader)
    assert [b["waveforms"].shape[0] for b in batches] == [3, 3, 2]
    first = batches[0]
    assert first["lengths"].tolist() == [4800, 6400, 8000] and first["waveforms"].shape == (3, 8320)
    assert first["waveforms"].shape[1] % 640 == 0 and first["lengths"].dtype == torch.int64
    assert torch.all(first["waveforms"][0, 4800:] == 0) and first["waveforms"][0, :4800].abs().max() > 0.1
    assert first["texts"] == ["utterance 0", "utterance 1", "utterance 2"] and first["skipped"] == 0
    assert first["translations"] == ["t0", "t1", "t2"]
    empty = collate_speech([None, None])
    assert empty["waveforms"].shape == (0, 0) and empty["skipped"] == 2


def test_mostly_bad_fails_clearly(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    utts = []
    for i in range(6):
        (folder / f"e{i}.wav").write_bytes(b"")
        utts.append(Utterance(f"e{i}", str(folder / f"e{i}.wav"), "x", "en"))
    sf.write(folder / "ok.wav", _tone(0.5, 16000), 16000)
    utts.append(Utterance("ok", str(folder / "ok.wav"), "x", "en"))
    with pytest.warns(DataWarning), pytest.raises(DataError, match=r"utterance list: 6 of 7 audio files are unusable.*empty=6"):
        SpeechDataset(utts)
    nans = []
    for i in range(5):
        data = _tone(0.5, 16000)
        data[0] = np.inf
        sf.write(folder / f"n{i}.wav", data, 16000, subtype="FLOAT")
        nans.append(Utterance(f"n{i}", str(folder / f"n{i}.wav"), "x", "en"))
    ds = SpeechDataset(nans + utts[-1:], min_seen=3)
    with pytest.warns(DataWarning), pytest.raises(DataError, match=r"3 of the 3 utterances loaded so far are bad.*non_finite=3"):
        for i in range(len(ds)):
            ds[i]


def test_options_are_checked(tmp_path):
    manifest = _write_set(tmp_path / "set", bad=False)
    with pytest.raises(ValueError, match="long_policy='reject'"):
        SpeechDataset(manifest, audio=AudioConfig(long_policy="chunk"))
    with pytest.raises(ValueError, match="on_bad"):
        SpeechDataset(manifest, on_bad="retry")
    with pytest.raises(DataError, match="no such manifest"):
        SpeechDataset(tmp_path / "missing.jsonl")

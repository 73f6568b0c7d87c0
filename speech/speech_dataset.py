"""A torch Dataset over a speech manifest: 16 kHz mono waveforms + transcripts (+ translations), bad audio
skipped and counted, and a collate that pads waveforms and keeps their lengths.

    ds = SpeechDataset("data/speech/espeak/train.jsonl")          # or a list of Utterance
    loader = DataLoader(ds, batch_size=16, collate_fn=collate_speech)
    batch = next(iter(loader))   # {"waveforms": (B, T_max) float32, "lengths": (B,) int64, "texts": [...], ...}

Bad utterances are found in two places. At construction (`scan="header"`, the default) every file's
header is read: missing, empty, corrupt, unsupported, wrong-rate, too short and too long files are
dropped with one `DataWarning` each naming the manifest line and the file
(`set.jsonl:9: skipped (empty): /data/a.wav: empty file (0 bytes)`). While loading, a file whose
samples turn out bad (NaN/inf, silence under silence_policy "skip", undecodable) is warned about and
counted in `stats`; with on_bad="skip" the item comes back as None and `collate_speech` drops it
(batches shrink; nothing is duplicated, the right choice for evaluation), with on_bad="replace" the
next good utterance is returned instead (batches keep their size; for training). Either way, when more
than `max_bad_fraction` of the utterances seen (at least `min_seen`) are bad, `DataError` names the
manifest and the counts per reason.
"""
from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch.utils.data import Dataset

from .audio_io import AudioConfig, AudioError, load_audio, probe_audio
from .manifests import DataError, DataWarning, Utterance, load_manifest


class SpeechDataset(Dataset):
    """Items: {"id", "waveform" (T,) float32 at 16 kHz, "text", "language", "translation",
    "translation_language", "speaker", "source"} or None (on_bad="skip", a bad file)."""

    def __init__(self, manifest: str | Path | Sequence[Utterance], audio: AudioConfig | None = None,
                 scan: Literal["header", "none"] = "header", on_bad: Literal["skip", "replace"] = "skip",
                 max_bad_fraction: float = 0.5, min_seen: int = 20, **manifest_kwargs):
        self.audio = audio or AudioConfig()
        if self.audio.long_policy != "reject":
            raise ValueError("a transcribed utterance cannot be cut into pieces: use AudioConfig(long_policy='reject')")
        if on_bad not in ("skip", "replace"):
            raise ValueError(f"on_bad must be 'skip' or 'replace', not {on_bad!r}")
        if scan not in ("header", "none"):
            raise ValueError(f"scan must be 'header' or 'none', not {scan!r}")
        if isinstance(manifest, (str, Path)):
            self.name = str(manifest)
            utterances, _ = load_manifest(manifest, **manifest_kwargs)
        else:
            self.name = "utterance list"
            utterances = list(manifest)
        self.on_bad, self.max_bad, self.min_seen = on_bad, max_bad_fraction, min_seen
        self.scan_counts: Counter = Counter()
        if scan == "header":
            utterances = self._scan(utterances)
        if not utterances:
            raise DataError(f"{self.name}: no utterances")
        self.utterances = utterances
        self.stats: Counter = Counter()  # this process: "loaded" and one count per AudioError reason
        self._bad: set[int] = set()

    def _scan(self, utterances: list[Utterance]) -> list[Utterance]:
        kept = []
        for utt in utterances:
            try:
                probe_audio(utt.audio, self.audio)
            except AudioError as e:
                self.scan_counts[e.reason] += 1
                warnings.warn(f"{_where(utt)}: skipped ({e.reason}): {e}", DataWarning, stacklevel=3)
                continue
            kept.append(utt)
        bad = len(utterances) - len(kept)
        if utterances and (bad > self.max_bad * len(utterances) or not kept):
            raise DataError(f"{self.name}: {bad} of {len(utterances)} audio files are unusable (more than "
                            f"{self.max_bad:.0%} allowed): {_counts(self.scan_counts)}")
        return kept

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> dict | None:
        for step in range(len(self.utterances)):
            i = (index + step) % len(self.utterances)
            item = self._load(i)
            if item is not None or self.on_bad == "skip":
                return item
        raise DataError(f"{self.name}: no utterance could be loaded: {_counts(self.stats)}")

    def _load(self, i: int) -> dict | None:
        if i in self._bad:
            return None
        utt = self.utterances[i]
        try:
            audio = load_audio(utt.audio, self.audio)
        except AudioError as e:
            self._bad.add(i)
            self.stats[e.reason] += 1
            warnings.warn(f"{_where(utt)}: skipped ({e.reason}): {e}", DataWarning, stacklevel=3)
            self._check_bad_fraction()
            return None
        self.stats["loaded"] += 1
        return {"id": utt.id, "waveform": audio.waveform, "text": utt.text, "language": utt.language,
                "translation": utt.translation, "translation_language": utt.translation_language,
                "speaker": utt.speaker, "source": utt.source}

    def _check_bad_fraction(self):
        bad = sum(n for k, n in self.stats.items() if k != "loaded")
        seen = bad + self.stats["loaded"]
        if seen >= self.min_seen and bad > self.max_bad * seen:
            raise DataError(f"{self.name}: {bad} of the {seen} utterances loaded so far are bad (more than "
                            f"{self.max_bad:.0%} allowed): {_counts(self.stats, skip='loaded')}")


def _where(utt: Utterance) -> str:
    return utt.source or utt.id


def _counts(counter: Counter, skip: str = "") -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counter.items()) if k != skip) or "none"


def pad_waveforms(waves: Sequence[torch.Tensor], pad_to_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D waveforms -> (B, T) float32 zero-padded to the longest (rounded up to pad_to_multiple samples) and their
    lengths (B,) int64."""
    lengths = torch.tensor([w.numel() for w in waves], dtype=torch.long)
    longest = int(lengths.max()) if len(waves) else 0
    longest = -(-longest // pad_to_multiple) * pad_to_multiple
    padded = torch.zeros(len(waves), longest, dtype=torch.float32)
    for row, w in enumerate(waves):
        padded[row, :w.numel()] = w
    return padded, lengths


def collate_speech(items: Sequence[dict | None], pad_to_multiple: int = 1) -> dict:
    """Pad waveforms to the longest (rounded up to pad_to_multiple samples) -> {"waveforms" (B, T) float32,
    "lengths" (B,) int64, "ids", "texts", "languages", "translations", "translation_languages", "speakers",
    "skipped": number of None items dropped}. B may be 0 when every item was bad."""
    good = [it for it in items if it is not None]
    waveforms, lengths = pad_waveforms([it["waveform"] for it in good], pad_to_multiple)
    return {"waveforms": waveforms, "lengths": lengths, "ids": [it["id"] for it in good],
            "texts": [it["text"] for it in good], "languages": [it["language"] for it in good],
            "translations": [it["translation"] for it in good],
            "translation_languages": [it["translation_language"] for it in good],
            "speakers": [it["speaker"] for it in good], "skipped": len(items) - len(good)}

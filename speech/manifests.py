"""Speech manifests -> one record type, `Utterance`: our JSONL, LibriSpeech folders, FLEURS and CoVoST 2 TSVs.

    utts, report = load_manifest("data/speech/asterisk/asterisk_en.jsonl")   # by suffix / folder
    utts, report = load_librispeech("LibriSpeech/test-other")                # */*/*.trans.txt + .flac
    utts, report = load_fleurs_tsv("fleurs/es_419/test.tsv", translations_tsv="fleurs/en_us/test.tsv")
    utts, report = load_covost_tsv("covost/covost_v2.es_en.test.tsv", clips_dir="cv/es/clips")
    write_jsonl_manifest(utts, "out/test.jsonl")

Formats:
- JSONL (ours): {"audio": path relative to the manifest, "text", "language", optional "id", "voice" or
  "speaker", "duration", "translation", "translation_language"}.
- LibriSpeech: `<speaker>/<chapter>/<speaker>-<chapter>.trans.txt` lines `ID TRANSCRIPT`, audio `ID.flac`
  beside it (any depth under the root).
- FLEURS `<lang>/<split>.tsv`: no header, 7 tab-separated columns: id, file name, raw transcription,
  normalised transcription, phonemes, number of samples, gender; audio in `<lang>/audio/<split>/`.
  `text` is the raw (cased, punctuated) transcription; the translation comes from the FLEURS TSV of the
  target language, joined on the sentence id.
- CoVoST 2 `covost_v2.<src>_<tgt>.<split>.tsv`: a header with `path`, `sentence`, `translation`
  (`client_id` optional); no quoting, backslash escapes; audio = Common Voice `clips/<path>` (mp3).
A missing manifest or missing column is a `DataError` naming the file (and line). A bad row is skipped
with one `DataWarning` naming `file:line` and the reason (`REASONS`); when more than `max_bad_fraction`
of the rows are bad, or none is left, `DataError` names the file and the counts per reason.
"""
from __future__ import annotations

import csv
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

REASONS = (
    "malformed",            # not JSON / wrong number of columns / not an object
    "missing_field",        # a required field absent or of the wrong type
    "empty_text",           # blank transcript
    "missing_audio",        # the audio file does not exist
    "duplicate_id",         # an id seen before in the same manifest
    "missing_translation",  # no translation for this sentence id (FLEURS with translations_tsv)
    "bad_value",            # a field with an impossible value (negative duration, malformed id)
)


class DataError(ValueError):
    """A manifest that cannot be used: missing, missing columns, too many bad rows (message names it)."""


class DataWarning(UserWarning):
    """One skipped row: `file:line: skipped (reason): detail`."""


@dataclass
class Utterance:
    """One speech example. `audio` is an absolute path; `source` is `file:line` of the manifest row."""
    id: str
    audio: str
    text: str
    language: str
    speaker: str = ""
    translation: str | None = None
    translation_language: str | None = None
    duration: float | None = None
    source: str = ""


@dataclass
class ManifestReport:
    """What a loader kept and skipped; `counts` maps each reason in REASONS to its number of rows."""
    path: str
    total: int = 0
    kept: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))

    @property
    def bad(self) -> int:
        return self.total - self.kept

    @property
    def skipped(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.counts.items() if v) or "none"

    def __str__(self) -> str:
        return f"{self.path}: kept {self.kept}/{self.total} rows; skipped: {self.skipped}"


class _BadRow(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class _Collector:
    """Counts rows, warns for bad ones, checks ids and audio, and enforces max_bad_fraction at the end."""

    def __init__(self, path, check_audio: bool, max_bad_fraction: float, require_text: bool = True):
        self.report = ManifestReport(str(path))
        self.check_audio, self.max_bad, self.require_text = check_audio, max_bad_fraction, require_text
        self.utterances: list[Utterance] = []
        self.ids: set[str] = set()

    def bad(self, line: int, reason: str, detail: str):
        self.report.total += 1
        self.report.counts[reason] += 1
        warnings.warn(f"{self.report.path}:{line}: skipped ({reason}): {detail}", DataWarning, stacklevel=4)

    def add(self, line: int, make):
        """make() -> Utterance or raises _BadRow."""
        try:
            utt = make()
            if self.require_text and not utt.text.strip():
                raise _BadRow("empty_text", "empty transcript")
            if utt.id in self.ids:
                raise _BadRow("duplicate_id", f"id {utt.id!r} appears earlier in the file")
            if self.check_audio and not os.path.isfile(utt.audio):
                raise _BadRow("missing_audio", f"no audio file {utt.audio}")
        except _BadRow as e:
            self.bad(line, e.reason, str(e))
            return
        utt.source = f"{self.report.path}:{line}"
        self.ids.add(utt.id)
        self.utterances.append(utt)
        self.report.total += 1
        self.report.kept += 1

    def finish(self) -> tuple[list[Utterance], ManifestReport]:
        r = self.report
        if r.total and r.bad > self.max_bad * r.total or not r.kept:
            raise DataError(f"{r.path}: {r.bad} of {r.total} rows are bad (more than {self.max_bad:.0%} "
                            f"allowed, or none left); skipped: {r.skipped}")
        return self.utterances, r


def _existing(path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such {what}")
    return path


# ----------------------------------------------------------------------------------------------------
# Our JSONL


def load_jsonl_manifest(path, check_audio: bool = True, max_bad_fraction: float = 0.5,
                        default_language: str | None = "en", require_text: bool = True
                        ) -> tuple[list[Utterance], ManifestReport]:
    """Our JSONL manifest (see module doc); audio paths are relative to the manifest's folder."""
    path = _existing(path, "manifest file")
    out = _Collector(path, check_audio, max_bad_fraction, require_text)
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            if raw.strip():
                out.add(line_no, lambda: _jsonl_row(raw, path, line_no, default_language))
    return out.finish()


def _jsonl_row(raw: bytes, path: Path, line_no: int, default_language) -> Utterance:
    try:
        row = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _BadRow("malformed", f"not valid JSON ({e})") from None
    if not isinstance(row, dict):
        raise _BadRow("malformed", f"a row must be a JSON object, not {type(row).__name__}")
    for key in ("audio", "text"):
        if not isinstance(row.get(key), str):
            raise _BadRow("missing_field", f"field {key!r} missing or not a string")
    language = row.get("language", default_language)
    if not isinstance(language, str) or not language:
        raise _BadRow("missing_field", "field 'language' missing (and no default_language)")
    duration = row.get("duration")
    if duration is not None and (not isinstance(duration, (int, float)) or duration <= 0):
        raise _BadRow("bad_value", f"duration must be a positive number, not {duration!r}")
    translation = row.get("translation")
    if translation is not None and not isinstance(translation, str):
        raise _BadRow("missing_field", "field 'translation' is not a string")
    return Utterance(id=str(row.get("id", f"{path.stem}:{line_no}")), audio=os.path.normpath(path.parent / row["audio"]),
                     text=row["text"], language=language, speaker=str(row.get("speaker", row.get("voice", ""))),
                     translation=translation, translation_language=row.get("translation_language"),
                     duration=duration)


def write_jsonl_manifest(utterances: Iterable[Utterance], path) -> Path:
    """Write utterances as our JSONL (audio relative to the manifest's folder; None fields left out)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for u in utterances:
        row = {k: v for k, v in asdict(u).items() if v not in (None, "") and k != "source"}
        row["audio"] = os.path.relpath(Path(u.audio).resolve(), path.parent.resolve())
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------------
# LibriSpeech

_LIBRI_ID = re.compile(r"^(\d+)-(\d+)-(\d+)$")


def load_librispeech(root, check_audio: bool = True, max_bad_fraction: float = 0.5
                     ) -> tuple[list[Utterance], ManifestReport]:
    """Every `*.trans.txt` under root (e.g. LibriSpeech/test-other); one report for the whole folder."""
    root = _existing(root, "LibriSpeech folder")
    files = sorted(root.rglob("*.trans.txt"))
    if not files:
        raise DataError(f"{root}: no */*/*.trans.txt transcript files (is this a LibriSpeech split folder?)")
    out = _Collector(root, check_audio, max_bad_fraction)
    for trans in files:
        with trans.open(encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    out.report.path = f"{trans}"  # warnings name the transcript file
                    out.add(line_no, lambda: _libri_row(line, trans))
    out.report.path = str(root)
    return out.finish()


def _libri_row(line: str, trans: Path) -> Utterance:
    utt_id, _, text = line.strip().partition(" ")
    match = _LIBRI_ID.match(utt_id)
    if not match:
        raise _BadRow("bad_value", f"utterance id {utt_id!r} is not SPEAKER-CHAPTER-NUMBER")
    return Utterance(utt_id, str(trans.parent / f"{utt_id}.flac"), text.strip(), "en", speaker=match.group(1))


# ----------------------------------------------------------------------------------------------------
# FLEURS

FLEURS_COLUMNS = ("id", "file_name", "raw_transcription", "transcription", "phonemes", "num_samples", "gender")


def _fleurs_rows(path: Path):
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                yield line_no, line.rstrip("\r\n").split("\t")


def load_fleurs_tsv(tsv, audio_dir=None, language: str | None = None, translations_tsv=None,
                    translation_language: str = "en", check_audio: bool = True, max_bad_fraction: float = 0.5
                    ) -> tuple[list[Utterance], ManifestReport]:
    """A FLEURS split TSV; audio_dir defaults to `<tsv folder>/audio/<split>`, language to the folder
    name's first part (`es_419` -> `es`). With translations_tsv (the same split in the target language),
    each row gets the target's raw transcription of the same sentence id."""
    tsv = _existing(tsv, "FLEURS TSV")
    audio_dir = Path(audio_dir) if audio_dir is not None else tsv.parent / "audio" / tsv.stem
    language = language or tsv.parent.name.split("_")[0]
    targets = None
    if translations_tsv is not None:
        targets = {}
        for line_no, cols in _fleurs_rows(_existing(translations_tsv, "FLEURS TSV")):
            if len(cols) == len(FLEURS_COLUMNS):
                targets.setdefault(cols[0], cols[2])
        if not targets:
            raise DataError(f"{translations_tsv}: no FLEURS rows ({len(FLEURS_COLUMNS)} tab-separated columns)")
    out = _Collector(tsv, check_audio, max_bad_fraction)
    for line_no, cols in _fleurs_rows(tsv):
        out.add(line_no, lambda: _fleurs_row(cols, audio_dir, language, targets, translation_language))
    return out.finish()


def _fleurs_row(cols, audio_dir: Path, language: str, targets, translation_language) -> Utterance:
    if len(cols) != len(FLEURS_COLUMNS):
        raise _BadRow("malformed", f"{len(cols)} tab-separated columns, expected {len(FLEURS_COLUMNS)} "
                                   f"({', '.join(FLEURS_COLUMNS)})")
    sid, file_name, raw, _, _, num_samples, gender = cols
    if not num_samples.isdigit():
        raise _BadRow("bad_value", f"num_samples {num_samples!r} is not a number")
    translation = None
    if targets is not None:
        translation = targets.get(sid)
        if translation is None:
            raise _BadRow("missing_translation", f"sentence id {sid} is not in the translations TSV")
    return Utterance(f"{sid}/{Path(file_name).stem}", str(audio_dir / file_name), raw, language, speaker=gender,
                     translation=translation, translation_language=translation_language if targets else None,
                     duration=int(num_samples) / 16000)


# ----------------------------------------------------------------------------------------------------
# CoVoST 2

_COVOST_NAME = re.compile(r"covost(?:_v2)?\.([A-Za-z-]+)_([A-Za-z-]+)(?:\.\w+)?\.tsv$")
COVOST_COLUMNS = ("path", "sentence", "translation")


def load_covost_tsv(tsv, clips_dir=None, source_language: str | None = None, target_language: str | None = None,
                    check_audio: bool = True, max_bad_fraction: float = 0.5
                    ) -> tuple[list[Utterance], ManifestReport]:
    """A CoVoST 2 split TSV (made by the CoVoST `get_covost_splits.py`); clips_dir defaults to
    `<tsv folder>/clips`; languages default to the file name's `<src>_<tgt>`."""
    tsv = _existing(tsv, "CoVoST TSV")
    clips_dir = Path(clips_dir) if clips_dir is not None else tsv.parent / "clips"
    match = _COVOST_NAME.search(tsv.name)
    source_language = source_language or (match and match.group(1))
    target_language = target_language or (match and match.group(2))
    if not source_language or not target_language:
        raise DataError(f"{tsv}: cannot tell the languages from the name (covost_v2.<src>_<tgt>.<split>.tsv); "
                        "pass source_language and target_language")
    out = _Collector(tsv, check_audio, max_bad_fraction)
    with tsv.open(encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        header = next(reader, None)
        missing = [c for c in COVOST_COLUMNS if c not in (header or [])]
        if missing:
            raise DataError(f"{tsv}:1: missing column(s) {', '.join(missing)} in the header {header} "
                            "(the raw covost_v2.<src>_<tgt>.tsv has no `sentence`: make the split files with "
                            "CoVoST's get_covost_splits.py)")
        index = {name: i for i, name in enumerate(header)}
        for cols in reader:
            line_no = reader.line_num
            if not any(c.strip() for c in cols):
                continue
            out.add(line_no, lambda: _covost_row(cols, header, index, clips_dir, source_language, target_language))
    return out.finish()


def _covost_row(cols, header, index, clips_dir: Path, src: str, tgt: str) -> Utterance:
    if len(cols) != len(header):
        raise _BadRow("malformed", f"{len(cols)} columns, the header has {len(header)}")
    translation = cols[index["translation"]]
    if not translation.strip():
        raise _BadRow("missing_translation", "empty translation")
    speaker = cols[index["client_id"]] if "client_id" in index else ""
    clip = cols[index["path"]]
    return Utterance(Path(clip).stem, str(clips_dir / clip), cols[index["sentence"]], src, speaker=speaker,
                     translation=translation, translation_language=tgt)


# ----------------------------------------------------------------------------------------------------


def load_manifest(path, **kwargs) -> tuple[list[Utterance], ManifestReport]:
    """By form: a folder -> LibriSpeech; `*.jsonl` -> ours; `*.tsv` with a CoVoST header -> CoVoST,
    otherwise FLEURS. Keyword arguments go to the loader."""
    path = _existing(path, "manifest")
    if path.is_dir():
        return load_librispeech(path, **kwargs)
    if path.suffix == ".jsonl":
        return load_jsonl_manifest(path, **kwargs)
    if path.suffix == ".tsv":
        with path.open(encoding="utf-8", errors="replace") as f:
            first = f.readline().rstrip("\r\n").split("\t")
        if "path" in first and "translation" in first:
            return load_covost_tsv(path, **kwargs)
        return load_fleurs_tsv(path, **kwargs)
    raise DataError(f"{path}: unknown manifest kind (expected a LibriSpeech folder, .jsonl or .tsv)")

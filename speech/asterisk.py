"""The Asterisk voice prompts (real speech, one female speaker, 8 kHz): English, Spanish and ES->EN pairs.

    debs = fetch_packages("data/downloads")                 # apt-get download (skipped when present)
    root = unpack_packages(debs, "data/downloads/asterisk")  # dpkg -x (a Python reader when no dpkg)
    summary = build_asterisk_manifests(root, "data/speech/asterisk")
    print(summary)   # counts; manifests asterisk_{en,es,es_en,en_digits,es_digits,en_numbers,es_numbers}.jsonl

Debian packages (CC-BY-SA-3.0): `asterisk-core-sounds-{en,es}-wav` hold the WAVs under
`usr/share/asterisk/sounds/{en_US,es_MX}_f_Allison/`; `asterisk-core-sounds-{en,es}` hold the
transcripts `usr/share/doc/asterisk-core-sounds-<lang>/core-sounds-<lang>.txt.gz`, lines `key: text`
where the key is the WAV path without `.wav` (`digits/7: seven`).

Transcript rules: `;` comments and blank lines are skipped; a text wholly in brackets or parentheses is a
sound, not speech (`[this is a simple beep tone]`, `(10 seconds of silence)`) and is skipped; a trailing
bracketed note is dropped (`at [@]` -> `at`, `... the pound key. (simple tone sound plays)`); a text with
brackets elsewhere is ambiguous and skipped; a repeated key keeps its
first text (the Spanish file lists `digits/0` twice). Keys are matched to WAVs exactly, then
case-insensitively (`digits/1F.wav`). Prompts over `max_seconds` (the 73-86 s demo instructions) are left
out. Every skip is counted in the summary. The ES->EN set pairs the prompts present in both languages
(Spanish audio and text, English text as the translation). The digit sets hold the prompts that say one
digit ("seven", "oh", "cero"), the number sets those that say only number words ("seventy", "thousand").
"""
from __future__ import annotations

import gzip
import io
import re
import shutil
import subprocess
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf

from .manifests import DataError, DataWarning, Utterance, write_jsonl_manifest

PACKAGES = ("asterisk-core-sounds-en", "asterisk-core-sounds-en-wav", "asterisk-core-sounds-es",
            "asterisk-core-sounds-es-wav")
LANGUAGES = {"en": ("en_US_f_Allison", "asterisk-core-sounds-en/core-sounds-en.txt.gz"),
             "es": ("es_MX_f_Allison", "asterisk-core-sounds-es/core-sounds-es.txt.gz")}
SPEAKER = "asterisk-allison"
DIGIT_WORDS = {"en": {"zero", "oh", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"},
               "es": {"cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve"}}
NUMBER_WORDS = {
    "en": {"zero", "oh", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
           "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety", "hundred", "thousand", "million",
           "billion"},
    "es": {"cero", "uno", "una", "un", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve", "diez",
           "once", "doce", "trece", "catorce", "quince", "dieciseis", "dieciséis", "diecisiete", "dieciocho",
           "diecinueve", "veinte", "veintiuno", "veintidos", "veintidós", "veintitres", "veintitrés",
           "veinticuatro", "veinticinco", "veintiseis", "veintiséis", "veintisiete", "veintiocho", "veintinueve",
           "treinta", "cuarenta", "cincuenta", "sesenta", "setenta", "ochenta", "noventa", "cien", "ciento",
           "doscientos", "trescientos", "cuatrocientos", "quinientos", "seiscientos", "setecientos",
           "ochocientos", "novecientos", "mil", "millón", "millon", "millones"},
}
GET_HELP = ("run `apt-get download " + " ".join(PACKAGES) + "` in the downloads folder (Debian/Ubuntu), "
            "or copy the four .deb files there")


class AsteriskError(DataError):
    """The Asterisk packages cannot be fetched, unpacked or read (the message says which and how to fix)."""


# ----------------------------------------------------------------------------------------------------
# Fetching and unpacking


def find_packages(downloads_dir) -> dict[str, Path]:
    """{package: .deb path} for the PACKAGES already in downloads_dir (newest version when several)."""
    found = {}
    for name in PACKAGES:
        debs = sorted(Path(downloads_dir).glob(f"{name}_*_all.deb"))
        if debs:
            found[name] = debs[-1]
    return found


def fetch_packages(downloads_dir) -> list[Path]:
    """The four .deb files, downloaded with `apt-get download` into downloads_dir when missing."""
    downloads_dir = Path(downloads_dir)
    downloads_dir.mkdir(parents=True, exist_ok=True)
    missing = [p for p in PACKAGES if p not in find_packages(downloads_dir)]
    if missing:
        if shutil.which("apt-get") is None:
            raise AsteriskError(f"{downloads_dir}: missing {', '.join(missing)} and no apt-get here; {GET_HELP}")
        proc = subprocess.run(["apt-get", "download", *missing], cwd=downloads_dir, capture_output=True, text=True)
        still = [p for p in PACKAGES if p not in find_packages(downloads_dir)]
        if proc.returncode != 0 or still:
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise AsteriskError(f"`apt-get download {' '.join(missing)}` in {downloads_dir} failed "
                                f"(exit {proc.returncode}: {detail[0]}); try `apt-get update` first, or {GET_HELP}")
    found = find_packages(downloads_dir)
    return [found[p] for p in PACKAGES]


def unpack_packages(debs, dest) -> Path:
    """Extract each .deb's files under dest with `dpkg -x` (`extract_deb` where there is no dpkg); skipped
    when dest/.unpacked lists the same files."""
    dest = Path(dest)
    stamp = dest / ".unpacked"
    names = "\n".join(sorted(Path(d).name for d in debs))
    if stamp.is_file() and stamp.read_text() == names:
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        if shutil.which("dpkg"):
            proc = subprocess.run(["dpkg", "-x", str(deb), str(dest)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise AsteriskError(f"{deb}: `dpkg -x` failed: {proc.stderr.strip()}")
        else:
            extract_deb(deb, dest)
    stamp.write_text(names)
    return dest


def extract_deb(deb, dest) -> None:
    """A .deb is an `ar` archive; its data.tar.{xz,gz,bz2} member holds the files: extract them to dest."""
    deb = Path(deb)
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise AsteriskError(f"{deb}: not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos:pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise AsteriskError(f"{deb}: corrupt ar member header at byte {pos}") from None
        data = blob[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            try:
                with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:  # xz, gz, bz2 or plain
                    tar.extractall(dest, filter="data")
            except tarfile.TarError as e:
                raise AsteriskError(f"{deb}: cannot read {name} without dpkg ({e})") from e
            return
        pos += 60 + size + (size % 2)
    raise AsteriskError(f"{deb}: no data.tar member")


# ----------------------------------------------------------------------------------------------------
# Transcripts


@dataclass
class TranscriptReport:
    path: str
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: {"non_speech": 0, "bracketed": 0, "duplicate_key": 0,
                                                            "malformed": 0})


def clean_prompt_text(text: str) -> str | None:
    """The spoken text of a transcript entry, or None when it is not (only) speech: `[beep]` and
    `(10 seconds of silence)` are sounds; a trailing note or gloss is dropped (`at [@]` -> `at`,
    `IAX (note: does not say "2")` -> `IAX`); brackets anywhere else make the entry ambiguous."""
    text = text.strip()
    if not text or re.fullmatch(r"\[[^\]]*\]|\([^)]*\)", text):
        return None
    note = re.fullmatch(r"(.*?)\s*(\[[^\]]*\]|\([^)]*\))", text)
    if note and not re.search(r"[\[\]()]", note.group(1)):
        text = note.group(1)
    return None if re.search(r"[\[\]()]", text) or not text else text


def parse_transcripts(path) -> tuple[dict[str, str], TranscriptReport]:
    """{key: spoken text} from a core-sounds-<lang>.txt(.gz) file; skips counted in the report."""
    path = Path(path)
    if not path.is_file():
        raise AsteriskError(f"{path}: transcript file not found (is the asterisk-core-sounds-<lang> package "
                            f"unpacked?); {GET_HELP}")
    opener = gzip.open if path.suffix == ".gz" else open
    texts, report = {}, TranscriptReport(str(path))
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith(";"):
                continue
            key, sep, raw = line.partition(":")
            if not sep or not key.strip() or " " in key.strip():
                report.skipped["malformed"] += 1
                warnings.warn(f"{path}:{line_no}: skipped (malformed): not `key: text`", DataWarning, stacklevel=2)
                continue
            key = key.strip()
            if key in texts:
                report.skipped["duplicate_key"] += 1
                warnings.warn(f"{path}:{line_no}: skipped (duplicate_key): {key!r} already has text "
                              f"{texts[key]!r}", DataWarning, stacklevel=2)
                continue
            text = clean_prompt_text(raw)
            if text is None:
                report.skipped["non_speech" if raw.strip()[:1] in "[(" else "bracketed"] += 1
                continue
            texts[key] = text
    report.kept = len(texts)
    return texts, report


def only_words_from(text: str, vocabulary: set[str]) -> bool:
    """True when the text (lower-cased, punctuation dropped) is non-empty and every word is in vocabulary."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return bool(words) and all(w in vocabulary for w in words)


# ----------------------------------------------------------------------------------------------------
# Manifests


@dataclass
class AsteriskSummary:
    manifests: dict[str, str]        # set name -> manifest path
    counts: dict[str, int]           # set name -> utterances
    skipped: dict[str, dict]         # language -> reason -> count
    hours: dict[str, float]

    def __str__(self) -> str:
        sets = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        skipped = "; ".join(f"{lang}: " + ", ".join(f"{k}={v}" for k, v in d.items() if v) for lang, d in self.skipped.items())
        return f"asterisk: {sets} utterances ({self.hours['en'] * 60:.1f} min EN, {self.hours['es'] * 60:.1f} min ES); skipped {skipped}"


def _prompts(root: Path, language: str, max_seconds: float) -> tuple[dict[str, Utterance], dict[str, int]]:
    sounds_name, transcript_rel = LANGUAGES[language]
    sounds = root / "usr/share/asterisk/sounds" / sounds_name
    if not sounds.is_dir():
        raise AsteriskError(f"{sounds}: no prompt folder (is asterisk-core-sounds-{language}-wav unpacked?); {GET_HELP}")
    texts, report = parse_transcripts(root / "usr/share/doc" / transcript_rel)
    wavs = {str(p.relative_to(sounds).with_suffix("")): p for p in sounds.rglob("*.wav")}
    lower = {k.lower(): k for k in wavs}
    skipped = dict(report.skipped, no_audio=0, too_long=0, unreadable=0)
    out = {}
    for key, text in texts.items():
        wav_key = key if key in wavs else lower.get(key.lower())
        if wav_key is None:
            skipped["no_audio"] += 1
            continue
        try:
            info = sf.info(str(wavs[wav_key]))
        except (sf.LibsndfileError, RuntimeError):
            skipped["unreadable"] += 1
            continue
        if info.duration > max_seconds:
            skipped["too_long"] += 1
            continue
        out[key] = Utterance(f"{language}/{key}", str(wavs[wav_key]), text, language, speaker=SPEAKER,
                             duration=round(info.duration, 4))
    return out, skipped


def build_asterisk_manifests(root, out_dir, max_seconds: float = 30.0) -> AsteriskSummary:
    """Manifests (our JSONL) for the unpacked packages under root: asterisk_en, asterisk_es, asterisk_es_en
    (AST), asterisk_{en,es}_digits (one digit word: "seven", "oh"), asterisk_{en,es}_numbers (number words:
    "seventy", "thousand"); audio stays where it was unpacked."""
    root, out_dir = Path(root), Path(out_dir)
    en, skipped_en = _prompts(root, "en", max_seconds)
    es, skipped_es = _prompts(root, "es", max_seconds)
    pairs = [Utterance(f"es_en/{k}", u.audio, u.text, "es", u.speaker, translation=en[k].text,
                       translation_language="en", duration=u.duration) for k, u in es.items() if k in en]
    sets = {"asterisk_en": list(en.values()), "asterisk_es": list(es.values()), "asterisk_es_en": pairs,
            "asterisk_en_digits": [u for u in en.values() if only_words_from(u.text, DIGIT_WORDS["en"])],
            "asterisk_es_digits": [u for u in es.values() if only_words_from(u.text, DIGIT_WORDS["es"])],
            "asterisk_en_numbers": [u for u in en.values() if only_words_from(u.text, NUMBER_WORDS["en"])],
            "asterisk_es_numbers": [u for u in es.values() if only_words_from(u.text, NUMBER_WORDS["es"])]}
    if not en or not es:
        raise AsteriskError(f"{root}: no usable prompts (en {len(en)}, es {len(es)})")
    manifests = {name: str(write_jsonl_manifest(utts, out_dir / f"{name}.jsonl")) for name, utts in sets.items()}
    hours = {lang: sum(u.duration for u in d.values()) / 3600 for lang, d in (("en", en), ("es", es))}
    return AsteriskSummary(manifests, {k: len(v) for k, v in sets.items()}, {"en": skipped_en, "es": skipped_es},
                           hours)


def prepare_asterisk(downloads_dir, out_dir, fetch: bool = True, max_seconds: float = 30.0) -> AsteriskSummary:
    """fetch (when allowed) + unpack into downloads_dir/asterisk + build the manifests in out_dir."""
    downloads_dir = Path(downloads_dir)
    if fetch:
        debs = fetch_packages(downloads_dir)
    else:
        found = find_packages(downloads_dir)
        missing = [p for p in PACKAGES if p not in found]
        if missing:
            raise AsteriskError(f"{downloads_dir}: missing {', '.join(missing)}; {GET_HELP}")
        debs = [found[p] for p in PACKAGES]
    root = unpack_packages(debs, downloads_dir / "asterisk")
    return build_asterisk_manifests(root, out_dir, max_seconds)


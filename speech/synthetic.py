"""Synthetic speech sets from espeak-ng: seeded texts x voices -> a folder of FLAC files + a JSONL manifest.

    train_voices, test_voices = split_voices(english_voices(), heldout_fraction=0.2, seed=0)
    items = digit_and_command_items(2000, train_voices, seed=0)              # list[SynthItem]
    manifest = write_dataset(items, "data/speech/espeak", "train", workers=2) # .../train.jsonl

Texts (all from `random.Random(seed)`, so a seed gives the same set):
- `digit_string`: 3-6 digit words ("four seven one two"); `command`: short smart-home style commands
  ("turn on the kitchen light"); `corpus_sentences`: sentences taken from the caller's documents
  (e.g. the prepared Shakespeare corpus, `data/text/train.jsonl`); `spanish_english_pair`: templated
  Spanish sentences with their English translation (speech translation, AST).
Voices: a language voice + an espeak variant ("en-us+f3"), with per-utterance rate and pitch drawn from
ranges. `split_voices` holds out whole variants (every accent of a held-out variant goes to the test
side), so test speakers have a timbre that training never heard.
Manifest rows: {"id", "audio" (relative to the manifest), "text", "language", "voice", "rate", "pitch",
"duration"} plus "translation" and "translation_language" for AST items.
"""
from __future__ import annotations

import json
import multiprocessing
import random
import re
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from .audio_io import save_audio
from .espeak import ENGLISH_VOICES, SPANISH_VOICES, Voice, list_variants, preload, synthesize

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RATE_RANGE = (140, 210)   # words per minute (espeak default 175)
PITCH_RANGE = (30, 70)    # espeak pitch 0-100 (default 50)

_ROOMS = ("kitchen", "bedroom", "living room", "bathroom", "garage", "office", "hallway", "garden")
_SWITCHABLE = ("light", "lights", "fan", "heater", "radio", "television", "lamp", "music")
_OPENABLE = ("door", "window", "blinds", "curtains", "gate")
_NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "fifteen", "twenty",
            "thirty")
_COMMANDS = (
    "turn {onoff} the {room} {switchable}", "turn {onoff} the {switchable}", "{openclose} the {room} {openable}",
    "{openclose} the {openable}", "set a timer for {number} minutes", "set the temperature to {number} degrees",
    "play some music in the {room}", "stop the music", "lock the front door", "unlock the back door",
    "what time is it", "what is the weather today", "call my mother", "dim the {room} lights",
    "volume up", "volume down", "next song", "wake me up at {digit} o'clock")


@dataclass(frozen=True)
class SynthItem:
    """One utterance to synthesise."""
    id: str
    text: str
    language: str          # "en" | "es"
    voice: Voice
    translation: str | None = None
    translation_language: str | None = None


# ----------------------------------------------------------------------------------------------------
# Texts


def digit_string(rng: random.Random, min_len: int = 3, max_len: int = 6) -> str:
    """'four seven one two': min_len..max_len digit words."""
    return " ".join(rng.choice(DIGITS) for _ in range(rng.randint(min_len, max_len)))


def command(rng: random.Random) -> str:
    """A short command, e.g. 'turn on the kitchen light' (18 templates, ~40 slot words)."""
    slots = {"onoff": rng.choice(("on", "off")), "room": rng.choice(_ROOMS),
             "switchable": rng.choice(_SWITCHABLE), "openclose": rng.choice(("open", "close")),
             "openable": rng.choice(_OPENABLE), "number": rng.choice(_NUMBERS), "digit": rng.choice(DIGITS[1:])}
    return rng.choice(_COMMANDS).format(**slots)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_SPEAKABLE = re.compile(r"^[A-Za-z][A-Za-z ,;:'!?.-]*$")


def corpus_sentences(documents: Iterable[str], min_words: int = 4, max_words: int = 16) -> list[str]:
    """Sentences from prose/verse documents: paragraphs joined, cut at . ! ?, kept when they are plain
    speakable text of min_words..max_words words starting with a capital (no digits, brackets, stage
    directions, speaker headings or words in capitals, which mark headings and scene lines). Order and duplicates are kept; sample with `rng.choice`."""
    out = []
    for doc in documents:
        for para in re.split(r"\n\s*\n", doc):
            lines = [ln.strip() for ln in para.strip().splitlines() if ln.strip()]
            if not lines or lines[0].startswith("[") or all(ln.isupper() for ln in lines):
                continue
            if lines[0].isupper() and lines[0].endswith("."):  # "ROSALIND." speaker heading
                lines = lines[1:]
            elif len(first := lines[0].split()[0]) > 1 and first.isupper():  # "SCENE I. Elsinore."
                continue
            text = re.sub(r"\s*--\s*", ", ", re.sub(r"\s+", " ", " ".join(lines)))
            text = re.sub(r"([.!?;:]),\s", r"\1 ", text)
            for sentence in _SENTENCE_END.split(text):
                sentence = sentence.strip(" ,;:-")
                words = sentence.split()
                if (min_words <= len(words) <= max_words and _SPEAKABLE.match(sentence) and sentence[0].isupper()
                        and not any(len(w) > 1 and w.isupper() for w in words)):
                    out.append(sentence)
    return out


def load_corpus_sentences(jsonl_path, min_words: int = 4, max_words: int = 16) -> list[str]:
    """`corpus_sentences` over the "text" field of a JSONL document file (e.g. data/text/train.jsonl)."""
    path = Path(jsonl_path)
    texts = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{line_no}: not a document row with a 'text' field ({e})") from e
    return corpus_sentences(texts, min_words, max_words)


# Spanish -> English templates: each slot value is a (spanish, english) pair, so agreement is written out.
_ES_EN_ROOMS = (("de la cocina", "kitchen"), ("del dormitorio", "bedroom"), ("del baño", "bathroom"),
                ("de la sala", "living room"), ("del garaje", "garage"), ("de la oficina", "office"))
_ES_EN_NUMBERS = (("dos", "two"), ("tres", "three"), ("cuatro", "four"), ("cinco", "five"), ("seis", "six"),
                  ("siete", "seven"), ("ocho", "eight"), ("nueve", "nine"), ("diez", "ten"))
_ES_EN_PLURALS = (("gatos", "cats"), ("perros", "dogs"), ("libros", "books"), ("manzanas", "apples"),
                  ("hermanos", "brothers"), ("sillas", "chairs"), ("flores", "flowers"), ("coches", "cars"))
_ES_EN_PLACES = (("la estación", "the station"), ("el hospital", "the hospital"), ("la biblioteca", "the library"),
                 ("el mercado", "the market"), ("el banco", "the bank"), ("la playa", "the beach"),
                 ("el museo", "the museum"), ("la escuela", "the school"))
_ES_EN_FOODS = (("un café", "a coffee"), ("agua", "water"), ("pan", "bread"), ("una sopa", "a soup"),
                ("un té", "a tea"), ("fruta", "fruit"), ("pescado", "fish"), ("arroz", "rice"))
_ES_EN_WEATHER = (("frío", "cold"), ("calor", "hot"), ("sol", "sunny"), ("viento", "windy"))
_ES_EN_PEOPLE = (("mi hermana", "my sister"), ("mi padre", "my father"), ("mi madre", "my mother"),
                 ("mi amigo", "my friend"), ("el niño", "the boy"), ("la profesora", "the teacher"))
_ES_EN_ACTIONS = (("lee un libro", "reads a book"), ("come una manzana", "eats an apple"),
                  ("bebe agua", "drinks water"), ("escribe una carta", "writes a letter"),
                  ("trabaja mucho", "works a lot"), ("canta en la cocina", "sings in the kitchen"))
_ES_EN_HOURS = (("a la una", "at one"), ("a las dos", "at two"), ("a las tres", "at three"),
                ("a las cinco", "at five"), ("a las siete", "at seven"), ("a las nueve", "at nine"),
                ("a las once", "at eleven"))
_ES_EN_TEMPLATES = (
    ("enciende la luz {room}", "turn on the {room} light"), ("apaga la luz {room}", "turn off the {room} light"),
    ("abre la ventana {room}", "open the {room} window"), ("cierra la puerta {room}", "close the {room} door"),
    ("tengo {number} {plural}", "I have {number} {plural}"), ("hay {number} {plural} aquí", "there are {number} {plural} here"),
    ("¿dónde está {place}?", "where is {place}?"), ("quiero {food}, por favor", "I want {food}, please"),
    ("hoy hace {weather}", "it is {weather} today"), ("{person} {action}", "{person} {action}"),
    ("el tren sale {hour}", "the train leaves {hour}"), ("vamos a {place} {hour}", "we go to {place} {hour}"))


def spanish_english_pair(rng: random.Random) -> tuple[str, str]:
    """A templated (Spanish, English) sentence pair, e.g. ('tengo tres gatos', 'I have three cats')."""
    return _pair_and_slots(rng)[:2]


def _pair_and_slots(rng: random.Random) -> tuple[str, str, int]:
    es, en = rng.choice(_ES_EN_TEMPLATES)
    slots = {"room": _ES_EN_ROOMS, "number": _ES_EN_NUMBERS, "plural": _ES_EN_PLURALS, "place": _ES_EN_PLACES,
             "food": _ES_EN_FOODS, "weather": _ES_EN_WEATHER, "person": _ES_EN_PEOPLE, "action": _ES_EN_ACTIONS,
             "hour": _ES_EN_HOURS}
    picked = {k: rng.choice(v) for k, v in slots.items() if "{" + k + "}" in es}
    es = es.format(**{k: v[0] for k, v in picked.items()})
    en = en.format(**{k: v[1] for k, v in picked.items()})
    if es.startswith("vamos a el "):
        es = es.replace("vamos a el ", "vamos al ", 1)
    return es, en, len(picked)


# ----------------------------------------------------------------------------------------------------
# Voices


def english_voices(variants: Sequence[str] | None = None) -> list[str]:
    """Speaker names "accent+variant" over ENGLISH_VOICES x variants (default: every non-effect variant)."""
    return [f"{lang}+{v}" for lang in ENGLISH_VOICES for v in (variants or list_variants())]


def spanish_voices(variants: Sequence[str] | None = None) -> list[str]:
    return [f"{lang}+{v}" for lang in SPANISH_VOICES for v in (variants or list_variants())]


def split_voices(voices: Sequence[str], heldout_fraction: float = 0.2, seed: int = 0,
                 by: str = "variant") -> tuple[list[str], list[str]]:
    """(train, held_out) speaker names; whole groups held out: by="variant" puts every accent of a
    held-out variant on the test side, by="voice" holds out single accent+variant speakers."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), not {heldout_fraction}")
    if by not in ("variant", "voice"):
        raise ValueError(f"by must be 'variant' or 'voice', not {by!r}")
    key = (lambda name: name.partition("+")[2]) if by == "variant" else (lambda name: name)
    groups = sorted({key(v) for v in voices})
    if len(groups) < 2:
        raise ValueError(f"need at least 2 {by}s to hold some out, got {groups}")
    n_held = min(len(groups) - 1, max(1, round(heldout_fraction * len(groups))))
    held = set(random.Random(seed).sample(groups, n_held))
    return [v for v in voices if key(v) not in held], [v for v in voices if key(v) in held]


def voice_for(name: str, rng: random.Random, rate_range=RATE_RANGE, pitch_range=PITCH_RANGE) -> Voice:
    """Voice "accent+variant" with rate and pitch drawn uniformly from the ranges."""
    lang, _, variant = name.partition("+")
    return Voice(lang, variant, rng.randint(*rate_range), rng.randint(*pitch_range))


# ----------------------------------------------------------------------------------------------------
# Item lists


def digit_and_command_items(n: int, voices: Sequence[str], seed: int = 0, digit_fraction: float = 0.5,
                            prefix: str = "dc") -> list[SynthItem]:
    """n English items: digit strings (digit_fraction of them) and commands, each on a random voice."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        text = digit_string(rng) if rng.random() < digit_fraction else command(rng)
        items.append(SynthItem(f"{prefix}{i:06d}", text, "en", voice_for(rng.choice(voices), rng)))
    return items


def sentence_items(n: int, sentences: Sequence[str], voices: Sequence[str], seed: int = 0,
                   prefix: str = "sent") -> list[SynthItem]:
    """n English items with sentences drawn (with replacement) from the caller's list."""
    if not sentences:
        raise ValueError("no sentences to draw from")
    rng = random.Random(seed)
    return [SynthItem(f"{prefix}{i:06d}", rng.choice(sentences), "en", voice_for(rng.choice(voices), rng))
            for i in range(n)]


def heldout_sentence(text: str, n_slots: int, fraction: float = 0.2) -> bool:
    """Whether a templated sentence is held out: about `fraction` of those with two or more slots (a fixed hash
    of the text, the same for every seed), so each held-out sentence is a new combination of words that training
    has (single-slot sentences would take their only example of a word along)."""
    return n_slots >= 2 and zlib.crc32(text.encode("utf-8")) % 1000 < fraction * 1000


def ast_items(n: int, voices: Sequence[str], seed: int = 0, prefix: str = "ast",
              sentences: str = "any") -> list[SynthItem]:
    """n Spanish speech -> English text items from the templated pairs, on Spanish voices. sentences: "any",
    "seen" (never a `heldout_sentence`) or "heldout" (only those: slot combinations training never saw)."""
    if sentences not in ("any", "seen", "heldout"):
        raise ValueError(f"sentences must be any, seen or heldout, not {sentences!r}")
    rng = random.Random(seed)
    items = []
    for i in range(n):
        es, en, slots = _pair_and_slots(rng)
        while sentences != "any" and heldout_sentence(es, slots) != (sentences == "heldout"):
            es, en, slots = _pair_and_slots(rng)
        items.append(SynthItem(f"{prefix}{i:06d}", es, "es", voice_for(rng.choice(voices), rng), en, "en"))
    return items


# ----------------------------------------------------------------------------------------------------
# Writing a dataset folder


def _write_one(job: tuple[SynthItem, str, str]) -> dict:
    item, out_dir, audio_rel = job
    wave = synthesize(item.text, item.voice)
    save_audio(Path(out_dir) / audio_rel, wave)
    row = {"id": item.id, "audio": audio_rel, "text": item.text, "language": item.language,
           "voice": item.voice.name, "rate": item.voice.rate, "pitch": item.voice.pitch,
           "duration": round(wave.numel() / 16000, 4)}
    if item.translation is not None:
        row.update(translation=item.translation, translation_language=item.translation_language)
    return row


def _worker_init():
    torch.set_num_threads(1)


def write_dataset(items: Sequence[SynthItem], out_dir, name: str, workers: int = 1,
                  progress: Callable[[str], None] | None = None, progress_every: int = 500) -> Path:
    """Synthesise items to out_dir/audio/<name>/<id>.flac (16 kHz, 16-bit) and write out_dir/<name>.jsonl
    (rows in item order). Output is the same for any number of workers (each utterance is synthesised
    from a freshly loaded espeak). Returns the manifest path; the manifest is written last, atomically."""
    out_dir = Path(out_dir)
    if len({it.id for it in items}) != len(items):
        raise ValueError(f"{name}: item ids are not unique")
    jobs = [(it, str(out_dir), f"audio/{name}/{it.id}.flac") for it in items]
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0, rows = time.perf_counter(), []
    threads, pool = torch.get_num_threads(), None
    torch.set_num_threads(1)  # utterance-sized tensors: thread start-up costs more than it saves
    try:
        if workers > 1:
            preload()
            pool = multiprocessing.get_context("fork").Pool(workers, initializer=_worker_init)
            results = pool.imap(_write_one, jobs, chunksize=8)
        else:
            results = map(_write_one, jobs)
        for row in results:
            rows.append(row)
            if len(rows) % progress_every == 0 or len(rows) == len(jobs):
                rate = len(rows) / max(time.perf_counter() - t0, 1e-9)
                say(f"  {name}: {len(rows)}/{len(jobs)} utterances ({rate:.0f}/s)")
    finally:
        torch.set_num_threads(threads)
        if pool is not None:
            pool.terminate() if len(rows) < len(jobs) else pool.close()
            pool.join()
    manifest = out_dir / f"{name}.jsonl"
    tmp = manifest.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(manifest)
    return manifest

"""`herd data prepare speech`: the Asterisk prompts and the quickstart espeak set under data/speech (idempotent).

    summary = prepare_speech(Path("data/speech"), Path("data/downloads"))

Writes
  <out>/asterisk/asterisk_{en,es,es_en,en_digits,es_digits,en_numbers,es_numbers}.jsonl + info.json
      (the Debian packages are fetched into <downloads> with `apt-get download` when missing and unpacked
      to <downloads>/asterisk; when they cannot be had, this part is reported and skipped)
  <out>/espeak/{train,valid,test_heldout}.jsonl + audio/<set>/*.flac + voices.json + info.json
      digit strings and short commands; train and valid on the training voices, test_heldout on voices
      whose espeak variant never occurs in training (`speech.synthetic.split_voices`)
  optional sets (`sets=`), the same layout and voice split:
  <out>/espeak_sentences/...  open-vocabulary English: sentences of the text corpus (data/text: train.jsonl for
      train, val.jsonl for valid and test_heldout, so test sentences are unseen too);
      experiments/speech/asr_smollm2.yaml
  <out>/espeak_ast/...        Spanish speech of templated sentences with their English translations (Spanish
      voices; test_heldout also on sentences no training row has: speech.synthetic.heldout_sentence);
      experiments/speech/ast.yaml
  <out>/espeak_questions/...  the image quickstart's scene questions spoken (test_heldout: questions of held-out
      scenes on held-out voices), and train_mixed.jsonl = the espeak set's train + these (experiments/multimodal/)
Each part leaves a `.done` file holding its settings; a second run with the same settings does nothing,
with other settings that part is rebuilt from scratch.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from speech.asterisk import AsteriskError, find_packages, prepare_asterisk
from speech.synthetic import (SynthItem, ast_items, digit_and_command_items, english_voices, load_corpus_sentences, sentence_items,
                              spanish_voices, split_voices, write_dataset)


ESPEAK_SETS = {"espeak": "digit strings and short commands", "sentences": "corpus sentences (open vocabulary)",
               "ast": "Spanish speech -> English text",
               "questions": "the image quickstart's scene questions (+ train_mixed.jsonl: with the espeak set's "
                            "train)"}
SET_FOLDERS = {"espeak": "espeak", "sentences": "espeak_sentences", "ast": "espeak_ast",
               "questions": "espeak_questions"}
# The scenes of experiments/image/quickstart.yaml, whose questions the "questions" set speaks.
QUESTION_SCENES = dict(image_size=84, max_objects=2, p_word=0.0, p_digit=0.0,
                       qa_types=["color", "shape", "count", "position", "yesno"])


@dataclass
class EspeakSetConfig:
    """Sizes of an espeak set (defaults: about a minute for the quickstart set with 2 workers on 2 shared cores)."""
    train_size: int = 4000
    valid_size: int = 200
    test_size: int = 400
    heldout_fraction: float = 0.2   # of the espeak variants; their every accent is test-only
    digit_fraction: float = 0.5     # digit strings vs commands
    seed: int = 0


def _done(folder: Path, settings: dict) -> bool:
    marker = folder / ".done"
    try:
        return json.loads(marker.read_text()) == settings
    except (OSError, json.JSONDecodeError):
        return False


def _mark(folder: Path, settings: dict) -> None:
    (folder / ".done").write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")


def _set_items(kind: str, cfg: EspeakSetConfig, corpus_dir: Path) -> tuple[dict, dict]:
    """({split: items}, {"settings": what .done records, "voices": {split: speakers}}) of one espeak set;
    voices split by variant, held-out ones test-only."""
    voices = spanish_voices() if kind == "ast" else english_voices()
    train_voices, test_voices = split_voices(voices, cfg.heldout_fraction, cfg.seed)
    settings = {"config": asdict(cfg), "voices": voices, "version": 1}
    if kind == "espeak":
        def make(n, voice_list, seed, prefix):
            return digit_and_command_items(n, voice_list, seed, cfg.digit_fraction, prefix)
    elif kind == "ast":  # test_heldout: new voices AND new sentences (word combinations training never had)
        def make(n, voice_list, seed, prefix):
            return ast_items(n, voice_list, seed, prefix, sentences="heldout" if prefix == "test" else "seen")
        settings["sentences"] = "test_heldout holds the held-out sentences"
    elif kind == "questions":  # train / valid: questions of training scenes; test_heldout: of held-out scenes
        def make(n, voice_list, seed, prefix):
            return scene_question_items(n, voice_list, seed, prefix)
        settings["scenes"] = QUESTION_SCENES
    else:
        texts = {}
        for split, file in (("train", "train.jsonl"), ("test", "val.jsonl")):
            path = corpus_dir / file
            if not path.is_file():
                raise FileNotFoundError(f"{path}: the sentence set reads the text corpus: run `herd data prepare text` "
                                        "first (or pass --corpus-dir)")
            texts[split] = load_corpus_sentences(path)
        settings["corpus"] = {k: len(v) for k, v in texts.items()}

        def make(n, voice_list, seed, prefix):
            return sentence_items(n, texts["train" if prefix == "train" else "test"], voice_list, seed, prefix)
    if kind != "espeak":  # (the quickstart set's settings stay as they were: no rebuild of prepared data)
        settings["kind"] = kind
    items = {"train": make(cfg.train_size, train_voices, cfg.seed, "train"),
             "valid": make(cfg.valid_size, train_voices, cfg.seed + 1, "valid"),
             "test_heldout": make(cfg.test_size, test_voices, cfg.seed + 2, "test")}
    return items, {"settings": settings, "voices": {"train": train_voices, "test_heldout": test_voices}}


def scene_question_items(n: int, voices, seed: int, prefix: str) -> list[SynthItem]:
    """n questions of procedural scenes (QUESTION_SCENES), each on a random voice: split "train" scenes for the
    train / valid items, "heldout" scenes (colour-shape pairs training never shows) for test items."""
    from experiments.image.data import ScenesSection
    from speech.synthetic import voice_for
    from vision.scenes import generate_scene
    config = ScenesSection(**QUESTION_SCENES).scene_config()
    split = "heldout" if prefix == "test" else "train"
    rng, items, index = random.Random(seed), [], seed * 100_000
    while len(items) < n:
        scene = generate_scene(index, split, 0, config)
        index += 1
        qa = [q for q in scene.qa if q.type in QUESTION_SCENES["qa_types"]]
        text = rng.choice(qa).question
        items.append(SynthItem(f"{prefix}{len(items):06d}", text, "en", voice_for(rng.choice(voices), rng)))
    return items


def mix_manifests(out: Path, manifests: list[Path]) -> Path:
    """One manifest of the rows of several, audio paths rewritten relative to `out`'s folder, ids prefixed with
    their set's folder name (sets number their rows alike)."""
    rows = []
    for manifest in manifests:
        for line in manifest.read_text().splitlines():
            row = json.loads(line)
            row["audio"] = os.path.relpath((manifest.parent / row["audio"]).resolve(), out.parent.resolve())
            row["id"] = f"{manifest.parent.name}/{row['id']}"
            rows.append(json.dumps(row))
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(rows) + "\n")
    os.replace(tmp, out)
    return out


def prepare_espeak_set(out_dir: Path, config: EspeakSetConfig | None = None, workers: int = 2,
                       say: Callable[[str], None] = print, kind: str = "espeak",
                       corpus_dir: Path = Path("data/text")) -> str:
    """Synthesise one espeak set (ESPEAK_SETS) into out_dir (skipped when out_dir/.done matches); one-line summary."""
    if kind not in ESPEAK_SETS:
        raise ValueError(f"unknown espeak set {kind!r}; known: {', '.join(ESPEAK_SETS)}")
    cfg, label = config or EspeakSetConfig(), SET_FOLDERS[kind]
    sets, meta = _set_items(kind, cfg, Path(corpus_dir))
    train_voices, test_voices = meta["voices"]["train"], meta["voices"]["test_heldout"]
    if _done(out_dir, meta["settings"]):
        info = json.loads((out_dir / "info.json").read_text())
        return f"{label}: already prepared ({_espeak_counts(info)})"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    (out_dir / "voices.json").write_text(json.dumps(meta["voices"], indent=1))
    t0, info = time.perf_counter(), {"sets": {}, "train_voices": len(train_voices), "heldout_voices": len(test_voices),
                                     "content": ESPEAK_SETS[kind]}
    for name, items in sets.items():
        say(f"{label}: synthesising {name} ({len(items)} utterances, {workers} worker(s))")
        manifest = write_dataset(items, out_dir, name, workers=workers, progress=say,
                                 progress_every=max(100, len(items) // 5))
        seconds = sum(json.loads(line)["duration"] for line in manifest.read_text().splitlines())
        info["sets"][name] = {"utterances": len(items), "hours": round(seconds / 3600, 3), "manifest": manifest.name}
    elapsed = time.perf_counter() - t0
    total = sum(len(items) for items in sets.values())
    info.update(seconds=round(elapsed, 1), utterances_per_second=round(total / elapsed, 1), workers=workers)
    (out_dir / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    _mark(out_dir, meta["settings"])
    return f"{label}: {_espeak_counts(info)} in {elapsed:.0f} s ({total / elapsed:.0f} utterances/s)"


def _espeak_counts(info: dict) -> str:
    sets = ", ".join(f"{k} {v['utterances']}" for k, v in info["sets"].items())
    return f"{sets} utterances; {info['train_voices']} training voices, {info['heldout_voices']} held-out voices"


def prepare_asterisk_set(out_dir: Path, downloads_dir: Path, fetch: bool = True,
                         say: Callable[[str], None] = print) -> str:
    """The Asterisk manifests into out_dir (skipped when built from the same packages); one-line summary.
    Missing packages that cannot be fetched give a summary saying so, not an error."""
    settings = {"packages": sorted(p.name for p in find_packages(downloads_dir).values()), "version": 1}
    if len(settings["packages"]) == 4 and _done(out_dir, settings):
        return f"asterisk: already prepared ({json.loads((out_dir / 'info.json').read_text())['summary']})"
    say("asterisk: fetching and unpacking the Debian packages" if fetch else "asterisk: unpacking")
    try:
        summary = prepare_asterisk(downloads_dir, out_dir, fetch=fetch)
    except AsteriskError as e:
        return f"asterisk: skipped ({e})"
    text = str(summary).removeprefix("asterisk: ")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "info.json").write_text(json.dumps({"summary": text, **asdict(summary)}, indent=1) + "\n")
    _mark(out_dir, {"packages": sorted(p.name for p in find_packages(downloads_dir).values()), "version": 1})
    return f"asterisk: {text}"


def prepare_speech(out_dir: Path = Path("data/speech"), downloads_dir: Path = Path("data/downloads"),
                   espeak: EspeakSetConfig | None = None, workers: int = 2, asterisk: bool = True,
                   fetch: bool = True, say: Callable[[str], None] | None = None, sets=("espeak",),
                   corpus_dir: Path = Path("data/text")) -> str:
    """Asterisk and the espeak `sets` (ESPEAK_SETS); returns their one-line summaries joined with "; ".
    Progress lines go to `say` (default: stderr)."""
    say = say or (lambda msg: print(f"herd: {msg}", file=sys.stderr, flush=True))
    out_dir, downloads_dir = Path(out_dir), Path(downloads_dir)
    unknown = [k for k in sets if k not in ESPEAK_SETS]
    if unknown:
        raise ValueError(f"unknown espeak set(s) {unknown}; known: {', '.join(ESPEAK_SETS)}")
    parts = []
    if asterisk:
        parts.append(prepare_asterisk_set(out_dir / "asterisk", downloads_dir, fetch, say))
    for kind in sets:
        parts.append(prepare_espeak_set(out_dir / SET_FOLDERS[kind], espeak, workers, say, kind, corpus_dir))
        base = out_dir / SET_FOLDERS["espeak"] / "train.jsonl"
        if kind == "questions" and base.is_file():  # one training manifest: commands and digits + questions
            folder = out_dir / SET_FOLDERS[kind]
            mix_manifests(folder / "train_mixed.jsonl", [base, folder / "train.jsonl"])
    return "; ".join(parts)

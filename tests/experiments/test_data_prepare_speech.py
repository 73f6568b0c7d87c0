"""experiments/data_prep_speech.py: a tiny espeak set (idempotent), Asterisk when its packages are here."""
import json
from pathlib import Path

import pytest

from experiments.data_prep_speech import EspeakSetConfig, prepare_speech
from speech.asterisk import PACKAGES, find_packages
from speech.manifests import DataWarning, load_jsonl_manifest

DOWNLOADS = Path(__file__).resolve().parents[2] / "data" / "downloads"
TINY = EspeakSetConfig(train_size=12, valid_size=3, test_size=5, seed=1)


def test_espeak_quickstart_set_is_built_once(tmp_path):
    said = []
    summary = prepare_speech(tmp_path / "speech", tmp_path / "downloads", espeak=TINY, workers=1, asterisk=False,
                             say=said.append)
    assert summary.startswith("espeak: train 12, valid 3, test_heldout 5 utterances")
    assert any("synthesising train (12 utterances" in s for s in said)
    folder = tmp_path / "speech" / "espeak"
    voices = json.loads((folder / "voices.json").read_text())
    train, _ = load_jsonl_manifest(folder / "train.jsonl")
    test, _ = load_jsonl_manifest(folder / "test_heldout.jsonl")
    assert len(train) == 12 and len(test) == 5
    held_variants = {v.partition("+")[2] for v in voices["test_heldout"]}
    assert all(u.speaker in voices["train"] for u in train) and all(u.speaker in voices["test_heldout"] for u in test)
    assert not {u.speaker.partition("+")[2] for u in train} & held_variants
    stamp = (folder / "train.jsonl").stat().st_mtime_ns
    again = prepare_speech(tmp_path / "speech", tmp_path / "downloads", espeak=TINY, workers=1, asterisk=False,
                           say=said.append)
    assert again.startswith("espeak: already prepared (train 12") and (folder / "train.jsonl").stat().st_mtime_ns == stamp
    bigger = EspeakSetConfig(train_size=14, valid_size=3, test_size=5, seed=1)
    rebuilt = prepare_speech(tmp_path / "speech", tmp_path / "downloads", espeak=bigger, workers=1, asterisk=False,
                             say=said.append)
    assert rebuilt.startswith("espeak: train 14") and len((folder / "train.jsonl").read_text().splitlines()) == 14
    assert len(list((folder / "audio" / "train").glob("*.flac"))) == 14


def test_missing_asterisk_packages_are_reported_not_fatal(tmp_path):
    summary = prepare_speech(tmp_path / "speech", tmp_path / "downloads", espeak=TINY, workers=1, fetch=False,
                             say=lambda s: None)
    assert summary.startswith("asterisk: skipped (") and "apt-get download asterisk-core-sounds-en" in summary
    assert "espeak: train 12" in summary


def test_asterisk_from_packages_already_downloaded(tmp_path):
    found = find_packages(DOWNLOADS)
    if len(found) < len(PACKAGES):
        pytest.skip("the Asterisk packages are not in data/downloads")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    for deb in found.values():
        (downloads / deb.name).symlink_to(deb)
    with pytest.warns(DataWarning, match="duplicate_key"):
        first = prepare_speech(tmp_path / "speech", downloads, espeak=TINY, workers=1, fetch=False, say=lambda s: None)
    assert "asterisk_en 550, asterisk_es 473, asterisk_es_en 445, asterisk_en_digits 11" in first
    again = prepare_speech(tmp_path / "speech", downloads, espeak=TINY, workers=1, fetch=False, say=lambda s: None)
    assert again.startswith("asterisk: already prepared (asterisk_en 550")
    digits, _ = load_jsonl_manifest(tmp_path / "speech" / "asterisk" / "asterisk_en_digits.jsonl")
    assert {u.text for u in digits} == {"zero", "oh", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                        "nine"}
    pairs, _ = load_jsonl_manifest(tmp_path / "speech" / "asterisk" / "asterisk_es_en.jsonl")
    assert all(u.language == "es" and u.translation_language == "en" and u.translation for u in pairs)


def test_sentence_and_ast_sets(tmp_path):
    """The optional sets of asr_smollm2.yaml and ast.yaml: unseen sentences and voices in test_heldout; Spanish
    speech with English translations; a missing corpus names the file and the command that makes it."""
    corpus = tmp_path / "text"
    with pytest.raises(FileNotFoundError, match=r"train\.jsonl.*herd data prepare text"):
        prepare_speech(tmp_path / "speech", tmp_path, espeak=TINY, workers=1, asterisk=False, sets=("sentences",),
                       corpus_dir=corpus, say=lambda s: None)
    corpus.mkdir()
    seen = "The cat sat on the mat today. A dog ran into the garden quickly."
    unseen = "My sister reads a long book at night."
    (corpus / "train.jsonl").write_text(json.dumps({"text": seen}) + "\n")
    (corpus / "val.jsonl").write_text(json.dumps({"text": unseen}) + "\n")
    summary = prepare_speech(tmp_path / "speech", tmp_path, espeak=TINY, workers=1, asterisk=False,
                             sets=("sentences", "ast"), corpus_dir=corpus, say=lambda s: None)
    assert summary.startswith("espeak_sentences: train 12, valid 3, test_heldout 5")
    assert "; espeak_ast: train 12" in summary
    train, _ = load_jsonl_manifest(tmp_path / "speech" / "espeak_sentences" / "train.jsonl")
    test, _ = load_jsonl_manifest(tmp_path / "speech" / "espeak_sentences" / "test_heldout.jsonl")
    assert {u.text for u in train} <= {"The cat sat on the mat today.", "A dog ran into the garden quickly."}
    assert {u.text for u in test} == {unseen}
    ast, _ = load_jsonl_manifest(tmp_path / "speech" / "espeak_ast" / "test_heldout.jsonl")
    voices = json.loads((tmp_path / "speech" / "espeak_ast" / "voices.json").read_text())
    assert all(u.language == "es" and u.translation_language == "en" and u.translation for u in ast)
    assert all(u.speaker in voices["test_heldout"] and u.speaker.startswith("es") for u in ast)
    ast_train, _ = load_jsonl_manifest(tmp_path / "speech" / "espeak_ast" / "train.jsonl")
    assert not {u.text for u in ast} & {u.text for u in ast_train}  # unseen sentences too
    assert not (tmp_path / "speech" / "espeak").exists()


def test_scene_questions_and_the_mixed_manifest(tmp_path):
    """The questions set speaks the image quickstart's scene questions (held-out scenes for test items), and its
    train_mixed.jsonl joins two sets with ids kept apart and audio paths that still resolve."""
    import json as _json

    from experiments.data_prep_speech import mix_manifests, scene_question_items
    train = scene_question_items(20, ["en-us+m1"], 0, "train")
    test = scene_question_items(20, ["en+f3"], 2, "test")
    assert all(it.text.endswith("?") for it in train + test) and len({it.id for it in train}) == 20
    assert {it.voice.name for it in test} == {"en+f3"}
    for name in ("a", "b"):
        (tmp_path / name / "audio").mkdir(parents=True)
        (tmp_path / name / "audio" / "x.flac").write_bytes(b"")
        (tmp_path / name / "train.jsonl").write_text(_json.dumps({"id": "train000000", "audio": "audio/x.flac",
                                                                   "text": name}) + "\n")
    out = mix_manifests(tmp_path / "b" / "mixed.jsonl", [tmp_path / "a" / "train.jsonl", tmp_path / "b" / "train.jsonl"])
    rows = [_json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a/train000000", "b/train000000"]
    assert all((out.parent / r["audio"]).is_file() for r in rows) and rows[0]["audio"] == "../a/audio/x.flac"

"""speech/synthetic.py: seeded texts, held-out voices, and the FLAC + JSONL dataset writer."""
import json
import random

import pytest
import soundfile as sf

from speech.espeak import Voice
from speech.synthetic import DIGITS, SynthItem, ast_items, command, corpus_sentences, digit_and_command_items, \
    digit_string, english_voices, load_corpus_sentences, sentence_items, spanish_english_pair, split_voices, \
    write_dataset


def test_text_generators_are_seeded_and_well_formed():
    a = [(digit_string(r), command(r), spanish_english_pair(r)) for r in [random.Random(3)] for _ in range(50)]
    b = [(digit_string(r), command(r), spanish_english_pair(r)) for r in [random.Random(3)] for _ in range(50)]
    assert a == b
    for digits, cmd, (es, en) in a:
        assert 3 <= len(digits.split()) <= 6 and set(digits.split()) <= set(DIGITS)
        assert cmd and "{" not in cmd and cmd == cmd.lower()
        assert "{" not in es + en and "vamos a el" not in es
    assert len({c for _, c, _ in a}) > 30  # varied


def test_spanish_english_pairs_align_slot_by_slot():
    rng = random.Random(0)
    pairs = dict(spanish_english_pair(rng) for _ in range(400))
    assert pairs.get("tengo tres gatos", "I have three cats") == "I have three cats"
    assert pairs.get("hoy hace frío", "it is cold today") == "it is cold today"
    assert pairs.get("enciende la luz de la cocina", "turn on the kitchen light") == "turn on the kitchen light"
    assert any(es.startswith("vamos al ") for es in pairs)
    assert len(pairs) > 150


def test_corpus_sentences_keep_speech_and_drop_headings_directions_and_speakers():
    doc = ("HAMLET\n\nACT I.\n\nSCENE I. Elsinore. A platform before the Castle.\n\n[Enter Francisco.]\n\n"
           "BERNARDO.\nWho's there? Nay, answer me: stand,\nand unfold yourself.\n\n"
           "FRANCISCO.\nLong live the king!--Is it you, my good friend?\n\nHe counted 12 ships in the bay today.")
    got = corpus_sentences([doc], min_words=2, max_words=12)
    assert got == ["Who's there?", "Nay, answer me: stand, and unfold yourself.", "Long live the king!",
                   "Is it you, my good friend?"]
    assert corpus_sentences([doc], min_words=5) == ["Nay, answer me: stand, and unfold yourself.",
                                                    "Is it you, my good friend?"]


def test_load_corpus_sentences_names_a_bad_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "Good morning to you all, my friends."}) + "\n" + '{"title": 1}\n')
    with pytest.raises(ValueError, match=r"docs.jsonl:2: not a document row"):
        load_corpus_sentences(path)
    path.write_text(json.dumps({"text": "Good morning to you all, my friends."}) + "\n")
    assert load_corpus_sentences(path) == ["Good morning to you all, my friends."]


def test_held_out_variants_never_reach_training():
    voices = english_voices()
    train, test = split_voices(voices, heldout_fraction=0.2, seed=1)
    assert sorted(train + test) == sorted(voices)
    train_variants = {v.partition("+")[2] for v in train}
    test_variants = {v.partition("+")[2] for v in test}
    assert not train_variants & test_variants
    assert 0.15 < len(test_variants) / len(train_variants | test_variants) < 0.25
    assert len({v.partition("+")[0] for v in test}) == 8  # every accent appears on the test side
    assert split_voices(voices, 0.2, seed=1) == (train, test) and split_voices(voices, 0.2, seed=2) != (train, test)
    single_train, single_test = split_voices(voices, 0.1, seed=0, by="voice")
    assert not set(single_train) & set(single_test) and len(single_test) == round(0.1 * len(voices))
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_voices(voices, 1.0)


def test_item_builders_use_the_given_voices_and_ranges():
    items = digit_and_command_items(40, ["en-us+f3", "en+m2"], seed=5)
    assert {it.voice.name for it in items} <= {"en-us+f3", "en+m2"}
    assert all(140 <= it.voice.rate <= 210 and 30 <= it.voice.pitch <= 70 for it in items)
    assert items == digit_and_command_items(40, ["en-us+f3", "en+m2"], seed=5)
    ast = ast_items(10, ["es+f1"], seed=0)
    assert all(it.language == "es" and it.translation and it.translation_language == "en" for it in ast)
    seen = ast_items(3000, ["es+f1"], seed=1, sentences="seen")
    held = ast_items(60, ["es+f1"], seed=2, sentences="heldout")
    assert not {it.text for it in seen} & {it.text for it in held} and len({it.text for it in held}) > 10
    words = {w for it in seen for w in (it.text + " " + it.translation).split()}
    assert all(set((it.text + " " + it.translation).split()) <= words for it in held)  # new combinations only
    sents = sentence_items(5, ["Who goes there?"], ["en-us+m1"])
    assert {it.text for it in sents} == {"Who goes there?"}


def test_write_dataset_gives_flac_and_manifest_identical_for_any_worker_count(tmp_path):
    items = digit_and_command_items(20, ["en-us+f3", "en+m2", "en-gb-scotland+klatt"], seed=0)
    items += [SynthItem("ast0", "tengo tres gatos", "es", Voice("es", "m1"), "I have three cats", "en")]
    messages = []
    one = write_dataset(items, tmp_path / "a", "train", workers=1, progress=messages.append, progress_every=10)
    two = write_dataset(items, tmp_path / "b", "train", workers=2)
    rows = [json.loads(line) for line in one.read_text().splitlines()]
    assert [r["id"] for r in rows] == [it.id for it in items]
    assert messages[-1].startswith("  train: 21/21 utterances")
    assert rows[-1]["translation"] == "I have three cats" and rows[-1]["language"] == "es"
    assert "translation" not in rows[0]
    for row in rows:
        data, rate = sf.read(one.parent / row["audio"])
        info = sf.info(one.parent / row["audio"])
        assert rate == 16000 and info.format == "FLAC" and info.subtype == "PCM_16"
        assert abs(len(data) / 16000 - row["duration"]) < 1e-3 and 0.4 < row["duration"] < 6
        other, _ = sf.read(two.parent / row["audio"])
        assert (data == other).all()
    assert one.read_text() == two.read_text()
    with pytest.raises(ValueError, match="not unique"):
        write_dataset(items + items[:1], tmp_path / "c", "dup")

"""speech/manifests.py on tiny LibriSpeech / FLEURS / CoVoST 2 / JSONL fixtures written here."""
import json

import pytest

from speech.manifests import DataError, DataWarning, Utterance, load_covost_tsv, load_fleurs_tsv, \
    load_jsonl_manifest, load_librispeech, load_manifest, write_jsonl_manifest


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"RIFF")  # loaders only check existence; decoding is the dataset's job
    return path


def _librispeech(root, lines_per_chapter):
    for (spk, chap), lines in lines_per_chapter.items():
        folder = root / spk / chap
        folder.mkdir(parents=True)
        (folder / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
        for line in lines:
            uid = line.split(" ")[0]
            if uid.count("-") == 2 and not uid.endswith("9999"):
                _touch(folder / f"{uid}.flac")


def test_librispeech_folder(tmp_path):
    root = tmp_path / "test-other"
    _librispeech(root, {("1688", "142285"): ["1688-142285-0000 THERE'S IRON THEY SAY IN ALL OUR BLOOD",
                                             "1688-142285-0001 AND A GRAIN OR TWO PERHAPS IS GOOD"],
                        ("2609", "156975"): ["2609-156975-0000 THEN MOSES WAS AFRAID",
                                             "2609-156975-9999 THIS ONE HAS NO AUDIO"]})
    with pytest.warns(DataWarning, match=r"2609-156975.trans.txt:2: skipped \(missing_audio\)"):
        utts, report = load_librispeech(root)
    assert [u.id for u in utts] == ["1688-142285-0000", "1688-142285-0001", "2609-156975-0000"]
    assert utts[0].text == "THERE'S IRON THEY SAY IN ALL OUR BLOOD" and utts[0].speaker == "1688"
    assert utts[0].audio.endswith("1688/142285/1688-142285-0000.flac") and utts[0].language == "en"
    assert utts[2].source.endswith("2609-156975.trans.txt:1")
    assert (report.total, report.kept, report.counts["missing_audio"]) == (4, 3, 1)
    assert load_manifest(root, check_audio=False)[1].kept == 4


def test_librispeech_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match="no such LibriSpeech folder"):
        load_librispeech(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no \*/\*/\*.trans.txt"):
        load_librispeech(tmp_path / "empty")
    _librispeech(tmp_path / "bad", {("1", "2"): ["1-2-0 OK", "x-2-1 BAD ID", "1-2-9999 NO AUDIO"]})
    with pytest.warns(DataWarning), pytest.raises(DataError, match=r"2 of 3 rows are bad.*missing_audio=1, bad_value=1"):
        load_librispeech(tmp_path / "bad")


def _fleurs_line(sid, name, raw, n=32000, gender="FEMALE"):
    return "\t".join([str(sid), name, raw, raw.lower(), "p h o n e s", str(n), gender])


def test_fleurs_with_translations_joined_on_sentence_id(tmp_path):
    es = tmp_path / "es_419"
    en = tmp_path / "en_us"
    es.mkdir(), en.mkdir()
    (es / "test.tsv").write_text("\n".join([
        _fleurs_line(1, "a.wav", "El gato duerme."), _fleurs_line(1, "b.wav", "El gato duerme."),
        _fleurs_line(2, "c.wav", "Hace frío."), _fleurs_line(3, "d.wav", "Sin traducción."),
        "4\tbroken row"]) + "\n")
    (en / "test.tsv").write_text("\n".join([_fleurs_line(1, "x.wav", "The cat sleeps."),
                                            _fleurs_line(2, "y.wav", "It is cold.")]) + "\n")
    for name in "abcd":
        _touch(es / "audio" / "test" / f"{name}.wav")
    with pytest.warns(DataWarning) as caught:
        utts, report = load_fleurs_tsv(es / "test.tsv", translations_tsv=en / "test.tsv")
    messages = [str(w.message) for w in caught]
    assert any("test.tsv:4: skipped (missing_translation): sentence id 3" in m for m in messages)
    assert any("test.tsv:5: skipped (malformed): 2 tab-separated columns, expected 7" in m for m in messages)
    assert [(u.id, u.text, u.translation) for u in utts] == [
        ("1/a", "El gato duerme.", "The cat sleeps."), ("1/b", "El gato duerme.", "The cat sleeps."),
        ("2/c", "Hace frío.", "It is cold.")]
    assert utts[0].language == "es" and utts[0].translation_language == "en" and utts[0].duration == 2.0
    assert (report.kept, report.total) == (3, 5)
    plain, _ = load_manifest(en / "test.tsv", check_audio=False)
    assert plain[0].language == "en" and plain[0].translation is None


def test_covost_tsv(tmp_path):
    tsv = tmp_path / "covost_v2.es_en.test.tsv"
    tsv.write_text("path\tsentence\ttranslation\tclient_id\n"
                   "common_voice_es_1.mp3\tHola, ¿qué tal?\tHello, how are you?\tabc\n"
                   'common_voice_es_2.mp3\tDijo "sí"\tHe said "yes"\tdef\n'
                   "common_voice_es_3.mp3\tFalta el audio\tThe audio is missing\tghi\n"
                   "common_voice_es_4.mp3\tSin traducción\t\tjkl\n")
    for i in (1, 2, 4):
        _touch(tmp_path / "clips" / f"common_voice_es_{i}.mp3")
    with pytest.warns(DataWarning) as caught:
        utts, report = load_covost_tsv(tsv)
    assert {str(w.message).split(": skipped")[0].rsplit(":", 1)[1] for w in caught} == {"4", "5"}
    assert [(u.id, u.text, u.translation, u.speaker) for u in utts] == [
        ("common_voice_es_1", "Hola, ¿qué tal?", "Hello, how are you?", "abc"),
        ("common_voice_es_2", 'Dijo "sí"', 'He said "yes"', "def")]
    assert utts[0].language == "es" and utts[0].translation_language == "en"
    with pytest.warns(DataWarning, match="test.tsv:5: skipped"):
        assert load_manifest(tsv, check_audio=False)[1].kept == 3


def test_covost_missing_columns_and_unknown_languages(tmp_path):
    raw = tmp_path / "covost_v2.es_en.tsv"
    raw.write_text("path\ttranslation\tsplit\nx.mp3\tHello\ttrain\n")
    with pytest.raises(DataError, match=r"covost_v2.es_en.tsv:1: missing column\(s\) sentence"):
        load_covost_tsv(raw)
    odd = tmp_path / "mine.tsv"
    odd.write_text("path\tsentence\ttranslation\nx.mp3\tHola\tHello\n")
    with pytest.raises(DataError, match="cannot tell the languages"):
        load_covost_tsv(odd)
    assert load_covost_tsv(odd, source_language="es", target_language="en", check_audio=False)[0][0].text == "Hola"


def test_jsonl_round_trip_and_bad_rows(tmp_path):
    audio = [_touch(tmp_path / "audio" / f"{i}.flac") for i in range(3)]
    utts = [Utterance(f"u{i}", str(p), f"text {i}", "en", speaker="en-us+f3", duration=1.5) for i, p in enumerate(audio)]
    utts[2].translation, utts[2].translation_language, utts[2].language = "text two", "en", "es"
    path = write_jsonl_manifest(utts, tmp_path / "sets" / "train.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0] == {"id": "u0", "audio": "../audio/0.flac", "text": "text 0", "language": "en",
                       "speaker": "en-us+f3", "duration": 1.5}
    back, report = load_jsonl_manifest(path)
    assert [(u.id, u.text, u.audio, u.translation) for u in back] == [(u.id, u.text, u.audio, u.translation) for u in utts]
    assert back[1].source == f"{path}:2"

    bad = tmp_path / "sets" / "bad.jsonl"
    bad.write_text("\n".join([json.dumps(rows[0]), "{not json", json.dumps({"audio": "../audio/1.flac"}),
                              json.dumps({**rows[1], "text": "  "}), json.dumps(rows[0]),
                              json.dumps({**rows[1], "duration": -1}), json.dumps({**rows[1], "audio": "gone.flac", "id": "z"}),
                              json.dumps(rows[2])]) + "\n")
    with pytest.warns(DataWarning) as caught:
        with pytest.raises(DataError, match=r"bad.jsonl: 6 of 8 rows are bad"):
            load_jsonl_manifest(bad)
    reasons = [str(w.message).split("(")[1].split(")")[0] for w in caught]
    assert reasons == ["malformed", "missing_field", "empty_text", "duplicate_id", "bad_value", "missing_audio"]
    assert [str(w.message).split(": skipped")[0][-1] for w in caught] == ["2", "3", "4", "5", "6", "7"]
    with pytest.warns(DataWarning):
        kept, report = load_jsonl_manifest(bad, max_bad_fraction=0.8)
    assert [u.id for u in kept] == ["u0", "u2"] and report.counts["malformed"] == 1


def test_missing_manifest_and_unknown_kind(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such manifest"):
        load_manifest(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown manifest kind"):
        load_manifest(tmp_path / "x.csv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="0 of 0 rows"):
        load_jsonl_manifest(tmp_path / "empty.jsonl")

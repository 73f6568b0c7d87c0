"""speech/speech_metrics.py: values checked by hand (alignments and n-gram counts written out below)."""
import io
import json
import math
import tarfile

import pytest

from speech.speech_metrics import MetricsWarning, asr_scores, bleu, cer, chrf, english_normalizer, evaluate_asr, \
    evaluate_ast, load_spelling_mapping, text_normalizer, wer, write_results

SPELLING = {"colour": "color", "grey": "gray", "organise": "organize"}


@pytest.fixture
def spelling_json(tmp_path):
    path = tmp_path / "english.json"
    path.write_text(json.dumps(SPELLING))
    return path


def test_word_error_rate_counts_by_hand():
    # the cat sat on the mat / the cat sit on mat: sat->sit (S), second "the" dropped (D) = 2 of 6
    # hello world / hello big world: "big" inserted (I) = 1 of 2; corpus 3 / 8
    summary = asr_scores(["the cat sat on the mat", "hello world"], ["the cat sit on mat", "hello big world"],
                         normalizer="basic")
    assert (summary["substitutions"], summary["deletions"], summary["insertions"], summary["ref_words"]) == (1, 1, 1, 8)
    assert summary["wer"] == pytest.approx(3 / 8)
    assert wer(["the cat sat on the mat"], ["the cat sit on mat"], normalizer="none") == pytest.approx(2 / 6)


def test_character_error_rate_by_hand():
    assert cer(["abc"], ["abd"], normalizer="none") == pytest.approx(1 / 3)
    assert cer(["the cat"], ["the bat"], normalizer="none") == pytest.approx(1 / 7)  # 7 characters incl. space


def test_whisper_english_normaliser_with_spelling_map(spelling_json, tmp_path):
    ref, hyp = "Mr. Smith's colour is grey!", "mister smith is color is gray"
    assert english_normalizer(spelling_json)(ref) == "mister smith is color is gray"
    assert asr_scores([ref], [hyp], spelling=spelling_json)["wer"] == 0.0
    with pytest.warns(MetricsWarning, match="without its British->American spelling map"):
        bare = english_normalizer(search_dirs=[tmp_path / "empty"])
    assert bare(ref) == "mister smith is colour is grey"  # colour, grey: 2 substitutions of 5 words
    summary = asr_scores([ref], [hyp], spelling=tmp_path / "english.json")
    assert "spelling map: 3 entries" in summary["normalizer"]
    # numbers are written as digits on both sides
    assert asr_scores(["Twenty-five dollars."], ["$25"], spelling=spelling_json)["wer"] == 0.0


def test_spelling_map_from_the_openai_whisper_archive(tmp_path):
    archive = tmp_path / "openai_whisper-20250625.tar.gz"
    data = json.dumps(SPELLING).encode()
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("openai_whisper-20250625/whisper/normalizers/english.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert load_spelling_mapping(archive) == SPELLING
    assert english_normalizer(search_dirs=[tmp_path])("We organise it") == "we organize it"
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json: a spelling map must be a JSON object"):
        load_spelling_mapping(tmp_path / "bad.json")


def test_digit_strings_whisper_joins_them_basic_keeps_words(spelling_json):
    ref, hyp = "four seven one two", "four seven one three"
    assert asr_scores([ref], [hyp], spelling=spelling_json)["wer"] == 1.0  # "4712" vs "4713": 1 of 1
    assert asr_scores([ref], [hyp], normalizer="basic")["wer"] == pytest.approx(1 / 4)


def test_non_english_uses_the_basic_normaliser():
    # punctuation and case go, accents stay: dónde/donde, está/esta, estación/estacion = 3 of 4
    summary = asr_scores(["¿Dónde está la estación?"], ["donde esta la estacion"], language="es")
    assert summary["normalizer"] == "whisper-basic" and summary["wer"] == pytest.approx(3 / 4)
    assert text_normalizer("es")("¡Hola, qué tal!").split() == ["hola", "qué", "tal"]
    with pytest.raises(ValueError, match="normalizer must be one of"):
        text_normalizer("en", "fancy")


def test_empty_references_count_insertions(spelling_json):
    rows, summary = evaluate_asr(["a", "b", "c"], ["[noise]", "", "one small step"], ["uh", "hello", "one step"],
                                 spelling=spelling_json)
    assert [r["reference_norm"] for r in rows] == ["", "", "one small step"]
    assert rows[0]["wer"] == 0.0 and rows[1]["wer"] is None and rows[2]["wer"] == pytest.approx(1 / 3)
    assert (summary["insertions"], summary["deletions"], summary["ref_words"]) == (1, 1, 3)
    assert summary["wer"] == pytest.approx(2 / 3)


def test_bleu_and_chrf_by_hand():
    # 6 words, last one wrong: n-gram precisions 5/6, 4/5, 3/4, 2/3, brevity penalty 1
    expected = 100 * (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25
    assert bleu(["the quick brown fox jumps over"], ["the quick brown fox jumps high"]) == pytest.approx(expected)
    assert bleu(["a b c d"], ["a b c d"]) == pytest.approx(100.0)
    # chrF "abc" vs "abd": 1-grams P=R=2/3, 2-grams 1/2, 3-grams 0; orders 4-6 have none: F = mean = 7/18
    assert chrf(["abc"], ["abd"]) == pytest.approx(100 * 7 / 18)
    rows, summary = evaluate_ast(["u1", "u2"], ["I have three cats", "it is cold today"],
                                 ["I have three cats", "it is cold"])
    assert rows[0]["bleu"] == pytest.approx(100.0) and 0 < rows[1]["bleu"] < 100
    assert summary["task"] == "ast" and summary["n"] == 2 and 0 < summary["bleu"] < 100
    assert "tok:13a" in summary["bleu_signature"]


def test_results_files(tmp_path, spelling_json):
    rows, summary = evaluate_asr(["x", "y"], ["turn on the light", "two"], ["turn on the lights", "two"],
                                 spelling=spelling_json)
    hyp_path, summary_path = write_results(tmp_path / "eval", rows, summary, name="asterisk_en")
    assert hyp_path.name == "asterisk_en_hypotheses.jsonl" and summary_path.name == "asterisk_en_summary.json"
    back = [json.loads(line) for line in hyp_path.read_text().splitlines()]
    assert [r["id"] for r in back] == ["x", "y"] and back[0]["errors"] == 1 and back[1]["wer"] == 0.0
    saved = json.loads(summary_path.read_text())
    assert saved["wer"] == pytest.approx(1 / 5) and saved["n"] == 2 and math.isfinite(saved["cer"])
    with pytest.raises(ValueError, match="same length"):
        evaluate_asr(["x"], ["a", "b"], ["a", "b"])

"""VQA metrics: VQAv2 / TextVQA accuracy, ANLS (DocVQA), relaxed accuracy (ChartQA), exact match.

    vqa_accuracy("Two", ["2"] * 10)                      # 1.0
    anls("hello wrld", ["hello world"])                  # 1 - 1/11
    relaxed_accuracy("10.4", ["10"])                     # 1.0 (within 5 %)
    score_predictions(preds, records, metric="vqa")     # mean over questions, in [0, 1]

VQAv2 follows the official evaluation script (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/
vqaEval.py) step by step, including its quirks:
- the prediction: newlines/tabs -> spaces, strip, `process_punctuation`, then `process_digit_article`
  (lower case; number words zero..ten and "none" -> digits; articles a/an/the dropped; apostrophe-less
  contractions such as "dont" -> "don't");
- the human answers: only `process_punctuation`, and only when they are not all identical;
- accuracy = mean over the 10 leave-one-out subsets (each human answer removed once, by position) of
  min(#matches among the other 9 / 3, 1). With fewer or more than 10 answers the same leave-one-out mean
  runs over the answers given.
TextVQA uses the same accuracy. ANLS follows Biten et al. 2019 (DocVQA): per question the best over the
answers of 1 - NL, where NL = Levenshtein distance / longer length after lower-casing and collapsing
whitespace, and 0 when NL >= 0.5. Relaxed accuracy follows ChartQA / pix2struct: a number within 5 %
relative of a numeric answer (a trailing "%" divides by 100), otherwise case-insensitive string equality.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

from rapidfuzz.distance import Levenshtein

# Official answer-normalisation tables (the same data as vqaEval.py; `key>value`, space separated).
_CONTRACTION_TABLE = (
    "aint>ain't arent>aren't cant>can't couldve>could've couldnt>couldn't couldn'tve>couldn't've "
    "couldnt've>couldn't've didnt>didn't doesnt>doesn't dont>don't hadnt>hadn't hadnt've>hadn't've "
    "hadn'tve>hadn't've hasnt>hasn't havent>haven't hed>he'd hed've>he'd've he'dve>he'd've hes>he's "
    "howd>how'd howll>how'll hows>how's Id've>I'd've I'dve>I'd've Im>I'm Ive>I've isnt>isn't itd>it'd "
    "itd've>it'd've it'dve>it'd've itll>it'll let's>let's maam>ma'am mightnt>mightn't mightnt've>mightn't've "
    "mightn'tve>mightn't've mightve>might've mustnt>mustn't mustve>must've neednt>needn't notve>not've "
    "oclock>o'clock oughtnt>oughtn't ow's'at>'ow's'at 'ows'at>'ow's'at 'ow'sat>'ow's'at shant>shan't "
    "shed've>she'd've she'dve>she'd've she's>she's shouldve>should've shouldnt>shouldn't "
    "shouldnt've>shouldn't've shouldn'tve>shouldn't've somebody'd>somebodyd somebodyd've>somebody'd've "
    "somebody'dve>somebody'd've somebodyll>somebody'll somebodys>somebody's someoned>someone'd "
    "someoned've>someone'd've someone'dve>someone'd've someonell>someone'll someones>someone's "
    "somethingd>something'd somethingd've>something'd've something'dve>something'd've "
    "somethingll>something'll thats>that's thered>there'd thered've>there'd've there'dve>there'd've "
    "therere>there're theres>there's theyd>they'd theyd've>they'd've they'dve>they'd've theyll>they'll "
    "theyre>they're theyve>they've twas>'twas wasnt>wasn't wed've>we'd've we'dve>we'd've weve>we've "
    "werent>weren't whatll>what'll whatre>what're whats>what's whatve>what've whens>when's whered>where'd "
    "wheres>where's whereve>where've whod>who'd whod've>who'd've who'dve>who'd've wholl>who'll whos>who's "
    "whove>who've whyll>why'll whyre>why're whys>why's wont>won't wouldve>would've wouldnt>wouldn't "
    "wouldnt've>wouldn't've wouldn'tve>wouldn't've yall>y'all yall'll>y'all'll y'allll>y'all'll "
    "yall'd've>y'all'd've y'alld've>y'all'd've y'all'dve>y'all'd've youd>you'd youd've>you'd've "
    "you'dve>you'd've youll>you'll youre>you're youve>you've"
)
CONTRACTIONS = dict(item.split(">") for item in _CONTRACTION_TABLE.split())
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: effectively "a period not followed by a digit"
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """The official `processPunctuation`: a mark next to a space (or any text with a digit,digit) is
    deleted, otherwise replaced by a space; then periods not followed by a digit go (at most 32 of them,
    as the script passes re.UNICODE where `count` belongs)."""
    out = text
    delete_all = _COMMA_STRIP.search(text) is not None
    for mark in PUNCTUATION:
        if delete_all or (mark + " " in text or " " + mark in text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)


def process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lower case, number words -> digits, no articles, contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """The full normalisation the official script applies to a prediction."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction against the human answers (normally 10), in [0, 1]."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    gts = [process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    total = 0.0
    for left_out in range(len(gts)):
        matches = sum(1 for j, gt in enumerate(gts) if j != left_out and gt == pred)
        total += min(1.0, matches / 3.0)
    return total / len(gts)


def _anls_text(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one prediction (best over the answers), in [0, 1]."""
    if not answers:
        raise ValueError("anls needs at least one reference answer")
    pred = _anls_text(prediction)
    best = 0.0
    for answer in answers:
        gt = _anls_text(answer)
        longest = max(len(gt), len(pred))
        nl = Levenshtein.distance(gt, pred) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def _to_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_match(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA relaxed correctness for one target (a target of 0 is compared as a string, as upstream)."""
    prediction, target = prediction.strip(), target.strip()
    pred_value, target_value = _to_float(prediction), _to_float(target)
    if pred_value is not None and target_value:
        return abs(pred_value - target_value) / abs(target_value) <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, answers: Sequence[str], max_relative_change: float = 0.05) -> float:
    """1.0 if the prediction relaxed-matches any answer, else 0.0."""
    if not answers:
        raise ValueError("relaxed_accuracy needs at least one reference answer")
    return float(any(relaxed_match(prediction, a, max_relative_change) for a in answers))


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the prediction equals an answer after stripping, lower-casing and collapsing whitespace."""
    if not answers:
        raise ValueError("exact_match needs at least one reference answer")
    pred = _anls_text(prediction)
    return float(any(pred == _anls_text(a) for a in answers))


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "vqa": vqa_accuracy, "anls": anls, "relaxed": relaxed_accuracy, "exact": exact_match,
}


def score_predictions(predictions: Mapping[str, str], answers: Mapping[str, Sequence[str]],
                      metric: str = "vqa") -> dict:
    """Mean `metric` over the questions of `answers` (question id -> reference answers).

    A question with no prediction scores 0 and is counted in `missing`. Returns
    {"score": mean in [0, 1], "n": questions, "missing": count, "per_question": {id: score}}."""
    if metric not in METRICS:
        raise ValueError(f"unknown VQA metric {metric!r}; known: {', '.join(METRICS)}")
    score_fn = METRICS[metric]
    per_question, missing = {}, 0
    for qid, refs in answers.items():
        if qid not in predictions:
            missing += 1
            per_question[qid] = 0.0
        else:
            per_question[qid] = score_fn(predictions[qid], refs)
    n = len(per_question)
    return {"score": sum(per_question.values()) / n if n else 0.0, "n": n, "missing": missing,
            "per_question": per_question}

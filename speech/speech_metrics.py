"""Speech metrics: WER / CER (jiwer) after the Whisper text normaliser, BLEU / chrF (sacrebleu), result files.

    summary = asr_scores(refs, hyps, language="en")             # {"wer", "cer", "substitutions", ...}
    rows, summary = evaluate_asr(ids, refs, hyps, language="en")
    rows, summary = evaluate_ast(ids, refs, hyps)                 # {"bleu", "chrf", ...}
    write_results("runs/x/eval", rows, summary)                   # hypotheses.jsonl + summary.json

Normalisation (the paper's WER uses Whisper's): English text goes through transformers'
`EnglishTextNormalizer` (lower case, punctuation and fillers dropped, contractions expanded, spelled
numbers -> digits, "mr" -> "mister", British -> American spelling); other languages through
`BasicTextNormalizer` (lower case, punctuation dropped). The British -> American map (1,739 entries) is
not in transformers: it ships as `whisper/normalizers/english.json` in the openai-whisper source
archive (`pip download --no-deps --no-binary :all: openai-whisper==20250625 -d data/downloads`) or as
`normalizer.json` beside a Whisper tokenizer; `english_normalizer` reads either, searching
`data/downloads` by default, and otherwise runs without it (warning once). Note that the English
normaliser joins spelled digit sequences into one number ("four seven one two" -> "4712"), so WER on
digit strings is a whole-string error rate; `normalizer="basic"` keeps the words.

WER = (substitutions + deletions + insertions) / reference words over the whole set; an utterance whose
normalised reference is empty counts its hypothesis words as insertions. BLEU is sacrebleu's corpus BLEU
(13a tokenisation, case-sensitive, as in the paper's Table 32); chrF is sacrebleu's chrF (n=6, beta=2).
"""
from __future__ import annotations

import glob
import json
import tarfile
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import jiwer
import sacrebleu

SPELLING_SEARCH_DIRS = ("data/downloads",)
_WHISPER_ARCHIVE = "openai_whisper-*.tar.gz"
_MEMBER_SUFFIX = "whisper/normalizers/english.json"
NORMALIZERS = ("whisper", "basic", "none")


class MetricsWarning(UserWarning):
    """A metric computed with a caveat (e.g. no British->American spelling map)."""


def load_spelling_mapping(source) -> dict[str, str]:
    """The British->American map from a JSON file or an openai-whisper source archive (.tar.gz)."""
    path = Path(source)
    try:
        if path.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(path) as tar:
                member = next((m for m in tar.getmembers() if m.name.endswith(_MEMBER_SUFFIX)), None)
                if member is None:
                    raise ValueError(f"{path}: no {_MEMBER_SUFFIX} inside")
                mapping = json.load(tar.extractfile(member))
        else:
            mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, tarfile.TarError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a spelling map ({e})") from e
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise ValueError(f"{path}: a spelling map must be a JSON object of strings")
    return mapping


def find_spelling_mapping(search_dirs: Sequence = SPELLING_SEARCH_DIRS) -> Path | None:
    """The newest openai-whisper archive or english.json / normalizer.json in the search folders."""
    for d in search_dirs:
        for pattern in (_WHISPER_ARCHIVE, "english.json", "normalizer.json"):
            hits = sorted(glob.glob(str(Path(d) / pattern)))
            if hits:
                return Path(hits[-1])
    return None


@lru_cache(maxsize=8)
def _english(source: str | None):
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer
    if source is None:
        return EnglishTextNormalizer({}), "whisper-english (no spelling map)"
    mapping = load_spelling_mapping(source)
    return EnglishTextNormalizer(mapping), f"whisper-english (spelling map: {len(mapping)} entries from {source})"


def english_normalizer(spelling=None, search_dirs: Sequence = SPELLING_SEARCH_DIRS) -> Callable[[str], str]:
    """transformers' Whisper EnglishTextNormalizer with the spelling map from `spelling` (a file path)
    or the first one found in search_dirs. The returned callable has a `.description`."""
    source = str(spelling) if spelling is not None else find_spelling_mapping(search_dirs)
    if source is None:
        warnings.warn("Whisper English normaliser without its British->American spelling map (none found in "
                      f"{', '.join(str(d) for d in search_dirs)}); get it with `pip download --no-deps --no-binary "
                      ":all: openai-whisper==20250625 -d data/downloads`", MetricsWarning, stacklevel=2)
    normalizer, description = _english(None if source is None else str(source))
    return _Described(normalizer, description)


class _Described:
    def __init__(self, fn, description: str):
        self.fn, self.description = fn, description

    def __call__(self, text: str) -> str:
        return self.fn(text)


def text_normalizer(language: str = "en", kind: str = "whisper", spelling=None) -> Callable[[str], str]:
    """kind "whisper": English -> EnglishTextNormalizer, other languages -> BasicTextNormalizer;
    "basic": BasicTextNormalizer for every language; "none": whitespace only."""
    if kind not in NORMALIZERS:
        raise ValueError(f"normalizer must be one of {NORMALIZERS}, not {kind!r}")
    if kind == "none":
        return _Described(lambda s: " ".join(s.split()), "none (whitespace)")
    if kind == "whisper" and language.split("-")[0].split("_")[0].lower() == "en":
        return english_normalizer(spelling)
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer
    return _Described(BasicTextNormalizer(), "whisper-basic")


# ----------------------------------------------------------------------------------------------------
# Error counts


def edit_counts(reference: str, hypothesis: str, unit: str = "word") -> dict[str, int]:
    """Levenshtein alignment counts of already-normalised strings (unit "word" or "char")."""
    ref_units = reference.split() if unit == "word" else list(" ".join(reference.split()))
    hyp_units = hypothesis.split() if unit == "word" else list(" ".join(hypothesis.split()))
    if not ref_units or not hyp_units:
        return {"substitutions": 0, "deletions": len(ref_units), "insertions": len(hyp_units), "hits": 0,
                "ref_len": len(ref_units)}
    process = jiwer.process_words if unit == "word" else jiwer.process_characters
    out = process(" ".join(reference.split()), " ".join(hypothesis.split()))
    return {"substitutions": out.substitutions, "deletions": out.deletions, "insertions": out.insertions,
            "hits": out.hits, "ref_len": len(ref_units)}


_COUNTS = ("substitutions", "deletions", "insertions", "hits", "ref_len")


def _rate(counts: dict) -> float | None:
    """errors / reference length; 0.0 for empty vs empty, None (undefined) for insertions into nothing."""
    errors = counts["substitutions"] + counts["deletions"] + counts["insertions"]
    return errors / counts["ref_len"] if counts["ref_len"] else (0.0 if not errors else None)


def evaluate_asr(ids: Sequence[str], references: Sequence[str], hypotheses: Sequence[str], language: str = "en",
                 normalizer: str = "whisper", spelling=None) -> tuple[list[dict], dict]:
    """Per-utterance rows {"id", "reference", "hypothesis", "reference_norm", "hypothesis_norm", "errors",
    "ref_words", "wer", "cer"} and the summary {"task": "asr", "n", "wer", "cer", counts, "normalizer"}.
    A rate is None where it is undefined (hypothesis words against an empty reference)."""
    if not len(ids) == len(references) == len(hypotheses):
        raise ValueError(f"ids ({len(ids)}), references ({len(references)}) and hypotheses ({len(hypotheses)}) "
                         "must have the same length")
    norm = text_normalizer(language, normalizer, spelling)
    rows, word_total, char_total = [], dict.fromkeys(_COUNTS, 0), dict.fromkeys(_COUNTS, 0)
    for uid, ref, hyp in zip(ids, references, hypotheses):
        ref_n, hyp_n = norm(ref).strip(), norm(hyp).strip()
        words, chars = edit_counts(ref_n, hyp_n, "word"), edit_counts(ref_n, hyp_n, "char")
        for total, counts in ((word_total, words), (char_total, chars)):
            for k in total:
                total[k] += counts[k]
        rows.append({"id": uid, "reference": ref, "hypothesis": hyp, "reference_norm": ref_n, "hypothesis_norm": hyp_n,
                     "errors": words["substitutions"] + words["deletions"] + words["insertions"],
                     "ref_words": words["ref_len"], "wer": _rate(words), "cer": _rate(chars)})
    summary = {"task": "asr", "language": language, "n": len(rows), "wer": _rate(word_total), "cer": _rate(char_total),
               "substitutions": word_total["substitutions"], "deletions": word_total["deletions"],
               "insertions": word_total["insertions"], "ref_words": word_total["ref_len"],
               "ref_chars": char_total["ref_len"], "normalizer": norm.description}
    return rows, summary


def asr_scores(references: Sequence[str], hypotheses: Sequence[str], language: str = "en",
               normalizer: str = "whisper", spelling=None) -> dict:
    """The summary of `evaluate_asr` only."""
    return evaluate_asr([str(i) for i in range(len(references))], references, hypotheses, language, normalizer,
                        spelling)[1]


def wer(references: Sequence[str], hypotheses: Sequence[str], language: str = "en", normalizer: str = "whisper") -> float:
    return asr_scores(references, hypotheses, language, normalizer)["wer"]


def cer(references: Sequence[str], hypotheses: Sequence[str], language: str = "en", normalizer: str = "whisper") -> float:
    return asr_scores(references, hypotheses, language, normalizer)["cer"]


def bleu(references: Sequence[str], hypotheses: Sequence[str], tokenize: str = "13a") -> float:
    """sacrebleu corpus BLEU (0-100) of hypotheses against one reference each."""
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize=tokenize).score


def chrf(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """sacrebleu corpus chrF (0-100; character 6-grams, beta 2)."""
    return sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score


def evaluate_ast(ids: Sequence[str], references: Sequence[str], hypotheses: Sequence[str],
                 target_language: str = "en", tokenize: str = "13a") -> tuple[list[dict], dict]:
    """Per-utterance rows {"id", "reference", "hypothesis", "bleu" (sentence BLEU), "chrf"} and the summary
    {"task": "ast", "n", "bleu", "chrf", "bleu_signature"} (corpus scores, not means of sentence scores)."""
    if not len(ids) == len(references) == len(hypotheses):
        raise ValueError(f"ids ({len(ids)}), references ({len(references)}) and hypotheses ({len(hypotheses)}) "
                         "must have the same length")
    rows = [{"id": i, "reference": r, "hypothesis": h,
             "bleu": sacrebleu.sentence_bleu(h, [r], tokenize=tokenize).score,
             "chrf": sacrebleu.sentence_chrf(h, [r]).score} for i, r, h in zip(ids, references, hypotheses)]
    metric = sacrebleu.metrics.BLEU(tokenize=tokenize)
    corpus = metric.corpus_score(list(hypotheses), [list(references)])
    return rows, {"task": "ast", "target_language": target_language, "n": len(rows), "bleu": corpus.score,
                  "chrf": chrf(references, hypotheses), "bleu_signature": str(metric.get_signature())}


def write_results(out_dir, rows: Sequence[dict], summary: dict, name: str = "") -> tuple[Path, Path]:
    """out_dir/{name_}hypotheses.jsonl (one row per utterance) and out_dir/{name_}summary.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"{name}_" if name else ""
    hyp_path, summary_path = out_dir / f"{prefix}hypotheses.jsonl", out_dir / f"{prefix}summary.json"
    hyp_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    summary_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return hyp_path, summary_path

"""Needle in a haystack (NIAH) for tiny models: held-out evaluation and synthetic training documents.

An example is one token sequence of exactly `length` tokens:

    bos, haystack[:p], NEEDLE, haystack[p:], QUESTION, ANSWER
    NEEDLE   = "\\nThe magic number of <name> is" + NUMBER + ".\\n"
    QUESTION = "\\nWhat is the magic number of <name>? The magic number of <name> is"
    ANSWER   = NUMBER = the tokens of " <4-digit number>", the very tokens used in the needle

Each piece is encoded on its own and the pieces are concatenated, so lengths and depths are exact in
tokens and the answer tokens are literally a copy of the needle's. The haystack is a continuous window
of the (val) corpus token stream; depth d puts the needle after p = round(d * haystack_len) haystack
tokens (0 = right after bos, 1 = right before the question).

Names are invented, three open syllables closed by k/x/z (`Bakotiz`, `Vuzagox`), and split into two
disjoint pools by a hash: evaluation uses the "eval" pool, `make_niah_training_docs` the "train" pool,
so evaluation retrieval is held out. Haystack paragraphs holding any word of that shape (none in the
bundled corpus) are dropped, so a training doc never contains an eval name and a needle's name occurs
only in its needle and question.

`evaluate_niah` scores by exact retrieval under teacher forcing: the example is fed whole and is
correct when the greedy argmax at every answer position equals the answer token.
"""
from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .text_metrics import logits_of, model_device

_ONSETS = "BDGKPTVZ"
_VOWELS = "aiou"
_CODAS = "kxz"
_NAME_SHAPE = re.compile(r"[bdgkptvz][aiou][bdgkptvz][aiou][bdgkptvz][aiou][kxz]", re.I)


def is_name_shaped(word: str) -> bool:
    """Three open syllables closed by k, x or z (`Bakotiz`, `Vuzagox`): the shape of every needle name,
    chosen to be (almost) never an English word."""
    return _NAME_SHAPE.fullmatch(word) is not None


def is_eval_name(name: str) -> bool:
    """True for the ~20% of names reserved for evaluation (a hash of the capitalised name)."""
    return hashlib.sha256(name.capitalize().encode()).digest()[0] % 5 == 0


def sample_names(rng: random.Random, split: str, n: int, *, distinct: bool = True) -> list[str]:
    """n invented names of the 'eval' or 'train' pool (disjoint pools of ~20k / ~78k names)."""
    if split not in ("eval", "train"):
        raise ValueError(f"niah.sample_names: split must be 'eval' or 'train', got {split!r}")
    if distinct and n > 15_000:
        raise ValueError(f"niah.sample_names: {n} distinct names asked; the pools are not that big")
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        name = (rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_ONSETS).lower() + rng.choice(_VOWELS)
                + rng.choice(_ONSETS).lower() + rng.choice(_VOWELS) + rng.choice(_CODAS))
        if is_eval_name(name) == (split == "eval") and not (distinct and name in seen):
            out.append(name)
            seen.add(name)
    return out


def needle_text(name: str) -> tuple[str, str]:
    """(text before the number, text after it) of the needle sentence."""
    return f"\nThe magic number of {name} is", ".\n"


def question_text(name: str) -> str:
    return f"\nWhat is the magic number of {name}? The magic number of {name} is"


@dataclass
class NiahExample:
    """tokens: exactly `length` ids = bos, haystack part 1, needle [needle_start, needle_end), haystack
    part 2, question [question_start, answer_start), answer [answer_start, length)."""
    tokens: list
    length: int
    depth: float  # requested relative depth in [0, 1]
    name: str
    number: int
    needle_start: int
    needle_end: int
    question_start: int
    answer_start: int
    haystack_len: int

    @property
    def actual_depth(self) -> float:
        """Haystack tokens before the needle / all haystack tokens."""
        return (self.needle_start - 1) / self.haystack_len


# ----------------------------------------------------------------------------------------------
# building examples

class _Builder:
    """Shared by eval examples and training docs: encodes the haystack once, then assembles examples."""

    def __init__(self, tokenizer, haystack_docs: Sequence):
        self.tok = tokenizer
        texts = [getattr(d, "text", d) for d in haystack_docs]
        stream: list[int] = []
        sep = tokenizer.encode("\n\n")
        for text in texts:
            paras = [p for p in text.split("\n\n")
                     if p.strip() and not any(is_name_shaped(w) for w in re.findall(r"[A-Za-z]+", p))]
            if paras:
                stream += tokenizer.encode("\n\n".join(paras)) + sep
        if not stream:
            raise ValueError("niah: the haystack documents are empty "
                             "(after dropping paragraphs with a name-shaped word)")
        self.stream = np.asarray(stream, dtype=np.int64)

    def haystack(self, rng: random.Random, n: int) -> list[int]:
        s = self.stream
        if n > len(s):
            s = np.tile(s, -(-n // len(s)) + 1)
        start = rng.randrange(0, len(s) - n + 1)
        return s[start:start + n].tolist()

    def parts(self, rng: random.Random, name: str) -> tuple[int, list, list, list]:
        """(number, needle tokens, question tokens, answer tokens) for one name and a random number."""
        number = rng.randrange(1000, 10000)
        enc = self.tok.encode
        before, after = needle_text(name)
        num = enc(f" {number}")
        return number, enc(before) + num + enc(after), enc(question_text(name)), num

    def example(self, rng: random.Random, name: str, length: int, depth: float, parts=None) -> NiahExample:
        number, needle, question, num = parts or self.parts(rng, name)
        budget = length - 1 - len(needle) - len(question) - len(num)
        if budget < 1:
            raise ValueError(f"niah: length {length} is too short; needle + question + answer need "
                             f"{length - budget} tokens")
        hay = self.haystack(rng, budget)
        p = round(depth * budget)
        tokens = [self.tok.bos_id] + hay[:p] + needle + hay[p:] + question + num
        assert len(tokens) == length
        return NiahExample(tokens=tokens, length=length, depth=depth, name=name, number=number,
                           needle_start=1 + p, needle_end=1 + p + len(needle),
                           question_start=length - len(num) - len(question), answer_start=length - len(num),
                           haystack_len=budget)


def _check_grid(lengths: Sequence[int], depths: Sequence[float], n: int) -> None:
    if not lengths or not depths or n < 1:
        raise ValueError(f"niah: need lengths, depths and n_per_cell >= 1 (got {lengths}, {depths}, {n})")
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ValueError(f"niah: depths must be in [0, 1], got {bad}")


def make_niah_examples(tokenizer, haystack_docs: Sequence, lengths: Sequence[int], depths: Sequence[float],
                       n_per_cell: int, seed: int = 0) -> list[NiahExample]:
    """n_per_cell examples for every (length, depth); names from the eval pool, distinct within the set.

    haystack_docs: texts or objects with `.text` (the val corpus). Deterministic for (inputs, seed).
    """
    _check_grid(lengths, depths, n_per_cell)
    builder = _Builder(tokenizer, haystack_docs)
    rng = random.Random(seed)
    cells = [(L, d) for L in lengths for d in depths for _ in range(n_per_cell)]
    names = sample_names(rng, "eval", len(cells))
    return [builder.example(rng, name, L, d) for name, (L, d) in zip(names, cells)]


def make_niah_training_docs(tokenizer, haystack_docs: Sequence, n_docs: int, *, max_tokens: int,
                            min_tokens: Optional[int] = None, seed: int = 0) -> list[list[int]]:
    """Synthetic pre-training token documents in the eval pattern (names from the train pool), each
    `bos ... answer eos`, ready to mix with `encode_documents` output (they are token ids already).

    Lengths (bos and eos included) are log-uniform in [min_tokens, max_tokens] (default min_tokens:
    max_tokens // 8, raised to what needle + question + answer need plus 16 haystack tokens): every
    doubling of length is equally common. With max_tokens <= seq_len, packing never cuts a document.
    Depths are uniform in [0, 1]. haystack_docs: texts (or `.text` objects) from the *train* corpus.
    """
    min_tokens = max_tokens // 8 if min_tokens is None else min_tokens
    if n_docs < 0 or not 0 < min_tokens <= max_tokens:
        raise ValueError(f"niah: need n_docs >= 0 and 0 < min_tokens <= max_tokens, "
                         f"got {n_docs}, {min_tokens}, {max_tokens}")
    builder = _Builder(tokenizer, haystack_docs)
    rng = random.Random(seed)
    docs = []
    for name in sample_names(rng, "train", n_docs, distinct=False):
        parts = builder.parts(rng, name)
        needed = 2 + sum(len(x) for x in parts[1:]) + 16  # bos, eos, 16 haystack tokens
        if needed > max_tokens:
            raise ValueError(f"niah: max_tokens {max_tokens} is too short for a training document "
                             f"(needle + question + answer need about {needed})")
        lo = max(min_tokens, needed)
        total = min(max_tokens, int(round(math.exp(rng.uniform(math.log(lo), math.log(max_tokens))))))
        docs.append(builder.example(rng, name, total - 1, rng.random(), parts).tokens + [tokenizer.eos_id])
    return docs


# ----------------------------------------------------------------------------------------------
# evaluation

@dataclass
class NiahResult:
    """accuracy[i][j]: fraction of examples at depths[i], lengths[j] retrieved exactly; mean_accuracy:
    the mean over cells."""
    lengths: list
    depths: list
    accuracy: list
    counts: list
    mean_accuracy: float
    samples: list = field(default_factory=list)  # a few {"length", "depth", "expected", "predicted"}

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate_niah(model_or_logits_fn, examples: Sequence[NiahExample], tokenizer=None, *,
                  batch_size: int = 4, device=None, n_samples: int = 4) -> NiahResult:
    """Exact retrieval under teacher forcing: an example is fed whole (bos .. answer) and counts as
    correct iff argmax(logits[t]) == tokens[t + 1] for every answer token tokens[t + 1]. Cells are
    (length, depth); `mean_accuracy` is the mean of the cell accuracies. `tokenizer` (optional)
    decodes a few predictions into `samples`. Examples of one length are batched (batch_size rows)."""
    if not examples:
        raise ValueError("evaluate_niah: no examples")
    device = device if device is not None else model_device(model_or_logits_fn)
    was_training = getattr(model_or_logits_fn, "training", None)
    if was_training:
        model_or_logits_fn.eval()
    correct: dict[tuple, list] = {}
    samples = []
    try:
        by_len: dict[int, list[NiahExample]] = {}
        for ex in examples:
            by_len.setdefault(ex.length, []).append(ex)
        for length, group in sorted(by_len.items()):
            for i in range(0, len(group), batch_size):
                chunk = group[i:i + batch_size]
                tokens = torch.tensor([ex.tokens for ex in chunk], dtype=torch.long, device=device)
                b, t = tokens.shape
                positions = torch.arange(t, device=device).expand(b, t)
                doc_ids = torch.zeros(b, t, dtype=torch.long, device=device)
                preds = logits_of(model_or_logits_fn, tokens, positions, doc_ids).argmax(-1).cpu()
                for row, ex in enumerate(chunk):
                    got = preds[row, ex.answer_start - 1:length - 1].tolist()
                    want = ex.tokens[ex.answer_start:]
                    correct.setdefault((ex.length, ex.depth), []).append(got == want)
                    if tokenizer is not None and len(samples) < n_samples:
                        samples.append({"length": ex.length, "depth": ex.depth,
                                        "expected": tokenizer.decode(want), "predicted": tokenizer.decode(got)})
    finally:
        if was_training:
            model_or_logits_fn.train()
    lengths = sorted({k[0] for k in correct})
    depths = sorted({k[1] for k in correct})
    acc = [[float(np.mean(correct[(L, d)])) if (L, d) in correct else float("nan") for L in lengths] for d in depths]
    counts = [[len(correct.get((L, d), [])) for L in lengths] for d in depths]
    mean = float(np.nanmean(np.asarray(acc, dtype=float)))
    return NiahResult(lengths, depths, acc, counts, mean, samples)


def plot_niah_heatmap(result: NiahResult, out_png: Path, title: Optional[str] = None) -> Path:
    """Accuracy heatmap (depth down, context length across) written to out_png with the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    acc = np.asarray(result.accuracy, dtype=float)
    fig = Figure(figsize=(max(4.5, 1.2 + 0.9 * len(result.lengths)), 1.0 + 0.5 * len(result.depths)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(result.lengths)), [str(L) for L in result.lengths])
    ax.set_yticks(range(len(result.depths)), [f"{d:.0%}" for d in result.depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title or f"needle in a haystack: mean accuracy {result.mean_accuracy:.2f}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return out_png

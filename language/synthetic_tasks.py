"""Generated post-training tasks with exact answers: arithmetic, string reversal, formatting instructions.

    problems = make_problems(TaskConfig(seed=0), "train", 1000)    # deterministic from the seed
    problems[0].prompt, problems[0].answer                         # "What is 23 + 58?", "81"
    is_correct(problems[0].answer, " 81 ")                         # True (surrounding whitespace ignored)
    paths = write_task_files(TaskConfig(seed=0), "out/")           # chat / ranked / preference / prompts JSONL

Every problem has one right answer, so accuracy is exact. Problems are split into train and held-out by a
hash of their identity (`Problem.key`: the kind and its arguments), never by position, so no held-out
problem appears in any training file (SFT, reward-model, preference, or the plain-text pre-training docs).

Wrong answers for the reward model and DPO mimic the mistakes a small model makes: a `near` miss has one
small error (a digit off, two letters swapped, one letter left lowercase, the wrong bracket), a `far`
miss is clearly wrong (another number, the word not reversed, ...). Ranked rows order them correct >
near > far (the paper's edited > chosen > rejected). With `sft_flawed` > 0, that share of the SFT
demonstrations make the kind's systematic mistake (`flawed_answer`), as imperfect human demonstrations do.
"""
from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

KINDS = ("add", "reverse", "upper", "wrap")
WRAPPERS = {"square brackets": "[{}]", "parentheses": "({})", "angle brackets": "<{}>", "curly braces": "{{{}}}"}
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass
class TaskConfig:
    """What the generator makes. Same config -> same files."""
    seed: int = field(default=0, metadata={"help": "seed of every random choice"})
    kinds: list[str] = field(default_factory=lambda: list(KINDS), metadata={"help": f"task kinds, from {KINDS}"})
    max_operand: int = field(default=99, metadata={"range": (1, 10**6), "help": "add: operands in [0, max_operand]"})
    min_word: int = field(default=3, metadata={"range": (1, 50), "help": "shortest random word (letters)"})
    max_word: int = field(default=6, metadata={"range": (1, 50), "help": "longest random word"})
    eval_fraction: float = field(default=0.1, metadata={"range": (0.01, 0.9), "help": "share of problem space held out"})
    n_sft: int = field(default=2000, metadata={"range": (1, None), "help": "SFT dialogs (train split)"})
    n_preference: int = field(default=1000, metadata={"range": (1, None), "help": "ranked / preference rows (train)"})
    n_prompts: int = field(default=300, metadata={"range": (1, None), "help": "prompts (train) for rejection sampling, and as many for annotating policy samples"})
    n_eval: int = field(default=200, metadata={"range": (1, None), "help": "held-out problems (eval chat + eval ranked)"})
    sft_flawed: float = field(default=0.0, metadata={"range": (0.0, 1.0), "help": "share of SFT demonstrations "
                              "that make the kind's systematic mistake (`flawed_answer`), as imperfect human demos do"})
    n_pretrain_docs: int = field(default=400, metadata={"range": (0, None), "help": "plain-text docs for a base model"})
    lines_per_doc: int = field(default=16, metadata={"range": (1, None)})

    def __post_init__(self):
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"kinds: {unknown or 'empty'}; choose from {list(KINDS)}")
        if self.min_word > self.max_word:
            raise ValueError(f"min_word {self.min_word} > max_word {self.max_word}")
        if self.kinds != ["add"] and self.max_word < 2:
            raise ValueError("max_word must be >= 2 (a one-letter word cannot be reversed wrongly)")


@dataclass(frozen=True)
class Problem:
    kind: str
    prompt: str
    answer: str
    key: str  # identity of the problem (kind + arguments): decides its split
    near: str  # a wrong answer with one small error
    far: str  # a clearly wrong answer
    statement: str  # the problem with its answer as plain text (pre-training documents)


def normalize(text: str) -> str:
    return text.strip()


def is_correct(answer: str, text: str) -> bool:
    """Exact match after stripping surrounding whitespace."""
    return normalize(text) == normalize(answer)


def split_of(key: str, eval_fraction: float) -> str:
    """'eval' or 'train', from a stable hash of the problem's identity."""
    return "eval" if zlib.crc32(key.encode()) % 10_000 < eval_fraction * 10_000 else "train"


# ----------------------------------------------------------------------------------------------------
# The task kinds
# ----------------------------------------------------------------------------------------------------


def _word(rng: random.Random, cfg: TaskConfig) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(cfg.min_word, cfg.max_word)))


def _other(rng: random.Random, right: str, make: Callable[[], str]) -> str:
    """A value from make() that differs from `right`."""
    for _ in range(100):
        value = make()
        if value != right:
            return value
    raise RuntimeError(f"could not make a wrong answer different from {right!r}")


def _add(rng, cfg) -> Problem:
    a, b = rng.randint(0, cfg.max_operand), rng.randint(0, cfg.max_operand)
    answer = str(a + b)

    def near():
        return str(max(0, a + b + rng.choice([-10, -2, -1, 1, 2, 10])))

    def far():
        return str(rng.randint(0, 2 * cfg.max_operand))
    return Problem("add", f"What is {a} + {b}?", answer, f"add:{a}:{b}", _other(rng, answer, near),
                   _other(rng, answer, far), f"{a} + {b} = {answer}")


def _swap_two(rng, word: str) -> str:
    i = rng.randrange(len(word) - 1)
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


def _reverse(rng, cfg) -> Problem:
    word = _word(rng, cfg)
    while len(set(word)) < 2:  # "aaa" reversed is itself: no wrong answer of the same letters
        word = _word(rng, cfg)
    answer = word[::-1]

    def near():
        return _swap_two(rng, answer) if rng.random() < 0.5 else answer[:-1] + rng.choice(LETTERS)

    def far():
        return word if word != answer and rng.random() < 0.5 else _word(rng, cfg)
    return Problem("reverse", f"Reverse the letters of '{word}'.", answer, f"reverse:{word}",
                   _other(rng, answer, near), _other(rng, answer, far), f"{word} reversed is {answer}")


def _upper(rng, cfg) -> Problem:
    word = _word(rng, cfg)
    answer = word.upper()

    def near():
        i = rng.randrange(len(word))
        return answer[:i] + word[i] + answer[i + 1:]

    def far():
        return word if rng.random() < 0.5 else _word(rng, cfg).upper()
    return Problem("upper", f"Write '{word}' in capital letters.", answer, f"upper:{word}",
                   _other(rng, answer, near), _other(rng, answer, far), f"{word} in capital letters is {answer}")


def _wrap(rng, cfg) -> Problem:
    word = _word(rng, cfg)
    name = rng.choice(sorted(WRAPPERS))
    answer = WRAPPERS[name].format(word)

    def near():
        other = rng.choice([n for n in sorted(WRAPPERS) if n != name])
        return WRAPPERS[other].format(word) if rng.random() < 0.5 else answer[:-1]

    def far():
        return word if rng.random() < 0.5 else WRAPPERS[name].format(_word(rng, cfg))
    return Problem("wrap", f"Put '{word}' in {name}.", answer, f"wrap:{name}:{word}",
                   _other(rng, answer, near), _other(rng, answer, far), f"{word} in {name} is {answer}")


FLAWED_WRAPPERS = {"square brackets": "parentheses", "parentheses": "square brackets",
                   "angle brackets": "curly braces", "curly braces": "angle brackets"}


def flawed_answer(p: Problem) -> str:
    """The kind's systematic mistake (always the same for a problem, unlike the random `near` miss):
    add: ten too many; reverse: the word unchanged; upper: only the first letter capitalised; wrap: the
    paired other bracket (square <-> round, angle <-> curly). Falls back to `near` where it would be right."""
    kind, *args = p.key.split(":")
    if kind == "add":
        flawed = str(int(args[0]) + int(args[1]) + 10)
    elif kind == "reverse":
        flawed = args[0]
    elif kind == "upper":
        flawed = args[0].capitalize()
    else:
        flawed = WRAPPERS[FLAWED_WRAPPERS[args[0]]].format(args[1])
    return p.near if is_correct(p.answer, flawed) else flawed


_MAKERS = {"add": _add, "reverse": _reverse, "upper": _upper, "wrap": _wrap}


def make_problems(cfg: TaskConfig, split: str, n: int, *, stream: str = "") -> list[Problem]:
    """`n` problems of `split` ('train' or 'eval'), kinds in turn, deterministic from (cfg.seed, split,
    stream). Different `stream` names give different draws (e.g. SFT data vs preference data).
    Train problems may repeat when the problem space is small; held-out ones are distinct."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"{cfg.seed}:{split}:{stream}")
    out: list[Problem] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 1000 * n + 10_000:
            raise ValueError(f"could not draw {n} distinct {split} problems of kinds {cfg.kinds}: the problem "
                             f"space is too small (raise max_operand / max_word or lower n_eval)")
        problem = _MAKERS[cfg.kinds[len(out) % len(cfg.kinds)]](rng, cfg)
        if split_of(problem.key, cfg.eval_fraction) != split or (split == "eval" and problem.key in seen):
            continue
        seen.add(problem.key)
        out.append(problem)
    return out


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------


def _user(p: Problem) -> list[dict]:
    return [{"role": "user", "content": p.prompt}]


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def chat_row(p: Problem) -> dict:
    """SFT / eval row: the prompt and its reference answer."""
    return {"messages": _user(p) + [_assistant(p.answer)], "kind": p.kind}


def sft_row(p: Problem, flawed: bool) -> dict:
    """SFT demonstration: the reference answer, or (flawed) the kind's systematic mistake."""
    if not flawed:
        return chat_row(p)
    return {"messages": _user(p) + [_assistant(flawed_answer(p))], "kind": p.kind, "flawed": True}


def ranked_row(p: Problem, rng: random.Random) -> dict:
    """Reward-model row: 3 responses (correct > near > far) or 2 (correct > one miss), about half each."""
    misses = [p.near, p.far] if p.near != p.far else [p.near]
    if len(misses) == 2 and rng.random() < 0.5:
        misses = [rng.choice(misses)]
    return {"prompt": _user(p), "responses": [_assistant(p.answer)] + [_assistant(m) for m in misses], "kind": p.kind}


def preference_row(p: Problem, rng: random.Random) -> dict:
    """DPO row: chosen = the right answer, rejected = a near or a far miss."""
    return {"prompt": _user(p), "chosen": _assistant(p.answer),
            "rejected": _assistant(p.near if rng.random() < 0.5 else p.far), "kind": p.kind}


def pretrain_docs(cfg: TaskConfig, n_docs: int, split: str = "train") -> list[dict]:
    """Plain-text documents of solved problems (no chat format): what a base model is pre-trained on."""
    problems = make_problems(cfg, split, n_docs * cfg.lines_per_doc, stream="pretrain")
    return [{"id": f"{split}/{i}", "source": "synthetic",
             "text": "\n".join(p.statement for p in problems[i * cfg.lines_per_doc:(i + 1) * cfg.lines_per_doc])}
            for i in range(n_docs)]


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path


def write_task_files(cfg: TaskConfig, out_dir) -> dict[str, Path]:
    """Write the task's files into `out_dir`; returns their paths by name:
      sft_train / sft_eval       chat rows (eval: held-out prompts with reference answers); a share
                                 `sft_flawed` of sft_train rows carry `flawed_answer` (marked "flawed")
      ranked_train / ranked_eval reward-model rows (2-3 ranked responses)
      preference_train           chosen / rejected rows
      prompts_train              chat rows for rejection sampling (train split, other draws than SFT)
      prompts_annotate           chat rows whose policy samples get labelled for the reward model
      pretrain/train.jsonl, pretrain/val.jsonl  plain-text corpus documents (train split problems only)"""
    out = Path(out_dir)
    rng = random.Random(f"{cfg.seed}:rows")
    held_out = make_problems(cfg, "eval", cfg.n_eval)
    flaw_rng = random.Random(f"{cfg.seed}:flawed")
    paths = {
        "sft_train": _write(out / "sft_train.jsonl", [sft_row(p, flaw_rng.random() < cfg.sft_flawed) for p in
                                                      make_problems(cfg, "train", cfg.n_sft, stream="sft")]),
        "sft_eval": _write(out / "sft_eval.jsonl", [chat_row(p) for p in held_out]),
        "ranked_train": _write(out / "ranked_train.jsonl", [ranked_row(p, rng) for p in
                                                            make_problems(cfg, "train", cfg.n_preference, stream="rm")]),
        "ranked_eval": _write(out / "ranked_eval.jsonl", [ranked_row(p, rng) for p in held_out]),
        "preference_train": _write(out / "preference_train.jsonl", [preference_row(p, rng) for p in
                                                                    make_problems(cfg, "train", cfg.n_preference, stream="dpo")]),
        "prompts_train": _write(out / "prompts_train.jsonl", [chat_row(p) for p in
                                                              make_problems(cfg, "train", cfg.n_prompts, stream="rs")]),
        "prompts_annotate": _write(out / "prompts_annotate.jsonl", [chat_row(p) for p in
                                                                    make_problems(cfg, "train", cfg.n_prompts, stream="annotate")]),
    }
    if cfg.n_pretrain_docs:
        paths["pretrain_train"] = _write(out / "pretrain" / "train.jsonl", pretrain_docs(cfg, cfg.n_pretrain_docs))
        paths["pretrain_val"] = _write(out / "pretrain" / "val.jsonl",
                                       pretrain_docs(cfg, max(1, cfg.n_pretrain_docs // 20), "eval"))
    return paths

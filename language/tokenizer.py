"""Tokenizers behind one small interface: Llama 3 tiktoken files, HF `tokenizer.json`, GGUF metadata.

Every part of the project (the LM, generation, data packing, chat) talks to a `Tokenizer`:

    tok = load_tokenizer("path/to/checkpoint")      # .gguf, tokenizer.json, tokenizer.model or a folder
    ids = tok.encode("Hello", bos=True)
    text = tok.decode(ids, skip_special=True)

`train_bpe` makes a byte-level BPE with the Llama 3 special tokens for from-scratch runs.
Nothing here downloads anything.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import tiktoken
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers

# Split regex of the Llama 3 tiktoken tokenizer (Meta's llama-models `tokenizer.py`).
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The named Llama 3 special tokens, in id order from the first id after the base ranks (Llama 3.2).
_LLAMA3_NAMED_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: a tool call follows
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
]
NUM_LLAMA3_SPECIAL_TOKENS = 256
# Meta numbers the remaining reserved tokens on from 2 (0 and 1 are used above).
LLAMA3_SPECIAL_TOKENS = _LLAMA3_NAMED_SPECIALS + [
    f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_LLAMA3_SPECIAL_TOKENS - len(_LLAMA3_NAMED_SPECIALS))
]

# Tokens that end generation wherever a vocabulary has them (besides its eos).
_STOP_TOKENS = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>")

# tiktoken panics on very long inputs and gets slow on long runs of (non-)whitespace, so input is cut
# as Meta does: slices of at most 400k characters, and no run of whitespace or non-whitespace longer
# than 25k characters (https://github.com/openai/tiktoken/issues/195).
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
_RUN = re.compile(r"\s+|\S+")


class Tokenizer:
    """The interface every tokenizer of the project offers."""

    vocab_size: int  # all ids, special tokens included
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    special_tokens: dict[str, int]
    stop_ids: set[int]  # ids that end generation
    chat_template: str | None = None  # jinja template the checkpoint brings, if any

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it are plain text unless `allow_special`."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            if self.bos_id is None:
                raise ValueError(f"{type(self).__name__} has no BOS token, but bos=True was asked for")
            ids.insert(0, self.bos_id)
        if eos:
            if self.eos_id is None:
                raise ValueError(f"{type(self).__name__} has no EOS token, but eos=True was asked for")
            ids.append(self.eos_id)
        return ids

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (size {self.vocab_size})")
        return ids

    def _stop_ids(self) -> set[int]:
        stops = {self.special_tokens[t] for t in _STOP_TOKENS if t in self.special_tokens}
        return stops | ({self.eos_id} if self.eos_id is not None else set())


# ----------------------------------------------------------------------------------------------------
# Llama 3 tiktoken files
# ----------------------------------------------------------------------------------------------------


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken BPE file: one `base64(token bytes) rank` per line; ranks must be 0..n-1."""
    path = Path(path)
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError(f"expected 'base64 rank', got {len(parts)} fields")
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, binascii.Error) as e:
                raise ValueError(f"{path}: line {lineno}: malformed tiktoken entry {line[:60]!r} ({e})") from None
            if token in ranks:
                raise ValueError(f"{path}: line {lineno}: token {token!r} appears twice")
            ranks[token] = rank
    if not ranks:
        raise ValueError(f"{path}: no tokens in tiktoken file")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be exactly 0..{len(ranks) - 1}, each once")
    return ranks


def _split_for_tiktoken(text: str) -> Iterable[str]:
    """Cut `text` into pieces tiktoken handles: as in Meta's tokenizer (see MAX_RUN_CHARS)."""
    for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
        chunk = text[i : i + TIKTOKEN_MAX_ENCODE_CHARS]
        start = 0
        for run in _RUN.finditer(chunk):
            for cut in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                yield chunk[start:cut]
                start = cut
        yield chunk[start:]


class TiktokenTokenizer(Tokenizer):
    """The Llama 3 tokenizer: tiktoken BPE ranks + the Llama 3 split regex + 256 special tokens."""

    def __init__(self, ranks: dict[bytes, int], *, name: str = "llama3",
                 special_tokens: Sequence[str] = LLAMA3_SPECIAL_TOKENS, pat_str: str = LLAMA3_PAT_STR):
        base = len(ranks)
        self.special_tokens = {token: base + i for i, token in enumerate(special_tokens)}
        self._special_ids = set(self.special_tokens.values())
        self._enc = tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks,
                                      special_tokens=self.special_tokens)
        self.num_base_tokens = base
        self.vocab_size = base + len(self.special_tokens)
        self.bos_id = self.special_tokens.get("<|begin_of_text|>")
        self.eos_id = self.special_tokens.get("<|end_of_text|>")
        self.pad_id = self.special_tokens.get("<|finetune_right_pad_id|>")
        self.chat_template = None
        self.stop_ids = self._stop_ids()

    @classmethod
    def from_file(cls, path: str | Path) -> "TiktokenTokenizer":
        """Load a Llama 3 `tokenizer.model` (tiktoken format)."""
        return cls(read_tiktoken_ranks(path), name=Path(path).name)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        allowed = "all" if allow_special else set()
        ids: list[int] = []
        for piece in _split_for_tiktoken(text):
            ids.extend(self._enc.encode(piece, allowed_special=allowed, disallowed_special=()))
        return self._wrap(ids, bos, eos)

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        ids = self._check_ids(ids)
        if skip_special:
            ids = [i for i in ids if i not in self._special_ids]
        return self._enc.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens[token]
        try:
            return self._enc.encode_single_token(token.encode("utf-8"))
        except KeyError:
            return None


# ----------------------------------------------------------------------------------------------------
# Hugging Face `tokenizers` (tokenizer.json, GGUF, trained here)
# ----------------------------------------------------------------------------------------------------

_LLAMA3_DEFAULTS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                    "pad_token": "<|finetune_right_pad_id|>"}


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` with its special tokens and chat template."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None,
                 chat_template: str | None = None, source: str = "tokenizer"):
        self.tokenizer = tokenizer
        self.source = source
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self.bos_id = self._id_of(bos_token, "bos_token")
        self.eos_id = self._id_of(eos_token, "eos_token")
        self.pad_id = self._id_of(pad_token, "pad_token")
        self.chat_template = chat_template
        self.stop_ids = self._stop_ids()
        self._plain_twin: tokenizers.Tokenizer | None = None

    @property
    def _plain(self) -> tokenizers.Tokenizer:
        """A twin that reads special-token strings as plain text (encode with allow_special=False)."""
        if self._plain_twin is None:
            self._plain_twin = tokenizers.Tokenizer.from_str(self.tokenizer.to_str())
            self._plain_twin.encode_special_tokens = True
        return self._plain_twin

    def _id_of(self, token: str | None, key: str) -> int | None:
        if token is None:
            return None
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.source}: {key} {token!r} is not in the vocabulary")
        return token_id

    # -- loading --------------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> "HFTokenizer":
        """Load `tokenizer.json`; bos/eos/pad and the chat template come from the config files beside it
        (`tokenizer_config.json`, `special_tokens_map.json`, `chat_template.jinja`) when present."""
        path = Path(path)
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{path}: not a readable tokenizers JSON file ({e})") from None
        config = _read_json(path.parent / "tokenizer_config.json")
        special_map = _read_json(path.parent / "special_tokens_map.json")
        names = {}
        for key in ("bos_token", "eos_token", "pad_token"):
            names[key] = _token_text(config.get(key)) or _token_text(special_map.get(key))
        if not config and not special_map:  # a bare tokenizer.json: Llama 3 names if it has them
            names = {k: (t if tok.token_to_id(t) is not None else None) for k, t in _LLAMA3_DEFAULTS.items()}
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = path.parent / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        return cls(tok, chat_template=template, source=str(path), **names)

    @classmethod
    def from_gguf(cls, path: str | Path) -> "HFTokenizer":
        """Build the byte-level BPE tokenizer a GGUF file describes in its `tokenizer.*` metadata."""
        return _tokenizer_from_gguf(Path(path))

    def save(self, out_dir: str | Path) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` into `out_dir`; returns the folder."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(out_dir / "tokenizer.json"))
        name = self.tokenizer.id_to_token
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name(self.bos_id) if self.bos_id is not None else None,
            "eos_token": name(self.eos_id) if self.eos_id is not None else None,
            "pad_token": name(self.pad_id) if self.pad_id is not None else None,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return out_dir

    # -- the interface --------------------------------------------------------------------------------

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        backend = self.tokenizer if allow_special else self._plain
        return self._wrap(list(backend.encode(text, add_special_tokens=False).ids), bos, eos)

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        return self.tokenizer.decode(self._check_ids(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


# ----------------------------------------------------------------------------------------------------
# GGUF: rebuild the tokenizer from llama.cpp's `tokenizer.*` metadata
# ----------------------------------------------------------------------------------------------------

_GPT2_SPLIT = "gpt2"  # ByteLevel's own GPT-2 regex
_QWEN2_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> (split, digits one by one first, ignore_merges), as llama.cpp pre-tokenizes.
_GGUF_PRE_TOKENIZERS = {
    "default": (_GPT2_SPLIT, False, False),
    "gpt2": (_GPT2_SPLIT, False, False),
    "smollm": (_GPT2_SPLIT, True, False),
    "starcoder": (_GPT2_SPLIT, True, False),
    "refact": (_GPT2_SPLIT, True, False),
    "llama-bpe": (LLAMA3_PAT_STR, False, True),
    "llama3": (LLAMA3_PAT_STR, False, True),
    "llama-v3": (LLAMA3_PAT_STR, False, True),
    "qwen2": (_QWEN2_PAT_STR, False, False),
}
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4  # llama.cpp token types


def _byte_level_pre_tokenizer(split: str, digits: bool) -> pre_tokenizers.PreTokenizer:
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split == _GPT2_SPLIT:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


def _tokenizer_from_gguf(path: Path) -> HFTokenizer:
    from gguf import GGUFReader

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    fields = GGUFReader(str(path)).fields

    def value(key: str, required: bool = False):
        if key in fields:
            return fields[key].contents()
        if required:
            raise ValueError(f"{path}: GGUF key {key!r} is missing")
        return None

    model = value("tokenizer.ggml.model", required=True)
    if model != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model = {model!r} is not supported "
                         "(only 'gpt2', the byte-level BPE)")
    pre = value("tokenizer.ggml.pre") or "default"
    if pre not in _GGUF_PRE_TOKENIZERS:
        raise ValueError(f"{path}: tokenizer.ggml.pre = {pre!r} is not supported; "
                         f"supported: {sorted(_GGUF_PRE_TOKENIZERS)}")
    split, digits, ignore_merges = _GGUF_PRE_TOKENIZERS[pre]

    tokens = value("tokenizer.ggml.tokens", required=True)
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.tokens holds duplicate tokens")
    merges = []
    for i, merge in enumerate(value("tokenizer.ggml.merges", required=True)):
        pair = tuple(merge.split(" "))
        if len(pair) != 2:
            raise ValueError(f"{path}: tokenizer.ggml.merges[{i}] = {merge!r} is not 'left right'")
        merges.append(pair)

    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = _byte_level_pre_tokenizer(split, digits)
    tok.decoder = decoders.ByteLevel()
    types = value("tokenizer.ggml.token_type") or [1] * len(tokens)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == _GGUF_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, types) if kind == _GGUF_USER_DEFINED])
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(f"{path}: a control or user-defined token is not spelled as a vocabulary entry")

    names = {}
    for key, gguf_key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("pad_token", "padding_token_id")):
        token_id = value(f"tokenizer.ggml.{gguf_key}")
        if token_id is not None and not 0 <= int(token_id) < len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.{gguf_key} = {token_id} is outside the vocabulary")
        names[key] = tokens[int(token_id)] if token_id is not None else None
    return HFTokenizer(tok, chat_template=value("tokenizer.chat_template"), source=str(path), **names)


# ----------------------------------------------------------------------------------------------------
# Training a byte-level BPE for from-scratch runs
# ----------------------------------------------------------------------------------------------------

# The first 16 Llama 3 special tokens (all the named ones + reserved 0-5), appended after the learned
# ranks as Llama 3 does, so the Llama 3 chat format works on a tokenizer trained here.
TRAIN_SPECIAL_TOKENS = LLAMA3_SPECIAL_TOKENS[:16]


def train_bpe(files: Sequence[str | Path], vocab_size: int, out_dir: str | Path, *,
              min_frequency: int = 2) -> HFTokenizer:
    """Train a byte-level BPE (Llama 3 split regex) on local text files; `vocab_size` counts the
    special tokens too. Saves `tokenizer.json` + `tokenizer_config.json` into `out_dir`.
    The same files give the same tokenizer."""
    files = [Path(f) for f in files]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"train_bpe: training file not found: {f}")
    n_learned = vocab_size - len(TRAIN_SPECIAL_TOKENS)
    if n_learned < 256:
        raise ValueError(f"train_bpe: vocab_size {vocab_size} leaves no room for 256 bytes "
                         f"+ {len(TRAIN_SPECIAL_TOKENS)} special tokens")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = _byte_level_pre_tokenizer(LLAMA3_PAT_STR, digits=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_learned, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(f) for f in files], trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TRAIN_SPECIAL_TOKENS])
    bos = "<|begin_of_text|>"  # transformers' `tokenizer(text)` adds BOS, as with Llama 3's tokenizer.json
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tok.token_to_id(bos))])
    result = HFTokenizer(tok, source=str(Path(out_dir) / "tokenizer.json"), **_LLAMA3_DEFAULTS)
    result.save(out_dir)
    return result


# ----------------------------------------------------------------------------------------------------
# Loading whatever a path points at
# ----------------------------------------------------------------------------------------------------

_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+=*\s+\d+\s*$")
_LOOKED_FOR = ("tokenizer.json", "tokenizer.model", "original/tokenizer.model", "*.gguf")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer at `path`: a `.gguf` file, a `tokenizer.json`, a Llama 3 tiktoken `tokenizer.model`,
    or a folder holding one of those (HF or Meta checkpoint folder; first match in that order)."""
    path = Path(path)
    if path.is_dir():
        for name in _LOOKED_FOR[:3]:
            if (path / name).is_file():
                return load_tokenizer(path / name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) > 1:
            raise ValueError(f"{path}: several GGUF files, pass one: {[g.name for g in ggufs]}")
        if ggufs:
            return load_tokenizer(ggufs[0])
        raise FileNotFoundError(f"{path}: no tokenizer found; looked for {', '.join(_LOOKED_FOR)}")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer path does not exist: {path}")
    if path.suffix == ".gguf":
        return HFTokenizer.from_gguf(path)
    if path.suffix == ".json":
        return HFTokenizer.from_file(path)
    with open(path, "rb") as f:
        first = f.readline(4096)
    if _TIKTOKEN_LINE.match(first):
        return TiktokenTokenizer.from_file(path)
    raise ValueError(f"{path}: unknown tokenizer format; expected a .gguf file, a tokenizer.json or a "
                     "tiktoken tokenizer.model (SentencePiece models are not supported)")

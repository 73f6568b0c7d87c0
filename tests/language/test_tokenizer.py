"""Tokenizers: Llama 3 tiktoken files, HF tokenizer.json, GGUF metadata, train_bpe, load_tokenizer."""

import base64
import json
import random
from pathlib import Path

import pytest

from language.tokenizer import (
    LLAMA3_SPECIAL_TOKENS,
    MAX_RUN_CHARS,
    TIKTOKEN_MAX_ENCODE_CHARS,
    HFTokenizer,
    TiktokenTokenizer,
    _split_for_tiktoken,
    load_tokenizer,
    train_bpe,
)

MERGES = [b"th", b"he", b"the", b" the", b"ll", b"llo", b"\n\n", b"  ", b"in", b"ing"]
TEXTS = [
    "Hello world, the thing is ringing.",
    "Ünïcödé: 日本語のテキスト, emoji 🦙🚀, Ελληνικά, עברית, combining e\u0301.",
    "  leading and   inner   spaces\n\n\ttabs\r\nand trailing  \n",
    "numbers 1234567 3.14159 -42",
    "",
]


def write_tiktoken(path: Path, tokens: list[bytes]) -> Path:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


@pytest.fixture
def tiny_tiktoken(tmp_path) -> TiktokenTokenizer:
    path = write_tiktoken(tmp_path / "tokenizer.model", [bytes([i]) for i in range(256)] + MERGES)
    return TiktokenTokenizer.from_file(path)


# ---------------------------------------------------------------------------------------------- tiktoken


def test_special_token_list_matches_meta():
    assert len(LLAMA3_SPECIAL_TOKENS) == 256 == len(set(LLAMA3_SPECIAL_TOKENS))
    assert LLAMA3_SPECIAL_TOKENS[:12] == [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
        "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
    ]
    assert LLAMA3_SPECIAL_TOKENS[12] == "<|reserved_special_token_2|>"
    assert LLAMA3_SPECIAL_TOKENS[-1] == "<|reserved_special_token_245|>"


def test_special_ids_follow_the_base_ranks(tiny_tiktoken):
    tok, base = tiny_tiktoken, 256 + len(MERGES)
    assert tok.vocab_size == base + 256
    assert all(tok.special_tokens[name] == base + k for k, name in enumerate(LLAMA3_SPECIAL_TOKENS))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (base, base + 1, base + 4)
    assert tok.stop_ids == {base + 1, base + 8, base + 9}  # end_of_text, eom, eot
    assert tok.chat_template is None


def test_real_size_file_puts_specials_at_128000(tmp_path):
    singles = [bytes([i]) for i in range(256)]
    pairs = [bytes([a, b]) for a in range(256) for b in range(256)]
    triples = [bytes([97 + i % 26, a, b]) for i in range(4) for a in range(256) for b in range(256)]
    tokens = (singles + pairs + triples)[:128_000]
    tok = TiktokenTokenizer.from_file(write_tiktoken(tmp_path / "tokenizer.model", tokens))
    expected = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|finetune_right_pad_id|>": 128004,
                "<|step_id|>": 128005, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
                "<|eom_id|>": 128008, "<|eot_id|>": 128009, "<|python_tag|>": 128010, "<|image|>": 128011,
                "<|reserved_special_token_245|>": 128255}
    assert {name: tok.special_tokens[name] for name in expected} == expected
    assert tok.vocab_size == 128256


@pytest.mark.parametrize("text", TEXTS)
def test_tiktoken_round_trip(tiny_tiktoken, text):
    ids = tiny_tiktoken.encode(text)
    assert all(0 <= i < 256 + len(MERGES) for i in ids)
    assert tiny_tiktoken.decode(ids) == text


def test_tiktoken_uses_merges(tiny_tiktoken):
    assert tiny_tiktoken.encode("the") == [tiny_tiktoken.token_to_id("the")]
    assert tiny_tiktoken.token_to_id("<|eot_id|>") == tiny_tiktoken.special_tokens["<|eot_id|>"]
    assert tiny_tiktoken.token_to_id("a") == 97
    assert tiny_tiktoken.token_to_id("not a token") is None


def test_tiktoken_special_tokens(tiny_tiktoken):
    tok, sp = tiny_tiktoken, tiny_tiktoken.special_tokens
    text = "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    ids = tok.encode(text, bos=True, allow_special=True)
    assert ids[0] == tok.bos_id and ids[1] == sp["<|start_header_id|>"] and ids[-1] == sp["<|eot_id|>"]
    assert tok.decode(ids) == "<|begin_of_text|>" + text
    assert tok.decode(ids, skip_special=True) == "user\n\nhi"
    plain = tok.encode(text, eos=True)  # special-token text is plain text by default
    assert set(plain[:-1]).isdisjoint(sp.values()) and plain[-1] == tok.eos_id
    assert tok.decode(plain[:-1]) == text


def test_tiktoken_very_long_inputs(tiny_tiktoken):
    text = "a" * 300_000 + " " * 60_000 + "the thing " * 10_000 + "日" * 50_000
    assert len(text) > TIKTOKEN_MAX_ENCODE_CHARS
    pieces = list(_split_for_tiktoken(text))
    assert "".join(pieces) == text
    assert all(len(p) <= TIKTOKEN_MAX_ENCODE_CHARS for p in pieces)
    assert max(len(run) for p in pieces for run in p.split()) <= MAX_RUN_CHARS
    assert tiny_tiktoken.decode(tiny_tiktoken.encode(text)) == text


@pytest.mark.parametrize("line, problem", [
    ("not-base64! 3", "line 3"), ("YQ== x", "line 3"), ("YQ==", "line 3"), ("YWI= 7", "ranks must be"),
])
def test_malformed_tiktoken_file(tmp_path, line, problem):
    path = tmp_path / "bad.model"
    path.write_text(f"AA== 0\nAQ== 1\n{line}\n")
    with pytest.raises(ValueError, match=problem) as err:
        TiktokenTokenizer.from_file(path)
    assert str(path) in str(err.value)


def test_duplicate_tiktoken_token(tmp_path):
    path = tmp_path / "dup.model"
    path.write_text("AA== 0\nAA== 1\n")
    with pytest.raises(ValueError, match=r"line 2.*twice"):
        TiktokenTokenizer.from_file(path)


# ---------------------------------------------------------------------------------------------- train_bpe


@pytest.fixture
def corpus(tmp_path) -> list[Path]:
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "dog", "ran", "über", "naïve", "日本", "語", "hello", "world",
             "tokenizer", "llama", "herd", "model", "2024", "!", "?"]
    files = []
    for n in range(2):
        lines = (" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) for _ in range(1500))
        files.append(tmp_path / f"corpus{n}.txt")
        files[-1].write_text("\n".join(lines), encoding="utf-8")
    return files


def test_train_bpe(corpus, tmp_path):
    tok = train_bpe(corpus, 400, tmp_path / "out")
    learned = tok.vocab_size - 16
    assert 256 < learned <= 384
    assert tok.special_tokens["<|begin_of_text|>"] == learned  # specials follow the learned ranks
    assert tok.special_tokens["<|image|>"] == learned + 11
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (learned, learned + 1, learned + 4)
    assert {learned + 1, learned + 8, learned + 9} <= tok.stop_ids
    assert len(tok.encode("the cat sat on the mat")) < len("the cat sat on the mat") // 2
    for text in TEXTS + ["<|eot_id|> as text"]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|start_header_id|>user<|end_header_id|>", allow_special=True)
    assert ids[0] == tok.special_tokens["<|start_header_id|>"] and ids[-1] == tok.special_tokens["<|end_header_id|>"]
    assert tok.encode("<|eot_id|>", allow_special=False) != [tok.special_tokens["<|eot_id|>"]]
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "tokenizer_config.json").is_file()


def test_train_bpe_is_deterministic_and_reloads(corpus, tmp_path):
    a = train_bpe(corpus, 400, tmp_path / "a")
    train_bpe(corpus, 400, tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    again = load_tokenizer(tmp_path / "a")
    assert isinstance(again, HFTokenizer)
    assert (again.bos_id, again.eos_id, again.pad_id) == (a.bos_id, a.eos_id, a.pad_id)
    assert again.encode(TEXTS[1]) == a.encode(TEXTS[1])


def test_train_bpe_errors(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_bpe([tmp_path / "missing.txt"], 400, tmp_path / "out")
    with pytest.raises(ValueError, match="vocab_size 100"):
        train_bpe(corpus, 100, tmp_path / "out")


# ---------------------------------------------------------------------------------------------- tokenizer.json


def test_hf_from_file_reads_config_beside_it(corpus, tmp_path):
    train_bpe(corpus, 400, tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(eos_token={"content": "<|eot_id|>", "special": True}, pad_token=None, chat_template="{{ x }}")
    config_path.write_text(json.dumps(config))
    (tmp_path / "ckpt" / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|end_of_text|>"}))
    tok = HFTokenizer.from_file(tmp_path / "ckpt" / "tokenizer.json")
    assert tok.eos_id == tok.special_tokens["<|eot_id|>"]
    assert tok.pad_id == tok.special_tokens["<|end_of_text|>"]  # filled in from special_tokens_map.json
    assert tok.chat_template == "{{ x }}"
    (tmp_path / "ckpt" / "chat_template.jinja").write_text("{{ y }}")
    assert HFTokenizer.from_file(tmp_path / "ckpt" / "tokenizer.json").chat_template == "{{ y }}"
    config["bos_token"] = "<|nope|>"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"bos_token '<\|nope\|>' is not in the vocabulary"):
        HFTokenizer.from_file(tmp_path / "ckpt" / "tokenizer.json")


# ---------------------------------------------------------------------------------------------- GGUF

GGUF_TEXTS = TEXTS[:4] + [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "x = [i ** 2 for i in range(10)]  # code\n\n\n    indented",
    "a" * 2000 + " " * 500 + "end",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return HFTokenizer.from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_gguf_matches_transformers(smollm2, smollm2_reference):
    assert smollm2.vocab_size == 49152 == len(smollm2_reference)
    for text in GGUF_TEXTS:
        expected = smollm2_reference(text, add_special_tokens=False)["input_ids"]
        assert smollm2.encode(text, allow_special=True) == expected, text
        assert smollm2.decode(expected) == text


def test_gguf_metadata(smollm2):
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.pad_id) == (1, 2, 2)  # <|im_start|>, <|im_end|>
    assert smollm2.special_tokens["<|endoftext|>"] == 0 and len(smollm2.special_tokens) == 17
    assert {0, 2} <= smollm2.stop_ids
    assert "<|im_start|>" in smollm2.chat_template
    ids = smollm2.encode("<|im_end|>")  # plain text unless allow_special
    assert 2 not in ids and smollm2.decode(ids) == "<|im_end|>"
    assert smollm2.decode([1, 4093, 2], skip_special=True) == "user"


def write_gguf(path: Path, **fields) -> Path:
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model(fields.pop("model"))
    if "pre" in fields:
        writer.add_tokenizer_pre(fields.pop("pre"))
    writer.add_token_list(["a", "b", "ab"])
    writer.add_token_merges(["a b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_tiny_and_unsupported(tmp_path):
    tok = HFTokenizer.from_gguf(write_gguf(tmp_path / "ok.gguf", model="gpt2", pre="gpt2"))
    assert tok.encode("abab") == [2, 2] and tok.bos_id is None
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model = 'llama'"):
        HFTokenizer.from_gguf(write_gguf(tmp_path / "spm.gguf", model="llama"))
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.pre = 'mystery'"):
        HFTokenizer.from_gguf(write_gguf(tmp_path / "pre.gguf", model="gpt2", pre="mystery"))


# ---------------------------------------------------------------------------------------------- load_tokenizer


def test_load_tokenizer_dispatch(tmp_path, corpus):
    (tmp_path / "meta").mkdir()
    tiktoken_file = write_tiktoken(tmp_path / "meta" / "tokenizer.model", [bytes([i]) for i in range(256)])
    assert isinstance(load_tokenizer(tiktoken_file), TiktokenTokenizer)
    assert isinstance(load_tokenizer(tmp_path / "meta"), TiktokenTokenizer)
    (tmp_path / "hf" / "original").mkdir(parents=True)
    write_tiktoken(tmp_path / "hf" / "original" / "tokenizer.model", [bytes([i]) for i in range(256)])
    assert isinstance(load_tokenizer(tmp_path / "hf"), TiktokenTokenizer)
    train_bpe(corpus, 300, tmp_path / "hf")  # tokenizer.json now wins over original/tokenizer.model
    assert isinstance(load_tokenizer(tmp_path / "hf"), HFTokenizer)
    assert isinstance(load_tokenizer(tmp_path / "hf" / "tokenizer.json"), HFTokenizer)
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    write_gguf(gguf_dir / "model.gguf", model="gpt2", pre="gpt2")
    assert isinstance(load_tokenizer(gguf_dir), HFTokenizer)


def test_load_tokenizer_errors(tmp_path):
    looked_for = r"tokenizer\.json, tokenizer\.model, original/tokenizer\.model, \*\.gguf"
    with pytest.raises(FileNotFoundError, match=looked_for):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nothing")
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x0e\x0a\x05<unk>\x15\x00\x00\x00\x00")  # SentencePiece-like
    with pytest.raises(ValueError, match="unknown tokenizer format"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    (tmp_path / "a.gguf").touch()
    (tmp_path / "b.gguf").touch()
    with pytest.raises(ValueError, match="several GGUF files"):
        load_tokenizer(tmp_path)

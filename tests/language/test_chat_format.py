"""Chat formats: the Llama 3 layout (Sec 4.1.1), the checkpoint's jinja template, and their loss masks."""

import base64
import random

import pytest

from language.chat_format import (
    Llama3ChatFormat,
    Message,
    TemplateChatFormat,
    chat_format_for,
)
from language.tokenizer import HFTokenizer, TiktokenTokenizer, train_bpe

DIALOG = [
    Message("system", "You are a helpful assistant."),
    Message("user", "What is 2+2?"),
    Message("assistant", "4"),
]
PAPER_LITERAL = (
    "<|begin_of_text|>"
    "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
)
TOOL_DIALOG = [
    Message("system", "Environment: ipython"),
    Message("user", "Compute 7 * 6, ünïcode 🦙"),
    Message("assistant", "<|python_tag|>print(7 * 6)", end_of_message=True),
    Message("ipython", "42"),
    Message("assistant", "It is 42.\nThe <|eot_id|> text stays text."),
]


@pytest.fixture(scope="module")
def tiktoken_tok(tmp_path_factory) -> TiktokenTokenizer:
    tokens = [bytes([i]) for i in range(256)] + [b"\n\n", b"as", b"ass", b"assistant", b"user", b"is"]
    path = tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return TiktokenTokenizer.from_file(path)


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory) -> HFTokenizer:
    rng = random.Random(0)
    words = ["what", "is", "the", "answer", "assistant", "user", "system", "print", "(", ")", "42", "you"]
    corpus = tmp_path_factory.mktemp("corpus") / "c.txt"
    corpus.write_text("\n".join(" ".join(rng.choices(words, k=10)) for _ in range(2000)))
    return train_bpe([corpus], 350, tmp_path_factory.mktemp("bpe"))


def masked_text(tok, dialog, mask) -> str:
    return tok.decode([i for i, m in zip(dialog.ids, mask) if m])


# ---------------------------------------------------------------------------------------------- Llama 3


def test_layout_equals_the_paper_string(tiktoken_tok):
    fmt = Llama3ChatFormat(tiktoken_tok)
    assert fmt.render(DIALOG).ids == tiktoken_tok.encode(PAPER_LITERAL, allow_special=True)
    prompt = fmt.render(DIALOG[:2], add_generation_prompt=True).ids
    assert prompt == tiktoken_tok.encode(PAPER_LITERAL.rsplit("4<|eot_id|>", 1)[0], allow_special=True)
    assert fmt.render(DIALOG, bos=False).ids == tiktoken_tok.encode(PAPER_LITERAL[17:], allow_special=True)


def test_masks_and_spans(tiktoken_tok):
    tok, fmt = tiktoken_tok, Llama3ChatFormat(tiktoken_tok)
    d = fmt.render(TOOL_DIALOG)
    sp = tok.special_tokens
    assert len(d.ids) == len(d.target_mask) == len(d.content_mask)
    # content: the two assistant contents, python_tag included, nothing else
    assert masked_text(tok, d, d.content_mask) == "<|python_tag|>print(7 * 6)" + TOOL_DIALOG[4].content
    # target: content + each assistant's closing token (eom for the tool call, eot otherwise)
    assert masked_text(tok, d, d.target_mask) == ("<|python_tag|>print(7 * 6)<|eom_id|>"
                                                  + TOOL_DIALOG[4].content + "<|eot_id|>")
    assert d.labels().count(-100) == d.target_mask.count(False)
    # spans: each message from its <|start_header_id|> through its closer, back to back after BOS
    assert d.ids[0] == tok.bos_id and d.message_spans[0][0] == 1 and d.message_spans[-1][1] == len(d.ids)
    for (start, end), nxt in zip(d.message_spans, d.message_spans[1:] + [(len(d.ids), None)]):
        assert d.ids[start] == sp["<|start_header_id|>"] and d.ids[end - 1] in fmt.stop_ids and end == nxt[0]
    start, end = d.message_spans[2]
    assert d.ids[end - 1] == sp["<|eom_id|>"]
    header_end = d.ids.index(sp["<|end_header_id|>"], start)
    assert d.ids[header_end + 2] == sp["<|python_tag|>"]  # header, "\n\n", then the python tag
    assert not any(d.target_mask[start:header_end + 2])  # the header is never trained on


def test_round_trip(tiktoken_tok, bpe_tok):
    for tok in (tiktoken_tok, bpe_tok):
        fmt = chat_format_for(tok)
        assert isinstance(fmt, Llama3ChatFormat)
        assert fmt.parse(fmt.render(TOOL_DIALOG).ids) == TOOL_DIALOG
        assert fmt.parse(fmt.render(DIALOG, bos=False).ids) == DIALOG


def test_special_text_in_content(tiktoken_tok):
    tok, fmt = tiktoken_tok, Llama3ChatFormat(tiktoken_tok)
    d = fmt.render([Message("user", "<|image|>Describe this."), Message("assistant", "A <|eot_id|>.")])
    image = tok.special_tokens["<|image|>"]
    assert d.ids.count(image) == 1 and d.ids.count(tok.special_tokens["<|eot_id|>"]) == 2  # both closers only
    assert not d.target_mask[d.ids.index(image)]
    assert fmt.parse(d.ids)[1].content == "A <|eot_id|>."


def test_parse_generated_reply(tiktoken_tok):
    tok, fmt = tiktoken_tok, Llama3ChatFormat(tiktoken_tok)
    prompt = fmt.render(DIALOG[:2], add_generation_prompt=True).ids
    assert fmt.parse(prompt)[-1] == Message("assistant", "")
    reply = prompt + tok.encode("Four.") + [tok.special_tokens["<|eot_id|>"], tok.eos_id]
    assert fmt.parse(reply) == DIALOG[:2] + [Message("assistant", "Four.")]
    with pytest.raises(ValueError, match="expected <\\|start_header_id\\|>"):
        fmt.parse(tok.encode("no header"))


def test_role_errors(tiktoken_tok):
    fmt = Llama3ChatFormat(tiktoken_tok)
    with pytest.raises(ValueError, match=r"unknown role 'tool'.*'system', 'user', 'assistant', 'ipython'"):
        fmt.render([Message("tool", "x")])
    with pytest.raises(ValueError, match=r"message 0 \(user\): end_of_message"):
        fmt.render([Message("user", "x", end_of_message=True)])


# ---------------------------------------------------------------------------------------------- templates

LLAMA3_JINJA = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def test_template_equals_llama3_format(bpe_tok):
    """The Llama 3 layout written as a jinja template gives the same ids, masks and spans.
    (Not for special-token text inside content: a template's output is read with specials, as in transformers.)"""
    direct, template = Llama3ChatFormat(bpe_tok), TemplateChatFormat(bpe_tok, LLAMA3_JINJA)
    dialog = TOOL_DIALOG[:2] + [Message("assistant", "Forty-two.\nDone."), Message("user", "Thanks")]
    for add in (False, True):
        a, b = direct.render(dialog, add_generation_prompt=add), template.render(dialog, add_generation_prompt=add)
        assert (a.ids, a.target_mask, a.content_mask, a.message_spans) == \
               (b.ids, b.target_mask, b.content_mask, b.message_spans)
    assert template.parse(template.render(dialog).ids) == dialog


def test_template_errors(bpe_tok):
    with pytest.raises(ValueError, match="no chat_template"):
        TemplateChatFormat(bpe_tok)
    unstable = "{{ messages | length }}" + LLAMA3_JINJA
    with pytest.raises(ValueError, match="not prefix-stable"):
        TemplateChatFormat(bpe_tok, unstable).render(DIALOG)
    no_stop = LLAMA3_JINJA.replace("<|eot_id|>", "\n")
    with pytest.raises(ValueError, match="no stop token"):
        TemplateChatFormat(bpe_tok, no_stop).render(DIALOG)
    with pytest.raises(ValueError, match="only in the Llama 3 chat format"):
        TemplateChatFormat(bpe_tok, LLAMA3_JINJA).render([Message("assistant", "x", end_of_message=True)])
    failing = "{{ raise_exception('no system role') }}"
    with pytest.raises(ValueError, match="no system role"):
        TemplateChatFormat(bpe_tok, failing).render(DIALOG)


# ---------------------------------------------------------------------------------------------- SmolLM2

SMOL_DIALOG = [
    Message("system", "Be brief."),
    Message("user", "What is the capital of France?"),
    Message("assistant", "Paris."),
    Message("user", "And 3×3? ünïcode 🦙"),
    Message("assistant", "9, of  course.\nBye"),
]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    path = smollm2_gguf
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return HFTokenizer.from_gguf(path), reference


def reference_ids(reference, dialog, add_generation_prompt=False) -> list[int]:
    out = reference.apply_chat_template([{"role": m.role, "content": m.content} for m in dialog],
                                        tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_smollm2_template_matches_transformers(smollm2):
    tok, reference = smollm2
    fmt = chat_format_for(tok)
    assert isinstance(fmt, TemplateChatFormat)
    for dialog, add in ((SMOL_DIALOG, False), (SMOL_DIALOG[:4], True), (SMOL_DIALOG[1:3], False)):
        assert fmt.render(dialog, add_generation_prompt=add).ids == reference_ids(reference, dialog, add)
    d = fmt.render(SMOL_DIALOG)
    assert masked_text(tok, d, d.content_mask) == "Paris." + "9, of  course.\nBye"
    assert masked_text(tok, d, d.target_mask) == "Paris.<|im_end|>" + "9, of  course.\nBye<|im_end|>"
    assert [tok.decode(d.ids[s:e]) for s, e in d.message_spans][2] == "<|im_start|>assistant\nParis.<|im_end|>\n"
    assert d.message_spans[-1][1] == len(d.ids)
    assert fmt.parse(d.ids) == SMOL_DIALOG
    assert fmt.stop_ids >= {tok.token_to_id("<|im_end|>")}


def test_smollm2_default_system_prompt(smollm2):
    tok, _ = smollm2
    fmt = chat_format_for(tok)
    d = fmt.render(SMOL_DIALOG[1:3])
    parsed = fmt.parse(d.ids)
    assert parsed[0].role == "system" and "SmolLM" in parsed[0].content  # the template adds it
    assert parsed[1:] == SMOL_DIALOG[1:3]
    assert d.message_spans[0][0] == 0  # the injected system block belongs to the first message's span


def test_chat_format_for_without_template():
    plain = TiktokenTokenizer(
        {bytes([i]): i for i in range(256)}, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"])
    with pytest.raises(ValueError, match="no <\\|start_header_id\\|>.*no chat_template"):
        chat_format_for(plain)

"""Post-training data: JSONL loaders with bad-row accounting, SFT packing, reward-model rows (Sec 4.1)."""

import json
import random
from pathlib import Path

import pytest
import torch

from language.chat_data import (
    REASONS,
    DataError,
    DataWarning,
    RankedExample,
    first_fit_rows,
    load_chat_jsonl,
    load_preference_jsonl,
    pack_dialogs,
    reward_attention_mask,
    reward_row,
)
from language.chat_format import Message, chat_format_for
from language.packing import IGNORE_INDEX
from language.tokenizer import load_tokenizer, train_bpe


@pytest.fixture(scope="module")
def fmt(tmp_path_factory):
    rng = random.Random(0)
    words = ["what", "is", "the", "answer", "assistant", "user", "system", "hello", "there", "42", "you", "sure"]
    corpus = tmp_path_factory.mktemp("corpus") / "c.txt"
    corpus.write_text("\n".join(" ".join(rng.choices(words, k=10)) for _ in range(2000)))
    return chat_format_for(train_bpe([corpus], 350, tmp_path_factory.mktemp("bpe")))


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(*turns):
    return {"messages": [user(t) if i % 2 == 0 else assistant(t) for i, t in enumerate(turns)]}


# ------------------------------------------------------------------------------------------- loaders

GOOD_CHATS = [chat("hello", "hello there"), chat("what is the answer", "42", "sure", "you sure"),
              {"messages": [{"role": "system", "content": "you"}, user("hi"), assistant("the answer is 42")]},
              chat("is it", "it is"), chat("what", "what is what"), chat("hello you", "hello"),
              chat("42", "the answer"), chat("you", "user"), chat("x", "y")]
BAD_CHATS = {  # line content -> reason
    '{"messages": [': "invalid_json",
    json.dumps({"turns": []}): "malformed",
    json.dumps({"messages": [{"role": "user"}]}): "malformed",
    json.dumps(chat("hello", "   ")): "empty_assistant",
    json.dumps({"messages": [{"role": "wizard", "content": "hi"}, assistant("ok")]}): "unknown_role",
    json.dumps(chat("what " * 200, "ok")): "too_long",
    json.dumps({"messages": [user("hello")]}): "no_assistant",
}


def test_chat_loader_counts_skips_and_names_lines(fmt, tmp_path):
    rows = GOOD_CHATS[:4] + list(BAD_CHATS) + [""] + GOOD_CHATS[4:]  # a blank line is not a row
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    with pytest.warns(DataWarning) as caught:
        dialogs, report = load_chat_jsonl(path, fmt, max_len=128)
    assert (report.kept, report.total) == (len(GOOD_CHATS), len(GOOD_CHATS) + len(BAD_CHATS))
    expected = {r: list(BAD_CHATS.values()).count(r) for r in REASONS}
    assert report.counts == expected
    messages = [str(w.message) for w in caught]
    assert len(messages) == len(BAD_CHATS)
    for lineno, (line, reason) in enumerate(BAD_CHATS.items(), 5):
        assert any(m.startswith(f"{path}:{lineno}: skipped ({reason})") for m in messages), (lineno, reason)
    assert fmt.tokenizer.decode([i for i, m in zip(dialogs[0].ids, dialogs[0].content_mask) if m]) == "hello there"


def test_more_than_half_bad_raises_with_counts(fmt, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", GOOD_CHATS[:3] + ["nope", "{}", json.dumps(chat("a", ""))] + ["[]"])
    with pytest.warns(DataWarning), pytest.raises(DataError) as err:
        load_chat_jsonl(path, fmt, max_len=128)
    assert str(path) in str(err.value) and "4 of 7" in str(err.value)
    assert "invalid_json=1" in str(err.value) and "malformed=2" in str(err.value)
    with pytest.warns(DataWarning):  # the threshold is configurable
        _, report = load_chat_jsonl(path, fmt, max_len=128, max_bad_fraction=0.6)
    assert report.kept == 3


def test_preference_loader(fmt, tmp_path):
    prompt = [user("what is the answer")]
    rows = [
        {"prompt": prompt, "chosen": assistant("42"), "rejected": assistant("hello")},
        {"prompt": prompt, "responses": [assistant("the answer is 42"), assistant("42"), assistant("you")]},
        {"prompt": prompt, "edited": assistant("it is 42"), "chosen": assistant("42"), "rejected": assistant("no")},
        {"prompt": prompt, "chosen": assistant("42"), "rejected": assistant("42")},
        {"prompt": prompt, "responses": [assistant("a"), assistant("b"), assistant("a")]},
        {"prompt": prompt, "chosen": assistant("42")},
        {"prompt": prompt, "chosen": assistant(""), "rejected": assistant("no")},
        {"prompt": [{"role": "robot", "content": "x"}], "chosen": assistant("a"), "rejected": assistant("b")},
        {"prompt": prompt, "chosen": assistant("42 " * 200), "rejected": assistant("no")},
    ]
    path = write_jsonl(tmp_path / "pref.jsonl", rows)
    with pytest.warns(DataWarning) as caught:
        examples, report = load_preference_jsonl(path, fmt, max_len=128, max_bad_fraction=0.9)
    assert (report.kept, report.total) == (3, 9)
    assert {k: v for k, v in report.counts.items() if v} == {
        "duplicate_responses": 2, "malformed": 1, "empty_assistant": 1, "unknown_role": 1, "too_long": 1}
    assert [str(w.message).split(": skipped")[0] for w in caught] == [f"{path}:{i}" for i in range(4, 10)]
    assert [len(e.responses) for e in examples] == [2, 3, 3] and [e.line for e in examples] == [1, 2, 3]
    decode = fmt.tokenizer.decode
    e = examples[2]
    assert fmt.parse(e.prompt.ids)[-1] == Message("assistant", "")  # ends with the generation header
    assert [decode([i for i, m in zip(r.ids, r.content_mask) if m]) for r in e.responses] == ["it is 42", "42", "no"]
    for r in e.responses:  # target = content + <|eot_id|>; content = no header, no closer
        assert r.ids[-1] == fmt.eot_id and r.target_mask[-1] and not r.content_mask[-1]
        assert r.target_mask[:-1] == r.content_mask[:-1] == [True] * (len(r.ids) - 1)
    seq = e.sequence(0)
    assert seq.ids == fmt.render([Message(**m) for m in prompt] + [Message("assistant", "it is 42")]).ids
    assert not any(seq.target_mask[: len(e.prompt.ids)])


# ------------------------------------------------------------------------------------------- SFT packing


def test_first_fit_is_first_fit():
    assert first_fit_rows([5, 6, 3, 2, 4, 1], 8) == [[0, 2], [1, 3], [4, 5]]
    lengths = [random.Random(1).randint(1, 10) for _ in range(200)]
    plan = first_fit_rows(lengths, 16)
    free = []  # naive first fit
    naive: list[list[int]] = []
    for i, n in enumerate(lengths):
        r = next((r for r, f in enumerate(free) if f >= n), None)
        if r is None:
            free.append(16)
            naive.append([])
            r = len(free) - 1
        free[r] -= n
        naive[r].append(i)
    assert plan == naive
    with pytest.raises(ValueError, match="dialog 1 has 17 tokens"):
        first_fit_rows([3, 17], 16)


def test_sft_packing_labels_only_assistant_content_per_dialog(fmt, tmp_path):
    dialogs, _ = load_chat_jsonl(write_jsonl(tmp_path / "sft.jsonl", GOOD_CHATS), fmt, max_len=128)
    seq_len = 48
    batch = pack_dialogs(dialogs, seq_len, pad_id=0)
    assert batch.tokens.shape[1] == seq_len and batch.tokens.shape[0] < len(dialogs)  # rows are shared
    tok = fmt.tokenizer
    seen = {}
    for b in range(batch.tokens.shape[0]):
        tokens, labels, docs, pos = (x[b].tolist() for x in batch.as_dict().values())
        for doc in sorted(set(docs) - {-1}):
            span = [t for t, d in enumerate(docs) if d == doc]
            ids = [tokens[t] for t in span]
            assert [pos[t] for t in span] == list(range(len(span)))  # positions restart
            assert labels[span[-1]] == IGNORE_INDEX  # never across the boundary
            targets = [labels[t] for t in span[:-1]]
            assert all(y in (IGNORE_INDEX, ids[t + 1]) for t, y in enumerate(targets))  # next token
            i = next(k for k, d in enumerate(dialogs) if d.ids == ids and k not in seen)
            seen[i] = [y for y in targets if y != IGNORE_INDEX]
    assert sorted(seen) == list(range(len(dialogs)))
    for i, row in enumerate(GOOD_CHATS):  # decoding the labels gives each assistant turn + its <|eot_id|>
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert tok.decode(seen[i]) == "".join(a + "<|eot_id|>" for a in answers)
    assert all(x.equal(y) for x, y in zip(batch.as_dict().values(), pack_dialogs(dialogs, seq_len).as_dict().values()))
    with pytest.raises(ValueError, match="dialog"):
        pack_dialogs(dialogs, 8)


# ------------------------------------------------------------------------------------------- reward rows


@pytest.fixture(scope="module")
def ranked(fmt, tmp_path_factory) -> list[RankedExample]:
    rows = [{"prompt": [user("what is the answer")],
             "responses": [assistant("the answer is 42"), assistant("42"), assistant("you")]},
            {"prompt": [user("hello")], "chosen": assistant("hello there"), "rejected": assistant("what")}]
    examples, _ = load_preference_jsonl(write_jsonl(tmp_path_factory.mktemp("rm") / "r.jsonl", rows), fmt, max_len=64)
    return examples


def test_reward_row_layout(ranked):
    orders = set()
    for seed in range(12):
        for e in ranked:
            row = reward_row(e, shuffle_seed=(seed, 0))
            p, k = len(e.prompt.ids), len(e.responses)
            tokens, seg, pos = row["tokens"].tolist(), row["segment_ids"].tolist(), row["positions"].tolist()
            assert len(tokens) == len(seg) == len(pos) == e.reward_length
            assert tokens[:p] == e.prompt.ids and seg[:p] == [0] * p and pos[:p] == list(range(p))
            assert sorted(row["rank"].tolist()) == list(range(k))
            for s in range(1, k + 1):
                span = [t for t, x in enumerate(seg) if x == s]
                assert span == list(range(span[0], span[-1] + 1))  # contiguous
                assert [tokens[t] for t in span] == e.responses[row["rank"][s - 1]].ids  # rank recovers the order
                assert [pos[t] for t in span] == list(range(p, p + len(span)))  # continues after the prompt
                assert row["end_index"][s - 1] == span[-1]
            if k == 3:
                orders.add(tuple(row["rank"].tolist()))
    assert len(orders) > 1  # actually shuffled
    again = reward_row(ranked[0], shuffle_seed=(3, 0))
    assert again["rank"].equal(reward_row(ranked[0], shuffle_seed=(3, 0))["rank"])  # deterministic


def test_reward_attention_mask_is_the_rule(ranked):
    seg = reward_row(ranked[0], shuffle_seed=5)["segment_ids"]
    mask = reward_attention_mask(seg)
    t = len(seg)
    expected = torch.tensor([[j <= i and (seg[j] == 0 or seg[j] == seg[i]) for j in range(t)] for i in range(t)])
    assert mask.dtype == torch.bool and mask.equal(expected)
    assert reward_attention_mask(torch.stack([seg, seg])).equal(torch.stack([expected, expected]))  # batched


# ------------------------------------------------------------------------------------------- SmolLM2 template


def test_smollm2_template_rows(tmp_path, smollm2_gguf):
    fmt = chat_format_for(load_tokenizer(smollm2_gguf))
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": [user("What is 2+2?")], "chosen": assistant("4"), "rejected": assistant("5")},
        {"prompt": [user("Hi")], "chosen": assistant("Hello!"), "rejected": assistant("Hello!")}])
    with pytest.warns(DataWarning, match=f"{path}:2: skipped \\(duplicate_responses\\)"):
        (e,), report = load_preference_jsonl(path, fmt, max_len=256)
    decode = fmt.tokenizer.decode
    assert [decode([i for i, m in zip(r.ids, r.content_mask) if m]) for r in e.responses] == ["4", "5"]
    assert all(decode([i for i, m in zip(r.ids, r.target_mask) if m]) in ("4<|im_end|>", "5<|im_end|>")
               for r in e.responses)
    chats = write_jsonl(tmp_path / "c.jsonl", [chat("What is 2+2?", "4", "And 3+3?", "6")])
    dialogs, _ = load_chat_jsonl(chats, fmt, max_len=256)
    batch = pack_dialogs(dialogs, 128, pad_id=0)
    assert decode([y for y in batch.labels[0].tolist() if y != IGNORE_INDEX]) == "4<|im_end|>6<|im_end|>"

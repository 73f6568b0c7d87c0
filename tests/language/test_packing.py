"""Document packing: masks never cross documents, positions restart, rows are a pure function of
(seed, step), and the stream continues exactly across seq_len / batch-size changes."""
import random

import numpy as np
import pytest
import torch

from language.packing import IGNORE_INDEX, PAD_DOC_ID, PackedDataset, encode_documents, eval_batches

BOS, EOS, PAD = 1, 2, 0


def make_docs(n_docs=40, max_len=50, seed=0):
    """Documents bos + body + eos whose body tokens are unique across the corpus (ids >= 3)."""
    rng = random.Random(seed)
    docs, next_id = [], 3
    for _ in range(n_docs):
        n = rng.randrange(0, max_len)
        docs.append([BOS] + list(range(next_id, next_id + n)) + [EOS])
        next_id += n
    return docs


def stream(ds, epoch):
    return [t for i in ds.epoch_order(epoch) for t in ds.flat[ds.offsets[i]:ds.offsets[i] + ds.lengths[i]]]


def row_tokens(batch):
    """Per row, the non-padding tokens."""
    return [batch.tokens[r][batch.doc_ids[r] != PAD_DOC_ID].tolist() for r in range(batch.tokens.shape[0])]


def check_invariants(b, seq_len):
    tokens, labels, doc_ids, positions = b.tokens, b.labels, b.doc_ids, b.positions
    assert tokens.shape[1] == seq_len and all(x.dtype == torch.long for x in (tokens, labels, doc_ids, positions))
    for r in range(tokens.shape[0]):
        d, p, lab, tok = doc_ids[r].tolist(), positions[r].tolist(), labels[r].tolist(), tokens[r].tolist()
        assert lab[-1] == IGNORE_INDEX
        n_real = sum(x != PAD_DOC_ID for x in d)
        assert all(x == PAD_DOC_ID for x in d[n_real:]), "padding only at the end of a row"
        assert all(t == PAD for t in tok[n_real:]) and all(x == IGNORE_INDEX for x in lab[n_real:])
        assert d[0] == 0 and p[0] == 0
        for t in range(1, n_real):
            if d[t] == d[t - 1]:
                assert p[t] == p[t - 1] + 1
            else:  # a new document: next id, position restarts, previous token has no target
                assert d[t] == d[t - 1] + 1 and p[t] == 0 and lab[t - 1] == IGNORE_INDEX
        for t in range(seq_len - 1):
            if lab[t] != IGNORE_INDEX:  # a target is always the next token of the same document
                assert d[t + 1] == d[t] != PAD_DOC_ID and lab[t] == tok[t + 1]
        # every same-document next token is a target
        assert sum(x != IGNORE_INDEX for x in lab) == sum(d[t] == d[t + 1] != PAD_DOC_ID for t in range(seq_len - 1))


@pytest.mark.parametrize("seq_len", [8, 16, 64])
def test_invariants_and_one_epoch_is_the_stream(seq_len):
    docs = make_docs()
    ds = PackedDataset(docs, seq_len, seed=3, pad_id=PAD)
    got, step = [], 0
    while True:
        b = ds.batch(step, 4)
        check_invariants(b, seq_len)
        got += [t for row in row_tokens(b) for t in row]
        step += 1
        if b.next_cursor >= ds.n_tokens:
            break
    assert got[:ds.n_tokens] == stream(ds, 0)  # every token of the epoch once, in order


def test_short_documents_are_never_cut():
    rng, docs, next_id = random.Random(1), [], 3
    for _ in range(60):  # every token id unique, so a piece names its document
        n = rng.randrange(1, 40)
        docs.append(list(range(next_id, next_id + n)))
        next_id += n
    owner = {t: i for i, d in enumerate(docs) for t in d}
    seq_len = 24
    ds = PackedDataset(docs, seq_len, seed=0)
    pieces = {}
    for step in range(40):
        b = ds.batch(step, 2)
        for r in range(2):
            for k in set(b.doc_ids[r].tolist()) - {PAD_DOC_ID}:
                piece = b.tokens[r][b.doc_ids[r] == k].tolist()
                pieces.setdefault(owner[piece[0]], []).append(piece)
    short = [i for i in pieces if len(docs[i]) <= seq_len]
    assert len(short) > 20
    for i in short:
        assert pieces[i][0] == docs[i]  # its first appearance is the whole document
    assert any(len(docs[i]) > seq_len and len(pieces[i]) > 1 for i in pieces)  # long ones are cut
    assert any(ds.batch(s, 2).n_pad for s in range(40))


def test_long_documents_are_split_into_masked_chunks():
    docs = [[BOS] + list(range(3, 103)) + [EOS]]  # 102 tokens, seq_len 16 -> chunks
    ds = PackedDataset(docs, 16, seed=0, shuffle=False)
    b = ds.batch(0, 7)
    check_invariants(b, 16)
    assert [t for row in row_tokens(b) for t in row][:102] == docs[0]
    assert (b.positions[:, 0] == 0).all()


def test_whole_short_docs_false_fills_rows():
    docs = make_docs()
    ds = PackedDataset(docs, 16, seed=1, whole_short_docs=False)
    for step in range(10):
        b = ds.batch(step, 3)
        check_invariants(b, 16)
        assert b.n_pad == 0


def test_same_seed_and_step_give_the_same_batch_in_any_order():
    docs = make_docs()
    a = PackedDataset(docs, 16, seed=7)
    b = PackedDataset(docs, 16, seed=7)
    first = [a.batch(s, 4) for s in range(12)]
    assert torch.equal(b.batch(11, 4).tokens, first[11].tokens)  # b starts at step 11: no iterator state
    assert torch.equal(b.batch(3, 4).labels, first[3].labels)
    c = PackedDataset(docs, 16, seed=8)
    assert not torch.equal(c.batch(0, 4).tokens, first[0].tokens)


def test_epochs_reshuffle_and_cover_all_documents():
    docs = make_docs(n_docs=30)
    ds = PackedDataset(docs, 16, seed=0)
    o0, o1 = ds.epoch_order(0), ds.epoch_order(1)
    assert sorted(o0.tolist()) == sorted(o1.tolist()) == list(range(30)) and not np.array_equal(o0, o1)
    got, start = [], ds.n_tokens  # walk epoch 1 from its first token
    while start < 2 * ds.n_tokens:
        b = ds.batch_at(start, 4)
        got += [t for row in row_tokens(b) for t in row]
        start = b.next_cursor
    assert got[:ds.n_tokens] == stream(ds, 1)


def test_batch_size_ramp_and_batch_at_agree_with_rows():
    docs = make_docs()
    ds = PackedDataset(docs, 16, seed=2)
    whole = ds.rows(0, 12)
    ramp = [ds.rows(0, 2), ds.rows(2, 4), ds.rows(6, 6)]  # batch sizes 2, 4, 6
    assert torch.equal(torch.cat([r.tokens for r in ramp]), whole.tokens)
    assert torch.equal(torch.cat([r.doc_ids for r in ramp]), whole.doc_ids)
    fresh = PackedDataset(docs, 16, seed=2)
    at = fresh.batch_at(ds.cursor_at_row(5), 3)
    assert torch.equal(at.tokens, ds.rows(5, 3).tokens) and at.next_cursor == ds.cursor_at_row(8)
    assert ds.cursor_after(3, 4) == ds.cursor_at_row(12) == whole.next_cursor


def test_changing_seq_len_continues_the_stream_exactly():
    docs = make_docs()
    short = PackedDataset(docs, 16, seed=5)
    got = [t for s in range(3) for row in row_tokens(short.batch(s, 4)) for t in row]
    cursor = short.cursor_after(3, 4)
    assert len(got) == cursor
    long = PackedDataset(docs, 40, seed=5, start_cursor=cursor)
    b = long.batch(0, 4)
    check_invariants(b, 40)
    assert b.cursor == cursor
    got += [t for s in range(5) for row in row_tokens(long.batch(s, 4)) for t in row]
    full = stream(short, 0) + stream(short, 1)
    assert got == full[:len(got)]
    # recomputing the stage-2 start from the schedule gives the same batches (resume from a step number)
    again = PackedDataset(docs, 40, seed=5, start_cursor=PackedDataset(docs, 16, seed=5).cursor_after(3, 4))
    assert torch.equal(again.batch(4, 4).tokens, long.batch(4, 4).tokens)


def test_eval_batches_cover_documents_once_in_order():
    docs = make_docs(n_docs=25)
    batches = eval_batches(docs, 32, 3)
    got = []
    for b in batches:
        check_invariants(b, 32)
        got += [t for row in row_tokens(b) for t in row]
    assert got == [t for d in docs for t in d]
    assert batches[-1].next_cursor == sum(len(d) for d in docs)


def test_errors():
    docs = [[1, 5, 5, 2], [1, 7, 2]]
    ds = PackedDataset(docs, 4)
    with pytest.raises(ValueError, match="empty"):
        PackedDataset([[1, 2], []], 4)
    with pytest.raises(ValueError, match="seq_len"):
        PackedDataset(docs, 1)
    with pytest.raises(ValueError, match="batch_size"):
        ds.batch(0, 0)


def test_encode_documents_adds_bos_and_eos():
    class Tok:
        bos_id, eos_id = 256, 257

        def encode(self, text, *, bos=False, eos=False, allow_special=False):
            return [self.bos_id] * bos + list(text.encode()) + [self.eos_id] * eos

    class Doc:
        text = "hi"

    assert encode_documents(Tok(), ["ab", Doc()]) == [[256, 97, 98, 257], [256, 104, 105, 257]]

"""Needle in a haystack: exact lengths and depths, held-out names, exact-retrieval scoring
(a copying oracle scores 1.0, random logits ~0), and the heatmap."""
import random
import re

import pytest
import torch

from language.niah import (NiahExample, evaluate_niah, is_eval_name, is_name_shaped, make_niah_examples,
                           make_niah_training_docs, needle_text, plot_niah_heatmap, question_text, sample_names)


class ByteTokenizer:
    """Stand-in for language.tokenizer.Tokenizer: bytes 0-255, then bos, eos, pad."""
    vocab_size, bos_id, eos_id, pad_id = 259, 256, 257, 258

    def encode(self, text, *, bos=False, eos=False, allow_special=False):
        return [self.bos_id] * bos + list(text.encode("utf-8")) + [self.eos_id] * eos

    def decode(self, ids, *, skip_special=False):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


WORDS = ("the king and queen of a fair country walk by night to see what stars may tell of love war and "
         "fortune while soldiers sing").split()


def haystack_texts(n_docs=6, seed=0):
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        paras = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(20, 60))).capitalize() + "."
                 for _ in range(8)]
        docs.append("\n\n".join(paras))
    return docs


def induction_oracle(vocab, k):
    """Predicts the token that followed the previous occurrence of the last k tokens: copies the needle."""
    def fn(tokens, positions, doc_ids):
        b, t = tokens.shape
        logits = torch.zeros(b, t, vocab)
        for r in range(b):
            seq, last = tokens[r].tolist(), {}
            for i in range(k - 1, t):
                key = tuple(seq[i - k + 1:i + 1])
                if key in last:
                    logits[r, i, seq[last[key] + 1]] = 1.0
                last[key] = i
        return logits
    return fn


def random_logits(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return lambda tokens, positions, doc_ids: torch.randn(*tokens.shape, vocab, generator=g)


LENGTHS, DEPTHS = [160, 256, 400], [0.0, 0.25, 0.5, 0.75, 1.0]


def test_examples_have_exact_length_depth_and_needle():
    tok = ByteTokenizer()
    examples = make_niah_examples(tok, haystack_texts(), LENGTHS, DEPTHS, n_per_cell=2, seed=0)
    assert len(examples) == len(LENGTHS) * len(DEPTHS) * 2
    for ex in examples:
        assert len(ex.tokens) == ex.length and ex.tokens[0] == tok.bos_id
        assert abs(ex.actual_depth - ex.depth) <= 1.0 / ex.haystack_len
        before, after = needle_text(ex.name)
        assert tok.decode(ex.tokens[ex.needle_start:ex.needle_end]) == f"{before} {ex.number}{after}"
        assert tok.decode(ex.tokens[ex.question_start:ex.answer_start]) == question_text(ex.name)
        assert tok.decode(ex.tokens[ex.answer_start:]) == f" {ex.number}" and 1000 <= ex.number <= 9999
        assert is_name_shaped(ex.name) and is_eval_name(ex.name)
        text = tok.decode(ex.tokens)
        assert text.count(ex.name) == 3 and text.count(str(ex.number)) == 2  # needle + 2x question; needle + answer
    assert len({ex.name for ex in examples}) == len(examples)
    again = make_niah_examples(tok, haystack_texts(), LENGTHS, DEPTHS, n_per_cell=2, seed=0)
    assert [e.tokens for e in again] == [e.tokens for e in examples]
    other = make_niah_examples(tok, haystack_texts(), LENGTHS, DEPTHS, n_per_cell=2, seed=1)
    assert [e.tokens for e in other] != [e.tokens for e in examples]


def test_bad_grid_and_too_short_length_are_errors():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="too short"):
        make_niah_examples(tok, haystack_texts(), [50], [0.5], 1)
    with pytest.raises(ValueError, match="depths"):
        make_niah_examples(tok, haystack_texts(), [200], [1.5], 1)
    with pytest.raises(ValueError, match="empty"):
        make_niah_examples(tok, ["", "  "], [200], [0.5], 1)


def test_training_docs_use_held_out_names_only():
    tok = ByteTokenizer()
    rng = random.Random(0)
    eval_names, train_names = sample_names(rng, "eval", 500), sample_names(rng, "train", 500)
    assert all(map(is_eval_name, eval_names)) and not any(map(is_eval_name, train_names))
    with pytest.raises(ValueError, match="split"):
        sample_names(rng, "test", 1)
    # a train haystack that mentions an eval name: that paragraph must not reach a training doc
    leak = eval_names[0]
    hay = haystack_texts(seed=3) + [f"A paragraph about {leak} and the king.\n\nAnother about the queen."]
    docs = make_niah_training_docs(tok, hay, 300, min_tokens=150, max_tokens=300, seed=0)
    used = set()
    for d in docs:
        assert d[0] == tok.bos_id and d[-1] == tok.eos_id and 150 <= len(d) <= 300
        text = tok.decode(d)
        assert not any(is_eval_name(w) for w in re.findall(r"[A-Za-z]+", text) if is_name_shaped(w))
        used.add(re.search(r"magic number of (\w+) is", text).group(1))
    assert leak not in "".join(tok.decode(d) for d in docs) and len(used) > 250
    # and the eval examples never use a name a training doc used
    examples = make_niah_examples(tok, haystack_texts(), [200], [0.5], n_per_cell=50, seed=0)
    assert not {ex.name for ex in examples} & used


def test_training_doc_lengths_span_the_range_and_fit():
    tok = ByteTokenizer()
    docs = make_niah_training_docs(tok, haystack_texts(), 400, max_tokens=1024, seed=1)
    lengths = sorted(len(d) for d in docs)
    assert lengths[-1] <= 1024 and lengths[0] >= 128  # default min: max_tokens // 8
    assert lengths[len(lengths) // 2] < 600  # log-uniform: the median is well below the middle
    with pytest.raises(ValueError, match="too short"):
        make_niah_training_docs(tok, haystack_texts(), 3, max_tokens=100)
    assert make_niah_training_docs(tok, haystack_texts(), 5, max_tokens=512, seed=4) == \
        make_niah_training_docs(tok, haystack_texts(), 5, max_tokens=512, seed=4)


def test_oracle_retrieves_everything_and_random_nothing(tmp_path):
    tok = ByteTokenizer()
    examples = make_niah_examples(tok, haystack_texts(), LENGTHS, DEPTHS, n_per_cell=2, seed=0)
    oracle = evaluate_niah(induction_oracle(tok.vocab_size, k=12), examples, tok, batch_size=4)
    assert oracle.lengths == LENGTHS and oracle.depths == DEPTHS
    assert oracle.mean_accuracy == 1.0 and all(a == 1.0 for row in oracle.accuracy for a in row)
    assert all(c == 2 for row in oracle.counts for c in row)
    assert oracle.samples and oracle.samples[0]["expected"] == oracle.samples[0]["predicted"]
    rand = evaluate_niah(random_logits(tok.vocab_size), examples, tok)
    assert rand.mean_accuracy < 0.05
    png = plot_niah_heatmap(oracle, tmp_path / "plots" / "niah.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert set(oracle.to_dict()) >= {"lengths", "depths", "accuracy", "counts", "mean_accuracy"}


def test_a_real_bpe_tokenizer_gives_exact_lengths_and_copyable_answers():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = haystack_texts(seed=5) + [needle_text("Bavin")[0] + " 1234.\n" + question_text("Bavin")]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))

    class Wrapped:
        vocab_size, bos_id, eos_id = bpe.get_vocab_size(), bpe.token_to_id("<s>"), bpe.token_to_id("</s>")

        def encode(self, text, *, bos=False, eos=False, allow_special=False):
            return [self.bos_id] * bos + bpe.encode(text).ids + [self.eos_id] * eos

        def decode(self, ids, *, skip_special=False):
            return bpe.decode(ids)

    tok = Wrapped()
    examples = make_niah_examples(tok, haystack_texts(), [96, 128], [0.0, 0.5, 1.0], n_per_cell=2, seed=0)
    assert all(len(ex.tokens) == ex.length for ex in examples)
    assert all(abs(ex.actual_depth - ex.depth) <= 1.0 / ex.haystack_len for ex in examples)
    assert evaluate_niah(induction_oracle(tok.vocab_size, k=4), examples).mean_accuracy == 1.0


def test_module_models_are_put_in_eval_mode_and_restored():
    tok = ByteTokenizer()
    oracle = induction_oracle(tok.vocab_size, k=12)

    class Wrapper(torch.nn.Module):
        def forward(self, tokens, *, positions=None, doc_ids=None):
            assert not self.training
            return oracle(tokens, positions, doc_ids)

    m = Wrapper().train()
    examples = make_niah_examples(tok, haystack_texts(), [200], [0.5], n_per_cell=3, seed=2)
    assert evaluate_niah(m, examples).mean_accuracy == 1.0 and m.training
    assert isinstance(examples[0], NiahExample)

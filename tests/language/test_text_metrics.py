"""Perplexity (token-weighted, -100 ignored) and the add-one unigram baseline on the same targets."""
import math

import pytest
import torch
from torch import nn

from language.packing import PackedDataset, eval_batches
from language.text_metrics import logits_of, perplexity, target_counts, unigram_baseline_perplexity


def uniform_logits_fn(vocab):
    return lambda tokens, positions, doc_ids: torch.zeros(*tokens.shape, vocab)


def docs(n=12, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g).tolist() + [2]
            for _ in range(n)]


# perplexity sums a batch's n float32 token NLLs of ~log(50) = 3.9 (n <= 300 here): rounding <= n * u * 3.9 <= 7e-5
# of the mean NLL, the same relative error after exp; a token-weighting or off-by-one bug is off by >= 1e-2
PPL_RTOL = 1e-4


def test_uniform_model_perplexity_is_vocab_size():
    batches = eval_batches(docs(), 16, 4)
    assert perplexity(uniform_logits_fn(50), batches) == pytest.approx(50.0, rel=PPL_RTOL)
    batch = PackedDataset(docs(), 8, seed=1).batch(3, 2)
    assert perplexity(uniform_logits_fn(50), [batch]) == pytest.approx(50.0, rel=PPL_RTOL)


def test_perplexity_is_token_weighted_and_ignores_minus_100():
    vocab = 4
    # a model that gives the true next token probability 1/2 in batch A and 1/4 (uniform) in batch B
    def fn(tokens, positions, doc_ids):
        logits = torch.zeros(*tokens.shape, vocab)
        if tokens[0, 0] == 0:  # batch A: next token is always 1, give it logit log(3) -> p = 3/6 = 1/2
            logits[..., 1] = math.log(3.0)
        return logits

    a = {"tokens": torch.zeros(1, 4, dtype=torch.long), "labels": torch.tensor([[1, 1, 1, -100]])}  # 3 targets
    b = {"tokens": torch.ones(1, 4, dtype=torch.long), "labels": torch.tensor([[2, -100, -100, -100]])}  # 1 target
    expected = math.exp((3 * math.log(2) + math.log(4)) / 4)
    # 4 float32 NLLs (logsumexp < 2, ulp 1.2e-7): off by ~2e-7 each; the mean of means is off by 19%
    assert perplexity(fn, [a, b]) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="no targets"):
        perplexity(fn, [{"tokens": a["tokens"], "labels": torch.full((1, 4), -100)}])


def test_module_models_get_keywords_and_keep_their_mode():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 50)
            self.seen = None

        def forward(self, tokens, *, positions=None, doc_ids=None):
            self.seen = (positions is not None, doc_ids is not None, self.training)
            return torch.zeros(*tokens.shape, 50) + 0 * self.emb(tokens).sum()

    m = Tiny().train()
    assert perplexity(m, eval_batches(docs(), 16, 4)) == pytest.approx(50.0, rel=PPL_RTOL)
    assert m.seen == (True, True, False) and m.training
    with pytest.raises(ValueError, match="expected logits"):
        logits_of(lambda t, p, d: torch.zeros(2, 3), torch.zeros(1, 4, dtype=torch.long), None, None)


def test_unigram_baseline_on_a_known_example():
    # train targets (all but bos=0): 3, 3, 4, 1 -> counts over vocab 5: [0, 1, 0, 2, 1], N = 4
    train = [[0, 3, 3, 4, 1]]
    assert target_counts(train, 5).tolist() == [0, 1, 0, 2, 1]
    # val targets 3, 4: p = 3/9 and 2/9
    ppl = unigram_baseline_perplexity(train, [[0, 3, 4]], 5)
    assert ppl == pytest.approx(math.exp(-(math.log(3 / 9) + math.log(2 / 9)) / 2))
    # a uniform train set gives a baseline of exactly the vocab size
    assert unigram_baseline_perplexity([[0, 0, 1, 2, 3, 4]], [[0, 2, 2, 1]], 5) == pytest.approx(5.0)


def test_unigram_baseline_matches_a_unigram_model_scored_by_perplexity():
    vocab, seq_len = 50, 16
    train, val = docs(20, seed=1), docs(15, seed=2)
    counts = torch.tensor(target_counts(train, vocab), dtype=torch.float64)
    logp = torch.log((counts + 1) / (counts.sum() + vocab)).float()
    unigram_model = lambda tokens, positions, doc_ids: logp.expand(*tokens.shape, vocab)
    model_ppl = perplexity(unigram_model, eval_batches(val, seq_len, 4))
    # float64 counts against the float32 model's perplexity (logp rounded to float32, float32 sums): PPL_RTOL
    assert unigram_baseline_perplexity(train, val, vocab, seq_len=seq_len) == pytest.approx(model_ppl, rel=PPL_RTOL)
    # without seq_len every val target counts (no cut documents): a slightly different number (1.1% here)
    assert unigram_baseline_perplexity(train, val, vocab) == pytest.approx(
        perplexity(unigram_model, eval_batches(val, 1000, 4)), rel=PPL_RTOL)

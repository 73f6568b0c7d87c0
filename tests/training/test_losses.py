"""Post-training losses against slow references written with Python loops, math.log and explicit softmax."""

import math

import pytest
import torch
from torch import nn

from training import losses
from training.losses import (bradley_terry_loss, dpo_loss, dpo_objective, pairwise_accuracy, sequence_logprobs,
                             sft_loss, token_logprobs)



@pytest.fixture(autouse=True)
def _float64_default():
    """References loop in float64 (so do the inputs); restored for the other test modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# ---------------------------------------------------------------- slow references (loops, torch scalars)

def ref_token_logprobs(logits, labels):
    batch, time, vocab = logits.shape
    rows = []
    for b in range(batch):
        row = []
        for t in range(time):
            y = int(labels[b, t])
            if y == -100:
                row.append(logits[b, t, 0] * 0)
                continue
            exps = [torch.exp(logits[b, t, v]) for v in range(vocab)]
            row.append(torch.log(exps[y] / sum(exps)))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def ref_sequence_logprobs(logits, labels, mask):
    lp = ref_token_logprobs(logits, labels)
    return torch.stack([sum(lp[b, t] for t in range(lp.shape[1]) if mask[b, t]) + lp[b, 0] * 0
                        for b in range(lp.shape[0])])


def log_sigmoid(x):
    return -torch.log(1 + torch.exp(-x))


def ref_bradley_terry(rewards, valid, reward_penalty=0.0):
    total, pairs = rewards.sum() * 0, 0
    for n in range(rewards.shape[0]):
        for i in range(rewards.shape[1]):
            if valid[n, i]:
                total = total + reward_penalty * rewards[n, i] ** 2
            for j in range(i + 1, rewards.shape[1]):
                if valid[n, i] and valid[n, j]:
                    total = total - log_sigmoid(rewards[n, i] - rewards[n, j])
                    pairs += 1
    return total, pairs


def ref_dpo(pc, pr, rc, rr, beta):
    return torch.stack([-log_sigmoid(beta * ((pc[b] - rc[b]) - (pr[b] - rr[b]))) for b in range(len(pc))])


# ---------------------------------------------------------------- fixtures

class TinyLM(nn.Module):
    """Embedding + linear: enough for gradients to flow into real parameters."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, vocab)

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens)))


def random_labels(gen, batch, time, vocab, p_ignore=0.3):
    labels = torch.randint(0, vocab, (batch, time), generator=gen)
    labels[torch.rand(batch, time, generator=gen) < p_ignore] = -100
    labels[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)   # every row has a label
    return labels


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def run_model(model, tokens, fn):
    model.zero_grad()
    out = fn(model(tokens))
    out.backward()
    return out.detach(), grads(model)


def assert_close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               rtol=tol, atol=tol)


# ---------------------------------------------------------------- token / sequence log-probs, SFT

@pytest.mark.parametrize("chunk", [losses.CHUNK_ELEMENTS, 14])   # default; 2 rows per chunk + a tail
def test_token_logprobs_values_and_grads(monkeypatch, chunk):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=gen) * 3
    labels = random_labels(gen, 3, 5, 7)
    fast_in, slow_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    fast, slow = token_logprobs(fast_in, labels), ref_token_logprobs(slow_in, labels)
    assert fast.dtype == torch.float64 and fast.shape == (3, 5)
    assert_close(fast, slow)
    assert (fast[labels == -100] == 0).all()
    weights = torch.randn(3, 5, generator=gen)
    (fast * weights).sum().backward()
    (slow * weights).sum().backward()
    assert_close(fast_in.grad, slow_in.grad)
    assert (fast_in.grad[labels == -100] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_token_logprobs_low_precision_is_float32_and_grad_keeps_dtype(dtype):
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 4, 9, generator=gen) * 2).to(dtype).requires_grad_()
    labels = random_labels(gen, 2, 4, 9)
    out = token_logprobs(logits, labels)
    assert out.dtype == torch.float32
    assert_close(out, ref_token_logprobs(logits.detach().double(), labels), tol=1e-5)
    out.sum().backward()
    assert logits.grad.dtype == dtype
    slow_in = logits.detach().double().requires_grad_()
    ref_token_logprobs(slow_in, labels).sum().backward()
    # grad = onehot - exp(x - lse) in float32, |x|, |lse| < 16: rounding x - lse (ulp <= 1e-6) is a relative error
    # of p, so up to ~1e-6 absolute; bf16: the result's own rounding, <= 2**-8 relative
    assert_close(logits.grad.double(), slow_in.grad, tol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_token_logprobs_saves_no_float32_copy_of_the_logits():
    logits = torch.randn(4, 8, 50).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 50, (4, 8))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        token_logprobs(logits, labels).sum().backward()
    wide = [t for t in saved if t.dtype in (torch.float32, torch.float64)]
    assert wide and max(t.numel() for t in wide) <= 4 * 8        # per-row logsumexp / mask only


def test_token_logprobs_noncontiguous_logits():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 5, generator=gen)
    labels = random_labels(gen, 2, 5, 5)
    assert_close(token_logprobs(logits[:, :-1], labels), ref_token_logprobs(logits[:, :-1], labels))


def test_sft_loss_tiny_model_values_and_grads():
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = TinyLM()
    tokens = torch.randint(0, 11, (3, 6), generator=gen)
    labels = random_labels(gen, 3, 6, 11)
    n_tokens = sft_loss(model(tokens), labels)[1]
    assert n_tokens.item() == (labels != -100).sum().item()
    fast, g_fast = run_model(model, tokens, lambda lg: sft_loss(lg, labels)[0])
    slow, g_slow = run_model(model, tokens, lambda lg: -ref_token_logprobs(lg, labels).sum())
    assert_close(fast, slow)
    for a, b in zip(g_fast, g_slow):
        assert_close(a, b)
    # the engine's convention matches torch's mean cross-entropy
    ce = nn.functional.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert_close(fast / n_tokens, ce)


def test_sequence_logprobs_tiny_model_and_mask():
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    model = TinyLM()
    tokens = torch.randint(0, 11, (3, 6), generator=gen)
    labels = random_labels(gen, 3, 6, 11, p_ignore=0.0)
    mask = torch.rand(3, 6, generator=gen) < 0.6
    mask[:, 1] = True
    weights = torch.arange(1., 4)
    fast, g_fast = run_model(model, tokens, lambda lg: (sequence_logprobs(lg, labels, mask) * weights).sum())
    slow, g_slow = run_model(model, tokens, lambda lg: (ref_sequence_logprobs(lg, labels, mask) * weights).sum())
    assert_close(fast, slow)
    for a, b in zip(g_fast, g_slow):
        assert_close(a, b)
    # changing logits where the mask is off changes nothing
    logits = torch.randn(3, 6, 11, generator=gen)
    changed = logits.clone()
    changed[~mask] += torch.randn(int((~mask).sum()), 11, generator=gen) * 5
    assert torch.equal(sequence_logprobs(logits, labels, mask), sequence_logprobs(changed, labels, mask))


def test_ignored_positions_change_nothing():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 5, 6, generator=gen)
    labels = random_labels(gen, 2, 5, 6, p_ignore=0.5)
    changed = logits.clone()
    changed[labels == -100] = torch.randn(int((labels == -100).sum()), 6, generator=gen) * 10
    assert torch.equal(sft_loss(logits, labels)[0], sft_loss(changed, labels)[0])


def test_logprob_shape_and_label_errors():
    logits, labels = torch.randn(2, 4, 5), torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"labels must have shape .*\(2, 4\).*\(2, 3\)"):
        token_logprobs(logits, labels[:, :3])
    with pytest.raises(ValueError, match=r"logits must have shape \(B, T, V\)"):
        token_logprobs(logits[0], labels)
    with pytest.raises(ValueError, match="outside"):
        token_logprobs(logits, torch.full((2, 4), 5))
    with pytest.raises(ValueError, match="int64"):
        token_logprobs(logits, labels.float())
    with pytest.raises(ValueError, match=r"mask must have shape"):
        sequence_logprobs(logits, labels, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        sequence_logprobs(logits, labels, torch.ones(2, 4))
    with pytest.raises(ValueError, match="-100"):
        sequence_logprobs(logits, torch.full((2, 4), -100), torch.ones(2, 4, dtype=torch.bool))


# ---------------------------------------------------------------- Bradley-Terry reward model

class TinyRM(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.score = nn.Linear(4, 5), nn.Linear(5, 1)

    def forward(self, x):                                   # (N, K, 4) -> (N, K)
        return self.score(torch.tanh(self.body(x))).squeeze(-1)


@pytest.mark.parametrize("penalty", [0.0, 0.01])
def test_bradley_terry_k3_with_a_two_response_row(penalty):
    torch.manual_seed(6)
    model = TinyRM()
    x = torch.randn(4, 3, 4)
    valid = torch.ones(4, 3, dtype=torch.bool)
    valid[1, 0] = False          # no edited response: chosen > rejected only
    valid[3, 2] = False
    model.zero_grad()
    fast, n_pairs = bradley_terry_loss(model(x), valid, reward_penalty=penalty)
    fast.backward()
    g_fast = grads(model)
    model.zero_grad()
    slow, slow_pairs = ref_bradley_terry(model(x), valid, penalty)
    slow.backward()
    assert n_pairs.item() == slow_pairs == 3 + 1 + 3 + 1
    assert_close(fast, slow)
    for a, b in zip(g_fast, grads(model)):
        assert_close(a, b)


def test_bradley_terry_k2_defaults_and_invalid_rewards_ignored():
    rewards = torch.tensor([[2.0, -1.0], [0.5, 0.5]])
    loss, n = bradley_terry_loss(rewards)
    assert n.item() == 2
    assert_close(loss, -math.log(1 / (1 + math.exp(-3.0))) + math.log(2))
    r3 = torch.tensor([[1.0, 0.0, 123.0]])
    valid = torch.tensor([[True, True, False]])
    assert torch.equal(bradley_terry_loss(r3, valid, reward_penalty=0.1)[0],
                       bradley_terry_loss(r3[:, :2], reward_penalty=0.1)[0])


def test_pairwise_accuracy():
    rewards = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 0.0], [5.0, 5.0, 9.0]])
    valid = torch.tensor([[True, True, True], [True, True, True], [False, True, True]])
    correct, pairs = pairwise_accuracy(rewards, valid)
    assert (correct.item(), pairs.item()) == (3 + 2 + 0, 3 + 3 + 1)


def test_bradley_terry_errors():
    with pytest.raises(ValueError, match=r"rewards must have shape \(N, K\) with K >= 2"):
        bradley_terry_loss(torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"valid must have shape .*\(3, 2\).*\(3, 3\)"):
        bradley_terry_loss(torch.zeros(3, 2), torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        pairwise_accuracy(torch.zeros(3, 2), torch.ones(3, 2))


# ---------------------------------------------------------------- DPO

def dpo_inputs(gen, batch=5):
    return [torch.randn(batch, generator=gen) * 4 - 20 for _ in range(4)]


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_loss_values_grads_and_beta(beta):
    gen = torch.Generator().manual_seed(7)
    pc, pr, rc, rr = dpo_inputs(gen)
    fast_in = [t.clone().requires_grad_() for t in (pc, pr)]
    slow_in = [t.clone().requires_grad_() for t in (pc, pr)]
    fast = dpo_loss(*fast_in, rc, rr, beta=beta)
    slow = ref_dpo(*slow_in, rc, rr, beta)
    assert fast.shape == (5,)
    assert_close(fast, slow)
    fast.sum().backward()
    slow.sum().backward()
    for a, b in zip(fast_in, slow_in):
        assert_close(a.grad, b.grad)
    # beta scales the log-ratio margin: beta * m == (2 beta) * (m / 2)
    assert_close(dpo_loss(pc, pr, rc, rr, beta=beta), dpo_loss(pc / 2, pr / 2, rc / 2, rr / 2, beta=2 * beta))


def test_dpo_identical_policy_and_reference_is_log2():
    gen = torch.Generator().manual_seed(8)
    pc, pr, _, _ = dpo_inputs(gen)
    assert_close(dpo_loss(pc, pr, pc, pr), torch.full((5,), math.log(2)))
    loss_sum, n, metrics = dpo_objective(pc, pr, pc, pr, torch.ones(5), torch.ones(5), nll_coef=0.0)
    assert_close(loss_sum / n, math.log(2))
    assert metrics["reward_accuracy"] == 0.0 and metrics["reward_margin"] == 0.0


def test_dpo_reference_is_constant():
    gen = torch.Generator().manual_seed(9)
    pc, pr, rc, rr = [t.requires_grad_() for t in dpo_inputs(gen)]
    dpo_loss(pc, pr, rc, rr).sum().backward()
    assert rc.grad is None and rr.grad is None and pc.grad is not None


def test_dpo_objective_tiny_model_with_masks():
    """Full pipeline: sequence log-probs of a tiny policy under DPO masks, NLL per chosen token."""
    gen = torch.Generator().manual_seed(10)
    torch.manual_seed(10)
    policy, reference = TinyLM(), TinyLM()
    chosen_tok, rejected_tok = (torch.randint(0, 11, (3, 7), generator=gen) for _ in range(2))
    chosen_lab, rejected_lab = (random_labels(gen, 3, 7, 11, p_ignore=0.0) for _ in range(2))
    chosen_lab[:, :2] = rejected_lab[:, :2] = -100                      # prompt
    chosen_mask, rejected_mask = chosen_lab != -100, rejected_lab != -100
    chosen_mask[:, -1] = rejected_mask[:, -1] = False                   # end-of-turn out of the DPO term
    nll_mask = chosen_lab != -100                                       # the NLL keeps it
    beta, coef = 0.3, 0.2

    def objective(seq):
        with torch.no_grad():
            rc = seq(reference(chosen_tok), chosen_lab, chosen_mask)
            rr = seq(reference(rejected_tok), rejected_lab, rejected_mask)
        logits_c, logits_r = policy(chosen_tok), policy(rejected_tok)
        pc, pr = seq(logits_c, chosen_lab, chosen_mask), seq(logits_r, rejected_lab, rejected_mask)
        nll = -seq(logits_c, chosen_lab, nll_mask)
        return pc, pr, rc, rr, nll

    policy.zero_grad()
    pc, pr, rc, rr, nll = objective(sequence_logprobs)
    loss_sum, n, metrics = dpo_objective(pc, pr, rc, rr, nll, nll_mask.sum(1), beta=beta, nll_coef=coef)
    loss_sum.backward()
    g_fast = grads(policy)
    policy.zero_grad()
    pc_s, pr_s, rc_s, rr_s, nll_s = objective(ref_sequence_logprobs)
    counts = [sum(bool(nll_mask[b, t]) for t in range(7)) for b in range(3)]
    slow = sum(ref_dpo(pc_s, pr_s, rc_s, rr_s, beta)[b] + coef * nll_s[b] / counts[b] for b in range(3))
    slow.backward()
    assert n.item() == 3
    assert_close(loss_sum, slow)
    for a, b in zip(g_fast, grads(policy)):
        assert_close(a, b)
    pc_s, pr_s, nll_s = pc_s.detach(), pr_s.detach(), nll_s.detach()
    chosen_r = [beta * float(pc_s[b] - rc_s[b]) for b in range(3)]
    rejected_r = [beta * float(pr_s[b] - rr_s[b]) for b in range(3)]
    assert_close(metrics["reward_accuracy"], sum(c > r for c, r in zip(chosen_r, rejected_r)) / 3)
    assert_close(metrics["reward_margin"], sum(c - r for c, r in zip(chosen_r, rejected_r)) / 3)
    assert_close(metrics["chosen_reward"], sum(chosen_r) / 3)
    assert_close(metrics["rejected_reward"], sum(rejected_r) / 3)
    assert_close(metrics["nll_loss"], sum(float(nll_s[b]) / counts[b] for b in range(3)) / 3)


def test_dpo_objective_nll_coef_zero_is_pure_dpo():
    gen = torch.Generator().manual_seed(11)
    pc, pr, rc, rr = dpo_inputs(gen)
    nll, count = torch.rand(5, generator=gen) * 50, torch.randint(1, 20, (5,), generator=gen)
    loss_sum, n, metrics = dpo_objective(pc, pr, rc, rr, nll, count, beta=0.7, nll_coef=0.0)
    assert_close(loss_sum, dpo_loss(pc, pr, rc, rr, beta=0.7).sum())
    assert_close(metrics["dpo_loss"], loss_sum / n)
    with_nll = dpo_objective(pc, pr, rc, rr, nll, count, beta=0.7)[0]
    assert_close(with_nll - loss_sum, 0.2 * (nll / count).sum())


def test_dpo_shape_errors():
    b5, b4 = torch.zeros(5), torch.zeros(4)
    with pytest.raises(ValueError, match=r"ref_rejected must have shape \(B,\) of policy_chosen = \(5,\), got \(4,\)"):
        dpo_loss(b5, b5, b5, b4)
    with pytest.raises(ValueError, match=r"policy_chosen must have shape \(B,\)"):
        dpo_loss(torch.zeros(5, 1), b5, b5, b5)
    with pytest.raises(ValueError, match="chosen_tokens must have shape"):
        dpo_objective(b5, b5, b5, b5, b5, b4)
    with pytest.raises(ValueError, match="chosen_tokens must be > 0"):
        dpo_objective(b5, b5, b5, b5, b5, torch.zeros(5))

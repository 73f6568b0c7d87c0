"""Post-training losses (paper Sec 4.1, Sec 7.5): SFT, Bradley-Terry reward model, DPO (+ NLL).

Pure functions of model outputs and batch tensors: they do not know which model produced the logits or
rewards (text LM, or the vision model over a frozen LM). Losses that feed ``Engine.train_step`` return
``(loss_sum, count)``; the engine divides by the total count over micro-batches and ranks.

Conventions:
- ``labels`` are already next-token aligned: ``labels[b, t]`` is the target of ``logits[b, t]``
  (the token at ``t + 1``), ``IGNORE_INDEX`` (-100) where no loss is taken (prompt, padding).
- Log-probabilities and losses are computed in float32 (float64 inputs stay float64) whatever the
  input dtype (bf16 logits, rewards, log-probs).
- Reference-model log-probabilities are constants in DPO (detached).
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# float32 elements per chunk in ``token_logprobs`` (64 MiB): ~130 tokens at a 128K vocabulary.
CHUNK_ELEMENTS = 1 << 24


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 if it already is."""
    return x if x.dtype == torch.float64 else x.float()


def _check(name: str, tensor: torch.Tensor, shape: tuple, what: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {what} = {tuple(shape)}, got {tuple(tensor.shape)}")


def _check_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (B, T, V), got {tuple(logits.shape)}")
    _check("labels", labels, logits.shape[:2], "(B, T) of logits")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64/int32 token ids, got {labels.dtype}")
    vocab = logits.shape[-1]
    bad = ((labels < 0) & (labels != IGNORE_INDEX)) | (labels >= vocab)
    if bad.any():
        raise ValueError(f"labels hold ids outside [0, {vocab}) other than {IGNORE_INDEX}: "
                         f"{labels[bad].unique()[:8].tolist()}")


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(x)[label] per row of x (N, V), chunked; backward recomputes softmax per chunk.

    Saved for backward: the logits themselves (already kept by the graph) and one float32 logsumexp per
    row, so no float32 (N, V) tensor outlives a chunk: memory is one chunk on top of the gradient.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor, rows: int):
        dtype = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            lse[start:start + rows] = torch.logsumexp(logits[start:start + rows].to(dtype), dim=-1)
        picked = logits.gather(1, targets[:, None]).squeeze(1).to(dtype)
        ctx.save_for_backward(logits, targets, keep, lse)
        ctx.rows = rows
        return (picked - lse) * keep

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, targets, keep, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        g = grad_out.to(lse.dtype) * keep                                  # (N,)
        for start in range(0, logits.shape[0], ctx.rows):
            sl = slice(start, start + ctx.rows)
            # d/dx (x[y] - lse(x)) = onehot(y) - softmax(x)
            chunk = torch.exp(logits[sl].to(lse.dtype) - lse[sl, None]).mul_(-g[sl, None])
            chunk.scatter_add_(1, targets[sl, None], g[sl, None])
            grad[sl] = chunk
        return grad, None, None, None


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label: logits (B, T, V), labels (B, T) -> (B, T), 0 where ignored.

    Computed in float32 (float64 for float64 logits) in chunks of ``CHUNK_ELEMENTS`` by a custom
    autograd function whose backward recomputes the softmax per chunk, so a bf16 (B, T, V) tensor never
    gets a whole float32 copy, not even one saved for backward. The gradient w.r.t. logits comes back in
    the logits' dtype. Logits that cannot be viewed as (B*T, V) (e.g. ``logits[:, :-1]``) are copied once
    by ``reshape``. Labels outside ``[0, V)`` other than -100 raise ``ValueError``. Not twice
    differentiable.
    """
    _check_labels(logits, labels)
    batch, time, vocab = logits.shape
    flat_labels = labels.reshape(-1).long()
    keep = (flat_labels != IGNORE_INDEX)
    targets = torch.where(keep, flat_labels, torch.zeros_like(flat_labels))
    rows = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    keep = keep.to(torch.promote_types(logits.dtype, torch.float32))
    out = _TokenLogprobs.apply(logits.reshape(-1, vocab), targets, keep, rows)
    return out.view(batch, time)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of label log-probs where ``mask``: logits (B, T, V), labels (B, T), mask (B, T) bool -> (B,).

    ``mask`` is aligned with ``labels`` (mask[b, t] selects the target labels[b, t]); e.g. the assistant
    content tokens only, header and end-of-turn tokens excluded (DPO). A masked-in position without a
    label (-100) raises ``ValueError``.
    """
    _check("mask", mask, labels.shape, "(B, T) of labels")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    if (mask & (labels == IGNORE_INDEX)).any():
        raise ValueError(f"mask selects positions whose label is {IGNORE_INDEX}")
    return (token_logprobs(logits, labels) * mask).sum(dim=1)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on labelled tokens: logits (B, T, V), labels (B, T) -> (loss_sum (), n_tokens ()).

    ``loss_sum`` is the (float32) sum of -log p(label) over positions with a label; ``n_tokens`` their number
    (int64 tensor): the engine's (sum, count) convention.
    """
    return -token_logprobs(logits, labels).sum(), (labels != IGNORE_INDEX).sum()


def _pair_mask(rewards: torch.Tensor, valid: "torch.Tensor | None") -> tuple[torch.Tensor, torch.Tensor]:
    """valid (N, K) bool and the (N, K, K) mask of ranked pairs i < j with both responses valid."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must have shape (N, K) with K >= 2, got {tuple(rewards.shape)}")
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    _check("valid", valid, rewards.shape, "(N, K) of rewards")
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be bool, got {valid.dtype}")
    k = rewards.shape[1]
    upper = torch.ones(k, k, dtype=torch.bool, device=rewards.device).triu(diagonal=1)
    return valid, valid[:, :, None] & valid[:, None, :] & upper


def bradley_terry_loss(rewards: torch.Tensor, valid: "torch.Tensor | None" = None, *,
                       reward_penalty: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranked Bradley-Terry loss without margin: rewards (N, K), valid (N, K) -> (loss_sum (), n_pairs ()).

    Columns are ranked best to worst (edited > chosen > rejected for K = 3). For each row, every pair
    i < j of valid responses adds -log sigmoid(r_i - r_j); rows with fewer than 2 valid responses add
    nothing. ``reward_penalty > 0`` adds ``reward_penalty * sum(r^2)`` over valid rewards (the vision
    RM's penalty on squared reward logits); it is inside ``loss_sum``, so after the engine's division it
    weighs per pair. At least float32; ``n_pairs`` is an int64 tensor.
    """
    valid, pairs = _pair_mask(rewards, valid)
    r = _wide(rewards)
    pair_losses = -F.logsigmoid(r[:, :, None] - r[:, None, :])            # (N, K, K): -log s(r_i - r_j)
    loss_sum = torch.where(pairs, pair_losses, torch.zeros_like(pair_losses)).sum()
    if reward_penalty:
        loss_sum = loss_sum + reward_penalty * torch.where(valid, r, torch.zeros_like(r)).square().sum()
    return loss_sum, pairs.sum()


@torch.no_grad()
def pairwise_accuracy(rewards: torch.Tensor, valid: "torch.Tensor | None" = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranked pairs the rewards order correctly (r_i > r_j strictly, ties wrong): -> (n_correct, n_pairs)."""
    _, pairs = _pair_mask(rewards, valid)
    correct = rewards[:, :, None] > rewards[:, None, :]
    return (pairs & correct).sum(), pairs.sum()


def _check_same(**tensors: torch.Tensor) -> int:
    """All arguments 1-D of the same length B; returns B."""
    name0, t0 = next(iter(tensors.items()))
    if t0.dim() != 1:
        raise ValueError(f"{name0} must have shape (B,), got {tuple(t0.shape)}")
    for name, t in tensors.items():
        _check(name, t, t0.shape, f"(B,) of {name0}")
    return t0.shape[0]


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float = 0.1) -> torch.Tensor:
    """Per-example DPO loss (B,) from sequence log-probs (all (B,)):
    -log sigmoid(beta * ((pc - rc) - (pr - rr))). At least float32; reference log-probs are detached."""
    _check_same(policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen,
                ref_rejected=ref_rejected)
    chosen = _wide(policy_chosen) - _wide(ref_chosen.detach())
    rejected = _wide(policy_rejected) - _wide(ref_rejected.detach())
    return -F.logsigmoid(beta * (chosen - rejected))


def dpo_objective(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                  ref_rejected: torch.Tensor, chosen_nll_sum: torch.Tensor, chosen_tokens: torch.Tensor, *,
                  beta: float = 0.1, nll_coef: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """DPO + NLL on the chosen response (paper: coefficient 0.2): all inputs (B,) ->
    (loss_sum (), n_examples (), metrics).

    Per example: ``dpo_loss + nll_coef * chosen_nll_sum / chosen_tokens``, i.e. the chosen response's
    NLL is a per-token mean within each example, then every example weighs the same; ``loss_sum`` sums
    over examples and ``n_examples = B`` (the engine's division gives the mean over examples).
    ``chosen_nll_sum`` is the policy's summed -log p over the chosen response's NLL tokens (e.g.
    ``-sequence_logprobs(...)`` with the recipe's NLL mask) and ``chosen_tokens`` their number (> 0).
    ``metrics`` (floats, means over the batch): ``reward_accuracy`` (implicit reward of chosen >
    rejected), ``reward_margin``, ``chosen_reward``, ``rejected_reward`` (implicit reward =
    beta * (policy - reference) log-prob), ``dpo_loss``, ``nll_loss`` (per token).
    """
    batch = _check_same(policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen,
                        ref_rejected=ref_rejected, chosen_nll_sum=chosen_nll_sum, chosen_tokens=chosen_tokens)
    if (chosen_tokens <= 0).any():
        raise ValueError("chosen_tokens must be > 0 for every example (an empty chosen response?)")
    dpo = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta)
    nll = _wide(chosen_nll_sum) / chosen_tokens.to(dpo.dtype)
    loss_sum = (dpo + nll_coef * nll).sum()
    with torch.no_grad():
        chosen_reward = beta * (_wide(policy_chosen) - _wide(ref_chosen))
        rejected_reward = beta * (_wide(policy_rejected) - _wide(ref_rejected))
        values = torch.stack([(chosen_reward > rejected_reward).float().mean(),
                              (chosen_reward - rejected_reward).mean(), chosen_reward.mean(),
                              rejected_reward.mean(), dpo.mean(), nll.mean()]).tolist()
    names = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "dpo_loss", "nll_loss")
    return loss_sum, torch.tensor(batch, device=loss_sum.device), dict(zip(names, values))

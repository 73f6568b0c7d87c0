"""Tiny model, deterministic data and loss shared by the training tests (CPU, milliseconds per step)."""

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 32

# Two code paths that train the same TinyLM (micro-batch split, DeepSpeed vs torch, 2 ranks vs 1) round differently
# (u = 2**-24 ~ 6e-8); bounds for <= 6 Adam steps on <= 64 labelled tokens per step, P <= 4.4e3 trainable weights:
# - weights: a step moves a weight by <= lr = 1e-2 and Adam carries the relative rounding of its gradient (sums of
#   <= 64 terms: 64*u = 4e-6) into it: <= 4e-8 per step, plus u*|w| (|w| < 1) for w + step: ~2e-7 after 6 steps;
#   1e-5 leaves 50x for weights whose Adam denominator sqrt(v) is tiny;
# - loss: a float32 sum of n <= 64 token CEs of ~log(32) = 3.5, divided by n: the order alone moves it by up to
#   n*u*3.5 = 1.3e-5; the weights' drift adds <= |grad| * |dw| = 1 * 2e-7 * sqrt(P) = 1.3e-5;
# - grad norm (DeepSpeed's own, P = 2.8e3 weights not frozen): squares summed in another order: <= P*u/2 = 8e-5.
# A mis-weighted micro-batch (mean of means) moves weights by 4e-2, the next losses by 1e-2 and the norm by 30%.
WEIGHT_ATOL = 1e-5
LOSS_ATOL = 3e-5
GRAD_NORM_RTOL = 1e-4


class Block(nn.Module):
    """Pre-norm residual MLP over (B, T, D) with dropout."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.down(F.gelu(self.up(self.norm(x)))))


class TinyLM(nn.Module):
    """tokens (B, T) int64 -> logits (B, T, VOCAB); ``blocks`` is the ModuleList activation checkpointing wraps."""

    def __init__(self, dim: int = 16, n_blocks: int = 3, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList([Block(dim, dropout) for _ in range(n_blocks)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def make_model(seed: int = 0, frozen: tuple[str, ...] = (), **kw) -> TinyLM:
    """A TinyLM initialised from ``seed``; parameters whose name starts with a ``frozen`` prefix are frozen."""
    torch.manual_seed(seed)
    model = TinyLM(**kw)
    for name, p in model.named_parameters():
        if name.startswith(frozen):
            p.requires_grad_(False)
    return model


def make_rows(step: int, n_rows: int, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic rows for ``step``: tokens (n_rows, seq), labels with a varying number of -100 per row."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    tokens = torch.randint(0, VOCAB, (n_rows, seq), generator=g)
    labels = (tokens * 7 + 3) % VOCAB  # a learnable mapping
    n_masked = torch.randint(0, seq - 1, (n_rows,), generator=g)
    labels[torch.arange(seq)[None, :] < n_masked[:, None]] = -100
    return {"tokens": tokens, "labels": labels}


def split(rows: dict[str, torch.Tensor], n_micro: int) -> list[dict[str, torch.Tensor]]:
    """Split rows into ``n_micro`` equal micro-batches."""
    chunks = {k: v.chunk(n_micro) for k, v in rows.items()}
    return [{k: chunks[k][i] for k in rows} for i in range(n_micro)]


def lm_loss(model, batch):
    """Sum of next-token cross-entropies over labelled positions, and their count."""
    logits = model(batch["tokens"])
    labels = batch["labels"]
    loss_sum = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss_sum, (labels != -100).sum()


def partition_everything_under_zero3(backend_module) -> None:
    """Make ZeRO-3 partition even tiny parameters (DeepSpeed keeps params < 1e5 elements whole by default).

    ``backend_module`` is ``training.backend_deepspeed``; its ``deepspeed_config`` is wrapped in place.
    """
    original = backend_module.deepspeed_config

    def config(*args, **kwargs):
        cfg = original(*args, **kwargs)
        if cfg["zero_optimization"]["stage"] == 3:
            cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return cfg

    backend_module.deepspeed_config = config

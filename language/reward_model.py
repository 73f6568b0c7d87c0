"""Reward model (Sec 4.1.2): the language model plus a scalar head, read at the last token of each response.

    rm = RewardModel(Llama(config))                        # or RewardModel.from_pretrained(folder)
    rows = [reward_row(ex, shuffle_seed=(seed, i)) for i, ex in enumerate(examples)]
    batch = collate_reward_rows(rows, pad_id=0)
    rewards, valid = rm.score_rows(batch)                  # (B, K) best first, valid (B, K)
    loss_sum, n_pairs = bradley_terry_loss(rewards, valid)  # training/losses.py

A reward row holds the prompt once and then its K responses; each response attends to the prompt and to
itself only (`chat_data.reward_attention_mask`), so its reward equals that of prompt + response scored
alone (`score_sequences`), while the prompt is encoded once.

On disk a reward model is an HF language-model folder (config.json + model.safetensors with the LM's
unchanged names, loadable by `Llama.from_pretrained` as a plain `Llama`) plus `reward_head.safetensors`
holding the head as `score.weight` (1, dim), the name Hugging Face's LlamaForSequenceClassification uses.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import AttentionMask
from .chat_data import reward_attention_mask
from .checkpoints import save_hf
from .model import Llama
from .rope import rope_cos_sin

HEAD_FILE = "reward_head.safetensors"
HEAD_NAME = "score.weight"
PAD_SEGMENT = -1


class RewardModel(nn.Module):
    """`lm` (a Llama; its lm_head is unused) and `score`, a bias-free Linear(dim, 1)."""

    def __init__(self, lm: Llama):
        super().__init__()
        self.lm = lm
        self.config = lm.config
        self.score = nn.Linear(lm.config.dim, 1, bias=False)
        nn.init.normal_(self.score.weight, std=0.02)
        if not lm.config.tie_embeddings:
            lm.lm_head.weight.requires_grad_(False)  # no reward depends on it (tied: it is the embedding)

    # -- forward ------------------------------------------------------------------------------------

    def hidden_states(self, tokens: torch.Tensor, *, positions: Optional[torch.Tensor] = None,
                      attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (B, T) -> final-norm hidden states (B, T, dim).

        attention_mask: (B, T, T) bool, True where query t may attend key s (a dense per-query mask such
        as `reward_attention_mask`); None = plain causal. positions (B, T): RoPE positions (default 0..T-1).
        """
        if attention_mask is None:
            return self.lm.model(tokens, positions=positions)
        b, t = tokens.shape
        if attention_mask.shape != (b, t, t) or attention_mask.dtype != torch.bool:
            raise ValueError(f"attention_mask must be bool (B, T, T) = {(b, t, t)}, got "
                             f"{attention_mask.dtype} {tuple(attention_mask.shape)}")
        # LlamaModel.forward takes padding / document masks only; a per-query mask runs its layers here.
        lm = self.lm.model
        if positions is None:
            positions = torch.arange(t, device=tokens.device).expand(b, t)
        h = lm.embed_tokens(tokens)
        cos, sin = rope_cos_sin(lm.inv_freq, positions, h.dtype)
        mask = AttentionMask(dense=attention_mask[:, None])
        for layer in lm.layers:
            if lm.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, mask, None, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask)
        return lm.norm(h)

    def rewards_at(self, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, dim), index (B, K) token positions -> rewards (B, K) in float32."""
        picked = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.score(picked).squeeze(-1).float()

    def score_rows(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A `collate_reward_rows` batch -> (rewards (B, K), valid (B, K)), columns in rank order (0 = best)."""
        mask = reward_attention_mask(batch["segment_ids"])
        hidden = self.hidden_states(batch["tokens"], positions=batch["positions"], attention_mask=mask)
        placed = self.rewards_at(hidden, batch["end_index"])                        # (B, K) as placed
        ranked = torch.zeros_like(placed).scatter(1, batch["rank"], placed)          # ranked[b, rank] = placed
        k = batch["rank"].shape[1]
        valid = torch.arange(k, device=placed.device)[None] < batch["n_responses"][:, None]
        return ranked, valid

    def score_sequences(self, sequences: list[list[int]], pad_id: int = 0) -> torch.Tensor:
        """Each token sequence (e.g. prompt + one response) scored alone at its last token -> (N,) float32."""
        if not sequences or any(len(s) == 0 for s in sequences):
            raise ValueError("score_sequences needs non-empty sequences")
        device = self.score.weight.device
        longest = max(len(s) for s in sequences)
        tokens = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
        for i, s in enumerate(sequences):
            tokens[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)  # right padding: causal, never seen
        last = torch.tensor([[len(s) - 1] for s in sequences])
        hidden = self.hidden_states(tokens.to(device))
        return self.rewards_at(hidden, last.to(device)).squeeze(1)

    def gradient_checkpointing_enable(self) -> None:
        self.lm.gradient_checkpointing_enable()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- save / load --------------------------------------------------------------------------------

    def save_pretrained(self, folder) -> Path:
        """Write the LM as an HF folder (unchanged names) and the head as `reward_head.safetensors`."""
        folder = Path(folder)
        save_hf(self.lm, folder)
        save_file({HEAD_NAME: self.score.weight.detach().to("cpu").contiguous()}, str(folder / HEAD_FILE),
                  metadata={"format": "pt", "herd": "reward-head"})
        return folder

    def head_state(self) -> dict[str, torch.Tensor]:
        return {HEAD_NAME: self.score.weight.detach()}

    def load_head(self, path) -> None:
        path = Path(path)
        tensors = load_file(str(path))
        if set(tensors) != {HEAD_NAME}:
            raise ValueError(f"{path}: expected exactly the tensor {HEAD_NAME!r}, found {sorted(tensors)}")
        weight = tensors[HEAD_NAME]
        if tuple(weight.shape) != (1, self.config.dim):
            raise ValueError(f"{path}: {HEAD_NAME} has shape {tuple(weight.shape)}, the model needs "
                             f"(1, {self.config.dim})")
        with torch.no_grad():
            self.score.weight.copy_(weight)

    @classmethod
    def from_pretrained(cls, path, *, new_head: bool = False, dtype: torch.dtype = torch.float32,
                        device="cpu") -> "RewardModel":
        """Load a reward-model folder; `new_head=True` also accepts a plain LM checkpoint (any format
        `Llama.from_pretrained` reads) and gives it a freshly initialised head."""
        path = Path(path)
        model = cls(Llama.from_pretrained(path, dtype=dtype, device=device))
        head = path / HEAD_FILE if path.is_dir() else None
        if head is not None and head.is_file():
            model.load_head(head)
        elif not new_head:
            raise FileNotFoundError(f"{path}: no {HEAD_FILE}; not a reward model (pass new_head=True to put a "
                                    "new head on a language model)")
        return model.to(device=device, dtype=dtype)


def collate_reward_rows(rows: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """`chat_data.reward_row` dicts -> one right-padded batch:
      tokens, positions (B, T) (padding: pad_id, 0), segment_ids (B, T) (padding: -1),
      end_index (B, K), rank (B, K) (K = most responses of a row; a row with fewer responses gets index 0
      and its own slot number as rank there), n_responses (B,)."""
    if not rows:
        raise ValueError("collate_reward_rows needs at least one row")
    b = len(rows)
    t = max(len(r["tokens"]) for r in rows)
    k = max(len(r["end_index"]) for r in rows)
    out = {"tokens": torch.full((b, t), pad_id, dtype=torch.long),
           "positions": torch.zeros((b, t), dtype=torch.long),
           "segment_ids": torch.full((b, t), PAD_SEGMENT, dtype=torch.long),
           "end_index": torch.zeros((b, k), dtype=torch.long),
           "rank": torch.arange(k).repeat(b, 1),
           "n_responses": torch.tensor([len(r["end_index"]) for r in rows], dtype=torch.long)}
    for i, r in enumerate(rows):
        n, m = len(r["tokens"]), len(r["end_index"])
        out["tokens"][i, :n] = r["tokens"]
        out["positions"][i, :n] = r["positions"]
        out["segment_ids"][i, :n] = r["segment_ids"]
        out["end_index"][i, :m] = r["end_index"]
        out["rank"][i, :m] = r["rank"]
    return out

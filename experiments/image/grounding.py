"""Attention grounding for procedural scenes: an auxiliary loss that makes the answer position's cross-attention
look at the objects the question names.

The scene generator knows where every object is, and each question which objects it names (`QA.objects`:
"What color is the circle?" names the circle; "Is the red star left or right of the blue square?" both). At the
position that predicts a grounded answer's first token, each block's attention (mean over heads) puts some mass
on the image patches those objects cover; the loss is -log of that mass, averaged over blocks, summed over
grounded questions, times `weight` (one grounded question then weighs like `weight` answer tokens):

    loss = cross_entropy(answers) + weight * sum_q mean_blocks -log(sum_{s in patches(q)} mean_h p(h, s))

Attention supervision of this kind is a training aid from the VQA literature (e.g. HINT, Selvaraju et al.
2019), not part of the Llama 3 recipe, whose grounding data reaches the model as text and marked images. In the
image quickstart it is what makes the blocks select an object by its SHAPE (without it a colour question's
attention splits evenly between the two objects of a scene; experiments/image/quickstart.yaml has the numbers).
The probabilities are recomputed from each block's own inputs (captured by a forward hook) at the grounded
positions only, so the model's forward pass and its SDPA kernel stay untouched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from adapters.cross_attention import CrossAttention
from adapters.image_tokens import IGNORE_INDEX

GROUNDABLE = ("color", "shape", "position", "yesno", "count")


@dataclass
class GroundingSection:
    weight: float = field(default=0.0, metadata={"range": (0.0, None), "help": "0 = off; needs procedural scenes"})
    question_types: list[str] = field(default_factory=lambda: ["color", "shape", "position", "yesno"], metadata={
        "help": f"questions whose named objects are grounded, of {', '.join(GROUNDABLE)}"})

    def __post_init__(self):
        bad = [t for t in self.question_types if t not in GROUNDABLE]
        if bad:
            raise ValueError(f"key 'question_types': {bad}; choose from {list(GROUNDABLE)}")


def object_discs(objects, image_size: int) -> list[tuple[float, float, float]]:
    """Scene objects -> (x, y, radius) in pixels of the scene image."""
    return [(o.center[0], o.center[1], o.radius(image_size)) for o in objects]


def patch_targets(discs, image_size: int, tile_size: int, patch_size: int, tokens_per_tile: int) -> torch.Tensor:
    """(tokens_per_tile,) bool: the patches (class token first, then row-major) whose square overlaps a disc.

    The scene (square) is resized onto one tile of `tile_size` pixels."""
    grid, scale = tile_size // patch_size, tile_size / image_size
    target = torch.zeros(tokens_per_tile, dtype=torch.bool)
    for k in range(grid * grid):
        left, top = (k % grid) * patch_size, (k // grid) * patch_size
        for x, y, r in discs:
            # distance from the disc's centre to the nearest point of the patch square
            dx = max(left - x * scale, 0.0, x * scale - left - patch_size)
            dy = max(top - y * scale, 0.0, y * scale - top - patch_size)
            if math.hypot(dx, dy) < r * scale:
                target[1 + k] = True
    return target


def answer_positions(labels) -> list[int]:
    """Token labels (IGNORE_INDEX where untrained) -> the position predicting each labelled run's first token."""
    return [i - 1 for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX]


def grounding_targets(samples: list[dict], section: GroundingSection, tile_size: int, patch_size: int,
                      tokens_per_tile: int) -> dict | None:
    """Training samples (`PromptFormat.training_sample` dicts with "qa" and "meta" of a scene) -> {"rows" (N,),
    "positions" (N,), "targets" (N, tokens_per_tile) bool} for their grounded questions, or None if none."""
    rows, positions, targets = [], [], []
    for b, sample in enumerate(samples):
        meta, qa = sample.get("meta") or {}, sample.get("qa") or []
        if "scene_objects" not in meta:
            continue
        starts = answer_positions(sample["labels"])
        if len(starts) != len(qa):
            raise ValueError(f"{sample.get('id')}: {len(qa)} questions but {len(starts)} answer spans")
        discs = object_discs(meta["scene_objects"], meta["image_size"])
        for question, position in zip(qa, starts):
            if question.type in section.question_types and question.objects:
                rows.append(b)
                positions.append(position)
                targets.append(patch_targets([discs[i] for i in question.objects], meta["image_size"], tile_size,
                                             patch_size, tokens_per_tile))
    if not rows:
        return None
    return {"rows": torch.tensor(rows), "positions": torch.tensor(positions), "targets": torch.stack(targets)}


class AttentionGrounding:
    """Captures every cross-attention block's inputs during a forward (forward hooks) and turns them into the
    grounding loss for given (row, position, target patches)."""

    def __init__(self, model: torch.nn.Module):
        self.inputs: list[tuple] = []
        self.handles = [m.register_forward_hook(self._capture) for m in model.modules() if isinstance(m, CrossAttention)]
        if not self.handles:
            raise ValueError("attention grounding: the model has no cross-attention blocks")
        self.recording = False
        self.mass_sum, self.mass_count = 0.0, 0  # attention mass on the targets, for logging (`take_mean_mass`)

    def _capture(self, module, args, output) -> None:
        if self.recording:
            self.inputs.append((module, *args))

    def loss(self, grounding: dict) -> torch.Tensor:
        """Sum over grounded questions of the blocks' mean -log(attention mass on the named objects' patches);
        the captured inputs are consumed."""
        rows, positions, targets = grounding["rows"], grounding["positions"], grounding["targets"]
        if not self.inputs:
            raise RuntimeError("attention grounding: no cross-attention ran (an image batch is needed)")
        nll = []
        for module, x, kv, mask in self.inputs:
            probs = attention_probs(module, x[rows, positions], kv.keys[rows], mask[rows, 0, positions])
            if probs.shape[-1] != targets.shape[-1]:
                raise ValueError(f"attention grounding: {probs.shape[-1]} image tokens per sample, targets for "
                                 f"{targets.shape[-1]} (one image of one tile is supported)")
            mass = (probs * targets[:, None]).sum(-1).mean(-1)  # (N,)
            nll.append(-mass.clamp_min(1e-6).log())
            self.mass_sum, self.mass_count = self.mass_sum + float(mass.detach().sum()), self.mass_count + len(mass)
        self.inputs = []
        return torch.stack(nll).mean(0).sum()

    def take_mean_mass(self) -> float | None:
        """Mean attention mass on the named objects since the last call (over blocks and questions), or None."""
        mean = self.mass_sum / self.mass_count if self.mass_count else None
        self.mass_sum, self.mass_count = 0.0, 0
        return mean

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def attention_probs(module: CrossAttention, x: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """x (N, dim) normalised text states, keys (N, n_kv, S, head_dim), allowed (N, S) -> (N, n_heads, S)."""
    n = x.shape[0]
    q = module.q_norm(module.q_proj(x).view(n, module.n_heads, module.head_dim))
    keys = keys.repeat_interleave(module.n_heads // module.n_kv_heads, 1)
    scores = torch.einsum("nhd,nhsd->nhs", q.float(), keys.float()) / math.sqrt(module.head_dim)  # fp32 softmax
    return scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)

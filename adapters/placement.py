"""Where the cross-attention blocks of each modality run among the frozen LM's layers.

A position p means "before LM layer p" (p = n_layers: after the last layer, before the final norm). Images:
one block per 4 LM layers by default, placed as Llama 3.2 Vision places them
(`cross_attention.default_positions`: 32 layers -> 3, 7, ..., 31). Video (paper Sec 7.3): a video block before
every 4th image block (`every_nth_block`: image blocks at 3, 7, 11, 15, ... -> video blocks at 3, 19, ...),
running before the image block that shares its position (`ORDER`).

    plan = PlacementPlan(32, {"image": [3, 7, ..., 31], "video": every_nth_block(image, 4)})
    plan.at(3) -> [("video", 0), ("image", 0)]
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

ORDER = ("video", "image")  # at one position, blocks run in this order


class Slot(NamedTuple):
    modality: str
    index: int  # the block's index among that modality's blocks


def every_nth_block(positions: Sequence[int], n: int = 4) -> list[int]:
    """Positions of one block per n blocks of another modality, sharing that modality's 1st, (n+1)th, ... block
    position (a video block before every 4th image block)."""
    if n < 1:
        raise ValueError(f"every_nth_block needs n >= 1, got {n}")
    return sorted(positions)[::n]


class PlacementPlan:
    """Which (modality, block) run at each LM layer boundary."""

    def __init__(self, n_layers: int, positions: dict[str, Sequence[int]]):
        unknown = sorted(set(positions) - set(ORDER))
        if unknown:
            raise ValueError(f"cross-attention modalities {unknown} are not among {ORDER}")
        self.n_layers = n_layers
        self.positions = {m: sorted(int(p) for p in ps) for m, ps in positions.items()}
        self._at: dict[int, list[Slot]] = {}
        for modality in ORDER:
            ps = self.positions.get(modality)
            if ps is None:
                continue
            bad = [p for p in ps if not 0 <= p <= n_layers]
            if bad or not ps:
                raise ValueError(f"{modality} cross-attention positions {ps} must be a non-empty list of LM layer "
                                 f"indices in 0..{n_layers} (block before that layer; {n_layers} = after the last)")
            for j, p in enumerate(ps):
                self._at.setdefault(p, []).append(Slot(modality, j))

    def at(self, position: int) -> list[Slot]:
        """The blocks that run before LM layer `position`, in order."""
        return self._at.get(position, [])

    def __repr__(self) -> str:
        return f"PlacementPlan({self.n_layers} layers, {self.positions})"

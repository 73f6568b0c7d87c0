"""Document packing for pre-training: token documents -> fixed-length rows with document masks.

The stream. Epoch e is every document once, in a permutation drawn from (seed, e); epochs follow each
other forever. A *cursor* is a token offset into this stream: epoch = cursor // n_tokens. The stream
does not depend on seq_len or batch size, so a cursor stays meaningful when either changes.

Rows. A row of seq_len T starts at a cursor and takes the stream's tokens in order:
- a document that fits in the rest of the row goes in whole;
- a document that does not fit the rest of the row but would fit an empty row (length <= T) starts the
  next row instead, and the rest of this row is padding (so short documents, such as the synthetic
  needle-in-a-haystack ones, are never cut);
- a longer document fills the row and continues in the next one.
(`whole_short_docs=False` fills every row to the end instead: no padding, any document may be cut.)
Each piece of a document in a row is its own document for masking: its own `doc_ids` value (0, 1, ...
in the row; padding -1), `positions` from 0, and `labels` = the next token of the same piece, -100 at
the piece's last token and at padding. (So the one target at a cut is lost; bos is never a target.)

Rows are a pure function of (token_docs, seed, seq_len, start_cursor): `rows(first_row, n)` and
`batch(step, batch_size)` (= rows step*B .. step*B+B-1) need no iterator state, so a run resumes exactly
from a step number. Stages:
- batch-size ramp at fixed T: rows do not depend on B; a stage change at row R continues with
  `rows(R, new_B)` (R = the sum of the earlier batch sizes).
- context extension to T2 after R rows: `PackedDataset(docs, T2, seed, start_cursor=ds.cursor_at_row(R))`
  (save that cursor, or recompute it from the schedule: it is deterministic).
- data parallel: rank r of W takes rows(step*B + r*B/W, B/W) of the global batch B.
Row starts are computed by walking the stream once from start_cursor (about a second per million rows)
and memoised; the memo is a cache of a pure function, not state.
"""
from __future__ import annotations

import bisect
from array import array
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

IGNORE_INDEX = -100
PAD_DOC_ID = -1


@dataclass
class PackedBatch:
    """tokens, labels, doc_ids, positions: LongTensor (B, T); cursor / next_cursor: stream offsets."""
    tokens: torch.Tensor
    labels: torch.Tensor
    doc_ids: torch.Tensor
    positions: torch.Tensor
    cursor: int = 0
    next_cursor: int = 0

    @property
    def n_labels(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def n_pad(self) -> int:
        return int((self.doc_ids == PAD_DOC_ID).sum())

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.tokens.to(device), self.labels.to(device), self.doc_ids.to(device),
                           self.positions.to(device), self.cursor, self.next_cursor)

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "labels": self.labels, "doc_ids": self.doc_ids,
                "positions": self.positions}


def encode_documents(tokenizer, docs: Iterable) -> list[list[int]]:
    """Texts (or objects with `.text`) -> token documents `bos + tokens + eos` with `tokenizer.encode`."""
    return [tokenizer.encode(getattr(d, "text", d), bos=True, eos=True) for d in docs]


class PackedDataset:
    """Packs token documents (each `bos + tokens + eos`) into rows of `seq_len` (module docstring)."""

    def __init__(self, token_docs: Sequence[Sequence[int]], seq_len: int, seed: int = 0, *,
                 pad_id: int = 0, start_cursor: int = 0, shuffle: bool = True, whole_short_docs: bool = True):
        if seq_len < 2:
            raise ValueError(f"PackedDataset: seq_len must be >= 2, got {seq_len}")
        if start_cursor < 0:
            raise ValueError(f"PackedDataset: start_cursor must be >= 0, got {start_cursor}")
        lengths = [len(d) for d in token_docs]
        if not lengths:
            raise ValueError("PackedDataset: no documents")
        empty = [i for i, n in enumerate(lengths) if n == 0]
        if empty:
            raise ValueError(f"PackedDataset: documents {empty[:5]} are empty (each needs bos + tokens + eos)")
        self.seq_len, self.seed, self.pad_id = seq_len, seed, pad_id
        self.start_cursor, self.shuffle, self.whole_short_docs = start_cursor, shuffle, whole_short_docs
        self.flat = np.concatenate([np.asarray(d, dtype=np.int64) for d in token_docs])
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])  # doc start in `flat`
        self.n_tokens = int(self.lengths.sum())  # tokens per epoch
        self._epochs: dict[int, tuple[np.ndarray, list, list]] = {}
        self._row_starts = array("q", [start_cursor])

    @property
    def n_docs(self) -> int:
        return len(self.lengths)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The document permutation of `epoch` (identity when shuffle=False)."""
        if not self.shuffle:
            return np.arange(self.n_docs)
        return np.random.default_rng(np.random.SeedSequence([self.seed, epoch])).permutation(self.n_docs)

    # -- the row layout -------------------------------------------------------------------------

    def _epoch(self, epoch: int):
        if epoch not in self._epochs:
            order = self.epoch_order(epoch)
            lens = self.lengths[order]
            starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
            self._epochs[epoch] = (order, starts.tolist(), lens.tolist())
            if len(self._epochs) > 4:  # keep the few epochs near the one in use
                del self._epochs[max(self._epochs, key=lambda e: abs(e - epoch))]
        return self._epochs[epoch]

    def _locate(self, cursor: int):
        """cursor -> (doc index, offset inside the doc, doc length)."""
        epoch, off = divmod(cursor, self.n_tokens)
        order, starts, lens = self._epoch(epoch)
        k = bisect.bisect_right(starts, off) - 1
        return int(order[k]), off - starts[k], lens[k]

    def _row_end(self, start: int, limit: Optional[int] = None) -> int:
        """Cursor just past the stream tokens that the row beginning at `start` holds."""
        pos, space, t = start, self.seq_len, self.seq_len
        while space > 0 and (limit is None or pos < limit):
            _, in_doc, length = self._locate(pos)
            remaining = length - in_doc
            if limit is not None:
                remaining = min(remaining, limit - pos)
            if remaining <= space:
                pos, space = pos + remaining, space - remaining
            elif self.whole_short_docs and in_doc == 0 and remaining <= t and space < t:
                break  # a short document waits for the next row
            else:
                pos, space = pos + space, 0
        return pos

    def cursor_at_row(self, row: int) -> int:
        """Stream offset where row `row` (counted from start_cursor) begins."""
        if row < 0:
            raise ValueError(f"PackedDataset: row must be >= 0, got {row}")
        starts = self._row_starts
        while len(starts) <= row:
            starts.append(self._row_end(starts[-1]))
        return starts[row]

    def cursor_after(self, step: int, batch_size: int) -> int:
        """Stream offset after `step` batches of `batch_size` rows: the start_cursor of a next stage."""
        return self.cursor_at_row(step * batch_size)

    def _build_row(self, start: int, end: int, out: dict, b: int) -> None:
        slot, piece, pos = 0, 0, start
        while pos < end:
            doc, in_doc, length = self._locate(pos)
            n = min(length - in_doc, end - pos)
            a = int(self.offsets[doc]) + in_doc
            out["tokens"][b, slot:slot + n] = self.flat[a:a + n]
            out["labels"][b, slot:slot + n - 1] = self.flat[a + 1:a + n]
            out["doc_ids"][b, slot:slot + n] = piece
            out["positions"][b, slot:slot + n] = np.arange(n)
            slot, piece, pos = slot + n, piece + 1, pos + n

    def _pack(self, bounds: list[tuple[int, int]]) -> PackedBatch:
        b, t = len(bounds), self.seq_len
        out = {"tokens": np.full((b, t), self.pad_id, np.int64), "labels": np.full((b, t), IGNORE_INDEX, np.int64),
               "doc_ids": np.full((b, t), PAD_DOC_ID, np.int64), "positions": np.zeros((b, t), np.int64)}
        for i, (start, end) in enumerate(bounds):
            self._build_row(start, end, out, i)
        return PackedBatch(**{k: torch.from_numpy(v) for k, v in out.items()},
                           cursor=bounds[0][0], next_cursor=bounds[-1][1])

    # -- batches --------------------------------------------------------------------------------

    def rows(self, first_row: int, n_rows: int) -> PackedBatch:
        """Rows first_row .. first_row + n_rows - 1 of this stage as one batch (B = n_rows)."""
        if n_rows < 1:
            raise ValueError(f"PackedDataset: n_rows must be >= 1, got {n_rows}")
        self.cursor_at_row(first_row + n_rows)
        starts = self._row_starts
        return self._pack([(starts[r], starts[r + 1]) for r in range(first_row, first_row + n_rows)])

    def batch(self, step: int, batch_size: int) -> PackedBatch:
        """Batch `step` (0-based) of this stage at a constant batch size."""
        if step < 0 or batch_size < 1:
            raise ValueError(f"PackedDataset.batch: need step >= 0 and batch_size >= 1, got {step}, {batch_size}")
        return self.rows(step * batch_size, batch_size)

    def batch_at(self, cursor: int, batch_size: int) -> PackedBatch:
        """`batch_size` rows packed from an arbitrary stream cursor (next_cursor says where they end)."""
        bounds, start = [], cursor
        for _ in range(batch_size):
            end = self._row_end(start)
            bounds.append((start, end))
            start = end
        return self._pack(bounds)


def eval_batches(token_docs: Sequence[Sequence[int]], seq_len: int, batch_size: int, *,
                 pad_id: int = 0) -> list[PackedBatch]:
    """One pass over token_docs in their order, packed by the same rule (the last batch may be smaller
    and its last row padded): the fixed batches that validation perplexity is measured on."""
    ds = PackedDataset(token_docs, seq_len, pad_id=pad_id, shuffle=False)
    bounds, start = [], 0
    while start < ds.n_tokens:
        end = ds._row_end(start, limit=ds.n_tokens)
        bounds.append((start, end))
        start = end
    return [ds._pack(bounds[i:i + batch_size]) for i in range(0, len(bounds), batch_size)]

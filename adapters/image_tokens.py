"""Which text tokens see which images, and the collate of mixed text / image batches.

An image enters the token sequence as one `<|image|>` token (Meta's tokenizer: 128011; HF Mllama: 128256,
one past the text vocabulary). A token sees the images whose `<|image|>` token is at or before it:
- `all_previous`: every such image;
- `most_recent`: only the most recent group of consecutive `<|image|>` tokens. This is exactly what
  transformers' Mllama processor builds (`get_cross_attention_token_mask`): an image is visible from its
  token up to the next `<|image|>` token that does not directly follow it.
Text before the first image sees nothing (its cross-attention rows are all zero).

Samples whose tokens and images disagree are rejected with an `ImageBatchError` naming the sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from vision.tiling import TilingConfig, batch_images

POLICIES = ("all_previous", "most_recent")
MLLAMA_IMAGE_TOKEN_ID = 128256  # transformers' Mllama / Llama 3.2 Vision (one past the text vocabulary)
META_IMAGE_TOKEN_ID = 128011  # Llama 3 tokenizer `<|image|>` (paper's special tokens)
IGNORE_INDEX = -100


class ImageBatchError(ValueError):
    """A sample whose `<|image|>` tokens and images do not agree, or a malformed image; names the sample."""


def image_spans(tokens: Sequence[int], image_token_id: int, policy: str = "all_previous") -> list[tuple[int, int]]:
    """For each `<|image|>` token in order: the text positions [start, end) that see its image."""
    if policy not in POLICIES:
        raise ValueError(f"image token policy '{policy}' is not one of {POLICIES}")
    tokens = list(tokens)
    n = len(tokens)
    where = [i for i, tok in enumerate(tokens) if tok == image_token_id]
    if policy == "all_previous":
        return [(start, n) for start in where]
    spans, group_end = [], n  # walk backwards: a group of adjacent image tokens ends where the next group starts
    for k in range(len(where) - 1, -1, -1):
        if k + 1 < len(where) and where[k + 1] != where[k] + 1:
            group_end = where[k + 1]
        spans.append((where[k], group_end))
    return spans[::-1]


def cross_attention_mask(token_rows, tiles_per_image: Sequence[Sequence[int]], *, image_token_id: int,
                         max_tiles: int, policy: str = "all_previous", max_images: Optional[int] = None,
                         valid: Optional[torch.Tensor] = None, names: Optional[Sequence[Any]] = None) -> torch.Tensor:
    """Cross-attention mask (B, T, N_img, max_tiles) long: 1 where token t sees tile k of image i.

    token_rows: (B, T) tensor or B sequences of equal length T (padding included).
    tiles_per_image: per sample, the tile count of each of its images, in `<|image|>` order.
    valid (B, T) bool: False at padding, which is never an `<|image|>` token and sees no image.
    N_img = the most images in one sample. Errors name the sample (`names[b]` when given, else its index).
    """
    rows = token_rows.tolist() if torch.is_tensor(token_rows) else [list(r) for r in token_rows]
    if len(rows) != len(tiles_per_image):
        raise ValueError(f"{len(rows)} token rows but tiles for {len(tiles_per_image)} samples")
    length = len(rows[0]) if rows else 0
    if any(len(r) != length for r in rows):
        raise ValueError("token rows must all have the same length (pad them first)")
    valid_rows = valid.tolist() if valid is not None else None
    n_images = max((len(t) for t in tiles_per_image), default=0)
    mask = torch.zeros(len(rows), length, n_images, max_tiles, dtype=torch.long)
    for b, (row, tiles) in enumerate(zip(rows, tiles_per_image)):
        name = _sample_name(b, names)
        if valid_rows is not None:
            row = [tok if ok else None for tok, ok in zip(row, valid_rows[b])]
        spans = image_spans(row, image_token_id, policy)
        check_image_count(name, len(spans), len(tiles), image_token_id, max_images)
        for i, ((start, end), n_tiles) in enumerate(zip(spans, tiles)):
            if not 1 <= n_tiles <= max_tiles:
                raise ImageBatchError(f"{name}: image {i} has {n_tiles} tiles; 1..{max_tiles} are supported")
            mask[b, start:end, i, :n_tiles] = 1
    if valid is not None:
        mask[~valid.bool().cpu()] = 0  # padding sees nothing
    return mask


def check_image_count(name: str, n_tokens: int, n_images: int, image_token_id: int,
                      max_images: Optional[int] = None) -> None:
    """Raise `ImageBatchError` unless the sample has one image per `<|image|>` token, and not too many."""
    if n_tokens > n_images:
        raise ImageBatchError(f"{name}: {n_tokens} <|image|> token(s) (id {image_token_id}) but {n_images} image(s): "
                              f"an <|image|> token without an image")
    if n_images > n_tokens:
        raise ImageBatchError(f"{name}: {n_images} image(s) but {n_tokens} <|image|> token(s) (id {image_token_id}): "
                              f"an image without a token")
    if max_images is not None and n_images > max_images:
        raise ImageBatchError(f"{name}: {n_images} images, more than the configured max_images={max_images}")


@dataclass
class ImageTextCollator:
    """Samples -> one batch dict for the vision-language model; text-only and image samples mix freely.

    A sample is a mapping (or object) with `tokens` (ids incl. one `<|image|>` per image), optional
    `images` (list of `vision.tiling.TiledImage`, in `<|image|>` order), optional `labels` aligned with
    `tokens` (-100 = not a target; default: every token) and optional `id` (named in errors).

    Batch (right-padded to the longest sample):
      tokens (B, T) long; attention_mask (B, T) bool (False at padding; not needed by the causal forward);
      labels (B, T) long: the house convention, labels[t] = the target after position t, -100 where that
      token is padding, an `<|image|>` token or marked -100 in the sample;
      cross_attention_mask (B, T, N_img, max_tiles) long, pixel_values (B, N_img, max_tiles, 3, tile, tile),
      aspect_ratio_ids (B, N_img), aspect_ratio_mask (B, N_img, max_tiles) (see `vision.tiling.ImageBatch`):
      all None when no sample has an image. N_img = the most images in one sample.
    """
    image_token_id: int
    tiling: TilingConfig
    policy: str = "all_previous"
    pad_id: int = 0

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"image token policy '{self.policy}' is not one of {POLICIES}")

    def __call__(self, samples: Sequence[Any]) -> dict[str, Optional[torch.Tensor]]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        ids = [_field(s, "id", None) for s in samples]
        names = [f"sample {b}" + (f" (id {i})" if i is not None else "") for b, i in enumerate(ids)]
        token_lists = [_as_list(_field(s, "tokens")) for s in samples]
        images = [list(_field(s, "images", None) or []) for s in samples]
        longest = max(len(t) for t in token_lists)
        tokens = torch.full((len(samples), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(len(samples), longest, dtype=torch.bool)
        targets = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
        for b, (sample, row) in enumerate(zip(samples, token_lists)):
            if not row:
                raise ImageBatchError(f"{names[b]}: no tokens")
            labels = _field(sample, "labels", None)
            labels = row if labels is None else _as_list(labels)
            if len(labels) != len(row):
                raise ImageBatchError(f"{names[b]}: {len(labels)} labels for {len(row)} tokens")
            tokens[b, :len(row)] = torch.tensor(row)
            attention_mask[b, :len(row)] = True
            targets[b, :len(row)] = torch.tensor(labels)
        targets[tokens == self.image_token_id] = IGNORE_INDEX
        labels = torch.full_like(targets, IGNORE_INDEX)
        labels[:, :-1] = targets[:, 1:]

        tiles = [[_n_tiles(names[b], i, img) for i, img in enumerate(imgs)] for b, imgs in enumerate(images)]
        mask = cross_attention_mask(tokens, tiles, image_token_id=self.image_token_id, max_tiles=self.tiling.max_tiles,
                                    policy=self.policy, max_images=self.tiling.max_images, valid=attention_mask,
                                    names=names)
        batch = {"tokens": tokens, "attention_mask": attention_mask, "labels": labels, "cross_attention_mask": None,
                 "pixel_values": None, "aspect_ratio_ids": None, "aspect_ratio_mask": None}
        if any(images):
            try:
                pixels = batch_images(images, self.tiling, names=names)
            except ValueError as e:
                raise ImageBatchError(str(e)) from e
            batch.update(cross_attention_mask=mask, pixel_values=pixels.pixel_values,
                         aspect_ratio_ids=pixels.aspect_ratio_ids, aspect_ratio_mask=pixels.aspect_ratio_mask)
        return batch


def _n_tiles(name: str, index: int, image: Any) -> int:
    tiles = getattr(image, "tiles", None)
    if not torch.is_tensor(tiles) or tiles.ndim != 4:
        raise ImageBatchError(f"{name}: image {index} is not a tiled image (vision.tiling.TiledImage with tiles "
                              f"(n_tiles, 3, tile, tile)); got {type(image).__name__}")
    return int(tiles.shape[0])


def _field(obj: Any, name: str, *default):
    if isinstance(obj, Mapping):
        if name in obj:
            return obj[name]
    elif hasattr(obj, name):
        return getattr(obj, name)
    if default:
        return default[0]
    raise ImageBatchError(f"{type(obj).__name__} has no '{name}'")


def _as_list(ids) -> list[int]:
    return ids.tolist() if torch.is_tensor(ids) else [int(i) for i in ids]


def _sample_name(b: int, names: Optional[Sequence[Any]]) -> str:
    return str(names[b]) if names is not None else f"sample {b}"

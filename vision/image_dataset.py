"""A map-style dataset over a JSONL image manifest: rows read up front, images loaded and tiled lazily.

    data = ImageManifestDataset("scenes/train.jsonl", tiling_preset("tiny"))
    sample = data[0]                        # ImageSample: tiled images, caption, qa, messages, source
    batch = data.collate_images([data[0], data[1]])   # vision.tiling.ImageBatch

Rows (one JSON object per line; image paths relative to `image_root`, default the manifest's folder):
    scene:   {"image": "train/000000.png", "caption": "...", "qa": [{"question", "answer", "type"}]}
    generic: {"image": "a.jpg" | "images": ["a.jpg", "b.jpg"] | "images": [],
              "conversations": [{"role": "user", "content": "..."}, ...]}
             (LLaVA style {"from": "human"|"gpt"|"system", "value": ...} is read too)
A row needs at least one of caption / qa / conversations. Extra keys are kept in `ImageSample.meta`.

Bad data:
- A malformed row (bad JSON, missing/wrong keys, more images than `tiling.max_images`) is skipped when the
  dataset is built, with one `ImageDataWarning` naming `file:line`; more than `max_bad_fraction` of the
  rows bad (or no good row) raises `ImageDataError`.
- An unreadable image (missing, corrupt, truncated, too large: `vision.images.ImageError`) is found when
  the sample is first loaded: one warning names the image file and the manifest line, the sample is
  remembered as bad and the next good sample (index + 1, wrapping) is returned instead, so batches keep
  their size. Once at least `min_checked` samples were loaded and more than `max_bad_fraction` of them
  were bad, or every sample is bad, `ImageDataError` says so with the counts. `check_images=True` reads
  every image header when the dataset is built, so missing and garbage files count from the start.
  Counts are per process (each DataLoader worker keeps its own).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from torch.utils.data import Dataset

from vision.images import DEFAULT_MAX_PIXELS, ImageError, load_image, read_image_size
from vision.scenes import QA
from vision.tiling import ImageBatch, TiledImage, TilingConfig, batch_images, tile_image

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system"}


class ImageDataError(ValueError):
    """A manifest (or its images) with too many bad samples, or none usable."""


class ImageDataWarning(UserWarning):
    """One skipped row or unreadable image, naming the file (and manifest line)."""


@dataclass
class ImageSample:
    """One loaded sample. images: tiled, each tiles (n_tiles, 3, tile, tile)."""
    images: list[TiledImage]
    caption: str | None
    qa: list[QA]
    messages: list[dict]  # [{"role": "user"|"assistant"|"system", "content": str}]
    source: str           # "manifest.jsonl:LINE"
    index: int
    meta: dict = field(default_factory=dict)


@dataclass
class _Row:
    image_paths: list[Path]
    caption: str | None
    qa: list[QA]
    messages: list[dict]
    source: str
    meta: dict


class _BadRow(Exception):
    pass


def _parse_row(row, root: Path, max_images: int) -> tuple[list[Path], str | None, list[QA], list[dict], dict]:
    if not isinstance(row, dict):
        raise _BadRow("a row must be a JSON object")
    if "image" in row and "images" in row:
        raise _BadRow("give either 'image' or 'images', not both")
    if "image" in row:
        if not isinstance(row["image"], str) or not row["image"]:
            raise _BadRow("'image' must be a non-empty string")
        names = [row["image"]]
    elif "images" in row:
        names = row["images"]
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise _BadRow("'images' must be a list of non-empty strings")
    else:
        raise _BadRow("missing key 'image' (or 'images')")
    if len(names) > max_images:
        raise _BadRow(f"{len(names)} images, more than max_images={max_images}")
    caption = row.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise _BadRow("'caption' must be a string")
    qa = []
    for i, item in enumerate(row.get("qa") or []):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("question", "answer")):
            raise _BadRow(f"qa[{i}] needs string 'question' and 'answer'")
        qa.append(QA(item["question"], item["answer"], str(item.get("type", ""))))
    messages = []
    for i, turn in enumerate(row.get("conversations") or []):
        if not isinstance(turn, dict):
            raise _BadRow(f"conversations[{i}] must be an object")
        role, content = turn.get("role", turn.get("from")), turn.get("content", turn.get("value"))
        if role not in ROLE_ALIASES or not isinstance(content, str):
            raise _BadRow(f"conversations[{i}] needs a role in {sorted(ROLE_ALIASES)} and string content")
        messages.append({"role": ROLE_ALIASES[role], "content": content})
    if caption is None and not qa and not messages:
        raise _BadRow("no 'caption', 'qa' or 'conversations' to train on")
    meta = {k: v for k, v in row.items() if k not in ("image", "images", "caption", "qa", "conversations")}
    return [root / n for n in names], caption, qa, messages, meta


class ImageManifestDataset(Dataset):
    """Samples of a JSONL manifest (module notes); `len` counts the well-formed rows."""

    def __init__(self, manifest: str | Path, tiling: TilingConfig, *, image_root: str | Path | None = None,
                 max_bad_fraction: float = 0.5, min_checked: int = 10, check_images: bool = False,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, draft: bool = True):
        self.manifest = Path(manifest)
        self.tiling = tiling
        self.root = Path(image_root) if image_root is not None else self.manifest.parent
        self.max_bad_fraction, self.min_checked = max_bad_fraction, min_checked
        self.max_pixels = max_pixels
        self.draft_max_side = tiling.max_canvas_side if draft else None
        self.rows: list[_Row] = []
        self.bad_rows = 0
        self.bad_samples: set[int] = set()   # indices whose images could not be loaded
        self.checked: set[int] = set()       # indices whose images were tried
        self._read_manifest()
        if check_images:
            for index in range(len(self.rows)):
                self._check_headers(index)
            self._fail_if_mostly_bad(final=True)

    def _read_manifest(self) -> None:
        if not self.manifest.is_file():
            raise ImageDataError(f"{self.manifest}: manifest not found")
        total = 0
        with open(self.manifest, encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                total += 1
                source = f"{self.manifest}:{line_no}"
                try:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise _BadRow(f"not valid JSON ({e.msg})") from e
                    paths, caption, qa, messages, meta = _parse_row(row, self.root, self.tiling.max_images)
                except _BadRow as e:
                    self.bad_rows += 1
                    warnings.warn(f"{source}: skipped: {e}", ImageDataWarning, stacklevel=3)
                    continue
                self.rows.append(_Row(paths, caption, qa, messages, source, meta))
        if not self.rows or self.bad_rows > self.max_bad_fraction * total:
            raise ImageDataError(f"{self.manifest}: {self.bad_rows} of {total} rows are malformed "
                                 f"(more than max_bad_fraction={self.max_bad_fraction}); see the warnings")

    def __len__(self) -> int:
        return len(self.rows)

    def _mark_bad(self, index: int, error: ImageError) -> None:
        self.bad_samples.add(index)
        warnings.warn(f"{error.source}: unreadable image skipped ({error.reason}); "
                      f"sample {self.rows[index].source}", ImageDataWarning, stacklevel=4)

    def _check_headers(self, index: int) -> None:
        self.checked.add(index)
        for path in self.rows[index].image_paths:
            try:
                read_image_size(path)  # exists and is an image; decoding problems show when loaded
            except ImageError as e:
                self._mark_bad(index, e)
                return

    def _fail_if_mostly_bad(self, final: bool = False) -> None:
        n_checked, n_bad = len(self.checked), len(self.bad_samples)
        enough = final or n_checked >= self.min_checked
        if n_bad == len(self.rows) or (enough and n_bad > self.max_bad_fraction * n_checked):
            raise ImageDataError(f"{self.manifest}: {n_bad} of {n_checked} samples checked have unreadable "
                                 f"images (more than max_bad_fraction={self.max_bad_fraction}); see the warnings")

    def _load(self, index: int) -> ImageSample | None:
        row = self.rows[index]
        self.checked.add(index)
        images = []
        for path in row.image_paths:
            try:
                image = load_image(path, max_pixels=self.max_pixels, draft_max_side=self.draft_max_side)
            except ImageError as e:
                self._mark_bad(index, e)
                return None
            images.append(tile_image(image, self.tiling))
        return ImageSample(images, row.caption, row.qa, row.messages, row.source, index, row.meta)

    def __getitem__(self, index: int) -> ImageSample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        for step in range(len(self)):
            candidate = (index + step) % len(self)
            if candidate in self.bad_samples:
                continue
            sample = self._load(candidate)
            self._fail_if_mostly_bad()
            if sample is not None:
                return sample
        self._fail_if_mostly_bad(final=True)
        raise ImageDataError(f"{self.manifest}: no sample with readable images")  # unreachable in practice

    def collate_images(self, samples: Sequence[ImageSample], pad_images_to: int | None = None) -> ImageBatch:
        """The images of a list of samples as one ImageBatch (errors name each sample's manifest line)."""
        return batch_images([s.images for s in samples], self.tiling, names=[s.source for s in samples],
                            pad_images_to=pad_images_to)

    def report(self) -> str:
        return (f"{self.manifest}: {len(self.rows)} rows kept, {self.bad_rows} malformed rows skipped, "
                f"{len(self.bad_samples)} of {len(self.checked)} checked samples had unreadable images")

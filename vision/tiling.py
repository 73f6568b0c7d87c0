"""Image tiling (paper Sec 7; the same rule as transformers' `MllamaImageProcessor`).

    cfg = preset("paper")                               # 4 tiles of 336 (Mllama: "mllama-448", "mllama-560")
    tiled = tile_image(load_image("x.jpg"), cfg)        # TiledImage: tiles (n_tiles, 3, 336, 336)
    batch = batch_images([[tiled], [tiled, tiled]], cfg)
    batch.pixel_values                                  # (B, N_img_max, max_tiles, 3, tile, tile) float32

Per image:
1. Layouts: every (rows, cols) with rows * cols <= max_tiles; for 4 tiles 1x1, 1x2, 1x3, 1x4, 2x1, 2x2, 3x1,
   4x1 (rows x cols; "1x2" is one row of two tiles, a wide image). The aspect-ratio id is the 1-based index
   in that list, 0 marks a padding image slot.
2. Canvas: for each layout, the scale that fits the image inside it (min over the two sides). Among the
   scales >= 1 the smallest wins (least upscaling); when none is >= 1, the largest (least downscaling).
   Ties go to the smallest canvas area, then to the first layout in the list.
3. Resize keeping the aspect ratio: each side clipped to [tile_size, canvas side], the side with the
   smaller scale is set and the other follows (floor, at least 1 pixel). Bilinear with antialiasing on
   uint8 pixels through torchvision, as transformers 5.x's default (torchvision-backend)
   `MllamaImageProcessor` does, so pixels match it exactly (tests/vision/test_tiling.py). Its PIL-backend
   twin `MllamaImageProcessorPil` rounds resampled pixels differently: at most one 8-bit level in a few
   pixels (<= 0.015 after normalisation).
4. Pad with black at the right and bottom to the canvas, normalise with CLIP mean/std (padding becomes
   -mean/std), split row-major into tiles.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torchvision.transforms.v2 import functional as tvF

from vision.images import pil_to_tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class TilingConfig:
    """How images become tiles, and how many images a sample may carry."""
    tile_size: int = field(default=336, metadata={"range": (1, None), "help": "tile side in pixels"})
    max_tiles: int = field(default=4, metadata={"range": (1, None), "help": "most tiles per image"})
    max_images: int = field(default=4, metadata={"range": (1, None), "help": "most images per sample"})
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self):
        for key in ("tile_size", "max_tiles", "max_images"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TilingConfig.{key} must be a positive integer, got {value!r}")
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"TilingConfig mean/std need 3 values each (std > 0), got {self.mean}, {self.std}")

    @property
    def max_canvas_side(self) -> int:
        """Longest side a canvas can have (max_tiles x tile_size): a useful `draft_max_side` for loading."""
        return self.max_tiles * self.tile_size


PRESETS: dict[str, dict] = {
    "paper": dict(tile_size=336, max_tiles=4),       # Llama 3 paper Sec 7: up to 4 tiles of 336
    "mllama-448": dict(tile_size=448, max_tiles=4),  # Llama 3.2 Vision 11B/90B preprocessor variants
    "mllama-560": dict(tile_size=560, max_tiles=4),
    "tiny": dict(tile_size=28, max_tiles=4),         # tests and CPU runs (2 x 2 patches of 14)
}


def preset(name: str, **overrides) -> TilingConfig:
    """Config of a named preset, with field overrides. Unknown name -> error listing the presets."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown tiling preset '{name}'{hint}; known presets: {', '.join(PRESETS)}")
    return TilingConfig(**{**PRESETS[name], **overrides})


@lru_cache(maxsize=16)
def supported_aspect_ratios(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (rows, cols) layout with rows * cols <= max_tiles, in aspect-ratio-id order (id = index + 1)."""
    return tuple((rows, cols) for rows in range(1, max_tiles + 1) for cols in range(1, max_tiles + 1)
                 if rows * cols <= max_tiles)


def aspect_ratio_id(layout: tuple[int, int], max_tiles: int) -> int:
    """1-based id of a (rows, cols) layout (0 is kept for padding image slots)."""
    return supported_aspect_ratios(max_tiles).index(tuple(layout)) + 1


def optimal_canvas(height: int, width: int, max_tiles: int, tile_size: int) -> tuple[int, int]:
    """(canvas_height, canvas_width) for an image of height x width: step 2 of the module notes."""
    layouts = supported_aspect_ratios(max_tiles)
    canvases = [(rows * tile_size, cols * tile_size) for rows, cols in layouts]
    scales = [min(canvas_h / height, canvas_w / width) for canvas_h, canvas_w in canvases]
    upscales = [s for s in scales if s >= 1]
    chosen = min(upscales) if upscales else max(scales)
    candidates = [c for c, s in zip(canvases, scales) if s == chosen]
    return min(candidates, key=lambda c: c[0] * c[1])  # min() keeps the first of equal areas


def fit_to_canvas(height: int, width: int, canvas_height: int, canvas_width: int,
                  tile_size: int) -> tuple[int, int]:
    """(new_height, new_width) after the aspect-preserving resize of step 3."""
    target_width = min(max(width, tile_size), canvas_width)
    target_height = min(max(height, tile_size), canvas_height)
    scale_h, scale_w = target_height / height, target_width / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_height), target_width
    return target_height, min(math.floor(width * scale_h) or 1, target_width)


@dataclass
class TiledImage:
    """One image as tiles. tiles: (n_tiles, 3, tile, tile) float32, normalised; layout: (rows, cols)."""
    tiles: torch.Tensor
    layout: tuple[int, int]
    aspect_ratio_id: int
    original_size: tuple[int, int]  # (height, width) before resizing
    resized_size: tuple[int, int]   # (height, width) of the image inside its canvas

    @property
    def n_tiles(self) -> int:
        return self.tiles.shape[0]

    def aspect_ratio_mask(self, max_tiles: int) -> torch.Tensor:
        """(max_tiles,) long: 1 for the real tiles."""
        mask = torch.zeros(max_tiles, dtype=torch.long)
        mask[: self.n_tiles] = 1
        return mask


ImageLike = Union[Image.Image, torch.Tensor]


def tile_image(image: ImageLike, config: TilingConfig) -> TiledImage:
    """A PIL image (any mode) or a uint8 tensor (3, H, W) -> TiledImage (module notes, steps 1-4)."""
    pixels = pil_to_tensor(image) if isinstance(image, Image.Image) else image
    if not isinstance(pixels, torch.Tensor) or pixels.dtype != torch.uint8 or pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ValueError("tile_image takes a PIL image or a uint8 tensor (3, H, W); got "
                         f"{type(pixels).__name__} {getattr(pixels, 'dtype', '')} {tuple(getattr(pixels, 'shape', ()))}")
    height, width = pixels.shape[-2:]
    if height < 1 or width < 1:
        raise ValueError(f"tile_image got an empty image ({height}x{width})")
    tile = config.tile_size
    canvas_h, canvas_w = optimal_canvas(height, width, config.max_tiles, tile)
    new_h, new_w = fit_to_canvas(height, width, canvas_h, canvas_w, tile)
    resized = tvF.resize(pixels, [new_h, new_w], interpolation=tvF.InterpolationMode.BILINEAR, antialias=True)
    padded = F.pad(resized, (0, canvas_w - new_w, 0, canvas_h - new_h), value=0)
    mean = torch.tensor(config.mean).view(3, 1, 1) * 255.0
    std = torch.tensor(config.std).view(3, 1, 1) * 255.0
    normalised = (padded.float() - mean) / std
    rows, cols = canvas_h // tile, canvas_w // tile
    tiles = rearrange(normalised, "c (rows th) (cols tw) -> (rows cols) c th tw", rows=rows, cols=cols)
    return TiledImage(tiles.contiguous(), (rows, cols), aspect_ratio_id((rows, cols), config.max_tiles),
                      (height, width), (new_h, new_w))


@dataclass
class ImageBatch:
    """Images of B samples, padded to the most images in the batch (or `pad_images_to`).

    pixel_values: (B, N, max_tiles, 3, tile, tile) float32, zero where there is no tile or no image
    aspect_ratio_ids: (B, N) long, 1-based layout ids; 0 for an empty image slot
    aspect_ratio_mask: (B, N, max_tiles) long, 1 for real tiles; tile 0 is also 1 in empty image slots,
        exactly as transformers' MllamaImageProcessor builds it
    n_images: (B,) long; n_tiles: per sample, the tile count of each image
    """
    pixel_values: torch.Tensor
    aspect_ratio_ids: torch.Tensor
    aspect_ratio_mask: torch.Tensor
    n_images: torch.Tensor
    n_tiles: list[list[int]]

    def to(self, device) -> "ImageBatch":
        return replace(self, pixel_values=self.pixel_values.to(device),
                       aspect_ratio_ids=self.aspect_ratio_ids.to(device),
                       aspect_ratio_mask=self.aspect_ratio_mask.to(device), n_images=self.n_images.to(device))


def batch_images(samples: Sequence[Sequence[TiledImage]], config: TilingConfig, *,
                 names: Sequence[str] | None = None, pad_images_to: int | None = None) -> ImageBatch:
    """Stack the tiled images of B samples (each a list, possibly empty) into one ImageBatch.

    A sample with more than `config.max_images` images raises ValueError naming it (`names[i]`, or
    "sample i")."""
    names = list(names) if names is not None else [f"sample {i}" for i in range(len(samples))]
    if len(names) != len(samples):
        raise ValueError(f"batch_images got {len(samples)} samples but {len(names)} names")
    for name, images in zip(names, samples):
        if len(images) > config.max_images:
            raise ValueError(f"{name}: {len(images)} images, more than max_images={config.max_images}")
        for image in images:
            if image.tiles.shape[-1] != config.tile_size or image.n_tiles > config.max_tiles:
                raise ValueError(f"{name}: an image was tiled with another config ({tuple(image.tiles.shape)}; "
                                 f"expected at most {config.max_tiles} tiles of {config.tile_size})")
    most = max((len(images) for images in samples), default=0)
    if pad_images_to is not None and pad_images_to < most:
        raise ValueError(f"pad_images_to={pad_images_to} is fewer than the {most} images of a sample")
    n_slots = most if pad_images_to is None else pad_images_to
    batch, tile = len(samples), config.tile_size
    pixel_values = torch.zeros(batch, n_slots, config.max_tiles, 3, tile, tile)
    ids = torch.zeros(batch, n_slots, dtype=torch.long)
    mask = torch.zeros(batch, n_slots, config.max_tiles, dtype=torch.long)
    mask[:, :, 0] = 1
    for b, images in enumerate(samples):
        for i, image in enumerate(images):
            pixel_values[b, i, : image.n_tiles] = image.tiles
            ids[b, i] = image.aspect_ratio_id
            mask[b, i, : image.n_tiles] = 1
    n_images = torch.tensor([len(images) for images in samples], dtype=torch.long)
    return ImageBatch(pixel_values, ids, mask, n_images, [[im.n_tiles for im in images] for images in samples])


def tile_batch(samples: Sequence[Sequence[ImageLike]], config: TilingConfig, *,
               names: Sequence[str] | None = None, pad_images_to: int | None = None) -> ImageBatch:
    """`tile_image` on every image, then `batch_images` (the image-count check runs before any tiling)."""
    names = list(names) if names is not None else [f"sample {i}" for i in range(len(samples))]
    for name, images in zip(names, samples):
        if len(images) > config.max_images:
            raise ValueError(f"{name}: {len(images)} images, more than max_images={config.max_images}")
    tiled = [[tile_image(image, config) for image in images] for images in samples]
    return batch_images(tiled, config, names=names, pad_images_to=pad_images_to)

"""Image files -> RGB PIL images, with every failure reported as an `ImageError` that names the file.

    image = load_image("photo.jpg")                  # PIL.Image in mode "RGB", EXIF orientation applied
    width, height = read_image_size("photo.jpg")     # header only, nothing decoded

Decisions (documented here because they change pixels):
- Transparency (RGBA, LA, PA, La, RGBa, P or L/RGB with a `transparency` key) is composited on WHITE,
  as transformers' `convert_to_rgb` does, so pixels match the Mllama reference; `background=` changes it.
- 16-bit grey (I;16, I;16L, I;16B, I;16N) is scaled to 8 bits by v / 257 (rounded): 65535 -> 255. Pillow's
  own `convert("L")` clips at 255 instead, which turns most 16-bit images white. Mode "I" (32-bit ints, how
  older Pillow opens 16-bit PNG) is treated as 16-bit when its values lie in [0, 65535]; otherwise it is
  min-max scaled to [0, 255]. Mode "F" (float) is read as [0, 1] when its values lie there, else clipped
  to [0, 255].
- CMYK and YCbCr go through Pillow's conversion (no ICC colour management); "1" and "L" become grey RGB.
  A mode Pillow cannot convert to RGB raises `ImageError`.
- Multi-frame files (GIF, TIFF) give their first frame.
- EXIF orientation is applied (`ImageOps.exif_transpose`); an unreadable EXIF block leaves the pixels as
  stored rather than rejecting an image whose pixels are fine.
- Enormous images are refused BEFORE decoding: the header gives the size, and more than `max_pixels`
  (default 64M, e.g. 8000 x 8000) raises `ImageError`. Pillow's own decompression-bomb error (above
  ~179M pixels, e.g. 20000 x 20000) is turned into the same `ImageError`. A JPEG can instead be decoded
  at a reduced scale (1/2, 1/4, 1/8 through libjpeg's `draft`) when `draft_max_side` is given: its
  longer side then stays >= `draft_max_side` (use the tiling canvas, max_tiles x tile_size), which also
  lets a JPEG above `max_pixels` load when the reduced size fits.
- Truncated or corrupt files raise `ImageError` (Pillow's LOAD_TRUNCATED_IMAGES is never switched on).
  A 1 x 1 image is a valid image and loads.
"""
from __future__ import annotations

import io
import math
import os
import warnings
from typing import BinaryIO, Union

import numpy as np
import torch
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 64_000_000
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)

ImageSource = Union[str, os.PathLike, bytes, BinaryIO]

_ALPHA_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class ImageError(ValueError):
    """An image that cannot be used; `source` names the file (or the name given for bytes)."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def _name(source: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return "<bytes>" if isinstance(source, bytes) else getattr(source, "name", "<stream>")


def _open(source: ImageSource, label: str) -> Image.Image:
    """Open lazily (header only); every Pillow failure becomes an ImageError naming the file."""
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own max_pixels decides
            return Image.open(stream)
    except FileNotFoundError as e:
        raise ImageError(label, "file not found") from e
    except IsADirectoryError as e:
        raise ImageError(label, "is a directory, not an image file") from e
    except Image.DecompressionBombError as e:
        raise ImageError(label, f"refused before decoding: too many pixels ({e})") from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(label, "not an image file Pillow can identify (corrupt or unsupported format)") from e
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error ... on bad headers
        raise ImageError(label, f"cannot read the image header: {type(e).__name__}: {e}") from e


def read_image_size(source: ImageSource, *, name: str | None = None) -> tuple[int, int]:
    """(width, height) from the file header, without decoding pixels."""
    label = _name(source, name)
    with _open(source, label) as im:
        return im.size


def load_image(source: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               background: tuple[int, int, int] = WHITE, draft_max_side: int | None = None,
               name: str | None = None) -> Image.Image:
    """Decode a file (path, bytes or binary stream) into a mode-"RGB" PIL image (see the module notes).

    `max_pixels=None` disables the size check; `draft_max_side` lets JPEGs decode at a reduced scale;
    `name` labels bytes/streams in error messages."""
    label = _name(source, name)
    with _open(source, label) as im:
        width, height = im.size
        if width < 1 or height < 1:
            raise ImageError(label, f"empty image ({width}x{height})")
        if draft_max_side is not None and im.format == "JPEG" and max(width, height) > 2 * draft_max_side:
            scale = draft_max_side / max(width, height)
            im.draft("RGB" if im.mode not in ("L", "CMYK") else im.mode,
                     (math.ceil(width * scale), math.ceil(height * scale)))
        if max_pixels is not None and im.size[0] * im.size[1] > max_pixels:
            raise ImageError(label, f"refused before decoding: {im.size[0]}x{im.size[1]} = "
                                    f"{im.size[0] * im.size[1]:,} pixels is more than max_pixels={max_pixels:,}")
        try:
            im.load()
            oriented = _apply_exif_orientation(im)
            if oriented is im:  # closing `im` would invalidate its pixels
                oriented = im.copy()
            return to_rgb(oriented, background=background, name=label)
        except ImageError:
            raise
        except Exception as e:  # truncated data, broken streams, decoder errors
            raise ImageError(label, f"cannot decode the image (corrupt or truncated?): {type(e).__name__}: {e}") from e


def _apply_exif_orientation(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block: keep the pixels as stored (module notes)
        return im


def to_rgb(image: Image.Image, *, background: tuple[int, int, int] = WHITE, name: str = "<image>") -> Image.Image:
    """Any PIL mode -> mode "RGB" (a copy when the mode changes); rules in the module notes."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        grey = Image.fromarray(_to_uint8(np.asarray(image), mode), mode="L")
        return grey.convert("RGB")
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = (image.convert("LA") if mode == "La" else image).convert("RGBA")  # Pillow has no La -> RGBA
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(name, f"mode {mode!r} cannot be converted to RGB: {e}") from e


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """(H, W) 16/32-bit or float grey -> uint8 (module notes)."""
    values = values.astype(np.float64)
    if mode == "F":
        scaled = values * 255.0 if values.size and values.min() >= 0.0 and values.max() <= 1.0 else values
    elif mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
        low, high = values.min(), values.max()
        scaled = (values - low) * 255.0 / (high - low) if high > low else np.zeros_like(values)
    else:  # 16-bit range
        scaled = values / 257.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """Any-mode PIL image -> uint8 tensor (3, H, W) of its RGB pixels (shares no memory with the image)."""
    array = np.asarray(to_rgb(image), dtype=np.uint8)  # (H, W, 3)
    # The transpose copy in numpy: torch's permute(...).contiguous() on uint8 is ~500x slower on CPU here.
    return torch.from_numpy(array.transpose(2, 0, 1).copy())  # copy() is C-ordered and writable

"""Image loading: every PIL mode -> RGB, EXIF orientation, corrupt / truncated / tiny / enormous files."""
import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from vision.images import BLACK, ImageError, load_image, pil_to_tensor, read_image_size, to_rgb


def save(tmp_path, image, name, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def pixels(image):
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_rgb_round_trip(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = load_image(save(tmp_path, Image.fromarray(array), "rgb.png"))
    assert image.size == (7, 5)
    np.testing.assert_array_equal(np.asarray(image), array)


def test_rgba_composited_on_white_or_black(tmp_path):
    array = np.zeros((2, 2, 4), dtype=np.uint8)
    array[0, 0] = (200, 0, 0, 255)    # opaque red stays
    array[0, 1] = (200, 0, 0, 0)      # fully transparent -> background
    array[1, 0] = (200, 0, 0, 128)    # half: 200 * a + 255 * (1 - a), a = 128/255
    path = save(tmp_path, Image.fromarray(array, "RGBA"), "rgba.png")
    white = pixels(load_image(path))
    np.testing.assert_array_equal(white[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(white[0, 1], [255, 255, 255])
    a = 128 / 255
    np.testing.assert_allclose(white[1, 0], [200 * a + 255 * (1 - a), 255 * (1 - a), 255 * (1 - a)], atol=1)
    black = pixels(load_image(path, background=BLACK))
    np.testing.assert_array_equal(black[0, 1], [0, 0, 0])
    np.testing.assert_allclose(black[1, 0], [200 * a, 0, 0], atol=1)


def test_grey_modes(tmp_path):
    grey = load_image(save(tmp_path, Image.fromarray(np.array([[0, 77]], dtype=np.uint8), "L"), "l.png"))
    np.testing.assert_array_equal(pixels(grey), [[[0, 0, 0], [77, 77, 77]]])
    bits = Image.new("1", (2, 1))
    bits.putpixel((1, 0), 1)
    np.testing.assert_array_equal(pixels(load_image(save(tmp_path, bits, "one.png"))), [[[0] * 3, [255] * 3]])
    la = Image.fromarray(np.array([[[50, 255], [50, 0]]], dtype=np.uint8), "LA")
    np.testing.assert_array_equal(pixels(load_image(save(tmp_path, la, "la.png"))), [[[50] * 3, [255] * 3]])
    premultiplied = Image.new("La", (1, 1), (100, 128))  # 100 premultiplied by 128/255 -> 199 straight
    expected = 199 * 128 / 255 + 255 * (1 - 128 / 255)
    np.testing.assert_allclose(pixels(to_rgb(premultiplied)), [[[expected] * 3]], atol=1)


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 1
    path = save(tmp_path, image, "p.png", transparency=1)
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(pixels(load_image(path)), [[[255, 0, 0], [255, 255, 255]]])
    opaque = save(tmp_path, image.copy(), "p_opaque.gif")
    assert pixels(load_image(opaque))[0, 0].tolist() == [255, 0, 0]


def test_sixteen_bit_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1000, 25700, 65535]], dtype=np.uint16)
    path = save(tmp_path, Image.fromarray(values), "grey16.png")
    assert Image.open(path).mode == "I;16"
    # 1000 / 257 = 3.9 -> 4 (Pillow's own convert("L") would clip it to 255)
    np.testing.assert_array_equal(pixels(load_image(path))[0, :, 0], [0, 4, 100, 255])
    int32 = Image.fromarray(values.astype(np.int32), "I")
    np.testing.assert_array_equal(pixels(to_rgb(int32))[0, :, 1], [0, 4, 100, 255])
    signed = Image.fromarray(np.array([[-100, 0, 100]], dtype=np.int32), "I")  # outside 16 bits: min-max
    np.testing.assert_array_equal(pixels(to_rgb(signed))[0, :, 2], [0, 128, 255])
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    np.testing.assert_array_equal(pixels(to_rgb(unit))[0, :, 0], [0, 128, 255])


def test_cmyk(tmp_path):
    image = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (0, 255, 255, 0))
    path = save(tmp_path, image, "cmyk.tif")
    np.testing.assert_array_equal(pixels(load_image(path)), [[[255, 255, 255], [255, 0, 0]]])


def test_exif_orientation_applied(tmp_path):
    array = np.zeros((2, 3, 3), dtype=np.uint8)
    array[0, 0] = (255, 0, 0)  # red at top-left of the stored pixels
    image = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = save(tmp_path, image, "rotated.png", exif=exif)
    loaded = load_image(path)
    assert loaded.size == (2, 3)
    assert pixels(loaded)[0, 1].tolist() == [255, 0, 0]  # top-left moved to top-right


def test_corrupt_truncated_and_missing_files_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageError, match="garbage.png"):
        load_image(garbage)
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for fmt in ("png", "jpeg"):
        buffer = io.BytesIO()
        noise.save(buffer, format=fmt)
        cut = tmp_path / f"truncated.{fmt}"
        cut.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        with pytest.raises(ImageError, match=f"truncated.{fmt}.*(decode|truncated)"):
            load_image(cut)
    with pytest.raises(ImageError, match="nope.jpg: file not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="upload-7"):
        load_image(b"\x89PNG\r\n\x1a\n broken", name="upload-7")


def test_one_pixel_image_loads(tmp_path):
    image = load_image(save(tmp_path, Image.new("RGB", (1, 1), (9, 8, 7)), "dot.png"))
    assert image.size == (1, 1) and pixels(image)[0, 0].tolist() == [9, 8, 7]
    assert pil_to_tensor(image).shape == (3, 1, 1)


def _png_claiming_size(path, width, height):
    """A real 1x1 PNG whose header says width x height (the pixel data would not match: never decoded)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_enormous_images_refused_before_decoding(tmp_path):
    huge = _png_claiming_size(tmp_path / "huge.png", 20000, 20000)
    with pytest.raises(ImageError, match="huge.png"):  # beyond Pillow's bomb limit even the header is refused
        read_image_size(huge)
    start = time.perf_counter()
    with pytest.raises(ImageError, match="huge.png.*(too many pixels|refused before decoding)"):
        load_image(huge)
    big = _png_claiming_size(tmp_path / "big.png", 9000, 9000)  # under Pillow's limits, over ours
    assert read_image_size(big) == (9000, 9000)
    with pytest.raises(ImageError, match=r"big.png: refused before decoding: 9000x9000 = 81,000,000 pixels"):
        load_image(big)
    assert time.perf_counter() - start < 2.0
    small = save(tmp_path, Image.new("RGB", (300, 300)), "small.png")
    with pytest.raises(ImageError, match="max_pixels=10,000"):
        load_image(small, max_pixels=10_000)


def test_jpeg_draft_decodes_large_jpegs_at_reduced_scale(tmp_path):
    path = save(tmp_path, Image.new("RGB", (2000, 1000), (10, 200, 30)), "wide.jpg", quality=95)
    with pytest.raises(ImageError, match="max_pixels"):
        load_image(path, max_pixels=600_000)
    image = load_image(path, max_pixels=600_000, draft_max_side=400)
    assert image.size == (500, 250)  # 1/4 scale: the smallest libjpeg scale keeping the long side >= 400
    np.testing.assert_allclose(pixels(image)[100, 100], [10, 200, 30], atol=3)
    assert load_image(path, draft_max_side=1500).size == (2000, 1000)  # no reduction when it would undershoot

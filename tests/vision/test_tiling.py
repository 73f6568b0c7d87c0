"""Tiling: layouts, canvas choice, exact parity with transformers' MllamaImageProcessor, batching."""
import numpy as np
import pytest
import torch
from PIL import Image

from vision.tiling import (
    CLIP_MEAN,
    CLIP_STD,
    TilingConfig,
    aspect_ratio_id,
    batch_images,
    fit_to_canvas,
    optimal_canvas,
    preset,
    supported_aspect_ratios,
    tile_batch,
    tile_image,
)


def noise(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_layouts_and_ids_for_four_tiles():
    assert supported_aspect_ratios(4) == ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))
    assert [aspect_ratio_id(layout, 4) for layout in [(1, 1), (2, 2), (4, 1)]] == [1, 6, 8]
    assert supported_aspect_ratios(1) == ((1, 1),)


@pytest.mark.parametrize("size, canvas, resized", [
    ((100, 20), (112, 28), (100, 20)),   # tall: 4 rows (least upscaling, 1.12); fits, so only padded
    ((20, 100), (28, 112), (20, 100)),   # wide: 4 columns
    ((56, 56), (56, 56), (56, 56)),      # fits 2x2 exactly (scale 1)
    ((1, 1), (28, 28), (28, 28)),        # tiny: upscaled to the tile size
    ((10, 40), (28, 56), (10, 40)),      # small, wide: 1x2 (scale 1.4 < 2.1 of 1x3); a side >= tile: only padded
    ((600, 300), (56, 28), (56, 28)),    # larger than every canvas: least downscaling, ties -> smallest area
])
def test_canvas_and_resize_rule(size, canvas, resized):
    assert optimal_canvas(*size, max_tiles=4, tile_size=28) == canvas
    assert fit_to_canvas(*size, *canvas, tile_size=28) == resized


def test_canvas_rule_matches_transformers_functions():
    from transformers.models.mllama import image_processing_mllama as reference

    rng = np.random.default_rng(0)
    for height, width in rng.integers(1, 3000, size=(120, 2)).tolist():
        for tiles, tile in ((4, 28), (4, 448), (6, 336)):
            canvas = reference.get_optimal_tiled_canvas(height, width, tiles, tile)
            assert optimal_canvas(height, width, tiles, tile) == tuple(int(v) for v in canvas)
            assert fit_to_canvas(height, width, *canvas, tile) == tuple(
                int(v) for v in reference.get_image_size_fit_to_canvas(height, width, *canvas, tile))


def test_tile_image_shapes_padding_and_normalisation():
    config = preset("tiny")
    tiled = tile_image(Image.new("RGB", (20, 100), (255, 255, 255)), config)  # 100 tall, 20 wide
    assert tiled.layout == (4, 1) and tiled.aspect_ratio_id == 8 and tiled.tiles.shape == (4, 3, 28, 28)
    assert tiled.resized_size == (100, 20) and tiled.original_size == (100, 20)
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    black = -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(tiled.tiles[0, :, 5, 5], white)
    torch.testing.assert_close(tiled.tiles[3, :, 27, 27], black)  # right padding, bottom tile
    assert tiled.aspect_ratio_mask(4).tolist() == [1, 1, 1, 1]
    rgba = Image.new("RGBA", (28, 28), (0, 0, 0, 0))  # transparent -> white, through vision.images.to_rgb
    torch.testing.assert_close(tile_image(rgba, config).tiles[0, :, 0, 0], white)


@pytest.mark.parametrize("tile", [28, 448])
def test_parity_with_transformers_mllama_processor(tile):
    from transformers.models.mllama.image_processing_mllama import MllamaImageProcessor

    reference = MllamaImageProcessor(size={"height": tile, "width": tile}, max_image_tiles=4,
                                     image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    sizes = [(1, 1), (30, 17), (100, 20), (20, 100), (56, 56), (13, 57), (500, 300), (1000, 40), (600, 600)]
    images = [noise(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    samples = [images[:2], images[2:3], images[3:6], images[6:]]  # 2, 1, 3, 3 images: padding slots
    expected = reference(samples, return_tensors="pt")
    ours = tile_batch(samples, preset("tiny", tile_size=tile))
    assert ours.pixel_values.shape == expected["pixel_values"].shape == (4, 3, 4, 3, tile, tile)
    assert (ours.pixel_values - expected["pixel_values"]).abs().max().item() <= 1e-4
    assert torch.equal(ours.aspect_ratio_ids, expected["aspect_ratio_ids"])
    assert torch.equal(ours.aspect_ratio_mask, expected["aspect_ratio_mask"])
    assert ours.n_tiles == expected["num_tiles"]
    assert ours.n_images.tolist() == [2, 1, 3, 3]


def test_batch_padding_and_image_limit():
    config = preset("tiny", max_images=2)
    a, b = tile_image(noise(28, 56), config), tile_image(noise(56, 56), config)
    batch = batch_images([[a, b], [], [a]], config, pad_images_to=3)
    assert batch.pixel_values.shape == (3, 3, 4, 3, 28, 28)
    assert batch.aspect_ratio_ids.tolist() == [[2, 6, 0], [0, 0, 0], [2, 0, 0]]
    assert batch.aspect_ratio_mask[0].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert batch.pixel_values[1].abs().sum() == 0 and batch.pixel_values[0, 0, 2:].abs().sum() == 0
    assert batch.n_images.tolist() == [2, 0, 1]
    assert batch_images([[], []], config).pixel_values.shape == (2, 0, 4, 3, 28, 28)
    with pytest.raises(ValueError, match="dialog-17: 3 images, more than max_images=2"):
        batch_images([[a], [a, a, b]], config, names=["dialog-16", "dialog-17"])
    with pytest.raises(ValueError, match="sample 1: 3 images"):
        tile_batch([[], [noise(5, 5)] * 3], config)
    with pytest.raises(ValueError, match="another config"):
        batch_images([[a]], preset("tiny", tile_size=56))


def test_config_errors():
    with pytest.raises(ValueError, match="unknown tiling preset 'papr'.*did you mean 'paper'"):
        preset("papr")
    with pytest.raises(ValueError, match="max_tiles"):
        TilingConfig(max_tiles=0)
    assert preset("paper").tile_size == 336 and preset("mllama-560").max_canvas_side == 2240
    with pytest.raises(ValueError, match="uint8 tensor"):
        tile_image(torch.zeros(3, 8, 8), preset("tiny"))

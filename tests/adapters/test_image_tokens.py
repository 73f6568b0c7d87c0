"""Which tokens see which images, and the mixed text/image collate."""
import random

import pytest
import torch
from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                          get_cross_attention_token_mask)

from adapters.image_tokens import (IGNORE_INDEX, ImageBatchError, ImageTextCollator, cross_attention_mask,
                                   image_spans)
from vision.tiling import TiledImage, TilingConfig, aspect_ratio_id

IMG = 9


def tiled(layout=(1, 1), tile=28, seed=0):
    rows, cols = layout
    tiles = torch.randn(rows * cols, 3, tile, tile, generator=torch.Generator().manual_seed(seed))
    return TiledImage(tiles, layout, aspect_ratio_id(layout, 4), (rows * tile, cols * tile), (rows * tile, cols * tile))


def test_spans_per_policy():
    tokens = [1, 2, IMG, 3, IMG, IMG, 4, 5, IMG, 6]
    assert image_spans(tokens, IMG, "all_previous") == [(2, 10), (4, 10), (5, 10), (8, 10)]
    # most_recent: adjacent image tokens form a group, visible until the next group starts
    assert image_spans(tokens, IMG, "most_recent") == [(2, 4), (4, 8), (5, 8), (8, 10)]
    assert image_spans([1, 2, 3], IMG, "most_recent") == []
    with pytest.raises(ValueError, match="not one of"):
        image_spans(tokens, IMG, "latest")


def test_most_recent_equals_transformers_mllama_processor():
    rng = random.Random(0)
    for _ in range(200):
        tokens = [rng.choice([1, 2, IMG]) for _ in range(rng.randint(1, 14))]
        n_images = tokens.count(IMG)
        tiles = [rng.randint(1, 4) for _ in range(n_images)]
        ours = cross_attention_mask([tokens], [tiles], image_token_id=IMG, max_tiles=4, policy="most_recent")
        if n_images == 0:
            assert ours.shape == (1, len(tokens), 0, 4)
            continue
        spans = get_cross_attention_token_mask(tokens, IMG)
        ref = convert_sparse_cross_attention_mask_to_dense([spans], [tiles], 4, len(tokens))
        assert torch.equal(ours, torch.from_numpy(ref)), tokens


def test_mask_text_before_first_image_sees_nothing_and_padding_tiles_are_masked():
    tokens = [1, 2, 3, IMG, 4, IMG, 5]
    mask = cross_attention_mask([tokens], [[2, 4]], image_token_id=IMG, max_tiles=4, policy="all_previous")
    assert mask.shape == (1, 7, 2, 4)
    assert not mask[0, :3].any()  # text before the first image
    assert mask[0, 3, 0].tolist() == [1, 1, 0, 0] and not mask[0, 3, 1].any()
    assert mask[0, 5:, 1].tolist() == [[1, 1, 1, 1]] * 2 and mask[0, 5:, 0, :2].all()
    recent = cross_attention_mask([tokens], [[2, 4]], image_token_id=IMG, max_tiles=4, policy="most_recent")
    assert not recent[0, 5:, 0].any() and recent[0, 5:, 1].all()


def test_left_padding_is_never_an_image_token():
    tokens = torch.tensor([[IMG, IMG, 1, IMG, 2]])  # the first two columns are padding that happen to equal IMG
    valid = torch.tensor([[False, False, True, True, True]])
    mask = cross_attention_mask(tokens, [[1]], image_token_id=IMG, max_tiles=4, valid=valid)
    assert mask[0, :, 0, 0].tolist() == [0, 0, 0, 1, 1]


@pytest.mark.parametrize("tokens,tiles,message", [
    ([1, IMG, 2, IMG], [[1]], r"sample 0: 2 <\|image\|> token\(s\) .* but 1 image\(s\): an <\|image\|> token without"),
    ([1, 2], [[1]], r"sample 0: 1 image\(s\) but 0 <\|image\|> token\(s\) .*an image without a token"),
    ([IMG, IMG, IMG], [[1, 1, 1]], r"sample 0: 3 images, more than the configured max_images=2"),
    ([IMG, 2], [[5]], r"sample 0: image 0 has 5 tiles"),
])
def test_mask_errors_name_the_sample(tokens, tiles, message):
    with pytest.raises(ImageBatchError, match=message):
        cross_attention_mask([tokens], tiles, image_token_id=IMG, max_tiles=4, max_images=2)


def collator(**kw):
    return ImageTextCollator(image_token_id=IMG, tiling=TilingConfig(tile_size=28, max_tiles=4, max_images=2), **kw)


def test_collate_mixed_batch():
    samples = [
        {"tokens": [IMG, 1, 2, IMG, 3, 4], "images": [tiled((1, 2), seed=1), tiled((2, 2), seed=2)]},
        {"tokens": [5, 6, 7]},  # text only
        {"tokens": [1, 2, IMG, 3], "images": [tiled((1, 1), seed=3)], "labels": [-100, -100, -100, 3]},
    ]
    batch = collator()(samples)
    assert batch["tokens"].shape == (3, 6) and batch["tokens"][1, 3:].tolist() == [0, 0, 0]
    assert batch["attention_mask"].sum(-1).tolist() == [6, 3, 4]
    # labels[t] = target after t; -100 where the next token is an image token, padding or unlabelled
    assert batch["labels"][0].tolist() == [1, 2, IGNORE_INDEX, 3, 4, IGNORE_INDEX]
    assert batch["labels"][1].tolist() == [6, 7] + [IGNORE_INDEX] * 4
    assert batch["labels"][2].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 3] + [IGNORE_INDEX] * 3
    assert batch["pixel_values"].shape == (3, 2, 4, 3, 28, 28)
    assert torch.equal(batch["pixel_values"][0, 1], samples[0]["images"][1].tiles)
    assert not batch["pixel_values"][1].any() and not batch["pixel_values"][2, 1].any()
    assert batch["aspect_ratio_ids"].tolist() == [[2, 6], [0, 0], [1, 0]]
    assert batch["aspect_ratio_mask"][0].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["aspect_ratio_mask"][1].tolist() == [[1, 0, 0, 0], [1, 0, 0, 0]]  # Mllama's padding-image mask
    mask = batch["cross_attention_mask"]
    assert mask.shape == (3, 6, 2, 4)
    assert not mask[1].any()  # the text-only sample sees nothing
    assert not mask[2, :2].any() and mask[2, 2:4, 0, 0].all() and not mask[2, 4:].any()  # padding rows see nothing
    assert mask[0, 3:, 1].all() and mask[0, 0, 0].tolist() == [1, 1, 0, 0]


def test_collate_text_only_batch_has_no_image_tensors():
    batch = collator()([{"tokens": [1, 2]}, {"tokens": [3]}])
    assert batch["pixel_values"] is None and batch["cross_attention_mask"] is None
    assert batch["labels"].tolist() == [[2, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX]]


@pytest.mark.parametrize("sample,message", [
    ({"id": "cat-7", "tokens": [IMG, 1, IMG]}, r"sample 1 \(id cat-7\): 2 <\|image\|> token\(s\).*without an image"),
    ({"tokens": [1, 2], "images": [tiled()]}, r"sample 1: 1 image\(s\) but 0 .*an image without a token"),
    ({"tokens": [IMG, IMG, IMG], "images": [tiled()] * 3}, r"sample 1: 3 images, more than .*max_images=2"),
    ({"tokens": [IMG], "images": [torch.zeros(1, 3, 28, 28)]}, r"sample 1: image 0 is not a tiled image"),
    ({"tokens": [IMG], "images": [tiled(tile=14)]}, r"sample 1: an image was tiled with another config"),
    ({"tokens": [1, 2], "labels": [1]}, r"sample 1: 1 labels for 2 tokens"),
])
def test_collate_errors_name_the_sample(sample, message):
    with pytest.raises(ImageBatchError, match=message):
        collator()([{"tokens": [1, IMG], "images": [tiled()]}, sample])

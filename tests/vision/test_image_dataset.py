"""Image manifest dataset: both row formats, lazy tiling, skipping and counting bad rows and images."""
import json
import warnings

import numpy as np
import pytest
from PIL import Image

from vision.image_dataset import ImageDataError, ImageDataWarning, ImageManifestDataset
from vision.scenes import SceneConfig, write_scene_dataset
from vision.tiling import preset


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def make_images(folder, n, size=(40, 20)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return [f"img/{i}.png" for i in range(n)]


def test_scene_manifest_loads_and_tiles_lazily(tmp_path):
    manifest = write_scene_dataset(tmp_path, 6, split="train", seed=0, config=SceneConfig(image_size=56))
    data = ImageManifestDataset(manifest, preset("tiny"))
    assert len(data) == 6
    sample = data[2]
    assert sample.source.endswith("train.jsonl:3") and sample.qa and sample.caption
    (image,) = sample.images
    assert image.tiles.shape == (4, 3, 28, 28) and image.layout == (2, 2)
    batch = data.collate_images([data[0], data[1], data[2]])
    assert batch.pixel_values.shape == (3, 1, 4, 3, 28, 28) and batch.aspect_ratio_ids.tolist() == [[6]] * 3


def test_generic_rows_and_malformed_rows_counted(tmp_path):
    names = make_images(tmp_path / "img", 3)
    conversation = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "noise"}]
    manifest = write_rows(tmp_path / "mix.jsonl", [
        {"images": names[:2], "conversations": conversation, "id": "two-images"},
        {"images": [], "conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"image": names[2], "caption": "static"},
        "{broken json",
        {"image": names[0]},                                             # nothing to train on
        {"images": names, "caption": "too many"},                        # 3 > max_images = 2
    ])
    with pytest.warns(ImageDataWarning) as caught:
        data = ImageManifestDataset(manifest, preset("tiny", max_images=2))
    messages = [str(w.message) for w in caught]
    assert any("mix.jsonl:4: skipped: not valid JSON" in m for m in messages)
    assert any("mix.jsonl:5: skipped: no 'caption', 'qa' or 'conversations'" in m for m in messages)
    assert any("mix.jsonl:6: skipped: 3 images, more than max_images=2" in m for m in messages)
    assert len(data) == 3 and data.bad_rows == 3
    first = data[0]
    assert len(first.images) == 2 and first.meta == {"id": "two-images"}
    assert first.messages == [{"role": "user", "content": "<image>\nWhat is this?"},
                              {"role": "assistant", "content": "noise"}]
    assert data[1].images == [] and data[2].caption == "static"
    batch = data.collate_images([data[0], data[1], data[2]])
    assert batch.pixel_values.shape == (3, 2, 4, 3, 28, 28) and batch.n_images.tolist() == [2, 0, 1]


def test_mostly_malformed_manifest_fails(tmp_path):
    manifest = write_rows(tmp_path / "bad.jsonl", ["nope", "{}", {"image": "a.png", "caption": "ok"}])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageDataWarning)
        with pytest.raises(ImageDataError, match="bad.jsonl: 2 of 3 rows are malformed"):
            ImageManifestDataset(manifest, preset("tiny"))


def test_unreadable_image_skipped_with_warning(tmp_path):
    names = make_images(tmp_path / "img", 10)
    (tmp_path / names[3]).write_bytes(b"garbage")
    manifest = write_rows(tmp_path / "m.jsonl", [{"image": n, "caption": f"c{i}"} for i, n in enumerate(names)])
    data = ImageManifestDataset(manifest, preset("tiny"))
    with pytest.warns(ImageDataWarning, match=r"img/3.png: unreadable image skipped.*sample .*m.jsonl:4"):
        sample = data[3]
    assert sample.caption == "c4" and sample.index == 4  # the next good sample stands in
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImageDataWarning)  # known bad: skipped silently the second time
        assert data[3].index == 4
        for i in range(len(data)):
            data[i]
    assert data.bad_samples == {3} and "1 of 10 checked samples" in data.report()


def test_mostly_unreadable_images_fail_clearly(tmp_path):
    names = make_images(tmp_path / "img", 10)
    for name in names[:8]:
        (tmp_path / name).write_bytes(b"")
    manifest = write_rows(tmp_path / "m.jsonl", [{"image": n, "caption": "c"} for n in names])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageDataWarning)
        data = ImageManifestDataset(manifest, preset("tiny"), min_checked=4)
        with pytest.raises(ImageDataError, match=r"m.jsonl: \d+ of \d+ samples checked have unreadable images"):
            for i in range(len(data)):
                data[i]
        with pytest.raises(ImageDataError, match="8 of 10 samples checked"):
            ImageManifestDataset(manifest, preset("tiny"), check_images=True)

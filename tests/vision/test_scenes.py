"""Procedural scenes: determinism, answers consistent with the drawn scene, the held-out split, files."""
import json
import time
from collections import Counter

import numpy as np
import pytest

from vision.scenes import (
    COLOR_RGB,
    QA_TYPES,
    SceneConfig,
    SceneFormatError,
    generate_scene,
    generate_scenes,
    read_scene_dataset,
    write_scene_dataset,
)

HELDOUT = set(SceneConfig().heldout_pairs)


def expected_answer(scene, qa):
    """Recompute an answer from the scene's objects / word / digit (an independent reading of the question)."""
    objs, q = scene.objects, qa.question
    if qa.type == "color":
        shape = q.removeprefix("What color is the ").removesuffix("?")
        (match,) = [o for o in objs if o.shape == shape]
        return match.color
    if qa.type == "shape":
        color = q.removeprefix("What shape is the ").removesuffix(" object?")
        (match,) = [o for o in objs if o.color == color]
        return match.shape
    if qa.type == "count":
        what = q.removeprefix("How many ").removesuffix(" are there?")
        if what == "shapes":
            return str(len(objs))
        if what.endswith(" objects"):
            return str(sum(o.color == what.split()[0] for o in objs))
        return str(sum(o.shape + "s" == what for o in objs))
    if qa.type == "position":
        words = q.removeprefix("Is the ").removesuffix("?").split()
        a = next(o for o in objs if o.name == " ".join(words[:2]))
        b = next(o for o in objs if o.name == " ".join(words[-2:]))
        if "left" in q:
            return "left" if a.center[0] < b.center[0] else "right"
        return "above" if a.center[1] < b.center[1] else "below"
    if qa.type == "text":
        return scene.word if "word" in q else str(scene.digit)
    if qa.type == "yesno":
        name = q.removeprefix("Is there a ").removesuffix("?")
        return "yes" if any(o.name == name for o in objs) else "no"
    raise AssertionError(qa.type)


def test_deterministic_and_order_independent():
    a, b = generate_scene(5, "train", seed=3), generate_scene(5, "train", seed=3)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.qa == b.qa and a.caption == b.caption
    from_stream = list(generate_scenes(3, "train", seed=3, start=4))[1]
    assert np.array_equal(np.asarray(from_stream.image), np.asarray(a.image))
    other = generate_scene(5, "train", seed=4)
    assert not np.array_equal(np.asarray(other.image), np.asarray(a.image))


def named_objects(scene, qa) -> list:
    """The objects a question names (what grounding supervises), from its text: in scene order, except position
    questions (first named first)."""
    q, objects = qa.question, scene.objects
    if qa.type == "position":
        return sorted((o for o in objects if f" {o.name} " in q or q.endswith(f" {o.name}?")), key=lambda o: q.index(o.name))
    if qa.type == "color":
        return [o for o in objects if q == f"What color is the {o.shape}?"]
    if qa.type == "shape":
        return [o for o in objects if q == f"What shape is the {o.color} object?"]
    if qa.type in ("yesno", "count"):
        return [o for o in objects if o.name in q or f" {o.color} objects" in q or f" {o.shape}s " in q
                or f" {o.shape}es " in q or q == "How many shapes are there?"]
    return []


@pytest.mark.parametrize("split", ["train", "valid", "heldout"])
def test_answers_match_the_drawn_scene(split):
    config = SceneConfig(image_size=84)
    types = Counter()
    for scene in generate_scenes(150, split, seed=0, config=config):
        image = np.asarray(scene.image)
        assert image.shape == (84, 84, 3)
        for obj in scene.objects:  # each object really has its colour at its centre
            x, y = (int(round(v)) for v in obj.center)
            assert tuple(image[y, x]) == COLOR_RGB[obj.color], (scene.index, obj)
        for qa in scene.qa:
            assert qa.answer == expected_answer(scene, qa), (split, scene.index, qa)
            assert named_objects(scene, qa) == [scene.objects[i] for i in qa.objects], (split, scene.index, qa)
            assert qa.answer == qa.answer.strip().lower() and " " not in qa.answer
            types[qa.type] += 1
        assert len({qa.type for qa in scene.qa}) == len(scene.qa)  # qa_per_type = 1
        for obj in scene.objects:
            assert obj.name.split()[0] in scene.caption or obj.color in scene.caption
        if scene.word:
            assert f'"{scene.word}"' in scene.caption
    assert set(types) == set(QA_TYPES)


def test_heldout_pairs_never_in_training_or_valid():
    for scene in [*generate_scenes(300, "train", seed=1), *generate_scenes(100, "valid", seed=1)]:
        assert not any((o.color, o.shape) in HELDOUT for o in scene.objects)
        for qa in scene.qa:
            assert not any(f"{c} {s}" in qa.question for c, s in HELDOUT), qa
        assert scene.digit is None or scene.digit_index % 5 != 0
    seen = {(o.color, o.shape) for s in generate_scenes(300, "train", seed=1) for o in s.objects}
    assert {c for c, _ in seen} == set(COLOR_RGB) and {s for _, s in seen} == set(SceneConfig().shapes)
    for scene in generate_scenes(100, "heldout", seed=1):
        (novel,) = [o for o in scene.objects if (o.color, o.shape) in HELDOUT]
        others = [o for o in scene.objects if o is not novel]
        assert all(o.color != novel.color and o.shape != novel.shape for o in others)
        by_type = {qa.type: qa for qa in scene.qa}
        assert by_type["color"].answer == novel.color and by_type["shape"].answer == novel.shape
        assert any(f"{c} {s}" in by_type["yesno"].question for c, s in HELDOUT)
        if "position" in by_type:
            assert novel.name in by_type["position"].question
        assert scene.digit is None or scene.digit_index % 5 == 0
    # "valid" = new scenes of the training distribution, not copies of training scenes
    train_images = {np.asarray(s.image).tobytes() for s in generate_scenes(300, "train", seed=1)}
    assert not any(np.asarray(s.image).tobytes() in train_images for s in generate_scenes(100, "valid", seed=1))


def test_answer_balance_and_speed():
    start = time.perf_counter()
    scenes = list(generate_scenes(300, "train", seed=2, config=SceneConfig(image_size=64)))
    rate = len(scenes) / (time.perf_counter() - start)
    answers = Counter(qa.answer for s in scenes for qa in s.qa if qa.type == "yesno")
    assert 0.35 < answers["yes"] / sum(answers.values()) < 0.65
    counts = Counter(qa.answer for s in scenes for qa in s.qa if qa.type == "count")
    assert {"0", "1", "2"} <= set(counts)
    assert rate > 100, f"{rate:.0f} scenes/s"  # typically thousands per second on one core


def test_write_and_read_dataset(tmp_path):
    config = SceneConfig(image_size=56)
    manifest = write_scene_dataset(tmp_path / "scenes", 12, split="heldout", seed=5, config=config)
    records = read_scene_dataset(manifest)
    assert len(records) == 12 and manifest.name == "heldout.jsonl"
    for i, record in enumerate(records):
        scene = generate_scene(i, "heldout", seed=5, config=config)
        from PIL import Image
        assert np.array_equal(np.asarray(Image.open(record.image)), np.asarray(scene.image))
        assert record.qa == scene.qa and record.caption == scene.caption
        assert record.meta["index"] == i and len(record.meta["objects"]) == len(scene.objects)
    lines = manifest.read_text().splitlines()
    row = json.loads(lines[0])
    del row["caption"]
    lines[1] = json.dumps(row)
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(SceneFormatError, match=r"heldout.jsonl:2: missing key 'caption'"):
        read_scene_dataset(manifest)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown colour/shape names.*pink"):
        SceneConfig(colors=("red", "pink"))
    with pytest.raises(ValueError, match="no training pair.*circle"):
        SceneConfig(heldout_pairs=tuple((c, "circle") for c in COLOR_RGB))
    with pytest.raises(ValueError, match="max_objects"):
        SceneConfig(max_objects=8)
    with pytest.raises(ValueError, match="unknown scene split"):
        generate_scene(0, "test")

"""`herd data prepare images`: the procedural scene data set written to disk (idempotent).

    prepare_images(Path("data/images"), n_train=5000, n_heldout=500)
    -> data/images/train.jsonl, data/images/heldout.jsonl (+ train/*.png, heldout/*.png, *_config.json)

The manifests are rows of `vision.image_dataset` ({"image", "caption", "qa": [{question, answer, type}],
"meta"}), so `data.train_manifest` / `data.eval_manifest` of the image recipes and `vqa_eval`
(`data.format: manifest`) read them. The recipes do not need this step: without a manifest they generate
the same scenes on the fly (scene i of a split and seed is the same image either way).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from vision.scenes import SceneConfig, write_scene_dataset


def prepare_images(out_dir: Path, n_train: int = 5000, n_heldout: int = 500, seed: int = 0,
                   image_size: int = 112) -> str:
    """Write `n_train` training and `n_heldout` held-out scenes into out_dir; returns a one-line summary.
    A split whose manifest already holds that many rows written with the same config is left as it is."""
    out_dir = Path(out_dir)
    if n_train < 1 or n_heldout < 1:
        raise ValueError(f"prepare_images needs at least one scene per split, got {n_train} train, {n_heldout} held-out")
    config = SceneConfig(image_size=image_size)
    parts = []
    for split, n in (("train", n_train), ("heldout", n_heldout)):
        manifest = out_dir / f"{split}.jsonl"
        if _up_to_date(out_dir, split, n, seed, config):
            parts.append(f"{split} {n} scenes (kept)")
            continue
        write_scene_dataset(out_dir, n, split=split, seed=seed, config=config)
        meta = json.loads((out_dir / f"{split}_config.json").read_text())
        meta.update(n=n, seed=seed)
        (out_dir / f"{split}_config.json").write_text(json.dumps(meta, indent=1))
        questions = sum(len(json.loads(line)["qa"]) for line in manifest.read_text().splitlines() if line.strip())
        parts.append(f"{split} {n} scenes / {questions} questions")
    return f"{out_dir}: " + "; ".join(parts) + f" ({image_size}x{image_size} px, seed {seed})"


def _up_to_date(out_dir: Path, split: str, n: int, seed: int, config: SceneConfig) -> bool:
    manifest, saved = out_dir / f"{split}.jsonl", out_dir / f"{split}_config.json"
    if not (manifest.is_file() and saved.is_file()):
        return False
    try:
        meta = json.loads(saved.read_text())
    except json.JSONDecodeError:
        return False
    expected = json.loads(json.dumps(asdict(config)))  # tuples -> lists, as stored
    same = meta.pop("n", None) == n and meta.pop("seed", None) == seed and meta == expected
    rows = sum(1 for line in manifest.read_text().splitlines() if line.strip())
    return same and rows == n and all((out_dir / split / f"{i:06d}.png").is_file() for i in (0, n - 1))

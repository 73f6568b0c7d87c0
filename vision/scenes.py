"""Procedural VQA scenes: coloured shapes, a rendered word and a handwritten digit, with exact answers.

    scene = generate_scene(7, split="train", seed=0)          # Scene: PIL image, caption, qa, objects
    manifest = write_scene_dataset("data/scenes", 1000, split="heldout", seed=0)   # or "valid" (i.i.d.)
    records = read_scene_dataset(manifest)                    # list[SceneRecord]

A scene is a 3 x 3 grid of cells on a light background. 1-4 shapes (circle, square, triangle, star,
diamond; 6 colours; small or large) take distinct cells, jittered inside them; with probability 1/2 a
3-letter word is rendered in black in a free cell, and with probability 1/2 a digit from scikit-learn's
`load_digits()` (8 x 8 handwriting, scaled up) is pasted in another. Cells give unambiguous relative
positions: "left/right" is asked only across columns, "above/below" only across rows.

Questions (`QA_TYPES`), at most `qa_per_type` per type and scene, answers are single lower-case words or
digits (a scene's question of a type is drawn answer-first, uniformly over the distinct answers it offers): colour ("What color is the star?", only for a shape present once), shape ("What shape is the red
object?", only for a colour present once), count ("How many circles are there?", 0 included), position
("Is the red star to the left or to the right of the blue square?" -> left/right; above/below), text
("What word is written in the image?", "What digit is shown in the image?"), yes/no ("Is there a blue
circle?", present and absent asked equally often).

Held-out split: `heldout_pairs` (default red circle, green square, blue triangle, yellow star, purple
diamond) never appear in "train" scenes, and no train question mentions them. Every colour and every
shape still appears in training with other partners. A "heldout" scene holds exactly one object of a
held-out pair, with a shape and a colour no other object in the scene has, and its colour, shape,
position and yes/no questions are asked about that object; answering them needs the unseen combination.
Held-out scenes also use other handwriting: digits i % 5 == 0 of `load_digits()` are held-out, the rest train.
"valid" scenes are new scenes of the training distribution (training pairs and handwriting, their own random
stream): the i.i.d. test set, where "heldout" is the compositional one (like CLEVR-CoGenT's condition B).

Determinism: scene `index` of (`split`, `seed`) depends on nothing else (its own `random.Random`), so
scenes can be generated in any order or in parallel.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOR_RGB = {"red": (215, 35, 35), "green": (35, 160, 55), "blue": (35, 75, 220),
             "yellow": (235, 205, 20), "purple": (135, 50, 185), "orange": (250, 135, 10)}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
SIZE_RADIUS = {"small": 0.24, "large": 0.42}  # half-width as a fraction of the cell side
WORDS = ("cat", "dog", "sun", "cup", "hat", "box", "pen", "map", "key", "car",
         "bus", "egg", "fox", "owl", "bee", "ant", "jam", "ice", "tea", "zip")
DEFAULT_HELDOUT = (("red", "circle"), ("green", "square"), ("blue", "triangle"),
                   ("yellow", "star"), ("purple", "diamond"))
QA_TYPES = ("color", "shape", "count", "position", "text", "yesno")
SPLITS = ("train", "valid", "heldout")
GRID = 3
ROW_NAMES, COL_NAMES = ("top", "middle", "bottom"), ("left", "center", "right")
INK = (25, 25, 25)


class SceneFormatError(ValueError):
    """A scene manifest line that cannot be read (the message names file:line)."""


@dataclass
class SceneConfig:
    """What scenes contain. Every name must come from COLOR_RGB / SHAPES."""
    image_size: int = 112
    min_objects: int = 1
    max_objects: int = 4
    p_word: float = 0.5
    p_digit: float = 0.5
    colors: tuple[str, ...] = tuple(COLOR_RGB)
    shapes: tuple[str, ...] = SHAPES
    words: tuple[str, ...] = WORDS
    heldout_pairs: tuple[tuple[str, str], ...] = DEFAULT_HELDOUT
    qa_per_type: int = 1

    def __post_init__(self):
        self.colors, self.shapes, self.words = tuple(self.colors), tuple(self.shapes), tuple(self.words)
        self.heldout_pairs = tuple(tuple(p) for p in self.heldout_pairs)
        if self.image_size < 24:
            raise ValueError(f"SceneConfig.image_size must be >= 24 pixels, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= GRID * GRID - 2:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {GRID * GRID - 2}, "
                             f"got {self.min_objects}, {self.max_objects}")
        unknown = [c for c in self.colors if c not in COLOR_RGB] + [s for s in self.shapes if s not in SHAPES]
        unknown += [f"{c} {s}" for c, s in self.heldout_pairs if c not in self.colors or s not in self.shapes]
        if unknown:
            raise ValueError(f"SceneConfig: unknown colour/shape names {unknown}; colours {list(COLOR_RGB)}, "
                             f"shapes {list(SHAPES)}")
        if len(self.colors) < 2 or len(self.shapes) < 2 or not self.words or self.qa_per_type < 1:
            raise ValueError("SceneConfig needs >= 2 colours, >= 2 shapes, >= 1 word and qa_per_type >= 1")
        if not (0 <= self.p_word <= 1 and 0 <= self.p_digit <= 1):
            raise ValueError(f"SceneConfig p_word / p_digit must lie in [0, 1], got {self.p_word}, {self.p_digit}")
        for color, shape in self.heldout_pairs:
            if not any(c != color and s != shape for c, s in self.train_pairs):
                raise ValueError(f"SceneConfig: a held-out {color} {shape} scene has no other object to pair with")
        seen_c = {c for c, s in self.train_pairs}
        seen_s = {s for c, s in self.train_pairs}
        if seen_c != set(self.colors) or seen_s != set(self.shapes):
            raise ValueError("SceneConfig.heldout_pairs leave a colour or shape with no training pair: "
                             f"{sorted(set(self.colors) - seen_c) + sorted(set(self.shapes) - seen_s)}")

    @property
    def train_pairs(self) -> list[tuple[str, str]]:
        return [(c, s) for c in self.colors for s in self.shapes if (c, s) not in self.heldout_pairs]


@dataclass
class SceneObject:
    shape: str
    color: str
    size: str
    row: int
    col: int
    center: tuple[float, float] = (0.0, 0.0)  # (x, y) in pixels, jittered inside the cell

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def where(self) -> str:
        return cell_name(self.row, self.col)

    def radius(self, image_size: int) -> float:
        """Half-width in pixels in a scene of `image_size` pixels (circle radius; polygon circumradius)."""
        return SIZE_RADIUS[self.size] * (image_size / GRID)


def cell_name(row: int, col: int) -> str:
    """'top left', 'center', 'bottom' ... for a grid cell."""
    row_name, col_name = ROW_NAMES[row], COL_NAMES[col]
    if row_name == "middle":
        return col_name
    return row_name if col_name == "center" else f"{row_name} {col_name}"


@dataclass
class QA:
    question: str
    answer: str
    type: str
    objects: tuple[int, ...] = ()  # indices into Scene.objects of the objects the question names (for grounding)


@dataclass
class Scene:
    image: Image.Image
    caption: str
    qa: list[QA]
    objects: list[SceneObject]
    word: str | None
    digit: int | None
    split: str
    index: int
    digit_index: int | None = None  # which load_digits() sample was pasted


@dataclass
class SceneRecord:
    """One manifest line: the image path (resolved against the manifest's folder), caption, qa, meta."""
    image: Path
    caption: str
    qa: list[QA]
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Layout and drawing
# ----------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32) / 16.0, data.target


@lru_cache(maxsize=2)
def _digit_pool(split: str) -> tuple[int, ...]:
    """Indices of load_digits() used by a split: every 5th sample is held-out handwriting."""
    n = len(_digits()[1])
    return tuple(i for i in range(n) if (i % 5 == 0) == (split == "heldout"))


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _sample_objects(rng: random.Random, config: SceneConfig, split: str, cells: list[tuple[int, int]]):
    n = rng.randint(config.min_objects, config.max_objects)
    cell = config.image_size / GRID
    jitter = 0.08 * cell

    def place(color: str, shape: str) -> SceneObject:
        row, col = cells.pop()
        center = ((col + 0.5) * cell + rng.uniform(-jitter, jitter), (row + 0.5) * cell + rng.uniform(-jitter, jitter))
        return SceneObject(shape, color, rng.choice(tuple(SIZE_RADIUS)), row, col, center)

    objects = []
    if split == "heldout":
        color, shape = rng.choice(config.heldout_pairs)
        objects.append(place(color, shape))
        pool = [(c, s) for c, s in config.train_pairs if c != color and s != shape]
    else:
        pool = config.train_pairs
    while len(objects) < n:
        objects.append(place(*rng.choice(pool)))
    rng.shuffle(objects)
    return objects


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return list(zip(cx + radii * np.cos(angles), cy - radii * np.sin(angles)))
    raise ValueError(f"unknown shape {shape!r}")


def _render(rng: random.Random, config: SceneConfig, objects, word, word_cell, digit_image, digit_cell):
    size = config.image_size
    cell = size / GRID
    background = tuple(rng.randint(232, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        r = obj.radius(size)
        cx, cy = obj.center
        rgb = COLOR_RGB[obj.color]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r), fill=rgb)
    if word is not None:
        row, col = word_cell
        font_size = max(6, int(cell * 0.5))
        while font_size > 6 and _font(font_size).getlength(word) > 0.9 * cell:
            font_size -= 1
        draw.text(((col + 0.5) * cell, (row + 0.5) * cell), word, fill=INK, font=_font(font_size), anchor="mm")
    if digit_image is not None:
        row, col = digit_cell
        side = max(8, int(0.8 * cell))
        alpha = Image.fromarray(np.uint8(np.rint(digit_image * 255))).resize((side, side), Image.BILINEAR)
        left, top = int((col + 0.5) * cell - side / 2), int((row + 0.5) * cell - side / 2)
        image.paste(Image.new("RGB", (side, side), INK), (left, top), alpha)
    return image


# ----------------------------------------------------------------------------------------------------
# Captions and questions
# ----------------------------------------------------------------------------------------------------


def _plural(shape: str) -> str:
    return shape + "es" if shape.endswith("x") else shape + "s"


def _caption(rng: random.Random, objects, word, digit, word_where, digit_where) -> str:
    parts = [f"a {o.size} {o.color} {o.shape} at the {o.where}" if o.where != "center"
             else f"a {o.size} {o.color} {o.shape} in the center" for o in sorted(objects, key=lambda o: (o.row, o.col))]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    n = len(objects)
    template = rng.choice(("There {is_are} {n} {shape_word}: {listed}.", "The image shows {listed}.",
                           "{n_cap} {shape_word} on a light background: {listed}."))
    text = template.format(is_are="is" if n == 1 else "are", n=n, n_cap=str(n),
                           shape_word="shape" if n == 1 else "shapes", listed=listed)
    if word is not None:
        text += f' The word "{word}" is written at the {word_where}.'
    if digit is not None:
        text += f" The digit {digit} is drawn at the {digit_where}."
    return text


def _candidates(objects, word, digit, config: SceneConfig, split: str, rng: random.Random) -> dict[str, list]:
    """All askable questions per type: lists of (question, answer, about_heldout, named object indices)."""
    heldout = set(config.heldout_pairs)
    novel = lambda *objs: any((o.color, o.shape) in heldout for o in objs)  # noqa: E731
    shape_count = {s: sum(o.shape == s for o in objects) for s in config.shapes}
    color_count = {c: sum(o.color == c for o in objects) for c in config.colors}
    out = {t: [] for t in QA_TYPES}
    for i, o in enumerate(objects):
        if shape_count[o.shape] == 1:
            out["color"].append((f"What color is the {o.shape}?", o.color, novel(o), (i,)))
        if color_count[o.color] == 1:
            out["shape"].append((f"What shape is the {o.color} object?", o.shape, novel(o), (i,)))
    # Counts: every present shape and colour, the total, and one absent attribute (answer 0).
    absent = [f"How many {_plural(s)} are there?" for s in config.shapes if not shape_count[s]]
    absent += [f"How many {c} objects are there?" for c in config.colors if not color_count[c]]
    having = lambda test: tuple(i for i, o in enumerate(objects) if test(o))  # noqa: E731
    out["count"] = [(f"How many {_plural(s)} are there?", str(n), False, having(lambda o: o.shape == s))
                    for s, n in shape_count.items() if n]
    out["count"] += [(f"How many {c} objects are there?", str(n), False, having(lambda o: o.color == c))
                     for c, n in color_count.items() if n]
    out["count"] += [("How many shapes are there?", str(len(objects)), False, tuple(range(len(objects))))]
    out["count"] += [(rng.choice(absent), "0", False, ())] if absent else []
    unique = [i for i, o in enumerate(objects) if sum(p.name == o.name for p in objects) == 1]
    for i in unique:
        for j in unique:
            a, b = objects[i], objects[j]
            if a is b:
                continue
            if a.col != b.col:
                out["position"].append((f"Is the {a.name} to the left or to the right of the {b.name}?",
                                        "left" if a.col < b.col else "right", novel(a, b), (i, j)))
            if a.row != b.row:
                out["position"].append((f"Is the {a.name} above or below the {b.name}?",
                                        "above" if a.row < b.row else "below", novel(a, b), (i, j)))
    if word is not None:
        out["text"].append(("What word is written in the image?", word, False, ()))
    if digit is not None:
        out["text"].append(("What digit is shown in the image?", str(digit), False, ()))
    present = {(o.color, o.shape) for o in objects}
    pairs = [p for p in config.train_pairs if p not in present]
    if split == "heldout":
        pairs += [p for p in config.heldout_pairs if p not in present]
    yes = [(f"Is there a {c} {s}?", "yes", (c, s) in heldout, having(lambda o: (o.color, o.shape) == (c, s)))
           for c, s in sorted(present)]
    no = [(f"Is there a {c} {s}?", "no", (c, s) in heldout, ()) for c, s in pairs]
    out["yesno"] = yes if (rng.random() < 0.5 or not no) else no
    return out


def _pick_questions(candidates: dict[str, list], config: SceneConfig, split: str, rng: random.Random) -> list[QA]:
    qa = []
    for qtype in QA_TYPES:
        options = candidates[qtype]
        if split == "heldout" and any(c[2] for c in options):
            options = [c for c in options if c[2]]
        options = list(options)
        for _ in range(min(config.qa_per_type, len(options))):
            # Answer first, uniformly over the distinct answers on offer, then a question with that answer:
            # flattens answer priors (e.g. counts would otherwise be mostly "1").
            answer = rng.choice(sorted({c[1] for c in options}))
            question = rng.choice([c[0] for c in options if c[1] == answer])
            picked = next(c for c in options if c[0] == question and c[1] == answer)
            options.remove(picked)
            qa.append(QA(question, answer, qtype, picked[3]))
    return qa


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def generate_scene(index: int, split: str = "train", seed: int = 0, config: SceneConfig | None = None) -> Scene:
    """Scene `index` of (`split`, `seed`): deterministic, independent of every other scene."""
    if split not in SPLITS:
        raise ValueError(f"unknown scene split {split!r}; known: {SPLITS}")
    config = config or SceneConfig()
    rng = random.Random(f"herd-scenes:{seed}:{split}:{index}")
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    rng.shuffle(cells)
    objects = _sample_objects(rng, config, split, cells)
    word = rng.choice(config.words) if rng.random() < config.p_word else None
    word_cell = cells.pop() if word is not None else None
    digit_image, digit, digit_cell, k = None, None, None, None
    if rng.random() < config.p_digit:
        images, targets = _digits()
        k = rng.choice(_digit_pool(split))
        digit_image, digit, digit_cell = images[k], int(targets[k]), cells.pop()
    image = _render(rng, config, objects, word, word_cell, digit_image, digit_cell)
    caption = _caption(rng, objects, word, digit, word_cell and cell_name(*word_cell),
                       digit_cell and cell_name(*digit_cell))
    qa = _pick_questions(_candidates(objects, word, digit, config, split, rng), config, split, rng)
    return Scene(image, caption, qa, objects, word, digit, split, index, k)


def generate_scenes(n: int, split: str = "train", seed: int = 0, config: SceneConfig | None = None,
                    start: int = 0) -> Iterator[Scene]:
    """Scenes start .. start + n - 1."""
    for index in range(start, start + n):
        yield generate_scene(index, split, seed, config)


def write_scene_dataset(out_dir: str | Path, n: int, split: str = "train", seed: int = 0,
                        config: SceneConfig | None = None) -> Path:
    """Write `out_dir/<split>/<index>.png` and the manifest `out_dir/<split>.jsonl`; returns the manifest.

    One line per scene: {"image": "<split>/000000.png", "caption", "qa": [{question, answer, type, objects}],
    "meta": {split, index, seed, word, digit, digit_index, objects: [{shape, color, size, row, col, center}]}}."""
    config = config or SceneConfig()
    out_dir = Path(out_dir)
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    manifest = out_dir / f"{split}.jsonl"
    with open(manifest, "w") as f:
        for scene in generate_scenes(n, split, seed, config):
            rel = f"{split}/{scene.index:06d}.png"
            scene.image.save(out_dir / rel, compress_level=1)
            meta = dict(split=split, index=scene.index, seed=seed, word=scene.word, digit=scene.digit,
                        digit_index=scene.digit_index, objects=[asdict(o) for o in scene.objects])
            f.write(json.dumps(dict(image=rel, caption=scene.caption, qa=[asdict(q) for q in scene.qa],
                                    meta=meta)) + "\n")
    (out_dir / f"{split}_config.json").write_text(json.dumps(asdict(config), indent=1))
    return manifest


def read_scene_dataset(manifest: str | Path) -> list[SceneRecord]:
    """Read a manifest written by `write_scene_dataset`; any malformed line raises SceneFormatError."""
    manifest = Path(manifest)
    records = []
    with open(manifest) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{manifest}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SceneFormatError(f"{where}: not valid JSON ({e})") from e
            records.append(parse_scene_row(row, manifest.parent, where))
    return records


def parse_scene_row(row, root: Path, where: str) -> SceneRecord:
    """One {image, caption, qa} object -> SceneRecord; `where` (file:line) labels errors."""
    if not isinstance(row, dict):
        raise SceneFormatError(f"{where}: a line must be a JSON object")
    for key, kind in (("image", str), ("caption", str), ("qa", list)):
        if key not in row:
            raise SceneFormatError(f"{where}: missing key {key!r}")
        if not isinstance(row[key], kind):
            raise SceneFormatError(f"{where}: {key!r} must be a {kind.__name__}")
    qa = []
    for i, item in enumerate(row["qa"]):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("question", "answer")):
            raise SceneFormatError(f"{where}: qa[{i}] needs string 'question' and 'answer'")
        named = item.get("objects", [])
        if not isinstance(named, list) or not all(isinstance(n, int) and n >= 0 for n in named):
            raise SceneFormatError(f"{where}: qa[{i}]['objects'] must be a list of object indices")
        qa.append(QA(item["question"], item["answer"], str(item.get("type", "")), tuple(named)))
    return SceneRecord(root / row["image"], row["caption"], qa, dict(row.get("meta") or {}))

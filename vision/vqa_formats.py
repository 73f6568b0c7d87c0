"""Loaders for the VQA benchmark annotation files users bring, into one record type.

    records = load_vqav2("v2_OpenEnded_mscoco_val2014_questions.json",
                         "v2_mscoco_val2014_annotations.json", image_dir="val2014")
    records = load_textvqa("TextVQA_0.5.1_val.json", image_dir="train_images")
    records = load_docvqa("val/val_v1.0.json")                 # images relative to the JSON's folder
    records = load_chartqa("test/test_human.json")             # images in test/png/
    metric = METRIC_FOR_FORMAT["docvqa"]                       # "anls" (see vision.vqa_metrics)

Formats:
- VQAv2: questions JSON {"data_subtype": "val2014", "questions": [{question_id, image_id, question}]} and
  optional annotations JSON {"annotations": [{question_id, answers: [{answer, ...}] x 10, ...}]} (test
  splits have none: answers = []). Images: `image_dir / image_pattern.format(image_id=, data_subtype=)`,
  default "COCO_{data_subtype}_{image_id:012d}.jpg"; use "{image_id:012d}.jpg" for COCO 2017 folders.
- TextVQA: {"data": [{question_id, image_id, question, answers: [10 strings]}]}; images `{image_id}.jpg`.
- DocVQA: {"data": [{questionId, question, image: "documents/x.png", answers: [...]}]}; image paths are
  relative to `image_dir` (default: the JSON's folder).
- ChartQA: [{imgname, query, label}]; images `image_dir / imgname` (default: "png" beside the JSON);
  question ids are "<json stem>/<index>".
A missing key or a wrong type raises `VQAFormatError` naming the file, the entry index and its id.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

METRIC_FOR_FORMAT = {"vqav2": "vqa", "textvqa": "vqa", "docvqa": "anls", "chartqa": "relaxed"}
VQAV2_IMAGE_PATTERN = "COCO_{data_subtype}_{image_id:012d}.jpg"


class VQAFormatError(ValueError):
    """An annotation file that does not have the expected structure (the message names file and entry)."""


@dataclass
class VQARecord:
    """One question. `answers` are the reference answers (empty when the split has none)."""
    question_id: int | str
    image: Path
    question: str
    answers: list[str]
    dataset: str
    extra: dict[str, Any] = field(default_factory=dict)  # answer_type, question_type, ... when present


def _read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise VQAFormatError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VQAFormatError(f"{path}: not valid JSON ({e})") from e


def _entries(data: Any, key: str | None, path: Path) -> list:
    if key is None:
        if not isinstance(data, list):
            raise VQAFormatError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
        return data
    if not isinstance(data, dict) or key not in data:
        raise VQAFormatError(f"{path}: expected a JSON object with key {key!r}")
    if not isinstance(data[key], list):
        raise VQAFormatError(f"{path}: {key!r} must be a list")
    return data[key]


class _Entry:
    """Typed access to one entry; failures name file, index and the entry's id when it has one."""

    def __init__(self, entry: Any, path: Path, index: int, id_key: str | None):
        self.path, self.index = path, index
        ident = entry.get(id_key) if isinstance(entry, dict) and id_key else None
        self.where = f"{path}: entry {index}" + (f" ({id_key}={ident!r})" if ident is not None else "")
        if not isinstance(entry, dict):
            raise VQAFormatError(f"{self.where}: must be a JSON object, got {type(entry).__name__}")
        self.entry = entry

    def get(self, key: str, kinds: type | tuple[type, ...]):
        if key not in self.entry:
            raise VQAFormatError(f"{self.where}: missing key {key!r}")
        value = self.entry[key]
        if not isinstance(value, kinds) or isinstance(value, bool):
            names = kinds.__name__ if isinstance(kinds, type) else "/".join(k.__name__ for k in kinds)
            raise VQAFormatError(f"{self.where}: {key!r} must be {names}, got {type(value).__name__}")
        return value

    def strings(self, key: str, optional: bool = False) -> list[str]:
        if optional and key not in self.entry:
            return []
        values = self.get(key, list)
        if not all(isinstance(v, str) for v in values):
            raise VQAFormatError(f"{self.where}: {key!r} must be a list of strings")
        return values


def load_vqav2(questions_json: str | Path, annotations_json: str | Path | None = None,
               image_dir: str | Path | None = None, image_pattern: str = VQAV2_IMAGE_PATTERN) -> list[VQARecord]:
    """VQAv2 questions (+ annotations) -> records in question order."""
    questions_json = Path(questions_json)
    data = _read_json(questions_json)
    questions = _entries(data, "questions", questions_json)
    subtype = data.get("data_subtype", "")
    image_dir = Path(image_dir) if image_dir is not None else questions_json.parent
    annotations: dict = {}
    if annotations_json is not None:
        annotations_json = Path(annotations_json)
        for i, raw in enumerate(_entries(_read_json(annotations_json), "annotations", annotations_json)):
            entry = _Entry(raw, annotations_json, i, "question_id")
            answers = entry.get("answers", list)
            for j, answer in enumerate(answers):
                if not isinstance(answer, dict) or not isinstance(answer.get("answer"), str):
                    raise VQAFormatError(f"{entry.where}: answers[{j}] needs a string 'answer'")
            extra = {k: entry.entry[k] for k in ("question_type", "answer_type", "multiple_choice_answer")
                     if k in entry.entry}
            annotations[entry.get("question_id", (int, str))] = ([a["answer"] for a in answers], extra)
    records = []
    for i, raw in enumerate(questions):
        entry = _Entry(raw, questions_json, i, "question_id")
        qid, image_id = entry.get("question_id", (int, str)), entry.get("image_id", (int, str))
        answers, extra = [], {}
        if annotations_json is not None:
            if qid not in annotations:
                raise VQAFormatError(f"{entry.where}: no annotation for this question in {annotations_json}")
            answers, extra = annotations[qid]
        try:
            name = image_pattern.format(image_id=image_id, data_subtype=subtype)
        except (KeyError, ValueError, IndexError) as e:
            raise VQAFormatError(f"{entry.where}: image_pattern {image_pattern!r} cannot name image "
                                 f"{image_id!r}: {e}") from e
        records.append(VQARecord(qid, image_dir / name, entry.get("question", str), list(answers), "vqav2",
                                 dict(extra, image_id=image_id)))
    return records


def load_textvqa(json_path: str | Path, image_dir: str | Path | None = None) -> list[VQARecord]:
    """TextVQA (also ST-VQA-style files with the same keys) -> records."""
    json_path = Path(json_path)
    image_dir = Path(image_dir) if image_dir is not None else json_path.parent
    records = []
    for i, raw in enumerate(_entries(_read_json(json_path), "data", json_path)):
        entry = _Entry(raw, json_path, i, "question_id")
        image_id = entry.get("image_id", (str, int))
        records.append(VQARecord(entry.get("question_id", (int, str)), image_dir / f"{image_id}.jpg",
                                 entry.get("question", str), entry.strings("answers", optional=True), "textvqa",
                                 {"image_id": image_id}))
    return records


def load_docvqa(json_path: str | Path, image_dir: str | Path | None = None) -> list[VQARecord]:
    """DocVQA (single-page) -> records."""
    json_path = Path(json_path)
    image_dir = Path(image_dir) if image_dir is not None else json_path.parent
    records = []
    for i, raw in enumerate(_entries(_read_json(json_path), "data", json_path)):
        entry = _Entry(raw, json_path, i, "questionId")
        extra = {k: entry.entry[k] for k in ("question_types", "docId") if k in entry.entry}
        records.append(VQARecord(entry.get("questionId", (int, str)), image_dir / entry.get("image", str),
                                 entry.get("question", str), entry.strings("answers", optional=True), "docvqa",
                                 extra))
    return records


def load_chartqa(json_path: str | Path, image_dir: str | Path | None = None) -> list[VQARecord]:
    """ChartQA (test_human.json / test_augmented.json / train and val files) -> records."""
    json_path = Path(json_path)
    image_dir = Path(image_dir) if image_dir is not None else json_path.parent / "png"
    records = []
    for i, raw in enumerate(_entries(_read_json(json_path), None, json_path)):
        entry = _Entry(raw, json_path, i, "imgname")
        label = entry.get("label", (str, int, float))
        records.append(VQARecord(f"{json_path.stem}/{i}", image_dir / entry.get("imgname", str),
                                 entry.get("query", str), [str(label)], "chartqa"))
    return records


LOADERS: dict[str, Callable[..., list[VQARecord]]] = {
    "vqav2": load_vqav2, "textvqa": load_textvqa, "docvqa": load_docvqa, "chartqa": load_chartqa,
}


def load_vqa(fmt: str, *args, **kwargs) -> list[VQARecord]:
    """Dispatch on the format name ("vqav2", "textvqa", "docvqa", "chartqa")."""
    if fmt not in LOADERS:
        raise ValueError(f"unknown VQA format {fmt!r}; known: {', '.join(LOADERS)}")
    return LOADERS[fmt](*args, **kwargs)


def missing_images(records: list[VQARecord]) -> list[VQARecord]:
    """The records whose image file does not exist (check before a long evaluation)."""
    return [r for r in records if not r.image.is_file()]

"""VQA evaluation of a trained image model (a model folder with an image modality, e.g. an `image_adapter` run):
greedy short answers, scored per question.

Data (`data.format`): "scenes" (procedural scenes, held-out split by default, scored by exact match after the
official VQA answer normalisation), "manifest" (a JSONL manifest with qa rows, same metric), or a benchmark
annotation file through `vision.vqa_formats`: "vqav2" / "textvqa" (VQA accuracy over the human answers),
"docvqa" (ANLS), "chartqa" (relaxed accuracy). Besides the model itself (`image`), two controls answer the
same questions: `blind` (no `<|image|>` token and no image: the frozen LM with the prompt alone) and `blank`
(a plain grey image: what the adapters say without visual information, i.e. the answer priors they learned).

Outputs: `predictions.jsonl` (one line per question: id, type, question, answers, and per mode the
prediction and its score) and the summary (accuracy overall and per question type, per mode).
"""
from __future__ import annotations

import json
import random
import time
from contextlib import nullcontext
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
import yaml

from adapters.model_folder import find_model_folder, load_model
from adapters.speech_inputs import audio_span
from speech.speech_dataset import pad_waveforms
from training.distributed import is_rank0
from training.precision import resolve_device
from vision.tiling import TilingConfig
from vision.vqa_formats import METRIC_FOR_FORMAT, load_vqa, missing_images
from vision.vqa_metrics import METRICS, normalize_vqa_answer

from ..common import RunConfig
from ..config import ConfigError, ExistingPath, build
from ..image.model import resolve_path
from ..image.data import (PromptFormat, PromptSection, ScenesSection, VQAItem, blank_image, item_image,
                         manifest_vqa_items, scene_vqa_items)

MODES = ("image", "blind", "blank", "spoken")
SPOKEN_SEED = 0  # which held-out voice (and rate, pitch) speaks each question


def vqa_exact(prediction: str, answers) -> float:
    """1.0 when the prediction equals an answer after the official VQA normalisation (procedural data)."""
    pred = normalize_vqa_answer(prediction)
    return float(any(pred == normalize_vqa_answer(a) for a in answers))


SCORERS = dict(METRICS, vqa_exact=vqa_exact)


def answer_questions(model, fmt: PromptFormat, items: list[VQAItem], tiling: TilingConfig, *, mode: str = "image",
                     batch_size: int = 32, max_new_tokens: int = 5) -> list[str]:
    """Greedy answers to `items`: with their image (`image`), without image (`blind`), with a blank one, or with
    their image and the question spoken instead of typed (`spoken`: held-out espeak voices, `spoken_questions`)."""
    if mode not in MODES:
        raise ValueError(f"unknown evaluation mode {mode!r}; known: {MODES}")
    blank = blank_image(tiling) if mode == "blank" else None
    answers = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        speech = None
        if mode == "spoken":
            padded, lengths = pad_waveforms(spoken_questions(chunk, start))
            device = next(model.parameters()).device
            speech = model.speech_features(padded.to(device), lengths.to(device))
            spans = [audio_span(model.placeholder_count(int(n)), model.tokens.audio_tokens)
                     for n in speech.lengths.tolist()]
            prompts = [fmt.spoken_question_prompt(span) for span in spans]
        else:
            prompts = [fmt.question_prompt(it.question, with_image=mode != "blind") for it in chunk]
        images = None if mode == "blind" else [[blank if blank is not None else item_image(it, tiling)] for it in chunk]
        new = model.generate(prompts, images=images, speech=speech, max_new_tokens=max_new_tokens,
                             stop_ids=fmt.stop_ids, pad_id=fmt.pad_id)
        answers += [fmt.answer_text(ids) for ids in new]
    return answers


def spoken_questions(items: list[VQAItem], first: int = 0) -> list[torch.Tensor]:
    """Each item's question spoken by a held-out espeak voice (`speech.synthetic.split_voices`: accents no
    training set of `herd data prepare speech` uses), drawn per question index from SPOKEN_SEED: 16 kHz (T,)."""
    from speech.espeak import synthesize
    from speech.synthetic import english_voices, split_voices, voice_for
    _, heldout = split_voices(english_voices(), 0.2, 0)
    waves = []
    for k, item in enumerate(items):
        rng = random.Random(SPOKEN_SEED * 1_000_003 + first + k)
        waves.append(synthesize(item.question, voice_for(rng.choice(heldout), rng)))
    return waves


def evaluate_vqa(model, fmt: PromptFormat, items: list[VQAItem], tiling: TilingConfig, *, metric: str = "vqa_exact",
                 modes=("image",), batch_size: int = 32, max_new_tokens: int = 5) -> dict:
    """{mode: {"accuracy", "per_type": {type: accuracy}, "predictions": [...], "scores": [...]}} over `items`."""
    score = SCORERS[metric]
    was_training = model.training
    model.eval()
    out = {}
    try:
        for mode in modes:
            preds = answer_questions(model, fmt, items, tiling, mode=mode, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens)
            scores = [score(p, it.answers) if it.answers else float("nan") for p, it in zip(preds, items)]
            out[mode] = {"accuracy": _mean(scores), "per_type": per_type(items, scores),
                         "predictions": preds, "scores": scores}
    finally:
        model.train(was_training)
    return out


def per_type(items: list[VQAItem], scores: list[float]) -> dict[str, float]:
    groups = defaultdict(list)
    for item, s in zip(items, scores):
        groups[item.qtype or "all"].append(s)
    return {t: _mean(v) for t, v in sorted(groups.items())}


def _mean(values) -> float:
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else float("nan")


def write_predictions(path: Path, items: list[VQAItem], results: dict) -> None:
    with open(path, "w") as f:
        for i, item in enumerate(items):
            row = {"question_id": item.qid, "type": item.qtype, "question": item.question, "answers": item.answers}
            for mode, res in results.items():
                row[mode] = {"prediction": res["predictions"][i], "score": res["scores"][i]}
            f.write(json.dumps(row) + "\n")


def summarize(results: dict) -> dict:
    """Accuracy per mode (in [0, 1]), per type, and the margins over the controls in points."""
    summary = {}
    for mode, res in results.items():
        name = "vqa" if mode == "image" else mode
        summary[f"{name}_accuracy"] = res["accuracy"]
        summary[f"{name}_per_type"] = res["per_type"]
    for control in ("blind", "blank"):
        if "image" in results and control in results:
            summary[f"points_over_{control}"] = round(100 * (results["image"]["accuracy"]
                                                             - results[control]["accuracy"]), 2)
    if "spoken" in results:
        spoken = results["spoken"]["accuracy"]
        if "blind" in results:
            summary["spoken_points_over_blind"] = round(100 * (spoken - results["blind"]["accuracy"]), 2)
        if "image" in results and results["image"]["accuracy"] > 0:
            summary["spoken_over_typed"] = round(spoken / results["image"]["accuracy"], 3)
    return summary


# ---------------------------------------------------------------------------------------------- the recipe

@dataclass
class EvalData:
    format: Literal["scenes", "manifest", "vqav2", "textvqa", "docvqa", "chartqa"] = field(default="scenes", metadata={
        "help": "procedural scenes, a JSONL manifest with qa, or a benchmark annotation file"})
    split: Literal["heldout", "valid", "train"] = field(default="heldout", metadata={
        "help": "scenes split: heldout (unseen colour-shape pairs), valid (new training-distribution scenes)"})
    scenes: Optional[ScenesSection] = field(default=None, metadata={"help": "null = the trained run's data.scenes"})
    annotations: Optional[ExistingPath] = field(default=None, metadata={
        "help": "manifest JSONL, or the benchmark JSON (VQAv2: the questions file)"})
    vqav2_answers: Optional[ExistingPath] = field(default=None, metadata={"help": "VQAv2 annotations JSON"})
    image_dir: Optional[ExistingPath] = field(default=None, metadata={"help": "images folder (format default if null)"})
    limit: Optional[int] = field(default=None, metadata={"range": (1, None), "help": "first N questions only"})

    def __post_init__(self):
        if self.format not in ("scenes",) and self.annotations is None:
            raise ValueError(f"key 'annotations': data.format={self.format} needs an annotation file")


@dataclass
class Config(RunConfig):
    recipe: str = "vqa_eval"
    model: ExistingPath = field(default="runs/quickstart_image/latest", metadata={
        "help": "a model folder with an image modality, or a run folder holding one as final/ (image_adapter)"})
    language_path: Optional[str] = field(default=None, metadata={
        "help": "evaluate with this LM instead of the recorded one (same shape, not checked against the recorded "
                "digest; e.g. the instruct LM)"})
    data: EvalData = field(default_factory=EvalData)
    metric: Optional[Literal["vqa_exact", "vqa", "anls", "relaxed", "exact"]] = field(default=None, metadata={
        "help": "null = vqa_exact for scenes/manifest, the benchmark's own metric otherwise"})
    controls: list[str] = field(default_factory=lambda: ["blind", "blank"], metadata={
        "help": "of blind, blank, spoken (the image with the question spoken by held-out espeak voices: a model "
                "with image and speech modalities, e.g. `herd compose` output)"})
    batch_size: int = field(default=32, metadata={"range": (1, None)})
    max_new_tokens: int = field(default=8, metadata={"range": (1, None)})
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"

    def __post_init__(self):
        bad = [c for c in self.controls if c not in ("blind", "blank", "spoken")]
        if bad:
            raise ValueError(f"key 'controls': {bad} are not among blind, blank, spoken")
        find_model_folder(Path(self.model))
        if self.language_path is not None:
            resolve_path(self.language_path, "language_path")


def eval_items(cfg: Config, trained_cfg: dict, tiling: TilingConfig) -> tuple[list[VQAItem], str]:
    d = cfg.data
    if d.format == "scenes":
        scenes = d.scenes or build(ScenesSection, (trained_cfg.get("data") or {}).get("scenes") or {}, "data.scenes")
        items = scene_vqa_items(scenes, d.split)
    elif d.format == "manifest":
        items = manifest_vqa_items(Path(d.annotations), tiling)
    else:
        args = (d.annotations, d.vqav2_answers) if d.format == "vqav2" else (d.annotations,)
        records = load_vqa(d.format, *args, image_dir=d.image_dir)
        missing = missing_images(records)
        if missing:
            raise ConfigError(f"data.image_dir: {len(missing)} of {len(records)} images are missing, e.g. "
                              f"{missing[0].image} (question {missing[0].question_id})")
        items = [VQAItem(str(r.question_id), r.image, r.question, r.answers,
                         str(r.extra.get("answer_type", r.dataset)), r.extra) for r in records]
    default_metric = "vqa_exact" if d.format in ("scenes", "manifest") else METRIC_FOR_FORMAT[d.format]
    return items[:d.limit] if d.limit else items, cfg.metric or default_metric


def run(cfg: Config, run_dir: Path) -> dict:
    t0 = time.time()
    device = resolve_device(cfg.device)
    folder = find_model_folder(Path(cfg.model))
    language_path = str(resolve_path(cfg.language_path, "language_path")) if cfg.language_path else None
    loaded = load_model(folder, device=device, language_path=language_path, verify=language_path is None)
    model, image = loaded.model, loaded.model.config.image
    if image is None:
        raise ConfigError(f"key 'model': the model in {folder} has no image modality")
    if "spoken" in cfg.controls and model.config.speech is None:
        raise ConfigError(f"key 'controls': spoken questions need a speech modality; the model in {folder} has "
                          f"{', '.join(model.config.modalities)} (join an image and a speech folder: herd compose)")
    trained_yaml = folder.parent / "config.yaml"
    trained_cfg = yaml.safe_load(trained_yaml.read_text()) if trained_yaml.is_file() else {}
    tiling = TilingConfig(tile_size=image.vision.image_size, max_tiles=image.vision.max_num_tiles,
                          max_images=image.max_images)
    prompt = PromptSection(**loaded.settings.get("image", {}).get("prompt", {}))
    fmt = PromptFormat(loaded.tokenizer, model.tokens.image, prompt, model.config.language.max_seq_len)
    items, metric = eval_items(cfg, trained_cfg, tiling)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
    with autocast:
        results = evaluate_vqa(model, fmt, items, tiling, metric=metric, modes=["image"] + list(cfg.controls),
                               batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens)
    if is_rank0():
        write_predictions(run_dir / "predictions.jsonl", items, results)
    summary = {"model": str(folder), "data": cfg.data.format, "metric": metric, "questions": len(items)}
    summary.update(summarize(results))
    summary["wall_time_s"] = round(time.time() - t0, 1)
    return summary


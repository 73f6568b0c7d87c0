"""Image-text data for the image recipes: procedural scenes or JSONL manifests as training samples, held-out
VQA questions, and the prompt format that turns both into token ids with loss labels.

Prompt styles (`PromptSection.style`):
- "plain" (a base LM): `[BOS] <|image|>` then per question `question_template` + " answer" + EOS, the answer and
  its EOS trained; a caption sample is `[BOS] <|image|> caption EOS`, the caption and EOS trained.
- "chat" (an instruct LM): the LM's own chat format (`language.chat_format.chat_format_for`: Llama 3 headers,
  or the checkpoint's jinja template such as SmolLM2's `<|im_start|>`), one user turn per question (question +
  `instruction`) and one assistant turn per answer, loss on the assistant tokens only (`target_mask`). The
  `<|image|>` token goes first (after BOS when the format starts with one), so every text token sees the image.
Evaluation prompts are the same up to the answer (chat: the generation prompt); the image-blind prompt drops
the `<|image|>` token and the image.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from PIL import Image

from adapters.image_tokens import IGNORE_INDEX
from language.chat_data import DataError
from language.chat_format import Message, chat_format_for
from vision.image_dataset import ImageManifestDataset, ImageSample
from vision.images import load_image
from vision.scenes import QA_TYPES, SPLITS, SceneConfig, generate_scene
from vision.tiling import TiledImage, TilingConfig, tile_image

from ..config import ExistingPath


@dataclass
class PromptSection:
    style: Literal["plain", "chat"] = field(default="plain", metadata={"help": "plain (base LM) or the LM's chat format"})
    question_template: str = field(default="Question: {question} Answer:", metadata={"help": "plain style"})
    instruction: str = field(default="Answer with one word.", metadata={"help": "chat style: after each question"})
    caption_prompt: str = field(default="Describe the image.", metadata={"help": "chat style: user turn of captions"})
    system: Optional[str] = field(default=None, metadata={"help": "chat style: system message"})

    def __post_init__(self):
        if "{question}" not in self.question_template:
            raise ValueError("key 'question_template' must contain {question}")


@dataclass
class ScenesSection:
    """Procedural scenes (vision/scenes.py): training scenes from split "train"; evaluation on `eval_splits`:
    "valid" (new scenes of the training distribution) and/or "heldout" (colour-shape pairs never trained on)."""
    image_size: int = field(default=112, metadata={"range": (24, None)})
    min_objects: int = field(default=1, metadata={"range": (1, 7)})
    max_objects: int = field(default=4, metadata={"range": (1, 7)})
    p_word: float = field(default=0.5, metadata={"range": (0.0, 1.0)})
    p_digit: float = field(default=0.5, metadata={"range": (0.0, 1.0)})
    qa_types: list[str] = field(default_factory=lambda: list(QA_TYPES), metadata={"help": f"of {', '.join(QA_TYPES)}"})
    qa_per_type: int = field(default=1, metadata={"range": (1, None)})
    train_scenes: int = field(default=0, metadata={"range": (0, None), "help": "0 = a new scene for every sample"})
    eval_scenes: int = field(default=200, metadata={"range": (1, None), "help": "scenes per evaluation split"})
    eval_splits: list[str] = field(default_factory=lambda: ["heldout"], metadata={
        "help": "evaluation splits, the first drives periodic evals and eval_loss: heldout (unseen colour-shape "
                "pairs), valid (new scenes of the training distribution)"})
    seed: int = 0

    def __post_init__(self):
        bad = [t for t in self.qa_types if t not in QA_TYPES]
        if bad or not self.qa_types:
            raise ValueError(f"key 'qa_types': {bad or 'empty'}; choose from {list(QA_TYPES)}")
        test_splits = [s for s in SPLITS if s != "train"]
        wrong = [s for s in self.eval_splits if s not in test_splits]
        if wrong or not self.eval_splits or len(set(self.eval_splits)) < len(self.eval_splits):
            raise ValueError(f"key 'eval_splits': {self.eval_splits}; distinct names of {', '.join(test_splits)}")
        self.scene_config()

    def scene_config(self) -> SceneConfig:
        return SceneConfig(image_size=self.image_size, min_objects=self.min_objects, max_objects=self.max_objects,
                           p_word=self.p_word, p_digit=self.p_digit, qa_per_type=self.qa_per_type)


@dataclass
class DataSection:
    task: Literal["vqa", "caption"] = field(default="vqa", metadata={
        "help": "vqa: loss on answers; caption: loss on caption tokens (adapter pre-training)"})
    train_manifest: Optional[ExistingPath] = field(default=None, metadata={
        "help": "JSONL manifest (vision/image_dataset.py rows); null = procedural scenes"})
    eval_manifest: Optional[ExistingPath] = field(default=None, metadata={
        "help": "held-out JSONL manifest with qa; null = held-out procedural scenes"})
    scenes: ScenesSection = field(default_factory=ScenesSection)
    qa_per_sample: int = field(default=3, metadata={"range": (1, None), "help": "questions per training sequence"})


# ---------------------------------------------------------------------------------------------- samples

class SceneSamples:
    """Procedural scenes as `ImageSample`s: index i is scene i (mod train_scenes when set) of (split, seed).
    With `need_qa`, a scene without a question of the configured types is replaced by scene i + k * 1,000,003
    for the first k that has one (deterministic)."""

    STRIDE = 1_000_003

    def __init__(self, scenes: ScenesSection, tiling: TilingConfig, split: str = "train", need_qa: bool = False):
        self.scenes, self.tiling, self.split, self.need_qa = scenes, tiling, split, need_qa
        self.config = scenes.scene_config()

    def __getitem__(self, index: int) -> ImageSample:
        if self.scenes.train_scenes:
            index %= self.scenes.train_scenes
        for attempt in range(100):
            scene = generate_scene(index + attempt * self.STRIDE, self.split, self.scenes.seed, self.config)
            qa = [q for q in scene.qa if q.type in self.scenes.qa_types]
            if qa or not self.need_qa:
                return ImageSample([tile_image(scene.image, self.tiling)], scene.caption, qa, [],
                                   f"scene {self.split}/{scene.index}", scene.index,
                                   {"scene_objects": scene.objects, "image_size": self.config.image_size})
        raise DataError(f"no {self.split} scene near index {index} has a question of types {self.scenes.qa_types}")


class ManifestSamples:
    """A JSONL manifest, reshuffled every epoch with a seeded permutation (index -> sample is deterministic)."""

    def __init__(self, manifest: Path, tiling: TilingConfig, seed: int):
        self.dataset = ImageManifestDataset(manifest, tiling)
        self.seed, self._perm = seed, (None, None)

    def __getitem__(self, index: int) -> ImageSample:
        epoch, offset = divmod(index, len(self.dataset))
        if self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.dataset), generator=gen).tolist())
        return self.dataset[self._perm[1][offset]]


def training_samples(data: DataSection, tiling: TilingConfig, seed: int, split: str = "train"):
    """Training (or held-out loss) samples: the manifest, or procedural scenes of `split`."""
    manifest = data.train_manifest if split == "train" else data.eval_manifest
    if manifest:
        return ManifestSamples(Path(manifest), tiling, seed)
    return SceneSamples(data.scenes, tiling, split, need_qa=data.task == "vqa")


@dataclass
class VQAItem:
    """One evaluation question. image: a PIL image, or a path loaded when the question is asked."""
    qid: str
    image: Any
    question: str
    answers: list[str]
    qtype: str = ""
    extra: dict = field(default_factory=dict)


def scene_vqa_items(scenes: ScenesSection, split: str = "heldout", limit: Optional[int] = None) -> list[VQAItem]:
    """Every question of the first `eval_scenes` scenes of `split` (of the configured types)."""
    config, items = scenes.scene_config(), []
    for index in range(scenes.eval_scenes if limit is None else limit):
        scene = generate_scene(index, split, scenes.seed, config)
        for k, qa in enumerate(q for q in scene.qa if q.type in scenes.qa_types):
            items.append(VQAItem(f"{split}/{index}/{k}", scene.image, qa.question, [qa.answer], qa.type))
    return items


def manifest_vqa_items(manifest: Path, tiling: TilingConfig) -> list[VQAItem]:
    """The qa of every row of a JSONL manifest (one image per row)."""
    rows = ImageManifestDataset(manifest, tiling).rows
    items = [VQAItem(f"{row.source}/{k}", row.image_paths[0], qa.question, [qa.answer], qa.type)
             for row in rows if len(row.image_paths) == 1 for k, qa in enumerate(row.qa)]
    if not items:
        raise DataError(f"{manifest}: no row with one image and a 'qa' list to evaluate")
    return items


def item_image(item: VQAItem, tiling: TilingConfig) -> TiledImage:
    image = item.image if isinstance(item.image, Image.Image) else load_image(item.image,
                                                                              draft_max_side=tiling.max_canvas_side)
    return tile_image(image, tiling)


def blank_image(tiling: TilingConfig, size: int = 112) -> TiledImage:
    """A plain light-grey image (the scenes' background): the 'image carries no information' control."""
    return tile_image(Image.new("RGB", (size, size), (243, 243, 243)), tiling)


# ---------------------------------------------------------------------------------------------- prompts

class PromptFormat:
    """Samples -> {"tokens", "labels", "images"} for `adapters.image_tokens.ImageTextCollator`; questions ->
    generation prompts; generated ids -> answer text (module notes)."""

    def __init__(self, tokenizer, image_token_id: int, prompt: PromptSection, max_seq_len: int):
        self.tokenizer, self.image_token_id, self.prompt, self.max_seq_len = tokenizer, image_token_id, prompt, max_seq_len
        self.chat = chat_format_for(tokenizer) if prompt.style == "chat" else None
        if self.chat is None and tokenizer.eos_id is None:
            raise DataError("prompt.style=plain needs a tokenizer with an EOS token to end answers")
        self.stop_ids = set(self.chat.stop_ids if self.chat else tokenizer.stop_ids) | (
            {tokenizer.eos_id} if tokenizer.eos_id is not None else set())
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    # -- training samples
    def training_sample(self, sample: ImageSample, task: str, n_questions: int, rng: random.Random) -> dict:
        extra = {}
        if task == "caption":
            if sample.caption is None:
                raise DataError(f"{sample.source}: data.task=caption but the sample has no caption")
            ids, labels = self._caption(sample.caption)
        elif sample.messages and self.chat is not None:
            ids, labels = self._chat([Message(m["role"], m["content"]) for m in sample.messages])
        else:
            if not sample.qa:
                raise DataError(f"{sample.source}: data.task=vqa but the sample has no qa")
            qa = rng.sample(sample.qa, min(n_questions, len(sample.qa)))
            ids, labels = self._questions([(q.question, q.answer) for q in qa])
            extra = {"qa": qa, "meta": sample.meta}  # which questions, for attention grounding
        if len(ids) > self.max_seq_len:
            raise DataError(f"{sample.source}: {len(ids)} tokens, longer than the LM's max_seq_len {self.max_seq_len}")
        return {"tokens": ids, "labels": labels, "images": sample.images, "id": sample.source, **extra}

    def _questions(self, pairs: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        if self.chat is not None:
            messages = []
            for question, answer in pairs:
                messages += [Message("user", self._chat_question(question)), Message("assistant", answer)]
            return self._chat(messages)
        ids, labels = self._start()
        for question, answer in pairs:
            q = self.tokenizer.encode(self.prompt.question_template.format(question=question))
            a = self.tokenizer.encode(" " + answer) + [self.tokenizer.eos_id]
            ids, labels = ids + q + a, labels + [IGNORE_INDEX] * len(q) + a
        return ids, labels

    def _caption(self, caption: str) -> tuple[list[int], list[int]]:
        if self.chat is not None:
            return self._chat([Message("user", self.prompt.caption_prompt), Message("assistant", caption)])
        ids, labels = self._start()
        text = self.tokenizer.encode(caption) + [self.tokenizer.eos_id]
        return ids + text, labels + text

    def _chat(self, messages: list[Message]) -> tuple[list[int], list[int]]:
        if self.prompt.system:
            messages = [Message("system", self.prompt.system)] + messages
        rendered = self.chat.render(messages)
        return self._with_image(rendered.ids, rendered.labels(IGNORE_INDEX))

    def _start(self) -> tuple[list[int], list[int]]:
        ids = ([self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []) + [self.image_token_id]
        return ids, [IGNORE_INDEX] * len(ids)

    def _with_image(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        at = 1 if ids and ids[0] == self.tokenizer.bos_id else 0
        return ids[:at] + [self.image_token_id] + ids[at:], labels[:at] + [IGNORE_INDEX] + labels[at:]

    def _chat_question(self, question: str) -> str:
        return f"{question} {self.prompt.instruction}".strip()

    # -- evaluation
    def question_prompt(self, question: str, with_image: bool = True) -> list[int]:
        """Token ids to generate the answer from (with or without the `<|image|>` token)."""
        if self.chat is not None:
            messages = ([Message("system", self.prompt.system)] if self.prompt.system else []) + [
                Message("user", self._chat_question(question))]
            ids = self.chat.render(messages, add_generation_prompt=True).ids
            return self._with_image(ids, ids)[0] if with_image else ids
        ids = self._start()[0] if with_image else [i for i in self._start()[0] if i != self.image_token_id]
        return ids + self.tokenizer.encode(self.prompt.question_template.format(question=question))

    def spoken_question_prompt(self, audio_span: list[int], with_image: bool = True) -> list[int]:
        """`question_prompt` with the question spoken: the audio span (adapters.speech_inputs.audio_span) where
        the question's text would be (plain style)."""
        if self.chat is not None:
            raise DataError("spoken questions need prompt.style=plain (the question template's {question} is "
                            "where the audio goes)")
        before, _, after = self.prompt.question_template.partition("{question}")
        ids = self._start()[0] if with_image else [i for i in self._start()[0] if i != self.image_token_id]
        return (ids + (self.tokenizer.encode(before.rstrip()) if before.strip() else []) + list(audio_span)
                + (self.tokenizer.encode(after) if after.strip() else []))

    def answer_text(self, new_ids: list[int]) -> str:
        """Generated ids -> the answer: decoded, first line, stripped."""
        text = self.tokenizer.decode([i for i in new_ids if i < self.tokenizer.vocab_size], skip_special=True)
        return text.strip().split("\n")[0].strip()

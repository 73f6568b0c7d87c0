"""The base LM stage of a composed model: ONE random LM learns, on text only and in the same steps, what every
adapter will need of it, then stays frozen under all of them (paper Sec 7-8: one frozen Llama 3 under the image
and the speech adapters), so their model folders share one base LM and `herd compose` joins them.

A tiny random LM knows nothing a capable Llama brings, so each modality's quickstart taught its own LM a text
stage: the image recipe the answer priors of the scene questions (experiments/image/lm_prior.py: the training
prompts with the image dropped), the speech recipe repeating what stands in an audio span
(experiments/speech/lm_copy.py: the LM's own token embeddings of a transcript, repeated, with silence and noise,
between the audio markers). Here both tasks share every step (`image_text.batch_size` + `copy.batch_size` examples); the loss is summed over the answer
tokens of both. The LM and the special-token rows (the audio markers) train. With `image_text.spoken_questions`
some samples' questions stand in audio spans the way the copy task places text (the LM's token embeddings,
repeated, between silences), so the LM also learns to answer a question it is given as audio.

    herd run experiments/multimodal/base.yaml          # -> runs/<experiment>/<run>/final: a model folder
    image_adapter:   model.language.path: <that final>  (its LM)
    speech_adapter:  language_model.path: <that final>  (its LM and the trained audio marker rows)

`final/` is a text-only model folder (adapters/model_folder.py): the LM inside (language_model/), the tokenizer,
the special-token rows, settings["base"] (the span position code the speech adapter must use). The summary
gives each task's held-out loss per answer token before and after the stage.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import nn

from adapters.image_tokens import ImageTextCollator
from adapters.model_folder import save_model
from adapters.multimodal import MultimodalModel, SpeechInputs
from adapters.multimodal_config import MultimodalConfig
from adapters.speech_adapter import span_position_code
from adapters.speech_inputs import audio_span
from adapters.speech_prompts import SpeechPrompter
from language.chat_format import chat_format_for
from speech.manifests import load_manifest
from training.config import EngineConfig, OptimConfig, ScheduleConfig
from training.distributed import is_rank0
from training.engine import Engine
from training.loop import Cadence, fit
from training.metrics import MetricsLogger, plot_curves
from vision.tiling import TilingConfig

from ..common import RunConfig
from ..config import ConfigError, ExistingPath
from ..image.model import LanguageSection, build_language
from ..image.data import DataSection, PromptFormat, PromptSection, training_samples
from ..image.lm_prior import without_image
from ..speech.lm_copy import CopyPretrainSection, copy_batch, span_embeddings

IGNORE_INDEX = -100
EVAL_SEED = 10 ** 9  # held-out examples: other scenes (split "valid") and other transcripts, drawn from this seed


@dataclass
class ImageTextSection:
    """The image questions' text (the image recipe's prompts with the image dropped)."""
    batch_size: int = field(default=16, metadata={"range": (0, None), "help": "samples per step; 0 = off"})
    prompt: PromptSection = field(default_factory=PromptSection)
    data: DataSection = field(default_factory=DataSection)
    spoken_questions: float = field(default=0.0, metadata={
        "range": (0.0, 1.0), "help": "fraction of samples whose questions stand in audio spans, as the copy task "
                                    "places text (plain prompts): the LM learns to answer a spoken question"})


@dataclass
class CopySection:
    """Repeating a transcript placed in an audio span (experiments/speech/lm_copy.py); `train` / `valid`: speech
    manifests whose transcripts are copied."""
    batch_size: int = field(default=16, metadata={"range": (0, None), "help": "transcripts per step; 0 = off"})
    train: Optional[ExistingPath] = field(default=None, metadata={"help": "manifest of the training transcripts"})
    valid: Optional[ExistingPath] = field(default=None, metadata={"help": "held-out transcripts (default: train)"})
    span_position: float = field(default=0.0, metadata={
        "range": (0.0, None), "help": "the span position code's amplitude; the speech adapter must use the same"})
    noise: float = field(default=0.5, metadata={"range": (0.0, 10.0), "help": "Gaussian noise x embedding std"})
    repeat_min: int = field(default=1, metadata={"range": (1, None)})
    repeat_max: int = field(default=4, metadata={"range": (1, None)})
    silence_max: int = field(default=2, metadata={"range": (0, None)})
    fill: Literal["repeat", "silence", "repeat_gap"] = "repeat"
    random_words: float = field(default=0.0, metadata={"range": (0.0, 1.0)})

    def shape(self) -> CopyPretrainSection:
        return CopyPretrainSection(repeat_min=self.repeat_min, repeat_max=self.repeat_max,
                                   silence_max=self.silence_max, noise=self.noise, fill=self.fill,
                                   random_words=self.random_words)


@dataclass
class Config(RunConfig):
    recipe: str = "base_lm"
    language: LanguageSection = field(default_factory=LanguageSection)
    image_text: ImageTextSection = field(default_factory=ImageTextSection)
    copy: CopySection = field(default_factory=CopySection)
    steps: int = field(default=800, metadata={"range": (1, None)})
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, betas=(0.9, 0.98), weight_decay=0.0))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=20))
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval_examples: int = field(default=64, metadata={"range": (1, None), "help": "held-out examples per task"})
    eval_every: int = field(default=200, metadata={"range": (1, None)})
    checkpoint_every: int = field(default=200, metadata={"range": (1, None)})
    stop_after_steps: Optional[int] = field(default=None, metadata={"range": (1, None)})

    def __post_init__(self):
        if self.language.path or self.language.swap_to or self.language.prior_pretrain.steps:
            raise ValueError("key 'language': the base stage trains a random preset LM (path null, no swap_to, no "
                             "prior_pretrain: this stage is the text stage)")
        if not self.image_text.batch_size and not self.copy.batch_size:
            raise ValueError("keys 'image_text.batch_size' and 'copy.batch_size' are both 0: nothing to train on")
        if self.engine.backend == "deepspeed" and self.engine.zero_stage == 3:
            raise ValueError("key 'engine.zero_stage': the base stage saves its whole LM from rank 0; use "
                             "engine.zero_stage <= 2")
        if self.image_text.spoken_questions and (self.image_text.prompt.style != "plain"
                                                 or self.image_text.data.task != "vqa"):
            raise ValueError("key 'image_text.spoken_questions' needs prompt.style=plain and data.task=vqa")
        if self.copy.batch_size and self.copy.train is None:
            raise ValueError("key 'copy.train': a speech manifest whose transcripts are copied is needed")


class BaseStage(nn.Module):
    """What the engine trains: the LM and the special-token rows of a text-only composed model. forward(batch)
    -> (summed answer-token loss of the image text and the copy examples, their count)."""

    def __init__(self, model: MultimodalModel, copy: CopySection):
        super().__init__()
        self.model, self.copy = model, copy

    def forward(self, batch: dict):
        model, total, count = self.model, None, 0
        if batch.get("image") is not None:
            b = batch["image"]
            speech = self._span_inputs(b) if b.get("span_ids") is not None else None
            loss, n = model.loss_sum(b["tokens"], b["labels"], speech=speech)
            total, count = loss, count + n
        if batch.get("copy") is not None:
            b = batch["copy"]
            loss, n = model.loss_sum(b["tokens"], b["labels"], speech=self._span_inputs(b))
            total, count = (loss if total is None else total + loss), count + n
        return total, count

    def _span_inputs(self, b: dict) -> SpeechInputs:
        """The LM's own token embeddings at span_ids (U, L) (-1: silence), noised in training, plus the span
        position code as MultimodalModel adds it to a speech adapter's outputs."""
        lm = self.model.language_model
        values = span_embeddings(lm, b["span_ids"], self.copy.noise if self.training else 0.0, b["generator"])
        if self.copy.span_position > 0:
            std = float(lm.model.embed_tokens.weight.detach().float().std())
            code = span_position_code(values.shape[1], values.shape[-1], device=values.device)
            values = values + (self.copy.span_position * std * code).to(values.dtype)
        return SpeechInputs(embeddings=values, embedding_lengths=b["lengths"])


class _BaseTask:
    """The training loop's view: step s holds image-text samples (s*Bi ..) and copy examples (s*Bc ..); each
    example is drawn from its own seeded generator, so a step's examples are the same on any number of ranks."""

    def __init__(self, cfg: Config, image_sample, copy_example, evaluate):
        self.cfg, self.image_sample, self.copy_example, self.evaluate = cfg, image_sample, copy_example, evaluate

    def rows(self, step: int) -> list[tuple[str, int]]:
        bi, bc = self.cfg.image_text.batch_size, self.cfg.copy.batch_size
        return ([("image", step * bi + i) for i in range(bi)] + [("copy", step * bc + i) for i in range(bc)])

    def collate(self, rows: list[tuple[str, int]]) -> dict:
        return {"image": self.image_sample([i for kind, i in rows if kind == "image"]),
                "copy": self.copy_example([i for kind, i in rows if kind == "copy"])}

    def loss(self, m, batch):
        return m(batch)


def _spoken(fmt: PromptFormat, qa: list, audio, tokenizer, shape: CopyPretrainSection, rng: random.Random):
    """A plain-prompt sample whose questions each stand in an audio span: ({"tokens", "labels"}, [span token ids
    per question, -1 = silence]) with the template's words around the span, the answers labelled as typed."""
    template = fmt.prompt.question_template
    before, _, after = template.partition("{question}")
    ids = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    labels, spans = [IGNORE_INDEX] * len(ids), []
    for q in qa:
        span = [-1] * rng.randint(0, shape.silence_max)
        for t in tokenizer.encode(q.question):
            span += [t] * rng.randint(shape.repeat_min, shape.repeat_max)
        span += [-1] * rng.randint(0, shape.silence_max)
        spans.append(span)
        prompt = ((tokenizer.encode(before.rstrip()) if before.strip() else []) + audio_span(len(span), audio)
                  + (tokenizer.encode(after) if after.strip() else []))
        answer = tokenizer.encode(" " + q.answer) + [tokenizer.eos_id]
        ids, labels = ids + prompt + answer, labels + [IGNORE_INDEX] * len(prompt) + answer
    return {"tokens": ids, "labels": labels, "images": []}, spans


def run(cfg: Config, run_dir: Path) -> dict:
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    it, cp = cfg.image_text, cfg.copy
    scenes = it.data.scenes
    tiling = TilingConfig(tile_size=scenes.image_size, max_tiles=1, max_images=1)
    train_images = training_samples(it.data, tiling, cfg.seed) if it.batch_size else None
    valid_images = training_samples(it.data, tiling, cfg.seed, split="valid") if it.batch_size else None
    transcripts, valid_transcripts = [], []
    if cp.batch_size:
        transcripts = [u.text for u in load_manifest(cp.train)[0]]
        valid_transcripts = [u.text for u in load_manifest(cp.valid or cp.train)[0]]
        if not transcripts:
            raise ConfigError(f"copy.train: '{cp.train}' holds no transcripts")

    def texts():  # for a BPE trained here when language.tokenizer is null
        out = list(transcripts)
        if train_images is not None:
            out += [qa.question + " " + qa.answer for i in range(500) for qa in train_images[i].qa]
        return out

    lm, tokenizer, record = build_language(cfg.language, run_dir, texts, cfg.seed)
    model = MultimodalModel(MultimodalConfig(language=lm.config), language_model=lm)
    model.language_model.requires_grad_(True)  # this stage trains the LM (and the special-token rows)
    fmt = PromptFormat(tokenizer, model.tokens.image, it.prompt, lm.config.max_seq_len)
    collate_images = ImageTextCollator(model.tokens.image, tiling, pad_id=fmt.pad_id)
    prompter = SpeechPrompter(chat_format_for(tokenizer), model.tokens.audio_tokens, "asr")
    shape = cp.shape()

    def image_batch(indices: list[int], samples=train_images, seed: int = cfg.seed,
                    spoken: float = it.spoken_questions) -> Optional[dict]:
        if not indices:
            return None
        rows, spans = [], []
        for i in indices:
            rng = random.Random(seed * 1_000_003 + i)
            sample = fmt.training_sample(samples[i], it.data.task, it.data.qa_per_sample, rng)
            row = without_image(sample, model.tokens.image)
            if spoken and rng.random() < spoken:
                row, row_spans = _spoken(fmt, sample["qa"], prompter.ids, tokenizer, shape, rng)
                spans += row_spans
            rows.append(row)
        batch = collate_images(rows)
        out = {"tokens": batch["tokens"], "labels": batch["labels"]}
        if spans:
            lengths = torch.tensor([len(x) for x in spans])
            span_ids = torch.full((len(spans), int(lengths.max())), -1, dtype=torch.long)
            for k, x in enumerate(spans):
                span_ids[k, :len(x)] = torch.tensor(x)
            out.update(span_ids=span_ids, lengths=lengths,
                       generator=torch.Generator().manual_seed(seed * 1_000_003 + indices[0]))
        return out

    def copy_batch_at(indices: list[int], pool=transcripts, seed: int = cfg.seed) -> Optional[dict]:
        if not indices:
            return None
        rng = random.Random(seed * 1_000_003 + indices[0])
        texts_ = [pool[random.Random(seed * 7_919 + i).randrange(len(pool))] for i in indices]
        tokens, labels, span_ids, lengths = copy_batch(prompter, [tokenizer.encode(t) for t in texts_], texts_,
                                                       shape, rng)
        return {"tokens": tokens, "labels": labels, "span_ids": span_ids, "lengths": lengths,
                "generator": torch.Generator().manual_seed(seed * 1_000_003 + indices[0])}

    stage = BaseStage(model, cp)
    engine = Engine(stage, cfg.engine, cfg.optim, cfg.schedule, total_steps=cfg.steps, run_dir=run_dir, seed=cfg.seed)
    state = engine.resume() or {"step": 0}
    logger = MetricsLogger(run_dir)
    n_eval = cfg.eval_examples

    @torch.no_grad()
    def evaluate(step: int) -> dict:
        stage.eval()
        record_ = {}
        if it.batch_size:
            b = image_batch(list(range(n_eval)), valid_images, EVAL_SEED, spoken=0.0)
            loss, n = stage({"image": b})
            record_["eval_image_text_loss"] = float(loss) / max(int(n), 1)
            if it.spoken_questions:
                b = image_batch(list(range(n_eval)), valid_images, EVAL_SEED, spoken=1.0)
                loss, n = stage({"image": b})
                record_["eval_spoken_question_loss"] = float(loss) / max(int(n), 1)
        if cp.batch_size:
            b = copy_batch_at(list(range(n_eval)), valid_transcripts, EVAL_SEED)
            loss, n = stage({"copy": b})
            record_["eval_copy_loss"] = float(loss) / max(int(n), 1)
        stage.train()
        return record_

    before = evaluate(0) if state["step"] == 0 else state.get("before", {})
    state["before"] = before
    task = _BaseTask(cfg, image_batch, copy_batch_at, evaluate)
    stage.train()
    fitted = fit(engine, task, Cadence.of(cfg, print_every=10), state, logger, desc=cfg.experiment, seed=cfg.seed)
    if fitted.stopped:
        return fitted.stopped_summary()
    after = evaluate(cfg.steps)
    logger.log(cfg.steps, after)
    model.language_model.requires_grad_(False)
    summary = {"steps": cfg.steps, "language_model": record["language_model"],
               "lm_parameters": sum(p.numel() for p in model.language_model.parameters()),
               **{f"{k}_before": v for k, v in before.items()}, **after,
               "wall_time_s": round(time.time() - t_start, 1)}
    if is_rank0():
        save_model(model, run_dir / "final", tokenizer=tokenizer, language_path=None,
                   settings={"base": {"span_position": cp.span_position, "image_prompt": asdict(it.prompt),
                                      "copy_train": str(cp.train) if cp.train else None}})
        plot_curves(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    engine.close()
    return summary

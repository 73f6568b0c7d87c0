"""Joint adapter training of a composed model (image + speech on one frozen base LM) on mixed batches.

    herd run experiments/multimodal/joint.yaml     # model: a `herd compose` folder

Every step holds, in one batch, typed image questions (`vqa`), image questions spoken by a training espeak voice
(`spoken_vqa`: synthesised as the batch is made; the held-out evaluation uses other voices), and speech
recognition utterances (`asr`, a speech manifest), in the proportions of their batch sizes. What trains is the
YAML's choice (`freeze`: a stage and optionally only some modalities, e.g. only the speech adapter); the LM never
does. Why it is needed at all: separately trained, the speech adapter writes embeddings that the LM repeats in
the ASR prompt but that do not read as a question in the image prompt (their scale and form differ from the
token embeddings the base stage used for its spoken questions), so the composed model answers spoken questions
near chance until the two meet in a short joint stage.

`final/` is the composed model folder (adapters/model_folder.py); the summary gives held-out accuracy with the
question typed, spoken (held-out voices) and blind, and the WER on `asr_eval`, before and after the stage.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from adapters.freezing import STAGES, stage_policy
from adapters.image_tokens import ImageTextCollator
from adapters.model_folder import find_model_folder, language_checkpoint, load_model, save_model
from adapters.multimodal import ImageInputs, MultimodalModel
from adapters.speech_inputs import audio_span
from adapters.speech_prompts import SpeechPrompter
from language.chat_format import chat_format_for
from speech.audio_io import AudioConfig
from speech.espeak import synthesize
from speech.speech_dataset import SpeechDataset, pad_waveforms
from speech.synthetic import english_voices, split_voices, voice_for
from training.config import EngineConfig, OptimConfig, ScheduleConfig
from training.distributed import is_rank0
from training.engine import Engine
from training.loop import Cadence, fit
from training.metrics import MetricsLogger, plot_curves
from vision.tiling import TilingConfig

from ..common import RunConfig
from ..config import ConfigError, ExistingPath
from ..image.data import PromptFormat, PromptSection, SceneSamples, ScenesSection, scene_vqa_items
from .speech_eval import evaluate_speech
from .vqa_eval import evaluate_vqa, summarize


@dataclass
class FreezeSection:
    stage: str = field(default="adapters_only", metadata={"help": f"adapters/freezing.py stage: {', '.join(STAGES)}"})
    modalities: Optional[list[str]] = field(default=None, metadata={
        "help": "train only these modalities' parts (image, speech); null = both"})

    def __post_init__(self):
        self.policy()

    def policy(self):
        bad = [m for m in self.modalities or [] if m not in ("image", "speech")]
        if bad:
            raise ValueError(f"key 'modalities': {bad} are not among image, speech")
        return stage_policy(self.stage, modalities=self.modalities)


@dataclass
class MixSection:
    vqa: int = field(default=8, metadata={"range": (0, None), "help": "typed image questions per step"})
    spoken_vqa: int = field(default=16, metadata={"range": (0, None), "help": "spoken image questions per step"})
    asr: int = field(default=8, metadata={"range": (0, None), "help": "speech recognition utterances per step"})
    asr_manifest: Optional[ExistingPath] = field(default=None, metadata={"help": "speech manifest for `asr`"})


@dataclass
class Config(RunConfig):
    recipe: str = "joint_adapter"
    model: ExistingPath = field(default="runs/quickstart_mm", metadata={
        "help": "a composed model folder with image and speech modalities (herd compose)"})
    freeze: FreezeSection = field(default_factory=FreezeSection)
    scenes: ScenesSection = field(default_factory=ScenesSection)
    mix: MixSection = field(default_factory=MixSection)
    steps: int = field(default=300, metadata={"range": (1, None)})
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=20))
    engine: EngineConfig = field(default_factory=EngineConfig)
    asr_eval: Optional[ExistingPath] = field(default=None, metadata={
        "help": "a speech manifest (e.g. held-out voices) decoded before and after; its WER goes in the summary"})
    eval_questions: int = field(default=0, metadata={"range": (0, None), "help": "held-out questions; 0 = all"})
    eval_batch_size: int = field(default=64, metadata={"range": (1, None)})
    checkpoint_every: int = field(default=100, metadata={"range": (1, None)})
    stop_after_steps: Optional[int] = field(default=None, metadata={"range": (1, None)})

    def __post_init__(self):
        if not (self.mix.vqa or self.mix.spoken_vqa or self.mix.asr):
            raise ValueError("key 'mix': every batch size is 0")
        if self.mix.asr and self.mix.asr_manifest is None:
            raise ValueError("key 'mix.asr_manifest': the asr examples need a speech manifest")
        if self.engine.backend == "deepspeed" and self.engine.zero_stage == 3:
            raise ValueError("key 'engine.zero_stage': the joint stage evaluates and saves on rank 0 with whole "
                             "weights; use engine.zero_stage <= 2")


class JointTrainer(nn.Module):
    """What the engine trains: the composed model; forward -> (summed answer/transcript loss, count) of a mixed
    batch (through the engine's forward, for DeepSpeed's hooks)."""

    def __init__(self, model: MultimodalModel):
        super().__init__()
        self.model = model

    def forward(self, batch: dict):
        speech = None
        if batch.get("waveforms") is not None:
            speech = self.model.speech_features(batch["waveforms"], batch["lengths"])
        return self.model.loss_sum(batch["tokens"], batch["labels"], images=ImageInputs.from_batch(batch),
                                   speech=speech)


class _JointTask:
    """Step s: typed questions, spoken questions and ASR utterances, each example from its own seeded draw."""

    def __init__(self, cfg: Config, make_batch):
        self.cfg, self.make_batch = cfg, make_batch

    def rows(self, step: int) -> list[tuple[str, int]]:
        m = self.cfg.mix
        return ([("vqa", step * m.vqa + i) for i in range(m.vqa)]
                + [("spoken_vqa", step * m.spoken_vqa + i) for i in range(m.spoken_vqa)]
                + [("asr", step * m.asr + i) for i in range(m.asr)])

    def collate(self, rows):
        return self.make_batch(rows)

    def loss(self, m, batch):
        return m(batch)


def run(cfg: Config, run_dir: Path) -> dict:
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    loaded = load_model(cfg.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    if model.config.image is None or model.config.speech is None:
        raise ConfigError(f"key 'model': {cfg.model} holds {', '.join(model.config.modalities)}; the joint stage "
                          f"needs image and speech (herd compose an image and a speech folder)")
    model.freeze_for_stage(cfg.freeze.policy())
    image = model.config.image
    tiling = TilingConfig(tile_size=image.vision.image_size, max_tiles=image.vision.max_num_tiles,
                          max_images=image.max_images)
    prompt = PromptSection(**loaded.settings.get("image", {}).get("prompt", {}))
    fmt = PromptFormat(tokenizer, model.tokens.image, prompt, model.config.language.max_seq_len)
    collate = ImageTextCollator(model.tokens.image, tiling, image.token_policy, fmt.pad_id)
    prompter = SpeechPrompter(chat_format_for(tokenizer), model.tokens.audio_tokens,
                              loaded.settings.get("speech", {}).get("task", "asr"))
    train_scenes = SceneSamples(cfg.scenes, tiling, "train", need_qa=True)
    asr = SpeechDataset(cfg.mix.asr_manifest, AudioConfig(), on_bad="replace") if cfg.mix.asr else None
    train_voices, _ = split_voices(english_voices(), 0.2, 0)
    frames = model.config.speech.features.num_frames

    def make_batch(rows) -> dict:
        samples, waves = [], []
        for kind, i in rows:
            rng = random.Random(cfg.seed * 1_000_003 + i * 7 + ("vqa", "spoken_vqa", "asr").index(kind))
            if kind == "asr":
                item = asr[i % len(asr)]
                wave = item["waveform"]
                example = prompter.example(model.placeholder_count(frames(wave.numel())),
                                           item["text"], item["language"])
                samples.append({"tokens": example.ids, "labels": example.labels})
                waves.append(wave)
                continue
            sample = train_scenes[i]
            qa = rng.choice(sample.qa)
            answer = tokenizer.encode(" " + qa.answer) + [tokenizer.eos_id]
            if kind == "vqa":
                question = fmt.question_prompt(qa.question)
            else:
                wave = synthesize(qa.question, voice_for(rng.choice(train_voices), rng))
                n = model.placeholder_count(frames(wave.numel()))
                question = fmt.spoken_question_prompt(audio_span(n, model.tokens.audio_tokens))
                waves.append(wave)
            samples.append({"tokens": question + answer, "labels": [-100] * len(question) + answer,
                            "images": sample.images})
        batch = collate(samples)
        if waves:
            batch["waveforms"], batch["lengths"] = pad_waveforms(waves)
        return batch

    items = scene_vqa_items(cfg.scenes, "heldout")
    items = items[:cfg.eval_questions] if cfg.eval_questions else items

    def evaluate_heldout(name: str) -> dict:
        results = evaluate_vqa(model, fmt, items, tiling, modes=["image", "blind", "spoken"],
                               batch_size=cfg.eval_batch_size, max_new_tokens=4)
        summary = summarize(results)
        if cfg.asr_eval is not None:
            asr = evaluate_speech(cfg.model, cfg.asr_eval, run_dir, name=f"asr_{name}", loaded=loaded)
            summary.update(asr_wer=asr["wer"], asr_wer_basic=asr.get("wer_basic"))
        return summary

    trainer = JointTrainer(model)
    engine = Engine(trainer, cfg.engine, cfg.optim, cfg.schedule, total_steps=cfg.steps, run_dir=run_dir, seed=cfg.seed)
    model = engine.module.model if hasattr(engine.module, "model") else model
    state = engine.resume() or {"step": 0}
    if state["step"] == 0:  # evaluations run on rank 0 alone (ZeRO <= 2: every rank holds whole weights)
        state["before"] = ({k: v for k, v in evaluate_heldout("before").items() if "per_type" not in k}
                           if is_rank0() else {})
    logger = MetricsLogger(run_dir)
    model.train()
    fitted = fit(engine, _JointTask(cfg, make_batch), Cadence.of(cfg, print_every=10), state, logger,
                 desc=cfg.experiment, seed=cfg.seed)
    if fitted.stopped:
        return fitted.stopped_summary()
    after = evaluate_heldout("after") if is_rank0() else {}
    summary = {"model": str(cfg.model), "steps": cfg.steps, "trains": cfg.freeze.modalities or ["image", "speech"],
               "heldout_questions": len(items), "before": state["before"], **after,
               "wall_time_s": round(time.time() - t_start, 1)}
    if is_rank0():
        save_model(model, run_dir / "final", tokenizer=tokenizer, settings=loaded.settings,
                   language_path=str(language_checkpoint(find_model_folder(cfg.model))))
        plot_curves(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    engine.close()
    return summary

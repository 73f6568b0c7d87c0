"""Speech adapter training (paper Sec 8): ASR or AST with a frozen language model.

The LM (an HF folder, a GGUF file, one of our runs' final/, or a random-init preset) stays frozen; the
Conformer encoder (fresh or from a BEST-RQ run) and the adapter train jointly on next-token cross-entropy
over the transcript / translation tokens only (the system instruction, the audio span and the chat headers
carry no loss). Held-out sets are decoded greedily in batches with the LM's KV cache every `eval_every`
steps (a subset) and at the end (all of them): WER/CER for ASR, BLEU/chrF for AST, per-utterance hypotheses
under run_dir/eval/. The final model folder (run_dir/final/) is what `speech_eval` / `herd eval speech` load.

Batches: step s takes samples s*B .. (s+1)*B-1 of a sequence of seeded per-epoch permutations, so the data
position is the step: resuming continues exactly (SpecAugment draws from the RNG the checkpoint restores).
"""
from __future__ import annotations

import copy
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn
from safetensors.torch import load_file, save_file

from adapters.model_folder import BaseLanguage, LoadedModel, language_checkpoint, load_language, save_model
from adapters.multimodal import MultimodalModel, SpeechInputs
from adapters.multimodal_config import MultimodalConfig, SpeechModality
from adapters.speech_adapter import preset as adapter_preset
from adapters.speech_inputs import audio_placeholder_count
from adapters.speech_prompts import SpeechPrompter, collate_examples
from language import Llama
from language import preset as llama_preset
from language.chat_format import chat_format_for
from language.tokenizer import load_tokenizer
from speech.audio_io import AudioConfig
from speech.augment import telephone_band
from speech.conformer import ConformerConfig
from speech.features import FeatureConfig, LogMelFrontend
from speech.manifests import DataError
from speech.speech_dataset import SpeechDataset, collate_speech
from speech.speech_metrics import asr_scores, bleu, chrf, write_results
from training.config import EngineConfig, OptimConfig, ScheduleConfig
from training.distributed import is_rank0
from training.engine import Engine
from training.loop import Cadence, fit
from training.metrics import MetricsLogger, plot_curves

from ..common import RunConfig
from ..config import ConfigError, ExistingPath
from ..data_prep_speech import ESPEAK_SETS, prepare_speech
from . import speech_eval
from .bestrq_pretrain import EncoderSection, load_encoder_init
from ..speech.lm_copy import CopyPretrainSection, copy_pretrain


@dataclass
class LanguageModelSection:
    path: Optional[ExistingPath] = field(default=None, metadata={
        "help": "HF folder, GGUF file, a run's final/, or a model folder (its LM and trained audio markers, e.g. a "
                "base_lm run)"})
    preset: Optional[str] = field(default=None, metadata={"help": "random-init frozen LM of this preset instead"})
    tokenizer: Optional[ExistingPath] = field(default=None, metadata={"help": "default: the LM path"})
    seed: int = field(default=0, metadata={"help": "init seed of a preset LM"})
    init_std: Optional[float] = field(default=None, metadata={
        "range": (0.0, 10.0), "help": "std of a preset LM's random weights (default: Llama's 0.02)"})
    overrides: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "preset field overrides of a random LM (n_layers, dim, rope_theta, ...)"})
    copy_pretrain: CopyPretrainSection = field(default_factory=CopyPretrainSection, metadata={
        "help": "text-only training of the LM to repeat (asr) or translate (ast) the text placed in the audio span, "
                "then frozen"})

    def __post_init__(self):
        if (self.path is None) == (self.preset is None):
            raise ValueError("language_model: give exactly one of 'path' and 'preset'")
        if self.preset is not None and self.tokenizer is None:
            raise ValueError("language_model.preset needs language_model.tokenizer")
        if self.path is not None and (self.overrides or self.init_std is not None):
            raise ValueError("language_model.overrides / init_std apply to a random preset LM, not to a checkpoint")
        if self.preset is not None:
            try:
                llama_preset(self.preset, vocab_size=8, **self.overrides)
            except (ValueError, TypeError) as e:
                raise ValueError(f"language_model: {e}") from None


@dataclass
class AdapterSection:
    preset: str = field(default="tiny", metadata={"help": "adapters/speech_adapter.py preset"})
    dim: Optional[int] = field(default=None, metadata={"range": (2, None)})
    n_heads: Optional[int] = field(default=None, metadata={"range": (1, None)})
    ffn_dim: Optional[int] = field(default=None, metadata={"range": (1, None)})
    dropout: Optional[float] = field(default=None, metadata={"range": (0.0, 1.0)})
    span_position: Optional[float] = field(default=None, metadata={
        "range": (0.0, 100.0), "help": "a fixed position code on every placeholder, in LM embedding stds (0 = off): "
                                       "a copied value then tells the LM where in the span it was read"})


@dataclass
class SpecAugmentSection:
    freq_masks: int = field(default=0, metadata={"range": (0, None), "help": "mel-band masks per utterance"})
    freq_width: int = field(default=10, metadata={"range": (0, None), "help": "widest band (mel channels)"})
    time_masks: int = field(default=0, metadata={"range": (0, None), "help": "time masks per utterance"})
    time_width: int = field(default=20, metadata={"range": (0, None), "help": "longest time mask (10 ms frames)"})
    telephone: float = field(default=0.0, metadata={
        "range": (0.0, 1.0), "help": "fraction of training utterances band-limited like 8 kHz telephone audio "
                                     "(speech.augment.telephone_band; on the waveform, before the features)"})


@dataclass
class CTCSection:
    weight: float = field(default=0.0, metadata={
        "range": (0.0, 100.0), "help": "auxiliary CTC loss on the encoder output (not in the paper: a convergence "
                                      "aid for small runs; the head is dropped from the final model); its targets "
                                      "are the transcripts, also for ast; 0 = off"})


@dataclass
class EvalSetSection:
    manifest: str = field(default="", metadata={"help": "manifest path (may be made by data.prepare)"})
    name: str = field(default="", metadata={"help": "default: the manifest's stem"})
    periodic: bool = field(default=True, metadata={"help": "also decode (eval_utterances of) it every eval_every steps"})
    language: Optional[str] = field(default=None, metadata={"help": "language named in the prompt (default: per utterance)"})
    optional: bool = field(default=False, metadata={"help": "skip (with a note in the summary) when the manifest is missing"})


@dataclass
class DataSection:
    train: str = field(default="data/speech/espeak/train.jsonl", metadata={"help": "training manifest"})
    eval: list[EvalSetSection] = field(default_factory=list)
    prepare: bool = field(default=False, metadata={"help": "make missing data with `herd data prepare speech` first"})
    sets: list[str] = field(default_factory=lambda: ["espeak"], metadata={
        "help": "the espeak sets data.prepare makes: espeak (digits + commands), sentences, ast"})
    speech_dir: str = field(default="data/speech")
    downloads_dir: str = field(default="data/downloads")
    max_seconds: float = field(default=30.0, metadata={"range": (0.2, None), "help": "longer files are skipped"})
    workers: int = field(default=0, metadata={"range": (0, None), "help": "DataLoader worker processes"})


@dataclass
class Config(RunConfig):
    recipe: str = "speech_adapter"
    task: Literal["asr", "ast"] = "asr"
    language_model: Optional[LanguageModelSection] = field(default=None, metadata={"help": "the frozen LM"})
    encoder: EncoderSection = field(default_factory=EncoderSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    spec_augment: SpecAugmentSection = field(default_factory=SpecAugmentSection)
    ctc: CTCSection = field(default_factory=CTCSection)
    data: DataSection = field(default_factory=DataSection)
    train_encoder: bool = field(default=True, metadata={"help": "false: only the adapter trains"})
    steps: int = field(default=1000, metadata={"range": (1, None)})
    batch_size: int = field(default=16, metadata={"range": (1, None), "help": "utterances per optimizer step"})
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval_every: int = field(default=200, metadata={"range": (1, None)})
    eval_utterances: int = field(default=64, metadata={"range": (1, None), "help": "per set in periodic evals"})
    decode_batch_size: int = field(default=32, metadata={"range": (1, None)})
    max_new_tokens: int = field(default=64, metadata={"range": (1, None)})
    normalizer: Literal["whisper", "basic", "none"] = "whisper"
    checkpoint_every: int = field(default=200, metadata={"range": (1, None)})
    stop_after_steps: Optional[int] = field(default=None, metadata={"range": (1, None)})

    def __post_init__(self):
        unknown = [x for x in self.data.sets if x not in ESPEAK_SETS]
        if unknown:
            raise ValueError(f"key 'data.sets': unknown {unknown}; choose from {', '.join(ESPEAK_SETS)}")
        if self.language_model is None:
            raise ValueError("key 'language_model' is required (path: a checkpoint, or preset + tokenizer)")
        if not self.data.prepare and not Path(self.data.train).is_file():
            raise ValueError(f"key 'data.train': '{self.data.train}' does not exist (data.prepare=true makes the "
                             "espeak sets of data.sets)")


# ----------------------------------------------------------------------------------------------------
# Data


class SpeechTask:
    """The training loop's view of the run (training/loop.py): step s's utterances (seeded per-epoch
    permutations; see the module docstring), their collation into a micro-batch, the loss, periodic evaluation."""

    def __init__(self, dataset: SpeechDataset, prompter: SpeechPrompter, cfg: Config, encoder: ConformerConfig,
                 adapter_kernel: int, adapter_stride: int):
        self.dataset, self.prompter, self.cfg = dataset, prompter, cfg
        self.feature_config = cfg.features
        self.counts = dict(stack=encoder.stack, adapter_kernel=adapter_kernel, adapter_stride=adapter_stride)
        self._orders: dict[int, list[int]] = {}
        self.loss = self.evaluate = None  # set by run(): they need the engine's device and the eval sets

    def rows(self, step: int) -> list[int]:
        n, size = len(self.dataset), self.cfg.batch_size
        out = []
        for position in range(step * size, (step + 1) * size):
            epoch, offset = divmod(position, n)
            if epoch not in self._orders:
                gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
                self._orders = {epoch: torch.randperm(n, generator=gen).tolist()}
            out.append(self._orders[epoch][offset])
        return out

    def collate(self, indices: list[int]) -> dict:
        items = [self.dataset[i] for i in indices]  # on_bad="replace": never None
        batch = collate_speech(items)
        examples = []
        for item, n_samples in zip(items, batch["lengths"].tolist()):
            frames = self.feature_config.num_frames(n_samples)
            n = audio_placeholder_count(frames, **self.counts)
            task = self.prompter.task
            examples.append(self.prompter.example(n, speech_eval.reference(task, item),
                                                  speech_eval.prompt_language(task, item, None)))
        tokens, labels, _ = collate_examples(examples)
        out = {"tokens": tokens, "labels": labels, "waveforms": batch["waveforms"], "lengths": batch["lengths"]}
        if self.cfg.ctc.weight > 0:
            tokenizer = self.prompter.format.tokenizer
            targets = [tokenizer.encode(item["text"]) for item in items]  # what is spoken (AST: not the translation)
            out["ctc_lengths"] = torch.tensor([len(t) for t in targets])
            out["ctc_targets"] = torch.nn.utils.rnn.pad_sequence([torch.tensor(t) for t in targets], batch_first=True)
        return out


class SpeechTrainer(nn.Module):
    """What the engine trains: the speech model, and with ctc.weight > 0 an auxiliary CTC head (encoder width ->
    LM vocabulary + blank) whose loss sum, times the weight, is added to the LM loss sum."""

    def __init__(self, speech: MultimodalModel, vocab_size: int, ctc_weight: float = 0.0):
        super().__init__()
        self.speech, self.ctc_weight, self.blank = speech, ctc_weight, vocab_size
        self.ctc_head = nn.Linear(speech.speech_encoder.config.dim, vocab_size + 1) if ctc_weight > 0 else None

    def forward(self, tokens, features, lengths, labels, ctc_targets=None, ctc_lengths=None):
        """labels: house convention (labels[t] = the target after position t, `collate_examples`)."""
        hidden, hidden_lengths = self.speech.speech_states(features, lengths)
        speech, speech_lengths = self.speech.speech_adapter(hidden, hidden_lengths)
        loss, n = self.speech.loss_sum(tokens, labels, speech=SpeechInputs(embeddings=speech,
                                                                           embedding_lengths=speech_lengths))
        if self.ctc_head is not None:
            log_probs = self.ctc_head(hidden).float().log_softmax(-1).transpose(0, 1)  # (T, B, vocab + 1)
            ctc = F.ctc_loss(log_probs, ctc_targets, hidden_lengths, ctc_lengths, blank=self.blank, reduction="sum",
                             zero_infinity=True)
            loss = loss + self.ctc_weight * ctc
        return loss, n


def spec_augment(features: torch.Tensor, lengths: torch.Tensor, cfg: SpecAugmentSection) -> torch.Tensor:
    """SpecAugment (Park et al. 2019) without time warping: zero random mel bands and time spans of each
    utterance (features (B, T, C) normalised, so zero is the mean). Draws from the global torch RNG."""
    b, t, c = features.shape
    keep = torch.ones(b, t, c, dtype=torch.bool, device=features.device)
    for _ in range(cfg.freq_masks):
        width = torch.randint(0, cfg.freq_width + 1, (b,))
        start = (torch.rand(b) * (c - width + 1).float()).long()
        bins = torch.arange(c)
        band = (bins[None] >= start[:, None]) & (bins[None] < (start + width)[:, None])
        keep &= ~band[:, None, :].to(features.device)
    for _ in range(cfg.time_masks):
        width = torch.minimum(torch.randint(0, cfg.time_width + 1, (b,)), lengths.cpu() // 5)
        start = (torch.rand(b) * (lengths.cpu() - width + 1).clamp(min=1).float()).long()
        frames = torch.arange(t)
        span = (frames[None] >= start[:, None]) & (frames[None] < (start + width)[:, None])
        keep &= ~span[:, :, None].to(features.device)
    return features * keep


def _prepare_data(cfg: Config) -> None:
    summary = prepare_speech(Path(cfg.data.speech_dir), Path(cfg.data.downloads_dir), sets=tuple(cfg.data.sets))
    print(f"herd: {summary}", flush=True)


# ----------------------------------------------------------------------------------------------------
# Model


def load_language_model(section: LanguageModelSection) -> tuple[Llama, object, Optional[BaseLanguage]]:
    """The frozen LM (a checkpoint, a model folder's LM, or a seeded random preset), its tokenizer, and what a
    path gave (`adapters.model_folder.BaseLanguage`: a base stage's trained audio marker rows and settings)."""
    if section.path is not None:
        base = load_language(section.path)
        tokenizer = load_tokenizer(section.tokenizer or base.tokenizer or base.checkpoint)
        return base.model, tokenizer, base
    tokenizer = load_tokenizer(section.tokenizer)
    return random_language_model(section.preset, tokenizer.vocab_size, section.seed, section.init_std,
                                 dict(section.overrides)), tokenizer, None


def random_language_model(preset: str, vocab_size: int, seed: int = 0, init_std: Optional[float] = None,
                          overrides: Optional[dict] = None) -> Llama:
    """A random-init LM of a preset (seeded). init_std: the std of every weight matrix and embedding
    (default: the Llama init, 0.02); a larger one makes a frozen random LM's attention and logits sharper."""
    torch.manual_seed(seed)
    model = Llama(llama_preset(preset, vocab_size=vocab_size, **(overrides or {})))
    if init_std is not None:
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=init_std)
    return model


def _markers_from_base(model: MultimodalModel, base: BaseLanguage, span_position: float) -> None:
    """The audio start / end rows a base stage trained with its LM (base_lm.py), so the LM sees the markers it
    learned to copy between; the base's span position code must be this adapter's."""
    trained = base.settings.get("base", {}).get("span_position")
    if trained is not None and float(trained) != span_position:
        raise ConfigError(f"adapter.span_position {span_position} differs from the {trained} the base LM "
                          f"({base.checkpoint}) was trained with")
    tokens = model.tokens
    with torch.no_grad():
        for name in ("audio_start", "audio_end"):
            row = getattr(tokens, name) - tokens.vocab_size
            if row >= base.extra_tokens.shape[0]:
                raise ConfigError(f"language_model.path: the base's special tokens do not include <|{name}|>")
            model.extra_token_embeddings.weight[row] = base.extra_tokens[row]


def build(cfg: Config):
    """(model, tokenizer, prompter) for a config; the LM is frozen."""
    lm, tokenizer, base = load_language_model(cfg.language_model)
    encoder_config, encoder_weights, stats = load_encoder_init(cfg.encoder)
    if cfg.features.normalization == "global" and stats is None:
        raise ConfigError("features.normalization=global needs the statistics of a BEST-RQ encoder.init_from "
                          "(pre-train with normalization global)")
    try:
        adapter_config = adapter_preset(cfg.adapter.preset, encoder_dim=encoder_config.dim, lm_dim=lm.config.dim,
                                        **{k: v for k, v in asdict(cfg.adapter).items() if k != "preset" and v is not None})
    except ValueError as e:
        raise ConfigError(f"adapter: {e}") from None
    config = MultimodalConfig(language=lm.config, speech=SpeechModality(encoder=encoder_config, adapter=adapter_config,
                                                                         features=cfg.features))
    torch.manual_seed(cfg.seed)
    model = MultimodalModel(config, language_model=lm, speech_frontend=LogMelFrontend(cfg.features, stats))
    if encoder_weights is not None:
        model.speech_encoder.load_state_dict(encoder_weights)
    if base is not None and base.extra_tokens is not None:
        _markers_from_base(model, base, adapter_config.span_position)
    model.freeze_for_stage("adapter_pretrain" if cfg.train_encoder else "adapters_only")
    prompter = SpeechPrompter(chat_format_for(tokenizer), model.tokens.audio_tokens, cfg.task)
    return model, tokenizer, prompter


# ----------------------------------------------------------------------------------------------------
# Run


def run(cfg: Config, run_dir: Path) -> dict:
    t_start = time.time()
    if cfg.data.prepare and is_rank0():
        _prepare_data(cfg)
    model, tokenizer, prompter = build(cfg)
    audio = AudioConfig(max_seconds=cfg.data.max_seconds)
    train_set = SpeechDataset(cfg.data.train, audio, on_bad="replace")
    eval_sets, notes = {}, {}
    for s in cfg.data.eval:
        name = s.name or Path(s.manifest).stem
        if not Path(s.manifest).exists():
            if s.optional:
                notes[name] = f"not evaluated: {s.manifest} is missing"
                continue
            raise ConfigError(f"data.eval: manifest '{s.manifest}' does not exist")
        eval_sets[name] = (s, SpeechDataset(s.manifest, audio))
    copy_note = _copy_stage(cfg, model, tokenizer, prompter, train_set, run_dir)
    task = SpeechTask(train_set, prompter, cfg, model.speech_encoder.config, model.speech_adapter.config.conv_kernel,
                      model.speech_adapter.config.conv_stride)
    frontend = copy.deepcopy(model.speech_frontend)  # float32 whatever the backend does to the model's buffers
    trainer = SpeechTrainer(model, tokenizer.vocab_size, cfg.ctc.weight)
    try:
        engine = Engine(trainer, cfg.engine, cfg.optim, cfg.schedule, total_steps=cfg.steps, run_dir=run_dir, seed=cfg.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model.speech_frontend = frontend = frontend.to(engine.device)  # (DeepSpeed bf16 casts every buffer of its module)
    state = engine.resume() or {"step": 0, "evals": {}}
    loaded = LoadedModel(model, tokenizer)

    def loss_fn(m, batch):
        with torch.no_grad():
            waveforms = batch["waveforms"]
            if m.training and cfg.spec_augment.telephone:
                waveforms = telephone_band(waveforms, batch["lengths"], cfg.spec_augment.telephone)
            features, lengths = frontend(waveforms, batch["lengths"])
            if m.training:
                features = spec_augment(features, lengths, cfg.spec_augment)
        return m(batch["tokens"], features, lengths, batch["labels"], batch.get("ctc_targets"), batch.get("ctc_lengths"))

    def evaluate(names, limit):
        out = {}
        for name in names:
            s, ds = eval_sets[name]
            rows = speech_eval.transcribe(loaded, ds, prompter=prompter, batch_size=cfg.decode_batch_size,
                                          max_new_tokens=cfg.max_new_tokens, language=s.language, limit=limit)
            out[name] = speech_eval.score(cfg.task, rows, cfg.normalizer)
        return out

    metric_names = ("wer", "cer") if cfg.task == "asr" else ("bleu", "chrf")

    def periodic_eval(step: int) -> dict:
        record = {}
        periodic = [n for n, (s, _) in eval_sets.items() if s.periodic]
        for name, (_, summary) in evaluate(periodic, cfg.eval_utterances).items():
            for k in metric_names:
                record[f"eval_{name}_{k}"] = summary[k]
            state["evals"][name] = {k: summary[k] for k in metric_names}
        trainer.train()
        return record

    task.loss, task.evaluate = loss_fn, periodic_eval
    trainer.train()
    fitted = fit(engine, task, Cadence.of(cfg, print_every=25), state, MetricsLogger(run_dir), desc=cfg.experiment,
                 workers=cfg.data.workers, seed=cfg.seed)
    if fitted.stopped:
        return fitted.stopped_summary()
    train_seconds = time.time() - t_start
    summary = _finish(cfg, engine, trainer, tokenizer, evaluate, eval_sets, notes, train_set, run_dir, metric_names)
    if copy_note:
        summary["copy_pretrain"] = copy_note
    summary["train_wall_time_s"] = round(train_seconds, 1)
    summary["wall_time_s"] = round(time.time() - t_start, 1)
    engine.close()
    return summary


def _finish(cfg, engine, trainer, tokenizer, evaluate, eval_sets, notes, train_set, run_dir, metric_names) -> dict:
    model = trainer.speech
    summary = {"steps": cfg.steps, "task": cfg.task, "train_utterances": len(train_set),
               "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "frozen_lm_parameters": sum(p.numel() for p in model.language_model.parameters()),
               "skipped_steps": engine.skipped_total}
    weights = engine.trainable_state_dict()
    if not is_rank0():
        return summary
    trainer.load_state_dict(weights, strict=False)  # the engine's (possibly sharded) weights, gathered
    t0 = time.time()
    results = evaluate(list(eval_sets), None)
    eval_seconds = time.time() - t0
    baseline = _most_frequent_reference(cfg.task, train_set)
    for name, (rows, result) in results.items():
        write = dict(result)
        write["baseline_most_frequent"] = {"hypothesis": baseline, **_baseline_scores(rows, baseline, cfg)}
        write_results(run_dir / "eval", rows, write, name)
        summary[name] = {k: result[k] for k in ("n",) + metric_names + ("wer_basic",) if k in result}
        summary[name].update({f"baseline_{k}": write["baseline_most_frequent"][k] for k in metric_names})
        if cfg.task == "asr" and trainer.ctc_head is not None:  # the encoder alone: is the LM path the bottleneck?
            ctc_rows = speech_eval.ctc_transcribe(trainer.speech, trainer.ctc_head, trainer.blank, tokenizer,
                                                  eval_sets[name][1], cfg.decode_batch_size)
            ctc = speech_eval.score(cfg.task, ctc_rows, cfg.normalizer)[1]
            summary[name].update(ctc_wer=ctc["wer"], ctc_cer=ctc["cer"])
    summary.update(notes)
    summary["final_eval_seconds"] = round(eval_seconds, 1)
    lm = cfg.language_model
    as_loaded = lm.path is not None and lm.copy_pretrain.steps == 0  # else the folder holds the LM (random, trained)
    save_model(model, run_dir / "final", tokenizer=tokenizer,
               language_path=str(language_checkpoint(lm.path)) if as_loaded else None,
               tokenizer_path=str(lm.tokenizer or lm.path), settings={"speech": {"task": cfg.task}})
    (run_dir / "final" / "herd_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    plot_curves(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    return summary


def _copy_stage(cfg: Config, model, tokenizer, prompter, train_set, run_dir: Path) -> dict:
    """language_model.copy_pretrain: train the LM on the copy task (experiments/speech/lm_copy.py) before the
    engine takes the trainable parameters, and save it; a resumed run loads the saved LM instead. {} when off."""
    section = cfg.language_model.copy_pretrain
    if section.steps == 0:
        return {}
    path = run_dir / "checkpoints" / "copy_pretrained_lm.safetensors"
    if path.is_file():
        model.language_model.load_state_dict(load_file(str(path)))
        return {"loaded": str(path)}
    texts = [u.text for u in train_set.utterances]
    targets = None
    if cfg.task == "ast":
        untranslated = [u.source for u in train_set.utterances if not u.translation]
        if untranslated:
            raise DataError(f"{untranslated[0]}: AST needs a 'translation' for every utterance "
                            f"({len(untranslated)} without)")
        targets = [u.translation for u in train_set.utterances]
    result = copy_pretrain(model, prompter, tokenizer, texts, section, targets=targets)
    if is_rank0():
        path.parent.mkdir(parents=True, exist_ok=True)
        weights = model.language_model.state_dict()  # cloned: tied embeddings share memory
        save_file({k: v.detach().clone().contiguous() for k, v in weights.items()}, str(path))
    return result


def _most_frequent_reference(task: str, dataset: SpeechDataset) -> str:
    refs = Counter((u.text if task == "asr" else (u.translation or "")) for u in dataset.utterances)
    return refs.most_common(1)[0][0]


def _baseline_scores(rows, baseline: str, cfg: Config) -> dict:
    """The scores of answering every utterance with the most frequent training reference (what a model that
    ignores the audio could do best with one answer): ASR wer/cer, AST bleu/chrf."""
    refs = [r["reference"] for r in rows]
    if cfg.task == "asr":
        scores = asr_scores(refs, [baseline] * len(refs), language="en", normalizer=cfg.normalizer)
        return {"wer": scores["wer"], "cer": scores["cer"]}
    return {"bleu": bleu(refs, [baseline] * len(refs)), "chrf": chrf(refs, [baseline] * len(refs))}

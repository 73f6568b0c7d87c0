"""Speech evaluation (ASR: WER/CER after the Whisper normaliser; AST: BLEU/chrF) of a trained speech model
folder on any manifest `speech.manifests.load_manifest` reads (our JSONL, LibriSpeech folders, FLEURS and
CoVoST 2 TSVs). Greedy batched decoding with the LM's KV cache.

    summary = evaluate_speech("runs/asr_tiny/latest/final", "data/speech/espeak/test_heldout.jsonl", "out/")
    # out/<name>_hypotheses.jsonl (one row per utterance) + out/<name>_summary.json

A speech model folder (written by the speech_adapter recipe, `save_speech_model`) holds
`speech_config.json` (task, encoder / adapter / feature configs, where the frozen LM comes from),
`speech_model.safetensors` (encoder, adapter, audio markers, feature statistics), the tokenizer, and, for a
language model made from a preset, its weights under `language_model/`.

Also the `speech_eval` recipe: `herd run experiments/speech/eval.yaml` evaluates one model on several sets.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from adapters.speech_adapter import SpeechAdapter, SpeechAdapterConfig
from adapters.speech_language import SpeechLanguageModel, SpeechPrompter, language_name
from language import Llama
from language import preset as llama_preset
from language.chat_format import chat_format_for
from language.checkpoints import save_hf
from language.tokenizer import load_tokenizer
from speech.audio_io import AudioConfig
from speech.conformer import ConformerConfig, ConformerEncoder
from speech.features import FeatureConfig, LogMelFrontend
from speech.manifests import DataError
from speech.speech_dataset import SpeechDataset, collate_speech
from speech.speech_metrics import asr_scores, evaluate_asr, evaluate_ast, write_results

from ..common import RunConfig
from ..config import ConfigError, ExistingPath

META_FILE = "speech_config.json"
WEIGHTS_FILE = "speech_model.safetensors"
LM_FOLDER = "language_model"


# ----------------------------------------------------------------------------------------------------
# Saving and loading a speech model folder


def load_language_model(lm: dict, base: Optional[Path] = None, device="cpu"):
    """A frozen LM and its tokenizer from a meta dict {"path"} or {"preset", "tokenizer", "seed"} (a folder
    `base/language_model` holding saved weights wins over the preset)."""
    saved = base / LM_FOLDER if base is not None else None
    if saved is not None and (saved / "config.json").is_file():
        model = Llama.from_pretrained(saved, device=device)
    elif lm.get("path"):
        model = Llama.from_pretrained(lm["path"], device=device)
    else:
        model = random_language_model(lm["preset"], load_tokenizer(lm["tokenizer"]).vocab_size, int(lm.get("seed", 0)),
                                      lm.get("init_std"), lm.get("overrides") or {}).to(device)
    tokenizer_path = lm.get("tokenizer") or lm.get("path")
    if base is not None and (base / "tokenizer.json").is_file():
        tokenizer_path = base
    return model, load_tokenizer(tokenizer_path)


def random_language_model(preset: str, vocab_size: int, seed: int = 0, init_std: Optional[float] = None,
                          overrides: Optional[dict] = None) -> Llama:
    """A random-init LM of a preset (seeded). init_std: the std of every weight matrix and embedding
    (default: the Llama init, 0.02); a larger one makes a frozen random LM's attention and logits sharper."""
    torch.manual_seed(seed)
    model = Llama(llama_preset(preset, vocab_size=vocab_size, **(overrides or {})))
    if init_std is not None:
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(module.weight, std=init_std)
    return model


def build_speech_model(meta: dict, language_model, stats=None) -> SpeechLanguageModel:
    """The composed model (fresh encoder / adapter weights) from a meta dict's configs."""
    encoder = ConformerEncoder(ConformerConfig.from_dict(meta["encoder"]))
    adapter = SpeechAdapter(SpeechAdapterConfig(**meta["adapter"]))
    frontend = LogMelFrontend(FeatureConfig(**meta["features"]), stats)
    return SpeechLanguageModel(language_model, encoder, adapter, frontend)


def save_speech_model(model: SpeechLanguageModel, tokenizer, out_dir, meta: dict, save_lm: bool = False,
                      state: Optional[dict] = None) -> Path:
    """Write a speech model folder (see the module docstring); `state`: the trained weights to save
    (default: the model's own)."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = model.speech_state_dict()
    if state is not None:
        weights.update({k: v for k, v in state.items() if k in weights})
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(out_dir / WEIGHTS_FILE))
    if hasattr(tokenizer, "save"):
        tokenizer.save(out_dir)
    if save_lm:
        save_hf(model.language_model, out_dir / LM_FOLDER)
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


@dataclass
class LoadedSpeechModel:
    model: SpeechLanguageModel
    tokenizer: object
    prompter: SpeechPrompter
    meta: dict


def load_speech_model(model_dir, device="cpu") -> LoadedSpeechModel:
    """A speech model folder (or a run folder holding final/) -> model in eval mode, tokenizer, prompter."""
    from safetensors.torch import load_file
    model_dir = Path(model_dir)
    if (model_dir / "final" / META_FILE).is_file():
        model_dir = model_dir / "final"
    if not (model_dir / META_FILE).is_file():
        raise DataError(f"{model_dir}: not a speech model folder (no {META_FILE}; the speech_adapter recipe writes "
                        f"one into runs/<experiment>/<run>/final)")
    meta = json.loads((model_dir / META_FILE).read_text())
    lm, tokenizer = load_language_model(meta["language_model"], model_dir, device)
    model = build_speech_model(meta, lm)
    weights = load_file(str(model_dir / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith("language_model.")]
    if missing or unexpected:
        raise DataError(f"{model_dir / WEIGHTS_FILE}: weights do not match {META_FILE}: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    model.to(device).eval()
    prompter = SpeechPrompter(chat_format_for(tokenizer), model.audio_tokens, meta["task"])
    return LoadedSpeechModel(model, tokenizer, prompter, meta)


# ----------------------------------------------------------------------------------------------------
# Decoding and scoring


def prompt_language(task: str, item: dict, override: Optional[str] = None) -> str:
    """The language the prompt names: ASR the spoken language, AST the translation's (default English)."""
    if override:
        return override
    return item["language"] if task == "asr" else (item.get("translation_language") or "en")


def reference(task: str, item: dict) -> str:
    if task == "asr":
        return item["text"]
    if not item.get("translation"):
        raise DataError(f"{item.get('source') or item['id']}: AST needs a 'translation' for every utterance")
    return item["translation"]


def _feature_batches(model: SpeechLanguageModel, dataset: SpeechDataset, batch_size: int, n: int):
    """The first n utterances in length-sorted batches: yields (utterances done so far, kept [(index, item)],
    features (U, F, n_mels), frame lengths (U,)); unloadable utterances are left out (and counted by the set)."""
    device = next(model.parameters()).device
    order = sorted(range(n), key=lambda i: dataset.utterances[i].duration or 0.0)
    for start in range(0, n, batch_size):
        indices = order[start:start + batch_size]
        kept = [(i, it) for i, it in zip(indices, (dataset[i] for i in indices)) if it is not None]
        if kept:
            batch = collate_speech([it for _, it in kept])
            features, lengths = model.features(batch["waveforms"].to(device), batch["lengths"].to(device))
            yield min(start + batch_size, n), kept, features, lengths


@torch.no_grad()
def transcribe(loaded: LoadedSpeechModel, dataset: SpeechDataset, *, batch_size: int = 16,
               max_new_tokens: int = 64, language: Optional[str] = None, limit: Optional[int] = None,
               progress=None) -> list[dict]:
    """Greedy decoding of a data set (length-sorted batches); rows {"id", "reference", "hypothesis",
    "language", "source"} in the data set's order. Unloadable utterances are skipped (and counted by the set)."""
    model, prompter, task = loaded.model, loaded.prompter, loaded.prompter.task
    n = len(dataset) if limit is None else min(limit, len(dataset))
    rows: dict[int, dict] = {}
    was_training = model.training
    model.eval()
    for done, kept, features, lengths in _feature_batches(model, dataset, batch_size, n):
        prompts = [prompter.prompt(model.placeholder_count(int(f)), prompt_language(task, it, language))
                   for f, (_, it) in zip(lengths.tolist(), kept)]
        outputs = model.generate(prompts, features, lengths, max_new_tokens=max_new_tokens,
                                 stop_ids=prompter.stop_ids, pad_id=0)
        for (i, it), out in zip(kept, outputs):
            rows[i] = {"id": it["id"], "reference": reference(task, it), "hypothesis": loaded.tokenizer.decode(out),
                       "language": prompt_language(task, it, language), "source": it["source"]}
        if progress is not None:
            progress(done, n)
    model.train(was_training)
    return [rows[i] for i in sorted(rows)]


def score(task: str, rows: list[dict], normalizer: str = "whisper") -> tuple[list[dict], dict]:
    """Per-utterance rows with metrics + the summary (ASR: wer, cer, ...; AST: bleu, chrf). With the Whisper
    normaliser, ASR also gets wer_basic / cer_basic (the basic normaliser, which keeps spelled digits as words:
    the Whisper one joins "nine four eight" into "948", so there a digit string counts as one word)."""
    if not rows:
        raise DataError("no utterance could be decoded: nothing to score")
    ids, refs, hyps = [r["id"] for r in rows], [r["reference"] for r in rows], [r["hypothesis"] for r in rows]
    languages = sorted({r["language"] for r in rows})
    if task == "asr":
        scored, summary = evaluate_asr(ids, refs, hyps, language=languages[0], normalizer=normalizer)
        if normalizer == "whisper":
            basic = asr_scores(refs, hyps, language=languages[0], normalizer="basic")
            summary.update(wer_basic=basic["wer"], cer_basic=basic["cer"])
    else:
        scored, summary = evaluate_ast(ids, refs, hyps, target_language=languages[0])
    for row, extra in zip(scored, rows):
        row["source"] = extra["source"]
    summary["languages"] = [language_name(x) for x in languages]
    return scored, summary


def evaluate_speech(model_dir, manifest, out_dir, *, name: str = "", task: Optional[str] = None,
                    language: Optional[str] = None, batch_size: int = 16, max_new_tokens: int = 64,
                    normalizer: str = "whisper", max_utterances: Optional[int] = None, device: str = "cpu",
                    max_seconds: float = 30.0, loaded: Optional[LoadedSpeechModel] = None) -> dict:
    """Decode `manifest` with the model in `model_dir` and write out_dir/<name>_hypotheses.jsonl and
    out_dir/<name>_summary.json (name: the manifest's stem by default). task: asr | ast (default: the
    model's); language: the language named in the prompt (default: per utterance). Returns the summary."""
    loaded = loaded or load_speech_model(model_dir, device)
    task = task or loaded.meta["task"]
    if task != loaded.prompter.task:
        loaded = LoadedSpeechModel(loaded.model, loaded.tokenizer,
                                   SpeechPrompter(loaded.prompter.format, loaded.model.audio_tokens, task), loaded.meta)
    dataset = SpeechDataset(manifest, AudioConfig(max_seconds=max_seconds))
    t0 = time.perf_counter()
    rows = transcribe(loaded, dataset, batch_size=batch_size, max_new_tokens=max_new_tokens, language=language,
                      limit=max_utterances)
    elapsed = time.perf_counter() - t0
    scored, summary = score(task, rows, normalizer)
    audio_seconds = sum(dataset.utterances[i].duration or 0.0 for i in range(len(rows)))
    summary.update(manifest=str(manifest), model=str(model_dir), skipped=sum(
        n for k, n in dataset.stats.items() if k != "loaded") + sum(dataset.scan_counts.values()),
        decode_seconds=round(elapsed, 2), real_time_factor=round(elapsed / audio_seconds, 4) if audio_seconds else None)
    write_results(out_dir, scored, summary, name or Path(str(manifest)).stem)
    return summary


def eval_speech_cli(args) -> int:
    """`herd eval speech --model RUN --manifest M [M ...]`: evaluate_speech on each manifest, one line each."""
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    model_dir = Path(args.model)
    try:
        loaded = load_speech_model(model_dir, device)
    except DataError as e:
        raise ConfigError(f"--model: {e}") from None
    out = Path(args.out) if args.out else (model_dir.parent if model_dir.name == "final" else model_dir) / "eval"
    for manifest in args.manifest:
        if not Path(manifest).exists():
            raise ConfigError(f"--manifest: '{manifest}' does not exist")
        summary = evaluate_speech(model_dir, manifest, out, task=args.task, language=args.language,
                                  batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                  normalizer=args.normalizer, max_utterances=args.max_utterances, loaded=loaded)
        print(f"herd: {manifest}: " + _summary_line(summary), flush=True)
    print(f"herd: per-utterance hypotheses and summaries under {out}")
    return 0


def _summary_line(summary: dict) -> str:
    keys = ("task", "n", "wer", "cer", "wer_basic", "bleu", "chrf", "real_time_factor", "skipped")
    return ", ".join(f"{k}={summary[k]:.4g}" if isinstance(summary[k], float) else f"{k}={summary[k]}"
                     for k in keys if k in summary)


# ----------------------------------------------------------------------------------------------------
# The recipe


@dataclass
class EvalSet:
    manifest: ExistingPath = field(metadata={"help": "JSONL manifest, LibriSpeech folder, FLEURS or CoVoST TSV"})
    name: str = field(default="", metadata={"help": "output name (default: the manifest's stem)"})
    task: Optional[Literal["asr", "ast"]] = field(default=None, metadata={"help": "default: the model's task"})
    language: Optional[str] = field(default=None, metadata={"help": "language named in the prompt (default: per utterance)"})
    max_utterances: Optional[int] = field(default=None, metadata={"range": (1, None)})


@dataclass
class Config(RunConfig):
    recipe: str = "speech_eval"
    model: ExistingPath = field(default="", metadata={"help": "speech model folder (a run's final/) or its run folder"})
    sets: list[EvalSet] = field(default_factory=list)
    batch_size: int = field(default=16, metadata={"range": (1, None)})
    max_new_tokens: int = field(default=64, metadata={"range": (1, None)})
    normalizer: Literal["whisper", "basic", "none"] = "whisper"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self):
        if not self.model:
            raise ValueError("key 'model' is required: a speech model folder")
        if not self.sets:
            raise ValueError("key 'sets': at least one evaluation set is needed")


def run(cfg: Config, run_dir: Path) -> dict:
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device)
    try:
        loaded = load_speech_model(cfg.model, device)
    except DataError as e:
        raise ConfigError(f"key 'model': {e}") from None
    summary = {}
    for s in cfg.sets:
        name = s.name or Path(s.manifest).stem
        result = evaluate_speech(cfg.model, s.manifest, run_dir / "eval", name=name, task=s.task, language=s.language,
                                 batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                                 normalizer=cfg.normalizer, max_utterances=s.max_utterances, loaded=loaded)
        summary[name] = {k: result[k] for k in ("task", "n", "wer", "cer", "wer_basic", "cer_basic", "bleu", "chrf",
                                                "real_time_factor", "skipped") if k in result}
        print(f"herd: {name}: " + _summary_line(summary[name]), flush=True)
    return summary


def ctc_greedy(ids: torch.Tensor, lengths: torch.Tensor, blank: int) -> list[list[int]]:
    """Best-path CTC decoding: per-frame argmax ids (B, T) + valid lengths (B,) -> token ids per utterance
    (repeats merged, then blanks dropped)."""
    out = []
    for row, n in zip(ids.tolist(), lengths.tolist()):
        row = row[:n]
        out.append([t for i, t in enumerate(row) if t != blank and (i == 0 or t != row[i - 1])])
    return out


@torch.no_grad()
def ctc_transcribe(model: SpeechLanguageModel, ctc_head: torch.nn.Module, blank: int, tokenizer,
                   dataset: SpeechDataset, batch_size: int) -> list[dict]:
    """An auxiliary CTC head's (encoder states -> token logits) best-path transcripts of an ASR data set: the
    encoder alone, no adapter or LM. Rows like `transcribe`'s, for `score`."""
    rows: dict[int, dict] = {}
    was_training = model.training
    model.eval()
    for _, kept, features, lengths in _feature_batches(model, dataset, batch_size, len(dataset)):
        hidden, hidden_lengths = model.encoder_states(features, lengths)
        for (i, it), seq in zip(kept, ctc_greedy(ctc_head(hidden).argmax(-1), hidden_lengths, blank)):
            rows[i] = {"id": it["id"], "reference": it["text"], "hypothesis": tokenizer.decode(seq).strip(),
                       "language": it["language"], "source": it["source"]}
    model.train(was_training)
    return [rows[i] for i in sorted(rows)]

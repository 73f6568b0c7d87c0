"""Speech evaluation (ASR: WER/CER after the Whisper normaliser; AST: BLEU/chrF) of a trained speech model
folder on any manifest `speech.manifests.load_manifest` reads (our JSONL, LibriSpeech folders, FLEURS and
CoVoST 2 TSVs). Greedy batched decoding with the LM's KV cache.

    summary = evaluate_speech("runs/asr_tiny/latest/final", "data/speech/espeak/test_heldout.jsonl", "out/")
    # out/<name>_hypotheses.jsonl (one row per utterance) + out/<name>_summary.json

The model is a model folder (`adapters.model_folder`, written by the speech_adapter recipe into its run's
final/): a `MultimodalModel` with a speech modality, its tokenizer, where the frozen LM comes from (a preset or
copy-trained LM is saved in the folder), and under settings["speech"] the task (asr | ast) its prompts ask for.

Also the `speech_eval` recipe: `herd run experiments/speech/eval.yaml` evaluates one model on several sets.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from adapters.model_folder import LoadedModel, ModelFolderError, load_model
from adapters.multimodal import MultimodalModel
from adapters.speech_prompts import TASK_INSTRUCTIONS, SpeechPrompter, language_name
from language.chat_format import chat_format_for
from speech.audio_io import AudioConfig
from speech.manifests import DataError
from speech.speech_dataset import SpeechDataset, collate_speech
from speech.speech_metrics import asr_scores, evaluate_asr, evaluate_ast, write_results

from ..common import RunConfig
from ..config import ConfigError, ExistingPath


# ----------------------------------------------------------------------------------------------------
# Loading a speech model folder


def speech_prompter(loaded: LoadedModel, task: Optional[str] = None) -> SpeechPrompter:
    """The chat prompts of a loaded speech model: its tokenizer's chat format, its audio tokens and the task
    (default: the one its folder records under settings["speech"])."""
    if loaded.model.config.speech is None:
        raise DataError(f"the model has no speech modality (it has: "
                        f"{', '.join(loaded.model.config.modalities) or 'text only'})")
    task = task or loaded.settings.get("speech", {}).get("task")
    if task not in TASK_INSTRUCTIONS:
        raise DataError(f"the model folder records no speech task (settings.speech.task: {task!r}); pass the task "
                        f"({' | '.join(TASK_INSTRUCTIONS)})")
    return SpeechPrompter(chat_format_for(loaded.tokenizer), loaded.model.tokens.audio_tokens, task)


def _load(model_dir, device, what: str) -> LoadedModel:
    """load_model, its errors as one line naming the config key / option `what`."""
    try:
        loaded = load_model(model_dir, device=device)
    except ModelFolderError as e:
        raise ConfigError(f"{what}: {e}") from None
    try:
        speech_prompter(loaded)
    except DataError as e:
        raise ConfigError(f"{what}: {model_dir}: {e}") from None
    return loaded


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


def _feature_batches(model: MultimodalModel, dataset: SpeechDataset, batch_size: int, n: int):
    """The first n utterances in length-sorted batches: yields (utterances done so far, kept [(index, item)],
    SpeechInputs with their log-mel features); unloadable utterances are left out (and counted by the set)."""
    device = next(model.parameters()).device
    order = sorted(range(n), key=lambda i: dataset.utterances[i].duration or 0.0)
    for start in range(0, n, batch_size):
        indices = order[start:start + batch_size]
        kept = [(i, it) for i, it in zip(indices, (dataset[i] for i in indices)) if it is not None]
        if kept:
            batch = collate_speech([it for _, it in kept])
            speech = model.speech_features(batch["waveforms"].to(device), batch["lengths"].to(device))
            yield min(start + batch_size, n), kept, speech


@torch.no_grad()
def transcribe(loaded: LoadedModel, dataset: SpeechDataset, *, prompter: Optional[SpeechPrompter] = None,
               batch_size: int = 16, max_new_tokens: int = 64, language: Optional[str] = None,
               limit: Optional[int] = None, progress=None) -> list[dict]:
    """Greedy decoding of a data set (length-sorted batches); rows {"id", "reference", "hypothesis",
    "language", "source"} in the data set's order. Unloadable utterances are skipped (and counted by the set).
    prompter: default `speech_prompter(loaded)` (the recorded task)."""
    model = loaded.model
    prompter = prompter or speech_prompter(loaded)
    task = prompter.task
    n = len(dataset) if limit is None else min(limit, len(dataset))
    rows: dict[int, dict] = {}
    was_training = model.training
    model.eval()
    for done, kept, speech in _feature_batches(model, dataset, batch_size, n):
        prompts = [prompter.prompt(model.placeholder_count(int(f)), prompt_language(task, it, language))
                   for f, (_, it) in zip(speech.lengths.tolist(), kept)]
        outputs = model.generate(prompts, speech=speech, max_new_tokens=max_new_tokens,
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
                    max_seconds: float = 30.0, loaded: Optional[LoadedModel] = None) -> dict:
    """Decode `manifest` with the model in `model_dir` and write out_dir/<name>_hypotheses.jsonl and
    out_dir/<name>_summary.json (name: the manifest's stem by default). task: asr | ast (default: the
    model's); language: the language named in the prompt (default: per utterance). Returns the summary."""
    loaded = loaded or load_model(model_dir, device=device)
    prompter = speech_prompter(loaded, task)
    task = prompter.task
    dataset = SpeechDataset(manifest, AudioConfig(max_seconds=max_seconds))
    t0 = time.perf_counter()
    rows = transcribe(loaded, dataset, prompter=prompter, batch_size=batch_size, max_new_tokens=max_new_tokens,
                      language=language, limit=max_utterances)
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
    loaded = _load(model_dir, device, "--model")
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
    loaded = _load(cfg.model, device, "key 'model'")
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
def ctc_transcribe(model: MultimodalModel, ctc_head: torch.nn.Module, blank: int, tokenizer,
                   dataset: SpeechDataset, batch_size: int) -> list[dict]:
    """An auxiliary CTC head's (encoder states -> token logits) best-path transcripts of an ASR data set: the
    encoder alone, no adapter or LM. Rows like `transcribe`'s, for `score`."""
    rows: dict[int, dict] = {}
    was_training = model.training
    model.eval()
    for _, kept, speech in _feature_batches(model, dataset, batch_size, len(dataset)):
        hidden, hidden_lengths = model.speech_states(speech.features, speech.lengths)
        for (i, it), seq in zip(kept, ctc_greedy(ctc_head(hidden).argmax(-1), hidden_lengths, blank)):
            rows[i] = {"id": it["id"], "reference": it["text"], "hypothesis": tokenizer.decode(seq).strip(),
                       "language": it["language"], "source": it["source"]}
    model.train(was_training)
    return [rows[i] for i in sorted(rows)]

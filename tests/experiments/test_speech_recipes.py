"""The speech recipes through `herd run` on a tiny espeak set made here: BEST-RQ (quantizer saved and
restored on resume, encoder loadable by the adapter recipe), the speech adapter (learns: WER far below the
most-frequent-transcript baseline; stop + resume equals an uninterrupted run; the LM stays untouched) and
speech_eval / evaluate_speech (per-utterance hypotheses + summary)."""
import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from experiments.cli import main
from language.tokenizer import train_bpe
from speech.espeak import Voice
from speech.synthetic import SynthItem, write_dataset

WORDS = ("one", "two", "three")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Single spoken words on 6 training voices and 2 held-out voices, and a small BPE tokenizer."""
    root = tmp_path_factory.mktemp("speech")
    rng = random.Random(0)
    voices = {"train": ["en-us+m1", "en-us+f2", "en+m3", "en+f4", "en-gb-scotland+m2", "en-029+f1"],
              "test": ["en-us+m4", "en+f3"]}
    for split, n in (("train", 48), ("test", 12)):
        items = [SynthItem(f"{split}{i}", WORDS[i % 3], "en",
                           Voice(*rng.choice(voices[split]).split("+"), rate=rng.randint(150, 200),
                                 pitch=rng.randint(35, 65))) for i in range(n)]
        write_dataset(items, root, split, progress=lambda _: None)
    (root / "text.txt").write_text(" ".join(WORDS) * 50 + " Repeat after me in English" * 20)
    train_bpe([root / "text.txt"], 300, root / "tok")
    return root


def _adapter_cfg(root: Path, out: Path, **over) -> dict:
    cfg = {"experiment": "asr", "recipe": "speech_adapter", "task": "asr", "seed": 0, "output_dir": str(out),
           "language_model": {"preset": "tiny", "tokenizer": str(root / "tok"), "init_std": 0.1, "overrides": {"n_layers": 1}},
           "encoder": {"preset": "tiny", "dim": 32, "n_layers": 1, "n_heads": 2, "ffn_dim": 64},
           "adapter": {"preset": "tiny", "dim": 32, "n_heads": 2, "ffn_dim": 64},
           "data": {"train": str(root / "train.jsonl"),
                    "eval": [{"manifest": str(root / "test.jsonl"), "name": "heldout"},
                             {"manifest": str(root / "missing.jsonl"), "name": "extra", "optional": True}]},
           "steps": 80, "batch_size": 12, "optim": {"lr": 1e-2, "weight_decay": 0.0},
           "schedule": {"warmup_steps": 5}, "eval_every": 40, "eval_utterances": 6, "checkpoint_every": 40,
           "max_new_tokens": 4}
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def _run(tmp_path: Path, cfg: dict, name="x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == 0
    return Path(cfg["output_dir"]) / cfg["experiment"] / "latest"


def test_speech_adapter_learns_and_writes_everything(data, tmp_path):
    # 80 steps: the frozen random LM is slow to steer; at 40 steps (cosine schedule) the loss is still falling
    # and held-out WER is 0.5; 80 steps reach 0.0 for seeds 0-2
    run = _run(tmp_path, _adapter_cfg(data, tmp_path / "runs"))
    summary = json.loads((run / "summary.json").read_text())
    heldout = summary["heldout"]
    assert heldout["n"] == 12 and heldout["wer"] <= 0.25 < heldout["baseline_wer"]  # baseline: 8/12 wrong
    assert "not evaluated" in summary["extra"] and "ctc_wer" not in heldout  # no CTC head: no CTC score
    rows = [json.loads(x) for x in (run / "eval" / "heldout_hypotheses.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {"reference", "hypothesis", "wer"} <= set(rows[0])
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert "eval_heldout_wer" in records[39] and records[-1]["loss"] < records[0]["loss"]
    for name in ("config.json", "adapters.safetensors", "tokenizer/tokenizer.json", "language_model/config.json"):
        assert (run / "final" / name).is_file(), name
    weights = load_file(str(run / "final" / "adapters.safetensors"))
    assert not any(k.startswith("language_model.") for k in weights) and "extra_token_embeddings.weight" in weights
    assert json.loads((run / "final" / "config.json").read_text())["settings"] == {"speech": {"task": "asr"}}

    from adapters.model_folder import load_model
    from experiments.recipes.speech_adapter import random_language_model
    from experiments.recipes.speech_eval import evaluate_speech
    loaded = load_model(run)  # the frozen random LM was saved as it was: bit-identical to a fresh one
    fresh = random_language_model("tiny", loaded.tokenizer.vocab_size, 0, 0.1, {"n_layers": 1})
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, loaded.model.language_model.state_dict()[k]), k
    result = evaluate_speech(run / "final", data / "test.jsonl", tmp_path / "eval", loaded=loaded, batch_size=32,
                             max_new_tokens=4)  # the recipe's decoding settings: the same batches
    assert result["wer"] == pytest.approx(heldout["wer"]) and result["real_time_factor"] > 0
    assert (tmp_path / "eval" / "test_hypotheses.jsonl").is_file() and (tmp_path / "eval" / "test_summary.json").is_file()

    eval_cfg = {"experiment": "ev", "recipe": "speech_eval", "output_dir": str(tmp_path / "runs"), "model": str(run),
                "sets": [{"manifest": str(data / "test.jsonl"), "name": "t"}], "device": "cpu", "batch_size": 32,
                "max_new_tokens": 4}
    ev = _run(tmp_path, eval_cfg, "ev.yaml")
    assert json.loads((ev / "summary.json").read_text())["t"]["wer"] == pytest.approx(heldout["wer"])

    # `herd eval speech`: the same figures, per-utterance rows + summary per manifest; a bad model folder is
    # one clear error
    assert main(["eval", "speech", "--model", str(run), "--manifest", str(data / "test.jsonl"), "--out",
                 str(tmp_path / "cli"), "--batch-size", "32", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    cli = json.loads((tmp_path / "cli" / "test_summary.json").read_text())
    assert cli["wer"] == pytest.approx(heldout["wer"]) and cli["n"] == 12 and "wer_basic" in cli
    assert len((tmp_path / "cli" / "test_hypotheses.jsonl").read_text().splitlines()) == 12
    assert main(["eval", "speech", "--model", str(tmp_path), "--manifest", str(data / "test.jsonl")]) == 2


def test_speech_adapter_stop_and_resume_equals_uninterrupted(data, tmp_path):
    over = dict(steps=6, eval_every=4, checkpoint_every=2, spec_augment={"freq_masks": 1, "time_masks": 1},
                ctc={"weight": 0.3},
                data={"eval": [{"manifest": str(data / "test.jsonl"), "name": "heldout"}]})
    full = _run(tmp_path, _adapter_cfg(data, tmp_path / "a", **over))
    _run(tmp_path, _adapter_cfg(data, tmp_path / "b", stop_after_steps=3, **over))
    resumed = _run(tmp_path, _adapter_cfg(data, tmp_path / "b", resume=True, **over))
    losses = [[json.loads(x)["loss"] for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (full, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    a, b = (load_file(str(r / "final" / "adapters.safetensors")) for r in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    heldout = json.loads((full / "summary.json").read_text())["heldout"]  # with CTC: the encoder alone is scored too
    assert heldout["n"] == 12 and {"ctc_wer", "ctc_cer"} <= set(heldout)


def test_two_ranks_train_on_halves_of_each_step(data, tmp_path, herd_two_ranks):
    """Under 2 ranks (DeepSpeed, gloo) each rank trains on its half of a step's utterances: the losses and token
    counts equal one process with 2 micro-batches of the same halves (augmentation off: each rank draws its own
    masks). Step 1 is the same arithmetic; later ZeRO-1's updates round differently (flat partitions, its own grad
    norm): a relative change d of a step moves the next loss by ~d * the step's drop (~1 here), d ~ log2(P) * u
    ~ 1e-6 per step, so ~3e-6 on losses ~10 after 3 steps; 1e-4. A rank on the wrong half: >= 1e-2."""
    over = dict(steps=3, eval_every=100, checkpoint_every=100, ctc={"weight": 0.3}, schedule={"warmup_steps": 1},
                data={"eval": [{"manifest": str(data / "test.jsonl"), "name": "heldout"}]})
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(_adapter_cfg(data, tmp_path / "two", **over)))
    herd_two_ranks("run", str(path), "engine.backend=deepspeed", "engine.zero_stage=1", cwd=tmp_path)
    one = _run(tmp_path, {**_adapter_cfg(data, tmp_path / "one", **over), "engine": {"grad_accum_steps": 2}})
    two = Path(tmp_path / "two" / "asr" / "latest")
    records = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (two, one)]
    assert [r["tokens"] for r in records[0]] == [r["tokens"] for r in records[1]]
    assert [r["loss"] for r in records[0]] == pytest.approx([r["loss"] for r in records[1]], abs=1e-4)


def test_ctc_transcribe_decodes_the_encoder_alone_in_data_set_order(data, tmp_path):
    from adapters.model_folder import load_model
    from experiments.recipes.speech_eval import ctc_transcribe, score
    from speech.speech_dataset import SpeechDataset
    run = _run(tmp_path, _adapter_cfg(data, tmp_path / "r", steps=2, eval_every=100, checkpoint_every=2,
                                            schedule={"warmup_steps": 1}))
    loaded = load_model(run)
    dataset = SpeechDataset(data / "test.jsonl")
    vocab = loaded.tokenizer.vocab_size
    head = torch.nn.Linear(loaded.model.speech_encoder.config.dim, vocab + 1)
    word = loaded.tokenizer.encode(" one")
    with torch.no_grad():  # a head that emits blank everywhere, then one that emits " one" on every frame
        head.weight.zero_(), head.bias.zero_(), head.bias[vocab].fill_(1.0)
        rows = ctc_transcribe(loaded.model, head, vocab, loaded.tokenizer, dataset, batch_size=5)
        assert [r["id"] for r in rows] == [u.id for u in dataset.utterances]
        assert [r["reference"] for r in rows] == [u.text for u in dataset.utterances]
        assert {r["hypothesis"] for r in rows} == {""} and score("asr", rows, "basic")[1]["wer"] == 1.0
        head.bias.zero_(), head.bias[word[0]].fill_(1.0)
        rows = ctc_transcribe(loaded.model, head, vocab, loaded.tokenizer, dataset, batch_size=5)
    assert {r["hypothesis"] for r in rows} == {loaded.tokenizer.decode(word[:1]).strip()}  # repeats merged to one


def test_ctc_greedy_merges_repeats_then_drops_blanks():
    from experiments.recipes.speech_eval import ctc_greedy
    blank = 9
    ids = torch.tensor([[9, 3, 3, 9, 3, 4, 4, 9], [5, 5, 9, 5, 9, 9, 7, 7]])
    assert ctc_greedy(ids, torch.tensor([8, 4]), blank) == [[3, 3, 4], [5, 5]]
    assert ctc_greedy(ids, torch.tensor([0, 8]), blank) == [[], [5, 5, 7]]


def test_bestrq_quantizer_saved_restored_and_encoder_reused(data, tmp_path):
    cfg = {"experiment": "brq", "recipe": "bestrq_pretrain", "seed": 0, "output_dir": str(tmp_path / "runs"),
           "encoder": {"preset": "tiny", "dim": 32, "n_layers": 1, "n_heads": 2, "ffn_dim": 64},
           "bestrq": {"codebook_size": 64, "n_codebooks": 2, "mask_span": 8, "mask_start_prob": 0.1},
           "features": {"normalization": "global"},
           "data": {"train": [str(data / "train.jsonl")], "valid": str(data / "test.jsonl"), "valid_utterances": 6,
                    "stats_utterances": 10},
           "steps": 6, "batch_size": 6, "optim": {"lr": 3e-3}, "schedule": {"warmup_steps": 1}, "eval_every": 3,
           "checkpoint_every": 2, "stop_after_steps": 3}
    _run(tmp_path, cfg)
    (run,) = [p for p in (tmp_path / "runs" / "brq").iterdir() if not p.is_symlink()]
    quantizer = run / "checkpoints" / "quantizer.safetensors"
    original = load_file(str(quantizer))
    # a resumed run must train against the saved codebooks, not new ones: change the seed in the config
    cfg.update(resume=True, stop_after_steps=None, bestrq={**cfg["bestrq"], "quantizer_seed": 7})
    _run(tmp_path, cfg)
    final = load_file(str(run / "final" / "quantizer.safetensors"))
    assert all(torch.equal(original[k], final[k]) for k in original)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 6 and {"accuracy/0", "accuracy/1", "usage_perplexity/1"} <= set(steps[-1])
    assert records[-1]["step"] == 6 and "eval_accuracy" in records[-1]  # the final evaluation
    assert 1.0 <= steps[-1]["usage_perplexity/0"] <= 64
    for name in ("encoder.safetensors", "encoder_config.json", "feature_stats.safetensors"):
        assert (run / "final" / name).is_file(), name
    # the adapter recipe starts from this encoder (and its global feature statistics)
    over = dict(steps=2, eval_every=100, features={"normalization": "global"},
                encoder={"init_from": str(run / "final")},
                data={"eval": [{"manifest": str(data / "test.jsonl"), "name": "heldout"}]})
    adapter_cfg = _adapter_cfg(data, tmp_path / "ad", **over)
    from experiments.cli import resolve_config
    from experiments.recipes.speech_adapter import build
    path = tmp_path / "ad.yaml"
    path.write_text(yaml.safe_dump(adapter_cfg))
    model = build(resolve_config(str(path), [])[1])[0]
    encoder = load_file(str(run / "final" / "encoder.safetensors"))
    assert all(torch.equal(model.speech_encoder.state_dict()[k], v) for k, v in encoder.items())
    assert not torch.equal(model.speech_frontend.global_std, torch.ones(80))



def test_copy_pretrain_teaches_the_lm_then_it_stays_frozen_and_resume_reuses_it(data, tmp_path):
    from adapters.model_folder import load_model
    from experiments.recipes.speech_adapter import random_language_model
    over = dict(steps=4, eval_every=100, checkpoint_every=2, ctc={"weight": 0.3}, schedule={"warmup_steps": 1},
                language_model={"copy_pretrain": {"steps": 30, "lr": 1e-2, "batch_size": 8, "warmup_steps": 3}},
                data={"eval": [{"manifest": str(data / "test.jsonl"), "name": "heldout"}]})
    full = _run(tmp_path, _adapter_cfg(data, tmp_path / "a", **over))
    copy = json.loads((full / "summary.json").read_text())["copy_pretrain"]
    assert copy["copy_loss_last"] < 0.5 * copy["copy_loss_first"]  # it learns to repeat the span's tokens
    saved = load_file(str(full / "checkpoints" / "copy_pretrained_lm.safetensors"))
    fresh = random_language_model("tiny", 300, 0, 0.1, {"n_layers": 1}).state_dict()
    assert saved.keys() == fresh.keys() and not all(torch.equal(saved[k], fresh[k]) for k in saved)
    lm = load_model(full).model.language_model.state_dict()  # adapter training left it bit-identical
    assert lm.keys() == saved.keys() and all(torch.equal(lm[k], saved[k]) for k in saved)

    # stop + resume: the resumed run loads the copy-trained LM (no second copy stage) and continues exactly
    _run(tmp_path, _adapter_cfg(data, tmp_path / "b", stop_after_steps=2, **over))
    resumed = _run(tmp_path, _adapter_cfg(data, tmp_path / "b", resume=True, **over))
    assert "loaded" in json.loads((resumed / "summary.json").read_text())["copy_pretrain"]
    losses = [[json.loads(x)["loss"] for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (full, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    a, b = (load_file(str(r / "final" / "adapters.safetensors")) for r in (full, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ast_translation_pretrain_and_bleu_baseline(data, tmp_path, capsys):
    """task ast: the copy stage teaches the LM to answer the span's text with its translation (here a word
    permutation, so repeating the span is wrong), and the summary scores BLEU/chrF next to the
    most-frequent-translation baseline."""
    shift = {"one": "two", "two": "three", "three": "one"}
    for split in ("train", "test"):
        rows = [json.loads(x) for x in (data / f"{split}.jsonl").read_text().splitlines()]
        rows = [{**r, "translation": shift[r["text"]], "translation_language": "en"} for r in rows]
        (data / f"ast_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    over = dict(task="ast", steps=2, eval_every=100, schedule={"warmup_steps": 1},
                language_model={"copy_pretrain": {"steps": 40, "lr": 1e-2, "batch_size": 8, "warmup_steps": 3}},
                data={"train": str(data / "ast_train.jsonl"),
                      "eval": [{"manifest": str(data / "ast_test.jsonl"), "name": "heldout"}]})
    run = _run(tmp_path, _adapter_cfg(data, tmp_path / "ast", **over))
    summary = json.loads((run / "summary.json").read_text())
    copy = summary["copy_pretrain"]
    assert copy["copy_loss_last"] < 0.3 * copy["copy_loss_first"]
    heldout = summary["heldout"]
    assert {"bleu", "chrf", "baseline_bleu", "baseline_chrf"} <= set(heldout) and "wer" not in heldout
    assert 0 < heldout["baseline_chrf"] < 100  # one of three words: right on a third of the utterances
    # the frozen LM, given the span of "one", now says "two" (its translation), not "one"
    import random as _random
    from adapters.model_folder import load_model
    from adapters.multimodal import SpeechInputs
    from experiments.recipes.speech_eval import speech_prompter
    from experiments.speech.lm_copy import CopyPretrainSection, copy_batch, span_embeddings
    loaded = load_model(run)
    assert speech_prompter(loaded).task == "ast"  # the folder records the task
    section = CopyPretrainSection(steps=1, repeat_min=2, repeat_max=2, silence_max=0)
    losses = {}
    for answer in ("two", "one"):
        tokens, labels, span_ids, lengths = copy_batch(speech_prompter(loaded), [loaded.tokenizer.encode("one")],
                                                       [answer], section, _random.Random(0))
        speech = span_embeddings(loaded.model.language_model, span_ids, 0.0, torch.Generator())
        with torch.no_grad():
            loss, n = loaded.model.loss_sum(tokens, labels,
                                            speech=SpeechInputs(embeddings=speech, embedding_lengths=lengths))
        losses[answer] = float(loss) / int(n)
    assert losses["two"] < 0.5 * losses["one"], losses
    # a training row without its translation: the text stage names it instead of training an empty answer
    rows = (data / "ast_train.jsonl").read_text().splitlines()
    first = {k: v for k, v in json.loads(rows[0]).items() if k != "translation"}
    (data / "ast_bad.jsonl").write_text("\n".join([json.dumps(first)] + rows[1:]) + "\n")
    bad_data = {**over["data"], "train": str(data / "ast_bad.jsonl")}
    bad = _adapter_cfg(data, tmp_path / "bad", **{**over, "data": bad_data})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    capsys.readouterr()
    assert main(["run", str(path)]) == 2
    assert "ast_bad.jsonl:1: AST needs a 'translation'" in capsys.readouterr().err


@pytest.mark.parametrize("over, message", [
    ({"data": {"sets": ["espeak", "librispeech"]}}, "key 'data.sets': unknown ['librispeech']"),
    ({"data": {"train": "nowhere/train.jsonl"}}, "makes the espeak sets of data.sets"),
    ({"spec_augment": {"telephone": 1.5}}, "telephone"),
])
def test_bad_speech_config_is_one_clear_line(data, tmp_path, capsys, over, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_adapter_cfg(data, tmp_path / "runs", **over)))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("herd: error:") and message in err and len(err.splitlines()) == 1, err


def test_telephone_band_reaches_training(data, tmp_path):
    """spec_augment.telephone changes what the model trains on (the first step's loss), nothing else."""
    over = dict(steps=1, eval_every=100, schedule={"warmup_steps": 0},
                data={"eval": [{"manifest": str(data / "test.jsonl"), "name": "heldout"}]})
    losses = []
    for name, fraction in (("plain", 0.0), ("phone", 1.0)):
        run = _run(tmp_path, _adapter_cfg(data, tmp_path / name, spec_augment={"telephone": fraction}, **over))
        losses.append(json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"])
    assert losses[0] != losses[1]


def test_data_prepare_makes_the_configured_sets(data, tmp_path, monkeypatch):
    import experiments.recipes.speech_adapter as recipe
    from experiments.cli import resolve_config
    from experiments.recipes.speech_adapter import _prepare_data
    seen = {}
    monkeypatch.setattr(recipe, "prepare_speech", lambda out, downloads, sets: seen.update(sets=sets) or "fake")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_adapter_cfg(data, tmp_path / "runs", data={"prepare": True, "sets": ["ast"]})))
    _prepare_data(resolve_config(str(path), [])[1])
    assert seen == {"sets": ("ast",)}


def test_copy_batch_puts_each_token_repeated_between_silences(data):
    import random as _random
    from adapters.speech_inputs import AudioTokens
    from adapters.speech_prompts import IGNORE_INDEX, SpeechPrompter
    from experiments.speech.lm_copy import CopyPretrainSection, copy_batch, draw_texts
    from language.chat_format import chat_format_for
    from language.tokenizer import load_tokenizer
    with pytest.raises(ValueError, match="repeat_max"):
        CopyPretrainSection(repeat_min=3, repeat_max=2)
    tokenizer = load_tokenizer(data / "tok")
    ids = AudioTokens(start_id=300, placeholder_id=301, end_id=302)
    prompter = SpeechPrompter(chat_format_for(tokenizer), ids)
    texts = ["one two", "three"]
    section = CopyPretrainSection(steps=1, repeat_min=2, repeat_max=3, silence_max=1)
    tokens, labels, span_ids, lengths = copy_batch(prompter, [tokenizer.encode(t) for t in texts], texts, section,
                                                   _random.Random(0))
    for i, text in enumerate(texts):
        span = span_ids[i, :lengths[i]].tolist()
        spoken = [t for t in span if t >= 0]
        runs = [t for j, t in enumerate(spoken) if j == 0 or spoken[j - 1] != t]
        assert runs == tokenizer.encode(text) and 2 * len(runs) <= len(spoken) <= 3 * len(runs)
        assert span[1:-1].count(-1) == 0 and len(span) - len(spoken) <= 2  # silence only at the ends
        assert int((tokens[i] == ids.placeholder_id).sum()) == lengths[i]
        answer = [t for t in labels[i].tolist() if t != IGNORE_INDEX]
        assert tokenizer.decode(answer).strip().startswith(text)
        keep = labels[i, :-1] != IGNORE_INDEX  # house convention: labels[t] is the token at t + 1
        assert keep.any() and torch.equal(labels[i, :-1][keep], tokens[i, 1:][keep])
    # repeat_gap: a token's run ends with one zero vector, so "one one" is two runs, never one long one
    gap = CopyPretrainSection(steps=1, repeat_min=2, repeat_max=3, silence_max=0, fill="repeat_gap")
    ids_twice = tokenizer.encode("one one")
    _, _, span_ids, lengths = copy_batch(prompter, [ids_twice], ["one one"], gap, _random.Random(0))
    span = span_ids[0, :lengths[0]].tolist()
    runs = "".join("x" if t >= 0 else "." for t in span).split(".")
    assert span[-1] == -1 and span.count(-1) == len(ids_twice)
    assert len(runs[:-1]) == len(ids_twice) and all(len(r) in (2, 3) for r in runs[:-1])

    pool = ["one two", "three"]
    rng = _random.Random(0)
    assert set(draw_texts(pool, 20, 0.0, rng)) == set(pool)
    drawn = draw_texts(pool, 50, 1.0, rng)
    assert {w for t in drawn for w in t.split()} == {"one", "two", "three"} and not set(drawn) <= set(pool)
    assert max(len(t.split()) for t in drawn) == 2 and min(len(t.split()) for t in drawn) == 1


def test_bestrq_two_ranks_train_on_halves_of_each_step(data, tmp_path, herd_two_ranks):
    """BEST-RQ under 2 ranks: each rank masks and trains on its half of a step (a micro-batch's masks are drawn
    from its first position, so the same rows get the same masks however many ranks share the step): the losses
    and masked-frame counts equal one process with 2 micro-batches. Rounding ~1e-7 of losses ~4 vs 1e-5."""
    cfg = {"experiment": "brq", "recipe": "bestrq_pretrain", "seed": 0, "output_dir": str(tmp_path / "two"),
           "encoder": {"preset": "tiny", "dim": 32, "n_layers": 1, "n_heads": 2, "ffn_dim": 64},
           "bestrq": {"codebook_size": 64, "n_codebooks": 2, "mask_span": 8, "mask_start_prob": 0.1},
           "data": {"train": [str(data / "train.jsonl")], "valid": None},
           "steps": 3, "batch_size": 8, "optim": {"lr": 3e-3}, "schedule": {"warmup_steps": 1}}
    path = tmp_path / "brq.yaml"
    path.write_text(yaml.safe_dump(cfg))
    herd_two_ranks("run", str(path), "engine.backend=deepspeed", "engine.zero_stage=1", cwd=tmp_path)
    assert main(["run", str(path), f"output_dir={tmp_path / 'one'}", "engine.grad_accum_steps=2"]) == 0
    records = [[json.loads(x) for x in (tmp_path / out / "brq" / "latest" / "metrics.jsonl").read_text().splitlines()]
               for out in ("two", "one")]
    assert [r["tokens"] for r in records[0]] == [r["tokens"] for r in records[1]]
    assert [r["loss"] for r in records[0]] == pytest.approx([r["loss"] for r in records[1]], abs=1e-5)

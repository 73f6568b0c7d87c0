"""One base LM under every adapter, CI-sized: the base_lm stage trains one LM on the image questions' text and the
copy task together (both held-out losses fall); an image_adapter run and a speech_adapter run both freeze it;
`herd compose` joins their folders into one model holding both modalities (same base LM digest); a speech run
whose span position code differs from the base's is refused in one line."""
import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from adapters import ImageInputs, ImageTextCollator, load_model
from adapters.speech_inputs import audio_span
from experiments.cli import main
from speech.espeak import Voice
from speech.synthetic import SynthItem, write_dataset
from vision.tiling import TiledImage, TilingConfig, aspect_ratio_id

WORDS = ("one", "two", "three", "open the door")


def write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    rng = random.Random(0)
    for split, n, voices in (("train", 16, ["en-us+m1", "en+f4"]), ("test", 4, ["en+f3"])):
        items = [SynthItem(f"{split}{i}", WORDS[i % len(WORDS)], "en",
                           Voice(*rng.choice(voices).split("+"), rate=170, pitch=50)) for i in range(n)]
        write_dataset(items, root, split, progress=lambda _: None)
    runs = root / "runs"
    base = {"experiment": "base", "recipe": "base_lm", "seed": 0, "output_dir": str(runs),
            "language": {"preset": "tiny", "dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64,
                         "tokenizer_vocab_size": 300},
            "image_text": {"batch_size": 4, "prompt": {"question_template": "Question: {question} Answer:"},
                           "data": {"scenes": {"image_size": 28}, "qa_per_sample": 2}, "spoken_questions": 0.5},
            "copy": {"batch_size": 4, "train": str(root / "train.jsonl"), "valid": str(root / "test.jsonl")},
            "steps": 30, "optim": {"lr": 1e-2}, "schedule": {"warmup_steps": 2}, "eval_examples": 8,
            "eval_every": 15, "checkpoint_every": 15}
    assert main(["run", str(write(root / "base.yaml", base))]) == 0
    root.joinpath("base.json").write_text(json.dumps(base))
    base_final = str(runs / "base" / "latest" / "final")
    image = {"experiment": "img", "recipe": "image_adapter", "seed": 0, "output_dir": str(runs),
             "model": {"language": {"path": base_final},
                       "vision": {"preset": "tiny", "image_size": 28, "patch_size": 14, "max_num_tiles": 1,
                                  "patch_padding_multiple": 1}, "cross_attention_every": 1},
             "prompt": {"question_template": "{question}"},
             "data": {"scenes": {"image_size": 28, "eval_scenes": 3, "eval_splits": ["valid", "heldout"]},
                      "qa_per_sample": 2},
             "steps": 3, "batch_size": 4, "schedule": {"warmup_steps": 1}, "checkpoint_every": 3, "eval_every": 3,
             "eval": {"questions": 4, "loss_batches": 1, "max_new_tokens": 2, "batch_size": 8}}
    assert main(["run", str(write(root / "image.yaml", image))]) == 0
    speech = {"experiment": "asr", "recipe": "speech_adapter", "task": "asr", "seed": 0, "output_dir": str(runs),
              "language_model": {"path": base_final},
              "encoder": {"preset": "tiny", "dim": 32, "n_layers": 1, "n_heads": 2, "ffn_dim": 64},
              "adapter": {"preset": "tiny", "dim": 32, "n_heads": 2, "ffn_dim": 64},
              "data": {"train": str(root / "train.jsonl"), "eval": [{"manifest": str(root / "test.jsonl"),
                                                                     "name": "heldout_voices"}]},
              "steps": 3, "batch_size": 4, "schedule": {"warmup_steps": 1}, "eval_every": 3, "eval_utterances": 2,
              "checkpoint_every": 3, "max_new_tokens": 3}
    assert main(["run", str(write(root / "speech.yaml", speech))]) == 0
    return root, speech


def test_the_base_stage_learns_both_text_tasks(chain):
    root, _ = chain
    summary = json.loads((root / "runs" / "base" / "latest" / "summary.json").read_text())
    assert summary["eval_image_text_loss"] < 0.8 * summary["eval_image_text_loss_before"]
    assert summary["eval_copy_loss"] < 0.8 * summary["eval_copy_loss_before"]
    assert summary["eval_spoken_question_loss"] < 0.8 * summary["eval_spoken_question_loss_before"]
    meta = json.loads((root / "runs" / "base" / "latest" / "final" / "config.json").read_text())
    assert meta["model"]["image"] is None and meta["model"]["speech"] is None
    assert meta["language_model"]["path"] == "language_model"  # the trained LM lives in the folder


@torch.no_grad()
def test_image_and_speech_adapters_on_the_base_compose_into_one_model(chain):
    root, _ = chain
    runs = root / "runs"
    base = json.loads((runs / "base" / "latest" / "final" / "config.json").read_text())
    digests = {json.loads((runs / e / "latest" / "final" / "config.json").read_text())["language_model"]["sha256"]
               for e in ("img", "asr")}
    assert digests == {base["language_model"]["sha256"]}
    both = root / "both"
    assert main(["compose", str(both), str(runs / "img" / "latest"), str(runs / "asr" / "latest")]) == 0
    loaded = load_model(both)
    model = loaded.model
    assert model.config.modalities == ["image", "speech"]
    speech_alone = load_model(runs / "asr" / "latest").model
    wave = torch.randn(1, 8000, generator=torch.Generator().manual_seed(0)) * 0.1
    sp = model.speech_features(wave)
    tokens = torch.tensor([[1, 2] + audio_span(model.placeholder_count(int(sp.lengths[0])), model.tokens.audio_tokens)])
    assert torch.equal(model(tokens, speech=sp), speech_alone(tokens, speech=sp))
    image_alone = load_model(runs / "img" / "latest").model
    tiles = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    image = TiledImage(tiles, (1, 1), aspect_ratio_id((1, 1), 1), (28, 28), (28, 28))
    collate = ImageTextCollator(model.tokens.image, TilingConfig(tile_size=28, max_tiles=1, max_images=1))
    batch = collate([{"tokens": [1, model.tokens.image, 5, 6], "images": [image]}])
    assert torch.equal(model(batch["tokens"], images=ImageInputs.from_batch(batch)),
                       image_alone(batch["tokens"], images=ImageInputs.from_batch(batch)))


def test_a_speech_adapter_with_another_span_code_than_the_base_is_refused(chain, tmp_path, capsys):
    _, speech = chain
    cfg = {**speech, "output_dir": str(tmp_path), "adapter": {**speech["adapter"], "span_position": 3.0}}
    assert main(["run", str(write(tmp_path / "s.yaml", cfg))]) == 2
    assert "span_position 3.0 differs from the 0.0 the base LM" in capsys.readouterr().err


def test_vqa_eval_asks_the_questions_typed_blind_and_spoken(chain, tmp_path):
    root, _ = chain
    runs = root / "runs"
    both = tmp_path / "both"
    assert main(["compose", str(both), str(runs / "img" / "latest"), str(runs / "asr" / "latest")]) == 0
    cfg = {"experiment": "ev", "recipe": "vqa_eval", "output_dir": str(tmp_path / "runs"), "model": str(both),
           "data": {"format": "scenes", "split": "heldout", "scenes": {"image_size": 28, "eval_scenes": 2}},
           "controls": ["blind", "spoken"], "batch_size": 4, "max_new_tokens": 2, "device": "cpu"}
    assert main(["run", str(write(tmp_path / "ev.yaml", cfg))]) == 0
    summary = json.loads((tmp_path / "runs" / "ev" / "latest" / "summary.json").read_text())
    assert {"vqa_accuracy", "blind_accuracy", "spoken_accuracy", "spoken_points_over_blind"} <= set(summary)
    rows = [json.loads(x) for x in (tmp_path / "runs" / "ev" / "latest" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == summary["questions"] and all("spoken" in r and "prediction" in r["spoken"] for r in rows)


def test_spoken_questions_need_a_speech_modality(chain, tmp_path, capsys):
    root, _ = chain
    cfg = {"experiment": "ev", "recipe": "vqa_eval", "output_dir": str(tmp_path / "runs"),
           "model": str(root / "runs" / "img" / "latest"), "controls": ["spoken"], "device": "cpu",
           "data": {"format": "scenes", "scenes": {"image_size": 28, "eval_scenes": 1}}}
    assert main(["run", str(write(tmp_path / "ev.yaml", cfg))]) == 2
    assert "spoken questions need a speech modality" in capsys.readouterr().err


def test_every_multimodal_experiment_yaml_validates(chain, tmp_path, capsys):
    """experiments/multimodal/*.yaml resolve (base chains included), their runs/ and data/ paths pointed at this
    module's runs and manifests."""
    from experiments.config import load_experiment
    root, _ = chain
    runs = root / "runs"
    composed = tmp_path / "composed"
    assert main(["compose", str(composed), str(runs / "img" / "latest"), str(runs / "asr" / "latest")]) == 0
    targets = {"runs/quickstart_base": runs / "base" / "latest" / "final",
               "runs/quickstart/": runs / "base" / "latest" / "final" / "tokenizer",
               "runs/quickstart_image_clip": runs / "img" / "latest", "runs/quickstart_mm": composed,
               "data/": root / "train.jsonl"}

    def point(node):
        if isinstance(node, dict):
            return {k: point(v) for k, v in node.items()}
        if isinstance(node, list):
            return [point(v) for v in node]
        if isinstance(node, str):
            for prefix, target in targets.items():
                if node.startswith(prefix):
                    return str(target)
        return node

    yamls = sorted((Path(__file__).resolve().parents[2] / "experiments" / "multimodal").glob("*.yaml"))
    assert {p.name for p in yamls} == {"base.yaml", "image.yaml", "speech.yaml", "joint.yaml", "eval.yaml"}
    for path in yamls:
        data = point(load_experiment(path))
        assert main(["run", str(write(tmp_path / path.name, data)), "--print-config"]) == 0, path.name
        assert yaml.safe_load(capsys.readouterr().out)["recipe"] == data["recipe"]


def test_joint_stage_trains_the_speech_side_on_mixed_batches(chain, tmp_path):
    """joint_adapter on a composed folder: typed, spoken and ASR examples in one batch; only the speech parts (and
    the special-token rows) change; held-out typed / spoken / blind accuracy before and after; the folder loads."""
    from safetensors.torch import load_file
    root, _ = chain
    runs = root / "runs"
    both = tmp_path / "both"
    assert main(["compose", str(both), str(runs / "img" / "latest"), str(runs / "asr" / "latest")]) == 0
    cfg = {"experiment": "joint", "recipe": "joint_adapter", "seed": 0, "output_dir": str(runs),
           "model": str(both), "freeze": {"stage": "adapter_pretrain", "modalities": ["speech"]},
           "scenes": {"image_size": 28, "eval_scenes": 2},
           "mix": {"vqa": 2, "spoken_vqa": 2, "asr": 2, "asr_manifest": str(root / "train.jsonl")},
           "asr_eval": str(root / "test.jsonl"), "steps": 3, "schedule": {"warmup_steps": 1}, "checkpoint_every": 3,
           "eval_batch_size": 8}
    assert main(["run", str(write(tmp_path / "joint.yaml", cfg))]) == 0
    run = runs / "joint" / "latest"
    summary = json.loads((run / "summary.json").read_text())
    assert {"vqa_accuracy", "spoken_accuracy", "blind_accuracy", "before"} <= set(summary)
    assert {"vqa_accuracy", "spoken_accuracy", "asr_wer"} <= set(summary["before"]) and "asr_wer" in summary
    old, new = load_file(str(both / "adapters.safetensors")), load_file(str(run / "final" / "adapters.safetensors"))
    changed = {k.split(".")[0] for k in old if not torch.equal(old[k], new[k])}
    assert changed and changed <= {"speech_encoder", "speech_adapter", "extra_token_embeddings"}, changed
    image_row = load_model(both).model.tokens.rows(["image"])
    assert torch.equal(old["extra_token_embeddings.weight"][image_row], new["extra_token_embeddings.weight"][image_row])
    assert load_model(run).model.config.modalities == ["image", "speech"]


def test_quickstart_summary_reads_every_stage_it_finds(chain, tmp_path, capsys):
    """herd quickstart-summary over this chain's real runs (under the quickstart's experiment names): a figure and
    a baseline per stage that ran, the text and CLIP stages listed as not run, the table and the timeline written."""
    root, _ = chain
    if not (root / "runs" / "joint" / "latest" / "summary.json").exists():
        pytest.skip("the joint test did not run")
    runs = tmp_path / "runs"
    for experiment, ours in (("quickstart_base", "base"), ("quickstart_mm_image", "img"),
                             ("quickstart_mm_speech", "asr"), ("quickstart_mm_joint", "joint")):
        (runs / experiment).mkdir(parents=True)
        (runs / experiment / "latest").symlink_to((root / "runs" / ours / "latest").resolve())
    assert main(["quickstart-summary", "--runs", str(runs)]) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    for stage in ("base LM", "image adapter", "speech adapter", "joint"):
        assert "not run" not in rows[stage] and "lacks" not in rows[stage], rows[stage]
    assert "not run" in rows["text"] and "not run" in rows["image encoder (CLIP)"]
    assert "herd: not run yet: text, image encoder (CLIP)" in out
    assert (runs / "quickstart_summary.md").read_text().startswith("| stage |")
    assert (runs / "quickstart_summary.png").stat().st_size > 1000


def _assert_same_steps(two: Path, one: Path, n: int) -> None:
    """The 2-rank run's n training records equal the 1-process run's: same token counts, losses within 1e-4."""
    steps = [[r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
             for run in (two, one)]
    assert len(steps[0]) == n and [r["tokens"] for r in steps[0]] == [r["tokens"] for r in steps[1]]
    assert [r["loss"] for r in steps[0]] == pytest.approx([r["loss"] for r in steps[1]], abs=1e-4)


def test_joint_stage_on_two_ranks_trains_on_halves_of_each_step(chain, tmp_path, herd_two_ranks):
    """Under 2 ranks (DeepSpeed ZeRO-1, gloo) each rank trains on its half of a step's mixed rows (typed, spoken,
    ASR): token counts and losses equal one process with 2 micro-batches of the same halves. Step 1 is the same
    arithmetic; ZeRO-1's flat partitions round the updates differently (~log2(P) * u ~ 1e-6 relative per step),
    which moves losses ~1-10 by < 1e-5 after 3 steps; 1e-4. A rank on the wrong rows moves them by >= 1e-2."""
    root, _ = chain
    runs = root / "runs"
    both = tmp_path / "both"
    assert main(["compose", str(both), str(runs / "img" / "latest"), str(runs / "asr" / "latest")]) == 0

    def cfg(out, **extra):
        return {"experiment": "joint", "recipe": "joint_adapter", "seed": 0, "output_dir": str(out),
                "model": str(both), "freeze": {"stage": "adapter_pretrain"}, "scenes": {"image_size": 28,
                                                                                        "eval_scenes": 1},
                "mix": {"vqa": 2, "spoken_vqa": 2, "asr": 2, "asr_manifest": str(root / "train.jsonl")},
                "eval_questions": 2, "steps": 3, "schedule": {"warmup_steps": 1}, "checkpoint_every": 3, **extra}
    herd_two_ranks("run", str(write(tmp_path / "two.yaml", cfg(tmp_path / "two"))), "engine.backend=deepspeed",
                   "engine.zero_stage=1", cwd=tmp_path)
    assert main(["run", str(write(tmp_path / "one.yaml", cfg(tmp_path / "one", engine={"grad_accum_steps": 2})))]) == 0
    _assert_same_steps(tmp_path / "two" / "joint" / "latest", tmp_path / "one" / "joint" / "latest", n=3)
    assert json.loads((tmp_path / "two" / "joint" / "latest" / "summary.json").read_text())["before"]


def test_joint_stage_refuses_zero3(chain, tmp_path, capsys):
    root, _ = chain
    cfg = {"experiment": "joint", "recipe": "joint_adapter", "output_dir": str(tmp_path),
           "model": str(root / "runs" / "img" / "latest"), "mix": {"asr": 0},
           "engine": {"backend": "deepspeed", "zero_stage": 3}}
    assert main(["run", str(write(tmp_path / "j.yaml", cfg)), "--print-config"]) == 2
    assert "engine.zero_stage" in capsys.readouterr().err


def test_base_stage_on_two_ranks_trains_on_halves_of_each_step(chain, tmp_path, herd_two_ranks):
    """The base stage under 2 ranks (DeepSpeed ZeRO-1, gloo): each rank trains on its half of every step's image-text
    and copy rows; token counts equal and losses within 1e-4 of one process with 2 micro-batches (bound as in the
    joint stage's test); ZeRO-3 is refused with one line."""
    root, _ = chain
    base = json.loads((root / "base.json").read_text())

    def cfg(out, **extra):
        return {**base, "output_dir": str(out), "steps": 3, "eval_every": 100, "checkpoint_every": 3, **extra}
    herd_two_ranks("run", str(write(tmp_path / "two.yaml", cfg(tmp_path / "two"))), "engine.backend=deepspeed",
                   "engine.zero_stage=1", cwd=tmp_path)
    assert main(["run", str(write(tmp_path / "one.yaml", cfg(tmp_path / "one", engine={"grad_accum_steps": 2})))]) == 0
    _assert_same_steps(tmp_path / "two" / "base" / "latest", tmp_path / "one" / "base" / "latest", n=3)
    zero3 = cfg(tmp_path / "z", engine={"backend": "deepspeed", "zero_stage": 3})
    assert main(["run", str(write(tmp_path / "z.yaml", zero3)), "--print-config"]) == 2

"""The image recipes through `herd run`, CI-sized: clip_pretrain -> image_adapter (encoder from the CLIP run) ->
a second stage from the first (more tiles, chat format, hot-swapped LM) -> vqa_eval; exact resume; the frozen LM
untouched; one-line errors; every experiments/image/*.yaml validates."""
import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from experiments.cli import main
from language import Llama

TINY_LM = {"preset": "tiny", "dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64,
           "tokenizer_vocab_size": 300}
TINY_VISION = {"preset": "tiny", "image_size": 28, "patch_size": 14, "max_num_tiles": 1, "patch_padding_multiple": 1}


def write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def adapter_cfg(root: Path, experiment="img", **over) -> dict:
    cfg = {"experiment": experiment, "recipe": "image_adapter", "seed": 0, "output_dir": str(root / "runs"),
           "model": {"language": dict(TINY_LM), "vision": dict(TINY_VISION), "cross_attention_every": 1},
           "prompt": {"question_template": "{question}"},
           "data": {"scenes": {"image_size": 28, "eval_scenes": 3}, "qa_per_sample": 2},
           "steps": 6, "batch_size": 4, "optim": {"lr": 3e-3, "eps": 1e-8, "weight_decay": 0.01},
           "schedule": {"warmup_steps": 1}, "checkpoint_every": 2, "eval_every": 3,
           "eval": {"questions": 4, "loss_batches": 1, "max_new_tokens": 2, "batch_size": 8}}
    for key, value in over.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def runs_of(root: Path, experiment: str) -> list[Path]:
    return sorted(p for p in (root / "runs" / experiment).glob("*") if not p.is_symlink())


def folder_config(run: Path) -> dict:
    """config.json of a run's model folder (final/)."""
    return json.loads((run / "final" / "config.json").read_text())


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """One CLIP run and one image_adapter run whose encoder starts from it (shared by the tests below)."""
    root = tmp_path_factory.mktemp("image")
    clip = {"experiment": "clip", "recipe": "clip_pretrain", "output_dir": str(root / "runs"),
            "model": {"vision": dict(TINY_VISION), "text": {"context_length": 48, "width": 32, "heads": 2, "layers": 1},
                      "embed_dim": 16},
            "data": {"scenes": {"image_size": 28}, "eval_pairs": 8}, "steps": 4, "batch_size": 8,
            "schedule": {"warmup_steps": 1}, "eval_every": 2, "checkpoint_every": 4}
    assert main(["run", str(write(root / "clip.yaml", clip))]) == 0
    cfg = adapter_cfg(root, **{"model.vision": {"init_from": str(root / "runs" / "clip" / "latest")},
                               "data.scenes.eval_splits": ["valid", "heldout"]})
    assert main(["run", str(write(root / "adapter.yaml", cfg))]) == 0
    return root


def test_clip_pretrain_writes_an_encoder_the_adapter_loads(chain):
    (clip,) = runs_of(chain, "clip")
    summary = json.loads((clip / "summary.json").read_text())
    assert summary["chance"] == pytest.approx(1 / 8) and 0 <= summary["i2t_accuracy"] <= 1
    assert any("eval_i2t_accuracy" in r for r in map(json.loads, (clip / "metrics.jsonl").read_text().splitlines()))
    encoder = load_file(clip / "final" / "encoder.safetensors")
    assert "clip_projection.weight" in encoder and (clip / "final" / "vision_config.json").is_file()
    (run,) = runs_of(chain, "img")
    assert folder_config(run)["settings"]["image"]["vision_source"] == str(clip.resolve())
    # the adapter model is built with the CLIP encoder's weights (tile embeddings and global layers fresh)
    from experiments.cli import resolve_config
    from experiments.recipes.image_adapter import build_model
    _, cfg = resolve_config(str(chain / "adapter.yaml"), [])
    model, _, _ = build_model(cfg, run)  # reuses the run's tokenizer and LM
    assert torch.equal(model.vision_model.patch_embedding.weight, encoder["patch_embedding.weight"])
    assert torch.equal(model.vision_model.transformer.layers[0].mlp.fc1.weight,
                       encoder["transformer.layers.0.mlp.fc1.weight"])


def test_image_adapter_writes_everything_and_keeps_the_lm_frozen(chain):
    (run,) = runs_of(chain, "img")
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "loss_curve.png", "predictions.jsonl",
                 "final/adapters.safetensors", "final/config.json"):
        assert (run / name).is_file(), name
    assert (run.parent / "latest").resolve() == run.resolve()
    summary = json.loads((run / "summary.json").read_text())
    for key in ("vqa_accuracy", "vqa_per_type", "blind_accuracy", "blank_accuracy", "points_over_blind"):
        assert key in summary, key
    assert summary["language_model_unchanged"] is True
    # the frozen LM saved at the start (random preset weights) is bit-identical to the one trained around
    from experiments.recipes.image_adapter import weights_digest

    assert weights_digest(Llama.from_pretrained(run / "language_model")) == summary["language_model_sha256"]
    weights = load_file(run / "final" / "adapters.safetensors")
    assert weights and not any(k.startswith("language_model.") for k in weights)
    assert any(k.startswith("cross_attention_layers.") for k in weights)
    # the model folder: the run's random preset LM saved into it (the folder loads on its own), the recipe's
    # settings, and the model as trained (the LM digest checked on load)
    from adapters.model_folder import load_model
    meta = folder_config(run)
    assert meta["language_model"]["path"] == "language_model" and (run / "final" / "language_model").is_dir()
    assert meta["model"]["special_tokens"]["image"] == meta["model"]["language"]["vocab_size"]
    assert meta["settings"]["image"]["prompt"]["question_template"] == "{question}"
    loaded = load_model(run)
    assert weights_digest(loaded.model.language_model) == summary["language_model_sha256"]
    assert all(torch.equal(v, weights[k]) for k, v in loaded.model.non_language_state().items())
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["extra_state"]["language_model"] == "run:language_model"  # the checkpoint records the frozen LM
    assert not any("language_model." in k for k in load_file(ckpt / "model.safetensors"))
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert rows and {"image", "blind", "blank"} <= set(rows[0])
    # two evaluation splits: the first (valid, i.i.d.) at the top level, the compositional one nested
    assert summary["eval_split"] == "valid" and all(r["question_id"].startswith("valid/") for r in rows)
    assert {"vqa_accuracy", "blank_accuracy", "points_over_blind"} <= set(summary["heldout"])
    heldout = [json.loads(line) for line in (run / "predictions_heldout.jsonl").read_text().splitlines()]
    assert len(heldout) == summary["heldout"]["eval_questions"]
    assert all(r["question_id"].startswith("heldout/") for r in heldout)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_heldout_vqa_accuracy" in r for r in records) and any("eval_vqa_accuracy" in r for r in records)


def test_attention_grounding_adds_its_loss_to_the_same_first_step(chain, tmp_path):
    (plain,) = runs_of(chain, "img")
    cfg = yaml.safe_load((chain / "adapter.yaml").read_text())
    cfg.update(output_dir=str(tmp_path / "runs"), steps=2, grounding={"weight": 2.0})
    cfg["eval_every"] = 100
    assert main(["run", str(write(tmp_path / "g.yaml", cfg))]) == 0
    (grounded,) = runs_of(tmp_path, "img")
    # same weights and batch at step 1: the grounding term (-log attention mass on the named objects) comes on top
    assert losses(grounded)[0] > losses(plain)[0] + 0.1, (losses(grounded)[0], losses(plain)[0])
    assert "grounding" in yaml.safe_load((grounded / "config.yaml").read_text())
    records = [json.loads(line) for line in (grounded / "metrics.jsonl").read_text().splitlines()]
    masses = [r.get("grounding_attention_mass") for r in records if "loss" in r]
    assert len(masses) == 2 and masses[0] is not None and all(m is None or 0 < m < 1 for m in masses)


def test_stop_and_resume_equals_an_uninterrupted_run(chain, tmp_path):
    (full,) = runs_of(chain, "img")
    cfg = yaml.safe_load((chain / "adapter.yaml").read_text())
    cfg["output_dir"] = str(tmp_path / "runs")
    path = write(tmp_path / "a.yaml", cfg)
    assert main(["run", str(path), "stop_after_steps=3"]) == 0
    assert main(["run", str(path), "resume=true"]) == 0
    (run,) = runs_of(tmp_path, "img")
    assert losses(run) == losses(full)
    a, b = load_file(run / "final" / "adapters.safetensors"), load_file(full / "final" / "adapters.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_next_stage_more_tiles_chat_format_and_hot_swapped_lm(chain, tmp_path):
    (first,) = runs_of(chain, "img")
    # an "instruct" LM of the same shape: the first stage's frozen LM with other weights, in its own folder
    from experiments.recipes.image_adapter import weights_digest
    from language.checkpoints import save_hf
    from language.tokenizer import load_tokenizer
    instruct = Llama.from_pretrained(first / "language_model")
    with torch.no_grad():
        for p in instruct.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_hf(instruct, tmp_path / "instruct")
    load_tokenizer(first / "language_model").save(tmp_path / "instruct")  # the preset LM folder has its tokenizer
    cfg = adapter_cfg(tmp_path, experiment="sft", **{
        "model.init_from": str(first), "model.vision": {"max_num_tiles": 2},
        "model.language": {"swap_to": str(tmp_path / "instruct")}, "prompt.style": "chat",
        "data.scenes.image_size": 56, "steps": 2, "checkpoint_every": 2, "eval_every": 2, "eval.controls": ["blind"]})
    assert main(["run", str(write(tmp_path / "sft.yaml", cfg))]) == 0
    (run,) = runs_of(tmp_path, "sft")
    meta = folder_config(run)
    settings = meta["settings"]["image"]
    assert meta["model"]["image"]["vision"]["max_num_tiles"] == 2 and settings["init_from"] == str(first / "final")
    # the first stage's LM (saved into its model folder), hot-swapped for the instruct LM, recorded by its path
    assert settings["base_language_model"] == str((first / "final" / "language_model").resolve())
    assert meta["language_model"]["path"] == str((tmp_path / "instruct").resolve())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["language_model_sha256"] == weights_digest(instruct)  # trained around the swapped-in LM
    before = load_file(first / "final" / "adapters.safetensors")
    # layouts both encoders know keep their tile embeddings; the layouts of 2 tiles get fresh rows
    new = load_file(run / "final" / "adapters.safetensors")
    assert new["vision_model.pre_tile_positional_embedding.embedding.weight"].shape[1] == 2 * 32
    assert before["vision_model.patch_embedding.weight"].shape == new["vision_model.patch_embedding.weight"].shape
    # model.vision.init_from reads the encoder of an image model folder (a run or its final/)
    from experiments.image.model import read_encoder
    config, state = read_encoder(first)
    assert config.max_num_tiles == 1 and set(state) == {k.removeprefix("vision_model.") for k in before
                                                        if k.startswith("vision_model.")}
    assert torch.equal(state["patch_embedding.weight"], before["vision_model.patch_embedding.weight"])


def test_vqa_eval_on_scenes_and_a_vqav2_file(chain, tmp_path):
    (run,) = runs_of(chain, "img")
    cfg = {"experiment": "ev", "recipe": "vqa_eval", "output_dir": str(tmp_path / "runs"), "model": str(run),
           "data": {"limit": 6}, "max_new_tokens": 2}
    assert main(["run", str(write(tmp_path / "ev.yaml", cfg))]) == 0
    (ev,) = runs_of(tmp_path, "ev")
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["questions"] == 6 and summary["metric"] == "vqa_exact" and "blind_accuracy" in summary
    assert len((ev / "predictions.jsonl").read_text().splitlines()) == 6
    # a VQAv2 questions + annotations pair over two scene images: VQA accuracy over 10 human answers
    from vision.scenes import generate_scene
    for i in range(2):
        generate_scene(i, "heldout").image.save(tmp_path / f"COCO_val2014_{i:012d}.jpg")
    qs = {"data_subtype": "val2014", "questions": [{"question_id": i, "image_id": i, "question": "Is there a star?"}
                                                   for i in range(2)]}
    ans = {"annotations": [{"question_id": i, "answers": [{"answer": "yes"}] * 10} for i in range(2)]}
    (tmp_path / "q.json").write_text(json.dumps(qs))
    (tmp_path / "a.json").write_text(json.dumps(ans))
    cfg.update(experiment="ev2", data={"format": "vqav2", "annotations": str(tmp_path / "q.json"),
                                       "vqav2_answers": str(tmp_path / "a.json"), "image_dir": str(tmp_path)})
    assert main(["run", str(write(tmp_path / "ev2.yaml", cfg))]) == 0
    summary = json.loads((runs_of(tmp_path, "ev2")[0] / "summary.json").read_text())
    assert summary["metric"] == "vqa" and summary["questions"] == 2


def test_lm_prior_stage_trains_the_random_lm_on_text_then_freezes_it_and_a_resume_reuses_it(chain, tmp_path, capsys):
    from experiments.recipes.image_adapter import weights_digest

    cfg = adapter_cfg(tmp_path, "prior", **{"model.language.prior_pretrain": {"steps": 30, "batch_size": 4,
                                                                              "warmup_steps": 1, "lr": 1e-2}})
    path = write(tmp_path / "prior.yaml", cfg)
    assert main(["run", str(path)]) == 0
    (full,) = runs_of(tmp_path, "prior")
    summary = json.loads((full / "summary.json").read_text())
    note = summary["prior_pretrain"]
    assert note["prior_loss_last"] < note["prior_loss_first"]
    # the recorded LM is the prior-trained one (not the seed's random LM of the plain run), unchanged since
    lm = Llama.from_pretrained(full / "language_model")
    (plain,) = runs_of(chain, "img")
    assert weights_digest(lm) != weights_digest(Llama.from_pretrained(plain / "language_model"))
    assert summary["language_model_unchanged"] and weights_digest(lm) == summary["language_model_sha256"]
    cfg["output_dir"] = str(tmp_path / "again")
    path = write(tmp_path / "again.yaml", cfg)
    assert main(["run", str(path), "stop_after_steps=3"]) == 0
    assert main(["run", str(path), "resume=true"]) == 0
    run = sorted(p for p in (tmp_path / "again" / "prior").glob("*") if not p.is_symlink())[0]
    assert losses(run) == losses(full)
    assert json.loads((run / "summary.json").read_text())["language_model_sha256"] == summary["language_model_sha256"]
    # redraw_answers goes through the stage: a different text stage, hence a different recorded LM
    cfg["output_dir"] = str(tmp_path / "redraw")
    cfg["model"]["language"]["prior_pretrain"]["redraw_answers"] = 1.0
    assert main(["run", str(write(tmp_path / "redraw.yaml", cfg)), "stop_after_steps=1"]) == 0
    run = sorted(p for p in (tmp_path / "redraw" / "prior").glob("*") if not p.is_symlink())[0]
    assert weights_digest(Llama.from_pretrained(run / "language_model")) != summary["language_model_sha256"]
    # a checkpoint LM is never prior-trained here
    bad = write(tmp_path / "bad.yaml", {**cfg, "model": {**cfg["model"], "language": {
        "path": str(tmp_path), "prior_pretrain": {"steps": 2}}}})
    capsys.readouterr()
    assert main(["run", str(bad)]) == 2
    assert "'prior_pretrain' trains a random preset LM" in capsys.readouterr().err


def test_answers_by_form_pool_per_masked_question_and_break_the_colour_shape_pairs():
    from experiments.image.lm_prior import AnswersByForm
    from vision.scenes import QA, SceneConfig, generate_scene
    config = SceneConfig(image_size=56, max_objects=2, p_word=0, p_digit=0)
    qas = [qa for i in range(300) for qa in generate_scene(i, "train", 0, config).qa]
    forms = AnswersByForm(qas, config.colors + config.shapes)
    assert forms.form("How many circles are there?") == forms.form("How many squares are there?") \
        == "How many _ are there?"
    assert forms.form("Is the red star above or below the blue diamond?") == "Is the _ _ above or below the _ _?"
    assert set(forms.pools["What shape is the _ object?"]) == set(config.shapes)
    assert set(forms.pools["Is the _ _ to the left or to the right of the _ _?"]) == {"left", "right"}
    # as_is, "What shape is the red object?" is never answered "circle" (a held-out pair); by form it is, as often
    # as the training answers of the form say
    red = QA("What shape is the red object?", "star", "shape")
    assert not any(q.question == red.question and q.answer == "circle" for q in qas)
    rng = random.Random(0)
    drawn = [forms.redraw(red, rng) for _ in range(400)]
    assert {d.answer for d in drawn} == set(config.shapes) and all(d.type == "shape" for d in drawn)
    assert forms.redraw(QA("What word is written in the image?", "cat", "text"), rng).answer == "cat"  # unknown form


@pytest.mark.parametrize("override,message", [
    ("model.vison.preset=tiny", "unknown key 'model.vison'; did you mean 'model.vision'?"),
    ("model.language.path=/nowhere/lm", "path '/nowhere/lm' does not exist"),
    ("model.init_from=/nowhere", "path '/nowhere' does not exist"),
    ("model.vision.init_from=runs/no_such_stage/final", "(an earlier run's output: run that stage first)"),
    ("data.scenes.qa_types=[colour]", "qa_types"),
    ("engine.backend=deepspeed engine.zero_stage=3", "model.always_run_encoder=true"),
    ("model.vision.preset=vit-x", "unknown vision preset 'vit-x'"),
    ("model.language.prior_pretrain.steps=2 model.language.prior_pretrain.redraw_answers=1 data.task=caption",
     "redraw_answers pools the question-answer pairs of procedural scenes"),
    ("model.language.prior_pretrain.redraw_answers=1.5", "redraw_answers"),
    ("grounding.weight=1 data.task=caption", "grounding.weight needs procedural scenes"),
    ("grounding.weight=1 model.vision.max_num_tiles=2", "grounding.weight needs one tile per image"),
    ("grounding.question_types=[text]", "question_types"),
    ("grounding.weight=1 engine.backend=deepspeed engine.zero_stage=3 model.always_run_encoder=true",
     "use engine.zero_stage <= 2"),
])
def test_bad_config_is_one_clear_line(tmp_path, capsys, override, message):
    path = write(tmp_path / "bad.yaml", adapter_cfg(tmp_path))
    assert main(["run", str(path), *override.split()]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("herd: error:") and message in err and len(err.splitlines()) == 1, err


def test_vqa_eval_of_a_folder_that_is_no_model(tmp_path, capsys):
    cfg = {"experiment": "ev", "recipe": "vqa_eval", "output_dir": str(tmp_path / "runs"), "model": str(tmp_path)}
    assert main(["run", str(write(tmp_path / "ev.yaml", cfg))]) == 2
    assert "not a model folder" in capsys.readouterr().err


def test_prompt_formats_label_only_answers():
    from experiments.image.data import PromptFormat, PromptSection
    from language.tokenizer import train_bpe
    from vision.image_dataset import ImageSample
    from vision.scenes import QA
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "t.txt").write_text("What color is the star? red yes no Describe the image. " * 50)
        tok = train_bpe([Path(tmp) / "t.txt"], 300, tmp)
    sample = ImageSample([], "a red star", [QA("What color is the star?", "red", "color")], [], "s", 0)
    image_id = tok.vocab_size
    for style in ("plain", "chat"):
        fmt = PromptFormat(tok, image_id, PromptSection(style=style), 512)
        ex = fmt.training_sample(sample, "vqa", 1, random.Random(0))
        assert ex["tokens"].count(image_id) == 1 and ex["tokens"][:2] == [tok.bos_id, image_id]
        trained = [t for t, lab in zip(ex["tokens"], ex["labels"]) if lab != -100]
        assert tok.decode(trained, skip_special=True).strip() == "red"  # + the closing token, nothing else
        assert len(trained) == len(tok.encode(" red" if style == "plain" else "red")) + 1
        prompt = fmt.question_prompt("What color is the star?")
        assert ex["tokens"][:len(prompt)] == prompt  # evaluation asks exactly what training answered
        assert image_id not in fmt.question_prompt("What color is the star?", with_image=False)


def test_prepare_images_writes_manifests_once(tmp_path):
    from experiments.data_prep_images import prepare_images
    from vision.image_dataset import ImageManifestDataset
    from vision.tiling import TilingConfig
    line = prepare_images(tmp_path, n_train=3, n_heldout=2, image_size=32)
    assert "train 3 scenes" in line and "heldout 2 scenes" in line
    assert len(ImageManifestDataset(tmp_path / "train.jsonl", TilingConfig(tile_size=32, max_tiles=1))) == 3
    assert "(kept)" in prepare_images(tmp_path, n_train=3, n_heldout=2, image_size=32)


IMAGE_YAMLS = sorted((Path(__file__).resolve().parents[2] / "experiments" / "image").glob("*.yaml"))


def _run_paths(node, prefix=""):
    """Dotted keys of the string values that point into runs/ (outputs of earlier runs)."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _run_paths(value, f"{prefix}{key}.")
        elif isinstance(value, str) and value.startswith("runs/"):
            yield prefix + key


def test_every_image_experiment_yaml_validates(chain, capsys):
    """experiments/image/*.yaml resolve (base chains included), with torch and with DeepSpeed; paths into runs/
    are pointed at this module's CLIP / adapter runs."""
    from experiments.config import load_experiment
    names = {p.name for p in IMAGE_YAMLS}
    assert {"clip_pretrain.yaml", "adapter_pretrain.yaml", "anneal.yaml", "sft.yaml", "eval_vqa.yaml",
            "quickstart.yaml", "smollm2_vqa.yaml"} <= names, names
    (clip,) = runs_of(chain, "clip")
    (img,) = runs_of(chain, "img")
    for path in IMAGE_YAMLS:
        data = load_experiment(path)
        overrides = []
        for key in _run_paths(data):
            target = (img / "language_model" if key.startswith("model.language.") else
                      clip if key == "model.vision.init_from" else img)
            overrides.append(f"{key}={target}")
        backends = ["torch", "deepspeed"] if "engine" in data else [None]
        for backend in backends:
            extra = [f"engine.backend={backend}"] if backend else []
            assert main(["run", str(path), *overrides, *extra, "--print-config"]) == 0, (path.name, backend)
            printed = yaml.safe_load(capsys.readouterr().out)
            assert printed["recipe"] == data["recipe"]
            if backend:
                assert printed["engine"]["backend"] == backend


def test_image_adapter_under_deepspeed_equals_torch(chain, tmp_path):
    """engine.backend=deepspeed (one CPU process, ZeRO-2, FP32): the same losses as the torch run, the LM untouched."""
    pytest.importorskip("deepspeed")
    (full,) = runs_of(chain, "img")
    cfg = yaml.safe_load((chain / "adapter.yaml").read_text())
    cfg["output_dir"] = str(tmp_path / "runs")
    cfg["engine"] = {"backend": "deepspeed", "zero_stage": 2}
    assert main(["run", str(write(tmp_path / "ds.yaml", cfg))]) == 0
    (run,) = runs_of(tmp_path, "img")
    assert losses(run) == pytest.approx(losses(full), abs=1e-5)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["language_model_unchanged"] is True and (run / "final" / "adapters.safetensors").is_file()


def test_two_ranks_train_on_halves_of_each_step(tmp_path, herd_two_ranks):
    """Under 2 ranks (DeepSpeed, gloo) each rank trains on its half of a step's samples: losses and token counts
    equal one process with 2 micro-batches of the same halves. fp32 sums in another order: rounding ~1e-7 of
    losses ~6, far inside 1e-5."""
    cfg = adapter_cfg(tmp_path, steps=3, **{"eval_every": 100, "eval.loss_batches": 0})
    path = write(tmp_path / "two.yaml", cfg)
    herd_two_ranks("run", str(path), "engine.backend=deepspeed", "engine.zero_stage=1", cwd=tmp_path)
    (two,) = runs_of(tmp_path, "img")
    assert main(["run", str(path), f"output_dir={tmp_path / 'one' / 'runs'}", "engine.grad_accum_steps=2"]) == 0
    (one,) = runs_of(tmp_path / "one", "img")
    records = [[r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
               for run in (two, one)]
    assert [r["tokens"] for r in records[0]] == [r["tokens"] for r in records[1]]
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)

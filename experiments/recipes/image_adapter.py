"""Image adapter training (paper Sec 7.3-7.4): a frozen LM, an image encoder and gated cross-attention adapters.

One recipe, three paper stages, chosen by the YAML:
- adapter pre-training (`data.task: caption`, loss on the caption tokens; or `vqa` on answer tokens);
- annealing (`model.init_from` the pre-training run, a higher tile resolution or more tiles, a re-warmed LR);
- SFT (`prompt.style: chat`: questions in the LM's chat format, loss on the assistant tokens only, and
  `model.language.swap_to` hot-swaps the instruct LM in).
The LM is always frozen (its weights are checked bit-identical at the end); the encoder and adapters train
per `model.freeze`. A random preset LM can first learn the task's text alone (`model.language.prior_pretrain`,
experiments/image/lm_prior.py), as the paper's LM arrives knowing language. Engine checkpoints hold only trainable
weights; the run records the frozen LM's path.
On procedural scenes, `grounding.weight` adds an attention-grounding loss (experiments/image/grounding.py: the
answer position's cross-attention is pushed onto the objects the question names; a training aid, not part of the
paper's recipe).
Held-out VQA accuracy (greedy short answers, exact match after VQA normalisation, per question type) is
logged every `eval_every` steps, and the final evaluation adds the image-blind and blank-image controls.
`final/` is the model folder (`adapters.model_folder`: config.json, adapters.safetensors with every non-LM weight,
the tokenizer; see experiments/image/model.py), which vqa_eval and a later stage's `model.init_from` read.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file
from torch import nn

from adapters.freezing import parameter_counts
from adapters.image_tokens import ImageTextCollator
from adapters.model_folder import WEIGHTS_FILE, ModelFolderError, find_model_folder, load_model, read_meta, save_model
from adapters.multimodal import ImageInputs, MultimodalModel
from adapters.multimodal_config import MultimodalConfig
from language.checkpoints import save_hf
from language.model import Llama
from language.tokenizer import load_tokenizer
from training.config import EngineConfig, OptimConfig, ScheduleConfig, validate
from training.distributed import is_rank0
from training.engine import Engine
from training.loop import Cadence, fit
from training.metrics import MetricsLogger, plot_curves
from vision.config import VisionConfig
from vision.encoder import VisionEncoder
from vision.tiling import TilingConfig

from ..common import RunConfig
from ..config import ConfigError
from ..image.model import (ModelSection, _from_record, _portable, adapt_encoder_state, build_encoder, build_language,
                           composed_config, resolve_path)
from ..image.data import DataSection, PromptFormat, PromptSection, manifest_vqa_items, scene_vqa_items, training_samples
from ..image.grounding import AttentionGrounding, GroundingSection, grounding_targets
from ..image.lm_prior import AnswersByForm, prior_pretrain, without_image
from .vqa_eval import evaluate_vqa, summarize, write_predictions


@dataclass
class EvalSection:
    questions: int = field(default=200, metadata={"range": (0, None), "help": "held-out questions per periodic "
                                                                               "eval (0 = all)"})
    final_questions: int = field(default=0, metadata={"range": (0, None), "help": "final eval (0 = all)"})
    loss_batches: int = field(default=2, metadata={"range": (0, None), "help": "held-out batches for eval_loss"})
    controls: list[str] = field(default_factory=lambda: ["blind", "blank"], metadata={
        "help": "final controls: blind (no image), blank (a plain grey image)"})
    batch_size: int = field(default=64, metadata={"range": (1, None)})
    max_new_tokens: int = field(default=5, metadata={"range": (1, None)})

    def __post_init__(self):
        bad = [c for c in self.controls if c not in ("blind", "blank")]
        if bad:
            raise ValueError(f"key 'controls': {bad} are not among blind, blank")


@dataclass
class Config(RunConfig):
    recipe: str = "image_adapter"
    model: ModelSection = field(default_factory=ModelSection)
    prompt: PromptSection = field(default_factory=PromptSection)
    data: DataSection = field(default_factory=DataSection)
    steps: int = field(default=200, metadata={"range": (1, None), "help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"range": (1, None), "help": "samples per step (all ranks)"})
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.01))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=20))
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    grounding: GroundingSection = field(default_factory=GroundingSection)
    eval_every: int = field(default=100, metadata={"range": (1, None), "help": "steps between held-out evaluations"})
    checkpoint_every: int = field(default=100, metadata={"range": (1, None)})
    stop_after_steps: Optional[int] = field(default=None, metadata={
        "range": (1, None), "help": "stop with a checkpoint after this many steps (resume=true continues)"})

    def __post_init__(self):
        parts = self.engine.grad_accum_steps * int(os.environ.get("WORLD_SIZE", "1"))
        if self.batch_size % parts:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of engine.grad_accum_steps x ranks "
                             f"= {parts}")
        if self.engine.backend == "deepspeed" and self.engine.zero_stage == 3 and not self.model.always_run_encoder:
            raise ValueError("engine.zero_stage=3 needs model.always_run_encoder=true (every rank must run every "
                             "module, also on batches without images)")
        if self.grounding.weight and (self.data.train_manifest or self.data.task != "vqa"):
            raise ValueError("grounding.weight needs procedural scenes (no data.train_manifest) and data.task=vqa: "
                             "it needs to know where the objects a question names are")
        if self.grounding.weight and self.engine.backend == "deepspeed" and self.engine.zero_stage == 3:
            raise ValueError("grounding.weight recomputes attention outside the blocks' forward, where ZeRO-3 keeps "
                             "their weights partitioned: use engine.zero_stage <= 2")
        prior = self.model.language.prior_pretrain
        if prior.steps and prior.redraw_answers and (self.data.train_manifest or self.data.task != "vqa"):
            raise ValueError("model.language.prior_pretrain.redraw_answers pools the question-answer pairs of "
                             "procedural scenes: it needs data.task=vqa and no data.train_manifest")


class ImageTrainer(nn.Module):
    """What the engine trains: the image model, its forward the summed loss (`MultimodalModel.loss_sum`), so the
    loss is computed through the engine's forward (DeepSpeed's hooks). Its weights are the model's under `model.`."""

    def __init__(self, model: MultimodalModel):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, images: Optional[ImageInputs] = None):
        return self.model.loss_sum(tokens, labels, images=images)

    def gradient_checkpointing_enable(self) -> None:  # engine.activation_checkpointing
        self.model.gradient_checkpointing_enable()


def loss_fn(trainer, batch: dict):
    """Summed next-token cross-entropy over the labelled tokens (captions / answers), and their count; trainer: an
    `ImageTrainer` (or the engine around one)."""
    return trainer(batch["tokens"], batch["labels"], ImageInputs.from_batch(batch))


def text_loss_fn(model: MultimodalModel, batch: dict):
    """`loss_fn` of a batch without images, on the model itself (the LM prior stage, before any engine)."""
    return model.loss_sum(batch["tokens"], batch["labels"])


def grounded_loss_fn(grounding: AttentionGrounding, weight: float):
    """`loss_fn` + weight x the attention-grounding loss of the batch's "grounding" rows
    (experiments/image/grounding.py)."""
    def loss_with_grounding(model, batch: dict):
        grounding.recording = batch.get("grounding") is not None
        try:
            loss, count = loss_fn(model, batch)
            if grounding.recording:
                loss = loss + weight * grounding.loss(batch["grounding"])
        finally:
            grounding.recording, grounding.inputs = False, []
        return loss, count
    return loss_with_grounding


# ---------------------------------------------------------------------------------------------- the model

def build_model(cfg: Config, run_dir: Path):
    """-> (MultimodalModel with the stage's freezing, tokenizer, record): record = {"language_model", "tokenizer"}
    (their paths, `run:<relative>` inside the run) and "settings" (settings["image"] of the model folder)."""
    m = cfg.model
    earlier, earlier_dir, earlier_meta, earlier_weights = None, None, None, None
    if m.init_from:  # an earlier stage's model folder: its config, encoder and adapters
        earlier_dir = find_model_folder(resolve_path(m.init_from, "model.init_from"))
        earlier_meta = read_meta(earlier_dir)
        try:
            earlier = MultimodalConfig.from_dict(earlier_meta["model"])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFolderError(f"{earlier_dir}: bad 'model' entry: {e}") from None
        if earlier.image is None:
            raise ConfigError(f"model.init_from: the model in {earlier_dir} has no image modality")
        earlier_weights = load_file(str(earlier_dir / WEIGHTS_FILE))
    if m.language.path or earlier is None:
        lm, tokenizer, record = build_language(m.language, run_dir, lambda: training_texts(cfg), cfg.seed)
    else:  # the earlier stage's frozen LM (its digest checked) and tokenizer
        loaded = load_model(earlier_dir)
        lm, tokenizer = loaded.model.language_model, loaded.tokenizer
        record = {k: _portable(str(_in_folder(earlier_dir, ref)), run_dir)
                  for k, ref in (("language_model", earlier_meta["language_model"]["path"]),
                                 ("tokenizer", earlier_meta["tokenizer"]))}
    settings = {}
    if m.language.swap_to:  # paper Sec 7.4: the instruct LM replaces the base LM, adapters unchanged
        settings["base_language_model"] = str(_from_record(record["language_model"], run_dir))
        record["language_model"] = _portable(m.language.swap_to, run_dir)
        swapped = Llama.from_pretrained(resolve_path(m.language.swap_to, "model.language.swap_to"))
        if not m.language.tokenizer:
            tokenizer = load_tokenizer(resolve_path(m.language.swap_to))
            record["tokenizer"] = record["language_model"]
    else:
        swapped = None
    if earlier is None:
        encoder, vision_source = build_encoder(m.vision)
    else:
        encoder, vision_source = _encoder_from_earlier(m, earlier.image.vision, earlier_weights, earlier_dir)
    config = composed_config(m, lm.config, encoder.config, earlier)
    model = MultimodalModel(config, language_model=lm, vision_encoder=encoder)
    if earlier is None:
        model.reset_adapter_parameters(m.adapter_init_std)
    else:
        adapters = {k: v for k, v in earlier_weights.items() if not k.startswith("vision_model.")}
        missing, unexpected = model.load_state_dict(adapters, strict=False)
        missing = [k for k in missing if not k.startswith(("language_model.", "vision_model."))]
        if missing or unexpected:
            raise ConfigError(f"model.init_from: {earlier_dir / WEIGHTS_FILE} does not fit this model: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}")
    if swapped is not None:
        try:
            model.swap_language_model(swapped)
        except ValueError as e:
            raise ConfigError(f"model.language.swap_to: {e}") from None
    model.freeze_for_stage(m.freeze.policy())
    settings.update(vision_source=vision_source, init_from=str(earlier_dir) if earlier_dir else None,
                    prompt=asdict(cfg.prompt))
    return model, tokenizer, {**record, "settings": settings}


def _in_folder(folder: Path, ref: str) -> Path:
    """A path a model folder's config.json records: absolute, or relative to the folder."""
    path = Path(ref)
    return path if path.is_absolute() else folder / path


def _encoder_from_earlier(m: ModelSection, old: VisionConfig, weights: dict, folder: Path) -> tuple[VisionEncoder, str]:
    try:
        new = VisionConfig(**{**old.to_dict(), **m.vision.overrides()})
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model.vision: {e}") from None
    prefix = "vision_model."
    state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    encoder = VisionEncoder(new)
    encoder.load_state_dict(adapt_encoder_state(state, old, new, encoder.state_dict()))
    return encoder, str(folder)


def save_final(model: MultimodalModel, folder: Path, tokenizer, record: dict, run_dir: Path,
               weights: dict[str, torch.Tensor], reload_language: bool) -> Path:
    """Write the model folder: the LM by its recorded path, or (a preset LM of this run) saved into the folder.
    reload_language: the engine changed the LM's tensors (ZeRO-3 partitions them, DeepSpeed's bf16 casts them),
    so the folder is written around the LM as loaded from its recorded path, the one a load finds."""
    lm_path = _from_record(record["language_model"], run_dir)
    if reload_language:
        lm = Llama.from_pretrained(lm_path)
        with torch.device("meta"):  # only the shapes of the rest count: `weights` are saved
            model = MultimodalModel(model.config, language_model=lm)
    return save_model(model, folder, tokenizer=tokenizer, weights=weights,
                      language_path=None if record["language_model"].startswith("run:") else str(lm_path),
                      tokenizer_path=str(_from_record(record["tokenizer"], run_dir)),
                      settings={"image": record["settings"]})


def training_texts(cfg: Config, n_scenes: int = 2000) -> list[str]:
    """Texts for the BPE of a preset LM: captions, questions and answers of training data, prompt strings."""
    p = cfg.prompt
    texts = [p.instruction, p.caption_prompt, p.system or "", p.question_template]
    if cfg.data.train_manifest:
        from vision.image_dataset import ImageManifestDataset
        rows = ImageManifestDataset(cfg.data.train_manifest, TilingConfig()).rows
        for row in rows:
            texts += [row.caption or ""] + [f"{q.question} {q.answer}" for q in row.qa]
            texts += [m["content"] for m in row.messages]
        return texts
    from vision.scenes import generate_scene
    config = cfg.data.scenes.scene_config()
    for i in range(n_scenes):
        scene = generate_scene(i, "train", cfg.data.scenes.seed, config)
        texts += [scene.caption] + [f"{q.question} {q.answer}" for q in scene.qa]
    return texts


PRIOR_FILE = "prior_pretrain.json"
FORM_POOL_SAMPLES = 2000  # training samples whose answers make prior_pretrain.redraw_answers' pools


def _prior_stage(cfg: Config, model: MultimodalModel, fmt: PromptFormat, train, collate, run_dir: Path) -> dict:
    """model.language.prior_pretrain: train the run's random LM on the training samples' text alone
    (experiments/image/lm_prior.py) before the engine takes the trainable parameters, and save it over
    run_dir/language_model (the LM this run records), with PRIOR_FILE beside it. A resumed run has loaded that
    LM already (build_language) and skips the stage. {} when off."""
    section = cfg.model.language.prior_pretrain
    if not section.steps:
        return {}
    lm_dir = run_dir / "language_model"
    if (lm_dir / PRIOR_FILE).is_file():
        return json.loads((lm_dir / PRIOR_FILE).read_text())
    validate(cfg.engine, cfg.optim, cfg.schedule, cfg.steps)  # fail before the stage, not after it
    by_form = None
    if section.redraw_answers:
        scenes = cfg.data.scenes.scene_config()
        pool = [qa for i in range(min(FORM_POOL_SAMPLES, section.steps * section.batch_size)) for qa in train[i].qa]
        by_form = AnswersByForm(pool, scenes.colors + scenes.shapes)

    def text_sample(i: int, rng: random.Random) -> dict:
        sample = train[i]
        if by_form is not None:  # random() < 1 always: redraw_answers 1 redraws every answer
            sample = replace(sample, qa=[by_form.redraw(qa, rng) if rng.random() < section.redraw_answers else qa
                                         for qa in sample.qa])
        return without_image(fmt.training_sample(sample, cfg.data.task, cfg.data.qa_per_sample, rng),
                             model.tokens.image)

    def batch_at(step: int, rng: random.Random) -> dict:
        first = step * section.batch_size
        return collate([text_sample(i, rng) for i in range(first, first + section.batch_size)])

    note = prior_pretrain(model, batch_at, text_loss_fn, section)
    if is_rank0():
        save_hf(model.language_model, lm_dir)
        (lm_dir / PRIOR_FILE).write_text(json.dumps(note) + "\n")
    return note


def _training_loss(cfg: Config, model: MultimodalModel, collate):
    """-> (collate, loss_fn, AttentionGrounding or None) of the training steps: with grounding.weight, batches carry
    the grounded questions' targets and the loss adds the attention-grounding term (experiments/image/grounding.py)."""
    if not cfg.grounding.weight:
        return collate, loss_fn, None
    vision = model.config.image.vision
    if vision.max_num_tiles != 1:
        raise ConfigError(f"grounding.weight needs one tile per image (model.vision.max_num_tiles 1, got "
                          f"{vision.max_num_tiles}): targets are patches of the scene's single tile")
    per_tile = -(-vision.seq_len // vision.patch_padding_multiple) * vision.patch_padding_multiple

    def collate_with_targets(samples: list[dict]) -> dict:
        batch = collate(samples)
        batch["grounding"] = grounding_targets(samples, cfg.grounding, vision.image_size, vision.patch_size, per_tile)
        return batch
    grounding = AttentionGrounding(model)
    return collate_with_targets, grounded_loss_fn(grounding, cfg.grounding.weight), grounding


def weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _ImageTask:
    """The training loop's view of the run (training/loop.py): step s holds training samples s*B .. (s+1)*B-1
    (each built from its index with its own seeded RNG), collated per micro-batch; the loss (with grounding: its
    attention mass is logged per step); held-out VQA every eval_every steps."""

    def __init__(self, cfg: Config, train, sample, collate, loss, grounding, evaluate, model):
        self.cfg, self.train, self.sample, self._collate, self.loss = cfg, train, sample, collate, loss
        self.grounding, self._evaluate, self.model = grounding, evaluate, model

    def rows(self, step: int) -> list[int]:
        return list(range(step * self.cfg.batch_size, (step + 1) * self.cfg.batch_size))

    def collate(self, rows: list[int]) -> dict:
        return self._collate([self.sample(self.train, i, "train") for i in rows])

    def step_metrics(self) -> dict:
        mass = self.grounding.take_mean_mass() if self.grounding is not None else None
        # the loss includes the grounding term; this is what that term pushes up
        return {"grounding_attention_mass": mass} if mass is not None else {}

    def evaluate(self, step: int) -> dict:
        record = self._evaluate(step, log=False)["record"]
        self.model.train()
        return record


# ---------------------------------------------------------------------------------------------- the run

def run(cfg: Config, run_dir: Path) -> dict:
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    model, tokenizer, provenance = build_model(cfg, run_dir)
    zero3 = cfg.engine.backend == "deepspeed" and cfg.engine.zero_stage == 3
    image = model.config.image
    tiling = TilingConfig(tile_size=image.vision.image_size, max_tiles=image.vision.max_num_tiles,
                          max_images=image.max_images)
    fmt = PromptFormat(tokenizer, model.tokens.image, cfg.prompt, model.config.language.max_seq_len)
    train = training_samples(cfg.data, tiling, cfg.seed)
    # evaluation sets: the eval manifest, or one per scene split (the first drives periodic evals and eval_loss)
    if cfg.data.eval_manifest:
        splits, eval_sets = ["manifest"], {"manifest": manifest_vqa_items(cfg.data.eval_manifest, tiling)}
    else:
        splits = list(cfg.data.scenes.eval_splits)
        eval_sets = {split: scene_vqa_items(cfg.data.scenes, split) for split in splits}
    # eval_loss samples: the eval manifest (any split name but "train" selects it), or the first split's scenes
    loss_split = "heldout" if cfg.data.eval_manifest else splits[0]
    loss_samples = training_samples(cfg.data, tiling, cfg.seed, split=loss_split)
    collate = ImageTextCollator(model.tokens.image, tiling, image.token_policy, fmt.pad_id)
    train_collate, train_loss, grounding = _training_loss(cfg, model, collate)  # checks grounding's config first
    prior_note = _prior_stage(cfg, model, fmt, train, collate, run_dir)
    lm_digest = None if zero3 else weights_digest(model.language_model)
    lm_dtype = model.language_model.lm_head.weight.dtype
    counts = parameter_counts(model)
    engine = Engine(ImageTrainer(model), cfg.engine, cfg.optim, cfg.schedule, total_steps=cfg.steps, run_dir=run_dir,
                    seed=cfg.seed)
    model = engine.module.model  # the same model, on the engine's device
    state = engine.resume() or {"step": 0, "language_model": provenance["language_model"]}
    logger = MetricsLogger(run_dir)

    def sample(source, index: int, seed_tag: str) -> dict:
        return fmt.training_sample(source[index], cfg.data.task, cfg.data.qa_per_sample,
                                   random.Random(f"{cfg.seed}:{seed_tag}:{index}"))

    def heldout_loss() -> float:
        """Token-mean loss of the first eval.loss_batches batches of the eval split (this rank's share)."""
        total, tokens = 0.0, 0
        with torch.no_grad():
            for b in range(cfg.eval.loss_batches):
                rows = range(b * cfg.batch_size, (b + 1) * cfg.batch_size)[engine.rank::engine.world_size]
                batch = engine.backend.prepare_batch(collate([sample(loss_samples, i, "heldout") for i in rows]))
                loss, n = loss_fn(engine.model, batch)
                total, tokens = total + float(loss), tokens + int(n)
        return total / max(tokens, 1)

    def evaluate(step: int, final: bool = False, split: str = splits[0], log: bool = True) -> dict:
        limit = cfg.eval.final_questions if final else cfg.eval.questions
        subset = eval_sets[split][:limit] if limit else eval_sets[split]
        modes = ["image"] + (list(cfg.eval.controls) if final else [])
        results = evaluate_vqa(model, fmt, subset, tiling, modes=modes, batch_size=cfg.eval.batch_size,
                               max_new_tokens=cfg.eval.max_new_tokens)
        prefix = "eval" if split == splits[0] else f"eval_{split}"
        record = {f"{prefix}_vqa_accuracy": results["image"]["accuracy"]}
        record.update({f"{prefix}_vqa/{t}": a for t, a in results["image"]["per_type"].items()})
        for control in modes[1:]:
            record[f"{prefix}_{control}_accuracy"] = results[control]["accuracy"]
        if cfg.eval.loss_batches and split == splits[0]:
            record["eval_loss"] = heldout_loss()
        if log:
            logger.log(step, record)
        return {"results": results, "items": subset, "record": record}

    task = _ImageTask(cfg, train, sample, train_collate, train_loss, grounding, evaluate, model)
    model.train()
    fitted = fit(engine, task, Cadence.of(cfg, print_every=10), state, logger, desc=cfg.experiment, seed=cfg.seed)
    if fitted.stopped:
        return fitted.stopped_summary()

    finals = {split: evaluate(cfg.steps, final=True, split=split) for split in splits}
    final = finals[splits[0]]
    summary = {"steps": cfg.steps, "samples_seen": cfg.steps * cfg.batch_size, "skipped_steps": engine.skipped_total,
               "trainable_parameters": sum(c["trainable"] for c in counts.values()),
               "frozen_lm_parameters": counts["language_model"]["total"],
               "language_model": provenance["language_model"], "eval_split": splits[0],
               "eval_questions": len(final["items"])}
    if prior_note:
        summary["prior_pretrain"] = prior_note
    summary.update(summarize(final["results"]))  # the first split's figures at the top level
    for split in splits[1:]:
        summary[split] = {"eval_questions": len(finals[split]["items"]), **summarize(finals[split]["results"])}
    if lm_digest is not None:
        summary["language_model_unchanged"] = weights_digest(model.language_model) == lm_digest
        summary["language_model_sha256"] = lm_digest
    weights = engine.trainable_state_dict()  # a collective under ZeRO-3
    summary["train_time_s"] = fitted.train_time_s
    summary["wall_time_s"] = round(time.time() - t_start, 1)
    if is_rank0():
        trained = {k.removeprefix("model."): v for k, v in weights.items()}  # ImageTrainer's names
        export = {**model.non_language_state(), **{k: v for k, v in trained.items()
                                                   if not k.startswith("language_model.")}}
        save_final(model, run_dir / "final", tokenizer, provenance, run_dir, export,
                   reload_language=zero3 or model.language_model.lm_head.weight.dtype != lm_dtype)
        for split in splits:
            name = "predictions.jsonl" if split == splits[0] else f"predictions_{split}.jsonl"
            write_predictions(run_dir / name, finals[split]["items"], finals[split]["results"])
        plot_curves(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    engine.close()
    return summary

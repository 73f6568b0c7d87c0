"""Contrastive pre-training of the image encoder (paper Sec 7.2: the ViT-H/14 is first trained as a CLIP image
tower on image-caption pairs) with open_clip's text tower, tokenizer and `ClipLoss`.

The image side is `vision.encoder.VisionEncoder.forward_clip` (a single tile: class token -> layernorm_post ->
`clip_projection`); the text side is open_clip's `TextTransformer` built from `text` (an open_clip
`CLIPTextCfg`), tokenised by open_clip's bundled `SimpleTokenizer`. The loss is the symmetric InfoNCE of
`open_clip.loss.ClipLoss` with a learned temperature. Negatives are the other pairs of the same micro-batch
(and rank). Every `eval_every` steps held-out pairs (procedural scenes of the held-out split, whose colour-shape
pairs never occur in training, or `data.eval_manifest`) are retrieved both ways; accuracy is logged next to
chance (1 / number of pairs).

`final/` holds `encoder.safetensors` + `vision_config.json` (what `model.vision.init_from` of image_adapter
loads; the tile embeddings and global layers stay fresh, with zero gates), `text_tower.safetensors` and
`clip.json` (text config, embedding width, temperature).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from training.config import EngineConfig, OptimConfig, ScheduleConfig
from training.distributed import is_rank0
from training.engine import Engine
from training.loop import Cadence, fit
from training.metrics import MetricsLogger, plot_curves
from vision.config import preset as vision_preset
from vision.encoder import VisionEncoder
from vision.image_dataset import ImageManifestDataset
from vision.tiling import TilingConfig

from ..common import RunConfig
from ..config import ConfigError, ExistingPath
from ..image.model import ENCODER_CONFIG, ENCODER_FILE, VisionSection, build_encoder
from ..image.data import ManifestSamples, SceneSamples, ScenesSection


@dataclass
class TextTowerSection:
    """open_clip `CLIPTextCfg` fields (the tokenizer is open_clip's SimpleTokenizer: 49408 ids)."""
    context_length: int = field(default=77, metadata={"range": (8, None), "help": "tokens per caption (truncated)"})
    width: int = field(default=256, metadata={"range": (8, None)})
    heads: int = field(default=4, metadata={"range": (1, None)})
    layers: int = field(default=4, metadata={"range": (1, None)})
    mlp_ratio: float = field(default=4.0, metadata={"range": (0.5, None)})


@dataclass
class ClipModelSection:
    vision: VisionSection = field(default_factory=lambda: VisionSection(preset="small"))
    text: TextTowerSection = field(default_factory=TextTowerSection)
    embed_dim: int = field(default=128, metadata={"range": (1, None), "help": "shared embedding width"})
    init_temperature: float = field(default=0.07, metadata={"range": (1e-4, 1.0)})


@dataclass
class ClipData:
    train_manifest: Optional[ExistingPath] = field(default=None, metadata={
        "help": "JSONL of image + caption rows; null = procedural scenes"})
    eval_manifest: Optional[ExistingPath] = field(default=None, metadata={"help": "held-out pairs; null = held-out scenes"})
    scenes: ScenesSection = field(default_factory=ScenesSection)
    eval_pairs: int = field(default=256, metadata={"range": (2, None), "help": "held-out pairs per retrieval eval"})


@dataclass
class Config(RunConfig):
    recipe: str = "clip_pretrain"
    model: ClipModelSection = field(default_factory=ClipModelSection)
    data: ClipData = field(default_factory=ClipData)
    steps: int = field(default=300, metadata={"range": (1, None)})
    batch_size: int = field(default=64, metadata={"range": (2, None), "help": "pairs per step (all micro-batches)"})
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, betas=[0.9, 0.98], eps=1e-6,
                                                                   weight_decay=0.2))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=20))
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval_every: int = field(default=50, metadata={"range": (1, None)})
    checkpoint_every: int = field(default=100, metadata={"range": (1, None)})
    stop_after_steps: Optional[int] = field(default=None, metadata={"range": (1, None)})

    def __post_init__(self):
        if self.batch_size % self.engine.grad_accum_steps or self.batch_size // self.engine.grad_accum_steps < 2:
            raise ValueError(f"batch_size {self.batch_size} must split into engine.grad_accum_steps="
                             f"{self.engine.grad_accum_steps} micro-batches of at least 2 pairs")


class ClipModel(nn.Module):
    """Image encoder + open_clip text tower + learned temperature."""

    def __init__(self, visual: nn.Module, text: nn.Module, init_temperature: float):
        super().__init__()
        self.visual, self.text = visual, text
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    def forward(self, pixel_values: torch.Tensor, text_tokens: torch.Tensor):
        """pixel_values (B, 3, H, W), text_tokens (B, context) -> unit image and text features (B, D), scale."""
        image = F.normalize(self.visual.forward_clip(pixel_values), dim=-1)
        text = F.normalize(self.text(text_tokens), dim=-1)
        return image, text, self.logit_scale.exp().clamp(max=100.0)


def build_model(cfg: Config) -> ClipModel:
    from open_clip.model import CLIPTextCfg, _build_text_tower

    section = cfg.model.vision
    if section.init_from is None:
        try:
            encoder = VisionEncoder(vision_preset(section.preset, **{**section.overrides(),
                                                                     "clip_embed_dim": cfg.model.embed_dim}))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.vision: {e}") from None
    else:
        encoder, _ = build_encoder(section)
        if encoder.config.clip_embed_dim != cfg.model.embed_dim:
            raise ConfigError(f"model.embed_dim {cfg.model.embed_dim} differs from the CLIP projection width "
                              f"({encoder.config.clip_embed_dim}) of the encoder in model.vision.init_from")
    t = cfg.model.text
    text_cfg = CLIPTextCfg(context_length=t.context_length, width=t.width, heads=t.heads, layers=t.layers,
                           mlp_ratio=t.mlp_ratio)
    return ClipModel(encoder, _build_text_tower(cfg.model.embed_dim, text_cfg), cfg.model.init_temperature)


@torch.no_grad()
def retrieval_accuracy(model: ClipModel, pixels: torch.Tensor, tokens: torch.Tensor, captions: list[str],
                       chunk: int = 128) -> dict:
    """Image->text and text->image top-1 accuracy over N pairs (a retrieved caption identical to the right one
    counts as right), and chance = 1/N."""
    feats = [model(pixels[i:i + chunk], tokens[i:i + chunk]) for i in range(0, len(captions), chunk)]
    image, text = torch.cat([f[0] for f in feats]), torch.cat([f[1] for f in feats])
    sim = image @ text.T
    i2t = sum(captions[j] == captions[i] for i, j in enumerate(sim.argmax(1).tolist())) / len(captions)
    t2i = sum(captions[j] == captions[i] for i, j in enumerate(sim.argmax(0).tolist())) / len(captions)
    return {"eval_i2t_accuracy": i2t, "eval_t2i_accuracy": t2i, "eval_chance": 1.0 / len(captions)}


class _ClipTask:
    """The training loop's view of the run (training/loop.py): step s holds image-caption pairs s*B .. (s+1)*B-1;
    a micro-batch's contrastive loss uses its own pairs as negatives (the same on one rank with accumulation
    or on several ranks), times its size, so the step's loss is the mean over micro-batches."""

    def __init__(self, batch_size: int, train, tokenizer, clip_loss, evaluate):
        self.batch_size, self.train, self.tokenizer, self.clip_loss = batch_size, train, tokenizer, clip_loss
        self.evaluate = evaluate

    def rows(self, step: int) -> list[int]:
        return list(range(step * self.batch_size, (step + 1) * self.batch_size))

    def collate(self, rows: list[int]) -> dict:
        samples = [self.train[i] for i in rows]
        missing = [s.source for s in samples if s.caption is None]
        if missing:
            raise ConfigError(f"data.train_manifest: {missing[0]} has no caption")
        return {"pixel_values": torch.stack([s.images[0].tiles[0] for s in samples]),
                "text": self.tokenizer([s.caption for s in samples])}

    def loss(self, m, batch):
        image, text, scale = m(batch["pixel_values"], batch["text"])
        return self.clip_loss(image, text, scale) * image.shape[0], image.shape[0]


def run(cfg: Config, run_dir: Path) -> dict:
    from open_clip.loss import ClipLoss
    from open_clip.tokenizer import SimpleTokenizer

    t_start = time.time()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    vision = model.visual.config
    tiling = TilingConfig(tile_size=vision.image_size, max_tiles=1, max_images=1)
    tokenizer = SimpleTokenizer(context_length=cfg.model.text.context_length)
    d = cfg.data
    train = ManifestSamples(Path(d.train_manifest), tiling, cfg.seed) if d.train_manifest else SceneSamples(
        d.scenes, tiling, "train")
    heldout = (ImageManifestDataset(d.eval_manifest, tiling) if d.eval_manifest else SceneSamples(d.scenes, tiling,
                                                                                                   "heldout"))
    n_eval = min(d.eval_pairs, len(heldout)) if d.eval_manifest else d.eval_pairs
    eval_samples = [heldout[i] for i in range(n_eval)]
    if any(s.caption is None for s in eval_samples):
        raise ConfigError("data.eval_manifest: every held-out row needs a caption")
    eval_pixels = torch.stack([s.images[0].tiles[0] for s in eval_samples])
    eval_tokens = tokenizer([s.caption for s in eval_samples])
    clip_loss = ClipLoss()
    engine = Engine(model, cfg.engine, cfg.optim, cfg.schedule, total_steps=cfg.steps, run_dir=run_dir, seed=cfg.seed)
    state = engine.resume() or {"step": 0}
    logger = MetricsLogger(run_dir)

    def evaluate(step):
        model.eval()
        batch = engine.backend.prepare_batch({"p": eval_pixels, "t": eval_tokens})
        record = retrieval_accuracy(engine.module, batch["p"], batch["t"], [s.caption for s in eval_samples])
        record["eval_temperature"] = 1.0 / float(model.logit_scale.detach().exp())
        model.train()
        return record

    task = _ClipTask(cfg.batch_size, train, tokenizer, clip_loss, evaluate)
    model.train()
    fitted = fit(engine, task, Cadence.of(cfg, print_every=10), state, logger, desc=cfg.experiment, seed=cfg.seed)
    if fitted.stopped:
        return fitted.stopped_summary()
    final = evaluate(cfg.steps)
    logger.log(cfg.steps, final)
    weights = engine.trainable_state_dict()
    summary = {"steps": cfg.steps, "pairs_seen": cfg.steps * cfg.batch_size,
               "encoder_parameters": sum(p.numel() for p in model.visual.parameters()),
               "text_parameters": sum(p.numel() for p in model.text.parameters()),
               "i2t_accuracy": final["eval_i2t_accuracy"], "t2i_accuracy": final["eval_t2i_accuracy"],
               "chance": final["eval_chance"], "i2t_over_chance": final["eval_i2t_accuracy"] / final["eval_chance"],
               "eval_pairs": len(eval_samples), "wall_time_s": round(time.time() - t_start, 1)}
    if is_rank0():
        out = run_dir / "final"
        out.mkdir(parents=True, exist_ok=True)
        save_file({k[len("visual."):]: v.contiguous() for k, v in weights.items() if k.startswith("visual.")},
                  str(out / ENCODER_FILE), metadata={"format": "pt", "written_by": "herd.clip_pretrain"})
        (out / ENCODER_CONFIG).write_text(json.dumps(vision.to_dict(), indent=1) + "\n")
        save_file({k[len("text."):]: v.contiguous() for k, v in weights.items() if k.startswith("text.")},
                  str(out / "text_tower.safetensors"))
        (out / "clip.json").write_text(json.dumps({"embed_dim": cfg.model.embed_dim, "text": asdict(cfg.model.text),
                                                   "tokenizer": "open_clip SimpleTokenizer",
                                                   "temperature": final["eval_temperature"]}, indent=1) + "\n")
        plot_curves(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    engine.close()
    return summary

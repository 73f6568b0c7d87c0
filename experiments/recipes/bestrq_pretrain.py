"""BEST-RQ self-supervised pre-training of the Conformer encoder (paper Sec 8; speech/bestrq.py).

Span-masked log-mel features go through the encoder; one softmax head per codebook predicts the frozen
random-projection quantizer's code of every masked 40 ms frame. Logged per step: loss, masked fraction,
masked-frame accuracy per codebook and codebook usage perplexity per codebook; every `eval_every` steps
the same on held-out utterances with a fixed masking seed.

The quantizer is saved once as run_dir/checkpoints/quantizer.safetensors (next to the step checkpoints,
which hold only trained weights) and restored from there on resume; with global feature normalisation the
statistics (gathered over `data.stats_utterances` training utterances) go to run_dir/feature_stats.safetensors.
run_dir/final/ holds encoder.safetensors + encoder_config.json (+ feature_stats.safetensors,
quantizer.safetensors): `encoder.init_from` of the speech_adapter recipe loads it.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from speech.audio_io import AudioConfig
from speech.bestrq import BestRQConfig, BestRQModel, RandomProjectionQuantizer
from speech.conformer import ConformerConfig
from speech.conformer import preset as conformer_preset
from speech.features import FeatureConfig, FeatureStats, LogMelFrontend
from speech.speech_dataset import SpeechDataset, collate_speech
from training.config import EngineConfig, OptimConfig, ScheduleConfig
from training.distributed import is_rank0
from training.engine import Engine
from training.loop import Cadence, fit
from training.metrics import MetricsLogger, plot_curves

from ..common import RunConfig
from ..config import ConfigError, ExistingPath

ENCODER_FILE, ENCODER_CONFIG, STATS_FILE, QUANTIZER_FILE = ("encoder.safetensors", "encoder_config.json",
                                                            "feature_stats.safetensors", "quantizer.safetensors")


@dataclass
class EncoderSection:
    preset: str = field(default="tiny", metadata={"help": "speech/conformer.py preset"})
    init_from: Optional[ExistingPath] = field(default=None, metadata={
        "help": "a BEST-RQ run folder or its final/: the encoder's config and weights come from there"})
    dim: Optional[int] = field(default=None, metadata={"range": (2, None)})
    n_layers: Optional[int] = field(default=None, metadata={"range": (1, None)})
    n_heads: Optional[int] = field(default=None, metadata={"range": (1, None)})
    ffn_dim: Optional[int] = field(default=None, metadata={"range": (1, None)})
    conv_kernel: Optional[int] = field(default=None, metadata={"range": (1, None)})
    conv_norm: Optional[str] = field(default=None, metadata={"help": "batchnorm | layernorm"})
    dropout: Optional[float] = field(default=None, metadata={"range": (0.0, 1.0)})
    gradient_checkpointing: Optional[bool] = None

    def config(self) -> ConformerConfig:
        overrides = {k: v for k, v in asdict(self).items() if k not in ("preset", "init_from") and v is not None}
        try:
            return conformer_preset(self.preset, **overrides)
        except ValueError as e:
            raise ConfigError(f"encoder: {e}") from None


def load_encoder_init(section: EncoderSection):
    """(ConformerConfig, encoder weights or None, FeatureStats or None) for an encoder section: the preset, or
    the BEST-RQ output named by init_from (its saved config; dropout / gradient_checkpointing from the YAML)."""
    if section.init_from is None:
        return section.config(), None, None
    from safetensors.torch import load_file
    folder = Path(section.init_from)
    if (folder / "final" / ENCODER_FILE).is_file():
        folder = folder / "final"
    if not (folder / ENCODER_FILE).is_file() or not (folder / ENCODER_CONFIG).is_file():
        raise ConfigError(f"key 'encoder.init_from': {folder} holds no {ENCODER_FILE} + {ENCODER_CONFIG} "
                          "(a bestrq_pretrain run's final/)")
    saved = json.loads((folder / ENCODER_CONFIG).read_text())
    for key in ("dropout", "gradient_checkpointing"):
        if getattr(section, key) is not None:
            saved[key] = getattr(section, key)
    stats = FeatureStats.load(folder / STATS_FILE) if (folder / STATS_FILE).is_file() else None
    return ConformerConfig.from_dict(saved), load_file(str(folder / ENCODER_FILE)), stats


@dataclass
class DataSection:
    train: list[str] = field(default_factory=lambda: ["data/speech/espeak/train.jsonl"], metadata={
        "help": "training manifests (JSONL, LibriSpeech folder, FLEURS/CoVoST TSV); transcripts unused"})
    valid: Optional[str] = field(default="data/speech/espeak/valid.jsonl", metadata={"help": "held-out manifest"})
    valid_utterances: int = field(default=64, metadata={"range": (1, None)})
    prepare: bool = field(default=False, metadata={"help": "make missing data with `herd data prepare speech` first"})
    speech_dir: str = "data/speech"
    downloads_dir: str = "data/downloads"
    max_seconds: float = field(default=30.0, metadata={"range": (0.2, None)})
    stats_utterances: int = field(default=500, metadata={"range": (1, None), "help": "for global normalisation"})
    workers: int = field(default=0, metadata={"range": (0, None)})


@dataclass
class Config(RunConfig):
    recipe: str = "bestrq_pretrain"
    encoder: EncoderSection = field(default_factory=EncoderSection)
    bestrq: BestRQConfig = field(default_factory=BestRQConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    data: DataSection = field(default_factory=DataSection)
    steps: int = field(default=1000, metadata={"range": (1, None)})
    batch_size: int = field(default=16, metadata={"range": (1, None)})
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval_every: int = field(default=100, metadata={"range": (1, None)})
    checkpoint_every: int = field(default=200, metadata={"range": (1, None)})
    stop_after_steps: Optional[int] = field(default=None, metadata={"range": (1, None)})

    def __post_init__(self):
        if self.encoder.init_from is not None:
            raise ValueError("encoder.init_from: BEST-RQ pre-training starts from a fresh encoder")
        if not self.data.train:
            raise ValueError("data.train: at least one manifest is needed")


class _BestRQTask:
    """The training loop's view of the run (training/loop.py): step s's utterances (seeded per-epoch permutations
    over the concatenated manifests, as (position, index) pairs), their waveforms as a micro-batch with the seed of
    its masks (from its first position: the same rows get the same masks on any number of ranks), the loss."""

    def __init__(self, dataset: SpeechDataset, batch_size: int, seed: int):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self._order: tuple[int, list[int]] = (-1, [])
        self.loss = self.evaluate = None  # set by run()
        self.metrics: dict = {}

    def rows(self, step: int) -> list[tuple[int, int]]:
        n, out = len(self.dataset), []
        for position in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, offset = divmod(position, n)
            if self._order[0] != epoch:
                self._order = (epoch, torch.randperm(n, generator=torch.Generator().manual_seed(
                    self.seed * 1_000_003 + epoch)).tolist())
            out.append((position, self._order[1][offset]))
        return out

    def collate(self, rows: list[tuple[int, int]]) -> dict:
        batch = collate_speech([self.dataset[i] for _, i in rows])
        mask_seed = torch.tensor(self.seed * 1_000_003 + min(position for position, _ in rows) + 1)
        return {"waveforms": batch["waveforms"], "lengths": batch["lengths"], "mask_seed": mask_seed}

    def step_metrics(self) -> dict:
        return {k: v for k, v in self.metrics.items() if k != "loss"}


def _dataset(paths, audio: AudioConfig, on_bad: str) -> SpeechDataset:
    from speech.manifests import load_manifest
    utterances = []
    for p in paths:
        if not Path(p).exists():
            raise ConfigError(f"data: manifest '{p}' does not exist (data.prepare=true makes the quickstart set)")
        utterances += load_manifest(p, require_text=False)[0] if str(p).endswith(".jsonl") else load_manifest(p)[0]
    return SpeechDataset(utterances, audio, on_bad=on_bad)


def _feature_stats(cfg: Config, dataset: SpeechDataset, run_dir: Path) -> Optional[FeatureStats]:
    if cfg.features.normalization != "global":
        return None
    path = run_dir / STATS_FILE
    if path.is_file():  # resumed: the statistics the run started with
        return FeatureStats.load(path)
    raw = LogMelFrontend(FeatureConfig(**{**asdict(cfg.features), "normalization": "none"}))
    stats = FeatureStats(cfg.features.n_mels)
    for i in range(min(cfg.data.stats_utterances, len(dataset))):
        item = dataset[i]
        if item is not None:
            stats.update(*raw.log_mel(item["waveform"]))
    stats.save(path)
    return stats


def run(cfg: Config, run_dir: Path) -> dict:
    t_start = time.time()
    if cfg.data.prepare and is_rank0():
        from ..data_prep_speech import prepare_speech
        print("herd: " + prepare_speech(Path(cfg.data.speech_dir), Path(cfg.data.downloads_dir)), flush=True)
    audio = AudioConfig(max_seconds=cfg.data.max_seconds)
    train_set = _dataset(cfg.data.train, audio, "replace")
    valid_set = _dataset([cfg.data.valid], audio, "skip") if cfg.data.valid else None
    stats = _feature_stats(cfg, train_set, run_dir)
    torch.manual_seed(cfg.seed)
    model = BestRQModel(cfg.encoder.config(), cfg.bestrq)
    quantizer_path = run_dir / "checkpoints" / QUANTIZER_FILE
    if quantizer_path.is_file():  # resumed: the exact targets the run was trained on
        saved = RandomProjectionQuantizer.load(quantizer_path)
        model.quantizer.load_state_dict(saved.state_dict())
    elif is_rank0():
        quantizer_path.parent.mkdir(parents=True, exist_ok=True)
        model.quantizer.save(quantizer_path)
    try:
        engine = Engine(model, cfg.engine, cfg.optim, cfg.schedule, total_steps=cfg.steps, run_dir=run_dir, seed=cfg.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # the front end stays outside the trained module: float32 buffers whatever the backend casts
    frontend = LogMelFrontend(cfg.features, stats).to(engine.device)
    weight_dtype = model.encoder.stacker.proj.weight.dtype
    task = _BestRQTask(train_set, cfg.batch_size, cfg.seed)

    def loss_fn(m, batch):
        with torch.no_grad():
            features, lengths = frontend(batch["waveforms"], batch["lengths"])
        masks = torch.Generator().manual_seed(int(batch["mask_seed"]))
        out = m(features.to(weight_dtype), lengths, masks)  # DeepSpeed bf16 holds bf16 weights
        task.metrics = out.metrics  # the step's last micro-batch's (logged per step)
        return out.loss_sum, out.n_masked

    def periodic_eval(step: int) -> dict:
        result = evaluate(model, frontend, valid_set, cfg, engine.device)
        model.train()
        return {f"eval_{k}": v for k, v in result.items()}

    task.loss = loss_fn
    if valid_set is not None:
        task.evaluate = periodic_eval
    state = engine.resume() or {"step": 0}
    model.train()
    logger = MetricsLogger(run_dir)
    fitted = fit(engine, task, Cadence.of(cfg, print_every=25), state, logger, desc=cfg.experiment,
                 workers=cfg.data.workers, seed=cfg.seed)
    if fitted.stopped:
        return fitted.stopped_summary()
    last_eval = evaluate(model, frontend, valid_set, cfg, engine.device) if valid_set is not None else {}
    if last_eval:
        logger.log(cfg.steps, {f"eval_{k}": v for k, v in last_eval.items()})
    last_metrics = task.metrics
    weights = engine.trainable_state_dict()
    summary = {"steps": cfg.steps, "encoder_parameters": model.encoder.num_parameters(),
               "final_train_accuracy": last_metrics.get("accuracy"),
               "final_train_usage_perplexity": last_metrics.get("usage_perplexity"),
               **{f"eval_{k}": last_eval[k] for k in ("loss", "accuracy", "usage_perplexity") if k in last_eval},
               "chance_accuracy": 1.0 / cfg.bestrq.codebook_size, "skipped_steps": engine.skipped_total}
    if is_rank0():
        model.load_state_dict(weights, strict=False)
        save_encoder(model, cfg, run_dir / "final", stats, quantizer_path)
        plot_curves(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    summary["wall_time_s"] = round(time.time() - t_start, 1)
    engine.close()
    return summary


@torch.no_grad()
def evaluate(model: BestRQModel, frontend: LogMelFrontend, dataset: SpeechDataset, cfg: Config, device) -> dict:
    """Masked-frame loss / accuracy / usage perplexity on the first valid_utterances, fixed masks (seeded)."""
    model.eval()
    generator = torch.Generator().manual_seed(cfg.seed + 12345)
    totals, n_masked = {}, 0
    n = min(cfg.data.valid_utterances, len(dataset))
    for start in range(0, n, cfg.batch_size):
        batch = collate_speech([dataset[i] for i in range(start, min(start + cfg.batch_size, n))])
        if not batch["ids"]:
            continue
        features, lengths = frontend(batch["waveforms"].to(device), batch["lengths"].to(device))
        out = model(features.to(model.encoder.stacker.proj.weight.dtype), lengths, generator)
        for k, v in out.metrics.items():  # weighted by masked frames
            totals[k] = totals.get(k, 0.0) + v * out.n_masked
        n_masked += out.n_masked
    return {k: v / max(n_masked, 1) for k, v in totals.items()}


def save_encoder(model: BestRQModel, cfg: Config, out_dir: Path, stats, quantizer_path: Path) -> None:
    from safetensors.torch import save_file
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = model.encoder
    save_file({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}, str(out_dir / ENCODER_FILE))
    (out_dir / ENCODER_CONFIG).write_text(json.dumps(encoder.config.to_dict(), indent=2) + "\n")
    (out_dir / "features.json").write_text(json.dumps(asdict(cfg.features), indent=2) + "\n")
    if stats is not None:
        stats.save(out_dir / STATS_FILE)
    (out_dir / QUANTIZER_FILE).write_bytes(quantizer_path.read_bytes())

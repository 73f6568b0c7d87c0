"""What the image recipes share: model config sections, building the composed model (frozen LM + image encoder
+ adapters) from paths, presets or an earlier stage, and reading encoder weights back.

Paths in these sections are local files or folders (e.g. `data/weights/SmolLM2-135M-Instruct.Q4_1.gguf`, which
`make` extracts), or `pkg:<module>/<file>` for a file shipped inside an installed Python package.

A trained image model (an `image_adapter` run's `final/`) is a model folder (`adapters.model_folder`):
config.json (the `MultimodalConfig` with its image modality, the frozen LM's path and digest, and under
settings["image"] what the recipe records: the prompt settings, where the encoder started, the earlier stage)
and adapters.safetensors (every weight that is not the language model's: encoder, projector, cross-attention
blocks, extra token embeddings), with the tokenizer. A checkpoint LM's weights are never copied (the folder
records its path); a random preset LM made by the run is saved into the folder.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from safetensors.torch import load_file

from adapters.freezing import STAGES, stage_policy
from adapters.model_folder import load_language
from adapters.model_folder import WEIGHTS_FILE, ModelFolderError, is_model_folder, read_meta
from adapters.multimodal_config import ImageModality, MultimodalConfig
from adapters.special_tokens import SpecialTokens
from language import Llama, preset as language_preset
from language.checkpoints import save_hf
from language.tokenizer import load_tokenizer, train_bpe
from training.distributed import barrier, broadcast_object, is_rank0
from vision.config import VisionConfig, preset as vision_preset
from vision.encoder import VisionEncoder
from vision.open_clip_convert import config_from_open_clip, load_open_clip_visual, resize_position_embedding
from vision.tiling import supported_aspect_ratios

from ..config import ConfigError, missing_path
from .lm_prior import PriorPretrainSection

ENCODER_FILE, ENCODER_CONFIG = "encoder.safetensors", "vision_config.json"


def resolve_path(value: str, key: str = "path") -> Path:
    """A config path: `pkg:<module>/<file>` inside an installed package, or a local path that must exist."""
    if value.startswith("pkg:"):
        module, _, rest = value[4:].partition("/")
        spec = importlib.util.find_spec(module) if module else None
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"key '{key}': package '{module}' of '{value}' is not installed")
        path = Path(list(spec.submodule_search_locations)[0]) / rest
    else:
        path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(missing_path(key, value))
    return path


def _check_path(value: Optional[str], key: str) -> None:
    if value is not None:
        try:
            resolve_path(value, key)
        except ConfigError as e:
            raise ValueError(str(e)) from None


# ---------------------------------------------------------------------------------------------- sections

@dataclass
class LanguageSection:
    path: Optional[str] = field(default=None, metadata={
        "help": "frozen LM: HF folder, GGUF file, Meta folder, a text run's final/, a model folder (its LM, e.g. a "
                "base_lm run) or pkg:<module>/<file>; null = `preset` with random weights (saved into the run)"})
    preset: str = field(default="tiny", metadata={"help": "language/config.py preset when path is null"})
    dim: Optional[int] = field(default=None, metadata={"range": (8, None)})
    n_layers: Optional[int] = field(default=None, metadata={"range": (1, None)})
    n_heads: Optional[int] = field(default=None, metadata={"range": (1, None)})
    n_kv_heads: Optional[int] = field(default=None, metadata={"range": (1, None)})
    ffn_dim: Optional[int] = field(default=None, metadata={"range": (1, None)})
    rope_theta: Optional[float] = field(default=None, metadata={"range": (1.0, None)})
    init_std: Optional[float] = field(default=None, metadata={
        "range": (0.0, 10.0), "help": "std of a preset LM's random weights (null: Llama's 0.02); larger weights "
                                      "give sharper logits an adapter can steer"})
    tokenizer: Optional[str] = field(default=None, metadata={
        "help": "tokenizer path; null = the LM path's own, or (preset) a byte-level BPE trained on the training texts"})
    tokenizer_vocab_size: int = field(default=512, metadata={"range": (300, None), "help": "size of that BPE"})
    swap_to: Optional[str] = field(default=None, metadata={
        "help": "hot-swap this LM in after loading the earlier stage (paper: the instruct LM for SFT)"})
    prior_pretrain: PriorPretrainSection = field(default_factory=PriorPretrainSection, metadata={
        "help": "train the random preset LM on the task's text alone first (lm_prior.py), then freeze it"})

    def __post_init__(self):
        for key in ("path", "tokenizer", "swap_to"):
            _check_path(getattr(self, key), key)
        if self.path and self.init_std is not None:
            raise ValueError("key 'init_std' applies to a random preset LM (path: null), not to a checkpoint")
        if self.prior_pretrain.steps and (self.path or self.swap_to):
            raise ValueError("key 'prior_pretrain' trains a random preset LM (path: null, no swap_to); a "
                             "checkpoint LM already knows language and stays as loaded")


VISION_OVERRIDES = ("image_size", "patch_size", "width", "n_layers", "n_heads", "mlp_dim", "n_global_layers",
                    "intermediate_layers", "max_num_tiles", "patch_padding_multiple")


@dataclass
class VisionSection:
    preset: str = field(default="small", metadata={"help": "vision/config.py preset (ignored with init_from)"})
    init_from: Optional[str] = field(default=None, metadata={
        "help": "encoder weights: a clip_pretrain run (or its final/), an image_adapter run, or an open_clip "
                "checkpoint file (then open_clip_model names its config)"})
    open_clip_model: Optional[str] = field(default=None, metadata={"help": "open_clip config name, e.g. ViT-H-14"})
    image_size: Optional[int] = field(default=None, metadata={"range": (1, None), "help": "tile side in pixels"})
    patch_size: Optional[int] = field(default=None, metadata={"range": (1, None)})
    width: Optional[int] = field(default=None, metadata={"range": (1, None)})
    n_layers: Optional[int] = field(default=None, metadata={"range": (1, None)})
    n_heads: Optional[int] = field(default=None, metadata={"range": (1, None)})
    mlp_dim: Optional[int] = field(default=None, metadata={"range": (1, None)})
    n_global_layers: Optional[int] = field(default=None, metadata={"range": (0, None)})
    intermediate_layers: Optional[list[int]] = None
    max_num_tiles: Optional[int] = field(default=None, metadata={"range": (1, None), "help": "tiles per image"})
    patch_padding_multiple: Optional[int] = field(default=None, metadata={
        "range": (1, None), "help": "pad tile tokens to a multiple of this (Mllama 8; 1 = none, cheaper)"})

    def __post_init__(self):
        _check_path(self.init_from, "init_from")

    def overrides(self) -> dict:
        out = {k: getattr(self, k) for k in VISION_OVERRIDES if getattr(self, k) is not None}
        if "max_num_tiles" in out:  # every layout of up to max_num_tiles tiles (vision.tiling)
            out["max_aspect_ratio_id"] = len(supported_aspect_ratios(out["max_num_tiles"]))
        return out


@dataclass
class FreezeSection:
    stage: str = field(default="adapter_pretrain", metadata={"help": f"adapters/freezing.py stage: {', '.join(STAGES)}"})
    train_encoder: Optional[bool] = field(default=None, metadata={"help": "override the stage's choice"})
    train_adapters: Optional[bool] = None

    def __post_init__(self):
        self.policy()

    def policy(self):
        overrides = {k: v for k, v in (("train_encoder", self.train_encoder), ("train_adapters", self.train_adapters))
                     if v is not None}
        return stage_policy(self.stage, **overrides)


@dataclass
class ModelSection:
    language: LanguageSection = field(default_factory=LanguageSection)
    vision: VisionSection = field(default_factory=VisionSection)
    init_from: Optional[str] = field(default=None, metadata={
        "help": "earlier image_adapter stage (run folder, its final/ or a checkpoint): encoder + adapters, "
                "its LM unless language.path is set"})
    cross_attention_every: Optional[int] = field(default=None, metadata={
        "range": (1, None), "help": "LM layers per cross-attention block (null: 4, or the earlier stage's)"})
    cross_attention_layers: Optional[list[int]] = None
    image_token_policy: Literal["all_previous", "most_recent"] = "all_previous"
    max_images: int = field(default=1, metadata={"range": (1, None), "help": "images per sample at most"})
    adapter_init_std: float = field(default=0.02, metadata={
        "range": (0.0, 1.0), "help": "std of fresh adapter weights (gates start at 0 whatever it is); a frozen LM "
                                     "with a large residual stream learns faster with larger adapter weights"})
    always_run_encoder: bool = field(default=False, metadata={
        "help": "run encoder and blocks on image-less batches too (required by DeepSpeed ZeRO-3)"})
    freeze: FreezeSection = field(default_factory=FreezeSection)

    def __post_init__(self):
        _check_path(self.init_from, "init_from")
        if self.init_from and self.language.prior_pretrain.steps:
            raise ValueError("key 'language.prior_pretrain' builds a new LM, but init_from reuses the earlier "
                             "stage's LM: set steps 0 (the earlier stage's prior-trained LM is kept)")


# ---------------------------------------------------------------------------------------------- building

def build_language(section: LanguageSection, run_dir: Path, texts, seed: int):
    """-> (frozen Llama, tokenizer, record {"language_model": path, "tokenizer": path}). A preset LM gets random
    weights (seeded) saved to run_dir/language_model together with its tokenizer (an HF folder that loads on its
    own); a missing tokenizer is trained on `texts()` into run_dir/tokenizer. Both are reused on resume."""
    tok_dir, lm_dir = run_dir / "tokenizer", run_dir / "language_model"
    base = load_language(resolve_path(section.path, "model.language.path")) if section.path else None
    if section.tokenizer:
        tok_path = section.tokenizer
    elif base is not None:
        tok_path = str(base.tokenizer or base.checkpoint)
    else:
        if is_rank0() and not (tok_dir / "tokenizer.json").is_file():  # under several ranks: rank 0 trains it
            tok_dir.mkdir(parents=True, exist_ok=True)
            corpus = tok_dir / "train_texts.txt"
            corpus.write_text("\n".join(texts()))
            train_bpe([corpus], section.tokenizer_vocab_size, tok_dir)
            corpus.unlink()
        barrier()
        tok_path = str(tok_dir)
    tokenizer = load_tokenizer(resolve_path(tok_path, "model.language.tokenizer"))
    if base is not None:  # a checkpoint, or a model folder's LM (e.g. a base stage's: base_lm.py)
        lm_path, lm = str(base.checkpoint), base.model
    elif broadcast_object((lm_dir / "config.json").is_file() if is_rank0() else None):  # rank 0's view, before it writes
        lm_path, lm = str(lm_dir), Llama.from_pretrained(lm_dir)
    else:
        overrides = {k: getattr(section, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                                                      "rope_theta") if getattr(section, k) is not None}
        try:
            config = language_preset(section.preset, vocab_size=tokenizer.vocab_size, **overrides)
        except ValueError as e:
            raise ConfigError(f"model.language: {e}") from None
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            lm = Llama(config)
            if section.init_std is not None:
                lm.apply(lambda module: Llama._init_weights(module, section.init_std))
        if is_rank0():  # every rank built the same weights from the seed
            save_hf(lm, lm_dir)
            tokenizer.save(lm_dir)  # a self-contained LM folder: a later stage can load (or hot-swap to) it alone
        barrier()
        lm_path = str(lm_dir)
    if tokenizer.vocab_size > lm.config.vocab_size:
        raise ConfigError(f"model.language: the tokenizer has {tokenizer.vocab_size} ids, the LM's vocabulary "
                          f"only {lm.config.vocab_size}")
    return lm, tokenizer, {"language_model": _portable(lm_path, run_dir), "tokenizer": _portable(tok_path, run_dir)}


def _portable(path: str, run_dir: Path) -> str:
    """Paths inside the run are stored as `run:<relative>` (the run folder may move); `pkg:` paths as they are."""
    if path.startswith("pkg:"):
        return path
    resolved = Path(path).resolve()
    try:
        return "run:" + str(resolved.relative_to(run_dir.resolve()))
    except ValueError:
        return str(resolved)


def _from_record(path: str, run_dir: Path) -> Path:
    if path.startswith("run:"):
        return run_dir / path[4:]
    return resolve_path(path)


def build_encoder(section: VisionSection) -> tuple[VisionEncoder, str]:
    """The image encoder of a fresh composed model: from init_from (weights adapted to this config) or a preset."""
    overrides = section.overrides()
    if not section.init_from:
        try:
            return VisionEncoder(vision_preset(section.preset, **overrides)), f"preset {section.preset}"
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.vision: {e}") from None
    path = resolve_path(section.init_from, "model.vision.init_from")
    if path.is_file():  # an open_clip checkpoint
        if not section.open_clip_model:
            raise ConfigError("model.vision.open_clip_model: name the open_clip config of "
                              f"'{section.init_from}' (e.g. ViT-H-14)")
        import open_clip
        model_cfg = open_clip.get_model_config(section.open_clip_model)
        if model_cfg is None:
            raise ConfigError(f"model.vision.open_clip_model: unknown open_clip model '{section.open_clip_model}'")
        config = config_from_open_clip(model_cfg, **overrides)
        return load_open_clip_visual(path, config), str(path)
    old_config, state = read_encoder(path)
    try:
        config = VisionConfig(**{**old_config.to_dict(), **overrides})
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model.vision: {e}") from None
    encoder = VisionEncoder(config)
    encoder.load_state_dict(adapt_encoder_state(state, old_config, config, encoder.state_dict()))
    return encoder, str(path.resolve())


def read_encoder(path: Path) -> tuple[VisionConfig, dict]:
    """Encoder config + weights from a clip_pretrain run / final folder or an image model folder (an image_adapter
    run or its final/)."""
    folder = path / "final" if (path / "final").is_dir() else path
    if (folder / ENCODER_FILE).is_file() and (folder / ENCODER_CONFIG).is_file():
        config = VisionConfig.from_dict(json.loads((folder / ENCODER_CONFIG).read_text()))
        return config, load_file(str(folder / ENCODER_FILE))
    if is_model_folder(folder):
        try:
            image = read_meta(folder)["model"].get("image")
        except ModelFolderError as e:
            raise ConfigError(f"model.vision.init_from: {e}") from None
        if image is None:
            raise ConfigError(f"model.vision.init_from: the model in '{folder}' has no image modality")
        prefix = "vision_model."
        weights = load_file(str(folder / WEIGHTS_FILE))
        return VisionConfig.from_dict(image["vision"]), {k[len(prefix):]: v for k, v in weights.items()
                                                         if k.startswith(prefix)}
    raise ConfigError(f"model.vision.init_from: '{path}' holds neither {ENCODER_FILE} + {ENCODER_CONFIG} "
                      f"(clip_pretrain) nor an image model folder (image_adapter)")


_SAME_SHAPE = ("patch_size", "num_channels", "width", "n_layers", "n_heads", "mlp_dim", "n_global_layers",
               "qkv_bias", "out_bias", "clip_embed_dim")


def adapt_encoder_state(state: dict, old: VisionConfig, new: VisionConfig, fresh: dict) -> dict:
    """Weights trained with encoder config `old`, for an encoder built with `new` (e.g. annealing at a higher
    tile resolution or with more tiles): the per-tile position embedding is resized bicubically when the patch
    grid differs (as open_clip's `resize_pos_embed`); tile embeddings are kept for the tile layouts both configs
    have (layouts are matched by rows x cols, tile by tile) and taken from `fresh` (a new encoder's state) for the
    others. Every other tensor must keep its shape."""
    bad = [f"{k}: {getattr(old, k)} -> {getattr(new, k)}" for k in _SAME_SHAPE if getattr(old, k) != getattr(new, k)]
    if bad:
        raise ConfigError(f"model.vision: the encoder to start from has another shape ({'; '.join(bad)})")
    state = {k: v for k, v in state.items() if k in fresh}  # a CLIP projection is not part of this encoder
    missing = sorted(set(fresh) - set(state))
    if missing:
        raise ConfigError(f"model.vision.init_from: weights missing for {missing[:5]}")
    key = "gated_positional_embedding.embedding"
    if old.grid_size != new.grid_size:
        state[key] = resize_position_embedding(state[key], new.grid_size)
    old_ids = _layout_ids(old)
    for name, per_token in (("pre_tile_positional_embedding.embedding.weight", False),
                            ("post_tile_positional_embedding.embedding.weight", False),
                            ("gated_positional_embedding.tile_embedding.weight", True)):
        tokens_old, tokens_new = (old.seq_len, new.seq_len) if per_token else (1, 1)
        src = state[name].view(old.max_aspect_ratio_id + 1, old.max_num_tiles, tokens_old, old.width)
        out = fresh[name].clone().view(new.max_aspect_ratio_id + 1, new.max_num_tiles, tokens_new, new.width)
        for new_id, layout in [(0, None)] + list(_layout_ids(new).items()):
            old_id = 0 if layout is None else old_ids.get(layout)
            if old_id is None:
                continue
            n_tiles = min(old.max_num_tiles, new.max_num_tiles)
            rows = src[old_id, :n_tiles]
            if per_token and old.grid_size != new.grid_size:
                rows = torch.stack([resize_position_embedding(r, new.grid_size) for r in rows])
            out[new_id, :n_tiles] = rows
        state[name] = out.view_as(fresh[name])
    return state


def _layout_ids(config: VisionConfig) -> dict:
    layouts = supported_aspect_ratios(config.max_num_tiles)[: config.max_aspect_ratio_id]
    return {layout: i + 1 for i, layout in enumerate(layouts)}


def composed_config(model: ModelSection, language, vision: VisionConfig,
                    earlier: Optional[MultimodalConfig] = None) -> MultimodalConfig:
    """The MultimodalConfig of this stage (the LM and its image modality). `<|image|>` is the first id past the
    LM vocabulary, with 8 learnable extra rows; an earlier stage fixes the special tokens and the cross-attention
    layout."""
    every, layers = model.cross_attention_every, model.cross_attention_layers
    tokens = SpecialTokens.after_vocab(language.vocab_size, image=language.vocab_size)
    n_extra = max(8, tokens.image - language.vocab_size + 1)
    if earlier is not None:
        fixed = earlier.image.positions(earlier.language.n_layers)
        if (every is not None and every != earlier.image.cross_attention_every) or (
                layers is not None and sorted(layers) != fixed):
            raise ConfigError("model.cross_attention_*: the earlier stage (model.init_from) fixes the "
                              f"cross-attention layers at {fixed}; leave them null")
        every, layers = earlier.image.cross_attention_every, earlier.image.cross_attention_layers
        tokens, n_extra = earlier.special_tokens, earlier.n_extra_tokens
    try:
        image = ImageModality(vision=vision, cross_attention_layers=layers, cross_attention_every=every or 4,
                              token_policy=model.image_token_policy, max_images=model.max_images,
                              always_run_encoder=model.always_run_encoder)
        return MultimodalConfig(language=language, image=image, special_tokens=tokens, n_extra_tokens=n_extra)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None

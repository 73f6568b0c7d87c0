"""Hugging Face Mllama (Llama 3.2 Vision) checkpoints -> a `MultimodalModel` with an image modality.

An Mllama folder holds config.json (`model_type: mllama`, `text_config`, `vision_config`,
`image_token_index`) and model.safetensors or shards listed in model.safetensors.index.json. Its text
model numbers self- and cross-attention layers together (`cross_attention_layers`, e.g. [3, 8, ..., 38]
of 40); here the self-attention layers are the `language.Llama` and the others our gated blocks:

  model.language_model.layers.{c}.*  (c a cross layer)  -> cross_attention_layers.{j}.*  (j-th cross layer)
  model.language_model.layers.{i}.*  (self layer)       -> language_model.model.layers.{i - crosses before i}.*
  model.language_model.embed_tokens.weight (vocab + 8)  -> language_model.model.embed_tokens.weight (rows < vocab)
                                                           + extra_token_embeddings.weight (the 8 rows after)
  model.language_model.norm.weight                      -> language_model.model.norm.weight
  lm_head.weight                                        -> language_model.lm_head.weight
  model.vision_model.*, model.multi_modal_projector.*   -> vision_model.*, multi_modal_projector.*

Files may also use the older spelling (`language_model.model.*`, `language_model.lm_head.*`, `vision_model.*`,
`multi_modal_projector.*`), which the Hub checkpoints use and transformers 5's `save_pretrained` still
writes. Names and shapes are checked before any tensor data is read; errors use the files' spelling.
"""
from __future__ import annotations

import json
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from language.checkpoints import CheckpointError
from language.checkpoints.hf import safetensors_entries, config_from_hf
from vision.config import VisionConfig

from .cross_attention import positions_from_mllama
from .multimodal import MultimodalModel
from .multimodal_config import ImageModality, MultimodalConfig
from .special_tokens import SpecialTokens
from vision.encoder import VisionEncoder

# transformers' MllamaTextConfig defaults, for keys a config.json leaves out
_TEXT_DEFAULTS = dict(vocab_size=128256, hidden_size=4096, hidden_act="silu", num_hidden_layers=40,
                      num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, rms_norm_eps=1e-5,
                      max_position_embeddings=131072, tie_word_embeddings=False,
                      cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38])
_DEFAULT_ROPE_THETA = 500000.0
_OLD_SPELLING = (("language_model.lm_head.", "lm_head."), ("language_model.model.", "model.language_model."),
                 ("vision_model.", "model.vision_model."), ("multi_modal_projector.", "model.multi_modal_projector."))
_TEXT_LAYER = re.compile(r"model\.language_model\.layers\.(\d+)\.(.+)")
_EMBED = "model.language_model.embed_tokens.weight"


class _Source(NamedTuple):
    """Where one of our tensors comes from: the HF tensor name, and which of its rows (None = all)."""
    hf_name: str
    rows: Optional[slice]


def config_from_mllama(raw: dict, origin: str, *, n_embed_rows: Optional[int] = None,
                       **overrides) -> MultimodalConfig:
    """`MultimodalConfig` (LM + image modality) of an Mllama config.json dict. The `<|image|>` policy defaults to
    `most_recent` (what transformers' Mllama processor builds). n_embed_rows: rows of the checkpoint's embedding
    (vocab + extra tokens; default vocab + 8). overrides: `ImageModality` fields (token_policy, max_images,
    always_run_encoder, transformers_empty_rows)."""
    if raw.get("model_type") != "mllama":
        raise CheckpointError(f"{origin}: model_type '{raw.get('model_type')}' is not 'mllama'")
    text = {**_TEXT_DEFAULTS, **{k: v for k, v in (raw.get("text_config") or {}).items() if v is not None}}
    crosses = list(text["cross_attention_layers"])
    if text["tie_word_embeddings"]:
        raise CheckpointError(f"{origin}: tie_word_embeddings=true is not supported for Mllama")
    llama = {k: text[k] for k in ("vocab_size", "hidden_size", "hidden_act", "num_attention_heads",
                                  "num_key_value_heads", "intermediate_size", "rms_norm_eps",
                                  "max_position_embeddings", "tie_word_embeddings")}
    llama.update(model_type="llama", num_hidden_layers=text["num_hidden_layers"] - len(crosses),
                 head_dim=text["hidden_size"] // text["num_attention_heads"])
    for key in ("rope_parameters", "rope_scaling", "rope_theta"):
        if key in text:
            llama[key] = text[key]
    llama.setdefault("rope_theta", _DEFAULT_ROPE_THETA)  # used when the RoPE dicts do not name a theta
    language = config_from_hf(llama, origin)
    try:
        vision = VisionConfig.from_mllama(raw)
        positions = positions_from_mllama(crosses, text["num_hidden_layers"])
    except ValueError as e:
        raise CheckpointError(f"{origin}: {e}") from e
    n_extra = (n_embed_rows if n_embed_rows is not None else language.vocab_size + 8) - language.vocab_size
    if n_extra < 0:
        raise CheckpointError(f"{origin}: the embedding has {n_embed_rows} rows, fewer than vocab_size "
                              f"{language.vocab_size}")
    image_id = int(raw.get("image_token_index", raw.get("image_token_id", 128256)))
    try:
        image = ImageModality(**{"vision": vision, "cross_attention_layers": positions, "token_policy": "most_recent",
                                 **overrides})
        tokens = SpecialTokens.after_vocab(language.vocab_size, image=image_id)
        return MultimodalConfig(language=language, image=image, special_tokens=tokens,
                                n_extra_tokens=max(n_extra, tokens.n_extra))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{origin}: {e}") from e


def hf_sources(config: MultimodalConfig) -> Callable[[str], _Source]:
    """Our tensor name -> the Mllama tensor (transformers 5 spelling) it is read from."""
    positions = config.image.positions(config.language.n_layers)
    hf_cross = [p + j for j, p in enumerate(positions)]

    def self_layer_index(i: int) -> int:  # our LM layer i -> its index among all Mllama text layers
        return i + sum(1 for p in positions if p <= i)

    def source(name: str) -> _Source:
        vocab = config.language.vocab_size
        if name == "language_model.model.embed_tokens.weight":
            return _Source(_EMBED, slice(0, vocab))
        if name == "extra_token_embeddings.weight":
            return _Source(_EMBED, slice(vocab, None))
        if name == "language_model.lm_head.weight":
            return _Source("lm_head.weight", None)
        m = re.fullmatch(r"language_model\.model\.layers\.(\d+)\.(.+)", name)
        if m:
            return _Source(f"model.language_model.layers.{self_layer_index(int(m.group(1)))}.{m.group(2)}", None)
        m = re.fullmatch(r"cross_attention_layers\.(\d+)\.(.+)", name)
        if m:
            return _Source(f"model.language_model.layers.{hf_cross[int(m.group(1))]}.{m.group(2)}", None)
        if name.startswith("language_model.model."):
            return _Source("model.language_model." + name.removeprefix("language_model.model."), None)
        return _Source("model." + name, None)  # vision_model.*, multi_modal_projector.*

    return source


def load_mllama(path, *, dtype: torch.dtype = torch.float32, device="cpu",
                vision_encoder_factory: Callable[[VisionConfig], nn.Module] = VisionEncoder,
                **config_overrides) -> MultimodalModel:
    """Load an HF Mllama folder as a `MultimodalModel` (eval mode; LM frozen, the rest trainable).

    vision_encoder_factory(VisionConfig) builds the encoder whose state-dict names equal
    `MllamaVisionModel`'s (default: `vision.encoder.VisionEncoder`). config_overrides go to the
    `ImageModality` (e.g. token_policy, max_images, always_run_encoder)."""
    folder = Path(path)
    config_path = folder / "config.json"
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: cannot read the config ({e})") from e
    with ExitStack() as files:
        raw_entries = safetensors_entries(folder, files)
        entries = {_new_spelling(k): v for k, v in raw_entries.items()}
        legacy = any(_new_spelling(k) != k for k in raw_entries)  # report names as the files spell them
        if _EMBED not in entries:
            raise CheckpointError(f"{folder}: no tensor '{_EMBED}' (or 'language_model.model.embed_tokens.weight'); "
                                  f"is this an Mllama checkpoint?")
        config = config_from_mllama(raw, str(config_path), n_embed_rows=entries[_EMBED].shape[0], **config_overrides)
        with torch.device("meta"):
            model = MultimodalModel(config, vision_encoder=vision_encoder_factory(config.image.vision))
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        source = hf_sources(config)
        sources = {name: source(name) for name in expected}
        spell = _old_spelling if legacy else str
        _check_names(str(folder), sources, entries, spell)
        for name, shape in expected.items():
            _check_shape(name, sources[name], entries, shape, spell)
        state = {}
        for name, shape in expected.items():
            src = sources[name]
            tensor = entries[src.hf_name].load()
            tensor = tensor[src.rows] if src.rows is not None else tensor
            _check_shape(name, src, entries, shape, spell, found=tuple(tensor.shape))
            state[name] = tensor.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    lm = model.language_model.model
    lm.inv_freq = lm.fresh_inv_freq(device)  # non-persistent: built on meta, recomputed here
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{folder}: tensors the loader does not fill are still on the meta device: {left[:5]}")
    model.freeze_for_stage("adapter_pretrain")
    return model.eval()


def _new_spelling(name: str) -> str:
    for old, new in _OLD_SPELLING:
        if name.startswith(old):
            return new + name.removeprefix(old)
    return name


def _old_spelling(name: str) -> str:
    for old, new in _OLD_SPELLING:
        if name.startswith(new):
            return old + name.removeprefix(new)
    return name


def _check_names(source: str, sources: dict[str, _Source], entries: dict, spell: Callable[[str], str]) -> None:
    missing = sorted({spell(s.hf_name) for s in sources.values() if s.hf_name not in entries})
    used = {s.hf_name for s in sources.values()}
    unexpected = sorted(spell(k) for k in entries if k not in used)
    if missing or unexpected:
        parts = [f"{len(v)} {what} tensor(s): {_few(v)}" for what, v in (("missing", missing),
                                                                          ("unexpected", unexpected)) if v]
        raise CheckpointError(f"{source}: Mllama checkpoint tensors do not match its config.json: " + "; ".join(parts))


def _check_shape(name: str, src: _Source, entries: dict, expected: tuple, spell: Callable[[str], str],
                 found: Optional[tuple] = None) -> None:
    entry = entries[src.hf_name]
    if found is None:
        found = tuple(entry.shape)
        if src.rows is not None:
            found = (len(range(*src.rows.indices(found[0]))),) + found[1:]
    if found != expected:
        rows = f" rows {src.rows.start}:{src.rows.stop if src.rows.stop is not None else ''}" if src.rows else ""
        raise CheckpointError(f"{entry.origin}: tensor '{spell(src.hf_name)}'{rows} (for '{name}') has shape "
                              f"{list(found)}, but the config expects {list(expected)}")


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")

"""The image half of the composed model (paper Sec 7): a frozen Llama, an image encoder, a projection from
the encoder width to the LM width, and gated cross-attention blocks between the LM's layers.

State-dict layout (a language checkpoint, base or instruct, loads into `language_model.` unchanged):
  language_model.model.embed_tokens.weight, language_model.model.layers.{i}..., language_model.lm_head.weight
      the `language.Llama`, names as in Hugging Face Llama;
  vision_model.*              the image encoder (names as transformers' `MllamaVisionModel`);
  multi_modal_projector.{weight,bias}   encoder output_dim -> LM dim;
  cross_attention_layers.{j}.*          the gated blocks (names as `MllamaCrossAttentionDecoderLayer`);
  extra_token_embeddings.weight         learnable embeddings of token ids >= the LM vocabulary (Mllama's
      `<|image|>` = 128256 and 7 spare rows; Meta's `learnable_embedding`).

Block j runs before LM layer `config.cross_attention_layers[j]` (n_layers = after the last LM layer, before
the final norm); the default spreads one block per 4 LM layers as Llama 3.2 Vision does
(`cross_attention.default_positions`), and imported Mllama checkpoints keep their own placement.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from language.config import LlamaConfig
from language.generation import generate as generate_text
from language.kv_cache import KVCache
from language.model import Llama
from vision.config import VisionConfig
from vision.encoder import VisionEncoder
from vision.tiling import TilingConfig, batch_images

from . import freezing
from .cross_attention import CrossAttentionKV, CrossAttentionMask, GatedCrossAttentionBlock, default_positions
from .image_tokens import MLLAMA_IMAGE_TOKEN_ID, POLICIES, check_image_count, cross_attention_mask, image_spans

# Batch keys (ImageTextCollator) that `VisionLanguageModel.forward` takes under the same names.
BATCH_INPUTS = ("tokens", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")


@dataclass
class VisionLanguageConfig:
    """The composed model. `language` / `vision` accept dicts (YAML) and become their config classes."""
    language: LlamaConfig
    vision: VisionConfig
    cross_attention_layers: Optional[list[int]] = field(default=None, metadata={
        "help": "LM layer each block runs before (n_layers = after the last); null = one per cross_attention_every"})
    cross_attention_every: int = field(default=4, metadata={"range": (1, None), "help": "LM layers per block"})
    image_token_id: int = field(default=MLLAMA_IMAGE_TOKEN_ID, metadata={"help": "id of <|image|> (Meta: 128011)"})
    image_token_policy: str = field(default="all_previous", metadata={"help": "all_previous | most_recent"})
    max_images: int = field(default=4, metadata={"range": (1, None), "help": "images per sample at most"})
    n_extra_tokens: int = field(default=8, metadata={"range": (0, None), "help": "learnable ids >= LM vocab"})
    always_run_encoder: bool = field(default=False, metadata={
        "help": "run encoder + blocks on text-only batches too (dummy image, no effect): needed by ZeRO-3"})
    transformers_empty_rows: bool = field(default=False, metadata={
        "help": "reproduce transformers' Mllama leak for rows that see no image (parity checks only)"})

    def __post_init__(self):
        if isinstance(self.language, dict):
            self.language = LlamaConfig.from_dict(self.language)
        if isinstance(self.vision, dict):
            self.vision = VisionConfig.from_dict(self.vision)
        if self.image_token_policy not in POLICIES:
            raise ValueError(f"image_token_policy '{self.image_token_policy}' is not one of {POLICIES}")
        if self.cross_attention_layers is None:
            self.cross_attention_layers = default_positions(self.language.n_layers, self.cross_attention_every)
        self.cross_attention_layers = sorted(int(p) for p in self.cross_attention_layers)
        n = self.language.n_layers
        bad = [p for p in self.cross_attention_layers if not 0 <= p <= n]
        if bad or not self.cross_attention_layers:
            raise ValueError(f"cross_attention_layers {self.cross_attention_layers} must be a non-empty list of LM "
                             f"layer indices in 0..{n} (block before that layer; {n} = after the last)")
        if self.always_run_encoder and self.transformers_empty_rows:
            raise ValueError("always_run_encoder needs exact-zero empty rows; it cannot be combined with "
                             "transformers_empty_rows")
        if self.image_token_id >= self.language.vocab_size + self.n_extra_tokens:
            raise ValueError(f"image_token_id {self.image_token_id} is outside the LM vocabulary "
                             f"({self.language.vocab_size}) + {self.n_extra_tokens} extra token embeddings")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VisionLanguageConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown VisionLanguageConfig keys: {unknown}")
        return cls(**d)


class ImageContext(NamedTuple):
    """Projected image states turned into every block's keys/values once (reused at each decode step)."""
    kv: list[CrossAttentionKV]
    tokens_per_tile: int


def build_vision_encoder(config: VisionConfig) -> nn.Module:
    """The default image encoder: `vision.encoder.VisionEncoder(config)`."""
    return VisionEncoder(config)


class VisionLanguageModel(nn.Module):
    """Frozen `language.Llama` + image encoder + projector + gated cross-attention blocks."""

    def __init__(self, config: VisionLanguageConfig, *, language_model: Optional[Llama] = None,
                 vision_encoder: Optional[nn.Module] = None):
        super().__init__()
        self.config = config
        lm = config.language
        if language_model is not None:
            _check_same_shape(language_model.config, lm)
        self.language_model = language_model if language_model is not None else Llama(lm)
        self.vision_model = vision_encoder if vision_encoder is not None else build_vision_encoder(config.vision)
        self.multi_modal_projector = nn.Linear(config.vision.output_dim, lm.dim, bias=True)
        self.cross_attention_layers = nn.ModuleList(
            GatedCrossAttentionBlock.for_language_model(lm, transformers_empty_rows=config.transformers_empty_rows)
            for _ in config.cross_attention_layers)
        self.extra_token_embeddings = nn.Embedding(config.n_extra_tokens, lm.dim) if config.n_extra_tokens else None
        self._blocks_before: dict[int, list[int]] = defaultdict(list)
        for j, position in enumerate(config.cross_attention_layers):
            self._blocks_before[position].append(j)
        self.gradient_checkpointing = False
        self.reset_adapter_parameters()
        freezing.apply_freezing(self, freezing.FreezePolicy())

    # ------------------------------------------------------------------ parameters and modes
    @torch.no_grad()
    def reset_adapter_parameters(self, std: float = 0.02) -> None:
        """Fresh adapters: gates 0 (the model equals the language model exactly), normal(0, std) weights."""
        for block in self.cross_attention_layers:
            block.reset_parameters(std)
        nn.init.normal_(self.multi_modal_projector.weight, std=std)
        nn.init.zeros_(self.multi_modal_projector.bias)
        if self.extra_token_embeddings is not None:
            nn.init.normal_(self.extra_token_embeddings.weight, std=std)

    def parameter_groups(self) -> dict[str, list[nn.Module]]:
        """Groups for `adapters.freezing`."""
        return {"language_model": [self.language_model], "encoder": [self.vision_model],
                "adapters": [self.multi_modal_projector, self.cross_attention_layers, self.extra_token_embeddings]}

    def freeze_for_stage(self, policy: freezing.FreezePolicy | str) -> freezing.FreezePolicy:
        """Apply a stage's freezing policy (see `adapters.freezing.STAGES`); the LM always stays frozen."""
        return freezing.apply_freezing(self, policy)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return freezing.trainable_parameters(self)

    def train(self, mode: bool = True) -> "VisionLanguageModel":
        """Train mode for what trains; frozen groups (always the LM) stay in eval mode."""
        super().train(mode)
        freezing.keep_frozen_in_eval(self)
        return self

    def swap_language_model(self, language_model: Llama) -> None:
        """Hot-swap the LM (paper: the instruct LM replaces the base LM for SFT); shapes must match. It is frozen."""
        _check_same_shape(language_model.config, self.config.language)
        old = self.language_model.lm_head.weight
        self.language_model = language_model.to(device=old.device, dtype=old.dtype)
        self.language_model.requires_grad_(False)
        self.train(self.training)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute LM layers and cross-attention blocks in the backward pass."""
        self.language_model.gradient_checkpointing_enable()
        self.gradient_checkpointing = True

    # ------------------------------------------------------------------ pieces of the forward
    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> (B, T, dim): the frozen LM embedding, `extra_token_embeddings` for ids >= vocab."""
        embed = self.language_model.model.embed_tokens
        if self.extra_token_embeddings is None:
            return embed(tokens)
        vocab = self.config.language.vocab_size
        is_extra = tokens >= vocab
        base = embed(tokens.clamp(max=vocab - 1))
        extra = self.extra_token_embeddings((tokens - vocab).clamp(min=0)).to(base.dtype)
        return torch.where(is_extra[..., None], extra, base)

    def encode_images(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                      aspect_ratio_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
        """pixel_values (B, N_img, N_tiles, C, H, W) -> projected image states (B, N_img * N_tiles * P, dim)
        and P, the tokens per tile. A frozen encoder runs without autograd."""
        trains = any(p.requires_grad for p in self.vision_model.parameters())
        dtype = self.multi_modal_projector.weight.dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and trains):
            out = self.vision_model(pixel_values.to(dtype), aspect_ratio_ids, aspect_ratio_mask)
        out = getattr(out, "last_hidden_state", out)  # (B, N_img, N_tiles, P, output_dim)
        b, n_img, n_tiles, per_tile, _ = out.shape
        if (b, n_img, n_tiles) != tuple(pixel_values.shape[:3]):
            raise ValueError(f"image encoder returned {tuple(out.shape)} for pixel_values {tuple(pixel_values.shape)}")
        return self.multi_modal_projector(out).flatten(1, 3), per_tile

    def image_context(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                      aspect_ratio_mask: torch.Tensor) -> ImageContext:
        """Encode images and compute every block's keys/values once."""
        states, per_tile = self.encode_images(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        return ImageContext([block.project_kv(states) for block in self.cross_attention_layers], per_tile)

    def dummy_image_inputs(self, batch_size: int, device) -> dict[str, torch.Tensor]:
        """One blank one-tile image per sample, seen by no token (ZeRO-3: every rank runs every module)."""
        v = self.config.vision
        return {"pixel_values": torch.zeros(batch_size, 1, v.max_num_tiles, v.num_channels, v.image_size,
                                            v.image_size, device=device),
                "aspect_ratio_ids": torch.ones(batch_size, 1, dtype=torch.long, device=device),
                "aspect_ratio_mask": torch.nn.functional.pad(
                    torch.ones(batch_size, 1, 1, dtype=torch.long, device=device), (0, v.max_num_tiles - 1))}

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: Optional[torch.Tensor] = None, *, pixel_values: Optional[torch.Tensor] = None,
                aspect_ratio_ids: Optional[torch.Tensor] = None, aspect_ratio_mask: Optional[torch.Tensor] = None,
                cross_attention_mask: Optional[torch.Tensor] = None, image_context: Optional[ImageContext] = None,
                inputs_embeds: Optional[torch.Tensor] = None,
                extra_embeds: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                positions: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, logits_to_keep: int = 0,
                run_encoder: Optional[bool] = None) -> torch.Tensor:
        """tokens (B, T) (or inputs_embeds (B, T, dim)) -> logits (B, T, vocab) ((B, k, vocab) for logits_to_keep=k).

        pixel_values (B, N_img, N_tiles, C, H, W), aspect_ratio_ids (B, N_img), aspect_ratio_mask
            (B, N_img, N_tiles) and cross_attention_mask (B, T, N_img, N_tiles) (see `image_tokens`); or
            image_context (from `image_context`, reused across decode steps) with cross_attention_mask.
            Without images the encoder and blocks are skipped (the LM alone), unless run_encoder (default:
            config.always_run_encoder) runs them on a dummy image that no token sees.
        extra_embeds: (where (B, T) bool, values (N, dim)): values replace the token embeddings at the N
            True positions, in row-major order (e.g. speech adapter outputs at placeholder tokens).
        positions, attention_mask, cache: as `language.model.LlamaModel.forward`.
        """
        if (tokens is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of tokens and inputs_embeds")
        h = self.embed_tokens(tokens) if inputs_embeds is None else inputs_embeds
        if extra_embeds is not None:
            h = _write_embeds(h, *extra_embeds)
        batch, length = h.shape[:2]
        if image_context is None and pixel_values is None:
            if run_encoder if run_encoder is not None else self.config.always_run_encoder:
                dummy = self.dummy_image_inputs(batch, h.device)
                pixel_values, aspect_ratio_ids, aspect_ratio_mask = (dummy["pixel_values"], dummy["aspect_ratio_ids"],
                                                                     dummy["aspect_ratio_mask"])
                cross_attention_mask = torch.zeros(batch, length, 1, self.config.vision.max_num_tiles,
                                                   dtype=torch.long, device=h.device)
            elif cross_attention_mask is not None and bool(cross_attention_mask.any()):
                raise ValueError("cross_attention_mask lets tokens see images, but no pixel_values/image_context given")
            else:
                return self.language_model(inputs_embeds=h, positions=positions, attention_mask=attention_mask,
                                           cache=cache, logits_to_keep=logits_to_keep)
        if image_context is None:
            if aspect_ratio_ids is None or aspect_ratio_mask is None:
                raise ValueError("pixel_values need aspect_ratio_ids and aspect_ratio_mask")
            image_context = self.image_context(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        mask = self._cross_mask(cross_attention_mask, image_context, batch, length)

        def run_blocks(position: int, hidden: torch.Tensor) -> torch.Tensor:
            for j in self._blocks_before.get(position, ()):
                block, kv = self.cross_attention_layers[j], image_context.kv[j]
                if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                    hidden = checkpoint(block, hidden, kv, mask, use_reentrant=False)
                else:
                    hidden = block(hidden, kv, mask)
            return hidden

        h = run_blocks(0, h)
        return self.language_model(inputs_embeds=h, positions=positions, attention_mask=attention_mask, cache=cache,
                                   logits_to_keep=logits_to_keep, layer_hook=lambda i, x: run_blocks(i + 1, x))

    def _cross_mask(self, cross_attention_mask, context: ImageContext, batch: int, length: int) -> CrossAttentionMask:
        if cross_attention_mask is None:
            raise ValueError("images need a cross_attention_mask (B, T, N_img, N_tiles): which token sees which image "
                             "(adapters.image_tokens.cross_attention_mask builds it from the <|image|> tokens)")
        b, t, n_img, n_tiles = cross_attention_mask.shape
        n_keys = context.kv[0].keys.shape[2] if context.kv else n_img * n_tiles * context.tokens_per_tile
        if b != batch or t != length or n_img * n_tiles * context.tokens_per_tile != n_keys:
            raise ValueError(f"cross_attention_mask {tuple(cross_attention_mask.shape)} does not fit a batch of "
                             f"{batch} x {length} tokens and {n_keys} image tokens "
                             f"({context.tokens_per_tile} per tile)")
        return CrossAttentionMask.build(cross_attention_mask, context.tokens_per_tile)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[Sequence[int]], images: Optional[Sequence[Sequence[Any]]] = None, *,
                 max_new_tokens: int, **kwargs) -> list[list[int]]:
        """Continue each prompt (token ids with one `<|image|>` per image) given its images
        (`vision.tiling.TiledImage`s); returns the new tokens per prompt. The LM's KV cache serves the
        text, and each block's image keys/values are computed once at prefill. Keyword arguments as
        `language.generation.generate` (temperature, top_p, stop_ids, seed, on_token, pad_id). New tokens see
        the images the last prompt token sees."""
        images = [list(imgs) for imgs in images] if images is not None else [[] for _ in prompts]
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but images for {len(images)}")
        for b, (prompt, imgs) in enumerate(zip(prompts, images)):
            check_image_count(f"prompt {b}", len(image_spans(prompt, self.config.image_token_id)), len(imgs),
                              self.config.image_token_id, self.config.max_images)
        return generate_text(_ImagePrompts(self, images), prompts, max_new_tokens=max_new_tokens, **kwargs)


class _ImagePrompts(nn.Module):
    """The model with a batch of prompts' images bound, shaped like `language.Llama` for
    `language.generation.generate`: prefill encodes the images once; decode steps reuse keys/values."""

    def __init__(self, model: VisionLanguageModel, images: list[list[Any]]):
        super().__init__()
        self.model, self.n_tiles = model, [[img.n_tiles for img in imgs] for imgs in images]
        self.training = model.training  # generate() restores this mode on the model afterwards
        self.config = model.config.language  # generate reads config.max_seq_len
        vision = model.config.vision
        tiling = TilingConfig(tile_size=vision.image_size, max_tiles=vision.max_num_tiles,
                              max_images=model.config.max_images)
        self.pixels = batch_images(images, tiling, names=[f"prompt {b}" for b in range(len(images))]) \
            if any(images) else None
        self.context: Optional[ImageContext] = None
        self.last_row: Optional[torch.Tensor] = None

    def new_cache(self, batch_size: int, max_len: Optional[int] = None, dtype=None) -> KVCache:
        return self.model.language_model.new_cache(batch_size, max_len, dtype)

    def forward(self, tokens: torch.Tensor, *, positions=None, attention_mask=None, cache=None, logits_to_keep=0):
        vlm, cfg = self.model, self.model.config
        if self.pixels is None:  # no prompt has an image: the language model alone
            return vlm(tokens, positions=positions, attention_mask=attention_mask, cache=cache,
                       logits_to_keep=logits_to_keep)
        if self.context is None:  # prefill: the whole (left-padded) prompt batch
            mask = cross_attention_mask(tokens.cpu(), self.n_tiles, image_token_id=cfg.image_token_id,
                                        max_tiles=cfg.vision.max_num_tiles, policy=cfg.image_token_policy,
                                        max_images=cfg.max_images,
                                        valid=attention_mask.cpu() if attention_mask is not None else None,
                                        names=[f"prompt {b}" for b in range(len(self.n_tiles))]).to(tokens.device)
            pixels = self.pixels.to(tokens.device)
            self.context = vlm.image_context(pixels.pixel_values, pixels.aspect_ratio_ids, pixels.aspect_ratio_mask)
            self.last_row = mask[:, -1:]
        else:
            mask = self.last_row.expand(-1, tokens.shape[1], -1, -1)
        return vlm(tokens, image_context=self.context, cross_attention_mask=mask, positions=positions,
                   attention_mask=attention_mask, cache=cache, logits_to_keep=logits_to_keep)


def _write_embeds(h: torch.Tensor, where: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """h (B, T, dim) with values (N, dim) written at the N True positions of where (B, T)."""
    if where.shape != h.shape[:2] or where.dtype != torch.bool:
        raise ValueError(f"extra_embeds positions must be a (B, T) = {tuple(h.shape[:2])} bool mask, got "
                         f"{tuple(where.shape)} {where.dtype}")
    n = int(where.sum())
    if values.ndim != 2 or values.shape != (n, h.shape[-1]):
        raise ValueError(f"extra_embeds values must be ({n}, {h.shape[-1]}) for {n} marked positions, got "
                         f"{tuple(values.shape)}")
    return h.masked_scatter(where[..., None], values.to(h.dtype))


def _check_same_shape(found: LlamaConfig, expected: LlamaConfig) -> None:
    keys = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim")
    diff = [f"{k}: {getattr(found, k)} vs {getattr(expected, k)}" for k in keys
            if getattr(found, k) != getattr(expected, k)]
    if diff:
        raise ValueError("the language model does not have the configured shape: " + ", ".join(diff))

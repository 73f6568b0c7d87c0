"""The one composed model (paper Sec 7-8, Figure 28): a frozen, unchanged `language.Llama` plus any subset of
modalities. Cross-attention modalities (images; video next) give every block keys/values that the gated
blocks read between LM layers (`placement.PlacementPlan`); token-rate modalities (speech) write embeddings at
their placeholder tokens (`special_tokens`).

State-dict layout (a language checkpoint, base or instruct, loads into `language_model.` unchanged; the image
names are transformers' Mllama names, so an HF Mllama checkpoint maps one to one):
  language_model.*              the `language.Llama` (HF Llama names)
  extra_token_embeddings.weight learnable rows for ids >= the LM vocabulary (<|image|>, <|audio_start|>, ...)
  vision_model.*, multi_modal_projector.*, cross_attention_layers.{j}.*   image modality
  speech_encoder.*, speech_adapter.*, speech_frontend.*                   speech modality

Fresh adapters: the tanh gates start at 0 and the speech placeholders are only in prompts with audio, so an
untrained model equals the LM exactly on text, and a row that sees no image gets exactly zero from every block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from language.config import LlamaConfig
from language.generation import generate as generate_text
from language.kv_cache import KVCache
from language.model import Llama
from speech.conformer import ConformerEncoder
from speech.features import LogMelFrontend
from vision.encoder import VisionEncoder
from vision.tiling import TilingConfig, batch_images

from . import freezing
from .cross_attention import CrossAttentionKV, CrossAttentionMask, GatedCrossAttentionBlock
from .image_tokens import check_image_count, cross_attention_mask, image_spans
from .multimodal_config import MultimodalConfig
from .speech_adapter import SpeechAdapter, span_position_code
from .speech_inputs import speech_inputs
from .special_tokens import OF_MODALITY

IGNORE_INDEX = -100


class MediaError(ValueError):
    """Media and tokens disagree, or a sample holds a medium the model does not have."""


class ImageContext(NamedTuple):
    """Projected image states turned into every block's keys/values once (reused at each decode step)."""
    kv: list[CrossAttentionKV]
    tokens_per_tile: int


@dataclass
class ImageInputs:
    """The images of a batch. cross_attention_mask (B, T, N_img, N_tiles): which token sees which tile
    (`image_tokens.cross_attention_mask`); pixel_values (B, N_img, N_tiles, C, H, W), aspect_ratio_ids (B, N_img),
    aspect_ratio_mask (B, N_img, N_tiles) as `vision.tiling.ImageBatch`; or context, encoded once (generation)."""
    cross_attention_mask: torch.Tensor
    pixel_values: Optional[torch.Tensor] = None
    aspect_ratio_ids: Optional[torch.Tensor] = None
    aspect_ratio_mask: Optional[torch.Tensor] = None
    context: Optional[ImageContext] = None

    @classmethod
    def from_batch(cls, batch: dict) -> Optional["ImageInputs"]:
        """The image keys of an `ImageTextCollator` batch (None when it holds no image)."""
        if batch.get("pixel_values") is None:
            return None
        return cls(batch["cross_attention_mask"], batch["pixel_values"], batch["aspect_ratio_ids"],
                   batch["aspect_ratio_mask"])


@dataclass
class SpeechInputs:
    """The utterances of a batch, in reading order over its audio spans: log-mel features (U, F, n_mels) with
    frame lengths (U,) (`MultimodalModel.speech_features` makes them from waveforms), or adapter outputs
    `embeddings` (U, L, dim) with lengths (U,) computed earlier (these need no speech encoder: a text-only
    model's base stage trains its LM on token embeddings placed in audio spans)."""
    features: Optional[torch.Tensor] = None
    lengths: Optional[torch.Tensor] = None
    embeddings: Optional[torch.Tensor] = None
    embedding_lengths: Optional[torch.Tensor] = None


class MultimodalModel(nn.Module):
    """Frozen `language.Llama` + any of: image encoder / projector / gated cross-attention blocks; speech
    front end / Conformer / adapter. forward(tokens (B, T), images=ImageInputs, speech=SpeechInputs) -> logits."""

    def __init__(self, config: MultimodalConfig, *, language_model: Optional[Llama] = None,
                 vision_encoder: Optional[nn.Module] = None, speech_frontend: Optional[LogMelFrontend] = None):
        super().__init__()
        self.config = config
        lm = config.language
        if language_model is not None:
            check_same_shape(language_model.config, lm)
        self.language_model = language_model if language_model is not None else Llama(lm)
        self.tokens = config.special_tokens
        self.extra_token_embeddings = nn.Embedding(config.n_extra_tokens, lm.dim) if config.n_extra_tokens else None
        self.vision_model = self.multi_modal_projector = self.cross_attention_layers = None
        self.speech_encoder = self.speech_adapter = self.speech_frontend = None
        if config.image is not None:
            image = config.image
            self.vision_model = vision_encoder if vision_encoder is not None else VisionEncoder(image.vision)
            self.multi_modal_projector = nn.Linear(image.vision.output_dim, lm.dim, bias=True)
            self.cross_attention_layers = nn.ModuleList(
                GatedCrossAttentionBlock.for_language_model(lm, transformers_empty_rows=image.transformers_empty_rows)
                for _ in image.positions(lm.n_layers))
        if config.speech is not None:
            speech = config.speech
            self.speech_frontend = speech_frontend if speech_frontend is not None else LogMelFrontend(speech.features)
            self.speech_encoder = ConformerEncoder(speech.encoder)
            self.speech_adapter = SpeechAdapter(speech.adapter)
        self.plan = config.plan()
        self.gradient_checkpointing = False
        self._held_token_rows: list[int] = []  # extra-table rows of modalities a stage does not train
        self.reset_adapter_parameters()
        freezing.apply_freezing(self, freezing.FreezePolicy())

    # ------------------------------------------------------------------ parameters and modes
    @torch.no_grad()
    def reset_adapter_parameters(self, std: float = 0.02) -> None:
        """Fresh image adapters (gates 0, normal(0, std) weights) and extra token rows: normal(0, std), the audio
        markers at the scale of the LM's own token embeddings."""
        for block in self.cross_attention_layers or ():
            block.reset_parameters(std)
        if self.multi_modal_projector is not None:
            nn.init.normal_(self.multi_modal_projector.weight, std=std)
            nn.init.zeros_(self.multi_modal_projector.bias)
        table = self.extra_token_embeddings
        if table is not None and not table.weight.is_meta:
            nn.init.normal_(table.weight, std=std)
            embed = self.language_model.model.embed_tokens.weight
            if self.speech_adapter is not None and not embed.is_meta:
                scale = float(embed.float().std())
                for token in (self.tokens.audio_start, self.tokens.audio_end):
                    table.weight[token - self.tokens.vocab_size].normal_(std=scale)

    def parameter_groups(self) -> dict[str, list[nn.Module]]:
        """Groups for `adapters.freezing`: "language_model", then "encoder:<modality>" / "adapters:<modality>"
        (the extra token table trains with any modality's adapters)."""
        return {"language_model": [self.language_model],
                "encoder:image": [self.vision_model], "encoder:speech": [self.speech_encoder],
                "adapters:image": [self.multi_modal_projector, self.cross_attention_layers],
                "adapters:speech": [self.speech_adapter], "adapters:tokens": [self.extra_token_embeddings]}

    def freeze_for_stage(self, policy: freezing.FreezePolicy | str) -> freezing.FreezePolicy:
        """Apply a stage's freezing policy (see `adapters.freezing.STAGES`); the LM always stays frozen. With
        `modalities` set, the extra token rows of the other modalities get no gradient (e.g. a speech-only
        stage leaves `<|image|>` as the image stage trained it; exactly so under Adam without weight decay)."""
        policy = freezing.apply_freezing(self, policy)
        held = [m for m in OF_MODALITY if policy.modalities is not None and m not in policy.modalities]
        self._held_token_rows = self.tokens.rows(held)
        return policy

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return freezing.trainable_parameters(self)

    def train(self, mode: bool = True) -> "MultimodalModel":
        """Train mode for what trains; frozen groups (always the LM) stay in eval mode."""
        super().train(mode)
        freezing.keep_frozen_in_eval(self)
        return self

    def swap_language_model(self, language_model: Llama) -> None:
        """Hot-swap the LM (paper: the instruct LM replaces the base LM for SFT); shapes must match. It is frozen."""
        check_same_shape(language_model.config, self.config.language)
        old = self.language_model.lm_head.weight
        self.language_model = language_model.to(device=old.device, dtype=old.dtype)
        self.language_model.requires_grad_(False)
        self.train(self.training)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute LM layers and cross-attention blocks in the backward pass."""
        self.language_model.gradient_checkpointing_enable()
        self.gradient_checkpointing = True

    def non_language_state(self) -> dict[str, torch.Tensor]:
        """Every weight and buffer that is not the LM's (what a model folder's adapters file holds)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("language_model.")}

    # ------------------------------------------------------------------ text and speech embeddings
    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> (B, T, dim): the frozen LM embedding, `extra_token_embeddings` for ids >= vocab."""
        embed = self.language_model.model.embed_tokens
        vocab = self.config.language.vocab_size
        if self.extra_token_embeddings is None:
            return embed(tokens)
        is_extra = tokens >= vocab
        base = embed(tokens.clamp(max=vocab - 1))
        rows = (tokens - vocab).clamp(min=0, max=self.config.n_extra_tokens - 1)
        extra = self.extra_token_embeddings(rows)
        if self._held_token_rows and torch.is_grad_enabled():
            held = torch.isin(rows, torch.tensor(self._held_token_rows, device=rows.device))
            extra = torch.where(held[..., None], extra.detach(), extra)
        return torch.where(is_extra[..., None], extra.to(base.dtype), base)

    def speech_features(self, waveforms: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> SpeechInputs:
        """waveforms (U, N) at 16 kHz + sample lengths (U,) -> SpeechInputs with log-mel features."""
        self._need("speech")
        features, frame_lengths = self.speech_frontend(waveforms, lengths)
        return SpeechInputs(features, frame_lengths)

    def speech_states(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (U, F, n_mels) + lengths (U,) -> Conformer states (U, F', enc_dim) + lengths (U,); the features
        are cast to the encoder's weight dtype (a DeepSpeed bf16 module holds bf16 weights)."""
        self._need("speech")
        return self.speech_encoder(features.to(self.speech_encoder.stacker.proj.weight.dtype), lengths)

    def encode_speech(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (U, F, n_mels) + lengths (U,) -> adapter outputs (U, L, dim) + lengths (U,), one per placeholder."""
        return self.speech_adapter(*self.speech_states(features, lengths))

    def placeholder_count(self, n_feature_frames: int) -> int:
        """Audio placeholders an utterance of `n_feature_frames` feature frames needs."""
        self._need("speech")
        n = torch.tensor([n_feature_frames])
        return int(self.speech_adapter.output_lengths(self.speech_encoder.output_lengths(n))[0])

    def _speech_values(self, tokens: torch.Tensor, speech: SpeechInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(where (B, T) bool at the placeholders, values (N, dim)) for a batch's speech."""
        if speech.embeddings is None:
            self._need("speech")
            if speech.features is None or speech.lengths is None:
                raise MediaError("SpeechInputs need features + lengths or embeddings + embedding_lengths")
            embeddings, lengths = self.encode_speech(speech.features, speech.lengths)
        else:
            embeddings, lengths = speech.embeddings, speech.embedding_lengths
        amplitude = self.config.speech.adapter.span_position if self.config.speech is not None else 0.0
        if amplitude > 0:
            code = span_position_code(embeddings.shape[1], embeddings.shape[-1], device=embeddings.device)
            embeddings = embeddings + (amplitude * self._embedding_std() * code).to(embeddings.dtype)
        return speech_inputs(tokens, embeddings, lengths, self.tokens.audio_tokens)

    def _embedding_std(self) -> float:
        """The std of the LM's token embeddings, recomputed only when the table changed (its storage or version)."""
        weight = self.language_model.model.embed_tokens.weight
        key = (weight.data_ptr(), weight._version)
        cached = getattr(self, "_embedding_std_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, float(weight.detach().float().std()))
            self._embedding_std_cache = cached
        return cached[1]

    def input_embeddings(self, tokens: torch.Tensor, speech: Optional[SpeechInputs] = None,
                         run_encoder: Optional[bool] = None) -> torch.Tensor:
        """tokens (B, T) -> (B, T, dim): token embeddings with the speech adapter's outputs at the placeholders."""
        h = self.embed_tokens(tokens)
        has_audio = self.speech_encoder is not None and bool((tokens == self.tokens.audio).any())
        if speech is None:
            if has_audio:
                raise MediaError("the tokens hold audio placeholders but no speech was given")
            if self.speech_encoder is not None and _flag(run_encoder, self.config.speech.always_run_encoder):
                n = self.config.speech.features.n_mels
                dummy = torch.zeros(1, 16, n, device=h.device)
                out, _ = self.encode_speech(dummy, torch.tensor([16], device=h.device))
                h = h + 0.0 * out.sum().to(h.dtype)  # every module runs (ZeRO-3); adds exactly 0
            return h
        where, values = self._speech_values(tokens, speech)
        return h.masked_scatter(where[..., None], values.to(h.dtype))

    def _check_known_ids(self, tokens: torch.Tensor, audio: bool = False) -> None:
        for name in ("image", "video") + (() if audio else ("audio_start", "audio", "audio_end")):
            modality = "speech" if name.startswith("audio") else name
            if getattr(self.config, modality, None) is None and bool((tokens == getattr(self.tokens, name)).any()):
                b = int((tokens == getattr(self.tokens, name)).nonzero()[0, 0])
                raise MediaError(f"sample {b} holds <|{name}|> but this model has no {modality} modality "
                                 f"(it has: {', '.join(self.config.modalities) or 'text only'})")

    # ------------------------------------------------------------------ images
    def encode_images(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                      aspect_ratio_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
        """pixel_values (B, N_img, N_tiles, C, H, W) -> projected states (B, N_img * N_tiles * P, dim) and P, the
        tokens per tile. A frozen encoder runs without autograd."""
        self._need("image")
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

    def dummy_images(self, batch_size: int, length: int, device) -> ImageInputs:
        """One blank one-tile image per sample, seen by no token (ZeRO-3: every rank runs every module)."""
        v = self.config.image.vision
        return ImageInputs(
            cross_attention_mask=torch.zeros(batch_size, length, 1, v.max_num_tiles, dtype=torch.long, device=device),
            pixel_values=torch.zeros(batch_size, 1, v.max_num_tiles, v.num_channels, v.image_size, v.image_size,
                                     device=device),
            aspect_ratio_ids=torch.ones(batch_size, 1, dtype=torch.long, device=device),
            aspect_ratio_mask=F.pad(torch.ones(batch_size, 1, 1, dtype=torch.long, device=device),
                                    (0, v.max_num_tiles - 1)))

    def _cross_attention(self, images: Optional[ImageInputs], tokens: torch.Tensor, batch: int, length: int,
                         run_encoder: Optional[bool]):
        """-> (ImageContext, CrossAttentionMask), or None when no block needs to run."""
        if images is None:
            if self.vision_model is None or not _flag(run_encoder, self.config.image.always_run_encoder):
                if self.vision_model is not None and bool((tokens == self.tokens.image).any()):
                    raise MediaError("the tokens hold <|image|> but no images were given")
                return None
            images = self.dummy_images(batch, length, tokens.device)
        self._need("image")
        context = images.context
        if context is None:
            if images.pixel_values is None or images.aspect_ratio_ids is None or images.aspect_ratio_mask is None:
                raise MediaError("ImageInputs need pixel_values, aspect_ratio_ids and aspect_ratio_mask (or a context)")
            context = self.image_context(images.pixel_values, images.aspect_ratio_ids, images.aspect_ratio_mask)
        mask = images.cross_attention_mask
        if mask is None:
            raise MediaError("images need a cross_attention_mask (B, T, N_img, N_tiles): which token sees which image "
                             "(adapters.image_tokens.cross_attention_mask builds it from the <|image|> tokens)")
        b, t, n_img, n_tiles = mask.shape
        n_keys = context.kv[0].keys.shape[2]
        if b != batch or t != length or n_img * n_tiles * context.tokens_per_tile != n_keys:
            raise MediaError(f"cross_attention_mask {tuple(mask.shape)} does not fit a batch of {batch} x {length} "
                             f"tokens and {n_keys} image tokens ({context.tokens_per_tile} per tile)")
        return context, CrossAttentionMask.build(mask, context.tokens_per_tile)

    # ------------------------------------------------------------------ forward
    def hidden_states(self, tokens: torch.Tensor, *, images: Optional[ImageInputs] = None,
                      speech: Optional[SpeechInputs] = None, positions: Optional[torch.Tensor] = None,
                      attention_mask: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
                      run_encoder: Optional[bool] = None) -> torch.Tensor:
        """tokens (B, T) -> final hidden states (B, T, dim) (after the LM's final norm).

        images / speech: this batch's media (None: none; the blocks are skipped and the model is the LM, unless
        run_encoder (default: each modality's always_run_encoder) runs them on dummies that change nothing).
        positions, attention_mask, cache: as `language.model.LlamaModel.forward`."""
        if images is not None and self.vision_model is None:
            raise MediaError(f"images given to a model without an image modality (it has: "
                             f"{', '.join(self.config.modalities) or 'text only'})")
        if speech is not None and speech.embeddings is None and self.speech_encoder is None:
            raise MediaError(f"speech given to a model without a speech modality (it has: "
                             f"{', '.join(self.config.modalities) or 'text only'})")
        if bool((tokens >= self.tokens.vocab_size).any()):
            self._check_known_ids(tokens, audio=speech is not None)
        h = self.input_embeddings(tokens, speech, run_encoder)
        batch, length = h.shape[:2]
        cross = self._cross_attention(images, tokens, batch, length, run_encoder)
        lm = self.language_model.model
        if cross is None:
            return lm(inputs_embeds=h, positions=positions, attention_mask=attention_mask, cache=cache)
        context, mask = cross
        blocks = {"image": (self.cross_attention_layers, context.kv)}

        def run_blocks(position: int, hidden: torch.Tensor) -> torch.Tensor:
            for modality, j in self.plan.at(position):
                layers, kv = blocks[modality]
                block = layers[j]
                if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                    hidden = checkpoint(block, hidden, kv[j], mask, use_reentrant=False)
                else:
                    hidden = block(hidden, kv[j], mask)
            return hidden

        h = run_blocks(0, h)
        return lm(inputs_embeds=h, positions=positions, attention_mask=attention_mask, cache=cache,
                  layer_hook=lambda i, x: run_blocks(i + 1, x))

    def forward(self, tokens: torch.Tensor, *, images: Optional[ImageInputs] = None,
                speech: Optional[SpeechInputs] = None, logits_to_keep: int = 0, **kwargs) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab) ((B, k, vocab) for logits_to_keep=k). Keyword arguments as
        `hidden_states`."""
        hidden = self.hidden_states(tokens, images=images, speech=speech, **kwargs)
        return self.language_model.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)

    def loss_sum(self, tokens: torch.Tensor, labels: torch.Tensor, *, images: Optional[ImageInputs] = None,
                 speech: Optional[SpeechInputs] = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy (float32) and the number of labelled positions. labels (B, T): the
        target after position t (house convention; IGNORE_INDEX = no loss; media ids past the vocabulary are
        never targets). The LM head runs only where a label is (it dominates the cost of short targets after
        long media)."""
        hidden = self.hidden_states(tokens, images=images, speech=speech, **kwargs)
        keep = (labels != IGNORE_INDEX) & (labels < self.config.language.vocab_size)
        logits = self.language_model.lm_head(hidden[keep])
        loss = F.cross_entropy(logits.float(), labels[keep], reduction="sum")
        return loss, keep.sum()

    def _need(self, modality: str) -> None:
        if getattr(self.config, modality) is None:
            raise MediaError(f"this model has no {modality} modality (it has: "
                             f"{', '.join(self.config.modalities) or 'text only'})")

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], *, images: Optional[Sequence[Sequence[Any]]] = None,
                 speech: Optional[SpeechInputs] = None, max_new_tokens: int, **kwargs) -> list[list[int]]:
        """Continue each prompt (token ids with one `<|image|>` per image and one audio span per utterance) given
        its images (per prompt, `vision.tiling.TiledImage`s) and the batch's utterances (`SpeechInputs`, in
        reading order over all prompts). Each medium is encoded once at prefill; the LM's KV cache serves the
        text and each block's image keys/values are reused by every decode step (new tokens see the images the
        last prompt token sees). Keyword arguments as `language.generation.generate` (temperature, top_p,
        stop_ids, seed, on_token for streaming, pad_id)."""
        if images is not None:
            self._need("image")
            images = [list(imgs) for imgs in images]
            if len(images) != len(prompts):
                raise MediaError(f"{len(prompts)} prompts but images for {len(images)}")
            for b, (prompt, imgs) in enumerate(zip(prompts, images)):
                check_image_count(f"prompt {b}", len(image_spans(prompt, self.tokens.image)), len(imgs),
                                  self.tokens.image, self.config.image.max_images)
        elif self.vision_model is not None:
            for b, prompt in enumerate(prompts):
                n = sum(1 for t in prompt if t == self.tokens.image)
                if n:
                    raise MediaError(f"prompt {b} holds {n} <|image|> token(s) but no images were given")
        if speech is not None or self.speech_encoder is not None:
            n_spans = sum(1 for prompt in prompts for t in prompt if t == self.tokens.audio_end)
            given = 0 if speech is None else int((speech.lengths if speech.embeddings is None
                                                  else speech.embedding_lengths).shape[0])
            if n_spans != given:
                raise MediaError(f"the prompts hold {n_spans} audio span(s) but {given} utterance(s) were given")
        return generate_text(_BoundMedia(self, images, speech), prompts, max_new_tokens=max_new_tokens, **kwargs)


class _BoundMedia(nn.Module):
    """The model with one batch of prompts' media bound, shaped like `language.Llama` for
    `language.generation.generate`: the prefill encodes every medium once; decode steps reuse the image
    keys/values (and the last prompt token's view of the images) and see plain generated tokens."""

    def __init__(self, model: MultimodalModel, images: Optional[list[list[Any]]], speech: Optional[SpeechInputs]):
        super().__init__()
        self.model, self.speech = model, speech
        self.training = model.training  # generate() restores this mode on the model afterwards
        self.config = model.config.language  # generate reads config.max_seq_len
        self.n_tiles = [[img.n_tiles for img in imgs] for imgs in images] if images else None
        self.pixels = None
        if images and any(images):
            image = model.config.image
            tiling = TilingConfig(tile_size=image.vision.image_size, max_tiles=image.vision.max_num_tiles,
                                  max_images=image.max_images)
            self.pixels = batch_images(images, tiling, names=[f"prompt {b}" for b in range(len(images))])
        self.context: Optional[ImageContext] = None
        self.last_row: Optional[torch.Tensor] = None
        self.prefilled = False

    def new_cache(self, batch_size: int, max_len: Optional[int] = None, dtype=None) -> KVCache:
        return self.model.language_model.new_cache(batch_size, max_len, dtype)

    def forward(self, tokens: torch.Tensor, *, positions=None, attention_mask=None, cache=None, logits_to_keep=0):
        m = self.model
        images = speech = None
        if not self.prefilled:  # the whole (left-padded) prompt batch
            self.prefilled = True
            if self.speech is not None:
                s, device = self.speech, tokens.device
                speech = SpeechInputs(*(None if t is None else t.to(device)
                                        for t in (s.features, s.lengths, s.embeddings, s.embedding_lengths)))
            if self.pixels is not None:
                image = m.config.image
                mask = cross_attention_mask(tokens.cpu(), self.n_tiles, image_token_id=m.tokens.image,
                                            max_tiles=image.vision.max_num_tiles, policy=image.token_policy,
                                            max_images=image.max_images,
                                            valid=attention_mask.cpu() if attention_mask is not None else None,
                                            names=[f"prompt {b}" for b in range(len(self.n_tiles))]).to(tokens.device)
                pixels = self.pixels.to(tokens.device)
                self.context = m.image_context(pixels.pixel_values, pixels.aspect_ratio_ids, pixels.aspect_ratio_mask)
                self.last_row = mask[:, -1:]
                images = ImageInputs(mask, context=self.context)
        elif self.context is not None:
            images = ImageInputs(self.last_row.expand(-1, tokens.shape[1], -1, -1), context=self.context)
        return m(tokens, images=images, speech=speech, positions=positions, attention_mask=attention_mask,
                 cache=cache, logits_to_keep=logits_to_keep, run_encoder=False)


def _flag(value: Optional[bool], default: bool) -> bool:
    return default if value is None else value


def check_same_shape(found: LlamaConfig, expected: LlamaConfig) -> None:
    """Raise unless two LM configs have the same tensor shapes."""
    keys = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim")
    diff = [f"{k}: {getattr(found, k)} vs {getattr(expected, k)}" for k in keys
            if getattr(found, k) != getattr(expected, k)]
    if diff:
        raise ValueError("the language model does not have the configured shape: " + ", ".join(diff))

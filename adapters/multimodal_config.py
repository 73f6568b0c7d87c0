"""The composed model's config: the frozen LM's config plus any subset of modalities.

    MultimodalConfig(language=LlamaConfig, image=ImageModality(vision=VisionConfig, ...),
                     speech=SpeechModality(encoder=ConformerConfig, adapter=SpeechAdapterConfig, features=...))

Every part accepts a dict (YAML / config.json) and becomes its config class; `to_dict` / `from_dict` round-trip
(the model folder's config.json holds this dict).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from language.config import LlamaConfig
from speech.conformer import ConformerConfig
from speech.features import FeatureConfig
from vision.config import VisionConfig

from .cross_attention import default_positions
from .image_tokens import POLICIES
from .placement import PlacementPlan
from .special_tokens import SpecialTokens
from .speech_adapter import SpeechAdapterConfig


def _known(cls, d: dict, what: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what} keys: {unknown} (known: {sorted(names)})")
    return d


@dataclass
class ImageModality:
    """Images read through gated cross-attention blocks (paper Sec 7.2)."""
    vision: VisionConfig
    cross_attention_layers: Optional[list[int]] = field(default=None, metadata={
        "help": "LM layer each block runs before (n_layers = after the last); null = one per cross_attention_every"})
    cross_attention_every: int = field(default=4, metadata={"range": (1, None), "help": "LM layers per block"})
    token_policy: str = field(default="all_previous", metadata={"help": "all_previous | most_recent"})
    max_images: int = field(default=4, metadata={"range": (1, None), "help": "images per sample at most"})
    always_run_encoder: bool = field(default=False, metadata={
        "help": "run encoder + blocks on image-less batches too (a dummy image no token sees): needed by ZeRO-3"})
    transformers_empty_rows: bool = field(default=False, metadata={
        "help": "reproduce transformers' Mllama leak for rows that see no image (parity checks only)"})

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = VisionConfig.from_dict(self.vision)
        if self.token_policy not in POLICIES:
            raise ValueError(f"image token_policy '{self.token_policy}' is not one of {POLICIES}")
        if self.always_run_encoder and self.transformers_empty_rows:
            raise ValueError("always_run_encoder needs exact-zero empty rows; it cannot be combined with "
                             "transformers_empty_rows")
        if self.cross_attention_layers is not None:
            self.cross_attention_layers = sorted(int(p) for p in self.cross_attention_layers)

    def positions(self, n_layers: int) -> list[int]:
        if self.cross_attention_layers is not None:
            return self.cross_attention_layers
        return default_positions(n_layers, self.cross_attention_every)


@dataclass
class SpeechModality:
    """Speech as token-rate embeddings at audio placeholders (paper Sec 8): log-mel -> Conformer -> adapter."""
    encoder: ConformerConfig
    adapter: SpeechAdapterConfig
    features: FeatureConfig = field(default_factory=FeatureConfig)
    always_run_encoder: bool = field(default=False, metadata={
        "help": "run encoder + adapter on speech-less batches too (a dummy utterance, no effect): needed by ZeRO-3"})

    def __post_init__(self):
        if isinstance(self.encoder, dict):
            self.encoder = ConformerConfig.from_dict(self.encoder)
        if isinstance(self.adapter, dict):
            self.adapter = SpeechAdapterConfig(**_known(SpeechAdapterConfig, self.adapter, "speech adapter"))
        if isinstance(self.features, dict):
            self.features = FeatureConfig(**_known(FeatureConfig, self.features, "speech features"))
        if self.adapter.encoder_dim != self.encoder.dim:
            raise ValueError(f"speech adapter reads width {self.adapter.encoder_dim}, the Conformer gives "
                             f"{self.encoder.dim}")


@dataclass
class MultimodalConfig:
    """A frozen LM + modalities. special_tokens: default the ids just past the LM vocabulary (`SpecialTokens`);
    n_extra_tokens: rows of the learnable table for ids >= vocab (at least what the special tokens need; Mllama
    checkpoints carry 8)."""
    language: LlamaConfig
    image: Optional[ImageModality] = None
    speech: Optional[SpeechModality] = None
    special_tokens: Optional[SpecialTokens] = None
    n_extra_tokens: Optional[int] = field(default=None, metadata={"range": (0, None)})

    def __post_init__(self):
        if isinstance(self.language, dict):
            self.language = LlamaConfig.from_dict(self.language)
        if isinstance(self.image, dict):
            self.image = ImageModality(**_known(ImageModality, self.image, "image modality"))
        if isinstance(self.speech, dict):
            self.speech = SpeechModality(**_known(SpeechModality, self.speech, "speech modality"))
        if isinstance(self.special_tokens, dict):
            self.special_tokens = SpecialTokens.from_dict(self.special_tokens)
        vocab = self.language.vocab_size
        if self.special_tokens is None:
            self.special_tokens = SpecialTokens.after_vocab(vocab)
        if self.special_tokens.vocab_size != vocab:
            raise ValueError(f"special_tokens were laid out for a vocabulary of {self.special_tokens.vocab_size}, "
                             f"the LM has {vocab}")
        needed = self.special_tokens.n_extra
        if self.n_extra_tokens is None:
            self.n_extra_tokens = needed
        if self.n_extra_tokens < needed:
            raise ValueError(f"n_extra_tokens {self.n_extra_tokens} is too small for the special token ids "
                             f"{self.special_tokens.as_dict()} (needs {needed})")
        if self.speech is not None and self.speech.adapter.lm_dim != self.language.dim:
            raise ValueError(f"speech adapter writes width {self.speech.adapter.lm_dim}, the LM width is "
                             f"{self.language.dim}")
        self.plan()  # validates the cross-attention positions

    @property
    def modalities(self) -> list[str]:
        return [m for m in ("image", "speech") if getattr(self, m) is not None]

    def plan(self) -> PlacementPlan:
        positions = {}
        if self.image is not None:
            positions["image"] = self.image.positions(self.language.n_layers)
        return PlacementPlan(self.language.n_layers, positions)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MultimodalConfig":
        return cls(**_known(cls, d, "MultimodalConfig"))

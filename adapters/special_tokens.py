"""The one registry of the composed model's special tokens: where media enter a token sequence.

  <|image|>        one per image; the image is read by cross-attention from that token on (Mllama's token)
  <|video|>        one per video (read by the video cross-attention blocks; planned)
  <|audio_start|>  <|audio|> * n  <|audio_end|>   one span per utterance; the n placeholders take the speech
                   adapter's n token-rate embeddings, the two markers have learnable embeddings

Ids at or past the language model's vocabulary are rows of the composed model's `extra_token_embeddings`
table (row = id - vocab_size), so they never collide with a text token. By default the image token is the
first id past the vocabulary (Mllama: 128256 for the Llama 3 vocabulary of 128256), video the next, then the
three audio ids; a checkpoint may place `<|image|>` elsewhere (Meta's Llama 3.2 Vision: 128011, a reserved
id inside the vocabulary). The tokenizer side (`encode_with_media`), the collators and the chat prompts all
read the ids from here.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional

from .speech_inputs import AudioTokens

NAMES = ("image", "video", "audio_start", "audio", "audio_end")
MARKERS = {name: f"<|{name}|>" for name in NAMES}  # how a chat message's text names a medium
OF_MODALITY = {"image": ("image",), "video": ("video",), "speech": ("audio_start", "audio", "audio_end")}


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids of the media markers, and the LM vocabulary they extend."""
    vocab_size: int
    image: int
    video: int
    audio_start: int
    audio: int
    audio_end: int

    def __post_init__(self):
        ids = [getattr(self, n) for n in NAMES]
        if len(set(ids)) != len(ids):
            raise ValueError(f"special token ids must differ: {self.as_dict()}")
        bad = [n for n in NAMES if getattr(self, n) < 0]
        if bad:
            raise ValueError(f"special token ids must be >= 0: {bad}")

    @classmethod
    def after_vocab(cls, vocab_size: int, image: Optional[int] = None) -> "SpecialTokens":
        """Ids vocab_size, vocab_size + 1, ... in the order image, video, audio_start, audio, audio_end (an
        image id given elsewhere, e.g. Meta's 128011, leaves the others in that order after the vocabulary)."""
        free = iter(i for i in range(vocab_size, vocab_size + len(NAMES) + 1) if i != image)
        ids = {"image": image if image is not None else next(free)}
        ids.update({n: next(free) for n in NAMES[1:]})
        return cls(vocab_size=vocab_size, **ids)

    @property
    def n_extra(self) -> int:
        """Rows of the extra embedding table: every id from vocab_size up to the largest special id."""
        return max(getattr(self, n) for n in NAMES) - self.vocab_size + 1

    @property
    def audio_tokens(self) -> AudioTokens:
        return AudioTokens(start_id=self.audio_start, placeholder_id=self.audio, end_id=self.audio_end)

    def rows(self, modalities) -> list[int]:
        """Rows of the extra embedding table (id - vocab_size) that belong to these modalities' tokens."""
        ids = [getattr(self, name) for m in modalities for name in OF_MODALITY[m]]
        return sorted(i - self.vocab_size for i in ids if i >= self.vocab_size)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SpecialTokens":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown special token names: {unknown} (known: {sorted(names)})")
        return cls(**d)

    def ids(self) -> dict[str, int]:
        """{marker text: id}, e.g. {"<|image|>": 128256, ...}."""
        return {MARKERS[n]: getattr(self, n) for n in NAMES}


_MARKER_PATTERN = re.compile("(" + "|".join(re.escape(m) for m in MARKERS.values()) + ")")


def encode_with_media(tokenizer, text: str, tokens: SpecialTokens) -> list[int]:
    """Token ids of a text in which `<|image|>` / `<|video|>` stand for media: the text between markers
    through the tokenizer (no BOS), each marker as its id. Audio is placed with `speech_inputs.audio_span`,
    since its length depends on the utterance."""
    ids = []
    marker_ids = tokens.ids()
    for part in _MARKER_PATTERN.split(text):
        if part in marker_ids:
            if part in (MARKERS["audio_start"], MARKERS["audio"], MARKERS["audio_end"]):
                raise ValueError(f"{part} in a text: audio spans are built from the utterance "
                                 f"(adapters.speech_inputs.audio_span), not written in text")
            ids.append(marker_ids[part])
        elif part:
            ids.extend(tokenizer.encode(part, bos=False))
    return ids

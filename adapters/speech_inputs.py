"""Where speech enters the LM: audio placeholder tokens between a start and an end marker.

A prompt holds, for each utterance, `start, placeholder * n, end` where n is the adapter's output length
for that utterance (`audio_placeholder_count`). At run time the adapter's frames replace the placeholder
embeddings one for one (`speech_inputs` -> (mask, values), `scatter_speech`); the markers stay ordinary
tokens. Utterances are matched to audio segments in reading order: all segments of sample 0 from left to
right, then sample 1, ... (one utterance per sample is the common case). Any disagreement between the
token ids and the audio raises `SpeechInputError` naming the sample and segment.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


class SpeechInputError(ValueError):
    """Token ids and speech frames disagree; the message names the sample (and segment)."""


@dataclass(frozen=True)
class AudioTokens:
    """The three special token ids that frame speech in a token sequence."""
    start_id: int
    placeholder_id: int
    end_id: int

    def __post_init__(self):
        if len({self.start_id, self.placeholder_id, self.end_id}) != 3:
            raise ValueError(f"audio start/placeholder/end ids must differ, got {self}")


def audio_placeholder_count(n_feature_frames: int, stack: int = 4, adapter_kernel: int = 3,
                            adapter_stride: int = 2) -> int:
    """Placeholders for an utterance of `n_feature_frames` 10 ms frames: encoder frames ceil(n / stack),
    then the adapter conv (same arithmetic as ConformerEncoder.output_lengths and SpeechAdapter.output_lengths)."""
    if n_feature_frames < 1:
        raise ValueError(f"an utterance needs at least one feature frame, got {n_feature_frames}")
    encoder_frames = -(-n_feature_frames // stack)
    return (encoder_frames + 2 * (adapter_kernel // 2) - adapter_kernel) // adapter_stride + 1


def audio_span(n_placeholders: int, ids: AudioTokens) -> list[int]:
    """[start, placeholder * n, end]."""
    if n_placeholders < 1:
        raise ValueError(f"an audio span needs at least one placeholder, got {n_placeholders}")
    return [ids.start_id] + [ids.placeholder_id] * n_placeholders + [ids.end_id]


def prompt_with_audio(before: Sequence[int], n_placeholders: int, ids: AudioTokens,
                      after: Sequence[int] = ()) -> list[int]:
    """Token ids `before + audio_span(n) + after` (e.g. the tokenised chat header and the ASR instruction)."""
    return list(before) + audio_span(n_placeholders, ids) + list(after)


def audio_segments(tokens: torch.Tensor, ids: AudioTokens) -> list[tuple[int, int, int]]:
    """tokens (B, T) -> [(sample, first placeholder position, placeholder count)] in reading order.
    Errors on unmatched or nested markers, placeholders outside markers and empty spans."""
    segments = []
    special = (tokens == ids.start_id) | (tokens == ids.placeholder_id) | (tokens == ids.end_id)
    rows, cols = special.nonzero(as_tuple=True)
    values = tokens[rows, cols].tolist()
    by_row: dict[int, list[tuple[int, int]]] = {}
    for r, c, v in zip(rows.tolist(), cols.tolist(), values):
        by_row.setdefault(r, []).append((c, v))
    for b in sorted(by_row):
        open_at, count = None, 0
        for pos, tok in by_row[b]:
            if tok == ids.start_id:
                if open_at is not None:
                    raise SpeechInputError(f"sample {b}: audio start marker at position {pos} inside the audio "
                                           f"span opened at {open_at}")
                open_at, count = pos, 0
            elif tok == ids.placeholder_id:
                if open_at is None or pos != open_at + 1 + count:
                    raise SpeechInputError(f"sample {b}: audio placeholder at position {pos} is not inside a "
                                           f"contiguous start ... end span")
                count += 1
            else:
                if open_at is None:
                    raise SpeechInputError(f"sample {b}: audio end marker at position {pos} without a start marker")
                if count == 0:
                    raise SpeechInputError(f"sample {b}: audio span at positions {open_at}..{pos} has no placeholder")
                if pos != open_at + 1 + count:
                    raise SpeechInputError(f"sample {b}: audio span opened at {open_at} holds other tokens")
                segments.append((b, open_at + 1, count))
                open_at = None
        if open_at is not None:
            raise SpeechInputError(f"sample {b}: audio span opened at position {open_at} is never closed")
    return segments


def speech_inputs(tokens: torch.Tensor, speech: torch.Tensor, speech_lengths: torch.Tensor, ids: AudioTokens):
    """Where and what to write into the LM input embeddings.

    tokens (B, T) ids; speech (U, L, lm_dim) adapter outputs of U utterances with lengths (U,), matched to
    the audio segments in reading order. Returns mask (B, T) bool (True at placeholders) and values
    (N, lm_dim) with N = mask.sum() = speech_lengths.sum(), ordered as `masked_scatter` fills the mask."""
    if tokens.dim() != 2:
        raise SpeechInputError(f"tokens must be (B, T), got shape {tuple(tokens.shape)}")
    if speech.dim() != 3 or speech_lengths.shape != speech.shape[:1]:
        raise SpeechInputError(f"speech must be (U, L, dim) with lengths (U,), got {tuple(speech.shape)} and "
                               f"{tuple(speech_lengths.shape)}")
    segments = audio_segments(tokens, ids)
    if len(segments) != speech.shape[0]:
        raise SpeechInputError(f"the tokens hold {len(segments)} audio spans but {speech.shape[0]} utterances of "
                               f"speech were given")
    lengths = speech_lengths.tolist()
    per_sample: dict[int, int] = {}
    for k, ((b, first, count), n) in enumerate(zip(segments, lengths)):
        j = per_sample.get(b, 0)
        per_sample[b] = j + 1
        if count != n:
            raise SpeechInputError(f"sample {b}, audio span {j} (positions {first}..{first + count - 1}): "
                                   f"{count} placeholders but utterance {k} has {n} adapter frames")
        if n > speech.shape[1]:
            raise SpeechInputError(f"utterance {k}: length {n} exceeds the {speech.shape[1]} frames given")
    mask = tokens == ids.placeholder_id
    if not lengths:
        return mask, speech.new_zeros(0, speech.shape[-1])
    values = torch.cat([speech[k, :n] for k, n in enumerate(lengths)])
    return mask, values


def scatter_speech(inputs_embeds: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """inputs_embeds (B, T, D) with rows at mask (B, T) replaced by values (N, D) in reading order
    (out of place; gradients reach `values`)."""
    n = int(mask.sum())
    if values.shape != (n, inputs_embeds.shape[-1]):
        raise SpeechInputError(f"{n} placeholder positions need values of shape ({n}, {inputs_embeds.shape[-1]}), "
                               f"got {tuple(values.shape)}")
    return inputs_embeds.masked_scatter(mask[..., None], values.to(inputs_embeds.dtype))

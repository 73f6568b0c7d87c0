"""The speech half of the composed model (paper Sec 8): log-mel front end -> Conformer -> speech adapter ->
token-rate embeddings written into the input sequence of a frozen language model (a `language.Llama`, or a
`VisionLanguageModel`, so one conversation can hold images and speech).

Audio enters a prompt as `start, placeholder * n, end` (adapters/speech_inputs.py). The three ids lie just
past the wrapped model's embedding table (`audio_token_base`: the Llama vocabulary, or the vocabulary plus
the image model's extra tokens), so they never collide with a text token or `<|image|>`; the start and end
markers have their own small trainable table (`audio_marker_embeddings`), the placeholders take the
adapter's outputs. Both are handed to the wrapped model as `(where (B, T) bool, values (N, dim))`.

Prompts (`SpeechPrompter`) follow the paper: the instruction is the system message ("Repeat after me in
{language}:" for ASR, "Translate the following sentence into {language}:" for AST), the audio is the user
message, the transcript / translation the assistant message (the only tokens with a loss), rendered with
the tokenizer's chat format.

Freezing (`adapters.freezing`): the language model never trains; the encoder ("encoder") and the adapter
with the marker table ("adapters") do. Decoding is greedy and batched through `language.generation` with
the LM's KV cache: the speech embeddings are computed once at prefill.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from language.chat_format import ChatFormat, Message
from language.generation import generate as generate_text
from language.kv_cache import KVCache
from language.model import Llama
from speech.conformer import ConformerEncoder
from speech.features import LogMelFrontend, valid_mask

from . import freezing
from .speech_adapter import SpeechAdapter
from .speech_inputs import AudioTokens, SpeechInputError, audio_span, speech_inputs

IGNORE_INDEX = -100
TASK_INSTRUCTIONS = {"asr": "Repeat after me in {language}:", "ast": "Translate the following sentence into {language}:"}
LANGUAGE_NAMES = {"en": "English", "es": "Spanish", "fr": "French", "de": "German", "it": "Italian",
                  "pt": "Portuguese", "nl": "Dutch", "ru": "Russian", "zh": "Chinese", "ja": "Japanese"}


def language_name(code: str) -> str:
    """'en' / 'en-us' / 'English' -> 'English' (unknown codes come back unchanged)."""
    return LANGUAGE_NAMES.get(code.split("-")[0].split("_")[0].lower(), code)


def audio_token_base(language_model: nn.Module) -> int:
    """First id past the wrapped model's embedding table: Llama vocab, or vocab + the VLM's extra tokens."""
    config = language_model.config
    if isinstance(language_model, Llama):
        return config.vocab_size
    if hasattr(config, "language") and hasattr(language_model, "embed_tokens"):  # VisionLanguageModel
        return config.language.vocab_size + config.n_extra_tokens
    raise TypeError(f"{type(language_model).__name__}: expected a language.Llama or a VisionLanguageModel")


def span_position_code(length: int, dim: int, base: float = 100.0, device=None) -> torch.Tensor:
    """(length, dim) fixed sinusoidal code of positions 0..length-1 (sin on even, cos on odd channels), unit
    amplitude. Added to an audio span's placeholders, it makes a value the LM copies carry where it was read, which
    rotary attention alone does not: a copier then finds the next token by position, not only by content (a digit
    that recurs in a string otherwise sends it back to the first occurrence)."""
    position = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    frequency = torch.exp(-math.log(base) * torch.arange(0, dim, 2, device=device) / dim)
    code = torch.zeros(length, dim, device=device)
    code[:, 0::2] = torch.sin(position * frequency)
    code[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return code


class SpeechLanguageModel(nn.Module):
    """Front end + Conformer + adapter around a frozen LM.

    forward(tokens (B, T) with audio spans, features (U, F, n_mels), feature_lengths (U,), **lm_kwargs)
    -> logits (B, T, vocab). U utterances fill the audio spans in reading order."""

    def __init__(self, language_model: nn.Module, encoder: ConformerEncoder, adapter: SpeechAdapter,
                 frontend: Optional[LogMelFrontend] = None):
        super().__init__()
        lm_dim = _lm_config(language_model).dim
        if adapter.config.lm_dim != lm_dim or adapter.config.encoder_dim != encoder.config.dim:
            raise ValueError(f"speech adapter maps {adapter.config.encoder_dim} -> {adapter.config.lm_dim}, but the "
                             f"encoder width is {encoder.config.dim} and the LM width {lm_dim}")
        self.language_model = language_model
        self.encoder = encoder
        self.adapter = adapter
        self.frontend = frontend if frontend is not None else LogMelFrontend()
        self.audio_marker_embeddings = nn.Embedding(2, lm_dim)  # row 0: start, row 1: end
        token_embeddings = self.token_embeddings()
        with torch.no_grad():  # at the scale of the LM's own token embeddings
            nn.init.normal_(self.audio_marker_embeddings.weight, std=float(token_embeddings.weight.float().std()))
        base = audio_token_base(language_model)
        self.audio_tokens = AudioTokens(start_id=base, placeholder_id=base + 1, end_id=base + 2)
        freezing.apply_freezing(self, freezing.FreezePolicy())

    # ------------------------------------------------------------------ parameters and modes
    def parameter_groups(self) -> dict[str, list[nn.Module]]:
        """Groups for `adapters.freezing` (the front end has no parameters)."""
        return {"language_model": [self.language_model], "encoder": [self.encoder],
                "adapters": [self.adapter, self.audio_marker_embeddings]}

    def freeze_for_stage(self, policy: freezing.FreezePolicy | str) -> freezing.FreezePolicy:
        return freezing.apply_freezing(self, policy)

    def train(self, mode: bool = True) -> "SpeechLanguageModel":
        """Train mode for what trains; the frozen LM stays in eval mode."""
        super().train(mode)
        freezing.keep_frozen_in_eval(self)
        return self

    def speech_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the language model (encoder, adapter, markers, front-end statistics)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("language_model.")}

    def token_embeddings(self) -> nn.Embedding:
        lm = self.language_model
        return lm.get_submodule("model.embed_tokens" if isinstance(lm, Llama) else "language_model.model.embed_tokens")

    def _embedding_std(self) -> float:
        """The std of the LM's token embeddings now, recomputed only when the table changed (a copy stage's
        optimizer step, a load or a swapped LM bump its (storage, version) key), not on every forward."""
        weight = self.token_embeddings().weight
        key = (weight.data_ptr(), weight._version)
        cached = getattr(self, "_embedding_std_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, float(weight.detach().float().std()))
            self._embedding_std_cache = cached
        return cached[1]

    @property
    def lm_config(self):
        return _lm_config(self.language_model)

    # ------------------------------------------------------------------ pieces of the forward
    def features(self, waveforms: torch.Tensor, lengths: Optional[torch.Tensor] = None):
        """waveforms (U, N) at 16 kHz + sample lengths -> log-mel features (U, F, n_mels), frame lengths (U,)."""
        return self.frontend(waveforms, lengths)

    def encoder_states(self, features: torch.Tensor, lengths: torch.Tensor):
        """features (U, F, n_mels) + lengths (U,) -> encoder states (U, F', enc_dim), lengths (U,). Features are
        cast to the encoder's weight dtype (a DeepSpeed bf16 module holds bf16 weights)."""
        return self.encoder(features.to(self.encoder.stacker.proj.weight.dtype), lengths)

    def encode_speech(self, features: torch.Tensor, lengths: torch.Tensor):
        """features (U, F, n_mels) + lengths (U,) -> adapter outputs (U, L, lm_dim), lengths (U,) (placeholders)."""
        return self.adapter(*self.encoder_states(features, lengths))

    def placeholder_count(self, n_feature_frames: int) -> int:
        """Placeholders the audio span of an utterance with `n_feature_frames` feature frames needs."""
        n = torch.tensor([n_feature_frames])
        return int(self.adapter.output_lengths(self.encoder.output_lengths(n))[0])

    def audio_embeds(self, tokens: torch.Tensor, speech: torch.Tensor, speech_lengths: torch.Tensor):
        """(where (B, T) bool at every audio token, values (N, lm_dim)) in row-major order: the marker
        embeddings at start/end tokens and the adapter outputs at the placeholders; plus the tokens with
        every audio id replaced by 0 (what the wrapped model's own embedding may read)."""
        ids = self.audio_tokens
        amplitude = self.adapter.config.span_position
        if amplitude > 0:
            code = span_position_code(speech.shape[1], speech.shape[-1], device=speech.device)
            speech = speech + (amplitude * self._embedding_std() * code).to(speech.dtype)
        _, speech_values = speech_inputs(tokens, speech, speech_lengths, ids)  # validates spans vs lengths
        where = (tokens == ids.start_id) | (tokens == ids.placeholder_id) | (tokens == ids.end_id)
        kinds = tokens[where]
        markers = self.audio_marker_embeddings.weight
        values = torch.where((kinds == ids.start_id)[:, None], markers[0], markers[1]).to(speech_values.dtype)
        values = values.masked_scatter((kinds == ids.placeholder_id)[:, None], speech_values)
        stray = (tokens >= ids.start_id) & ~where
        if bool(stray.any()):
            b, t = stray.nonzero()[0].tolist()
            raise SpeechInputError(f"sample {b}: token id {int(tokens[b, t])} at position {t} is past the LM "
                                   f"vocabulary and not an audio token {ids}")
        return where, values, tokens.masked_fill(where, 0)

    def lm_forward(self, tokens: torch.Tensor, extra_embeds=None, **lm_kwargs) -> torch.Tensor:
        """The wrapped model on in-vocabulary tokens with (where, values) written into its input embeddings."""
        lm = self.language_model
        if isinstance(lm, Llama):
            h = lm.model.embed_tokens(tokens)
            if extra_embeds is not None:
                where, values = extra_embeds
                h = h.masked_scatter(where[..., None], values.to(h.dtype))
            return lm(inputs_embeds=h, **lm_kwargs)
        return lm(tokens, extra_embeds=extra_embeds, **lm_kwargs)

    def forward(self, tokens: torch.Tensor, features: Optional[torch.Tensor] = None,
                feature_lengths: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None, **lm_kwargs):
        """tokens (B, T) -> logits (B, T, vocab); with labels (B, T) the pair (loss_sum, n_labelled) of
        `loss_sum` instead (what a training engine's loss_fn returns). lm_kwargs go to the wrapped model
        (positions, attention_mask, cache, logits_to_keep; pixel_values, cross_attention_mask, ... for a
        VisionLanguageModel)."""
        if labels is not None:
            return self.loss_sum(tokens, labels, features, feature_lengths, **lm_kwargs)
        if features is None:
            if bool((tokens >= self.audio_tokens.start_id).any()):
                raise SpeechInputError("the tokens hold audio spans but no speech features were given")
            return self.lm_forward(tokens, **lm_kwargs)
        speech, speech_lengths = self.encode_speech(features, feature_lengths)
        where, values, plain = self.audio_embeds(tokens, speech, speech_lengths)
        return self.lm_forward(plain, (where, values), **lm_kwargs)

    def loss_sum(self, tokens: torch.Tensor, labels: torch.Tensor, features: Optional[torch.Tensor] = None,
                 feature_lengths: Optional[torch.Tensor] = None, *, speech: Optional[torch.Tensor] = None,
                 speech_lengths: Optional[torch.Tensor] = None, **lm_kwargs) -> tuple[torch.Tensor, int]:
        """Summed next-token cross-entropy (float32) over the labelled positions of labels (B, T) (IGNORE_INDEX
        elsewhere; labels[t] is the token at t, predicted from position t-1) and their count. Speech comes as
        features (encoded here) or as adapter outputs `speech` (U, L, lm_dim) + lengths. With a `language.Llama`
        the output projection runs only where a label is (the LM head dominates the cost of short targets in a
        long audio prompt)."""
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX
        n = int(keep.sum())
        if speech is None:
            speech, speech_lengths = self.encode_speech(features, feature_lengths)
        where, values, plain = self.audio_embeds(tokens, speech, speech_lengths)
        lm = self.language_model
        if isinstance(lm, Llama):
            h = lm.model.embed_tokens(plain)
            h = h.masked_scatter(where[..., None], values.to(h.dtype))
            logits = lm.lm_head(lm.model(inputs_embeds=h, **lm_kwargs)[:, :-1][keep])  # (n, vocab)
        else:
            logits = self.lm_forward(plain, (where, values), **lm_kwargs)[:, :-1][keep]
        loss = torch.nn.functional.cross_entropy(logits.float(), target[keep], reduction="sum")
        return loss, n

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], features: torch.Tensor, feature_lengths: torch.Tensor, *,
                 max_new_tokens: int, images: Optional[Sequence[Sequence]] = None, **kwargs) -> list[list[int]]:
        """Continue each prompt (ids with audio spans, e.g. `SpeechPrompter.prompt`) given the speech features
        of its utterances (reading order over all prompts). Keyword arguments as
        `language.generation.generate` (stop_ids, pad_id; temperature 0 = greedy, the default). With a
        VisionLanguageModel, `images` gives each prompt's images as its `generate` does."""
        bound = _SpeechBound(self, features, feature_lengths, with_images=images is not None)
        if images is not None:
            from .vision_language import VisionLanguageModel, _ImagePrompts
            if not isinstance(self.language_model, VisionLanguageModel):
                raise TypeError("images need a VisionLanguageModel as the language model")
            target = _ImagePrompts(bound, [list(i) for i in images])  # encodes the images once, then calls bound
        else:
            target = bound
        return generate_text(target, prompts, max_new_tokens=max_new_tokens, **kwargs)


class _SpeechBound(nn.Module):
    """The model with one batch of speech bound, shaped like `language.Llama` for `language.generation`:
    the prefill writes the speech embeddings; decode steps see plain generated tokens."""

    def __init__(self, model: SpeechLanguageModel, features: torch.Tensor, feature_lengths: torch.Tensor,
                 with_images: bool = False):
        super().__init__()
        self.model = model
        self.features, self.feature_lengths = features, feature_lengths
        self.training = model.training
        # generate() reads config.max_seq_len; _ImagePrompts (with_images) reads the VLM's config
        self.config = model.language_model.config if with_images else model.lm_config
        self.pending = True

    def __getattr__(self, name):  # VisionLanguageModel attributes for _ImagePrompts (image_context, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "model" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self._modules["model"].language_model, name)

    def new_cache(self, batch_size: int, max_len: Optional[int] = None, dtype=None) -> KVCache:
        lm = self.model.language_model
        return (lm if isinstance(lm, Llama) else lm.language_model).new_cache(batch_size, max_len, dtype)

    def forward(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.pending:  # prefill: the whole (left-padded) prompt batch
            self.pending = False
            m = self.model
            device = tokens.device
            speech, lengths = m.encode_speech(self.features.to(device), self.feature_lengths.to(device))
            where, values, plain = m.audio_embeds(tokens, speech, lengths)
            return m.lm_forward(plain, (where, values), **kwargs)
        return self.model.lm_forward(tokens, **kwargs)


def _lm_config(lm: nn.Module):
    return lm.config if isinstance(lm, Llama) else lm.config.language


# ----------------------------------------------------------------------------------------------------
# Prompts


@dataclass
class SpeechExample:
    """One tokenised example: ids (with the audio span), labels (IGNORE_INDEX outside the target)."""
    ids: list[int]
    labels: list[int]


class SpeechPrompter:
    """Chat-format prompts with one audio span: system = task instruction, user = audio, assistant = target.

    prompt(n_placeholders, language) -> ids ending with the assistant header (for generation);
    example(n_placeholders, target, language) -> SpeechExample with labels on the target and its stop token."""

    def __init__(self, chat_format: ChatFormat, audio_tokens: AudioTokens, task: str = "asr"):
        if task not in TASK_INSTRUCTIONS:
            raise ValueError(f"task must be one of {sorted(TASK_INSTRUCTIONS)}, got {task!r}")
        self.format, self.ids, self.task = chat_format, audio_tokens, task
        self._split: dict[str, tuple[int, list[int]]] = {}

    @property
    def stop_ids(self) -> set[int]:
        return set(self.format.stop_ids)

    def instruction(self, language: str) -> str:
        return TASK_INSTRUCTIONS[self.task].format(language=language_name(language))

    def _dialog(self, language: str, target: Optional[str]):
        messages = [Message("system", self.instruction(language)), Message("user", "")]
        if target is not None:
            messages.append(Message("assistant", target))
        return self.format.render(messages, add_generation_prompt=target is None)

    def _audio_position(self, language: str) -> int:
        """Where the (empty) user content starts: the longest common prefix of an empty and a probed user
        message, checked to leave the rest of the rendering unchanged."""
        if language not in self._split:
            empty = self._dialog(language, None).ids
            probe = self.format.render([Message("system", self.instruction(language)), Message("user", "x")],
                                       add_generation_prompt=True).ids
            p = 0
            while p < min(len(empty), len(probe)) and empty[p] == probe[p]:
                p += 1
            if empty[p:] != probe[len(probe) - (len(empty) - p):]:
                raise ValueError("the chat format's user message does not split into header + content + closer; "
                                 "cannot place the audio")
            self._split[language] = (p, empty)
        return self._split[language][0]

    def prompt(self, n_placeholders: int, language: str = "en") -> list[int]:
        p = self._audio_position(language)
        ids = self._split[language][1]
        return ids[:p] + audio_span(n_placeholders, self.ids) + ids[p:]

    def example(self, n_placeholders: int, target: str, language: str = "en") -> SpeechExample:
        p = self._audio_position(language)
        dialog = self._dialog(language, target)
        if dialog.ids[:p] != self._split[language][1][:p]:
            raise ValueError("the chat format renders the system/user messages differently with an answer")
        labels = dialog.labels(IGNORE_INDEX)
        span = audio_span(n_placeholders, self.ids)
        return SpeechExample(dialog.ids[:p] + span + dialog.ids[p:],
                             labels[:p] + [IGNORE_INDEX] * len(span) + labels[p:])


def collate_examples(examples: Sequence[SpeechExample], pad_id: int = 0):
    """Right-padded tokens (B, T), labels (B, T) (IGNORE_INDEX at padding) and attention_mask (B, T) bool."""
    longest = max(len(e.ids) for e in examples)
    tokens = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        tokens[i, :len(e.ids)] = torch.tensor(e.ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
    lengths = torch.tensor([len(e.ids) for e in examples])
    return tokens, labels, valid_mask(lengths, longest)

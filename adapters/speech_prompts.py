"""Chat prompts for speech tasks (paper Sec 8): the instruction is the system message ("Repeat after me in
{language}:" for ASR, "Translate the following sentence into {language}:" for AST), the audio is the user
message, the transcript / translation the assistant message (the only tokens with a loss), rendered with the
tokenizer's chat format. Audio ids come from the model's `SpecialTokens.audio_tokens`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from language.chat_format import ChatFormat, Message
from speech.features import valid_mask

from .speech_inputs import AudioTokens, audio_span

IGNORE_INDEX = -100
TASK_INSTRUCTIONS = {"asr": "Repeat after me in {language}:", "ast": "Translate the following sentence into {language}:"}
LANGUAGE_NAMES = {"en": "English", "es": "Spanish", "fr": "French", "de": "German", "it": "Italian",
                  "pt": "Portuguese", "nl": "Dutch", "ru": "Russian", "zh": "Chinese", "ja": "Japanese"}


def language_name(code: str) -> str:
    """'en' / 'en-us' / 'English' -> 'English' (unknown codes come back unchanged)."""
    return LANGUAGE_NAMES.get(code.split("-")[0].split("_")[0].lower(), code)


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
    """Right-padded tokens (B, T), labels (B, T) and attention_mask (B, T) bool. labels follow the house
    convention: labels[t] is the target after position t (the example's label of token t + 1; IGNORE_INDEX at
    padding and wherever the example has none)."""
    longest = max(len(e.ids) for e in examples)
    tokens = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        tokens[i, :len(e.ids)] = torch.tensor(e.ids)
        labels[i, :len(e.labels) - 1] = torch.tensor(e.labels[1:])
    lengths = torch.tensor([len(e.ids) for e in examples])
    return tokens, labels, valid_mask(lengths, longest)

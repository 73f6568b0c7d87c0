"""Terminal chat with a language model: one prompt, or an interactive loop with dialog history.

    herd chat --model SmolLM2-135M-Instruct.Q4_1.gguf                 # interactive
    herd chat --model PATH --prompt "What is the capital of France?"  # one answer, then exit
    herd chat --model runs/<experiment>/<run>/final                   # a composed model folder (text turns)

Replies stream as they are generated. Interactive commands: `/reset` (forget the dialog), `/exit`
(or Ctrl-D) to quit; Ctrl-C stops the reply being generated. The answer goes to stdout, status
lines to stderr. When the dialog outgrows the model's context, its oldest turns are dropped.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO

import torch

from adapters.model_folder import is_model_folder, load_model
from adapters.multimodal import MultimodalModel
from language.chat_format import ChatFormat, Message, chat_format_for
from language.generation import generate
from language.model import Llama
from language.tokenizer import Tokenizer, load_tokenizer

HELP = "/reset clears the dialog, /exit or Ctrl-D quits, Ctrl-C stops a reply."


def chat_main(model_path: str, *, prompt: Optional[str] = None, system: Optional[str] = None,
              max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
              device: str = "auto") -> int:
    """Answer `prompt` and return, or (prompt None) chat interactively on stdin/stdout. Returns an exit code."""
    device = pick_device(device)
    started = time.perf_counter()
    if is_model_folder(model_path) or is_model_folder(f"{model_path}/final"):  # a composed model folder
        loaded = load_model(model_path if is_model_folder(model_path) else f"{model_path}/final", device=device)
        model, tokenizer = loaded.model, loaded.tokenizer
    else:
        model = Llama.from_pretrained(model_path, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                                      device=device).eval()
        tokenizer = load_tokenizer(model_path)
    chat = Chat(model, tokenizer, chat_format_for(tokenizer), system=system, max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p)
    n_parameters = sum(p.numel() for p in model.parameters())
    _status(f"loaded {model_path} ({n_parameters / 1e6:.1f}M parameters, {device}) "
            f"in {time.perf_counter() - started:.1f} s")
    if prompt is not None:
        try:
            chat.reply(prompt)
        except ValueError as e:  # the prompt alone does not fit the context
            _status(f"error: {e}")
            return 1
        return 0
    _status(HELP)
    while True:
        try:
            line = input("> ")
        except EOFError:  # Ctrl-D
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            chat.reset()
            _status("(dialog reset)")
            continue
        try:
            chat.reply(line)
        except KeyboardInterrupt:
            chat.forget_last_user_message()
            _status("\n(reply stopped; it is not kept in the dialog)")
        except ValueError as e:
            chat.forget_last_user_message()
            _status(f"error: {e}")


class Chat:
    """A dialog with a model: `reply(text)` streams the answer to `out` and keeps both messages."""

    def __init__(self, model: Llama | MultimodalModel, tokenizer: Tokenizer, chat_format: ChatFormat, *, system: Optional[str] = None,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 out: TextIO | None = None):
        self.model, self.tokenizer, self.format = model, tokenizer, chat_format
        self.system = system
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.out = out
        self.messages: list[Message] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [Message("system", self.system)] if self.system else []

    def forget_last_user_message(self) -> None:
        if self.messages and self.messages[-1].role == "user":
            self.messages.pop()

    def reply(self, text: str) -> str:
        """Add the user message, stream the assistant's answer (then a newline), keep it; return it."""
        self.messages.append(Message("user", text))
        ids, budget = self._prompt_ids()
        out = self.out or sys.stdout
        stream = TextStream(self.tokenizer.decode, lambda s: (out.write(s), out.flush()))
        run = self.model.generate if isinstance(self.model, MultimodalModel) else \
            (lambda prompts, **kw: generate(self.model, prompts, **kw))
        new = run([ids], max_new_tokens=budget, temperature=self.temperature, top_p=self.top_p,
                  stop_ids=self.format.stop_ids, pad_id=0, on_token=lambda _row, tok: stream.push(tok))
        stream.finish()
        out.write("\n")
        out.flush()
        answer = self.tokenizer.decode(new[0], skip_special=True)
        self.messages.append(Message("assistant", answer))
        return answer

    def _prompt_ids(self) -> tuple[list[int], int]:
        """The rendered dialog and the new-token budget; drops the oldest turns when the context is short."""
        config = self.model.config
        context = (config.language if isinstance(self.model, MultimodalModel) else config).max_seq_len
        dropped = 0
        while True:
            ids = self.format.render(self.messages, add_generation_prompt=True).ids
            first_turn = 1 if self.messages[0].role == "system" else 0
            if len(ids) + self.max_new_tokens <= context or len(self.messages) - first_turn <= 1:
                break
            del self.messages[first_turn:first_turn + 2]  # the oldest exchange (user, assistant)
            dropped += 1
        if dropped:
            _status(f"(dropped the {dropped} oldest exchanges to fit the context of {context} tokens)")
        budget = min(self.max_new_tokens, context - len(ids))
        if budget < 1:
            raise ValueError(f"the prompt is {len(ids)} tokens; the model's context is {context} tokens, "
                             "which leaves no room for an answer")
        return ids, budget


class TextStream:
    """Token ids in, text out as soon as it is complete: a multi-byte character split over several
    tokens is held back until its last byte arrives (the decoder shows U+FFFD until then).

    Decodes a short window (from the last emitted boundary) rather than the whole reply, the way
    Hugging Face's and vLLM's detokenizers do, so tokenizers that treat a first token specially
    (SentencePiece's leading space) still give the right text.
    """

    def __init__(self, decode: Callable[..., str], write: Callable[[str], object]):
        self.decode, self.write = decode, write
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: text before read_offset has been written
        self.read_offset = 0

    def push(self, token: int) -> None:
        self.ids.append(token)
        done = self.decode(self.ids[self.prefix_offset:self.read_offset], skip_special=True)
        text = self.decode(self.ids[self.prefix_offset:], skip_special=True)
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self.write(text[len(done):])
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def finish(self) -> None:
        """Write what is still held back (an incomplete character at the very end)."""
        done = self.decode(self.ids[self.prefix_offset:self.read_offset], skip_special=True)
        text = self.decode(self.ids[self.prefix_offset:], skip_special=True)
        if len(text) > len(done):
            self.write(text[len(done):])
        self.prefix_offset = self.read_offset = len(self.ids)


def pick_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

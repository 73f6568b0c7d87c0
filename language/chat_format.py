"""Chat formats: dialogs to token ids with loss masks, and token ids back to dialogs.

    fmt = chat_format_for(tokenizer)                 # Llama 3 format, or the checkpoint's own template
    d = fmt.render([Message("user", "Hi"), Message("assistant", "Hello!")])
    d.ids, d.target_mask, d.content_mask, d.message_spans
    fmt.parse(d.ids)                                 # -> the messages again

`target_mask` marks what SFT trains on (assistant content and its closing token); `content_mask` only
the assistant content (DPO masks headers and terminators). Masks come from token spans of the
rendering, never from searching the text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime

from language.tokenizer import Tokenizer


@dataclass
class Message:
    role: str
    content: str
    end_of_message: bool = False  # Llama 3: close with <|eom_id|> (a tool call that awaits the tool's answer)


@dataclass
class RenderedDialog:
    ids: list[int]
    target_mask: list[bool]  # SFT loss: assistant content + its closing token
    content_mask: list[bool]  # assistant content only (no header, no closing token)
    message_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) per message

    def labels(self, ignore_index: int = -100) -> list[int]:
        """`ids` with `ignore_index` where no SFT loss is taken (not shifted)."""
        return [i if t else ignore_index for i, t in zip(self.ids, self.target_mask)]


class ChatFormat:
    """Renders dialogs to ids with masks, and parses ids back to messages."""

    tokenizer: Tokenizer
    stop_ids: set[int]

    def render(self, messages: list[Message], *, add_generation_prompt: bool = False,
               bos: bool = True) -> RenderedDialog:
        raise NotImplementedError

    def parse(self, ids) -> list[Message]:
        raise NotImplementedError


class _Builder:
    """Accumulates ids and the two masks side by side."""

    def __init__(self):
        self.ids: list[int] = []
        self.target: list[bool] = []
        self.content: list[bool] = []

    def add(self, ids: list[int], target: bool = False, content: bool = False):
        self.ids += ids
        self.target += [target] * len(ids)
        self.content += [content] * len(ids)


# ----------------------------------------------------------------------------------------------------
# Llama 3 (Sec 4.1.1)
# ----------------------------------------------------------------------------------------------------


class Llama3ChatFormat(ChatFormat):
    """`<|begin_of_text|>` then per message `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}`
    closed by `<|eot_id|>`, or `<|eom_id|>` when `end_of_message` (an assistant tool call).
    In content, the literal strings `<|python_tag|>` (tool code follows) and `<|image|>` become those
    tokens; any other special-token text stays plain text."""

    ROLES = ("system", "user", "assistant", "ipython")
    MARKERS = ("<|python_tag|>", "<|image|>")

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

        def need(token: str) -> int:
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"the tokenizer has no {token}, which the Llama 3 chat format needs")
            return token_id

        self.bos_id = need("<|begin_of_text|>")
        self.start_header_id = need("<|start_header_id|>")
        self.end_header_id = need("<|end_header_id|>")
        self.eot_id = need("<|eot_id|>")
        self.eom_id = tokenizer.token_to_id("<|eom_id|>")
        self.image_id = tokenizer.token_to_id("<|image|>")
        self.markers = {m: tokenizer.token_to_id(m) for m in self.MARKERS if tokenizer.token_to_id(m) is not None}
        self._marker_split = re.compile("(" + "|".join(map(re.escape, self.markers)) + ")") if self.markers else None
        self.stop_ids = {self.eot_id} | {i for i in (self.eom_id, tokenizer.token_to_id("<|end_of_text|>"))
                                         if i is not None}
        self._boundary_ids = {self.bos_id, tokenizer.token_to_id("<|end_of_text|>")} - {None}

    def header(self, role: str) -> list[int]:
        if role not in self.ROLES:
            raise ValueError(f"unknown role {role!r}; the Llama 3 chat format allows {list(self.ROLES)}")
        return ([self.start_header_id] + self.tokenizer.encode(role) + [self.end_header_id]
                + self.tokenizer.encode("\n\n"))

    def encode_content(self, content: str) -> list[int]:
        if self._marker_split is None:
            return self.tokenizer.encode(content)
        ids: list[int] = []
        for piece in self._marker_split.split(content):
            ids += [self.markers[piece]] if piece in self.markers else self.tokenizer.encode(piece)
        return ids

    def render(self, messages: list[Message], *, add_generation_prompt: bool = False,
               bos: bool = True) -> RenderedDialog:
        out, spans = _Builder(), []
        if bos:
            out.add([self.bos_id])
        for i, m in enumerate(messages):
            start = len(out.ids)
            out.add(self.header(m.role))
            assistant = m.role == "assistant"
            for token in self.encode_content(m.content):
                trained = assistant and token != self.image_id  # images are input, never generated
                out.add([token], trained, trained)
            if m.end_of_message:
                if not assistant or self.eom_id is None:
                    raise ValueError(f"message {i} ({m.role}): end_of_message needs an assistant message and "
                                     "a tokenizer with <|eom_id|>")
                out.add([self.eom_id], target=True)
            else:
                out.add([self.eot_id], target=assistant)
            spans.append((start, len(out.ids)))
        if add_generation_prompt:
            out.add(self.header("assistant"))
        return RenderedDialog(out.ids, out.target, out.content, spans)

    def parse(self, ids) -> list[Message]:
        """Messages of a rendered dialog. A last message without its closing token (a generation prompt,
        or generation cut short) is returned with the content it has."""
        ids, messages, p = [int(i) for i in ids], [], 0
        closers = {self.eot_id, self.eom_id} - {None}
        while p < len(ids):
            if ids[p] in self._boundary_ids:
                p += 1
                continue
            if ids[p] != self.start_header_id:
                raise ValueError(f"token {p} (id {ids[p]}): expected <|start_header_id|> to start a message")
            try:
                q = ids.index(self.end_header_id, p + 1)
            except ValueError:
                raise ValueError(f"token {p}: message header has no <|end_header_id|>") from None
            r = q + 1
            while r < len(ids) and ids[r] not in closers:
                if ids[r] == self.start_header_id:
                    raise ValueError(f"token {p}: message is not closed by <|eot_id|> or <|eom_id|>")
                r += 1
            text = self.tokenizer.decode(ids[q + 1 : r])
            if text and not text.startswith("\n\n"):
                raise ValueError(f"token {q + 1}: expected '\\n\\n' after the header")
            eom = r < len(ids) and ids[r] == self.eom_id
            messages.append(Message(self.tokenizer.decode(ids[p + 1 : q]), text[2:], end_of_message=eom))
            p = r + 1
        return messages


# ----------------------------------------------------------------------------------------------------
# The checkpoint's own jinja chat template (e.g. SmolLM2's <|im_start|>role\n...<|im_end|>)
# ----------------------------------------------------------------------------------------------------


def _jinja_environment():
    """A sandboxed jinja2 environment set up as transformers sets it up for chat templates."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): kept as is."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _starts_with(ids: list[int], prefix: list[int]) -> bool:
    return ids[: len(prefix)] == prefix


class TemplateChatFormat(ChatFormat):
    """Renders with the tokenizer's jinja `chat_template`. The template decides about BOS (`bos` is
    ignored). Masks come from rendering message prefixes: the ids of messages[:k] must be a prefix of
    those of messages[:k+1]; an assistant turn's header is the generation prompt, its closing tokens
    are what the template writes after empty content."""

    _PROBE = "\x00herd-content\x00"

    def __init__(self, tokenizer: Tokenizer, chat_template: str | None = None):
        self.tokenizer = tokenizer
        source = chat_template or tokenizer.chat_template
        if not source:
            raise ValueError("TemplateChatFormat: the tokenizer brings no chat_template and none was given")
        self.template = _jinja_environment().from_string(source)
        names = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "pad_token": tokenizer.pad_id}
        self._context = {k: (tokenizer.decode([i]) if i is not None else None) for k, i in names.items()}
        self.stop_ids = set(tokenizer.stop_ids)
        self._roles: dict[str, tuple[list[int], list[int]]] | None = None  # learned for parse()

    def render_text(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        """The template's text for `messages`."""
        import jinja2

        for i, m in enumerate(messages):
            if m.end_of_message:
                raise ValueError(f"message {i}: end_of_message exists only in the Llama 3 chat format")
        try:
            return self.template.render(messages=[{"role": m.role, "content": m.content} for m in messages],
                                        add_generation_prompt=add_generation_prompt, **self._context)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template failed on roles {[m.role for m in messages]}: {e}") from e

    def _ids(self, messages: list[Message], add_generation_prompt: bool = False) -> list[int]:
        return self.tokenizer.encode(self.render_text(messages, add_generation_prompt), allow_special=True)

    def render(self, messages: list[Message], *, add_generation_prompt: bool = False,
               bos: bool = True) -> RenderedDialog:
        prefixes = [self._empty_prefix(messages)]
        for k in range(1, len(messages) + 1):
            prefixes.append(self._ids(messages[:k]))
            if not _starts_with(prefixes[k], prefixes[k - 1]):
                raise ValueError(f"chat template is not prefix-stable: the ids of messages[:{k - 1}] are not a "
                                 f"prefix of those of messages[:{k}] (message {k - 1}, role "
                                 f"{messages[k - 1].role!r}); loss masks cannot be computed")
        ids = self._ids(messages, True) if add_generation_prompt else prefixes[-1]
        if not _starts_with(ids, prefixes[-1]):
            raise ValueError("chat template is not prefix-stable: the generation prompt changes earlier tokens")
        target, content = [False] * len(ids), [False] * len(ids)
        for k, m in enumerate(messages):
            if m.role == "assistant":
                c0, c1, stop = self._assistant_content(messages, k, prefixes)
                content[c0:c1] = [True] * (c1 - c0)
                target[c0:stop] = [True] * (stop - c0)
        spans = [(len(prefixes[k]), len(prefixes[k + 1])) for k in range(len(messages))]
        return RenderedDialog(ids, target, content, spans)

    def _empty_prefix(self, messages: list[Message]) -> list[int]:
        """What the template writes before any message (e.g. BOS), when that prefixes the first message."""
        try:
            empty = self._ids([])
        except ValueError:
            return []
        return empty if messages and _starts_with(self._ids(messages[:1]), empty) else []

    def _assistant_content(self, messages, k, prefixes) -> tuple[int, int, int]:
        """[c0, c1) content of assistant message k, and the end of its trained closer (through a stop id)."""
        header = self._ids(messages[:k], add_generation_prompt=True)
        empty = self._ids(messages[:k] + [Message("assistant", "")])
        turn = prefixes[k + 1]
        where = f"assistant message {k}"
        if not (_starts_with(header, prefixes[k]) and _starts_with(turn, header) and _starts_with(empty, header)):
            raise ValueError(f"{where}: the template's generation prompt does not start the assistant turn "
                             "or the content's first token merges into it (content starting with whitespace?); "
                             "content tokens cannot be located")
        closer = empty[len(header):]
        c0, c1 = len(header), len(turn) - len(closer)
        if c1 < c0 or turn[c1:] != closer:
            raise ValueError(f"{where}: the turn does not end with the template's closing tokens {closer}")
        stops = [j for j, token in enumerate(closer) if token in self.stop_ids]
        if not stops:
            raise ValueError(f"{where}: the template closes assistant turns with {closer}, which holds no stop "
                             f"token {sorted(self.stop_ids)}; the model could not learn to stop")
        return c0, c1, c1 + stops[0] + 1

    # -- parse --------------------------------------------------------------------------------------

    def _learn_roles(self) -> dict[str, tuple[list[int], list[int]]]:
        """Header and closer ids per role, from rendering a probe message after a small prefix."""
        roles = {}
        prefixes = ([Message("system", "s")], [Message("user", "u")],
                    [Message("user", "u"), Message("assistant", "a")], [])
        for role in ("system", "user", "assistant", "tool", "ipython"):
            for prefix in prefixes:
                try:
                    before = self.render_text(prefix)
                    after = self.render_text(prefix + [Message(role, self._PROBE)])
                except ValueError:
                    continue
                if after.startswith(before) and after.count(self._PROBE) == 1:
                    head, close = after[len(before):].split(self._PROBE)
                    enc = lambda s: self.tokenizer.encode(s, allow_special=True)  # noqa: E731
                    roles[role] = (enc(head), enc(close))
                    break
        if not roles:
            raise ValueError("could not learn the message layout of this chat template")
        return roles

    def parse(self, ids) -> list[Message]:
        """Messages of a rendered dialog; a last message without closing tokens keeps the content it has."""
        self._roles = self._roles or self._learn_roles()
        ids, messages, p = [int(i) for i in ids], [], 0
        by_length = sorted(self._roles.items(), key=lambda kv: -len(kv[1][0]))
        while p < len(ids):
            match = next(((r, h, c) for r, (h, c) in by_length if h and ids[p : p + len(h)] == h), None)
            if match is None:
                if ids[p] in (self.tokenizer.bos_id, self.tokenizer.eos_id):
                    p += 1
                    continue
                raise ValueError(f"token {p} (id {ids[p]}): no message of this chat template starts here")
            role, head, closer = match
            stop_at = next((j for j, t in enumerate(closer) if t in self.stop_ids), len(closer) - 1)
            stop, rest = closer[: stop_at + 1], closer[stop_at + 1 :]
            c0 = q = p + len(head)
            while q < len(ids) and ids[q : q + len(stop)] != stop:
                q += 1
            messages.append(Message(role, self.tokenizer.decode(ids[c0:q])))
            p = q + len(stop)
            if ids[p : p + len(rest)] == rest:
                p += len(rest)
        return messages


def chat_format_for(tokenizer: Tokenizer) -> ChatFormat:
    """The Llama 3 format when the tokenizer has its header tokens, else the tokenizer's own template."""
    if tokenizer.token_to_id("<|start_header_id|>") is not None:
        return Llama3ChatFormat(tokenizer)
    if tokenizer.chat_template:
        return TemplateChatFormat(tokenizer)
    raise ValueError("no chat format for this tokenizer: it has no <|start_header_id|> (Llama 3 format) "
                     "and brings no chat_template")

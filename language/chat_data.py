"""Post-training data (Sec 4.1): chat / preference JSONL -> rendered dialogs, SFT rows, reward-model rows.

    dialogs, report = load_chat_jsonl("sft.jsonl", fmt, max_len=4096)          # list[RenderedDialog]
    batch = pack_dialogs(dialogs, 4096, pad_id=0)                               # PackedBatch (B, T)
    examples, report = load_preference_jsonl("pref.jsonl", fmt, max_len=4096)  # list[RankedExample]
    row = reward_row(examples[i], shuffle_seed=(seed, i))                       # one reward-model row
    mask = reward_attention_mask(row["segment_ids"])                            # (T, T) bool

Rows of the files:
    chat:       {"messages": [{"role": ..., "content": ...}, ...]}
    preference: {"prompt": [messages], "chosen": {"role": "assistant", "content": ...}, "rejected": {...}}
                (an optional "edited" response ranks above "chosen")
    ranked:     {"prompt": [messages], "responses": [best, ..., worst]}  (2-3 assistant messages)
A bad row is skipped with one `DataWarning` naming `file:line` and the reason (`REASONS`); when more than
`max_bad_fraction` of a file's rows are bad, `DataError` names the file and the counts per reason.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from language.chat_format import ChatFormat, Message, RenderedDialog
from language.packing import IGNORE_INDEX, PAD_DOC_ID, PackedBatch

REASONS = (
    "invalid_json",         # not UTF-8 / not JSON
    "malformed",            # missing key or wrong type (not an object, content not a string, 1 or 4+ responses)
    "unknown_role",         # a role the chat format does not know
    "empty_assistant",      # an assistant turn (or a response) with blank content
    "no_assistant",         # a chat row with no assistant turn to train on
    "duplicate_responses",  # chosen == rejected (any two ranked responses equal)
    "too_long",             # more than max_len tokens
    "render_error",         # the chat format refused the row for another reason
)


class DataError(ValueError):
    """A data file with too many bad rows (or none at all)."""


class DataWarning(UserWarning):
    """One skipped row: `file:line: skipped (reason): detail`."""


class BadRow(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class LoadReport:
    """What a loader kept and skipped; `counts` maps each reason in REASONS to its number of rows."""
    path: str
    total: int = 0
    kept: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))

    @property
    def bad(self) -> int:
        return self.total - self.kept

    def __str__(self) -> str:
        bad = ", ".join(f"{k}={v}" for k, v in self.counts.items() if v) or "none"
        return f"{self.path}: kept {self.kept}/{self.total} rows; skipped: {bad}"


@dataclass
class Response:
    """One rendered assistant response as it follows the prompt's generation header: ids (L,), the SFT
    `target_mask` (content + closing token) and the DPO `content_mask` (content only)."""
    ids: list[int]
    target_mask: list[bool]
    content_mask: list[bool]


@dataclass
class RankedExample:
    """A prompt rendered with the assistant generation header, and 2-3 responses best first."""
    prompt: RenderedDialog
    responses: list[Response]
    line: int = 0  # line in the source file

    @property
    def chosen(self) -> Response:
        return self.responses[0]

    @property
    def rejected(self) -> Response:
        return self.responses[-1]

    @property
    def reward_length(self) -> int:
        """Tokens of the reward-model row: the prompt once, then every response."""
        return len(self.prompt.ids) + sum(len(r.ids) for r in self.responses)

    def sequence(self, k: int) -> RenderedDialog:
        """prompt + response k as one dialog (the DPO / NLL sequence); the prompt carries no loss."""
        r, n = self.responses[k], len(self.prompt.ids)
        return RenderedDialog(self.prompt.ids + r.ids, [False] * n + r.target_mask, [False] * n + r.content_mask,
                              self.prompt.message_spans + [(n, n + len(r.ids))])


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def _messages(value, key: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise BadRow("malformed", f"{key!r} must be a non-empty list of messages")
    return [_message(m, f"{key}[{i}]") for i, m in enumerate(value)]


def _message(value, where: str, role: str | None = None) -> Message:
    if not isinstance(value, dict):
        raise BadRow("malformed", f"{where} must be an object with 'role' and 'content'")
    for key in ("role", "content"):
        if key not in value and not (key == "role" and role):
            raise BadRow("malformed", f"{where} has no key {key!r}")
    m_role, content = value.get("role", role), value["content"]
    if not isinstance(m_role, str) or not isinstance(content, str):
        raise BadRow("malformed", f"{where}: role and content must be strings")
    if role and m_role != role:
        raise BadRow("malformed", f"{where} must be an {role} message, got role {m_role!r}")
    if m_role == "assistant" and not content.strip():
        raise BadRow("empty_assistant", f"{where} is an empty assistant turn")
    return Message(m_role, content, bool(value.get("end_of_message", False)))


def _render(fmt: ChatFormat, messages: list[Message], **kwargs) -> RenderedDialog:
    roles = getattr(fmt, "ROLES", None)
    unknown = [m.role for m in messages if roles is not None and m.role not in roles]
    if unknown:
        raise BadRow("unknown_role", f"unknown role {unknown[0]!r}; this chat format knows {list(roles)}")
    try:
        return fmt.render(messages, **kwargs)
    except ValueError as e:
        raise BadRow("unknown_role" if "unknown role" in str(e) else "render_error", str(e)) from None


def _check_length(n: int, max_len: int, what: str) -> None:
    if n > max_len:
        raise BadRow("too_long", f"{what} has {n} tokens > max_len {max_len}")


def _chat_row(row: dict, fmt: ChatFormat, max_len: int) -> RenderedDialog:
    if "messages" not in row:
        raise BadRow("malformed", "no key 'messages'")
    messages = _messages(row["messages"], "messages")
    if not any(m.role == "assistant" for m in messages):
        raise BadRow("no_assistant", "no assistant turn to train on")
    dialog = _render(fmt, messages)
    _check_length(len(dialog.ids), max_len, "the dialog")
    return dialog


def _ranked_row(row: dict, fmt: ChatFormat, max_len: int, max_reward_len: int | None, line: int) -> RankedExample:
    if "prompt" not in row:
        raise BadRow("malformed", "no key 'prompt'")
    if "responses" in row:
        raw, names = row["responses"], None
        if not isinstance(raw, list) or not 2 <= len(raw) <= 3:
            raise BadRow("malformed", "'responses' must be a list of 2-3 assistant messages, best first")
    else:
        names = [k for k in ("edited", "chosen", "rejected") if k in row]
        for key in ("chosen", "rejected"):
            if key not in row:
                raise BadRow("malformed", f"no key {key!r} (nor 'responses')")
        raw = [row[k] for k in names]
    names = names or [f"responses[{i}]" for i in range(len(raw))]
    prompt_messages = _messages(row["prompt"], "prompt")
    responses = [_message(r, n, role="assistant") for r, n in zip(raw, names)]
    texts = [r.content.strip() for r in responses]
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            if texts[i] == texts[j]:
                raise BadRow("duplicate_responses", f"{names[i]} equals {names[j]}")
    prompt = _render(fmt, prompt_messages, add_generation_prompt=True)
    n = len(prompt.ids)
    rendered = []
    for r, name in zip(responses, names):
        full = _render(fmt, prompt_messages + [r])
        if full.ids[:n] != prompt.ids:
            raise BadRow("render_error", f"{name}: the rendered prompt + generation header is not a prefix of "
                                          "the rendered prompt + response")
        _check_length(len(full.ids), max_len, f"prompt + {name}")
        rendered.append(Response(full.ids[n:], full.target_mask[n:], full.content_mask[n:]))
    example = RankedExample(prompt, rendered, line=line)
    if max_reward_len is not None:
        _check_length(example.reward_length, max_reward_len, "the reward row (prompt + all responses)")
    return example


def load_jsonl_rows(path, parse, max_bad_fraction: float = 0.5) -> tuple[list, LoadReport]:
    """Items `parse(row: dict, lineno) -> item` of a JSONL file. A row that is not a JSON object or whose
    `parse` raises `BadRow` is counted and skipped with a `DataWarning` naming file:line; no rows, or more
    than `max_bad_fraction` bad rows -> `DataError`. Every loader of chat-like JSONL goes through here."""
    path = Path(path)
    report, kept = LoadReport(str(path)), []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            report.total += 1
            try:
                try:
                    row = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise BadRow("invalid_json", str(e)) from None
                if not isinstance(row, dict):
                    raise BadRow("malformed", f"a row must be a JSON object, got {type(row).__name__}")
                item = parse(row, lineno)
            except BadRow as bad:
                report.counts[bad.reason] += 1
                # located at the data file's line; no registry, so a file loaded twice warns twice
                warnings.warn_explicit(f"{path}:{lineno}: skipped ({bad.reason}): {bad}", DataWarning,
                                       str(path), lineno, module=__name__, registry=None)
                continue
            kept.append(item)
            report.kept += 1
    if report.total == 0:
        raise DataError(f"{path}: no rows")
    if report.bad > max_bad_fraction * report.total:
        raise DataError(f"{path}: {report.bad} of {report.total} rows are bad (more than "
                        f"{max_bad_fraction:.0%}): " + ", ".join(f"{k}={v}" for k, v in report.counts.items() if v))
    return kept, report


def load_chat_jsonl(path, chat_format: ChatFormat, *, max_len: int,
                    max_bad_fraction: float = 0.5) -> tuple[list[RenderedDialog], LoadReport]:
    """SFT dialogs of a chat JSONL file, rendered with BOS (module docstring for bad rows)."""
    return load_jsonl_rows(path, lambda row, _: _chat_row(row, chat_format, max_len), max_bad_fraction)


def load_preference_jsonl(path, chat_format: ChatFormat, *, max_len: int, max_reward_len: int | None = None,
                          max_bad_fraction: float = 0.5) -> tuple[list[RankedExample], LoadReport]:
    """Preference or ranked rows (both kinds may mix in a file). `max_len` bounds prompt + each response
    (a DPO sequence); `max_reward_len`, if given, bounds prompt + all responses (a reward-model row)."""
    return load_jsonl_rows(path, lambda row, line: _ranked_row(row, chat_format, max_len, max_reward_len, line),
                           max_bad_fraction)


# ----------------------------------------------------------------------------------------------------
# SFT packing
# ----------------------------------------------------------------------------------------------------


def first_fit_rows(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Greedy first fit in order: each item goes into the first row with room left. Returns the item
    indices per row. A max-tree over the rows' free space finds that row in O(log n)."""
    for i, n in enumerate(lengths):
        if n > seq_len:
            raise ValueError(f"dialog {i} has {n} tokens > seq_len {seq_len}; filter with max_len at load")
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    free = [0] * (2 * size)  # leaves: free space of row r at size + r (0 until the row is opened)
    rows: list[list[int]] = []
    for i, n in enumerate(lengths):
        if free[1] >= n:
            node = 1
            while node < size:
                node = 2 * node if free[2 * node] >= n else 2 * node + 1
            r = node - size
        else:
            r = len(rows)
            rows.append([])
            node = size + r
            free[node] = seq_len
        rows[r].append(i)
        free[node] -= n
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


def pack_rows(dialogs: list[RenderedDialog], plan: list[list[int]], seq_len: int, *, pad_id: int = 0) -> PackedBatch:
    """PackedBatch (B = len(plan), T = seq_len) with the dialogs of plan[b] in row b. Each dialog is its own
    document (doc_ids 0.. in the row, padding -1; positions from 0). labels[t] = ids[t+1] where token t+1
    is in the same dialog's target_mask, else IGNORE_INDEX (so never across dialogs)."""
    b = len(plan)
    tokens = torch.full((b, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((b, seq_len), IGNORE_INDEX, dtype=torch.long)
    doc_ids = torch.full((b, seq_len), PAD_DOC_ID, dtype=torch.long)
    positions = torch.zeros((b, seq_len), dtype=torch.long)
    for r, members in enumerate(plan):
        slot = 0
        for doc, i in enumerate(members):
            d = dialogs[i]
            n = len(d.ids)
            if slot + n > seq_len:
                raise ValueError(f"row {r}: dialog {i} ({n} tokens) does not fit at slot {slot} of seq_len {seq_len}")
            ids = torch.tensor(d.ids, dtype=torch.long)
            tokens[r, slot:slot + n] = ids
            next_target = torch.tensor(d.target_mask[1:], dtype=torch.bool)
            labels[r, slot:slot + n - 1] = torch.where(next_target, ids[1:], IGNORE_INDEX)
            doc_ids[r, slot:slot + n] = doc
            positions[r, slot:slot + n] = torch.arange(n)
            slot += n
    return PackedBatch(tokens, labels, doc_ids, positions)


def pack_dialogs(dialogs: list[RenderedDialog], seq_len: int, *, pad_id: int = 0) -> PackedBatch:
    """All dialogs packed first-fit in order into rows (B, seq_len); a dialog longer than seq_len is an error."""
    return pack_rows(dialogs, first_fit_rows([len(d.ids) for d in dialogs], seq_len), seq_len, pad_id=pad_id)


# ----------------------------------------------------------------------------------------------------
# Reward-model rows
# ----------------------------------------------------------------------------------------------------


def reward_row(example: RankedExample, *, shuffle_seed) -> dict[str, torch.Tensor]:
    """The prompt once, then its K responses in a shuffled order (seeded by `shuffle_seed`, an int or a
    tuple such as (seed, example index)). Returns LongTensors:
      tokens (T,), segment_ids (T,) 0 = prompt, k = k-th placed response (1..K),
      positions (T,) prompt 0..P-1, each response from P (as if it directly followed the prompt),
      end_index (K,) index of each placed response's last token (where its reward is read),
      rank (K,) original rank (0 = best) of each placed response: responses[rank[k]] is segment k + 1."""
    k = len(example.responses)
    order = np.random.default_rng(shuffle_seed).permutation(k)
    p = len(example.prompt.ids)
    tokens, segments, positions, ends = list(example.prompt.ids), [0] * p, list(range(p)), []
    for s, original in enumerate(order, 1):
        ids = example.responses[original].ids
        tokens += ids
        segments += [s] * len(ids)
        positions += range(p, p + len(ids))
        ends.append(len(tokens) - 1)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return {"tokens": as_long(tokens), "segment_ids": as_long(segments), "positions": as_long(positions),
            "end_index": as_long(ends), "rank": as_long(order.tolist())}


def reward_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(..., T) segment ids -> (..., T, T) bool: query i may attend key j iff j <= i and (segment j == 0 or
    segment j == segment i). Each response sees the prompt and itself, so the prompt is encoded once."""
    t = segment_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    q, kv = segment_ids.unsqueeze(-1), segment_ids.unsqueeze(-2)
    return causal & ((kv == 0) | (kv == q))

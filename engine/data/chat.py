"""Conversation rows -> normalised messages -> token ids with a trainable mask (engine/data/template.py).

Row formats accepted (extra top-level fields become metadata):
  messages   {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}  (LongWriter, OpenAI)
  ShareGPT   {"conversations": [{"from": "system"|"human"|"user"|"gpt"|"assistant", "value": str}], "system"?}
  ms-swift   {"query": str, "response": str, "history": [[q, a], ...]?, "system"?}

The tokenizer's chat template (the checkpoint's own, or a built-in) renders them; what is trained is each
assistant reply and the end-of-turn token after it (template.py says exactly how it is found).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.data.template import encode_chats
from engine.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


class FieldError(ValueError):
    """A row is malformed; `field` names the offending JSON field (e.g. "messages[2].content")."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field {field!r}: {message}")
        self.field = field
        self.message = message


def _check_str(value, field: str) -> str:
    if not isinstance(value, str):
        raise FieldError(field, f"content must be a string, got {type(value).__name__}")
    return value


def _turns(raw, key: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict]:
    """A list of {role_key, content_key} objects (messages or ShareGPT conversations) -> messages."""
    if not isinstance(raw, list):
        raise FieldError(key, f"must be a list of {{{role_key}, {content_key}}} objects")
    out = []
    for i, m in enumerate(raw):
        at = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise FieldError(at, f"must be an object with {role_key!r} and {content_key!r}")
        for k, what in ((role_key, "role"), (content_key, "content")):
            if k not in m:
                raise FieldError(f"{at}.{k}", f"missing {what}")
        if m[role_key] not in roles:
            raise FieldError(
                f"{at}.{role_key}", f"unknown role {m[role_key]!r} (expected one of {tuple(roles)})"
            )
        out.append({"role": roles[m[role_key]], "content": _check_str(m[content_key], f"{at}.{content_key}")})
    return out


def normalize_row(row) -> tuple[list[dict], dict]:
    """Any accepted row format -> (messages, metadata). Raises FieldError with the field path."""
    if not isinstance(row, dict):
        raise FieldError("<row>", f"a row must be a JSON object, got {type(row).__name__}")
    offset_system = False  # ShareGPT: a top-level "system" shifts message indices by one
    if "messages" in row:
        messages = _turns(row["messages"], "messages", "role", "content", {r: r for r in ROLES})
        meta = {k: v for k, v in row.items() if k != "messages"}
        prefix = "messages"
    elif "conversations" in row:
        messages = []
        if row.get("system") is not None:
            messages.append({"role": "system", "content": _check_str(row["system"], "system")})
        messages += _turns(row["conversations"], "conversations", "from", "value", _SHAREGPT_ROLES)
        meta = {k: v for k, v in row.items() if k not in ("conversations", "system")}
        prefix = "conversations"
        offset_system = row.get("system") is not None
    elif "query" in row or "response" in row:
        messages = []
        if row.get("system") is not None:
            messages.append({"role": "system", "content": _check_str(row["system"], "system")})
        history = row.get("history") or []
        if not isinstance(history, list):
            raise FieldError("history", "must be a list of [query, response] pairs")
        for i, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise FieldError(f"history[{i}]", "must be a [query, response] pair")
            messages.append({"role": "user", "content": _check_str(pair[0], f"history[{i}][0]")})
            messages.append({"role": "assistant", "content": _check_str(pair[1], f"history[{i}][1]")})
        for key, role in (("query", "user"), ("response", "assistant")):
            if key not in row:
                raise FieldError(key, "missing")
            messages.append({"role": role, "content": _check_str(row[key], key)})
        meta = {k: v for k, v in row.items() if k not in ("query", "response", "history", "system")}
        prefix = None
    else:
        raise FieldError("messages", "row has none of 'messages', 'conversations', 'query'/'response'")
    _check_structure(messages, prefix, offset_system)
    return messages, meta


def _check_structure(messages: list[dict], prefix: str | None, offset_system: bool = False) -> None:
    def field(i: int, key: str) -> str:
        if prefix is None:  # ms-swift rows: history[k][0|1], then query / response
            j = i - int(messages[0]["role"] == "system")
            if j >= len(messages) - 2 - int(messages[0]["role"] == "system"):
                return "response" if j % 2 else "query"
            return f"history[{j // 2}][{j % 2}]"
        if prefix == "conversations":  # a top-level "system" is messages[0] but not in the list
            i -= int(messages[0]["role"] == "system" and offset_system)
            return f"conversations[{i}].{'from' if key == 'role' else 'value'}"
        return f"{prefix}[{i}].{key}"

    if not messages:
        raise FieldError(prefix or "query", "empty conversation")
    start = 1 if messages[0]["role"] == "system" else 0
    if start == len(messages):
        raise FieldError(field(0, "role"), "conversation has only a system message")
    for i in range(start, len(messages)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if messages[i]["role"] != expected:
            raise FieldError(
                field(i, "role"),
                f"expected role {expected!r} here (system first, then user/assistant turns alternating), "
                f"got {messages[i]['role']!r}",
            )
        if expected == "assistant" and not messages[i]["content"].strip():
            raise FieldError(field(i, "content"), "empty assistant reply")
    if messages[-1]["role"] != "assistant":
        raise FieldError(field(len(messages) - 1, "role"), "conversation must end with an assistant reply")


def encode_conversations(
    tokenizer: Tokenizer, conversations: Sequence[Sequence[dict]]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Conversations -> [(input_ids int32[T], trainable bool[T])] through the tokenizer's chat template."""
    return encode_chats(tokenizer, tokenizer.chat_template, conversations)


def aligned_labels(input_ids: np.ndarray, trainable: np.ndarray) -> np.ndarray:
    """labels[i] = input_ids[i + 1] where token i + 1 is trainable, else -100 (targets never leave the sample)."""
    labels = np.full(len(input_ids), -100, dtype=np.int64)
    nxt = trainable[1:]
    labels[:-1][nxt] = input_ids[1:][nxt]
    return labels


def encode_generation_prompt(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """The template up to and including the assistant role header (add_generation_prompt=True): the ids of
    apply_chat_template(messages, add_generation_prompt=True, tokenize=True)."""
    msgs = [dict(m) for m in messages]
    for i, m in enumerate(msgs):
        if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}]: need a role in {ROLES} and string content, got {m!r}")
    ((ids, _),) = encode_chats(tokenizer, tokenizer.chat_template, [msgs], generation_prompt=True)
    return ids.tolist()

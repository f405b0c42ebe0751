"""Instruction files of the generators (AgentWrite, preference sampling): strict JSONL, one row per line.

A row is `{"prompt": str}` or `{"messages": [{"role", "content"}, ...]}` (the conversation to answer; a
trailing assistant turn, as in a LongWriter SFT row, is dropped so the row's instruction is re-answered),
with an optional "id" and an optional "length" (the required length in count_words units). Without a
given length, the one length stated in the last user turn is used (filters.required_length), else None.
Every error names the file, the line and the field.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from data_gen.filters import required_length
from data_gen.jsonl import iter_objects

ROLES = ("system", "user", "assistant")


@dataclass
class Instruction:
    index: int  # position among the file's rows: the order of every output
    id: str
    messages: list[dict]  # ends with a user turn
    length: int | None
    length_source: str | None  # "given" (the row's "length"), "prompt" (stated in it) or None

    @property
    def prompt(self) -> str:
        """The last user turn: the writing request itself."""
        return self.messages[-1]["content"]

    @property
    def source(self) -> str:
        """What identifies the request: the prompt of a single-turn row, else the whole conversation."""
        if len(self.messages) == 1:
            return self.prompt
        return json.dumps(self.messages, ensure_ascii=False, sort_keys=True)

    @property
    def key(self) -> str:
        # The request's hash is part of the key: an edited prompt under an old id starts afresh.
        return f"{self.id}|{hashlib.sha1(self.source.encode()).hexdigest()[:12]}"


def given_length(value: object, where: str) -> int | None:
    """A row's "length" as a positive int (a whole float or a digit string is accepted), or None."""
    if value is None:
        return None
    try:
        length = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        length = float("nan")
    if not length.is_integer() or length <= 0:  # NaN is not an integer either
        raise ValueError(f"{where}: 'length' must be a positive whole number of words, got {value!r}")
    return int(length)


def _messages(value: object, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: 'messages' must be a non-empty list, got {type(value).__name__}")
    turns = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise ValueError(f"{where}: messages[{i}] must be an object, got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise ValueError(f"{where}: messages[{i}].role must be one of {ROLES}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: messages[{i}].content must be a string, got {m.get('content')!r}")
        turns.append({"role": m["role"], "content": m["content"]})
    if turns[-1]["role"] == "assistant":  # an SFT row: answer its instruction again
        turns.pop()
    if not turns:
        raise ValueError(f"{where}: 'messages' holds no user turn (the request)")
    if turns[-1]["role"] != "user" or not turns[-1]["content"].strip():
        raise ValueError(f"{where}: messages[{len(turns) - 1}] must be a non-empty user turn (the request)")
    return turns


def read_instructions(path: str | os.PathLike, *, allow_messages: bool = True) -> list[Instruction]:
    """Every row of `path` as an Instruction; ids not given are a stable hash of the request."""
    items: list[Instruction] = []
    seen: set[str] = set()
    for lineno, row in iter_objects(path):
        where = f"{path}:{lineno}"
        prompt = row.get("prompt")
        if allow_messages and "messages" in row:
            if prompt is not None:
                raise ValueError(f"{where}: row has both 'prompt' and 'messages'; give one")
            messages = _messages(row["messages"], where)
        elif isinstance(prompt, str) and prompt.strip():
            messages = [{"role": "user", "content": prompt}]
        else:
            wanted = "a non-empty string 'prompt'" + (" or a 'messages' list" if allow_messages else "")
            raise ValueError(f"{where}: row without {wanted}")
        length = given_length(row.get("length"), where)
        source = "given" if length is not None else None
        if length is None:
            length = required_length(messages[-1]["content"])
            source = "prompt" if length is not None else None
        item = Instruction(len(items), "", messages, length, source)
        if row.get("id") is not None:
            item.id = str(row["id"])
            if item.id in seen:
                raise ValueError(f"{where}: duplicate id {item.id!r}")
        else:  # stable across reruns: derived from the request (and its repeat count)
            base = hashlib.sha1(item.source.encode()).hexdigest()[:16]
            item.id, k = base, 1
            while item.id in seen:
                item.id, k = f"{base}-{k}", k + 1
        seen.add(item.id)
        items.append(item)
    return items

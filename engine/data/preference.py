"""Preference pairs for DPO: rows -> (chosen, rejected) conversations -> documents masked to the response.

Row formats accepted (extra top-level fields become metadata):
  ms-swift  {"messages": [..., {"role": "assistant", "content": CHOSEN}], "rejected_response": REJECTED}
            (also with "conversations" or "query"/"response"/"history" in place of "messages", as SFT rows)
  TRL       {"prompt": str | [messages ending with a user turn], "chosen": str | [{"role": "assistant",
            "content": str}], "rejected": same as chosen}

Both conversations are rendered by the SFT chat template (engine.data.chat.encode_conversations) with its mask;
only the final reply keeps its trainable tokens (the last trainable run of the mask: the reply and its end
token), so the log-probability of a response is the sum over exactly the tokens SFT would train for it.
A pair is one sample of two documents (chosen first): it is packed, truncated and dealt out as a unit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.data.chat import (
    FieldError,
    _check_str,
    _check_structure,
    _turns,
    encode_conversations,
    normalize_row,
)
from engine.data.dataset import RowFormat
from engine.data.tokenizer import Tokenizer

_ROLES = {r: r for r in ("system", "user", "assistant")}


def _reply(value, key: str) -> str:
    """A TRL completion: a string, or a list of exactly one assistant message."""
    if isinstance(value, list):
        if len(value) != 1:
            raise FieldError(key, f"must hold exactly one assistant message, got {len(value)}")
        (msg,) = _turns(value, key, "role", "content", _ROLES)
        if msg["role"] != "assistant":
            raise FieldError(
                f"{key}[0].role", f"the completion must be an assistant message, got {msg['role']!r}"
            )
        text, key = msg["content"], f"{key}[0].content"
    else:
        text = _check_str(value, key)
    if not text.strip():
        raise FieldError(key, "empty response")
    return text


def _trl_prompt(value) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise FieldError("prompt", "empty prompt")
        return [{"role": "user", "content": value}]
    messages = _turns(value, "prompt", "role", "content", _ROLES)
    if not messages or messages[-1]["role"] != "user":
        at = f"prompt[{len(messages) - 1}].role" if messages else "prompt"
        raise FieldError(at, "the prompt must end with a user turn (the responses answer it)")
    # the prompt is a conversation that stops before the reply: check it with a placeholder reply appended
    _check_structure([*messages, {"role": "assistant", "content": "-"}], "prompt")
    return messages


def normalize_pair(row) -> tuple[list[list[dict]], dict]:
    """A preference row -> ([chosen messages, rejected messages], metadata). Raises FieldError with the field."""
    if not isinstance(row, dict):
        raise FieldError("<row>", f"a row must be a JSON object, got {type(row).__name__}")
    if "rejected_response" in row:  # ms-swift: the row's own conversation ends with the chosen reply
        rejected = _reply(row["rejected_response"], "rejected_response")
        chosen, meta = normalize_row({k: v for k, v in row.items() if k != "rejected_response"})
        return [chosen, [*chosen[:-1], {"role": "assistant", "content": rejected}]], meta
    if "chosen" in row or "rejected" in row or "prompt" in row:  # TRL
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                raise FieldError(key, "missing (TRL preference rows have 'prompt', 'chosen' and 'rejected')")
        prompt = _trl_prompt(row["prompt"])
        pair = [
            [*prompt, {"role": "assistant", "content": _reply(row[k], k)}] for k in ("chosen", "rejected")
        ]
        return pair, {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
    raise FieldError(
        "rejected_response",
        "not a preference row: expected 'messages' + 'rejected_response' (ms-swift) or 'prompt', 'chosen', "
        "'rejected' (TRL)",
    )


def last_reply_mask(trainable: np.ndarray) -> np.ndarray:
    """Keep only the last contiguous run of trainable tokens (the final reply and its end token)."""
    idx = np.flatnonzero(trainable)
    out = np.zeros_like(trainable)
    if len(idx):
        breaks = np.flatnonzero(np.diff(idx) > 1)
        start = idx[breaks[-1] + 1] if len(breaks) else idx[0]
        out[start : idx[-1] + 1] = True
    return out


def encode_responses(
    tokenizer: Tokenizer, conversations: Sequence[Sequence[dict]]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """encode_conversations, with the trainable mask cut to each conversation's final reply."""
    return [(ids, last_reply_mask(mask)) for ids, mask in encode_conversations(tokenizer, conversations)]


PAIR_FORMAT = RowFormat("dpo", ("chosen", "rejected"), normalize_pair, encode_responses)

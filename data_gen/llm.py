"""One async client for every OpenAI-compatible chat endpoint (OpenAI, vLLM, SGLang, ...).

The `openai` package does the HTTP; retries are ours (the SDK's are turned off with max_retries=0)
so that every caller gets the same policy and the same typed failure:

- 429, 5xx, 408/409, timeouts and dropped connections are retried with exponential backoff and full
  jitter, `Retry-After` (or `retry-after-ms`) from the server taking precedence over the backoff;
- any other 4xx (a context-length 400, a bad key, an unknown model) fails at once: retrying cannot help;
- after the last attempt an `LLMError` is raised, whose `.kind` says what went wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import logging
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any

import openai

log = logging.getLogger(__name__)

KINDS = ("bad_request", "auth", "rate_limit", "server", "timeout", "connection", "parse", "other")
_RETRYABLE = {"rate_limit", "server", "timeout", "connection"}


class LLMError(Exception):
    """A failed chat call. `kind` is one of KINDS; `retryable` says whether a later attempt may succeed."""

    def __init__(
        self, message: str, kind: str, *, status: int | None = None, retryable: bool | None = None
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown LLMError kind {kind!r}; expected one of {KINDS}")
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retryable = kind in _RETRYABLE if retryable is None else retryable

    def __reduce__(self):  # keep kind/status through pickling (multiprocessing, copy)
        return (_rebuild_llm_error, (str(self), self.kind, self.status, self.retryable))


def _rebuild_llm_error(message: str, kind: str, status: int | None, retryable: bool) -> LLMError:
    return LLMError(message, kind, status=status, retryable=retryable)


@dataclass
class Completion:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


def _retry_after_seconds(headers: Any) -> float | None:
    """Seconds the server asks us to wait, from `retry-after-ms` or `retry-after` (seconds or HTTP date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def classify(exc: BaseException) -> tuple[LLMError, float | None]:
    """Map an `openai` exception to (LLMError, Retry-After seconds or None)."""
    if isinstance(exc, openai.APITimeoutError):  # before APIConnectionError: it is a subclass
        return LLMError(f"request timed out: {exc}", "timeout"), None
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc.__context__
        detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        return LLMError(f"connection error: {exc}{detail}", "connection"), None
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        message = f"HTTP {status}: {exc.message}"
        if status == 429:
            kind, retryable = "rate_limit", True
        elif status >= 500:
            kind, retryable = "server", True
        elif status == 408:
            kind, retryable = "timeout", True
        elif status == 409:  # a lock/conflict on the server side; transient
            kind, retryable = "other", True
        elif status in (401, 403):
            kind, retryable = "auth", False
        else:  # 400 (context length, bad params), 404 (unknown model), 422, ...
            kind, retryable = "bad_request", False
        return LLMError(message, kind, status=status, retryable=retryable), _retry_after_seconds(
            exc.response.headers
        )
    if isinstance(exc, openai.APIResponseValidationError):
        return LLMError(f"unparsable response: {exc}", "parse", status=exc.status_code), None
    return LLMError(f"{type(exc).__name__}: {exc}", "other", retryable=False), None


class LLMClient:
    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 5,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.model = model
        self.base_url = base_url
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0, "retries": 0}
        self._client: openai.AsyncOpenAI | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _get_client(self) -> openai.AsyncOpenAI:
        # The underlying connection pool is bound to the event loop that first used it; a client
        # reused under a second asyncio.run() gets a fresh pool instead of a dead one.
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = openai.AsyncOpenAI(
                api_key=self.api_key, base_url=self.base_url, timeout=self.timeout, max_retries=0
            )
            self._loop = loop
        return self._client

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0-based)."""
        if retry_after is not None:
            # The server knows best; cap it so a silly header cannot stall a run for hours.
            return min(retry_after, max(self.backoff_max, 0.0))
        return random.uniform(0.0, min(self.backoff_max, self.backoff_base * 2.0**attempt))

    async def chat(
        self,
        messages: list[dict],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        top_p: float | None = None,
        **extra_body: Any,
    ) -> Completion:
        """One chat completion; `extra_body` goes to the server as-is (e.g. vLLM's top_k)."""
        kwargs: dict[str, Any] = {"model": self.model, "messages": messages}
        if temperature is not None:
            kwargs["temperature"] = temperature
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        if top_p is not None:
            kwargs["top_p"] = top_p
        if extra_body:
            kwargs["extra_body"] = extra_body

        attempt = 0
        while True:
            self.usage["requests"] += 1
            try:
                resp = await self._get_client().chat.completions.create(**kwargs)
            except openai.OpenAIError as exc:
                err, retry_after = classify(exc)
                if not err.retryable or attempt >= self.max_retries:
                    if err.retryable:
                        err = LLMError(
                            f"{err} (gave up after {attempt + 1} attempts)",
                            err.kind,
                            status=err.status,
                            retryable=True,
                        )
                    raise err from exc
                delay = self.backoff(attempt, retry_after)
                log.warning(
                    "chat attempt %d/%d failed (%s); retrying in %.2fs",
                    attempt + 1,
                    self.max_retries + 1,
                    err,
                    delay,
                )
                self.usage["retries"] += 1
                attempt += 1
                await asyncio.sleep(delay)
                continue
            return self._completion(resp)

    def _completion(self, resp: Any) -> Completion:
        if not getattr(resp, "choices", None):
            raise LLMError(f"response without choices: {str(resp)[:200]}", "parse")
        choice = resp.choices[0]
        usage = getattr(resp, "usage", None)
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        self.usage["prompt_tokens"] += prompt_tokens
        self.usage["completion_tokens"] += completion_tokens
        text = choice.message.content if choice.message is not None else None
        return Completion(
            text=text or "",
            finish_reason=choice.finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
            self._loop = None

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


_CTX_RE = re.compile(r"maximum context length is (\d+)")
_PROMPT_RE = re.compile(
    r"(\d+) in the messages|request has (\d+) input tokens|prompt contains at least (\d+) input tokens"
)


def fit_max_tokens(error_message: str, max_tokens: int) -> int | None:
    """The largest max_tokens a server's context-length 400 leaves room for, or None if it does not say.

    vLLM rejects prompt + max_tokens > max_model_len instead of stopping at the limit, so a max_tokens of
    32768 against a 32k-context server would fail every prompt; HF generate (the official pred.py) just
    stops there. Both vLLM message styles are understood ("... (132 in the messages, 32768 in the
    completion)" and "... your request has 2778 input tokens (8000 > 4096 - 2778)").
    """
    ctx, prompt = _CTX_RE.search(error_message), _PROMPT_RE.search(error_message)
    if ctx is None or prompt is None:
        return None
    room = int(ctx.group(1)) - int(next(g for g in prompt.groups() if g is not None))
    return room if 0 < room < max_tokens else None


async def chat_within_context(
    client: LLMClient, messages: list[dict], *, max_tokens: int | None, label: str, **kwargs: Any
) -> tuple[Completion, int | None]:
    """client.chat, asked once more with the max_tokens a context-length 400 leaves room for (when the error
    says how much that is); returns the completion and the max_tokens it was asked with. The second answer
    may well stop at the context (finish_reason "length"): the caller decides what a cut-off text is worth.
    label: the item the request is for, in the log line that says max_tokens was cut."""
    try:
        return await client.chat(messages, max_tokens=max_tokens, **kwargs), max_tokens
    except LLMError as e:
        fitted = fit_max_tokens(str(e), max_tokens) if e.kind == "bad_request" and max_tokens else None
        if fitted is None:
            raise
    log.warning("%s: max_tokens %d -> %d to fit the context", label, max_tokens, fitted)
    return await client.chat(messages, max_tokens=fitted, **kwargs), fitted


RETRY_FLAGS = ("timeout", "max_retries", "backoff_base", "backoff_max")


def add_retry_flags(p: argparse.ArgumentParser) -> None:
    """The client's request policy as CLI flags (the data_gen runners); retry_options reads them back."""
    p.add_argument("--max_retries", type=int, default=5, help="retries per request on 429/5xx/timeouts")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--backoff_base", type=float, default=1.0)
    p.add_argument("--backoff_max", type=float, default=60.0)


def retry_options(args: argparse.Namespace) -> dict[str, Any]:
    """LLMClient keyword arguments from the flags of add_retry_flags."""
    return {name: getattr(args, name) for name in RETRY_FLAGS}

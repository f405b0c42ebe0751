"""data_gen.llm.LLMClient against the real HTTP server of tests/openai_server.py."""

import asyncio
import random
import time

import pytest
from openai_server import OpenAIServer

from data_gen.llm import Completion, LLMClient, LLMError, _retry_after_seconds, fit_max_tokens

MSG = [{"role": "user", "content": "say hi"}]


def echo(body: dict) -> str:
    return "echo: " + body["messages"][-1]["content"]


def client(srv: OpenAIServer, **kw) -> LLMClient:
    kw = {"timeout": 2.0, "max_retries": 3, "backoff_base": 0.01, "backoff_max": 0.05, **kw}
    return LLMClient("test-model", base_url=srv.base_url, api_key="k", **kw)


def run(coro):
    return asyncio.run(coro)


def test_plain_call_and_usage_accounting():
    with OpenAIServer(echo) as srv:
        c = client(srv)

        async def go():
            a = await c.chat(MSG, temperature=0.5, max_tokens=7, top_p=0.9, top_k=3)
            b = await c.chat([{"role": "user", "content": "two words"}])
            return a, b

        a, b = run(go())
    assert isinstance(a, Completion)
    assert a.text == "echo: say hi" and a.finish_reason == "stop"
    # server counts whitespace words: "say hi" -> 2, "echo: say hi" -> 3
    assert (a.prompt_tokens, a.completion_tokens) == (2, 3)
    assert (b.prompt_tokens, b.completion_tokens) == (2, 3)
    assert c.usage == {"prompt_tokens": 4, "completion_tokens": 6, "requests": 2, "retries": 0}
    first = srv.requests[0]
    assert first["model"] == "test-model" and first["temperature"] == 0.5
    assert first["max_tokens"] == 7 and first["top_p"] == 0.9 and first["top_k"] == 3
    assert "temperature" not in srv.requests[1]


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_retries_transient_status(status):
    with OpenAIServer(echo, fail=lambda b, n: status if n < 2 else None) as srv:
        c = client(srv)
        out = run(c.chat(MSG))
    assert out.text == "echo: say hi"
    assert len(srv.requests) == 3
    assert c.usage["requests"] == 3 and c.usage["retries"] == 2
    # failed attempts carry no usage
    assert c.usage["completion_tokens"] == 3


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured(status):
    # backoff alone would wait <= 0.05 s; Retry-After asks for 0.3 s between attempts.
    with OpenAIServer(echo, fail=lambda b, n: status if n < 2 else None, retry_after=0.3) as srv:
        c = client(srv, backoff_max=5.0)
        t0 = time.monotonic()
        out = run(c.chat(MSG))
        elapsed = time.monotonic() - t0
    assert out.text == "echo: say hi"
    assert elapsed >= 0.6
    assert c.usage["retries"] == 2


@pytest.mark.parametrize(
    "status,kind", [(400, "bad_request"), (401, "auth"), (403, "auth"), (404, "bad_request")]
)
def test_no_retry_on_client_errors(status, kind):
    with OpenAIServer(echo, fail=lambda b, n: status) as srv:
        c = client(srv)
        with pytest.raises(LLMError) as ei:
            run(c.chat(MSG))
    assert ei.value.kind == kind and ei.value.status == status and not ei.value.retryable
    assert len(srv.requests) == 1
    if status == 400:
        assert "maximum context length" in str(ei.value)


def test_gives_up_after_max_retries():
    with OpenAIServer(echo, fail=lambda b, n: 500) as srv:
        c = client(srv, max_retries=2)
        with pytest.raises(LLMError) as ei:
            run(c.chat(MSG))
    assert ei.value.kind == "server" and ei.value.retryable and ei.value.status == 500
    assert len(srv.requests) == 3  # 1 + 2 retries
    assert c.usage["requests"] == 3 and c.usage["retries"] == 2


def test_timeout_is_retried_then_succeeds():
    with OpenAIServer(echo, fail=lambda b, n: "timeout" if n == 0 else None) as srv:
        c = client(srv, timeout=0.5)
        t0 = time.monotonic()
        out = run(c.chat(MSG))
        elapsed = time.monotonic() - t0
    assert out.text == "echo: say hi"
    assert len(srv.requests) == 2
    assert 0.5 <= elapsed < 3.0


def test_timeout_exhausted_raises_timeout_kind():
    with OpenAIServer(echo, fail=lambda b, n: "timeout") as srv:
        c = client(srv, timeout=0.2, max_retries=1)
        with pytest.raises(LLMError) as ei:
            run(c.chat(MSG))
    assert ei.value.kind == "timeout" and ei.value.retryable
    assert len(srv.requests) == 2


def test_dropped_connection_is_retried():
    with OpenAIServer(echo, fail=lambda b, n: "drop" if n < 2 else None) as srv:
        c = client(srv)
        out = run(c.chat(MSG))
    assert out.text == "echo: say hi"
    assert len(srv.requests) == 3
    assert c.usage["retries"] == 2


def test_dropped_connection_exhausted_is_connection_kind():
    with OpenAIServer(echo, fail=lambda b, n: "drop") as srv:
        c = client(srv, max_retries=1)
        with pytest.raises(LLMError) as ei:
            run(c.chat(MSG))
    assert ei.value.kind == "connection" and ei.value.retryable


def test_server_down_is_connection_error():
    srv = OpenAIServer(echo).start()
    url = srv.base_url
    srv.stop()
    c = LLMClient("m", base_url=url, timeout=1.0, max_retries=1, backoff_base=0.01, backoff_max=0.02)
    with pytest.raises(LLMError) as ei:
        run(c.chat(MSG))
    assert ei.value.kind == "connection"


def test_concurrent_calls_and_reuse_across_event_loops():
    with OpenAIServer(echo, latency=(0.0, 0.02)) as srv:
        c = client(srv)

        async def go():
            outs = await asyncio.gather(*(c.chat([{"role": "user", "content": f"q{i}"}]) for i in range(20)))
            await c.aclose()
            return outs

        outs = run(go())
        assert [o.text for o in outs] == [f"echo: q{i}" for i in range(20)]
        # a second asyncio.run with the same client object still works
        assert run(c.chat(MSG)).text == "echo: say hi"
    assert c.usage["requests"] == 21


def test_api_key_from_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    assert LLMClient("m").api_key == "from-env"
    monkeypatch.delenv("OPENAI_API_KEY")
    assert LLMClient("m").api_key == "EMPTY"
    assert LLMClient("m", api_key="given").api_key == "given"


def test_llm_error_kind_validated():
    with pytest.raises(ValueError):
        LLMError("x", "nonsense")
    e = LLMError("x", "parse")
    assert not e.retryable
    import pickle

    e2 = pickle.loads(pickle.dumps(LLMError("y", "server", status=503)))
    assert e2.kind == "server" and e2.status == 503 and e2.retryable


def test_backoff_is_exponential_with_full_jitter_and_capped():
    c = LLMClient("m", backoff_base=1.0, backoff_max=10.0)
    random.seed(0)
    for attempt, ceiling in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0), (9, 10.0)]:
        waits = [c.backoff(attempt) for _ in range(400)]
        assert all(0.0 <= w <= ceiling for w in waits)
        # full jitter: spread over the whole [0, ceiling] range, not a fixed delay
        assert min(waits) < 0.1 * ceiling and max(waits) > 0.9 * ceiling
    # the server's Retry-After replaces the backoff, capped at backoff_max
    assert c.backoff(0, retry_after=3.5) == 3.5 and c.backoff(5, retry_after=0.0) == 0.0
    assert c.backoff(0, retry_after=3600.0) == 10.0


@pytest.mark.parametrize(
    "headers, seconds",
    [
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # the finer header wins
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_header_forms(headers, seconds):
    assert _retry_after_seconds(headers) == seconds


def test_retry_after_http_date():
    from email.utils import formatdate

    wait = _retry_after_seconds({"retry-after": formatdate(time.time() + 30, usegmt=True)})
    assert 25.0 <= wait <= 31.0


@pytest.mark.parametrize(
    "message, max_tokens, expected",
    [
        (  # vLLM <= 0.6 style
            "This model's maximum context length is 32768 tokens. However, you requested 32900 tokens "
            "(132 in the messages, 32768 in the completion). Please reduce the length of the messages or completion.",
            32768,
            32636,
        ),
        (  # newer vLLM style
            "'max_tokens' or 'max_completion_tokens' is too large: 32768. This model's maximum context length is "
            "32768 tokens and your request has 95 input tokens (32768 > 32768 - 95).",
            32768,
            32673,
        ),
        ("This model's maximum context length is 8192 tokens (injected)", 32768, None),  # no prompt count
        ("Rate limit reached", 32768, None),
        (  # prompt alone fills the context: nothing to retry with
            "This model's maximum context length is 100 tokens. However, you requested 300 tokens "
            "(200 in the messages, 100 in the completion).",
            100,
            None,
        ),
    ],
)
def test_fit_max_tokens(message, max_tokens, expected):
    assert fit_max_tokens(message, max_tokens) == expected

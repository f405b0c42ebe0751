"""Pure helpers of the inference stage."""

import pytest

from evaluation.stages import fit_max_tokens


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


class _ContextLimitedClient:
    """Rejects any max_tokens above `room` with vLLM's context-length 400, like a 32k-context server."""

    CTX = 32768

    def __init__(self, prompt_tokens: int, always_reject: bool = False):
        self.prompt_tokens, self.always_reject, self.asked = prompt_tokens, always_reject, []

    async def chat(self, messages, *, max_tokens, **kwargs):
        from data_gen.llm import Completion, LLMError

        self.asked.append(max_tokens)
        if self.always_reject or max_tokens > self.CTX - self.prompt_tokens:
            raise LLMError(
                f"HTTP 400: This model's maximum context length is {self.CTX} tokens. However, you requested "
                f"{self.prompt_tokens + max_tokens} tokens ({self.prompt_tokens} in the messages, {max_tokens} "
                "in the completion).",
                "bad_request",
                status=400,
            )
        return Completion("two words", "stop", self.prompt_tokens, 2)


@pytest.mark.parametrize("always_reject", [False, True])
def test_infer_retries_once_with_a_max_tokens_that_fits(tmp_path, always_reject):
    import asyncio

    from data_gen.jsonl import read_appended
    from evaluation.stages import run_infer_openai

    client = _ContextLimitedClient(prompt_tokens=100, always_reject=always_reject)
    pred = str(tmp_path / "pred.jsonl")
    items = [{"idx": 0, "prompt": "Write two words.", "length": 2}]
    stats = asyncio.run(
        run_infer_openai(items, pred, client, concurrency=1, max_new_tokens=32768, temperature=0.5)
    )
    assert client.asked == [32768, 32668]  # one second try, never a third
    if always_reject:
        assert stats.done_now == 0 and [f["kind"] for f in stats.failed] == ["bad_request"]
        assert read_appended(pred) == []
    else:
        assert stats.done_now == 1 and not stats.failed
        (row,) = read_appended(pred)
        assert row["max_tokens"] == 32668 and row["response"] == "two words" and row["response_length"] == 2

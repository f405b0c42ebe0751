"""The inference stage against a context-limited server."""

import pytest


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
def test_infer_retries_once_with_a_max_tokens_that_fits(tmp_path, always_reject, caplog):
    import asyncio

    from data_gen.jsonl import read_appended
    from evaluation.stages import run_infer_openai

    client = _ContextLimitedClient(prompt_tokens=100, always_reject=always_reject)
    pred = str(tmp_path / "pred.jsonl")
    items = [{"idx": 7, "prompt": "Write two words.", "length": 2}]
    stats = asyncio.run(
        run_infer_openai(items, pred, client, concurrency=1, max_new_tokens=32768, temperature=0.5)
    )
    assert client.asked == [32768, 32668]  # one second try, never a third
    assert "idx 7: max_tokens 32768 -> 32668 to fit the context" in caplog.text
    if always_reject:
        assert stats.done_now == 0 and [f["kind"] for f in stats.failed] == ["bad_request"]
        assert read_appended(pred) == []
    else:
        assert stats.done_now == 1 and not stats.failed
        (row,) = read_appended(pred)
        assert row["max_tokens"] == 32668 and row["response"] == "two words" and row["response_length"] == 2

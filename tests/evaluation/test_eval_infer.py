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

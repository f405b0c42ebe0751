"""count_words and length_score against the official LongWriter definitions (pred.py, eval_length.py)."""

import math
import re

import pytest

from data_gen.length import count_words, length_score
from evaluation.length import BUCKETS, bucket_of


def _official_count_words(text: str) -> int:
    # Verbatim semantics of THUDM/LongWriter evaluation/pred.py, kept as the test oracle.
    return len(re.findall(r"[\u4e00-\u9fff]", text)) + len(re.findall(r"\b[a-zA-Z]+\b", text))


def _official_score(x: float, y: float) -> float:
    # THUDM/LongWriter evaluation/eval_length.py: x = required, y = output length.
    if y > x:
        return 100 * max(0, 1.0 - (y / x - 1) / 3)
    return 100 * max(0, 1.0 - (x / y - 1) / 2)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", 0),
        ("你好世界", 4),
        ("Hello world", 2),
        ("Hello, world! 你好。", 4),  # punctuation counts nothing, CJK punctuation neither
        ("中文English混合", 4),  # ASCII run glued to ideographs has no \b: only the 4 ideographs count
        ("用 Python 写", 3),
        ("2024 年 3.14 and 42", 2),  # digits alone count nothing; 年 + "and"
        ("abc123 x1 GPT-4o", 1),  # letters glued to digits count nothing; "GPT" counts, "4o" does not
        ("café naïve résumé plain", 1),  # accented letters are \w in Unicode: whole token drops out
        ("well-known state-of-the-art", 6),  # hyphens are boundaries
        ("don't it's", 4),  # apostrophes are boundaries
        ("foo_bar snake_case ok", 1),  # underscore is \w
        ("ｆｕｌｌｗｉｄｔｈ ＡＢＣ", 0),  # full-width letters are not [a-zA-Z]
        ("ひらがな 한국어 㐀", 0),  # kana, hangul, CJK ext. A (U+3400) are outside U+4E00..U+9FFF
        ("\u4e00\u9fff", 2),  # both ends of the range
        ("line1\nline two\tthree", 3),
    ],
)
def test_count_words_cases(text, expected):
    assert count_words(text) == expected
    assert count_words(text) == _official_count_words(text)


def test_count_words_matches_official_on_random_text():
    import random

    rng = random.Random(0)
    alphabet = list("abcXYZ019_-' .,\n") + ["é", "中", "文", "。", "ß", "Ω", "\u3400", "ｆ"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert count_words(text) == _official_count_words(text), text


@pytest.mark.parametrize(
    "required, actual, expected",
    [
        (1000, 1000, 100.0),
        (1000, 1600, 80.0),  # over-long 80-point edge: a/r = 1.6
        (1400, 1000, 80.0),  # short 80-point edge: r/a = 1.4
        (1000, 2500, 50.0),
        (1000, 500, 50.0),
        (1000, 4000, 0.0),  # zero from a = 4r
        (3000, 1000, 0.0),  # zero from a = r/3
        (1000, 10000, 0.0),
        (1000, 100, 0.0),
        (1000, 0, 0.0),  # official code raises ZeroDivisionError here
    ],
)
def test_length_score_points(required, actual, expected):
    assert length_score(required, actual) == pytest.approx(expected, abs=1e-9)
    if actual > 0:
        assert length_score(required, actual) == pytest.approx(_official_score(required, actual), abs=1e-12)


def test_length_score_is_continuous_and_monotone_around_required():
    r = 2000
    below = [length_score(r, a) for a in range(700, r + 1, 50)]
    above = [length_score(r, a) for a in range(r, 8001, 50)]
    assert below == sorted(below) and above == sorted(above, reverse=True)
    assert math.isclose(length_score(r, r - 1e-9), 100.0) and math.isclose(length_score(r, r + 1e-9), 100.0)


def test_length_score_rejects_bad_input():
    with pytest.raises(ValueError):
        length_score(0, 10)
    with pytest.raises(ValueError):
        length_score(10, -1)


def test_buckets():
    assert [bucket_of(x) for x in (1, 499, 500, 1999, 2000, 3999, 4000, 20000)] == [
        "[0, 500)",
        "[0, 500)",
        "[500, 2000)",
        "[500, 2000)",
        "[2000, 4000)",
        "[2000, 4000)",
        "[4000, inf)",
        "[4000, inf)",
    ]
    assert len(BUCKETS) == 4

"""Length measure and length score (SL) of LongBench-Write, matching the official LongWriter scorer.

Official reference: THUDM/LongWriter evaluation/pred.py (``count_words``) and evaluation/eval_length.py
(``score``). Both are reproduced exactly here, with one deliberate difference documented on
``length_score``: a zero-length output scores 0 instead of raising ZeroDivisionError.
"""

from __future__ import annotations

import re

__all__ = ["count_words", "length_score", "script_language"]

# One unit per CJK unified ideograph of the basic block (U+4E00..U+9FFF). Extension A/B, compatibility
# ideographs, kana, hangul and CJK punctuation count nothing, as in the official scorer.
_CJK_RE = re.compile(r"[\u4e00-\u9fff]")
# Official pattern, unchanged: r'\b[a-zA-Z]+\b' on a str, so ``\b`` is the *Unicode* word boundary.
# Consequences that are part of the benchmark's definition (and tested):
#   - digits, underscores, accented letters and CJK ideographs are word characters, so an ASCII run glued to
#     any of them has no boundary there: "abc123" -> 0, "café" -> 0, "foo_bar" -> 0, "用Python写" -> 2 (CJK only);
#   - hyphens and apostrophes are not, so "well-known" -> 2 and "don't" -> 2;
#   - numbers alone ("2024", "3.14") count nothing.
_WORD_RE = re.compile(r"\b[a-zA-Z]+\b")


def count_words(text: str) -> int:
    """Length of ``text`` as LongBench-Write measures it: CJK ideographs + ASCII-letter words."""
    return len(_CJK_RE.findall(text)) + len(_WORD_RE.findall(text))


def script_language(text: str) -> str:
    """'zh' when CJK ideographs outnumber ASCII-letter words (evalscope's is_chinese rule), else 'en'."""
    cjk = len(_CJK_RE.findall(text))
    return "zh" if cjk > len(_WORD_RE.findall(text)) else "en"


def length_score(required: float, actual: float) -> float:
    """Piecewise-linear length score S_l in [0, 100] of an output of ``actual`` units for ``required`` units.

    Over-long: 100 * (1 - (a/r - 1) / 3), zero from a = 4r; short: 100 * (1 - (r/a - 1) / 2), zero from
    a = r/3; 80 points at a = 1.6 r and at a = r / 1.4. The official code divides by ``actual`` and crashes
    on an empty output; here ``actual == 0`` scores 0, the limit of the formula.
    """
    if required <= 0:
        raise ValueError(f"required length must be > 0, got {required!r}")
    if actual < 0:
        raise ValueError(f"actual length must be >= 0, got {actual!r}")
    if actual == 0:
        return 0.0
    if actual > required:
        return 100.0 * max(0.0, 1.0 - (actual / required - 1.0) / 3.0)
    return 100.0 * max(0.0, 1.0 - (required / actual - 1.0) / 2.0)

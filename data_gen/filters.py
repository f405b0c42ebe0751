"""Filters for LongWriter-format SFT data: required-length extraction and the length-score (SL) filter.

Two extractors of the required length stated in an instruction:

- `required_lengths` (default): digits / Chinese numerals / mixed forms before 字, "N words", "N-word",
  "10,000 words", "1万字", "1.5k words", ranges ("3000-5000字" = two lengths), "字数…N", "word count…N".
- `required_lengths_evalscope`: a re-implementation of evalscope's LongWriter data-ETL extractor
  (evalscope/third_party/longbench_write/tools/data_etl.py, strategy "no_required_length"), quirks
  included, to reproduce its published counts. data_gen/README.md lists where the two differ.

A sample is kept by the required_length strategy when its instruction yields exactly one length.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from data_gen.length import count_words, length_score

# ---------------------------------------------------------------------------------------------
# evalscope's extractor, reproduced
# ---------------------------------------------------------------------------------------------
_ES_DIGITS_ZI = re.compile(r"(\d+)字")
_ES_NUMERAL_UNIT = re.compile(r"(.)百字|(.)千字|(.)万字")
_ES_DIGITS_WORDS = re.compile(r"(\d+) words")
_ES_NUMERALS = {"零": 0, "一": 1, "二": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_ES_NUMERALS.update({"俩": 2, "两": 2})


def required_lengths_evalscope(text: str) -> list[int]:
    """Every distinct length candidate evalscope's extractor finds, as evalscope counts them.

    Its quirks are kept on purpose: digit matches are deduplicated as *strings* and numeral matches as
    ints, so "500字 … 五百字" yields [500, 500] (two candidates: dropped) and "0800字 … 800字" two as
    well; the numeral before 百/千/万 is a single character, so "1万字", "5千字", "十万字" give nothing
    and "一千五百字" gives 500; "10,000 words" gives 0 ("000"); "3000-5000字" gives 5000; `\\d`
    is Unicode, so full-width digits count. Order follows the text for the digit forms.
    """
    digit_hits = _ES_DIGITS_ZI.findall(text) + _ES_DIGITS_WORDS.findall(text)
    distinct_digits = list(dict.fromkeys(digit_hits))  # distinct strings, first-seen order
    numeral_values: list[int] = []
    for hundreds, thousands, tens_of_thousands in _ES_NUMERAL_UNIT.findall(text):
        for ch, unit in ((hundreds, 100), (thousands, 1000), (tens_of_thousands, 10000)):
            if ch and ch in _ES_NUMERALS:
                numeral_values.append(_ES_NUMERALS[ch] * unit)
    distinct_numerals = list(dict.fromkeys(numeral_values))
    return [int(s) for s in distinct_digits] + distinct_numerals


# ---------------------------------------------------------------------------------------------
# the project's extractor
# ---------------------------------------------------------------------------------------------
_CN_DIGIT = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "俩": 2, "三": 3, "四": 4, "五": 5}
_CN_DIGIT.update({"六": 6, "七": 7, "八": 8, "九": 9})
_CN_UNIT = {"十": 10, "百": 100, "千": 1000}
_ARABIC = r"\d+(?:,\d{3})+(?!\d)|\d+(?:\.\d+)?"  # 10,000 | 1.5 | 3000
_CN_NUMBER = rf"(?:{_ARABIC}|[零〇一二两俩三四五六七八九十百千万])+"
_RANGE_SEP_ZH = r"\s*(?:-|－|–|—|~|～|〜|到|至)\s*"
# 字 followed by one of these is a different word (字节 bytes, 字符 characters, 字母, 字体, 十字路口 …).
_NOT_LENGTH_AFTER_ZI = "节符母体形架路军街幕典帖画号句"
_ZH_LENGTH = re.compile(
    rf"(?:({_CN_NUMBER}){_RANGE_SEP_ZH})?({_CN_NUMBER})\s*[多余]?\s*个?字(?![{_NOT_LENGTH_AFTER_ZI}])"
)
_ZH_WORD_COUNT = re.compile(rf"字数[^\d\n零〇一二两三四五六七八九十]{{0,8}}({_CN_NUMBER})")
_EN_NUMBER = rf"(?:{_ARABIC})\s?[kK]?"
_EN_LENGTH = re.compile(
    rf"(?<![0-9A-Za-z_.,])(?:between\s+({_EN_NUMBER})\s+and\s+|({_EN_NUMBER})\s*(?:-|–|—|~|to|or)\s*)?"
    rf"({_EN_NUMBER})\s*-?\s*words?\b",
    re.IGNORECASE,
)
_EN_WORD_COUNT = re.compile(rf"\bword[\s-]?count\b[^\d\n]{{0,12}}({_EN_NUMBER})", re.IGNORECASE)


def parse_chinese_number(s: str) -> int | None:
    """Value of a number written with Arabic digits and/or Chinese numerals: "三千五百" -> 3500,
    "1.5万" -> 15000, "两万" -> 20000, "三千五" -> 3500 (colloquial), "10,000" -> 10000. None if invalid."""
    s = s.strip()
    if not s:
        return None
    tokens = re.findall(r"\d+(?:,\d{3})+(?!\d)|\d+(?:\.\d+)?|.", s)
    total = 0.0  # completed 万 groups
    section = 0.0  # value below 万
    number: float | None = None  # pending digit(s)
    last_unit = 0
    pending_from_numeral = False
    zero_gap = False
    for tok in tokens:
        if tok[0].isdigit():
            if number is not None:
                return None  # two numbers in a row
            number = float(tok.replace(",", ""))
            pending_from_numeral = False
        elif tok in "零〇" and number is None and (section or total):
            zero_gap = True  # "一千零五十": 零 only marks a skipped unit
        elif tok in _CN_DIGIT:
            if number is not None:
                return None
            number = float(_CN_DIGIT[tok])
            pending_from_numeral = True
        elif tok in _CN_UNIT:
            unit = _CN_UNIT[tok]
            if number is None and not (tok == "十" and section == 0 and total == 0):
                return None  # "百字" / "千字" alone: no stated number
            section += (1.0 if number is None else number) * unit
            number, last_unit = None, unit
        elif tok == "万":
            if number is None and section == 0:
                return None
            total += (section + (number or 0.0)) * 10000
            section, number, last_unit = 0.0, None, 10000
        else:
            return None
    if number is not None:
        # "三千五" means 3500: a lone trailing numeral counts in the next lower unit.
        if pending_from_numeral and not zero_gap and last_unit >= 100 and number < 10:
            number *= last_unit // 10
        section += number
    value = total + section
    if value <= 0 or not math.isfinite(value):
        return None
    return int(round(value))


def _en_number(s: str) -> int | None:
    s = s.strip()
    mult = 1000 if s[-1:] in "kK" else 1
    s = s.rstrip("kK").strip().replace(",", "")
    try:
        value = float(s) * mult
    except ValueError:
        return None
    return int(round(value)) if value > 0 else None


def _is_idiom(number_text: str) -> bool:
    # "一字一句", "八字", "十字": a lone single-character numeral before 字 is an idiom, not a length.
    return len(number_text) == 1 and number_text in "零〇一二两俩三四五六七八九十"


def required_lengths(text: str) -> list[int]:
    """Distinct required lengths stated in `text` (see the module docstring), in order of appearance."""
    found: list[tuple[int, int]] = []  # (position, value)
    for m in _ZH_LENGTH.finditer(text):
        for g in (1, 2):
            raw = m.group(g)
            if raw is None or _is_idiom(raw):
                continue
            value = parse_chinese_number(raw)
            if value is not None:
                found.append((m.start(g), value))
    for m in _ZH_WORD_COUNT.finditer(text):
        value = parse_chinese_number(m.group(1))
        if value is not None and not _is_idiom(m.group(1)):
            found.append((m.start(1), value))
    for m in _EN_LENGTH.finditer(text):
        for g in (1, 2, 3):
            if m.group(g) is not None:
                value = _en_number(m.group(g))
                if value is not None:
                    found.append((m.start(g), value))
    for m in _EN_WORD_COUNT.finditer(text):
        value = _en_number(m.group(1))
        if value is not None:
            found.append((m.start(1), value))
    found.sort()
    return list(dict.fromkeys(v for _, v in found))


EXTRACTORS = {"default": required_lengths, "evalscope": required_lengths_evalscope}


def required_length(text: str, extractor: str = "default") -> int | None:
    """The one required length stated in `text`, or None when there is none or more than one."""
    try:
        fn = EXTRACTORS[extractor]
    except KeyError:
        raise ValueError(f"unknown extractor {extractor!r}; choose from {sorted(EXTRACTORS)}") from None
    values = fn(text)
    return values[0] if len(values) == 1 else None


# ---------------------------------------------------------------------------------------------
# sample-level filters
# ---------------------------------------------------------------------------------------------
def first_user_message(sample: dict) -> str:
    for m in sample.get("messages", []):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    raise ValueError(f"sample without a user message: {str(sample)[:200]}")


def last_assistant_message(sample: dict) -> str:
    for m in reversed(sample.get("messages", [])):
        if m.get("role") == "assistant":
            return str(m.get("content", ""))
    raise ValueError(f"sample without an assistant message: {str(sample)[:200]}")


@dataclass
class StageReport:
    name: str
    n_in: int
    n_out: int
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in self.dropped.items() if v)
        return f"{self.name}: {self.n_in} -> {self.n_out}" + (f" (dropped {why})" if why else "")


def filter_required_length(
    samples: Iterable[dict], extractor: str = "default"
) -> tuple[list[dict], StageReport]:
    """Keep samples whose first user message states exactly one required length; set "length" to it.

    With extractor="evalscope" the message is evalscope's `messages[0]`, whatever its role."""
    if extractor not in EXTRACTORS:
        raise ValueError(f"unknown extractor {extractor!r}; choose from {sorted(EXTRACTORS)}")
    samples = list(samples)
    kept: list[dict] = []
    dropped = {"no_length": 0, "several_lengths": 0}
    for s in samples:
        text = s["messages"][0]["content"] if extractor == "evalscope" else first_user_message(s)
        values = EXTRACTORS[extractor](text)
        if len(values) == 1:
            kept.append({**s, "length": int(values[0])})
        else:
            dropped["no_length" if not values else "several_lengths"] += 1
    return kept, StageReport("required_length", len(samples), len(kept), dropped)


def filter_length_score(samples: Iterable[dict], min_score: float = 80.0) -> tuple[list[dict], StageReport]:
    """Keep samples with length_score(length, count_words(response)) >= min_score (inclusive).

    "response_length" is recomputed from the response; a sample whose required or response length is
    zero (or missing) cannot be scored: it is reported and not kept."""
    samples = list(samples)
    kept: list[dict] = []
    dropped = {"below_threshold": 0, "zero_or_missing_length": 0}
    notes: list[str] = []
    for s in samples:
        required = s.get("length")
        actual = count_words(last_assistant_message(s))
        if not required or required <= 0 or actual == 0:
            dropped["zero_or_missing_length"] += 1
            notes.append(
                f"zero/missing length: id={s.get('id')!r} length={required!r} response_length={actual}"
            )
            continue
        score = length_score(required, actual)
        if score >= min_score:
            kept.append({**s, "response_length": actual, "length_score": score})
        else:
            dropped["below_threshold"] += 1
    return kept, StageReport("length_score", len(samples), len(kept), dropped, notes)

"""AgentWrite writing plans: parse a model's plan, fill missing word counts, render it back.

The canonical line is `Paragraph N - Main Point: ... - Word Count: W words` (Chinese:
`段落N - 主要内容：... - 字数要求：W字`). Models rarely stick to it exactly, so the parser accepts:
chatter before and after the list, markdown (`**bold**`, `#` headings, list bullets), numbering as
"Paragraph 1", "Para. 1", "Section 1", "Step 1", "P1", "1.", "1)", "(1)", "第1段", "第一段", "段落1",
"段落一", full-width colons, the main point and word count on lines of their own, word counts as
"400 words", "~400", "400-500 words" (mean), "400字", "约400字", no word count at all, and the plan given
as a markdown table (`| 1 | main point | 300 |`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from data_gen.filters import parse_chinese_number

MAX_PARAGRAPHS = 50


class PlanError(ValueError):
    """The model's answer holds no usable plan."""


@dataclass
class PlanStep:
    main_point: str
    words: int | None  # None: the model gave no word count


_NUM = r"(\d+|[零〇一二两三四五六七八九十百]+)"
_EN_ORDINAL = (
    r"(?:one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|first|second|third|fourth|fifth"
    r"|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth)"
)
# A step header at the start of a line, after optional markdown (#, >, -, *, bold markers).
_HEADER = re.compile(
    r"^[\s>#*_\-•]*(?:"
    rf"(?:paragraph|para\.?|section|part|step|p)\s*{_NUM}\b"
    rf"|(?:paragraph|section|part|step)\s+{_EN_ORDINAL}\b"
    rf"|{_EN_ORDINAL}\s+paragraph\b"
    rf"|第\s*{_NUM}\s*(?:段落|段|部分|节|章)"
    rf"|段落\s*{_NUM}"
    rf"|\(\s*{_NUM}\s*\)"
    rf"|{_NUM}\s*[.)、:：](?!\d)"
    r")[\s*_]*",
    re.IGNORECASE,
)
_MAIN_POINT_LABEL = re.compile(
    r"(?:main\s*points?|key\s*points?|content|topic|主要内容|主要观点|要点|内容|主题)\s*[*_]*\s*[:：]",
    re.IGNORECASE,
)
_WORD_COUNT_LABEL = re.compile(
    r"(?:word\s*count|字数要求|字数)\s*[*_]*\s*[:：]?|length\s*[*_]*\s*[:：]", re.IGNORECASE
)
_COUNT_VALUE = r"(\d[\d,]*|[零〇一二两三四五六七八九十百千万]+)"
_COUNT = re.compile(
    rf"[~约大概左右≈]*\s*{_COUNT_VALUE}(?:\s*(?:-|–|—|~|～|to|到|至)\s*{_COUNT_VALUE})?\s*(?:words?|字|个字)?",
    re.IGNORECASE,
)
_COUNT_WITH_UNIT = re.compile(
    rf"[~约大概≈]*\s*{_COUNT_VALUE}(?:\s*(?:-|–|—|~|～|to|到|至)\s*{_COUNT_VALUE})?\s*(?:words?\b|字|个字)",
    re.IGNORECASE,
)


def _continues(body: str, line: str) -> bool:
    """Whether `line` belongs to the step whose text so far is `body`: the main point or word count on a
    line of its own, or the first line under a header with no main point yet ("Paragraph 1 - Main Point:").
    Other lines (sign-off chatter) are ignored."""
    if not _split_step(body).main_point:
        return True
    if _MAIN_POINT_LABEL.search(line) and not _MAIN_POINT_LABEL.search(body):
        return True
    return bool(_WORD_COUNT_LABEL.search(line)) and not _WORD_COUNT_LABEL.search(body)


def _count_value(raw: str) -> int | None:
    value = parse_chinese_number(raw.replace(",", ""))
    return value


def _words_from(m: re.Match) -> int | None:
    values = [v for v in (_count_value(g) for g in m.groups() if g) if v]
    if not values:
        return None
    return int(round(sum(values) / len(values)))


def _clean(text: str) -> str:
    text = re.sub(r"[*_`]{2,}", "", text)  # markdown bold / italics markers
    text = re.sub(r"[(（\[【]\s*[)）\]】]", "", text)  # what a removed "(400 words)" leaves behind
    text = re.sub(r"\s+", " ", text)
    return text.strip(" \t-–—:：|,，;；.、*")


def _split_step(body: str) -> PlanStep:
    """Main point and word count from the text of one step (header already removed)."""
    words = None
    main = body
    label = _WORD_COUNT_LABEL.search(body)
    if label is not None:
        m = _COUNT.match(body, label.end()) or _COUNT.search(body, label.end())
        if m is not None and any(m.groups()):
            words = _words_from(m)
            main = body[: label.start()] + " " + body[m.end() :]
        else:
            main = body[: label.start()]
    else:
        # No label: a trailing "(400 words)" / "- 400字" style count.
        hits = list(_COUNT_WITH_UNIT.finditer(body))
        if hits:
            m = hits[-1]
            words = _words_from(m)
            main = body[: m.start()] + " " + body[m.end() :]
    mp = _MAIN_POINT_LABEL.search(main)
    if mp is not None:
        main = main[: mp.start()] + " " + main[mp.end() :]
    return PlanStep(_clean(main), words)


_TABLE_ROW = re.compile(r"^\s*\|(.*)\|\s*$")
_TABLE_RULE = re.compile(r"^[\s:\-|]*$")
_BARE_COUNT = re.compile(  # a table cell that is only a word count: "300", "~300 words", "300-400字"
    rf"^[~约≈]*\s*{_COUNT_VALUE}(?:\s*(?:-|–|—|~|～|to|到|至)\s*{_COUNT_VALUE})?\s*(?:words?|字|个字)?$",
    re.IGNORECASE,
)


def _table_to_lines(text: str) -> str:
    """Markdown table rows `| 1 | main point | 300 |` as canonical plan lines; other lines unchanged.

    A row counts when its first cell is a step number ("1", "Paragraph 1", "段落1", "第一段"); the cell
    that is only a count is the word count, the other cells are the main point. Header and rule rows
    (no step number in the first cell) are dropped."""
    out = []
    for line in text.splitlines():
        m = _TABLE_ROW.match(line)
        if m is None:
            out.append(line)
            continue
        if _TABLE_RULE.match(line):
            continue
        cells = [_clean(c) for c in m.group(1).split("|")]
        first = f"Paragraph {cells[0]}" if cells[0].isdigit() else cells[0]
        header = _HEADER.match(first + " ")
        if not cells[0] or header is None or first[header.end() :].strip():
            continue  # the header row ("| Paragraph | Main Point | Word Count |") or a stray table
        counts = [c for c in cells[1:] if _BARE_COUNT.match(c)]
        main = " - ".join(c for c in cells[1:] if c and c not in counts[-1:])
        count = f" - Word Count: {counts[-1]}" if counts else ""
        out.append(f"{first} - Main Point: {main}{count}")
    return "\n".join(out)


def parse_plan(text: str, max_paragraphs: int = MAX_PARAGRAPHS) -> list[PlanStep]:
    """Steps of a plan in order of appearance; raises PlanError if none, or more than max_paragraphs."""
    blocks: list[list[str]] = []
    for line in _table_to_lines(text).splitlines():
        if not line.strip():
            continue
        header = _HEADER.match(line)
        if header is not None:
            blocks.append([line[header.end() :]])
        elif blocks and _continues(" ".join(blocks[-1]), line):
            blocks[-1].append(line)
    steps = []
    for block in blocks:
        step = _split_step(" ".join(block))
        if step.main_point or step.words:
            steps.append(step)
    if not steps:
        raise PlanError(f"no plan steps found in: {text[:300]!r}")
    if len(steps) > max_paragraphs:
        raise PlanError(f"plan has {len(steps)} paragraphs, more than the limit of {max_paragraphs}")
    return steps


def fill_word_counts(steps: list[PlanStep], total: int | None) -> list[PlanStep]:
    """Give steps without a word count a share of what the others leave of `total` (at least 100 each);
    without a total they stay None."""
    missing = [i for i, s in enumerate(steps) if s.words is None]
    if not missing or total is None:
        return list(steps)
    given = sum(s.words for s in steps if s.words is not None)
    share = max(100, (total - given) // len(missing))
    return [PlanStep(s.main_point, share if s.words is None else s.words) for s in steps]


def render_step(i: int, step: PlanStep, lang: str) -> str:
    """Canonical line of step i (1-based)."""
    if lang == "zh":
        line = f"段落{i} - 主要内容：{step.main_point}"
        return line + (f" - 字数要求：{step.words}字" if step.words else "")
    line = f"Paragraph {i} - Main Point: {step.main_point}"
    return line + (f" - Word Count: {step.words} words" if step.words else "")


def render_plan(steps: list[PlanStep], lang: str) -> str:
    return "\n".join(render_step(i, s, lang) for i, s in enumerate(steps, 1))

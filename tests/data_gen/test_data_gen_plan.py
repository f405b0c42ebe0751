"""The AgentWrite plan parser on messy model output, and the canonical rendering."""

import pytest

from data_gen.agentwrite import fill
from data_gen.length import script_language
from data_gen.plan import PlanError, PlanStep, fill_word_counts, parse_plan, render_plan


def steps(text, **kw):
    return [(s.main_point, s.words) for s in parse_plan(text, **kw)]


def test_canonical_form_with_chatter_around():
    text = """Sure! Here is the plan:

Paragraph 1 - Main Point: Introduce the river and why it matters - Word Count: 400 words
Paragraph 2 - Main Point: History of the dams - Word Count: 600 words

Let me know if you want changes. Total word count: 1000 words"""
    assert steps(text) == [("Introduce the river and why it matters", 400), ("History of the dams", 600)]


def test_markdown_bold_and_headings():
    text = """**Paragraph 1** - **Main Point**: Intro to AI - **Word Count**: 300 words
## **Paragraph 2** - **Main Point**: Risks of AI - **Word Count**: ~500 words"""
    assert steps(text) == [("Intro to AI", 300), ("Risks of AI", 500)]


@pytest.mark.parametrize(
    "header",
    [
        "Paragraph 1",
        "Paragraph 1:",
        "Paragraph 1.",
        "Para 1",
        "Section 1",
        "Step 1",
        "P1",
        "1.",
        "1)",
        "(1)",
        "- 1.",
    ],
)
def test_numbering_variants(header):
    text = f"{header} Main Point: the opening scene - Word Count: 250 words\n{header.replace('1', '2')} Main Point: the end - Word Count: 350 words"
    assert steps(text) == [("the opening scene", 250), ("the end", 350)]


def test_missing_word_counts_and_unlabelled_counts():
    text = """1. Introduction to the city (300 words)
2) Its food culture - 400 words
(3) Conclusion"""
    assert steps(text) == [("Introduction to the city", 300), ("Its food culture", 400), ("Conclusion", None)]


def test_fields_on_their_own_lines_and_ranges():
    text = """### Paragraph 1
- Main Point: The origins of tea
- Word Count: 400-600 words

### Paragraph 2
- Main Point: Tea in Britain
- Word Count: 450 words

I hope this plan works for you."""
    assert steps(text) == [("The origins of tea", 500), ("Tea in Britain", 450)]


def test_main_point_on_the_next_line_and_word_numbering():
    text = """Paragraph One - Main Point:
The founding of the city
Word Count: 300 words
Paragraph Two - Main Point: Its decline - Word Count: 200 words
Third paragraph: The revival (250 words)
Some closing remark."""
    assert steps(text) == [("The founding of the city", 300), ("Its decline", 200), ("The revival", 250)]


def test_chinese_forms():
    text = """好的，以下是写作计划：
段落1 - 主要内容：介绍故宫的历史 - 字数要求：500字
段落2 - 主要内容：建筑特色 - 字数要求：约800字
第三段：总结与展望，字数：300字
第4段 - 结尾（200字）
段落五 - 主要内容：后记
一、附录（100字）"""
    assert steps(text) == [
        ("介绍故宫的历史", 500),
        ("建筑特色", 800),
        ("总结与展望", 300),
        ("结尾", 200),
        ("后记", None),
        ("附录", 100),
    ]


def test_chinese_colon_and_dashes():
    text = "Step 1 – Main Point：Chinese colon here – Word Count：700 words\nStep 2 — Main Point: more — Word Count: 1,200 words"
    assert steps(text) == [("Chinese colon here", 700), ("more", 1200)]


def test_word_length_inside_main_point_is_not_a_count():
    assert steps("Paragraph 1 - Main Point: Discuss the length of the Nile - Word Count: 300 words") == [
        ("Discuss the length of the Nile", 300)
    ]
    assert steps("Paragraph 1 - Main Point: AI (and ML) today (250 words)") == [("AI (and ML) today", 250)]


def test_markdown_table_plans():
    en = """Here is the plan:

| # | Title | Main Point | Words |
|:-:|---|---|---|
| 1 | Opening | Set the scene | ~250 |
| Paragraph 2 | Close | Wrap up, with 3 lessons | 300-400 words |

Total: 650 words"""
    assert steps(en) == [("Opening - Set the scene", 250), ("Close - Wrap up, with 3 lessons", 350)]
    zh = "| 段落 | 主要内容 | 字数 |\n| --- | --- | --- |\n| 段落1 | 引言 | 300字 |\n| 第二段 | 结论 |  |"
    assert steps(zh) == [("引言", 300), ("结论", None)]
    # a table that is not a plan (no step numbers) gives nothing
    with pytest.raises(PlanError):
        parse_plan("| Name | Value |\n|---|---|\n| a | 300 |")


def test_unusable_plans_raise():
    with pytest.raises(PlanError):
        parse_plan("I'm sorry, I can't help with that.")
    with pytest.raises(PlanError):
        parse_plan("")
    many = "\n".join(f"Paragraph {i} - Main Point: p{i} - Word Count: 200 words" for i in range(1, 52))
    with pytest.raises(PlanError, match="more than the limit"):
        parse_plan(many)
    assert len(parse_plan(many, max_paragraphs=60)) == 51


def test_fill_word_counts_and_render():
    s = [PlanStep("a", 300), PlanStep("b", None), PlanStep("c", None)]
    assert [x.words for x in fill_word_counts(s, 1000)] == [300, 350, 350]
    assert [x.words for x in fill_word_counts(s, 200)] == [300, 100, 100]  # never below 100
    assert [x.words for x in fill_word_counts(s, None)] == [300, None, None]
    assert render_plan(s[:2], "en") == (
        "Paragraph 1 - Main Point: a - Word Count: 300 words\nParagraph 2 - Main Point: b"
    )
    assert render_plan(s[:1], "zh") == "段落1 - 主要内容：a - 字数要求：300字"
    # a rendered plan parses back to itself
    assert steps(render_plan(s[:1] * 3, "zh")) == [("a", 300)] * 3


def test_language_detection_and_template_fill():
    assert script_language("写一篇关于 Python 的文章") == "zh"
    assert script_language("Write about 长城 in English please") == "en"
    # braces inside values are left alone, and values are not substituted into each other
    assert fill("{a}|{b}|{c}", a="{b}", b="x {y}") == "{b}|x {y}|{c}"

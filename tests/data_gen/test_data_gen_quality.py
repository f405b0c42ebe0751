"""Judge reply parser, prompt rendering and the SQ aggregate (official LongWriter and evalscope variants)."""

import pytest

from data_gen.quality import (
    DIMENSIONS,
    aggregate_quality,
    load_judge_template,
    parse_judge_output,
    render_judge_prompt,
)

EXPECTED = {
    "Relevance": 4,
    "Accuracy": 5,
    "Coherence": 3,
    "Clarity": 4,
    "Breadth and Depth": 2,
    "Reading Experience": 3,
}
CLEAN = (
    '{"Analysis": "Solid.", "Relevance": 4, "Accuracy": 5, "Coherence": 3, "Clarity": 4, '
    '"Breadth and Depth": 2, "Reading Experience": 3}'
)

MESSY = {
    "clean": CLEAN,
    "json_fence": "```json\n" + CLEAN + "\n```",
    "bare_fence_with_prose": "Here is my evaluation.\n```\n" + CLEAN + "\n```\nHope this helps!",
    "fence_no_newline": "```json" + CLEAN + "```",
    "prose_around": "My analysis follows. " + CLEAN + " That is all.",
    "trailing_commas": CLEAN[:-1] + ",\n}",
    "scores_as_strings": (
        '{"Analysis": "x", "Relevance": "4", "Accuracy": "5/5", "Coherence": "3 points", "Clarity": " 4 ",'
        ' "Breadth and Depth": "2", "Reading Experience": "3"}'
    ),
    "newlines_in_analysis": '{"Analysis": "line one\nline two\n", ' + CLEAN[CLEAN.index('"Relevance"') :],
    "unescaped_quotes_in_analysis": (
        '{"Analysis": "The "story" is fine, {mostly}", "Relevance": 4, "Accuracy": 5, "Coherence": 3,'
        ' "Clarity": 4, "Breadth and Depth": 2, "Reading Experience": 3}'
    ),
    "single_quotes": (
        "{'Analysis': 'ok', 'Relevance': 4, 'Accuracy': 5, 'Coherence': 3, 'Clarity': 4,"
        " 'Breadth and Depth': 2, 'Reading Experience': 3}"
    ),
    "chinese_keys_fullwidth": (
        '{"分析"：“很好”，"相关性"：4，"准确性"：5，"连贯性"：3，"清晰度"：4，"广度和深度"：2，"阅读体验"：3}'
    ),
    "snake_and_lower_keys": (
        '{"relevance": 4, "accuracy": 5, "coherence": 3, "clarity": 4, "breadth_and_depth": 2,'
        ' "reading_experience": 3}'
    ),
    "nested_scores_objects": (
        '{"analysis": "..", "scores": {"Relevance": {"score": 4, "reason": "on topic"}, "Accuracy": 5,'
        ' "Coherence": 3, "Clarity": 4, "Breadth & Depth": 2, "Reading Experience": 3}}'
    ),
    "markdown_list": (
        "**Analysis**: decent.\n- **Relevance**: 4\n- **Accuracy**: 5\n- **Coherence**: 3\n"
        "- **Clarity**: 4/5\n- **Breadth and Depth**: 2\n- **Reading Experience**: 3"
    ),
    "two_objects_last_wins_not_needed": '{"note": "draft"}\n' + CLEAN,
    "floats_integral": CLEAN.replace(": 4,", ": 4.0,"),
}


@pytest.mark.parametrize("name", sorted(MESSY))
def test_parse_messy_judge_outputs(name):
    assert parse_judge_output(MESSY[name]) == EXPECTED


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "I cannot evaluate this.",
        '{"Relevance": 4, "Accuracy": 5}',  # dimensions missing
        CLEAN.replace('"Clarity": 4', '"Clarity": 7'),  # out of range
        CLEAN.replace('"Clarity": 4', '"Clarity": 0'),
        CLEAN.replace('"Clarity": 4', '"Clarity": "N/A"'),
        CLEAN.replace('"Clarity": 4', '"Clarity": true'),
        CLEAN.replace('"Clarity": 4', '"Clarity": 4.5'),  # not an integer: the judge is asked again
        CLEAN.replace('"Clarity": 4', '"Clarity": "3.5/5"'),
        "```json\n{broken\n```",
    ],
)
def test_parse_rejects_unusable_outputs(text):
    assert parse_judge_output(text) is None


def test_render_judge_prompt_single_pass():
    template = "Q: $INST$\nA: $RESPONSE$"
    # A "$RESPONSE$" inside the user's request must not be replaced by the response.
    assert render_judge_prompt(template, "say $RESPONSE$", "hi $INST$") == "Q: say $RESPONSE$\nA: hi $INST$"


def test_project_judge_template_has_placeholders_and_dimensions():
    t = load_judge_template()
    assert t.count("$INST$") == 1 and t.count("$RESPONSE$") == 1
    for dim in DIMENSIONS:
        assert f'"{dim}"' in t


def test_aggregate_quality_official_and_evalscope():
    all5 = dict.fromkeys(DIMENSIONS, 5)
    all1 = dict.fromkeys(DIMENSIONS, 1)
    q = aggregate_quality([all5, all1, EXPECTED])
    # per dimension: (mean - 1) * 25; SQ = mean of the six
    assert q["dimensions"]["Accuracy"] == pytest.approx(((5 + 1 + 5) / 3 - 1) * 25)
    assert q["score_q"] == pytest.approx(sum(q["dimensions"].values()) / 6)
    assert q["n_scored"] == 3 and q["n_missing"] == 0

    excl = aggregate_quality([all5, None])
    assert excl["score_q"] == pytest.approx(100.0) and excl["n_missing"] == 1 and excl["n_scored"] == 1
    as3 = aggregate_quality([all5, None], missing="as_3")
    assert as3["score_q"] == pytest.approx(((5 + 3) / 2 - 1) * 25)  # 75
    assert aggregate_quality([None])["score_q"] is None
    with pytest.raises(ValueError):
        aggregate_quality([all5], missing="zero")

"""Scoring and pair selection of data_gen.pairs on hand-made samples (numbers worked out by hand)."""

import pytest

from data_gen.pairs import choose_pair, distribution, pair_row, score_sample, summarize
from data_gen.quality import DIMENSIONS

QUALITY = dict(zip(DIMENSIONS, (4, 5, 3, 4, 2, 3)))  # (mean 3.5 - 1) x 25 = 62.5


def words(n: int) -> str:
    return " ".join(["word"] * n)


@pytest.mark.parametrize(
    "score, required, quality, expected",
    [
        ("mean", 1000, QUALITY, (80.0 + 62.5) / 2),  # 1600 words for 1000: S_L = 100 (1 - 0.6 / 3) = 80
        ("length", 1000, QUALITY, 80.0),
        ("quality", 1000, QUALITY, 62.5),
        ("mean", None, QUALITY, 62.5),  # no required length: quality alone
        ("length", None, QUALITY, None),
        ("mean", 1000, None, None),  # not judged: cannot be ranked
    ],
)
def test_score_sample(score, required, quality, expected):
    s = score_sample(3, words(1600), "stop", required, quality, score)
    assert s["k"] == 3 and s["response_length"] == 1600 and s["finish_reason"] == "stop"
    assert s["score_l"] == (pytest.approx(80.0) if required else None)
    assert s["score_q"] == (pytest.approx(62.5) if quality else None)
    assert s["score"] == (None if expected is None else pytest.approx(expected))
    with pytest.raises(ValueError, match="score must be one of"):
        score_sample(0, "x", "stop", 10, None, "sum")


def sample(k: int, score: float, finish: str = "stop") -> dict:
    return {"k": k, "score": score, "finish_reason": finish}


def test_choose_pair_ties_truncation_and_draw():
    # ties for the best: the lowest index; the rejected is any other, drawn from the seed string alone
    tied = [sample(0, 50), sample(1, 70), sample(2, 70), sample(3, 10)]
    picks = {choose_pair(tied, f"42|item{i}") for i in range(60)}
    assert {c for c, _ in picks} == {1} and {r for _, r in picks} == {0, 2, 3}
    assert choose_pair(tied, "42|item7") == choose_pair(list(reversed(tied)), "42|item7")  # order-free
    # a truncated sample is never chosen, even when it scores best; it may be rejected, or is dropped
    cut = [sample(0, 90, "length"), sample(1, 60), sample(2, 40)]
    assert {choose_pair(cut, f"s{i}")[0] for i in range(20)} == {1}
    assert {choose_pair(cut, f"s{i}")[1] for i in range(40)} == {0, 2}
    assert {choose_pair(cut, f"s{i}", "drop") for i in range(20)} == {(1, 2)}
    assert "cut off" in choose_pair([sample(0, 90, "length"), sample(1, 60, "length")], "s")
    assert "no sample to reject" in choose_pair([sample(0, 90, "length"), sample(1, 60)], "s", "drop")
    with pytest.raises(ValueError, match="truncated policy"):
        choose_pair(tied, "s", "keep")


def test_pair_row_is_the_ms_swift_format():
    convo = [{"role": "system", "content": "sys"}, {"role": "user", "content": "write"}]
    samples = [sample(0, 30.0), sample(1, 80.0)]
    row = pair_row("a", convo, 500, {0: "bad", 1: "good"}, samples, 1, 0, score="mean")
    assert row["messages"] == convo + [{"role": "assistant", "content": "good"}]
    assert row["rejected_response"] == "bad" and row["id"] == "a" and row["length"] == 500
    assert row["preference"] | {"samples": None} == {
        "score": "mean",
        "chosen": 1,
        "rejected": 0,
        "margin": 50.0,
        "samples": None,
    }
    assert convo == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "write"},
    ]  # not mutated


def test_distribution_and_summary():
    d = distribution([5.0, None, 1.0, 3.0, 2.0, 4.0])
    assert d == {"n": 5, "mean": 3.0, "min": 1.0, "p10": 1.0, "p50": 3.0, "p90": 5.0, "max": 5.0}
    assert distribution([None]) == {"n": 0}
    full = lambda k, s, f="stop": (
        {"k": k, "score": s, "finish_reason": f, "score_l": None, "score_q": s} | {"response_length": 10 * k}
    )
    rows = [
        pair_row("a", [], None, {0: "x", 1: "y"}, [full(0, 20.0), full(1, 60.0)], 1, 0),
        pair_row("b", [], 100, {0: "x", 1: "y"}, [full(0, 50.0), full(1, 50.0, "length")], 0, 1),
    ]
    s = summarize(rows, [{"kind": "no_pair"}, {"kind": "server"}, {"kind": "server"}])
    assert (s["pairs"], s["failed"], s["failed_by_kind"]) == (2, 3, {"no_pair": 1, "server": 2})
    assert (s["pairs_without_length"], s["samples"], s["truncated_samples"], s["truncated_rejected"]) == (
        1,
        4,
        1,
        1,
    )
    assert s["zero_margin_pairs"] == 1 and s["margin"]["mean"] == 20.0
    assert s["score"]["chosen"]["mean"] == 55.0 and s["score"]["rejected"]["mean"] == 35.0
    assert s["response_length"]["all"]["max"] == 10

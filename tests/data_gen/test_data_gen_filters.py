"""Required-length extractors (ours and evalscope's), the length-score filter and the filter CLI."""

import json

import pytest

from data_gen import filter as filter_cli
from data_gen.filters import (
    filter_length_score,
    filter_required_length,
    parse_chinese_number,
    required_length,
    required_lengths,
    required_lengths_evalscope,
)
from data_gen.length import length_score


@pytest.mark.parametrize(
    "text,ours,evalscope",
    [
        ("写一篇800字的文章", [800], [800]),
        ("写一篇三千字的文章", [3000], [3000]),
        ("写一篇两千字的散文", [2000], [2000]),
        ("写一篇五百字的短文", [500], [500]),
        ("写一篇1万字的小说", [10000], []),  # evalscope: "1" is not a numeral
        ("写一篇5千字的报告", [5000], []),
        ("写一篇十万字的长篇", [100000], []),  # 十 is not in evalscope's table
        ("写一篇一千五百字左右的文章", [1500], [500]),  # evalscope reads only the char before 百
        ("写三千五百字", [3500], [500]),
        ("写一篇1.5万字的故事", [15000], []),
        ("写两千多字", [2000], []),
        ("字数要求：3000字", [3000], [3000]),
        ("字数不少于2000", [2000], []),
        ("写一篇１０００字的作文", [1000], [1000]),  # full-width digits: \d is Unicode
        ("3000-5000字", [3000, 5000], [5000]),  # a range: two lengths for us, the upper one for evalscope
        ("500字 五百字", [500], [500, 500]),  # evalscope dedups digit strings and numeral ints apart
        ("0800字，800字", [800], [800, 800]),
        ("一字一句地写800字", [800], [800]),  # 一字 is an idiom
        ("十字路口，写500字", [500], [500]),
        ("文件大小8字节", [], [8]),  # 字节 = bytes
        ("Write a 5000 words essay", [5000], [5000]),
        ("Write a 3,000-word essay", [3000], []),
        ("Write 10,000 words about Rome", [10000], [0]),  # evalscope reads "000"
        ("Write a 2000-word story", [2000], []),
        ("I need 2000 Words.", [2000], []),  # evalscope is case-sensitive
        ("write a 1.5k word story", [1500], []),
        ("Write between 1500 and 2000 words", [1500, 2000], [2000]),
        ("Write 1500-2000 words", [1500, 2000], [2000]),
        ("Word count: 1200", [1200], []),
        ("Write a poem", [], []),
        ("Write an essay of 800 words, then a 300-word summary", [800, 300], [800]),
        ("写一篇关于千字文的介绍", [], []),  # no stated number
    ],
)
def test_extractors(text, ours, evalscope):
    assert required_lengths(text) == ours
    assert sorted(required_lengths_evalscope(text)) == sorted(evalscope)


def test_required_length_needs_exactly_one():
    assert required_length("写800字") == 800
    assert required_length("3000-5000字") is None
    assert required_length("3000-5000字", "evalscope") == 5000
    assert required_length("nothing") is None
    with pytest.raises(ValueError, match="unknown extractor"):
        required_length("x", "nope")


@pytest.mark.parametrize(
    "s,v",
    [("三千", 3000), ("一万五千", 15000), ("一万五", 15000), ("三千五", 3500), ("二十", 20), ("十五", 15)]
    + [
        ("两万", 20000),
        ("1.5万", 15000),
        ("10,000", 10000),
        ("一千零五十", 1050),
        ("三千零五", 3005),
        ("百", None),
        ("千", None),
    ],
)
def test_parse_chinese_number(s, v):
    assert parse_chinese_number(s) == v


def sample(prompt, response, length=None, system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": response},
    ]
    s = {"messages": msgs}
    if length is not None:
        s["length"] = length
    return s


def test_filter_required_length_sets_length_and_reports():
    data = [
        sample("写800字", "x"),
        sample("写3000-5000字", "x"),
        sample("hi", "x"),
        sample("Write 10,000 words", "x"),
    ]
    kept, rep = filter_required_length(data)
    assert [s["length"] for s in kept] == [800, 10000]
    assert (rep.n_in, rep.n_out, rep.dropped) == (4, 2, {"no_length": 1, "several_lengths": 1})
    kept, rep = filter_required_length(data, "evalscope")
    assert [s["length"] for s in kept] == [800, 5000, 0]  # "10,000 words" -> 0 under evalscope
    assert "length" not in data[0]  # inputs are not modified


def test_evalscope_reads_messages_0_whatever_its_role():
    s = sample("写800字", "x", system="你是一个助手，回答不超过300字")
    assert filter_required_length([s])[0][0]["length"] == 800  # ours: the first *user* message
    assert filter_required_length([s], "evalscope")[0][0]["length"] == 300  # evalscope: messages[0]


def words(n):
    return " ".join(["word"] * n)


def test_length_score_threshold_is_inclusive():
    # 1600 words for 1000 required is exactly 80 (over-long side), 1000 for 1400 exactly 80 (short side)
    assert length_score(1000, 1600) == 80.0 and length_score(1400, 1000) == 80.0
    assert 79.98 < length_score(10000, 16003) < 80.0
    data = [
        sample("p", words(1600), 1000),
        sample("p", words(1000), 1400),
        sample("p", words(16003), 10000),  # 79.99
        sample("p", words(1001), 1402),  # just under on the short side
        sample("p", words(1000), 1000),
    ]
    kept, rep = filter_length_score(data, 80)
    assert [(s["length"], s["response_length"]) for s in kept] == [(1000, 1600), (1400, 1000), (1000, 1000)]
    assert rep.dropped["below_threshold"] == 2


def test_zero_lengths_are_reported_not_kept():
    data = [
        sample("p", words(10), 0),
        sample("p", "", 100),
        sample("p", words(5)),
        sample("p", words(100), 100),
    ]
    kept, rep = filter_length_score(data, 80)
    assert len(kept) == 1
    assert rep.dropped["zero_or_missing_length"] == 3 and len(rep.notes) == 3


def test_filter_cli_counts_and_plot(tmp_path, capsys):
    rows = [
        sample("写一篇800字的文章", "字" * 800),
        sample("写一篇800字的文章", "字" * 100),  # SL too low
        sample("Write a 500-word essay", words(520)),
        sample("Write an essay", words(520)),  # no length
        sample("写3000-5000字", "字" * 4000),  # two lengths
    ]
    inp, out = tmp_path / "data.jsonl", tmp_path / "filtered.jsonl"
    inp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    rc = filter_cli.main(
        ["--input", str(inp), "--output", str(out), "--strategy", "required_length"]
        + ["--strategy", "length_score", "--min_length_score", "80"]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "input: 5 samples" in printed
    assert "required_length: 5 -> 3" in printed and "length_score: 3 -> 2" in printed
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(k["length"], k["response_length"]) for k in kept] == [(800, 800), (500, 520)]
    png = tmp_path / "filtered.length_scatter.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "3 points before, 2 after" in printed  # before = what the length-score stage saw


def test_filter_cli_evalscope_extractor(tmp_path, capsys):
    rows = [
        sample("写一篇800字的文章", "字" * 800),
        sample("写一篇1万字的小说", "字" * 10000),  # evalscope: no length ("1" is not a numeral)
        sample("写3000-5000字", "字" * 4000),  # evalscope: 5000 (the last number of the range)
        sample("Write 10,000 words about Rome", words(10000)),  # evalscope: 0 -> reported, not kept
        sample("写一篇一千五百字的文章", "字" * 500),  # evalscope: 500
    ]
    inp, out = tmp_path / "data.jsonl", tmp_path / "es.jsonl"
    inp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    argv = ["--input", str(inp), "--output", str(out), "--extractor", "evalscope"]
    assert filter_cli.main(argv + ["--strategy", "required_length", "--strategy", "length_score"]) == 0
    printed = capsys.readouterr().out
    assert "required_length: 5 -> 4 (dropped no_length: 1)" in printed
    assert "length_score: 4 -> 3 (dropped zero_or_missing_length: 1)" in printed
    assert "zero/missing length" in printed and "length=0" in printed
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(k["length"], k["response_length"]) for k in kept] == [(800, 800), (5000, 4000), (500, 500)]
    # the default extractor keeps a different set from the same file
    assert filter_cli.main(["--input", str(inp), "--output", str(out)]) == 0
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [k["length"] for k in kept] == [800, 10000, 10000]


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "data.jsonl:2: not a JSON object"),
        ('{"prompt": "x"}', "data.jsonl:2: expected a LongWriter row"),
        ('{"messages": [{"role": "user", "content": "写800字"}]}', "sample without an assistant message"),
    ],
)
def test_filter_cli_bad_rows_exit_2(tmp_path, capsys, line, message):
    inp = tmp_path / "data.jsonl"
    inp.write_text(json.dumps(sample("写800字", "字" * 800), ensure_ascii=False) + "\n" + line + "\n")
    assert filter_cli.main(["--input", str(inp), "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "o.jsonl").exists()

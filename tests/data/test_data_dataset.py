import json
import logging
import os

import numpy as np
import pytest

import engine.data.dataset as dataset_mod
from engine.data import build_dataset, load_tokenizer, split_dataset

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "data", "longwriter_demo.jsonl")


def row(q="Write about tea.", a="Tea is a drink.", **extra):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **extra}


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("debug-qwen2")


BAD_ROWS = [
    ('{"messages": [', "'<json>'", "malformed JSON"),
    (
        {"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]},
        "messages[0].role",
        "missing role",
    ),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role", "unknown role"),
    (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]},
        "messages[1].content",
        "string",
    ),
    (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
        "messages[1].content",
        "empty assistant",
    ),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages[0].role", "must end with an assistant"),
    (
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": None}]},
        "conversations[1].value",
        "string",
    ),
    (
        {"system": "s", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
        "conversations[1].value",
        "empty",
    ),
    (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "x"}]},
        "conversations[1].from",
        "expected role",
    ),
    ({"query": "hi"}, "response", "missing"),
    ({"query": "q", "response": "a", "history": [["q0", ""]]}, "history[0][1]", "empty assistant"),
    ({"query": "q", "response": "a", "history": [["q0", "a0"], [3, "a1"]]}, "history[1][0]", "string"),
    ({"text": "no conversation"}, "messages", "none of"),
]


@pytest.mark.parametrize("bad,field,what", BAD_ROWS)
def test_bad_row_error_names_file_line_field(tmp_path, tok, bad, field, what):
    path = write_jsonl(tmp_path / "d.jsonl", [row(), row(), bad, row()])
    with pytest.raises(ValueError) as e:
        build_dataset([path], tok, max_length=512, seed=0)
    msg = str(e.value)
    assert f"{path}:3:" in msg and field.strip("'") in msg and what in msg


def test_non_utf8_line_names_file_and_line(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    good = json.dumps(row()).encode()
    path.write_bytes(
        b"\xef\xbb\xbf" + good + b"\n" + good + b"\n" + b'{"messages": "\xff\xfe"}\n' + good + b"\n"
    )
    with pytest.raises(ValueError, match=f"{path}:3: field '<json>': not UTF-8"):
        build_dataset([str(path)], tok, max_length=512, seed=0)
    ds = build_dataset([str(path)], tok, max_length=512, seed=0, check_dataset_strategy="warning")
    assert len(ds) == 3 and ds.report["invalid"] == 1  # the BOM of line 1 is not an error


def test_warning_strategy_skips_counts_and_logs(tmp_path, tok, caplog):
    rows = [row(a=f"reply {i}") for i in range(5)]
    for k, (bad, _, _) in enumerate(BAD_ROWS):
        rows.insert(2 * k + 1, bad)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="engine.data.dataset"):
        ds = build_dataset([path], tok, max_length=512, seed=0, check_dataset_strategy="warning")
    assert len(ds) == 5
    assert ds.report["invalid"] == len(BAD_ROWS) and ds.report["rows"] == 5 + len(BAD_ROWS)
    assert len(ds.report["errors"]) == len(BAD_ROWS) and all(path in m for m in ds.report["errors"])
    assert f"invalid rows skipped {len(BAD_ROWS)}" in ds.summary() and f"{path}:2:" in ds.summary()
    assert sum("skipping row" in r.message for r in caplog.records) == len(BAD_ROWS)
    assert [ds.metadata(i)["_line"] for i in range(len(ds))] == [1, 3, 5, 7, 9]


def test_over_long_delete_and_truncate(tmp_path, tok):
    rows = [row(a="x" * 50), row(a="y" * 400), row(q="q" * 400, a="z" * 10), row(a="w" * 20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = build_dataset([path], tok, max_length=200, seed=0)
    assert len(ds) == 2 and ds.report["over_length"] == 2 and ds.report["over_length_deleted"] == 2
    assert "over max_length 2: deleted 2, truncated 0" in ds.summary()  # the line train.py prints
    ds = build_dataset([path], tok, max_length=200, seed=0, truncation_strategy="truncate")
    # Row 3's reply starts after token 200: nothing left to train, dropped and counted.
    assert len(ds) == 3 and ds.report["truncated"] == 1 and ds.report["over_length_deleted"] == 1
    assert ds.lengths.max() == 200
    ids, labels = ds.arrays(int(np.argmax(ds.lengths)))
    assert len(ids) == 200 and labels[-1] == -100 and (labels != -100).any()


def test_mixing_specs_sample_deterministically(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", [row(a=f"a{i}") for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [row(a=f"b{i}", length=i) for i in range(4)])
    ds = build_dataset([a, f"{b}#10", f"{a}#3"], tok, max_length=512, seed=1)
    assert len(ds) == 10 + 10 + 3
    replies = [ds.messages(i)[-1]["content"] for i in range(len(ds))]
    b_part = replies[10:20]
    # 10 rows from 4: every row twice, plus 2 distinct extra rows.
    counts = {f"b{i}": b_part.count(f"b{i}") for i in range(4)}
    assert sorted(counts.values()) == [2, 2, 3, 3]
    assert len(set(replies[20:])) == 3 and all(r.startswith("a") for r in replies[20:])
    again = build_dataset([a, f"{b}#10", f"{a}#3"], tok, max_length=512, seed=1)
    assert [again.messages(i)[-1]["content"] for i in range(len(again))] == replies
    other = build_dataset([a, f"{b}#10", f"{a}#3"], tok, max_length=512, seed=2)
    assert [other.messages(i)[-1]["content"] for i in range(len(other))] != replies
    assert ds.metadata(10)["length"] == int(b_part[0][1:])  # extra fields kept as metadata
    assert ds.report["specs"][1] == {"spec": f"{b}#10", "samples": 10}


def test_lazy_matches_eager_and_caches_lengths(tmp_path, tok, monkeypatch):
    eager = build_dataset([DEMO], tok, max_length=1024, seed=0)
    cache = tmp_path / "cache"
    lazy = build_dataset([DEMO], tok, max_length=1024, seed=0, lazy_tokenize=True, cache_dir=str(cache))
    assert lazy.lazy and not eager.lazy
    np.testing.assert_array_equal(lazy.lengths, eager.lengths)
    for i in range(0, len(eager), 7):
        assert lazy[i] == eager[i]
    assert len(os.listdir(cache)) == 1

    # Second build: lengths come from the cache, nothing is tokenized up front.
    def boom(*a, **k):
        raise AssertionError("tokenized despite the cache")

    monkeypatch.setattr(dataset_mod, "_measure", boom)
    again = build_dataset([DEMO], tok, max_length=1024, seed=0, lazy_tokenize=True, cache_dir=str(cache))
    np.testing.assert_array_equal(again.lengths, eager.lengths)
    # Another vocabulary, or the same one with another template (however it was set), gets its own entry.
    monkeypatch.undo()
    other_template = load_tokenizer("debug-qwen2", template="chatml")
    assigned = load_tokenizer("debug-qwen2")
    fingerprint = assigned.fingerprint
    assigned.chat_template = other_template.chat_template
    assert assigned.fingerprint == other_template.fingerprint != fingerprint == tok.fingerprint
    for other in (load_tokenizer("debug-glm4"), other_template):
        build_dataset([DEMO], other, max_length=1024, seed=0, lazy_tokenize=True, cache_dir=str(cache))
    assert len(os.listdir(cache)) == 3
    # A changed file (same path) is a new key: its lengths are measured again, never read stale.
    changed = tmp_path / "demo.jsonl"
    changed.write_bytes(open(DEMO, "rb").read())
    build_dataset([str(changed)], tok, max_length=1024, seed=0, lazy_tokenize=True, cache_dir=str(cache))
    assert len(os.listdir(cache)) == 3  # same content as DEMO, other path: the same entry
    with open(changed, "a", encoding="utf-8") as f:
        f.write(json.dumps(row(a="one more reply")) + "\n")
    more = build_dataset(
        [str(changed)], tok, max_length=1024, seed=0, lazy_tokenize=True, cache_dir=str(cache)
    )
    assert len(os.listdir(cache)) == 4 and len(more) == len(eager) + 1


def test_split_dataset(tok):
    ds = build_dataset([DEMO], tok, max_length=4096, seed=0)
    train, val = split_dataset(ds, 0.1, seed=3)
    assert len(val) == round(len(ds) * 0.1) and len(train) + len(val) == len(ds)
    t_lines = {train.metadata(i)["_line"] for i in range(len(train))}
    v_lines = {val.metadata(i)["_line"] for i in range(len(val))}
    assert not t_lines & v_lines and len(t_lines | v_lines) == len(ds)
    assert split_dataset(ds, 0.1, seed=3)[1].lengths.tolist() == val.lengths.tolist()
    with pytest.raises(ValueError):
        split_dataset(ds, 1.5, seed=0)


def test_demo_dataset_is_well_formed():
    assert os.path.getsize(DEMO) < 300_000
    for name in ("debug-qwen2", "debug-glm4"):
        ds = build_dataset([DEMO], load_tokenizer(name), max_length=4096, seed=0)
        assert 60 <= len(ds) <= 120 and ds.report["invalid"] == 0
        langs = {
            any("\u4e00" <= ch <= "\u9fff" for ch in ds.messages(i)[-1]["content"]) for i in range(len(ds))
        }
        assert langs == {True, False}

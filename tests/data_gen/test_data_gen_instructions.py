"""The instruction reader shared by AgentWrite and the preference sampler: prompt and messages rows."""

import json
import re

import pytest

from data_gen import agentwrite, preference
from data_gen.instructions import read_instructions


def write(path, rows):
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)
    )
    return path


def test_prompt_and_messages_rows(tmp_path):
    sft_row = {
        "messages": [{"role": "user", "content": "写一篇2000字的散文"}, {"role": "assistant", "content": "x"}]
    }
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a 300-word poem"}]
    f = write(
        tmp_path / "in.jsonl",
        [
            {"prompt": "Write about rivers", "length": 800, "id": 7},
            sft_row,
            {"messages": chat, "extra": 1},
            {"prompt": "Write about rivers"},
        ],
    )
    a, b, c, d = read_instructions(f)
    assert (a.id, a.length, a.length_source, a.messages) == (
        "7",
        800,
        "given",
        [chat[1] | {"content": a.prompt}],
    )
    # the SFT row's answer is dropped: its instruction is answered again
    assert b.messages == sft_row["messages"][:1] and (b.length, b.length_source) == (2000, "prompt")
    assert c.messages == chat and c.prompt == "Write a 300-word poem" and c.length == 300
    assert d.length is None and d.length_source is None
    assert [it.index for it in (a, b, c, d)] == [0, 1, 2, 3]
    # derived ids are stable hashes of the request; keys change when the request does
    assert read_instructions(f)[1].id == b.id and len(b.id) == 16
    assert a.key.startswith("7|") and a.key != d.key


@pytest.mark.parametrize(
    "row, message",
    [
        ("not json", "not a JSON object"),
        ('["prompt"]', "expected a JSON object"),
        ({"prompt": "x", "length": "abc"}, "'length' must be a positive whole number"),
        ({"prompt": "x", "length": -5}, "'length' must be a positive whole number"),
        ({"prompt": "x", "length": 0}, "'length' must be a positive whole number"),
        ({"prompt": "x", "length": 12.5}, "'length' must be a positive whole number"),
        ({"prompt": "x", "length": True}, "'length' must be a positive whole number"),
        ({"id": "a", "prompt": "y"}, "duplicate id 'a'"),
        ({"messages": "hi"}, "'messages' must be a non-empty list"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": ["hi"]}, "messages[0] must be an object"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role must be one of"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content must be a string"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "'messages' holds no user turn"),
        ({"messages": [{"role": "user", "content": " "}]}, "messages[0] must be a non-empty user turn"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]},
            "messages[1] must be",
        ),
        (
            {"prompt": "x", "messages": [{"role": "user", "content": "x"}]},
            "row has both 'prompt' and 'messages'",
        ),
        ({"id": 1}, "row without a non-empty string 'prompt' or a 'messages' list"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, row, message):
    f = write(tmp_path / "in.jsonl", [{"id": "a", "prompt": "fine"}, row])
    with pytest.raises(ValueError, match=re.escape(f"in.jsonl:2: {message}")):
        read_instructions(f)


@pytest.mark.parametrize("main", [agentwrite.main, preference.main], ids=["agentwrite", "preference"])
def test_the_clis_report_a_bad_row_in_one_line_and_exit_2(tmp_path, capsys, main):
    """Before any request and before any output file: the reader's message, as it names file and line."""
    f = write(tmp_path / "in.jsonl", [{"prompt": "fine"}, {"prompt": "x", "length": 0}])
    rc = main(["--input", str(f), "--output", str(tmp_path / "o.jsonl"), "--model", "m"])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"error: {f}:2: 'length' must be a positive whole number of words, got 0\n"
    assert list(tmp_path.iterdir()) == [f]


def test_prompt_only_readers_reject_messages(tmp_path):
    f = write(tmp_path / "in.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(ValueError, match=re.escape("in.jsonl:1: row without a non-empty string 'prompt'")):
        read_instructions(f, allow_messages=False)

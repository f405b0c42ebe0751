"""data_gen.jsonl: the append-only logs that agentwrite and evaluation resume from."""

import json

from data_gen.jsonl import open_append, read_appended


def test_a_log_torn_inside_a_multibyte_character_resumes(tmp_path):
    path = tmp_path / "pred.jsonl"
    whole = json.dumps({"idx": 0, "response": "中文"}, ensure_ascii=False) + "\n"
    torn = json.dumps({"idx": 1, "response": "中文"}, ensure_ascii=False).encode()[:-3]
    assert torn.endswith("文".encode()[:2])  # the kill really landed inside a character
    path.write_bytes(whole.encode() + torn)
    assert read_appended(path) == [{"idx": 0, "response": "中文"}]
    with open_append(path) as f:
        f.write(json.dumps({"idx": 1, "response": "ok"}) + "\n")
    assert read_appended(path) == [{"idx": 0, "response": "中文"}, {"idx": 1, "response": "ok"}]


def test_no_log_yet_is_empty(tmp_path):
    assert read_appended(tmp_path / "missing.jsonl") == []

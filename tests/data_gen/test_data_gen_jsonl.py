"""data_gen.jsonl: the append-only logs that agentwrite and evaluation resume from."""

import json

from data_gen.jsonl import AppendLog, read_appended


def test_a_log_torn_inside_a_multibyte_character_resumes(tmp_path):
    """A run killed mid-write leaves a torn last line: the next run skips it (the answer is asked again) and
    its first append starts on a line of its own, so every row reads back."""
    path = tmp_path / "pred.jsonl"
    whole = json.dumps({"idx": 0, "response": "中文"}, ensure_ascii=False) + "\n"
    torn = json.dumps({"idx": 1, "response": "中文"}, ensure_ascii=False).encode()[:-3]
    assert torn.endswith("文".encode()[:2])  # the kill really landed inside a character
    path.write_bytes(whole.encode() + torn)
    log = AppendLog(path)
    assert log.rows == [{"idx": 0, "response": "中文"}]
    log.append({"idx": 1, "response": "ok"})
    log.close()
    assert read_appended(path) == [{"idx": 0, "response": "中文"}, {"idx": 1, "response": "ok"}]


def test_no_log_yet_is_empty(tmp_path):
    assert read_appended(tmp_path / "missing.jsonl") == []

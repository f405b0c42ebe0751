"""AgentWrite end to end against the real HTTP server of tests/openai_server.py (no client mocks).

The fake model answers plans and paragraphs by reading the prompts: each instruction carries a tag
[item=K]; plans name their steps K-S1, K-S2, ...; a paragraph answer echoes "[K-Si]" and the server
checks that the text-so-far it was sent holds exactly that item's earlier paragraphs, so a paragraph
paired with the wrong item or written out of order shows up as "PAIRING-ERROR" in the data.
"""

import asyncio
import itertools
import json
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from openai_server import OpenAIServer, kill_after_requests

from data_gen import agentwrite
from data_gen.agentwrite import GenConfig, read_items, run
from data_gen.length import count_words
from data_gen.llm import LLMClient

REPO = Path(__file__).resolve().parents[2]


def n_paragraphs(item: str) -> int:
    return 1 + int(re.sub(r"\D", "", item) or 0) % 4


def section(content: str, tag: str) -> str:
    m = re.search(rf"<{tag}>\n(.*?)\n</{tag}>", content, re.S)
    assert m is not None, f"no <{tag}> section in prompt"
    return m.group(1)


class FakeModel:
    def __init__(self, sleep: tuple[float, float] = (0.0, 0.0), messy: bool = True):
        self.sleep = sleep
        self.messy = messy
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.errors: list[str] = []

    @staticmethod
    def kind(body: dict) -> tuple[str, str, int | None]:
        content = body["messages"][-1]["content"]
        item = re.search(r"\[item=(\w+)\]", section(content, "task")).group(1)
        if "<paragraph>" not in content:
            return "plan", item, None
        step = re.search(r"(\w+)-S(\d+)", section(content, "paragraph"))
        return "write", item, int(step.group(2)) if step and step.group(1) == item else -1

    def __call__(self, body: dict) -> str:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.sleep[1]:
                time.sleep(self.sleep[0] + (self.sleep[1] - self.sleep[0]) * (hash(str(body)) % 100) / 100)
            return self.answer(body)
        finally:
            with self.lock:
                self.in_flight -= 1

    def answer(self, body: dict) -> str:
        content = body["messages"][-1]["content"]
        kind, item, i = self.kind(body)
        n = n_paragraphs(item)
        if kind == "plan":
            if self.messy:  # chatter, bold, a missing word count
                lines = ["Sure, here is my plan:", ""]
                for s in range(1, n + 1):
                    count = "" if s == 2 else f" - **Word Count**: {100 * s} words"
                    lines.append(f"**Paragraph {s}** - **Main Point**: part {item}-S{s} of the story{count}")
                return "\n".join(lines + ["", "Hope this helps!"])
            return "\n".join(
                f"Paragraph {s} - Main Point: {item}-S{s} - Word Count: 200 words" for s in range(1, n + 1)
            )
        written = section(content, "written")
        seen = re.findall(r"\[(\w+)-S(\d+)\]", written)
        if i == -1 or seen != [(item, str(j)) for j in range(1, i)]:
            self.errors.append(f"item {item} step {i}: written so far had {seen}")
            return "PAIRING-ERROR"
        return f"[{item}-S{i}] " + " ".join(["word"] * 10)


def write_input(path: Path, items: list[str], length: int | None = 800) -> None:
    with open(path, "w") as f:
        for k in items:
            row = {"id": k, "prompt": f"Write a story about rivers [item={k}]"}
            if length:
                row["length"] = length
            f.write(json.dumps(row) + "\n")


def expected_requests(items: list[str]) -> int:
    return sum(1 + n_paragraphs(k) for k in items)


def client_for(srv: OpenAIServer, **kw) -> LLMClient:
    kw = {"timeout": 2.0, "max_retries": 4, "backoff_base": 0.01, "backoff_max": 0.05, **kw}
    return LLMClient("fake", base_url=srv.base_url, api_key="k", **kw)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_rows(rows: list[dict], items: list[str]) -> None:
    assert [r["id"] for r in rows] == items
    for r in rows:
        k = r["id"]
        user, assistant = r["messages"]
        assert user["role"] == "user" and f"[item={k}]" in user["content"]
        assert assistant["role"] == "assistant"
        paragraphs = assistant["content"].split("\n\n")
        assert [p.split()[0] for p in paragraphs] == [f"[{k}-S{s}]" for s in range(1, n_paragraphs(k) + 1)]
        assert r["response_length"] == count_words(assistant["content"])
        assert "ERROR" not in assistant["content"]


def test_concurrent_items_keep_input_order_and_pairing(tmp_path, capsys):
    items = [f"i{k}" for k in range(12)]
    write_input(tmp_path / "in.jsonl", items)
    model = FakeModel(sleep=(0.0, 0.03))
    with OpenAIServer(model, latency=(0.0, 0.01)) as srv:
        client = client_for(srv)
        summary = asyncio.run(
            run(
                read_items(tmp_path / "in.jsonl"),
                client,
                tmp_path / "out.jsonl",
                cfg=GenConfig(concurrency=4),
                show_progress=True,
            )
        )
    bars = capsys.readouterr().err
    n_paragraphs_total = expected_requests(items) - len(items)
    assert "items: 100%" in bars and f"{n_paragraphs_total}/{n_paragraphs_total}" in bars
    assert model.errors == []
    assert model.max_in_flight > 1  # items really overlapped
    assert (summary.done, summary.failed, summary.skipped) == (12, 0, 0)
    assert len(srv.requests) == expected_requests(items)
    rows = read_jsonl(tmp_path / "out.jsonl")
    check_rows(rows, items)
    assert all(r["length"] == 800 for r in rows)
    assert summary.usage["completion_tokens"] > 0 and summary.usage["prompt_tokens"] > 0
    assert read_jsonl(tmp_path / "out.jsonl.failures.jsonl") == []
    # the plan was sized to the required length and the missing word count filled in
    plan_prompt = srv.requests[0]["messages"][0]["content"]
    assert "about 800 words" in plan_prompt
    write_prompt = next(b for b in srv.requests if "<paragraph>" in b["messages"][0]["content"])
    assert "Word Count: 100 words" in write_prompt["messages"][0]["content"]


def test_transient_failures_are_recovered(tmp_path):
    items = [f"t{k}" for k in range(8)]
    write_input(tmp_path / "in.jsonl", items)
    modes = [500, 429, "timeout", "drop", 503, None]

    first_seen = itertools.count()

    def fail(body, n_seen):
        # the first attempt of each distinct request fails, cycling through the failure modes
        return modes[next(first_seen) % len(modes)] if n_seen == 0 else None

    with OpenAIServer(FakeModel(), fail=fail, retry_after=0.01) as srv:
        client = client_for(srv, timeout=0.8)
        summary = asyncio.run(
            run(
                read_items(tmp_path / "in.jsonl"),
                client,
                tmp_path / "out.jsonl",
                cfg=GenConfig(concurrency=8),
            )
        )
    injected = {f for _, f in srv.failures}
    assert {500, 429, "timeout", "drop"} <= injected  # the mix was really exercised
    assert (summary.done, summary.failed) == (8, 0)
    assert summary.usage["retries"] >= len(srv.failures)  # more only if a loaded machine timed out
    check_rows(read_jsonl(tmp_path / "out.jsonl"), items)


def test_failing_items_are_isolated_and_reported(tmp_path):
    items = ["ok1", "bad400", "ok2", "bad500", "garbage", "ok3"]
    write_input(tmp_path / "in.jsonl", items)
    model = FakeModel()

    def handler(body):
        if "[item=garbage]" in body["messages"][0]["content"]:
            return "I cannot make a plan, sorry."
        return model(body)

    def fail(body, n_seen):
        content = body["messages"][0]["content"]
        if "[item=bad400]" in content:
            return 400
        if "[item=bad500]" in content and "<paragraph>" in content:
            return 500  # the plan succeeds, the first paragraph never does
        return None

    with OpenAIServer(handler, fail=fail) as srv:
        client = client_for(srv, max_retries=2)
        out = tmp_path / "out.jsonl"
        summary = asyncio.run(
            run(read_items(tmp_path / "in.jsonl"), client, out, cfg=GenConfig(concurrency=3))
        )
    assert (summary.done, summary.failed) == (3, 3)
    check_rows(read_jsonl(out), ["ok1", "ok2", "ok3"])
    failures = {f["id"]: f for f in read_jsonl(tmp_path / "out.jsonl.failures.jsonl")}
    assert set(failures) == {"bad400", "bad500", "garbage"}
    assert failures["bad400"]["kind"] == "bad_request" and "context length" in failures["bad400"]["reason"]
    assert failures["bad500"]["kind"] == "server"
    assert failures["garbage"]["kind"] == "parse"
    per_item = lambda k: sum(f"[item={k}]" in b["messages"][0]["content"] for b in srv.requests)
    assert per_item("bad400") == 1  # a 400 is never retried
    assert per_item("bad500") == 1 + 3  # plan + (1 + 2 retries) for paragraph 1
    assert per_item("garbage") == 3  # plan asked plan_attempts times
    assert "sorry" not in out.read_text()


def recorded_keys(progress: Path) -> set[tuple]:
    keys = set()
    for rec in read_jsonl(progress):
        item = rec["key"].split("|")[0]
        keys.add((item, "plan") if rec["kind"] == "plan" else (item, rec["i"] + 1))
    return keys


def request_keys(srv: OpenAIServer) -> list[tuple]:
    out = []
    for body in srv.requests:
        kind, item, i = FakeModel.kind(body)
        out.append((item, "plan") if kind == "plan" else (item, i))
    return out


def rerun_and_check(tmp_path: Path, items: list[str]) -> None:
    progress = tmp_path / "out.jsonl.progress.jsonl"
    done_before = recorded_keys(progress)
    assert 0 < len(done_before) < expected_requests(items)  # the kill really landed mid-run
    model = FakeModel()
    with OpenAIServer(model) as srv:
        summary = asyncio.run(
            run(
                read_items(tmp_path / "in.jsonl"),
                client_for(srv),
                tmp_path / "out.jsonl",
                cfg=GenConfig(concurrency=3),
            )
        )
    asked = request_keys(srv)
    assert not set(asked) & done_before  # nothing already answered is asked again
    assert len(asked) == len(set(asked)) == expected_requests(items) - len(done_before)
    assert model.errors == []
    assert summary.failed == 0 and summary.done + summary.skipped == len(items)
    check_rows(read_jsonl(tmp_path / "out.jsonl"), items)
    # a third run has nothing left to do
    with OpenAIServer(FakeModel()) as srv:
        summary = asyncio.run(run(read_items(tmp_path / "in.jsonl"), client_for(srv), tmp_path / "out.jsonl"))
    assert len(srv.requests) == 0 and summary.skipped == len(items) and summary.done == 0
    check_rows(read_jsonl(tmp_path / "out.jsonl"), items)


def test_cancelled_run_resumes_without_repeating_requests(tmp_path):
    items = [f"c{k}" for k in range(6)]
    write_input(tmp_path / "in.jsonl", items)
    out = tmp_path / "out.jsonl"

    async def run_then_cancel(srv):
        task = asyncio.create_task(
            run(read_items(tmp_path / "in.jsonl"), client_for(srv), out, cfg=GenConfig(concurrency=2))
        )
        while len(srv.requests) < 7:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with OpenAIServer(FakeModel(sleep=(0.01, 0.02))) as srv:
        asyncio.run(run_then_cancel(srv))
    # the partial output holds only finished items, in input order
    partial = read_jsonl(out)
    check_rows(partial, [k for k in items if k in {r["id"] for r in partial}])
    rerun_and_check(tmp_path, items)


def test_killed_process_resumes_without_repeating_requests(tmp_path):
    items = [f"k{k}" for k in range(6)]
    write_input(tmp_path / "in.jsonl", items)
    with OpenAIServer(FakeModel(sleep=(0.02, 0.04))) as srv:
        cmd = [sys.executable, "-m", "data_gen.agentwrite", "--input", str(tmp_path / "in.jsonl")]
        cmd += ["--output", str(tmp_path / "out.jsonl"), "--model", "fake", "--base_url", srv.base_url]
        cmd += ["--api_key", "k", "--concurrency", "2", "--timeout", "5"]
        assert kill_after_requests(cmd, srv, 8, REPO) == -signal.SIGKILL
    rerun_and_check(tmp_path, items)


def test_cli_end_to_end_chinese_and_summary(tmp_path, capsys):
    rows = [
        {"prompt": "写一篇关于长江的散文，1500字左右 [item=z1]"},
        {"prompt": "写一篇三千字的小说 [item=z2]", "id": "given"},
        {"prompt": "Write a poem [item=e3]"},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    with OpenAIServer(FakeModel()) as srv:
        rc = agentwrite.main(
            ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl"), "--model", "m"]
            + ["--base_url", srv.base_url, "--api_key", "k", "--concurrency", "2", "--max_retries", "1"]
        )
    assert rc == 0
    out = read_jsonl(tmp_path / "o.jsonl")
    assert [r["length"] for r in out] == [1500, 3000, None]
    assert out[1]["id"] == "given" and len(out[0]["id"]) == 16  # derived ids are stable hashes
    plans = [
        b["messages"][0]["content"] for b in srv.requests if "<paragraph>" not in b["messages"][0]["content"]
    ]
    zh_plan = next(p for p in plans if "item=z1" in p)
    assert "写作任务" in zh_plan and "1500字" in zh_plan
    en_plan = next(p for p in plans if "item=e3" in p)
    assert "Pick a total length" in en_plan
    printed = capsys.readouterr().out
    assert "done 3 / failed 0 / skipped 0" in printed and "tokens: prompt" in printed


def test_read_items_rejects_duplicates_and_empty_prompts(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(ValueError, match="duplicate id"):
        read_items(f)
    f.write_text('{"prompt": ""}\n')
    with pytest.raises(ValueError, match="prompt"):
        read_items(f)
    f.write_text('{"prompt": "same"}\n{"prompt": "same"}\n')
    a, b = read_items(f)
    assert a.id != b.id and b.id.startswith(a.id)


def test_given_lengths_accept_whole_numbers(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text(
        '{"prompt": "a", "length": 800}\n{"prompt": "b", "length": "1200"}\n{"prompt": "c", "length": 3e3}\n'
    )
    assert [it.length for it in read_items(f)] == [800, 1200, 3000]


@pytest.mark.parametrize("flag", ["--concurrency", "--plan_attempts", "--max_paragraphs"])
def test_cli_rejects_non_positive_options(tmp_path, capsys, flag):
    f = tmp_path / "in.jsonl"
    f.write_text('{"prompt": "a"}\n')
    with pytest.raises(SystemExit) as ei:
        agentwrite.main(["--input", str(f), "--output", str(tmp_path / "o.jsonl"), "--model", "m", flag, "0"])
    assert ei.value.code == 2 and f"{flag} must be >= 1" in capsys.readouterr().err

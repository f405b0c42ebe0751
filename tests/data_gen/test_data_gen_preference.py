"""Preference-pair generation end to end against the real HTTP server of tests/openai_server.py (no mocks).

The fake policy answers a sample request from its per-request seed: variant v = seed % 5 fixes the length
(WORDS[v] words) and the quality the fake judge will give (QUALITY[v] on all six dimensions), and the text
carries the marker "[item v q]". The tests recompute every expected score from the markers with the
official formulas (length_score; (q - 1) x 25), never from the code under test's own metadata.
"""

import asyncio
import json
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from openai_server import OpenAIServer, kill_after_requests

from data_gen import preference
from data_gen.instructions import read_instructions
from data_gen.length import count_words, length_score
from data_gen.llm import LLMClient
from data_gen.preference import JudgeConfig, SampleConfig, request_seed, run
from data_gen.quality import DIMENSIONS, load_judge_template

REPO = Path(__file__).resolve().parents[2]
WORDS = (150, 300, 600, 1200, 2400)
QUALITY = (5, 4, 2, 3, 1)
MARK = re.compile(r"\[(\w+) v(\d) q(\d)\]")


def item_of(body: dict) -> str:
    return re.search(r"\[item=(\w+)\]", body["messages"][-1]["content"]).group(1)


class Fake:
    """Policy and judge in one handler, told apart by the request's model name."""

    def __init__(self, *, same=(), empty=(), garbage_judge=(), truncate=lambda item, v: False, sleep=0.0):
        self.same, self.empty, self.garbage_judge = set(same), set(empty), set(garbage_judge)
        self.truncate = truncate
        self.sleep = sleep

    def __call__(self, body: dict):
        if self.sleep:
            time.sleep(self.sleep)
        item = item_of(body)
        if body["model"] == "judge":
            if item in self.garbage_judge:
                return "What a lovely essay. I would give it a good score."
            response = re.search(
                r"<response>\n(.*)\n</response>", body["messages"][0]["content"], re.S
            ).group(1)
            q = int(MARK.match(response).group(3))
            return json.dumps({"Analysis": "fine", **dict.fromkeys(DIMENSIONS, q)})
        if item in self.empty:
            return ""
        v = 0 if item in self.same else body["seed"] % len(WORDS)
        text = f"[{item} v{v} q{QUALITY[v]}] " + " ".join(["word"] * WORDS[v])
        return (text, "length") if self.truncate(item, v) else text


def expected_score(text: str, required: int | None) -> float:
    sq = (int(MARK.match(text).group(3)) - 1) * 25
    return sq if required is None else (length_score(required, count_words(text)) + sq) / 2


def client_for(srv: OpenAIServer, model: str, **kw) -> LLMClient:
    kw = {"timeout": 2.0, "max_retries": 4, "backoff_base": 0.01, "backoff_max": 0.05, **kw}
    return LLMClient(model, base_url=srv.base_url, api_key="k", **kw)


def write_input(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def story(k: str, length: int = 800) -> dict:
    return {"id": k, "prompt": f"Write a story about rivers in {length} words [item={k}]"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def generate(
    srv, tmp: Path, inp: Path, *, judge_srv=None, concurrency=4, plot=False, **cfg
) -> preference.RunStats:
    judge = JudgeConfig(load_judge_template(), concurrency=concurrency, attempts=cfg.pop("judge_attempts", 5))
    score, kw = cfg.get("score", "mean"), cfg.pop("client", {})
    return asyncio.run(
        run(
            read_instructions(inp),
            client_for(srv, "policy", **kw),
            client_for(judge_srv or srv, "judge", **kw) if score != "length" else None,
            tmp / "pairs.jsonl",
            cfg=SampleConfig(concurrency=concurrency, **cfg),
            judge=judge if score != "length" else None,
            plot_path=tmp / "pairs.jsonl.scores.png" if plot else None,
        )
    )


def policy_requests(srv: OpenAIServer, item: str | None = None) -> list[dict]:
    return [b for b in srv.requests if b["model"] == "policy" and item in (None, item_of(b))]


def judge_requests(srv: OpenAIServer, item: str | None = None) -> list[dict]:
    return [b for b in srv.requests if b["model"] == "judge" and item in (None, item_of(b))]


def check_pair(row: dict, inputs: dict, seeds: set[int], num_samples: int = 4) -> None:
    """The row against what the server answered for its item: format, scores, chosen = best, rejected other."""
    given = inputs[row["id"]]
    convo = given.get("messages") or [{"role": "user", "content": given["prompt"]}]
    if convo[-1]["role"] == "assistant":
        convo = convo[:-1]
    assert row["messages"][:-1] == convo and row["messages"][-1]["role"] == "assistant"
    chosen, rejected = row["messages"][-1]["content"], row["rejected_response"]
    assert set(row) == {"id", "messages", "rejected_response", "length", "preference"}
    required = row["length"]
    texts = [f"[{row['id']} v{s % 5} q{QUALITY[s % 5]}] " + " ".join(["word"] * WORDS[s % 5]) for s in seeds]
    assert len(seeds) == num_samples  # one distinct seed per sample
    best = max(expected_score(t, required) for t in texts)
    assert chosen in texts and rejected in texts
    assert expected_score(chosen, required) == pytest.approx(best)
    meta = row["preference"]
    samples = meta["samples"]
    assert [s["k"] for s in samples] == list(range(num_samples)) and meta["chosen"] != meta["rejected"]
    # every sample's scores kept, equal to the independent recomputation (as multisets)
    got = sorted((s["response_length"], s["score_q"], s["score"]) for s in samples)
    want = sorted(
        (count_words(t), (QUALITY[s % 5] - 1) * 25.0, expected_score(t, required))
        for s, t in zip(seeds, texts)
    )
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert [g[2] for g in got] == pytest.approx([w[2] for w in want])
    if required is None:
        assert all(s["score_l"] is None for s in samples)
    else:
        assert all(
            s["score_l"] == pytest.approx(length_score(required, s["response_length"])) for s in samples
        )
    assert meta["margin"] == pytest.approx(best - expected_score(rejected, required))
    assert samples[meta["chosen"]]["score"] == pytest.approx(best)


def seeds_of(srv: OpenAIServer, item: str) -> set[int]:
    return {b["seed"] for b in policy_requests(srv, item)}


def test_pairs_in_input_order_with_scores_and_summary(tmp_path):
    rows = [story(f"i{k}") for k in range(4)]
    rows.append({"id": "given", "prompt": "Write a story about lakes [item=given]", "length": 1500})
    rows.append({"id": "nolen", "prompt": "Write a story about lakes [item=nolen]"})
    chat = [
        {"role": "system", "content": "You write well."},
        {"role": "user", "content": "写一篇2000字的文章 [item=zh]"},
    ]
    rows.append({"id": "zh", "messages": chat})
    sft = [
        {"role": "user", "content": "Write 600 words [item=sft]"},
        {"role": "assistant", "content": "old answer"},
    ]
    rows.append({"id": "sft", "messages": sft})
    inp = write_input(tmp_path / "in.jsonl", rows)
    with OpenAIServer(Fake(), latency=(0.0, 0.01)) as srv, OpenAIServer(Fake()) as judge_srv:
        stats = generate(srv, tmp_path, inp, judge_srv=judge_srv, plot=True)
    out = read_jsonl(tmp_path / "pairs.jsonl")
    ids = [r["id"] for r in rows]
    assert [r["id"] for r in out] == ids
    assert (stats.done, stats.failed, stats.skipped) == (8, 0, 0)
    assert (
        len(srv.requests) == 8 * 4 and len(judge_srv.requests) == 8 * 4
    )  # one request per sample / judgement
    inputs = {r["id"]: r for r in rows}
    for r in out:
        check_pair(r, inputs, seeds_of(srv, r["id"]))
    by_id = {r["id"]: r for r in out}
    assert [by_id[k]["length"] for k in ("i0", "given", "nolen", "zh", "sft")] == [800, 1500, None, 2000, 600]
    assert by_id["given"]["preference"]["length_source"] == "given"
    assert by_id["i0"]["preference"]["length_source"] == "prompt"
    assert by_id["nolen"]["preference"]["length_source"] is None  # scored by S_Q alone
    assert "old answer" not in (tmp_path / "pairs.jsonl").read_text()
    assert read_jsonl(tmp_path / "pairs.jsonl.failures.jsonl") == []
    summary = json.loads((tmp_path / "pairs.jsonl.summary.json").read_text())
    assert summary["pairs"] == 8 and summary["pairs_without_length"] == 1 and summary["samples"] == 32
    assert summary["run"]["samples_asked"] == 32 and summary["run"]["judged_now"] == 32
    margins = [r["preference"]["margin"] for r in out]
    assert summary["margin"]["n"] == 8 and summary["margin"]["mean"] == pytest.approx(sum(margins) / 8)
    assert summary["score"]["chosen"]["mean"] >= summary["score"]["rejected"]["mean"]
    assert (tmp_path / "pairs.jsonl.scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same run at another concurrency, from scratch, writes the same file: pairs do not depend on timing
    again = tmp_path / "again"
    again.mkdir()
    with OpenAIServer(Fake(), latency=(0.0, 0.01)) as srv:
        generate(srv, again, inp, concurrency=1)
    assert (again / "pairs.jsonl").read_text() == (tmp_path / "pairs.jsonl").read_text()


def test_transient_failures_are_retried(tmp_path):
    rows = [story(f"t{k}") for k in range(4)]
    inp = write_input(tmp_path / "in.jsonl", rows)
    modes = [500, 429, "timeout", "drop", 503, None]
    lock, seen, count = threading.Lock(), set(), [0]

    def fail(body, n_seen):
        # the first attempt of every distinct request (sample: messages + seed; judgement: its prompt) fails
        key = json.dumps([body["messages"], body.get("seed")])
        with lock:
            if key in seen:
                return None
            seen.add(key)
            count[0] += 1
            return modes[count[0] % len(modes)]

    with OpenAIServer(Fake(), fail=fail, retry_after=0.01) as srv:
        stats = generate(srv, tmp_path, inp, concurrency=8, client={"timeout": 0.8})
    injected = {f for _, f in srv.failures}
    assert {500, 429, 503, "timeout", "drop"} <= injected
    assert any(b["model"] == "judge" for b, _ in srv.failures)  # the judge's requests were hit too
    assert (stats.done, stats.failed) == (4, 0)
    assert stats.usage["retries"] + stats.judge_usage["retries"] >= len(srv.failures)
    out = read_jsonl(tmp_path / "pairs.jsonl")
    for r in out:
        check_pair(r, {r["id"]: r for r in rows}, seeds_of(srv, r["id"]))


def test_failing_items_are_isolated_reported_and_rerun(tmp_path):
    ids = ["ok1", "bad400", "judge500", "ok2", "judgegarbage", "empty"]
    rows = [story(k) for k in ids]
    inp = write_input(tmp_path / "in.jsonl", rows)

    def fail(body, n_seen):
        item = item_of(body)
        if item == "bad400" and body["model"] == "policy":
            return 400
        if item == "judge500" and body["model"] == "judge":
            return 500
        return None

    fake = Fake(empty={"empty"}, garbage_judge={"judgegarbage"})
    with OpenAIServer(fake, fail=fail) as srv:
        stats = generate(srv, tmp_path, inp, client={"max_retries": 2}, judge_attempts=2)
    assert (stats.done, stats.failed) == (2, 4)
    out = read_jsonl(tmp_path / "pairs.jsonl")
    assert [r["id"] for r in out] == ["ok1", "ok2"]
    failures = {f["id"]: f for f in read_jsonl(tmp_path / "pairs.jsonl.failures.jsonl")}
    assert [f["id"] for f in read_jsonl(tmp_path / "pairs.jsonl.failures.jsonl")] == [
        k for k in ids if "ok" not in k
    ]
    assert (failures["bad400"]["stage"], failures["bad400"]["kind"]) == ("sample", "bad_request")
    assert (
        "context length" in failures["bad400"]["reason"]
        and "3 more failed samples" in failures["bad400"]["reason"]
    )
    assert (failures["judge500"]["stage"], failures["judge500"]["kind"]) == ("judge", "server")
    assert (failures["judgegarbage"]["stage"], failures["judgegarbage"]["kind"]) == ("judge", "parse")
    assert "lovely essay" in failures["judgegarbage"]["reason"]  # the reply that did not parse, for debugging
    assert (failures["empty"]["stage"], failures["empty"]["kind"]) == ("sample", "parse")
    assert len(policy_requests(srv, "bad400")) == 4  # a 400 is never retried
    assert len(judge_requests(srv, "judge500")) == 4 * 3  # 1 + 2 retries per sample
    assert len(judge_requests(srv, "judgegarbage")) == 4 * 2  # judge_attempts per sample
    assert len(seeds_of(srv, "empty")) == 4 * 3  # sample_attempts per sample, each with a fresh seed
    text = (tmp_path / "pairs.jsonl").read_text()
    assert "lovely" not in text and "injected" not in text and "context length" not in text

    # a rerun against a healthy server asks only what is missing: no new samples for the judge failures
    with OpenAIServer(Fake()) as srv2:
        stats = generate(srv2, tmp_path, inp)
    assert (stats.done, stats.failed, stats.skipped) == (4, 0, 2)
    assert {item_of(b) for b in policy_requests(srv2)} == {"bad400", "empty"}
    assert len(policy_requests(srv2)) == 8
    assert sorted(item_of(b) for b in judge_requests(srv2)) == sorted(
        ["bad400", "empty", "judge500", "judgegarbage"] * 4
    )
    out = read_jsonl(tmp_path / "pairs.jsonl")
    assert [r["id"] for r in out] == ids
    inputs = {r["id"]: r for r in rows}
    for r in out:
        check_pair(
            r,
            inputs,
            seeds_of(srv, r["id"]) | seeds_of(srv2, r["id"])
            if r["id"] != "empty"
            else seeds_of(srv2, "empty"),
        )


def test_ties_truncation_and_the_seeded_rejected_draw(tmp_path):
    ids = [f"same{k}" for k in range(6)] + ["cut", "partly"]
    inp = write_input(tmp_path / "in.jsonl", [story(k) for k in ids])
    # "partly": the best-scoring variants are cut off; "cut": every sample is
    truncate = lambda item, v: item == "cut" or (item == "partly" and v in (2, 3))
    fake = Fake(same=[k for k in ids if k.startswith("same")], truncate=truncate)
    outs = {}
    for seed in (1, 2):
        d = tmp_path / f"seed{seed}"
        d.mkdir()
        with OpenAIServer(fake) as srv:
            stats = generate(srv, d, inp, seed=seed)
        outs[seed] = {r["id"]: r for r in read_jsonl(d / "pairs.jsonl")}
        assert (stats.done, stats.failed) == (7, 1)
        (failure,) = read_jsonl(d / "pairs.jsonl.failures.jsonl")
        assert (failure["id"], failure["stage"], failure["kind"]) == ("cut", "pair", "no_pair")
        assert "cut off by max_tokens" in failure["reason"]
        for k in ids[
            :6
        ]:  # four equal samples: the lowest index is chosen, the rejected drawn among the others
            meta = outs[seed][k]["preference"]
            assert meta["chosen"] == 0 and meta["rejected"] in (1, 2, 3) and meta["margin"] == 0
        partly = outs[seed]["partly"]["preference"]
        assert partly["samples"][partly["chosen"]]["finish_reason"] == "stop"
        summary = json.loads((d / "pairs.jsonl.summary.json").read_text())
        assert summary["zero_margin_pairs"] >= 6 and summary["failed_by_kind"] == {"no_pair": 1}
    draws = {seed: [outs[seed][k]["preference"]["rejected"] for k in ids[:6]] for seed in outs}
    assert len(set(draws[1])) > 1 and draws[1] != draws[2]  # random per item, and the seed matters
    finish = [s["finish_reason"] for s in outs[1]["partly"]["preference"]["samples"]]
    assert "length" in finish and "stop" in finish  # the test really had truncated samples in a pair

    # --truncated drop: a cut-off sample is neither judged nor used
    d = tmp_path / "drop"
    d.mkdir()
    with OpenAIServer(fake) as srv:
        generate(srv, d, inp, seed=1, truncated="drop")
    meta = {r["id"]: r["preference"] for r in read_jsonl(d / "pairs.jsonl")}
    n_cut = finish.count("length")
    assert len(judge_requests(srv, "partly")) == 4 - n_cut and len(judge_requests(srv, "cut")) == 0
    if n_cut < 3:
        assert meta["partly"]["samples"][meta["partly"]["rejected"]]["finish_reason"] == "stop"


def test_a_context_length_400_is_asked_again_with_the_room_it_leaves(tmp_path, caplog):
    inp = write_input(tmp_path / "in.jsonl", [story("ctx")])
    too_long = (
        "This model's maximum context length is 1000 tokens. However, you requested 4100 tokens "
        "(100 in the messages, 4000 in the completion)."
    )
    fail = lambda body, n: (400, too_long) if body["model"] == "policy" and body["max_tokens"] > 900 else None
    with OpenAIServer(Fake(), fail=fail) as srv:
        stats = generate(srv, tmp_path, inp, num_samples=2, max_tokens=4000)
    assert sorted(b["max_tokens"] for b in policy_requests(srv)) == [900, 900, 4000, 4000]
    for k in (0, 1):
        assert f"item ctx sample {k}: max_tokens 4000 -> 900 to fit the context" in caplog.text
    assert stats.done == 1
    (row,) = read_jsonl(tmp_path / "pairs.jsonl")
    check_pair(row, {"ctx": story("ctx")}, seeds_of(srv, "ctx"), num_samples=2)


def recorded(progress: Path) -> tuple[set[int], int]:
    """Seeds of the samples in a progress file (as the runner derives them) and its number of judgements."""
    recs = read_jsonl(progress) if progress.exists() else []
    seeds = {request_seed(42, r["key"], r["k"], 0) for r in recs if r["kind"] == "sample"}
    return seeds, sum(r["kind"] == "judge" for r in recs)


def resume_and_compare(tmp_path: Path, inp: Path, n_items: int) -> None:
    """Rerun after an interruption: nothing answered is asked again, and the output equals an uninterrupted run."""
    done_seeds, n_judged = recorded(tmp_path / "pairs.jsonl.progress.jsonl")
    assert 0 < len(done_seeds) < n_items * 4  # the interruption really landed mid-run
    with OpenAIServer(Fake()) as srv:
        stats = generate(srv, tmp_path, inp, concurrency=3)
    asked = [b["seed"] for b in policy_requests(srv)]
    assert not set(asked) & done_seeds and len(asked) == len(set(asked)) == n_items * 4 - len(done_seeds)
    assert len(judge_requests(srv)) == n_items * 4 - n_judged
    assert stats.failed == 0 and stats.done + stats.skipped == n_items
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with OpenAIServer(Fake()) as srv:
        generate(srv, fresh, inp)
    assert (tmp_path / "pairs.jsonl").read_text() == (fresh / "pairs.jsonl").read_text()
    with OpenAIServer(Fake()) as srv:  # and a third run has nothing left to ask
        stats = generate(srv, tmp_path, inp)
    assert srv.requests == [] and stats.skipped == n_items


def test_killed_process_resumes_without_asking_again(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", [story(f"k{k}") for k in range(5)])
    with OpenAIServer(Fake(sleep=0.02)) as srv:
        cmd = [sys.executable, "-m", "data_gen.preference", "--input", str(inp)]
        cmd += ["--output", str(tmp_path / "pairs.jsonl"), "--model", "policy", "--base_url", srv.base_url]
        cmd += f"--judge_model judge --judge_base_url {srv.base_url} --api_key k --judge_api_key k".split()
        cmd += ["--concurrency", "2", "--timeout", "5"]
        assert kill_after_requests(cmd, srv, 14, REPO) == -signal.SIGKILL
    resume_and_compare(tmp_path, inp, 5)


def test_cancelled_run_writes_finished_items_and_resumes(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", [story(f"c{k}") for k in range(5)])

    async def run_then_cancel(srv):
        task = asyncio.create_task(
            run(
                read_instructions(inp),
                client_for(srv, "policy"),
                client_for(srv, "judge"),
                tmp_path / "pairs.jsonl",
                cfg=SampleConfig(concurrency=2),
                judge=JudgeConfig(load_judge_template(), concurrency=2),
            )
        )
        while len(srv.requests) < 22:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with OpenAIServer(Fake(sleep=0.01)) as srv:
        asyncio.run(run_then_cancel(srv))
    partial = [r["id"] for r in read_jsonl(tmp_path / "pairs.jsonl")]
    assert partial == sorted(partial)  # finished items only, in input order
    resume_and_compare(tmp_path, inp, 5)


def test_cli_score_length_skips_the_judge_and_reports_rows_without_length(tmp_path, capsys):
    rows = [story("a", 300), {"id": "b", "prompt": "Write anything [item=b]"}, story("c", 1200)]
    inp = write_input(tmp_path / "in.jsonl", rows)
    out = tmp_path / "pairs.jsonl"
    with OpenAIServer(Fake()) as srv:
        rc = preference.main(
            ["--input", str(inp), "--output", str(out), "--model", "policy", "--base_url", srv.base_url]
            + ["--api_key", "k", "--score", "length", "--num_samples", "3", "--max_retries", "1", "--no_plot"]
        )
    assert rc == 1  # one item could not be ranked
    assert judge_requests(srv) == [] and policy_requests(srv, "b") == [] and len(srv.requests) == 6
    pairs = read_jsonl(out)
    assert [r["id"] for r in pairs] == ["a", "c"]
    for r in pairs:
        samples = r["preference"]["samples"]
        assert all(s["score_q"] is None and s["score"] == s["score_l"] for s in samples)
        assert r["preference"]["score"] == "length" and len(samples) == 3
        assert all(
            s["score"] == pytest.approx(length_score(r["length"], s["response_length"])) for s in samples
        )
        chosen_sl = length_score(r["length"], count_words(r["messages"][-1]["content"]))
        assert chosen_sl == pytest.approx(max(s["score"] for s in samples))
    (failure,) = read_jsonl(tmp_path / "pairs.jsonl.failures.jsonl")
    assert (failure["id"], failure["stage"], failure["kind"]) == ("b", "input", "no_length")
    printed = capsys.readouterr().out
    assert "done 2 / failed 1 / skipped 0" in printed and "pairs 2, failed 1 (no_length 1)" in printed
    assert not (tmp_path / "pairs.jsonl.scores.png").exists()


@pytest.mark.parametrize(
    "flag, value", [("--num_samples", "1"), ("--concurrency", "0"), ("--judge_attempts", "0")]
)
def test_cli_rejects_bad_options(tmp_path, capsys, flag, value):
    f = write_input(tmp_path / "in.jsonl", [story("a")])
    with pytest.raises(SystemExit) as ei:
        preference.main(
            ["--input", str(f), "--output", str(tmp_path / "o.jsonl"), "--model", "m", flag, value]
        )
    assert ei.value.code == 2 and flag in capsys.readouterr().err


def test_progress_ignores_a_judgement_of_another_text(tmp_path):
    path = tmp_path / "p.jsonl"
    sample = {"key": "a|x", "kind": "sample", "k": 0, "text": "new text", "finish_reason": "stop"}
    stale = {"key": "a|x", "kind": "judge", "k": 0, "sha": "0" * 16, "scores": dict.fromkeys(DIMENSIONS, 5)}
    path.write_text(json.dumps(sample) + "\n" + json.dumps(stale) + "\n")
    p = preference.Progress(path)
    assert p.sample("a|x", 0)["text"] == "new text" and p.sample("a|x", 1) is None
    assert p.judgement("a|x", 0) is None  # judged some other text: asked again
    p.add_judgement("a|x", 0, "new text", dict.fromkeys(DIMENSIONS, 4), 1, "{...}")
    p.close()
    p2 = preference.Progress(path)  # the judgement of the current text reads back
    assert p2.judgement("a|x", 0)["scores"]["Clarity"] == 4
    p2.close()

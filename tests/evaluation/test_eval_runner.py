"""evaluation.longbench_write end to end against a real local OpenAI-compatible HTTP server.

The server answers each prompt with a text whose LongBench-Write length is a known function of the prompt, so
S_l is predictable item by item (which also proves responses stay paired with their prompts under concurrency
and random latency), and plays the judge with messy but deterministic replies so S_q is predictable too.
Failures (500, 429, dropped connections, a hang, one prompt that keeps failing) are injected.
"""

import hashlib
import json
import threading
from pathlib import Path

import pytest
from openai_server import OpenAIServer

from data_gen.jsonl import read_appended
from data_gen.quality import DIMENSIONS
from evaluation.length import count_words, length_score
from evaluation.longbench_write import main

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "longwriter"
LBW = DATA / "longbench_write.jsonl"
RULER = DATA / "longwrite_ruler.jsonl"
pytestmark = pytest.mark.skipif(
    not LBW.exists(), reason=f"LongWriter benchmark files not found in {DATA} (see ../shared/data/longwriter)"
)

# actual/required ratios and their official S_l: exact, the two 80-point edges, 50 both ways, 0 both ways.
RATIOS = (1.0, 1.6, 1 / 1.4, 2.5, 0.5, 4.5, 0.25)


def _h(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16)


def _actual(prompt: str, length: int) -> int:
    return round(length * RATIOS[_h(prompt) % len(RATIOS)])


def _text_of_length(prompt: str, n: int) -> str:
    # Chinese prompts get ideographs with uncounted punctuation, others words: both count exactly n.
    if any("\u4e00" <= ch <= "\u9fff" for ch in prompt):
        return "".join("汉" + ("。" if i % 17 == 16 else "") for i in range(n))
    return " ".join(["word" + ("," if i % 13 == 12 else "") for i in range(n)])


def _judge_scores(prompt: str) -> dict:
    h = _h(prompt)
    return {d: 1 + (h >> (3 * k)) % 5 for k, d in enumerate(DIMENSIONS)}


def _judge_reply(prompt: str, attempt: int, never: str, twice: str) -> str:
    if prompt == never or (prompt == twice and attempt < 2):
        return "Sorry, I can only describe the response in words: it is quite good."
    s = _judge_scores(prompt)
    style = _h(prompt) % 4
    if style == 0:
        return "```json\n" + json.dumps({"Analysis": "fine", **s}) + "\n```"
    if style == 1:  # prose around, trailing comma
        return "Analysis first.\n" + json.dumps(s)[:-1] + ",}\nDone."
    if style == 2:  # scores as strings
        return json.dumps({"Analysis": 'has "quotes"', **{k: str(v) for k, v in s.items()}})
    zh = ("相关性", "准确性", "连贯性", "清晰度", "广度和深度", "阅读体验")
    return json.dumps({"分析": "好", **{z: s[d] for z, d in zip(zh, DIMENSIONS)}}, ensure_ascii=False)


class FakeBackend:
    """Model under test + judge behind one server, dispatching on body["model"]."""

    def __init__(self, items: list[dict], poison: str, never: str, twice: str):
        self.length = {it["prompt"]: it["length"] for it in items}
        self.poison, self.never, self.twice = poison, never, twice
        self.poison_active = True
        self.hang = items[20]["prompt"] if len(items) > 20 else None  # first attempt hangs past --timeout
        self.judge_attempts: dict[str, int] = {}
        self.lock = threading.Lock()

    def handler(self, body: dict) -> str:
        content = body["messages"][0]["content"]
        if body["model"] == "judge":
            prompt = next(p for p in self.length if f"\n{p}\n" in content)
            with self.lock:
                attempt = self.judge_attempts.get(prompt, 0)
                self.judge_attempts[prompt] = attempt + 1
            return _judge_reply(prompt, attempt, self.never, self.twice)
        return _text_of_length(content, _actual(content, self.length[content]))

    def fail(self, body: dict, n_seen: int):
        content = body["messages"][0]["content"]
        if body["model"] != "judge" and content == self.poison and self.poison_active:
            return 500
        if n_seen == 0 and content == self.hang:
            return "timeout"
        if n_seen == 0:
            return {0: 500, 1: 429, 2: "drop", 3: 503}.get(_h(content) % 23)
        return None


def _read(path: Path) -> list[dict]:
    return read_appended(str(path))  # skips the torn line the resume test writes


def _args(srv, out, *extra):
    return [
        "--model", "policy", "--base_url", srv.base_url, "--judge_model", "judge",
        "--judge_base_url", srv.base_url, "--input", str(LBW), "--output_dir", str(out),
        "--concurrency", "16", "--max_new_tokens", "32768", "--temperature", "0.5",
        "--repetition_penalty", "1.05", "--max_retries", "2", "--retry_backoff", "0.01", "--timeout", "2",
        *extra,
    ]  # fmt: skip


def test_longbench_write_end_to_end(tmp_path):
    items = _read(LBW)
    en = {r["prompt"] for r in _read(DATA / "longbench_write_en.jsonl")}
    backend = FakeBackend(
        items, poison=items[7]["prompt"], never=items[3]["prompt"], twice=items[11]["prompt"]
    )
    out = tmp_path / "run"
    with OpenAIServer(backend.handler, latency=(0.0, 0.02), fail=backend.fail, seed=1) as srv:
        # Run 1: one prompt keeps failing -> exit 1, everything else scored.
        assert main(_args(srv, out)) == 1
        preds = _read(out / "pred.jsonl")
        assert len(preds) == 119 and backend.poison not in {p["prompt"] for p in preds}
        assert len(srv.failures) > 10  # the injected failures really happened
        assert {f for _, f in srv.failures} >= {500, 429, 503, "drop", "timeout"}
        first = json.loads((out / "results.json").read_text())
        assert first["n_infer_failed"] == 1 and first["stages"]["infer"]["n_failed"] == 1

        # Run 2 resumes after a crash that tore the last line: only the missing prompt goes to the model again.
        with open(out / "pred.jsonl", "a", encoding="utf-8") as f:
            f.write('{"idx": 5, "prompt": "torn')
        backend.poison_active = False
        n_before = len(srv.requests)
        assert main(_args(srv, out)) == 0
        new = srv.requests[n_before:]
        assert [b["messages"][0]["content"] for b in new if b["model"] == "policy"] == [backend.poison]
        judge_new = [b["messages"][0]["content"] for b in new if b["model"] == "judge"]
        assert judge_new and all(
            f"\n{backend.poison}\n" in c for c in judge_new
        )  # only the new item is judged

    preds = {p["idx"]: p for p in _read(out / "pred.jsonl") if "response" in p}
    assert sorted(preds) == list(range(120))
    expected_sl = []
    for it in items:
        p = preds[items.index(it)]
        assert p["prompt"] == it["prompt"]  # paired with its own prompt
        want = _actual(it["prompt"], it["length"])
        assert p["response_length"] == want == count_words(p["response"])
        expected_sl.append(length_score(it["length"], want))

    res = json.loads((out / "results.json").read_text())
    assert res["score_l"] == pytest.approx(sum(expected_sl) / 120)
    # judge: items[3] never parses (excluded, counted); items[11] parses on the 3rd attempt
    judge = {j["idx"]: j for j in _read(out / "judge.jsonl")}
    assert judge[3]["scores"] is None and judge[3]["attempts"] == 5 and len(judge[3]["judge_outputs"]) == 5
    assert judge[11]["attempts"] == 3 and judge[11]["scores"] == _judge_scores(items[11]["prompt"])
    scored = [_judge_scores(it["prompt"]) for i, it in enumerate(items) if i != 3]
    dims = [(sum(s[d] for s in scored) / len(scored) - 1) * 25 for d in DIMENSIONS]
    assert res["score_q"] == pytest.approx(sum(dims) / 6)
    assert res["score"] == pytest.approx((res["score_l"] + res["score_q"]) / 2)
    s = res["scores"]
    assert s["n_judge_missing"] == 1 and s["n_judged"] == 120
    assert {k: g["n"] for k, g in s["by_bucket"].items()} == {
        "[0, 500)": 26, "[500, 2000)": 36, "[2000, 4000)": 31, "[4000, inf)": 27,
    }  # fmt: skip
    assert {k: g["n"] for k, g in s["by_language"].items()} == {"zh": 60, "en": 60}
    en_sl = [sl for it, sl in zip(items, expected_sl) if it["prompt"] in en]
    assert s["by_language"]["en"]["score_l"] == pytest.approx(sum(en_sl) / 60)
    for name in ("report.md", "length_scatter.png", "sl_by_bucket.png"):
        assert (out / name).stat().st_size > 0
    assert "| [4000, inf) | 27 |" in (out / "report.md").read_text()

    # Request bodies: sampling settings reach the servers; repetition_penalty travels in the body (extra_body).
    bodies = srv.requests
    policy = [b for b in bodies if b["model"] == "policy"]
    assert all(b["max_tokens"] == 32768 and b["temperature"] == 0.5 for b in policy)
    assert all(b["repetition_penalty"] == 1.05 for b in policy)
    assert all(b["max_tokens"] == 1024 and b["temperature"] == 0.5 for b in bodies if b["model"] == "judge")

    # evalscope's policy (unparsed -> 3 everywhere), recomputed without any new request.
    with OpenAIServer(backend.handler) as srv2:
        assert main(_args(srv2, out, "--stage", "eval_l", "eval_q", "--missing", "as_3")) == 0
        assert srv2.requests == []
    as3 = json.loads((out / "results.json").read_text())
    scored3 = scored + [dict.fromkeys(DIMENSIONS, 3)]
    dims3 = [(sum(s[d] for s in scored3) / 120 - 1) * 25 for d in DIMENSIONS]
    assert as3["score_q"] == pytest.approx(sum(dims3) / 6)


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_evalscope_task_file(tmp_path, fmt):
    import yaml

    items = _read(LBW)[:10]
    backend = FakeBackend(items, poison="", never="", twice="")
    with OpenAIServer(backend.handler, latency=(0.0, 0.01)) as srv:
        cfg = {
            "stage": ["infer", "eval_l"],
            "model": "policy",
            "input_data_path": str(LBW),
            "output_dir": str(tmp_path / "out"),
            "infer_config": {
                "openai_api_base": srv.base_url + "/chat/completions",  # evalscope gives the full endpoint
                "is_chat": True,
                "verbose": False,
                "generation_kwargs": {"max_new_tokens": 4096, "temperature": 0.7, "repetition_penalty": 1.1},
                "proc_num": 4,
            },
            "eval_config": {
                "openai_api_key": None,
                "openai_api_base": "https://api.openai.com/v1/chat/completions",
                "openai_gpt_model": "gpt-4o-2024-05-13",
                "generation_kwargs": {"max_new_tokens": 1024, "temperature": 0.5, "stop": None},
                "proc_num": 16,
            },
        }
        path = tmp_path / f"task.{fmt}"
        path.write_text(yaml.safe_dump(cfg) if fmt == "yaml" else json.dumps(cfg))
        assert main(["--task_cfg", str(path), "--limit", "10"]) == 0
    assert len(srv.requests) == 10
    assert all(
        b["max_tokens"] == 4096 and b["temperature"] == 0.7 and b["repetition_penalty"] == 1.1
        for b in srv.requests
    )
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (
        res["n_predictions"] == 10
        and res["score_q"] is None
        and res["config"]["judge_model"] == "gpt-4o-2024-05-13"
    )
    want = [length_score(it["length"], _actual(it["prompt"], it["length"])) for it in items]
    assert res["score_l"] == pytest.approx(sum(want) / 10)


@pytest.mark.skipif(not RULER.exists(), reason=f"{RULER} not found")
def test_longwrite_ruler_output_length_per_required_length(tmp_path):
    items = _read(RULER)
    with OpenAIServer(lambda b: _text_of_length(b["messages"][0]["content"], 7), latency=(0.0, 0.01)) as srv:
        # 7 units whatever was asked: easy to check per required length
        args = ["--stage", "infer", "eval_l", "--model", "policy", "--base_url", srv.base_url]
        args += ["--input", str(RULER), "--output_dir", str(tmp_path), "--concurrency", "8"]
        assert main(args) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    by_len = res["scores"]["by_required_length"]
    assert sorted(by_len, key=int) == ["1000", "2000", "5000", "10000", "20000", "30000"]
    assert all(g["n"] == 8 and g["mean_output_length"] == 7 for g in by_len.values())
    assert {k: g["n"] for k, g in res["scores"]["by_language"].items()} == {"zh": 24, "en": 24}
    assert res["lang_source"] == "script of the prompt" and len(items) == 48
    assert "## Output length per required length" in (tmp_path / "report.md").read_text()

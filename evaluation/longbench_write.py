"""LongBench-Write / LongWrite-Ruler runner: infer -> eval_l -> eval_q -> results.json, report.md, plots.

    python -m evaluation.longbench_write --stage infer eval_l eval_q \
        --model NAME --base_url http://127.0.0.1:8000/v1 \
        --judge_model gpt-4o-2024-05-13 --judge_base_url https://api.openai.com/v1 \
        --input longbench_write.jsonl --output_dir out/ --concurrency 16

An evalscope task file (``--task_cfg cfg.yaml|json``, keys stage, model, input_data_path, output_dir,
infer_config, eval_config; the older flat keys too) runs unchanged; flags given on the command line win over it.
Outputs go straight into output_dir (evalscope adds a per-model subfolder; we do not).
Exit status: 0 when every stage finished every item, 1 when some items failed (rerun to resume), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import sys
from dataclasses import asdict

from data_gen.jsonl import read_appended
from data_gen.llm import LLMClient
from data_gen.quality import DEFAULT_JUDGE_MODEL, MISSING_POLICIES, load_judge_template
from evaluation.records import assign_languages, latest_by_idx, load_prompts, text_hash
from evaluation.report import markdown_report, plot_length, summarize
from evaluation.stages import StageStats, run_infer_engine, run_infer_openai, run_judge

log = logging.getLogger("evaluation.longbench_write")

STAGES = ("infer", "eval_l", "eval_q")
DEFAULTS: dict = {
    "stage": list(STAGES),
    "model": None,
    "base_url": None,
    "api_key": None,
    "judge_model": DEFAULT_JUDGE_MODEL,
    "judge_base_url": None,
    "judge_api_key": None,
    "input": None,
    "en_file": None,
    "output_dir": None,
    "limit": None,
    "concurrency": 8,
    "judge_concurrency": None,
    "max_new_tokens": 32768,
    "temperature": 0.5,
    "top_p": None,
    "repetition_penalty": 1.0,
    "judge_temperature": 0.5,
    "judge_max_tokens": 1024,
    "judge_attempts": 5,
    "judge_prompt": None,
    "judge_stop": None,
    "missing": "exclude",
    "timeout": 600.0,
    "max_retries": 5,
    "retry_backoff": 1.0,
    "engine_checkpoint": None,
    "device": None,
    "dtype": None,
    "seed": 42,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evaluation.longbench_write", description=__doc__.split("\n")[0]
    )
    a = p.add_argument
    # default=None everywhere: "not given" must be told apart from a value, so a task file can fill it.
    a("--task_cfg", help="evalscope-style task file (.yaml/.yml/.json)")
    a("--stage", nargs="+", choices=STAGES, help="stages to run (default: all)")
    a("--model", help="model under test: served model name (also the report label)")
    a("--base_url", help="OpenAI-compatible base URL of the model under test, e.g. http://127.0.0.1:8000/v1")
    a("--api_key", help="key for --base_url (default: env OPENAI_API_KEY, else 'EMPTY')")
    a("--judge_model", help=f"judge model (default {DEFAULT_JUDGE_MODEL})")
    a("--judge_base_url", help="OpenAI-compatible base URL of the judge (default: OpenAI)")
    a("--judge_api_key", help="key for the judge (default: env OPENAI_API_KEY)")
    a("--input", help="benchmark JSONL (longbench_write.jsonl or longwrite_ruler.jsonl)")
    a(
        "--en_file",
        help="English-output subset (default: longbench_write_en.jsonl next to --input, if present)",
    )
    a("--output_dir", help="where pred.jsonl, judge.jsonl, results.json, report.md and plots go")
    a("--limit", type=int, help="only the first N prompts (smoke runs)")
    a("--concurrency", type=int, help="parallel requests to the model under test (default 8)")
    a("--judge_concurrency", type=int, help="parallel judge requests (default: --concurrency)")
    a("--max_new_tokens", type=int, help="default 32768")
    a("--temperature", type=float, help="default 0.5")
    a("--top_p", type=float)
    a("--repetition_penalty", type=float, help="sent in extra_body when != 1.0 (vLLM); default 1.0")
    a("--judge_temperature", type=float, help="default 0.5")
    a("--judge_max_tokens", type=int, help="default 1024")
    a("--judge_attempts", type=int, help="judge calls per item until the reply parses (default 5)")
    a("--judge_prompt", help="judge template with $INST$/$RESPONSE$ (default: data_gen/prompts/judge.txt)")
    a(
        "--missing",
        choices=MISSING_POLICIES,
        help="unparsed judge items: exclude (official) | as_3 (evalscope)",
    )
    a("--timeout", type=float, help="seconds per request (default 600)")
    a("--max_retries", type=int, help="client retries on 429/5xx/timeouts (default 5)")
    a("--retry_backoff", type=float, help="backoff base in seconds (default 1.0)")
    a("--engine_checkpoint", help="generate with engine.models from this checkpoint instead of --base_url")
    a("--device", help="device for --engine_checkpoint (default: cuda if available, else cpu)")
    a("--dtype", help="dtype for --engine_checkpoint (default bfloat16 on cuda, else float32)")
    a("--seed", type=int, help="sampling seed base for --engine_checkpoint (default 42)")
    return p


def _strip_endpoint(url: str | None) -> str | None:
    # evalscope configs give the full endpoint; the openai client wants the base.
    if url and url.rstrip("/").endswith("/chat/completions"):
        return url.rstrip("/")[: -len("/chat/completions")]
    return url


def load_task_cfg(path: str) -> dict:
    """Map an evalscope longbench_write task file onto our option names."""
    if not os.path.isfile(path):
        raise ValueError(f"task file not found: {path}")
    if not path.endswith((".yaml", ".yml", ".json")):
        raise ValueError(f"task file must be .yaml, .yml or .json: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text) or {}
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError: say which file, not a traceback
        raise ValueError(f"task file {path} does not parse: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"task file {path} must hold a mapping of keys, got {type(raw).__name__}")
    infer = raw.get("infer_config") or {}
    if infer.get("is_chat") is False:
        raise ValueError(
            "infer_config.is_chat = false (completions endpoint) is not supported; use a chat model"
        )
    ev = raw.get("eval_config") or {}
    igen = infer.get("generation_kwargs") or raw.get("infer_generation_kwargs") or {}
    egen = ev.get("generation_kwargs") or raw.get("eval_generation_kwargs") or {}
    cfg = {
        "stage": raw.get("stage"),
        "model": raw.get("model") or raw.get("model_id_or_path"),
        "input": raw.get("input_data_path"),
        "output_dir": raw.get("output_dir"),
        "base_url": _strip_endpoint(infer.get("openai_api_base")),
        "api_key": infer.get("openai_api_key"),
        "concurrency": infer.get("proc_num") or raw.get("proc_num"),
        "max_new_tokens": igen.get("max_new_tokens"),
        "temperature": igen.get("temperature"),
        "top_p": igen.get("top_p"),
        "repetition_penalty": igen.get("repetition_penalty"),
        "judge_model": ev.get("openai_gpt_model") or raw.get("openai_gpt_model"),
        "judge_base_url": _strip_endpoint(ev.get("openai_api_base")),
        "judge_api_key": ev.get("openai_api_key") or raw.get("openai_api_key"),
        "judge_concurrency": ev.get("proc_num") or raw.get("proc_num"),
        "judge_max_tokens": egen.get("max_new_tokens"),
        "judge_temperature": egen.get("temperature"),
        "judge_stop": egen.get("stop"),
    }
    if isinstance(cfg["stage"], str):
        cfg["stage"] = [cfg["stage"]]
    return {k: v for k, v in cfg.items() if v is not None}


def resolve_config(argv: list[str] | None) -> dict:
    args = build_parser().parse_args(argv)
    cfg = dict(DEFAULTS)
    if args.task_cfg:
        cfg.update(load_task_cfg(args.task_cfg))
    cfg.update({k: v for k, v in vars(args).items() if v is not None and k != "task_cfg"})
    bad = [s for s in cfg["stage"] if s not in STAGES]
    if bad:
        raise ValueError(f"unknown stage(s) {bad}; choose from {STAGES}")
    if not cfg["input"]:
        raise ValueError(
            "--input is required (or input_data_path in the task file; evalscope's null means its bundled "
            "copy, and we ship no data: e.g. --input ../shared/data/longwriter/longbench_write.jsonl)"
        )
    if not cfg["output_dir"]:
        raise ValueError("--output_dir is required (or output_dir in the task file)")
    if "infer" in cfg["stage"] and not cfg["engine_checkpoint"] and not cfg["model"]:
        raise ValueError("stage infer needs --model (and --base_url) or --engine_checkpoint")
    if cfg["engine_checkpoint"] and cfg["repetition_penalty"] != 1.0:
        raise ValueError("--engine_checkpoint generation has no repetition_penalty; leave it at 1.0")
    if cfg["en_file"] is None:
        sibling = os.path.join(os.path.dirname(os.path.abspath(cfg["input"])), "longbench_write_en.jsonl")
        cfg["en_file"] = sibling if os.path.exists(sibling) else None
    cfg["model"] = cfg["model"] or os.path.basename(os.path.normpath(cfg["engine_checkpoint"] or "model"))
    cfg["judge_concurrency"] = cfg["judge_concurrency"] or cfg["concurrency"]
    return cfg


async def _with_client(cfg: dict, model: str, base_url: str | None, api_key: str | None, stage) -> StageStats:
    """Run ``stage(client)`` with a fresh LLMClient and record the client's token/request totals on its stats."""
    client = LLMClient(
        model,
        base_url=base_url,
        api_key=api_key,
        timeout=cfg["timeout"],
        max_retries=cfg["max_retries"],
        backoff_base=cfg["retry_backoff"],
    )
    async with client:
        stats = await stage(client)
        stats.usage = dict(client.usage)
        return stats


def _infer_openai(cfg: dict, items: list[dict], pred_path: str) -> StageStats:
    extra = {}
    if cfg["repetition_penalty"] != 1.0:  # 1.0 is every server's no-op; OpenAI itself rejects the field
        extra["repetition_penalty"] = cfg["repetition_penalty"]
    stage = functools.partial(
        run_infer_openai,
        items,
        pred_path,
        concurrency=cfg["concurrency"],
        max_new_tokens=cfg["max_new_tokens"],
        temperature=cfg["temperature"],
        top_p=cfg["top_p"],
        extra_body=extra,
    )
    return asyncio.run(_with_client(cfg, cfg["model"], cfg["base_url"], cfg["api_key"], stage))


def _judge(cfg: dict, preds: list[dict], judge_path: str) -> StageStats:
    stage = functools.partial(
        run_judge,
        preds,
        judge_path,
        template=load_judge_template(cfg["judge_prompt"]),
        concurrency=cfg["judge_concurrency"],
        temperature=cfg["judge_temperature"],
        max_tokens=cfg["judge_max_tokens"],
        max_attempts=cfg["judge_attempts"],
        extra_body={"stop": cfg["judge_stop"]} if cfg["judge_stop"] else {},
    )
    return asyncio.run(
        _with_client(cfg, cfg["judge_model"], cfg["judge_base_url"], cfg["judge_api_key"], stage)
    )


def run(cfg: dict) -> dict:
    """Run the configured stages; returns the results dict also written to results.json."""
    out = cfg["output_dir"]
    os.makedirs(out, exist_ok=True)
    pred_path, judge_path = os.path.join(out, "pred.jsonl"), os.path.join(out, "judge.jsonl")
    items = load_prompts(cfg["input"], cfg["limit"])
    lang_source = assign_languages(items, cfg["en_file"])
    stats: dict[str, StageStats] = {}

    if "infer" in cfg["stage"]:
        if cfg["engine_checkpoint"]:
            import torch

            device = cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
            stats["infer"] = run_infer_engine(
                items,
                pred_path,
                cfg["engine_checkpoint"],
                max_new_tokens=cfg["max_new_tokens"],
                temperature=cfg["temperature"],
                top_p=cfg["top_p"] if cfg["top_p"] is not None else 1.0,
                device=device,
                dtype=cfg["dtype"] or ("bfloat16" if device.startswith("cuda") else "float32"),
                seed=cfg["seed"],
            )
        else:
            stats["infer"] = _infer_openai(cfg, items, pred_path)

    wanted = {it["idx"]: it for it in items}
    # Keep only rows of this input (and --limit); take prompt metadata (lang) from the input, not the file.
    preds = [
        {**row, "lang": wanted[idx]["lang"]}
        for idx, row in sorted(latest_by_idx(read_appended(pred_path), items).items())
        if idx in wanted and row.get("prompt") == wanted[idx]["prompt"]
    ]
    if not preds:
        raise ValueError(f"no predictions for {cfg['input']} in {pred_path}: run the infer stage first")

    judged = None
    if "eval_q" in cfg["stage"]:
        stats["eval_q"] = _judge(cfg, preds, judge_path)
        rows = latest_by_idx(read_appended(judge_path))
        judged = {
            p["idx"]: rows[p["idx"]]
            for p in preds
            if p["idx"] in rows and rows[p["idx"]].get("response_sha") == text_hash(p["response"])
        }

    scores = summarize(preds, judged, missing=cfg["missing"], with_l="eval_l" in cfg["stage"])
    n_failed = len(items) - len(preds)
    results = {
        "benchmark": os.path.basename(cfg["input"]),
        "config": {k: v for k, v in cfg.items() if "api_key" not in k},  # never write keys to disk
        "n_prompts": len(items),
        "n_predictions": len(preds),
        "n_infer_failed": n_failed,
        "lang_source": lang_source,
        "stages": {
            k: {**asdict(v), "n_failed": len(v.failed), "failed": v.failed[:20]} for k, v in stats.items()
        },
        "score_l": scores.get("score_l"),
        "score_q": scores.get("score_q"),
        "score": scores.get("score"),
        "scores": scores,
    }
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, ensure_ascii=False, indent=2)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(markdown_report(results))
    if "eval_l" in cfg["stage"]:
        plot_length(scores, out)
    return results


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "openai", "matplotlib"):  # one INFO line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = resolve_config(argv)
        results = run(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                k: results[k]
                for k in ("score_l", "score_q", "score", "n_prompts", "n_predictions", "n_infer_failed")
            }
        )
    )
    failed = results["n_infer_failed"] + sum(s["n_failed"] for s in results["stages"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

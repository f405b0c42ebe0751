"""The two stages that call a model: inference (model under test) and judging (quality judge).

Both append one JSONL row per finished item and skip items already present, so a killed run resumes where it
stopped. Rows are keyed by "idx" (position in the input file); responses are written by the coroutine that
sent the prompt, so they stay paired with it whatever order the server answers in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from data_gen.jsonl import open_append, read_appended
from data_gen.length import count_words
from data_gen.llm import LLMError, chat_within_context
from data_gen.quality import judge_response
from evaluation.records import append_jsonl, latest_by_idx, text_hash

log = logging.getLogger(__name__)


@dataclass
class StageStats:
    done_before: int = 0  # found in the output file, skipped
    done_now: int = 0
    failed: list[dict] = field(default_factory=list)  # {"idx", "kind", "error"}; retried on the next run
    seconds: float = 0.0
    usage: dict = field(default_factory=dict)  # client token/request/retry totals, when a client was used


def _pending(items: list[dict], pred_path: str) -> tuple[list[dict], StageStats]:
    """The items with no prediction in ``pred_path`` yet, and stats counting the others as done before.
    A prediction written for a different prompt under the same idx is an error (another input file)."""
    existing = latest_by_idx(read_appended(pred_path), items)
    by_idx = {it["idx"]: it for it in items}
    for idx, row in existing.items():
        if idx in by_idx and row.get("prompt") != by_idx[idx]["prompt"]:
            raise ValueError(
                f"{pred_path} holds a different prompt for idx {idx}: it was written for another input file; "
                "use a fresh --output_dir"
            )
    todo = [it for it in items if it["idx"] not in existing]
    return todo, StageStats(done_before=len(items) - len(todo))


def _pred_row(item: dict, text: str, finish_reason: str | None, completion_tokens: int) -> dict:
    return {
        **item,
        "response": text,
        "response_length": count_words(text),
        "finish_reason": finish_reason,
        "completion_tokens": completion_tokens,
    }


async def _append_concurrently(
    todo: list[dict], path: str, stats: StageStats, concurrency: int, desc: str, produce
) -> None:
    """Await ``produce(item)`` for every item, ``concurrency`` at a time, appending each row it returns to
    ``path`` as soon as it is ready; an LLMError leaves the item unwritten (retried on the next run)."""
    sem = asyncio.Semaphore(max(1, concurrency))
    bar = tqdm(total=len(todo), desc=desc, disable=not todo)

    with open_append(path) as f:

        async def one(item: dict) -> None:
            async with sem:
                try:
                    row = await produce(item)
                except LLMError as e:
                    log.error("%s idx %s failed (%s): %s", desc, item["idx"], e.kind, e)
                    stats.failed.append({"idx": item["idx"], "kind": e.kind, "error": str(e)})
                else:
                    append_jsonl(f, row)
                    stats.done_now += 1
                bar.update(1)

        await asyncio.gather(*(one(it) for it in todo))
    bar.close()


async def run_infer_openai(
    items: list[dict],
    pred_path: str,
    client,
    *,
    concurrency: int,
    max_new_tokens: int,
    temperature: float | None,
    top_p: float | None = None,
    extra_body: dict | None = None,
) -> StageStats:
    """Generate a response for every item not yet in ``pred_path`` through ``client`` (data_gen.llm.LLMClient)."""
    t0 = time.perf_counter()
    todo, stats = _pending(items, pred_path)
    extra = extra_body or {}

    async def infer(item: dict) -> dict:
        messages = [{"role": "user", "content": item["prompt"]}]
        c, budget = await chat_within_context(
            client,
            messages,
            max_tokens=max_new_tokens,
            label=f"idx {item['idx']}",
            temperature=temperature,
            top_p=top_p,
            **extra,
        )
        return {**_pred_row(item, c.text, c.finish_reason, c.completion_tokens), "max_tokens": budget}

    await _append_concurrently(todo, pred_path, stats, concurrency, "infer", infer)
    stats.seconds = time.perf_counter() - t0
    return stats


def run_infer_engine(
    items: list[dict],
    pred_path: str,
    checkpoint: str,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 42,
) -> StageStats:
    """Generate with the project's own model (small models; no batching), same output rows as the server path."""
    import torch  # lazy: the OpenAI path needs neither torch nor the engine

    from engine.data import encode_generation_prompt, load_tokenizer
    from engine.models import generate, load_pretrained

    t0 = time.perf_counter()
    todo, stats = _pending(items, pred_path)
    if not todo:
        return stats
    model = load_pretrained(checkpoint, dtype=getattr(torch, dtype), device=device)
    model.eval()
    tokenizer = load_tokenizer(checkpoint)
    with open_append(pred_path) as f, torch.inference_mode():
        for item in tqdm(todo, desc="infer (engine)"):
            prompt_ids = encode_generation_prompt(tokenizer, [{"role": "user", "content": item["prompt"]}])
            new_ids = generate(
                model,
                prompt_ids,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed + item["idx"],  # per-item seed: resuming does not change earlier samples
            )
            finish = "length" if len(new_ids) >= max_new_tokens else "stop"
            append_jsonl(f, _pred_row(item, tokenizer.decode(new_ids), finish, len(new_ids)))
            stats.done_now += 1
    stats.seconds = time.perf_counter() - t0
    return stats


async def run_judge(
    preds: list[dict],
    judge_path: str,
    client,
    template: str,
    *,
    concurrency: int,
    temperature: float,
    max_tokens: int,
    max_attempts: int = 5,
    extra_body: dict | None = None,
) -> StageStats:
    """Judge every prediction not yet judged (for its current response) into ``judge_path``.

    A reply that never parses within ``max_attempts`` is recorded with "scores": null (final: counted as
    missing); a transport failure that survives the client's retries writes nothing, so the next run retries.
    """
    t0 = time.perf_counter()
    existing = latest_by_idx(read_appended(judge_path))
    todo = [
        p for p in preds if existing.get(p["idx"], {}).get("response_sha") != text_hash(p["response"])
    ]  # a regenerated response invalidates its old judgement
    stats = StageStats(done_before=len(preds) - len(todo))

    async def judge(pred: dict) -> dict:
        res = await judge_response(
            client,
            template,
            pred["prompt"],
            pred["response"],
            temperature=temperature,
            max_tokens=max_tokens,
            max_attempts=max_attempts,
            **(extra_body or {}),
        )
        if res.scores is None:
            log.warning("judge reply for idx %s never parsed (%d attempts)", pred["idx"], res.attempts)
        return {
            "idx": pred["idx"],
            "prompt": pred["prompt"],
            "length": pred["length"],
            "response_sha": text_hash(pred["response"]),
            "scores": res.scores,
            "attempts": res.attempts,
            # the parsed reply, or every failed one (to debug the parser or the prompt)
            "judge_outputs": res.outputs[-1:] if res.scores is not None else res.outputs,
        }

    await _append_concurrently(todo, judge_path, stats, concurrency, "judge", judge)
    stats.seconds = time.perf_counter() - t0
    return stats

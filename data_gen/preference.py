"""Preference pairs for DPO (LongWriter-9B-DPO's data): K samples per instruction, scored, best vs a random other.

    python -m data_gen.preference --input instructions.jsonl --output pairs.jsonl \\
        --model NAME --base_url URL --num_samples 4 --temperature 0.8 --concurrency 32 \\
        --judge_model gpt-4o-2024-05-13 --judge_base_url URL [--score mean|length|quality] [--seed 42]

Per instruction: K samples of the model (one request each, the conversation as given), each judged by the
judge model (S_Q; not with --score length) and length-scored (S_L) against the required length;
data_gen.pairs ranks them and builds the ms-swift row {"messages": [..., chosen], "rejected_response"}.

Robust as AgentWrite: every sample and judgement is appended to `<output>.progress.jsonl` (fsync'd) before it
is used, so a killed run re-asks nothing that was answered; the output is rewritten atomically in input order
at the end of every run (also on Ctrl-C); items that fail go to `<output>.failures.jsonl`, never into the data,
and a rerun tries them again, reusing the samples and judgements they already have. `<output>.summary.json`
and `<output>.scores.png` describe the pairs.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from tqdm import tqdm

from data_gen.instructions import Instruction, read_instructions
from data_gen.jsonl import AppendLog, write_objects
from data_gen.llm import (
    Completion,
    LLMClient,
    LLMError,
    add_retry_flags,
    chat_within_context,
    retry_options,
)
from data_gen.pairs import SCORES, TRUNCATED, choose_pair, pair_row, plot_pairs, score_sample, summarize
from data_gen.pairs import summary_line as pairs_line
from data_gen.pairs import truncated as is_truncated
from data_gen.quality import DEFAULT_JUDGE_MODEL, judge_response, load_judge_template

log = logging.getLogger(__name__)


@dataclass
class SampleConfig:
    num_samples: int = 4
    concurrency: int = 8  # sampling requests in flight
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    sample_attempts: int = 3  # an empty answer is asked again, this many times in all
    seed: int = 42  # of the rejected draw and of the per-request sampling seeds
    request_seed: bool = True  # send each sample request its own "seed" (vLLM / OpenAI: reproducible samples)
    score: str = "mean"
    truncated: str = "rejected_only"


@dataclass
class JudgeConfig:
    template: str
    concurrency: int = 8
    temperature: float = 0.5
    max_tokens: int = 1024
    attempts: int = 5  # judge calls per sample until the reply parses


def request_seed(seed: int, key: str, k: int, attempt: int) -> int:
    """Sampling seed of one request: distinct per sample (identical seeds would give K identical samples on a
    seeded server), the same on a rerun, changed only when an empty answer is asked again."""
    return int(hashlib.sha256(f"{seed}|{key}|{k}|{attempt}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


class Progress:
    """Append-only JSONL of every answer, fsync'd before use:
    {"key", "kind": "sample", "k", "text", "finish_reason", "completion_tokens"} and
    {"key", "kind": "judge", "k", "sha" (of the judged text), "scores", "attempts", "output"}."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.log = AppendLog(path)  # a torn last line (a run killed mid-write) is skipped: asked again
        self.samples: dict[str, dict[int, dict]] = {}
        self.judged: dict[str, dict[int, dict]] = {}
        self._sha: dict[tuple[str, int], str] = {}  # of each sample's text, hashed once
        for rec in self.log.rows:
            try:
                if rec["kind"] == "sample" and isinstance(rec["text"], str):
                    self._set_sample(rec["key"], int(rec["k"]), rec)
                elif (
                    rec["kind"] == "judge" and isinstance(rec["scores"], dict) and isinstance(rec["sha"], str)
                ):
                    self.judged.setdefault(rec["key"], {})[int(rec["k"])] = rec
                else:
                    raise ValueError(rec["kind"])
            except (KeyError, TypeError, ValueError):
                log.warning("%s: skipping unreadable progress record %.200r", self.log.path, rec)

    def _set_sample(self, key: str, k: int, rec: dict) -> None:
        self.samples.setdefault(key, {})[k] = rec
        self._sha[key, k] = _sha(rec["text"])

    def sample(self, key: str, k: int) -> dict | None:
        return self.samples.get(key, {}).get(k)

    def judgement(self, key: str, k: int) -> dict | None:
        """The judgement of sample k's current text (one of an older text does not count)."""
        rec = self.judged.get(key, {}).get(k)
        return rec if rec is not None and rec["sha"] == self._sha.get((key, k)) else None

    def add_sample(self, key: str, k: int, comp: Completion) -> dict:
        rec = {"key": key, "kind": "sample", "k": k, "text": comp.text, "finish_reason": comp.finish_reason}
        rec["completion_tokens"] = comp.completion_tokens
        self.log.append(rec)
        self._set_sample(key, k, rec)
        return rec

    def add_judgement(self, key: str, k: int, text: str, scores: dict, attempts: int, output: str) -> None:
        rec = {"key": key, "kind": "judge", "k": k, "sha": _sha(text), "scores": scores, "attempts": attempts}
        rec["output"] = output  # the parsed reply, for auditing the judge
        self.log.append(rec)
        self.judged.setdefault(key, {})[k] = rec

    def close(self) -> None:
        self.log.close()


class ItemFailed(Exception):
    def __init__(self, kind: str, reason: str, stage: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.stage = stage


@dataclass
class RunStats:
    done: int = 0  # pairs of items completed in this run
    failed: int = 0  # items without a pair: this run's errors, and items that cannot make one
    skipped: int = 0  # pairs of items complete before this run (no requests)
    samples_asked: int = 0
    samples_reused: int = 0  # from the progress file
    judged_now: int = 0
    judged_reused: int = 0
    usage: dict = field(default_factory=dict)
    judge_usage: dict = field(default_factory=dict)
    summary: dict = field(
        default_factory=dict
    )  # of the output file (pairs.summarize), written as summary.json

    def line(self) -> str:
        u, j = self.usage, self.judge_usage
        return (
            f"preference: done {self.done} / failed {self.failed} / skipped {self.skipped} | samples asked "
            f"{self.samples_asked}, reused {self.samples_reused} | judged {self.judged_now}, reused "
            f"{self.judged_reused} | model tokens: prompt {u.get('prompt_tokens', 0)}, completion "
            f"{u.get('completion_tokens', 0)}, retries {u.get('retries', 0)} | judge requests "
            f"{j.get('requests', 0)}, retries {j.get('retries', 0)}"
        )


def _needs_judge(sample: dict, cfg: SampleConfig) -> bool:
    # A truncated sample that can never be in a pair is not worth a judge call.
    return cfg.score != "length" and not (cfg.truncated == "drop" and is_truncated(sample))


def _complete(item: Instruction, progress: Progress, cfg: SampleConfig) -> bool:
    for k in range(cfg.num_samples):
        s = progress.sample(item.key, k)
        if s is None or (_needs_judge(s, cfg) and progress.judgement(item.key, k) is None):
            return False
    return True


def _failure(item: Instruction, kind: str, reason: str, stage: str) -> dict:
    # stage: input (nothing asked), sample, judge (a request failed: retried by the next run) or pair (final)
    return {
        "index": item.index,
        "id": item.id,
        "prompt": item.prompt,
        "stage": stage,
        "kind": kind,
        "reason": reason,
    }


def build_pair(item: Instruction, progress: Progress, cfg: SampleConfig, **meta: object) -> dict | str:
    """The pair row of a complete item from its recorded samples and judgements, or why it has none."""
    texts, samples = {}, []
    for k in range(cfg.num_samples):
        rec = progress.sample(item.key, k)
        judged = progress.judgement(item.key, k)
        texts[k] = rec["text"]
        s = score_sample(
            k, rec["text"], rec["finish_reason"], item.length, judged and judged["scores"], cfg.score
        )
        samples.append(s | {"completion_tokens": rec.get("completion_tokens")})
    pick = choose_pair(samples, f"{cfg.seed}|{item.key}", cfg.truncated)
    if isinstance(pick, str):
        return pick
    meta |= {"score": cfg.score, "seed": cfg.seed, "length_source": item.length_source}
    return pair_row(item.id, item.messages, item.length, texts, samples, *pick, **meta)


async def run(
    items: list[Instruction],
    client: LLMClient,
    judge_client: LLMClient | None,
    output: str | os.PathLike,
    *,
    cfg: SampleConfig | None = None,
    judge: JudgeConfig | None = None,
    progress_path: str | os.PathLike | None = None,
    failures_path: str | os.PathLike | None = None,
    summary_path: str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = None,
    show_progress: bool | None = None,
) -> RunStats:
    """Sample and judge what is missing, then write the pairs (input order), failures and summary."""
    cfg = cfg or SampleConfig()
    if cfg.score not in SCORES or cfg.truncated not in TRUNCATED:
        raise ValueError(f"score must be one of {SCORES} and truncated one of {TRUNCATED}")
    if cfg.num_samples < 2 or cfg.concurrency < 1 or cfg.sample_attempts < 1:
        raise ValueError("num_samples must be >= 2, concurrency and sample_attempts >= 1")
    if cfg.score != "length" and (judge is None or judge_client is None):
        raise ValueError(f"score {cfg.score!r} needs a judge (judge_client and judge)")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    side = lambda path, suffix: Path(path or output.with_name(output.name + suffix))
    progress = Progress(side(progress_path, ".progress.jsonl"))
    stats = RunStats()
    failures: dict[int, dict] = {}
    for it in items:  # nothing to rank by: fail before spending requests
        if cfg.score == "length" and it.length is None:
            reason = "no required length (no 'length' field and none stated in the prompt) and --score length"
            failures[it.index] = _failure(it, "no_length", reason, "input")
    todo = [it for it in items if it.index not in failures and not _complete(it, progress, cfg)]
    complete_before = {it.index for it in items if it.index not in failures} - {it.index for it in todo}
    sem = asyncio.Semaphore(cfg.concurrency)
    judge_sem = asyncio.Semaphore(judge.concurrency if judge is not None else 1)
    hide = None if show_progress is None else not show_progress  # None: bars only on a terminal
    bar = tqdm(total=len(todo) * cfg.num_samples, desc="samples", unit="sample", disable=hide)

    async def ask(item: Instruction, k: int) -> dict:
        for attempt in range(cfg.sample_attempts):
            extra = {"seed": request_seed(cfg.seed, item.key, k, attempt)} if cfg.request_seed else {}
            async with sem:  # a context-length 400 is asked once more with the room it leaves
                comp, _ = await chat_within_context(
                    client,
                    item.messages,
                    label=f"item {item.id} sample {k}",
                    temperature=cfg.temperature,
                    max_tokens=cfg.max_tokens,
                    top_p=cfg.top_p,
                    **extra,
                )
            if comp.text.strip():  # never an empty (or refused, content=None) answer as a response
                stats.samples_asked += 1
                return progress.add_sample(item.key, k, comp)
            log.warning("item %s sample %d: empty answer; asking again", item.id, k)
        raise ItemFailed("parse", f"sample {k}: empty answer after {cfg.sample_attempts} attempts", "sample")

    async def judge_one(item: Instruction, k: int, text: str) -> None:
        assert judge is not None and judge_client is not None
        async with judge_sem:
            try:
                res = await judge_response(
                    judge_client,
                    judge.template,
                    item.prompt,
                    text,
                    temperature=judge.temperature,
                    max_tokens=judge.max_tokens,
                    max_attempts=judge.attempts,
                )
            except LLMError as e:
                raise ItemFailed(e.kind, f"sample {k}: {e}", "judge") from e
        if res.scores is None:
            last = res.outputs[-1] if res.outputs else ""
            reason = (
                f"sample {k}: no judge reply parsed in {res.attempts} attempts; last reply {last[:300]!r}"
            )
            raise ItemFailed("parse", reason, "judge")
        progress.add_judgement(item.key, k, text, res.scores, res.attempts, res.outputs[-1])
        stats.judged_now += 1

    async def one_sample(item: Instruction, k: int) -> None:
        rec = progress.sample(item.key, k)
        if rec is None:
            try:
                rec = await ask(item, k)
            except LLMError as e:
                raise ItemFailed(e.kind, f"sample {k}: {e}", "sample") from e
        else:
            stats.samples_reused += 1
        if _needs_judge(rec, cfg):
            if progress.judgement(item.key, k) is None:
                await judge_one(item, k, rec["text"])
            else:
                stats.judged_reused += 1
        bar.update(1)

    async def one(item: Instruction) -> None:
        # Siblings keep going when one sample fails: what they get is recorded and reused by the next run.
        results = await asyncio.gather(
            *(one_sample(item, k) for k in range(cfg.num_samples)), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        for e in errors:
            if not isinstance(e, Exception):  # CancelledError, KeyboardInterrupt: not an item failure
                raise e
        if not errors:
            return
        e = errors[0]
        if not isinstance(e, ItemFailed):  # a bug or an odd server answer: isolate it to this item
            log.error("item %s failed unexpectedly", item.id, exc_info=e)
            e = ItemFailed("other", f"{type(e).__name__}: {e}", "sample")
        more = f" (and {len(errors) - 1} more failed samples)" if len(errors) > 1 else ""
        failures[item.index] = _failure(item, e.kind, f"{e}{more}", e.stage)

    finished = False
    try:
        await asyncio.gather(*(one(it) for it in todo))
        finished = True
    finally:
        # Also on cancellation / Ctrl-C: every complete item (this run or earlier) lands in the output.
        bar.close()
        meta = {"model": client.model, "judge_model": judge_client.model if judge_client else None}
        rows = []
        for it in items:
            if it.index in failures or not _complete(it, progress, cfg):
                continue
            pair = build_pair(it, progress, cfg, **meta)
            if isinstance(pair, str):
                failures[it.index] = _failure(it, "no_pair", pair, "pair")
            else:
                rows.append(pair)
                if it.index in complete_before:
                    stats.skipped += 1
                else:
                    stats.done += 1
        write_objects(output, rows)
        failed = [failures[i] for i in sorted(failures)]
        write_objects(side(failures_path, ".failures.jsonl"), failed)
        progress.close()
        stats.failed = len(failed)
        stats.usage = dict(client.usage)
        stats.judge_usage = dict(judge_client.usage) if judge_client else {}
        stats.summary = summarize(rows, failed)
        run_stats = {k: v for k, v in asdict(stats).items() if k != "summary"}
        with open(side(summary_path, ".summary.json"), "w", encoding="utf-8") as f:
            json.dump({"run": run_stats, **stats.summary}, f, ensure_ascii=False, indent=2)
        if finished and plot_path is not None:
            plot_pairs(rows, plot_path)
    return stats


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_gen.preference", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--input", required=True, help='JSONL rows {"prompt" | "messages", optional "id", "length"}')
    a("--output", required=True, help="ms-swift DPO JSONL, rewritten in input order")
    a("--model", required=True, help="the model to sample (served name of the SFT model)")
    a("--base_url", default=None, help="e.g. http://localhost:8000/v1 (default: OpenAI)")
    a("--api_key", default=None, help="default: env OPENAI_API_KEY, else 'EMPTY'")
    a("--num_samples", type=int, default=4, help="samples per instruction (LongWriter: 4)")
    a("--temperature", type=float, default=None, help="sampling temperature (default: the server's)")
    a("--top_p", type=float, default=None)
    a("--max_tokens", type=int, default=None, help="per sample (default: the server's limit)")
    a("--concurrency", type=int, default=8, help="sampling requests in flight")
    a("--judge_model", default=DEFAULT_JUDGE_MODEL, help=f"quality judge (default {DEFAULT_JUDGE_MODEL})")
    a("--judge_base_url", default=None, help="OpenAI-compatible base URL of the judge (default: OpenAI)")
    a("--judge_api_key", default=None, help="key for the judge (default: env OPENAI_API_KEY)")
    a("--judge_concurrency", type=int, default=None, help="judge requests in flight (default: --concurrency)")
    a("--judge_temperature", type=float, default=0.5)
    a("--judge_max_tokens", type=int, default=1024)
    a("--judge_attempts", type=int, default=5, help="judge calls per sample until the reply parses")
    a(
        "--judge_prompt",
        default=None,
        help="judge template with $INST$/$RESPONSE$ (default: data_gen/prompts)",
    )
    a("--score", choices=SCORES, default="mean", help="ranking: (S_L + S_Q) / 2 (default), S_L or S_Q")
    a(
        "--truncated",
        choices=TRUNCATED,
        default="rejected_only",
        help="samples cut off by max_tokens: never chosen, may be rejected (default) | never in a pair",
    )
    a("--seed", type=int, default=42, help="seeds the rejected draw and the per-request sampling seeds")
    a(
        "--request_seed",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send each sample request its own seed (--no-request_seed for servers that reject the field)",
    )
    a("--sample_attempts", type=int, default=3, help="asks for a sample that comes back empty")
    add_retry_flags(p)
    a("--progress", default=None, help="sidecar (default <output>.progress.jsonl)")
    a("--failures", default=None, help="default <output>.failures.jsonl")
    a("--no_plot", action="store_true", help="skip <output>.scores.png")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.num_samples < 2:
        parser.error(f"--num_samples must be >= 2 (a pair needs two samples), got {args.num_samples}")
    for name in ("concurrency", "judge_concurrency", "judge_attempts", "sample_attempts"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_retries < 0:
        parser.error(f"--max_retries must be >= 0, got {args.max_retries}")
    try:
        items = read_instructions(args.input)
        template = load_judge_template(args.judge_prompt) if args.score != "length" else ""
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    retry = retry_options(args)
    client = LLMClient(args.model, base_url=args.base_url, api_key=args.api_key, **retry)
    judge_client = judge = None
    if args.score != "length":
        judge_client = LLMClient(
            args.judge_model, base_url=args.judge_base_url, api_key=args.judge_api_key, **retry
        )
        judge = JudgeConfig(
            template,
            concurrency=args.judge_concurrency or args.concurrency,
            temperature=args.judge_temperature,
            max_tokens=args.judge_max_tokens,
            attempts=args.judge_attempts,
        )
    cfg = SampleConfig(**{f.name: getattr(args, f.name) for f in fields(SampleConfig)})  # same names
    plot = None if args.no_plot else f"{args.output}.scores.png"

    async def go() -> RunStats:
        try:
            return await run(
                items,
                client,
                judge_client,
                args.output,
                cfg=cfg,
                judge=judge,
                progress_path=args.progress,
                failures_path=args.failures,
                plot_path=plot,
            )
        finally:
            await client.aclose()
            if judge_client is not None:
                await judge_client.aclose()

    stats = asyncio.run(go())
    print(stats.line(), flush=True)
    print(f"preference: {pairs_line(stats.summary)}", flush=True)
    print(f"preference: summary in {args.output}.summary.json" + (f", plot {plot}" if plot else ""))
    if stats.failed:
        failures = args.failures or f"{args.output}.failures.jsonl"
        print(
            f"preference: {stats.failed} items without a pair (reasons in {failures}); a rerun asks again what "
            "failed on a request (stage sample / judge); stage pair and input failures are final"
        )
    return 1 if stats.failed else 0


if __name__ == "__main__":
    sys.exit(main())

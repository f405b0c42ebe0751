"""AgentWrite (LongWriter, Bai et al. 2024): long responses written as a plan, then one paragraph at a time.

    python -m data_gen.agentwrite --input instructions.jsonl --output data.jsonl \\
        --model NAME --base_url URL [--api_key KEY | env OPENAI_API_KEY] --concurrency N

Per item: (1) ask for a plan, one line per paragraph with its main point and word count, sized to the
required length; (2) for each paragraph in order, send the instruction, the whole plan, the text so far
and the paragraph to write; the response is the paragraphs joined by blank lines.

Items run concurrently (one asyncio semaphore slot per item), the paragraphs of an item sequentially.
Every answer is appended to a sidecar `<output>.progress.jsonl` (fsync'd) before it is used, so a
killed run loses no answered request: a rerun asks nothing already answered and skips finished items.
The output is rewritten atomically (tmp + rename) in input order at the end of every run (also on
Ctrl-C). Failed items go to `<output>.failures.jsonl` with their reason, never into the data; they are
tried again by the next run, reusing whatever they had already got.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from tqdm import tqdm

from data_gen.instructions import Instruction, read_instructions
from data_gen.jsonl import AppendLog, write_objects
from data_gen.length import count_words, script_language
from data_gen.llm import LLMClient, LLMError, add_retry_flags, retry_options
from data_gen.plan import (
    MAX_PARAGRAPHS,
    PlanError,
    PlanStep,
    fill_word_counts,
    parse_plan,
    render_plan,
    render_step,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------
@functools.cache
def load_prompt(name: str) -> str:
    return resources.files("data_gen").joinpath("prompts", f"{name}.txt").read_text(encoding="utf-8")


def fill(template: str, **values: str) -> str:
    """Substitute {name} fields in one pass, so braces inside the values (an instruction quoting
    code, a paragraph containing "{plan}") are never touched."""
    return re.sub(
        r"\{(\w+)\}", lambda m: values[m.group(1)] if m.group(1) in values else m.group(0), template
    )


def _length_hint(length: int | None, lang: str) -> str:
    if lang == "zh":
        if length is None:
            return "请根据任务需要确定全文的总字数，并据此分配各段字数。"
        return f"全文总长度要求约为{length}字，各段字数之和应大致等于{length}字。"
    if length is None:
        return "Pick a total length that suits the task and share it out among the paragraphs."
    return f"The finished text should be about {length} words long: the paragraph word counts should add up to about {length}."


def plan_messages(item: Item, max_paragraphs: int) -> list[dict]:
    content = fill(
        load_prompt(f"plan_{item.lang}"),
        instruction=item.prompt,
        length_hint=_length_hint(item.length, item.lang),
        max_paragraphs=str(max_paragraphs),
    )
    return [{"role": "user", "content": content}]


def write_messages(item: Item, steps: list[PlanStep], written: list[str], i: int) -> list[dict]:
    so_far = "\n\n".join(written) if written else ("（尚未开始）" if item.lang == "zh" else "(nothing yet)")
    content = fill(
        load_prompt(f"write_{item.lang}"),
        instruction=item.prompt,
        plan=render_plan(steps, item.lang),
        written=so_far,
        step=render_step(i + 1, steps[i], item.lang),
    )
    return [{"role": "user", "content": content}]


# ---------------------------------------------------------------------------------------------
# items and the progress sidecar
# ---------------------------------------------------------------------------------------------
@dataclass
class Item(Instruction):
    lang: str = "en"  # of the plan and write prompts: the instruction's script


def read_items(path: str | os.PathLike) -> list[Item]:
    """The rows of `path` (`{"prompt", "id"?, "length"?}`; data_gen.instructions has the rules)."""
    return [
        Item(**vars(it), lang=script_language(it.prompt))
        for it in read_instructions(path, allow_messages=False)
    ]


@dataclass
class ItemState:
    steps: list[PlanStep] | None = None
    paragraphs: dict[int, str] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.steps is not None and all(i in self.paragraphs for i in range(len(self.steps)))

    def response(self) -> str:
        assert self.steps is not None
        return "\n\n".join(self.paragraphs[i] for i in range(len(self.steps)))


class Progress:
    """Append-only JSONL of every answer: {"key", "kind": "plan", "steps": [[main_point, words], ...]}
    and {"key", "kind": "paragraph", "i", "text"}. Each line is flushed and fsync'd before use."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.log = AppendLog(path)  # a torn last line (a run killed mid-write) is skipped: asked again
        self.path = self.log.path
        self.states: dict[str, ItemState] = {}
        for rec in self.log.rows:
            try:
                state = self.states.setdefault(rec["key"], ItemState())
                if rec["kind"] == "plan":
                    state.steps = [PlanStep(m, w) for m, w in rec["steps"]]
                elif rec["kind"] == "paragraph":
                    state.paragraphs[int(rec["i"])] = rec["text"]
            except (KeyError, TypeError, ValueError):
                log.warning("%s: skipping unreadable progress record %.200r", self.path, rec)

    def state(self, key: str) -> ItemState:
        return self.states.setdefault(key, ItemState())

    def add_plan(self, key: str, steps: list[PlanStep]) -> None:
        self.log.append({"key": key, "kind": "plan", "steps": [[s.main_point, s.words] for s in steps]})
        self.state(key).steps = steps

    def add_paragraph(self, key: str, i: int, text: str) -> None:
        self.log.append({"key": key, "kind": "paragraph", "i": i, "text": text})
        self.state(key).paragraphs[i] = text

    def close(self) -> None:
        self.log.close()


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
class ItemFailed(Exception):
    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass
class Summary:
    done: int = 0  # finished in this run
    failed: int = 0
    skipped: int = 0  # already finished by an earlier run
    usage: dict = field(default_factory=dict)

    def line(self) -> str:
        u = self.usage
        return (
            f"agentwrite: done {self.done} / failed {self.failed} / skipped {self.skipped} | "
            f"tokens: prompt {u.get('prompt_tokens', 0)}, completion {u.get('completion_tokens', 0)} | "
            f"requests {u.get('requests', 0)}, retries {u.get('retries', 0)}"
        )


@dataclass
class GenConfig:
    concurrency: int = 8
    temperature: float | None = None
    max_tokens: int | None = None
    plan_attempts: int = 3  # an unparsable plan (or an empty paragraph) is asked again this many times in all
    max_paragraphs: int = MAX_PARAGRAPHS


async def _plan(client: LLMClient, item: Item, cfg: GenConfig) -> list[PlanStep]:
    last = ""
    for _ in range(cfg.plan_attempts):
        comp = await client.chat(
            plan_messages(item, cfg.max_paragraphs), temperature=cfg.temperature, max_tokens=cfg.max_tokens
        )
        try:
            if comp.finish_reason == "length":  # cut off by max_tokens: its last steps are missing
                raise PlanError("plan cut off by max_tokens (finish_reason=length)")
            return fill_word_counts(parse_plan(comp.text, cfg.max_paragraphs), item.length)
        except PlanError as e:
            last = str(e)
            log.warning("item %s: unusable plan (%s); asking again", item.id, last[:120])
    raise ItemFailed("parse", f"no usable plan after {cfg.plan_attempts} attempts: {last}")


async def _paragraph(
    client: LLMClient, item: Item, steps: list[PlanStep], written: list[str], i: int, cfg: GenConfig
) -> str:
    for _ in range(cfg.plan_attempts):
        comp = await client.chat(
            write_messages(item, steps, written, i), temperature=cfg.temperature, max_tokens=cfg.max_tokens
        )
        if comp.text.strip():
            return comp.text.strip()
        log.warning("item %s paragraph %d: empty answer; asking again", item.id, i + 1)
    raise ItemFailed("parse", f"paragraph {i + 1}: empty answer after {cfg.plan_attempts} attempts")


async def generate_item(
    client: LLMClient, item: Item, progress: Progress, cfg: GenConfig, bar: tqdm | None = None
) -> str:
    """Plan (unless the sidecar has one) and write the missing paragraphs of one item, in order."""
    state = progress.state(item.key)
    if state.steps is None:
        progress.add_plan(item.key, await _plan(client, item, cfg))
    steps = state.steps
    assert steps is not None
    if bar is not None:  # the paragraph total grows as plans arrive
        bar.total += len(steps)
        bar.update(len(state.paragraphs))
    for i in range(len(steps)):
        if i in state.paragraphs:
            continue
        written = [state.paragraphs[j] for j in range(i)]
        progress.add_paragraph(item.key, i, await _paragraph(client, item, steps, written, i, cfg))
        if bar is not None:
            bar.update(1)
    return state.response()


def output_row(item: Item, response: str) -> dict:
    return {
        "id": item.id,
        "messages": [{"role": "user", "content": item.prompt}, {"role": "assistant", "content": response}],
        "length": item.length,
        "response_length": count_words(response),
    }


async def run(
    items: list[Item],
    client: LLMClient,
    output: str | os.PathLike,
    *,
    cfg: GenConfig | None = None,
    progress_path: str | os.PathLike | None = None,
    failures_path: str | os.PathLike | None = None,
    show_progress: bool | None = None,
) -> Summary:
    """Generate every item not finished yet; write output rows (input order) and the failures file."""
    cfg = cfg or GenConfig()
    if cfg.concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {cfg.concurrency}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    progress = Progress(progress_path or output.with_name(output.name + ".progress.jsonl"))
    failures_path = Path(failures_path or output.with_name(output.name + ".failures.jsonl"))
    summary = Summary()
    failures: list[dict] = []
    todo = [it for it in items if not progress.state(it.key).finished]
    summary.skipped = len(items) - len(todo)
    sem = asyncio.Semaphore(cfg.concurrency)
    hide = None if show_progress is None else not show_progress  # None: bars only on a terminal
    bar_items = tqdm(total=len(items), initial=summary.skipped, desc="items", position=0, disable=hide)
    bar_paras = tqdm(total=0, desc="paragraphs", unit="para", position=1, disable=hide)

    async def one(item: Item) -> None:
        async with sem:
            try:
                await generate_item(client, item, progress, cfg, bar_paras)
                summary.done += 1
            except (LLMError, ItemFailed) as e:
                failures.append(_failure(item, e.kind, str(e)))
            except Exception as e:  # a bug or an odd server answer: isolate it to this item
                log.exception("item %s failed unexpectedly", item.id)
                failures.append(_failure(item, "other", f"{type(e).__name__}: {e}"))
            finally:
                bar_items.update(1)

    try:
        await asyncio.gather(*(one(it) for it in todo))
    finally:
        # Also on cancellation / Ctrl-C: every finished item (this run or earlier) lands in the output.
        rows = [
            output_row(it, progress.state(it.key).response())
            for it in items
            if progress.state(it.key).finished
        ]
        write_objects(output, rows)
        failures.sort(key=lambda r: r["index"])
        write_objects(failures_path, failures)
        progress.close()
        bar_paras.close()
        bar_items.close()
        summary.failed = len(failures)
        summary.usage = dict(client.usage)
    return summary


def _failure(item: Item, kind: str, reason: str) -> dict:
    return {"index": item.index, "id": item.id, "prompt": item.prompt, "kind": kind, "reason": reason}


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_gen.agentwrite", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help='JSONL rows {"prompt", optional "id", "length"}')
    p.add_argument("--output", required=True, help="LongWriter-format JSONL, rewritten in input order")
    p.add_argument("--model", required=True)
    p.add_argument("--base_url", default=None, help="e.g. http://localhost:8000/v1 (default: OpenAI)")
    p.add_argument("--api_key", default=None, help="default: env OPENAI_API_KEY, else 'EMPTY'")
    p.add_argument("--concurrency", type=int, default=8, help="items in flight")
    add_retry_flags(p)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--max_tokens", type=int, default=None, help="per request (plan or paragraph)")
    p.add_argument(
        "--plan_attempts", type=int, default=3, help="asks for an unparsable plan / empty paragraph"
    )
    p.add_argument("--max_paragraphs", type=int, default=MAX_PARAGRAPHS)
    p.add_argument("--progress", default=None, help="sidecar (default <output>.progress.jsonl)")
    p.add_argument("--failures", default=None, help="default <output>.failures.jsonl")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("concurrency", "plan_attempts", "max_paragraphs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_retries < 0:
        parser.error(f"--max_retries must be >= 0, got {args.max_retries}")
    try:
        items = read_items(args.input)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    client = LLMClient(args.model, base_url=args.base_url, api_key=args.api_key, **retry_options(args))
    cfg = GenConfig(
        concurrency=args.concurrency,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        plan_attempts=args.plan_attempts,
        max_paragraphs=args.max_paragraphs,
    )

    async def go() -> Summary:
        try:
            return await run(
                items, client, args.output, cfg=cfg, progress_path=args.progress, failures_path=args.failures
            )
        finally:
            await client.aclose()

    summary = asyncio.run(go())
    print(summary.line(), flush=True)
    if summary.failed:
        failures = args.failures or f"{args.output}.failures.jsonl"
        print(f"agentwrite: {summary.failed} failed items (reasons in {failures}); a rerun tries them again")
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""JSONL records of an evaluation run: prompts in, predictions and judgements out, append-only and resumable."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import IO

from data_gen.jsonl import iter_objects
from data_gen.length import script_language


def append_jsonl(f: IO[str], row: dict) -> None:
    # One write + flush per row: a crash loses at most the row being written, never pairs two halves.
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()


def load_prompts(path: str, limit: int | None = None) -> list[dict]:
    """Benchmark rows ({"prompt", "length", ...}) with "idx" = position in the file, the key of every output."""
    if not os.path.isfile(path):
        raise ValueError(f"input file not found: {path}")
    # Strict, unlike read_appended: a skipped bad line would shift the idx of every row after it.
    rows = []
    for lineno, row in iter_objects(path):
        if "prompt" not in row or "length" not in row:
            raise ValueError(f"{path}:{lineno}: needs 'prompt' and 'length', got keys {sorted(row)}")
        if not isinstance(row["length"], int | float) or row["length"] <= 0:
            raise ValueError(f"{path}:{lineno}: 'length' must be a positive number, got {row['length']!r}")
        row.setdefault("idx", len(rows))
        rows.append(row)
    if not rows:
        raise ValueError(f"no prompts in {path}")
    return rows[:limit] if limit is not None else rows


def text_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def latest_by_idx(rows: Iterable[dict], items: list[dict] | None = None) -> dict[int, dict]:
    """Last row per idx (a rerun of an item appends; the newest wins).

    Rows without "idx" (a pred.jsonl written by the official pred.py or by evalscope) are matched to
    ``items`` by their prompt text, so such a file dropped into output_dir can be scored as is.
    """
    by_prompt = {it["prompt"]: it["idx"] for it in items or []}
    out: dict[int, dict] = {}
    for row in rows:
        idx = row["idx"] if "idx" in row else by_prompt.get(row.get("prompt"))
        if idx is not None:
            out[idx] = {**row, "idx": idx}
    return out


def assign_languages(items: list[dict], en_file: str | None) -> str:
    """Set item["lang"]; returns how it was decided.

    LongBench-Write's language is the *output* language, given by membership in longbench_write_en.jsonl (one
    Chinese prompt there asks for an English essay). Inputs without such a list (LongWrite-Ruler, custom
    sets) fall back to the script of the prompt.
    """
    en_prompts = {r["prompt"] for _, r in iter_objects(en_file)} if en_file else set()
    if en_prompts and any(it["prompt"] in en_prompts for it in items):
        for it in items:
            it["lang"] = "en" if it["prompt"] in en_prompts else "zh"
        return f"membership in {os.path.basename(en_file)}"
    for it in items:
        it["lang"] = script_language(it["prompt"])
    return "script of the prompt"

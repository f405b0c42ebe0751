"""JSONL files: strict input (every non-blank line a JSON object; errors name the file and line), whole-file
output written atomically, and append-only logs that survive a run killed mid-write (data_gen.agentwrite's
progress, evaluation's pred/judge files)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)


def iter_objects(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of `path`."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON object ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def write_objects(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write `rows` as JSONL to a temporary file, fsync it and rename it over `path`: a reader (or a
    killed run) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_appended(path: str | os.PathLike) -> list[dict]:
    """Rows of an append-only JSONL log ([] if there is none yet). A run killed mid-write leaves a torn last
    line, possibly cut inside a multi-byte character: it is skipped with a warning, and asked for again."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d is not valid JSON (interrupted write?); ignored", path, lineno)
    return rows


def open_append(path: str | os.PathLike) -> IO[str]:
    """Open a JSONL log for appending, first ending a torn last line so the next row starts on its own line."""
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        if torn:
            with open(path, "a", encoding="utf-8") as f:
                f.write("\n")
    return open(path, "a", encoding="utf-8")


class AppendLog:
    """An append-only JSONL log of answers: `rows` holds what earlier runs wrote (read_appended), `append`
    writes one row and fsyncs it before returning, so an answer is on disk before anything uses it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.rows = read_appended(self.path)
        self._f = open_append(self.path)

    def append(self, row: dict) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

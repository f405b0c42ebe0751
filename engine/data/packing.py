"""Packing documents into rows of at most max_length tokens, and collating rows into micro-batches.

The plan is best-fit decreasing (each document, longest first, goes to the open row whose free space it
fills most tightly), which on LongWriter-like lengths leaves < 1% of the capacity empty because the
many short documents fill the gaps the long ones leave. Lengths are sorted in coarse buckets with a
random order inside each bucket drawn from (seed, epoch) (falling back to the exact sort when that
needs more rows), and the finished rows and the documents inside each row are shuffled with the same
generator: the plan is deterministic per (seed, epoch), and documents meet different neighbours each
epoch.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, 0x9AC4])


def pack_lengths(
    lengths: Sequence[int], max_length: int, *, seed: int = 0, epoch: int = 0
) -> list[list[int]]:
    """Plan rows: a list of rows, each a list of sample indices whose lengths sum to <= max_length.

    Every index appears exactly once. Raises ValueError for a length < 1 or > max_length.
    """
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    n = len(lengths)
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if n == 0:
        return []
    if lengths.min() < 1:
        i = int(np.argmin(lengths))
        raise ValueError(f"sample {i} has length {int(lengths[i])}; packing needs lengths >= 1")
    if lengths.max() > max_length:
        i = int(np.argmax(lengths))
        raise ValueError(
            f"sample {i} has {int(lengths[i])} tokens > max_length={max_length}: "
            "delete or truncate over-long samples before packing"
        )
    rng = _rng(seed, epoch)
    tiebreak = rng.permutation(n)
    # Exact best-fit decreasing packs tightest, but with few equal lengths it puts the same documents
    # together every epoch. Sorting by coarse length buckets (random order inside a bucket) changes the
    # groups from epoch to epoch; keep the coarsest bucketing that needs no more rows than the exact plan.
    rows = _best_fit(lengths, np.lexsort((tiebreak, -lengths)), max_length)
    for bucket in (max_length // 112, max_length // 448):
        if bucket > 1:
            coarse = _best_fit(lengths, np.lexsort((tiebreak, -(lengths // bucket))), max_length)
            if len(coarse) <= len(rows):
                rows = coarse
                break

    # Shuffle rows, and documents within each row, so neither order follows the sort.
    key = rng.permutation(n)
    rows = [sorted(r, key=key.__getitem__) for r in rows]
    return [rows[j] for j in rng.permutation(len(rows)).tolist()]


def _best_fit(lengths: np.ndarray, order: np.ndarray, max_length: int) -> list[list[int]]:
    """Put each document (in `order`) into the open row whose free space it fills most tightly."""
    smallest = int(lengths.min())
    rows: list[list[int]] = []
    # Open rows sorted by free space: free[k] is the space of row open_ids[k] (parallel lists for bisect).
    free: list[int] = []
    open_ids: list[int] = []
    for i in order.tolist():
        size = int(lengths[i])
        k = bisect.bisect_left(free, size)
        if k < len(free):  # tightest open row that still fits
            row_id = open_ids.pop(k)
            space = free.pop(k) - size
            rows[row_id].append(i)
        else:
            row_id = len(rows)
            rows.append([i])
            space = max_length - size
        # A row with less space than the shortest document can never take another one: close it.
        if space >= smallest:
            k = bisect.bisect_left(free, space)
            free.insert(k, space)
            open_ids.insert(k, row_id)
    return rows


def packing_efficiency(lengths: Sequence[int], plan: Sequence[Sequence[int]], max_length: int) -> float:
    """Real tokens / row capacity (len(plan) * max_length)."""
    if not plan:
        return 0.0
    lengths = np.asarray(lengths, dtype=np.int64)
    return float(sum(int(lengths[r].sum()) for r in map(list, plan)) / (len(plan) * max_length))


def collate_rows(
    rows: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]],
    *,
    length: int | None = None,
    pad_token_id: int = 0,
) -> dict:
    """Rows of (input_ids, labels) documents -> one micro-batch.

    Each row is its documents back to back, then padding up to T (= `length`, default the longest row;
    an empty row is a filler row of padding only). Padding has labels -100, positions 0.. and its own
    segment in cu_seqlens, so it never joins a real document's attention.
    Returns input_ids/position_ids/labels [B, T] (long), cu_seqlens int32 [segments + 1] over the
    flattened B * T tokens, max_seqlen, num_target_tokens and doc_lengths (real documents only, in order).
    """
    row_lens = [sum(len(ids) for ids, _ in row) for row in rows]
    T = length if length is not None else max([1, *row_lens])
    if max(row_lens, default=0) > T:
        raise ValueError(f"a row holds {max(row_lens)} tokens > micro-batch length {T}")
    B = len(rows)
    input_ids = np.full((B, T), pad_token_id, dtype=np.int64)
    labels = np.full((B, T), -100, dtype=np.int64)
    positions = np.zeros((B, T), dtype=np.int64)
    segments: list[int] = []
    doc_lengths: list[int] = []
    for b, row in enumerate(rows):
        t = 0
        for ids, lab in row:
            n = len(ids)
            input_ids[b, t : t + n] = ids
            labels[b, t : t + n] = lab
            positions[b, t : t + n] = np.arange(n)
            segments.append(n)
            doc_lengths.append(n)
            t += n
        if t < T:  # trailing padding: a pseudo-document of its own
            positions[b, t:] = np.arange(T - t)
            segments.append(T - t)
    cu = np.zeros(len(segments) + 1, dtype=np.int32)
    np.cumsum(segments, out=cu[1:])
    return {
        "input_ids": torch.from_numpy(input_ids),
        "position_ids": torch.from_numpy(positions),
        "labels": torch.from_numpy(labels),
        "cu_seqlens": torch.from_numpy(cu),
        "max_seqlen": int(max(segments)),
        "num_target_tokens": int((labels != -100).sum()),
        "doc_lengths": doc_lengths,
    }

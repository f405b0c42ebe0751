"""Packing documents into rows of at most max_length tokens, and collating rows into micro-batches.

The plan fills one row at a time, as exactly as the lengths allow: a row starts with one of the longest
documents left (drawn at random within 1/8 of the longest, so long documents never wait for the end),
then takes documents that leave room for at least the shortest one left, and closes the moment one
document, or a pair, fills the rest exactly. On LongWriter-like lengths nearly every row is full to the
token, so the plan has at most ceil(total tokens / max_length) + 1 rows (tests/data/test_data_packing.py
asserts it on several mixtures). Every random choice comes from a generator seeded by (seed, epoch):
the plan is deterministic per (seed, epoch), and documents meet different neighbours each epoch. The
rows, and the documents inside each row, are shuffled with the same generator.
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
    rows = _fill_rows(lengths, max_length, rng)
    # Shuffle rows, and documents within each row, so neither order follows the filling.
    key = rng.permutation(n)
    rows = [sorted(r, key=key.__getitem__) for r in rows]
    return [rows[j] for j in rng.permutation(len(rows)).tolist()]


def _fill_rows(lengths: np.ndarray, max_length: int, rng: np.random.Generator) -> list[list[int]]:
    """Rows filled one after the other (module docstring); each document is taken exactly once."""
    count = np.bincount(lengths, minlength=max_length + 1)  # documents left of each length
    stacks: dict[int, list[int]] = {}  # length -> its documents left, in a random order
    for i in rng.permutation(len(lengths)).tolist():
        stacks.setdefault(int(lengths[i]), []).append(i)
    sizes = sorted(stacks)  # the lengths that still have a document, ascending

    def take(size: int) -> int:
        count[size] -= 1
        if count[size] == 0:
            del sizes[bisect.bisect_left(sizes, size)]
        return stacks[size].pop()

    def largest_upto(g: int) -> int:  # the longest length left that is <= g (some is: sizes[0] <= g)
        return sizes[bisect.bisect_right(sizes, g) - 1]

    def exact_pair(g: int) -> int | None:
        """A length a such that a + (g - a) == g with both documents left, drawn at random, or None."""
        a = np.flatnonzero(count[: g + 1])  # (k,) lengths left <= g
        b = g - a
        ok = (a <= b) & (count[b] > 0) & ((a != b) | (count[a] >= 2))
        hits = np.flatnonzero(ok)
        return int(a[hits[rng.integers(len(hits))]]) if len(hits) else None

    rows: list[list[int]] = []
    while sizes:
        top = sizes[-1]
        first = bisect.bisect_left(sizes, top - top // 8)
        size = sizes[first + int(rng.integers(len(sizes) - first))]
        row, g = [take(size)], max_length - size  # g: the row's free tokens
        while sizes and sizes[0] <= g:
            if count[g]:  # one document fills the row exactly
                row.append(take(g))
                break
            if g <= 2 * largest_upto(g) and (a := exact_pair(g)) is not None:  # two fill it exactly
                row += [take(a), take(g - a)]
                break
            # Else a document that leaves room for the shortest one left, drawn among those between half
            # that room and all of it (few documents per row, different neighbours every epoch); failing
            # that the longest that fits (the row then closes with fewer free tokens than any document).
            room = g - sizes[0]
            lo, hi = bisect.bisect_left(sizes, max(sizes[0], room // 2)), bisect.bisect_right(sizes, room)
            if hi > lo:
                a = sizes[lo + int(rng.integers(hi - lo))]
            else:
                a = sizes[hi - 1] if hi > 0 else largest_upto(g)
            row.append(take(a))
            g -= a
        rows.append(row)
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

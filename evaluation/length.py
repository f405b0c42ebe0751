"""Length side of LongBench-Write: the official measure and score (from data_gen.length) plus length buckets."""

from __future__ import annotations

import math

from data_gen.length import count_words, length_score

__all__ = ["BUCKETS", "bucket_label", "bucket_of", "count_words", "length_score"]

# Required-length buckets of the LongWriter paper (Table 1 columns): [0,500), [500,2000), [2000,4000), [4000,inf).
BUCKETS: tuple[tuple[float, float], ...] = ((0, 500), (500, 2000), (2000, 4000), (4000, math.inf))


def bucket_label(lo: float, hi: float) -> str:
    return f"[{lo:g}, {'inf' if math.isinf(hi) else f'{hi:g}'})"


def bucket_of(required: float) -> str:
    """Label of the bucket holding ``required`` (half-open on the right)."""
    for lo, hi in BUCKETS:
        if lo <= required < hi:
            return bucket_label(lo, hi)
    raise ValueError(f"required length must be >= 0, got {required!r}")

"""Preference pairs from K scored samples of one instruction (LongWriter's DPO data): pure functions.

score_sample   S_L (length_score of the required length), S_Q (the judge's six dimensions, (s - 1) x 25
               averaged, as LongBench-Write's S_q) and the ranking score: mean (S_L + S_Q) / 2, length,
               quality. An instruction without a required length has no S_L: "mean" is S_Q alone.
choose_pair    chosen = the best complete sample (ties: the lowest sample index), rejected = a random
               other, drawn by a generator seeded from (seed, item key) alone, so the pair does not depend
               on concurrency, on resumes or on other items. A truncated sample (finish_reason "length")
               is never chosen; it may be rejected (truncated="rejected_only") or is left out ("drop").
pair_row       the ms-swift DPO row: {"messages": [..., chosen], "rejected_response"} + metadata.
summarize      counts, score distributions, chosen-minus-rejected margins; plot_pairs draws them.
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from collections.abc import Iterable

from data_gen.length import count_words, length_score
from data_gen.quality import aggregate_quality

SCORES = ("mean", "length", "quality")
TRUNCATED = ("rejected_only", "drop")


def score_sample(
    k: int,
    text: str,
    finish_reason: str | None,
    required: int | None,
    quality: dict[str, float] | None,
    score: str = "mean",
) -> dict:
    """The metadata of one sample, its ranking score included ("score" None: it cannot be ranked)."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    n = count_words(text)
    sl = length_score(required, n) if required else None
    sq = aggregate_quality([quality])["score_q"] if quality is not None else None
    if score == "length":
        s = sl
    elif score == "quality" or sl is None:
        s = sq
    else:
        s = None if sq is None else (sl + sq) / 2
    return {
        "k": k,
        "response_length": n,
        "finish_reason": finish_reason,
        "score_l": sl,
        "score_q": sq,
        "quality": quality,
        "score": s,
    }


def truncated(sample: dict) -> bool:
    return sample["finish_reason"] == "length"


def choose_pair(samples: list[dict], rng_seed: str, policy: str = "rejected_only") -> tuple[int, int] | str:
    """(chosen k, rejected k) among scored samples (score_sample rows), or why no pair can be made."""
    if policy not in TRUNCATED:
        raise ValueError(f"truncated policy must be one of {TRUNCATED}, got {policy!r}")
    unscored = [s["k"] for s in samples if s["score"] is None and not (policy == "drop" and truncated(s))]
    assert not unscored, f"samples {unscored} have no score"
    complete = [s for s in samples if not truncated(s)]
    if not complete:
        return f"all {len(samples)} samples were cut off by max_tokens (finish_reason=length)"
    best = max(s["score"] for s in complete)
    chosen = min(s["k"] for s in complete if s["score"] == best)  # ties: the lowest sample index
    pool = sorted(
        s["k"] for s in samples if s["k"] != chosen and (policy == "rejected_only" or not truncated(s))
    )
    if not pool:
        n_cut = len(samples) - len(complete)
        return f"no sample to reject: {n_cut} of {len(samples)} were cut off by max_tokens and are dropped"
    return chosen, random.Random(rng_seed).choice(pool)


def pair_row(
    item_id: str,
    messages: list[dict],
    length: int | None,
    texts: dict[int, str],
    samples: list[dict],
    chosen: int,
    rejected: int,
    **meta: object,
) -> dict:
    """The ms-swift row; "preference" holds every sample's scores (and `meta`: the ranking, the seed...)."""
    by_k = {s["k"]: s for s in samples}
    return {
        "id": item_id,
        "messages": [*messages, {"role": "assistant", "content": texts[chosen]}],
        "rejected_response": texts[rejected],
        "length": length,
        "preference": {
            **meta,
            "chosen": chosen,
            "rejected": rejected,
            "margin": by_k[chosen]["score"] - by_k[rejected]["score"],
            "samples": samples,
        },
    }


# ---------------------------------------------------------------------------------------------
# summary and plot
# ---------------------------------------------------------------------------------------------
def distribution(values: Iterable[float | None]) -> dict:
    """n, mean and quantiles (nearest rank) of the values that are not None."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return {"n": 0}
    q = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))]
    return (
        {"n": len(xs), "mean": sum(xs) / len(xs), "min": xs[0]}
        | {f"p{round(p * 100)}": q(p) for p in (0.1, 0.5, 0.9)}
        | {"max": xs[-1]}
    )


def summarize(rows: list[dict], failures: list[dict]) -> dict:
    """Counts and distributions over the pair rows of an output file and the items that made no pair."""
    chosen = [r["preference"]["samples"][_pos(r, "chosen")] for r in rows]
    rejected = [r["preference"]["samples"][_pos(r, "rejected")] for r in rows]
    every = [s for r in rows for s in r["preference"]["samples"]]
    margins = [r["preference"]["margin"] for r in rows]
    out: dict = {
        "pairs": len(rows),
        "failed": len(failures),
        "failed_by_kind": dict(Counter(f["kind"] for f in failures)),
        "pairs_without_length": sum(r["length"] is None for r in rows),
        "samples": len(every),
        "truncated_samples": sum(truncated(s) for s in every),
        "truncated_rejected": sum(truncated(s) for s in rejected),
        "zero_margin_pairs": sum(m == 0 for m in margins),
        "negative_margin_pairs": sum(m < 0 for m in margins),  # a truncated rejected that scored higher
        "margin": distribution(margins),
    }
    for key in ("score", "score_l", "score_q", "response_length"):
        out[key] = {
            "chosen": distribution(s[key] for s in chosen),
            "rejected": distribution(s[key] for s in rejected),
            "all": distribution(s[key] for s in every),
        }
    return out


def _pos(row: dict, which: str) -> int:
    k = row["preference"][which]
    return next(i for i, s in enumerate(row["preference"]["samples"]) if s["k"] == k)


def summary_line(summary: dict) -> str:
    def mean(d: dict) -> str:
        return f"{d['mean']:.1f}" if d.get("n") else "-"

    s = summary["score"]
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(summary["failed_by_kind"].items()))
    return (
        f"pairs {summary['pairs']}, failed {summary['failed']}"
        + (f" ({kinds})" if kinds else "")
        + f" | score chosen {mean(s['chosen'])}, rejected {mean(s['rejected'])}, margin mean "
        f"{mean(summary['margin'])} ({summary['zero_margin_pairs']} zero, {summary['negative_margin_pairs']} negative)"
        f" | without length "
        f"{summary['pairs_without_length']}, truncated samples {summary['truncated_samples']}"
    )


def plot_pairs(rows: list[dict], path: str | os.PathLike) -> None:
    """Three panels: chosen and rejected score histograms, the margin histogram, S_L vs S_Q of every sample."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    chosen = [r["preference"]["samples"][_pos(r, "chosen")] for r in rows]
    rejected = [r["preference"]["samples"][_pos(r, "rejected")] for r in rows]
    bins = list(range(0, 105, 5))
    for group, color, label in ((chosen, "tab:green", "chosen"), (rejected, "tab:red", "rejected")):
        axes[0].hist([s["score"] for s in group], bins=bins, alpha=0.5, color=color, label=label)
    axes[0].set(xlabel="score", ylabel="pairs", title="chosen and rejected scores")
    axes[0].legend()
    margins = [r["preference"]["margin"] for r in rows]
    lo = 5 * math.floor(min([0.0, *margins]) / 5)  # a cut-off rejected can outscore the chosen: margin < 0
    axes[1].hist(margins, bins=list(range(lo, 105, 5)), color="tab:blue")
    axes[1].set(xlabel="chosen - rejected score", ylabel="pairs", title="margins")
    for group, color, label in ((chosen, "tab:green", "chosen"), (rejected, "tab:red", "rejected")):
        pts = [
            (s["score_l"], s["score_q"])
            for s in group
            if s["score_l"] is not None and s["score_q"] is not None
        ]
        if pts:
            axes[2].scatter(*zip(*pts), s=14, alpha=0.5, c=color, label=label)
    axes[2].set(xlim=(-3, 103), ylim=(-3, 103), xlabel="S_L", ylabel="S_Q", title="length vs quality")
    if axes[2].has_data():
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

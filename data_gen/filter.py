"""Filter LongWriter-format data by stated required length and by length score.

    python -m data_gen.filter --input data.jsonl --output filtered.jsonl \\
        --strategy required_length --strategy length_score --min_length_score 80 [--extractor evalscope]

Strategies run in the order given; the count after each is printed. A log-log scatter plot of required vs
response length, before and after the length filtering, is written next to the output
(`<output stem>.length_scatter.png`). The logic lives in data_gen/filters.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from data_gen.filters import (
    EXTRACTORS,
    StageReport,
    filter_length_score,
    filter_required_length,
    last_assistant_message,
)
from data_gen.jsonl import iter_objects, write_objects
from data_gen.length import count_words

STRATEGIES = ("required_length", "length_score")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    rows = []
    for lineno, row in iter_objects(path):
        if not isinstance(row.get("messages"), list):
            raise ValueError(f"{path}:{lineno}: expected a LongWriter row {{'messages': [...]}}")
        rows.append(row)
    return rows


def length_pairs(samples: list[dict]) -> tuple[list[int], list[int]]:
    """(required, response) lengths of the samples where both are known and positive (log axes)."""
    xs, ys = [], []
    for s in samples:
        x = s.get("length")
        y = count_words(last_assistant_message(s))
        if x and x > 0 and y > 0:
            xs.append(x)
            ys.append(y)
    return xs, ys


def plot_lengths(before: list[dict], after: list[dict], path: str | os.PathLike) -> tuple[int, int]:
    """Write the before / after log-log scatter; returns the number of points in each panel."""
    import matplotlib

    matplotlib.use("Agg")  # headless; a no-op when a backend is already in use
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5.5), sharex=True, sharey=True)
    pairs = [length_pairs(before), length_pairs(after)]
    points = [v for xs, ys in pairs for v in xs + ys]
    lo, hi = (min(points) / 1.5, max(points) * 1.5) if points else (10, 1e5)
    for ax, (xs, ys), title in ((axes[0], pairs[0], "before"), (axes[1], pairs[1], "after")):
        ax.scatter(xs, ys, s=12, alpha=0.35, c="tab:red", edgecolors="none")
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="response = required")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("required length")
        ax.set_title(f"{title} filtering ({len(xs)} samples)")
        ax.grid(True, which="both", alpha=0.2)
    axes[0].set_ylabel("response length (count_words)")
    axes[0].legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return len(pairs[0][0]), len(pairs[1][0])


def apply_strategies(
    samples: list[dict], strategies: list[str], *, extractor: str = "default", min_length_score: float = 80.0
) -> tuple[list[dict], list[StageReport], list[dict]]:
    """Run the strategies in order; returns (kept, one report per stage, the samples the plot calls "before")."""
    input_samples = samples
    reports = []
    before: list[dict] | None = None
    for strategy in strategies:
        if strategy == "required_length":
            samples, report = filter_required_length(samples, extractor)
        elif strategy == "length_score":
            # "before" is what the length filter sees: lengths are known there (as in evalscope's plots)
            before = samples if before is None else before
            samples, report = filter_length_score(samples, min_length_score)
        else:
            raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
        reports.append(report)
    for s in samples:
        s["response_length"] = count_words(last_assistant_message(s))
    return samples, reports, input_samples if before is None else before


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_gen.filter", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--strategy", action="append", choices=STRATEGIES, help="repeat; run in the order given")
    p.add_argument("--min_length_score", type=float, default=80.0, help="keep SL >= this (inclusive)")
    p.add_argument("--extractor", choices=sorted(EXTRACTORS), default="default")
    p.add_argument(
        "--plot", default=None, help="scatter plot path (default <output stem>.length_scatter.png)"
    )
    p.add_argument("--no_plot", action="store_true")
    args = p.parse_args(argv)
    strategies = args.strategy or list(STRATEGIES)

    try:
        samples = read_jsonl(args.input)
        print(f"input: {len(samples)} samples", flush=True)
        kept, reports, before = apply_strategies(
            samples, strategies, extractor=args.extractor, min_length_score=args.min_length_score
        )
    except (OSError, ValueError) as e:  # a bad file or a sample without a user/assistant message
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in reports:
        print(r.line(), flush=True)
        for note in r.notes[:20]:
            print(f"  {note}")
        if len(r.notes) > 20:
            print(f"  ... and {len(r.notes) - 20} more")
    write_objects(args.output, kept)
    print(f"output: {len(kept)} samples -> {args.output}")
    if not args.no_plot:
        out = Path(args.output)
        plot = Path(args.plot) if args.plot else out.with_name(out.stem + ".length_scatter.png")
        n_before, n_after = plot_lengths(before, kept, plot)
        print(f"plot: {plot} (required vs response length, {n_before} points before, {n_after} after)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

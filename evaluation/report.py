"""Scores of a finished run (overall, per length bucket, per language, per required length), report and plots."""

from __future__ import annotations

import statistics
from collections.abc import Callable

from data_gen.quality import DIMENSIONS, aggregate_quality
from evaluation.length import BUCKETS, bucket_label, bucket_of, count_words, length_score

LANGS = ("zh", "en")


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _group(rows: list[dict], missing: str, with_l: bool, with_q: bool) -> dict:
    out: dict = {"n": len(rows)}
    lengths = [r["output_length"] for r in rows]
    out["mean_output_length"] = _mean(lengths)
    out["median_output_length"] = statistics.median(lengths) if lengths else None
    if with_l:
        out["score_l"] = _mean([r["sl"] for r in rows])
    if with_q:
        judged = [r for r in rows if r["judged"]]
        q = aggregate_quality([r["scores"] for r in judged], missing=missing)
        out.update(score_q=q["score_q"], n_judged=len(judged), n_judge_missing=q["n_missing"])
    if with_l and with_q:
        sl, sq = out["score_l"], out["score_q"]
        out["score"] = (sl + sq) / 2 if sl is not None and sq is not None else None
    return out


def summarize(
    preds: list[dict], judged: dict[int, dict] | None, *, missing: str = "exclude", with_l: bool = True
) -> dict:
    """Scores of ``preds`` (pred.jsonl rows); ``judged`` maps idx -> judge.jsonl row (None: no eval_q).

    SL is recomputed from the response text (count_words), not read from "response_length".
    """
    with_q = judged is not None
    rows = []
    for p in preds:
        n = count_words(p["response"])
        j = (judged or {}).get(p["idx"])
        rows.append(
            {
                "idx": p["idx"],
                "length": p["length"],
                "lang": p.get("lang"),
                "bucket": bucket_of(p["length"]),
                "output_length": n,
                "sl": length_score(p["length"], n),
                "judged": j is not None,
                "scores": j["scores"] if j is not None else None,
            }
        )

    def by(key: Callable[[dict], object], keys: list) -> dict:
        return {str(k): _group([r for r in rows if key(r) == k], missing, with_l, with_q) for k in keys}

    res = _group(rows, missing, with_l, with_q)
    if with_q:
        judged_rows = [r for r in rows if r["judged"]]
        q = aggregate_quality([r["scores"] for r in judged_rows], missing=missing)
        res["quality_dimensions"] = q["dimensions"]
        res["missing_policy"] = missing
    res["by_bucket"] = by(lambda r: r["bucket"], [bucket_label(lo, hi) for lo, hi in BUCKETS])
    res["by_language"] = by(
        lambda r: r["lang"], [lang for lang in LANGS if any(r["lang"] == lang for r in rows)]
    )
    res["by_required_length"] = by(lambda r: r["length"], sorted({r["length"] for r in rows}))
    res["items"] = [{k: r[k] for k in ("idx", "length", "lang", "output_length", "sl")} for r in rows]
    return res


def _fmt(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _table(groups: dict, label: str, cols: list[tuple[str, str]]) -> list[str]:
    lines = [f"| {label} | " + " | ".join(h for h, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, g in groups.items():
        if g["n"] == 0:
            continue
        cells = [str(g.get(k)) if k.startswith("n") else _fmt(g.get(k)) for _, k in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def markdown_report(results: dict) -> str:
    s = results["scores"]
    with_q = "score_q" in s
    cols = [("n", "n"), ("S_l", "score_l")]
    if with_q:
        cols += [("S_q", "score_q"), ("S", "score"), ("judged", "n_judged"), ("unparsed", "n_judge_missing")]
    cols += [("mean output length", "mean_output_length")]
    cfg = results["config"]
    lines = [
        f"# {results['benchmark']}: {cfg.get('model')}",
        "",
        f"- input: `{cfg.get('input')}` ({results['n_prompts']} prompts, {results['n_predictions']} predictions,"
        f" {results['n_infer_failed']} failed)",
        f"- generation: max_new_tokens={cfg.get('max_new_tokens')}, temperature={cfg.get('temperature')},"
        f" repetition_penalty={cfg.get('repetition_penalty')}",
        f"- language split: {results.get('lang_source')}",
    ]
    if with_q:
        lines.append(
            f"- judge: {cfg.get('judge_model')} (temperature {cfg.get('judge_temperature')}, "
            f"unparsed items: {s.get('missing_policy')})"
        )
    lines += ["", "## Overall", ""] + _table({"all": s}, "set", cols)
    lines += ["", "## By required length bucket", ""] + _table(s["by_bucket"], "bucket", cols)
    lines += ["", "## By output language", ""] + _table(s["by_language"], "lang", cols)
    if with_q and s.get("quality_dimensions"):
        lines += ["", "## Quality dimensions ((mean - 1) x 25)", "", "| dimension | score |", "|---|---|"]
        lines += [f"| {d} | {_fmt(s['quality_dimensions'][d])} |" for d in DIMENSIONS]
    if len(s["by_required_length"]) <= 12:
        lines += ["", "## Output length per required length", ""]
        lines += _table(
            s["by_required_length"],
            "required",
            [("n", "n"), ("mean output", "mean_output_length"), ("median output", "median_output_length")]
            + [("S_l", "score_l")],
        )
    lines += [
        "",
        "![required vs output length](length_scatter.png)",
        "",
        "![S_l by bucket](sl_by_bucket.png)",
        "",
    ]
    return "\n".join(lines)


def plot_length(scores: dict, out_dir: str) -> list[str]:
    """length_scatter.png (required vs output, log-log, ideal y = x) and sl_by_bucket.png; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    items = scores["items"]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 6))
    positive = [it["output_length"] for it in items if it["output_length"] > 0]
    lo = min([50.0] + [x / 1.5 for x in positive])
    hi = max([25000.0] + [x * 1.5 for x in positive] + [it["length"] * 1.5 for it in items])
    for lang, color in (("zh", "tab:red"), ("en", "tab:blue"), (None, "tab:gray")):
        pts = [(it["length"], it["output_length"]) for it in items if it["lang"] == lang]
        ok = [(x, y) for x, y in pts if y > 0]
        if ok:
            ax.scatter(*zip(*ok), s=60, alpha=0.4, c=color, label=lang or "?")
        empty = [x for x, y in pts if y == 0]
        if empty:  # log axes cannot show 0: mark empty outputs on the bottom edge
            ax.scatter(empty, [lo] * len(empty), marker="x", c=color, label=f"{lang or '?'}: empty output")
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="output = required")
    ax.set(
        xscale="log",
        yscale="log",
        xlim=(lo, hi),
        ylim=(lo, hi),
        xlabel="required length",
        ylabel="output length",
    )
    ax.legend()
    fig.tight_layout()
    paths.append(f"{out_dir}/length_scatter.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    groups = {k: g for k, g in scores["by_bucket"].items() if g["n"]}
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(list(groups), [g["score_l"] for g in groups.values()], color="tab:green")
    for i, g in enumerate(groups.values()):
        ax.text(i, g["score_l"] + 1, f"{g['score_l']:.1f} (n={g['n']})", ha="center", fontsize=8)
    ax.set(ylim=(0, 105), ylabel="S_l", xlabel="required length bucket")
    fig.tight_layout()
    paths.append(f"{out_dir}/sl_by_bucket.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths

"""Data pipeline throughput: tokenization (build_dataset), packing (pack_lengths) and the StepLoader.

    python -m benchmarks.bench_data            # full sizes
    python -m benchmarks.bench_data --quick    # small sizes (CI smoke)
    python -m benchmarks.bench_data --quick --repeats 1 --results-dir /tmp/x   # sanity run elsewhere

Length distribution ("LongWriter-like"): long samples lognormal around 3,500 tokens (clipped to
500..17,000; mean 4,061 in results/data.md) mixed with 300..1,500-token chat samples. Packing is also
measured as rows over the lower bound ceil(total tokens / max_length), and the dealing of packed rows to
8 ranks as the simulated time lost waiting for the slowest rank (rank_wait), by token count (the dealing
before) and by estimated cost (engine.data.loader.deal_rows). Rows are appended
in long format to benchmarks/results/data.csv; a markdown summary with the environment goes to
benchmarks/results/data.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import append_rows, environment, row
from engine.data import StepLoader, build_dataset, load_tokenizer, pack_lengths, packing_efficiency

RESULTS = Path(__file__).resolve().parent / "results"
MAX_LENGTH = 28672
PACKAGES = ("numpy", "tokenizers", "tiktoken")  # versions recorded with every row


def longwriter_lengths(n_long: int, n_short: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    long = np.clip(rng.lognormal(np.log(3500), 0.55, n_long), 500, 17000).astype(np.int64)
    short = rng.integers(300, 1501, n_short)
    return rng.permutation(np.concatenate([long, short]))


def rank_wait(plan: list[list[int]], lengths: np.ndarray, world: int, accum: int) -> tuple[list, list]:
    """Per optimizer step, the time the ranks lose waiting for the slowest (engine.data.loader.cost_spread)
    when the step's packed rows (batch_size 1) are dealt by token count, as before, and by estimated cost
    (deal_rows, ATTENTION_WEIGHT). Time is simulated as Qwen2-7B FLOPs (6 N per token + causal attention,
    engine.metrics.step_flops), a weight other than the one the dealing uses."""
    from engine.data.loader import cost_spread, deal_rows
    from engine.metrics import matmul_params
    from engine.models import FLAVOURS

    a = FLAVOURS["qwen2-7b"]
    judge = a.num_layers * a.num_heads * a.head_dim / matmul_params(a)  # attention / matmul FLOPs ratio
    G = world * accum
    by_tokens, by_cost = [], []
    for k in range(len(plan) // G):
        rows = plan[k * G : (k + 1) * G]
        micro, times = deal_rows(rows, lengths, 1, None, attention_weight=judge)
        time_of = {tuple(m): t for m, t in zip(micro, times)}
        for out, kw in ((by_tokens, {"attention_weight": 0.0}), (by_cost, {})):
            order = deal_rows(rows, lengths, 1, None, **kw)[0]
            out.append(cost_spread([time_of[tuple(m)] for m in order], world))
    return by_tokens, by_cost


def timed(fn, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


WORDS_EN = (
    "the of and to in is that for it as with was on be by this are from at or an which writing long".split()
)
WORDS_ZH = list(
    "长城的历史人们围绕这一传统逐渐改变了日常生活节奏与自然关系社会记忆城市面貌知识传播方式未来发展方向"
)


def write_corpus(path: str, lengths: np.ndarray, seed: int) -> None:
    """One row per length; the reply has about `length` UTF-8 bytes (= tokens for the byte-level tokenizer)."""
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i, n in enumerate(lengths.tolist()):
            zh = i % 3 == 0
            words = WORDS_ZH if zh else WORDS_EN
            k = max(1, (n - 60) // (3 if zh else 5))
            picks = rng.integers(0, len(words), k)
            reply = ("" if zh else " ").join(words[j] for j in picks)
            prompt = "写一篇文章。" if zh else f"Write an article of about {n // 5} words."
            row = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def train_bpe(corpus: str, out_dir: str, vocab_size: int = 8000) -> str:
    """A ChatML BPE tokenizer.json trained on the corpus: a stand-in for a real Qwen2 vocabulary (no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def texts():
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["messages"][-1]["content"]

    tok.train_from_iterator(texts(), trainer)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-save", action="store_true", help="print only")
    ap.add_argument("--results-dir", default=str(RESULTS), help="where data.csv / data.md go")
    args = ap.parse_args()
    env = environment("cpu", PACKAGES)
    rows: list[dict] = []

    def record(mode, metric, unit, shape, values):
        # 6 significant digits, as the rows recorded before (and data.md)
        r = row(env, "engine.data", mode, metric, unit, shape, values, fmt=".6g")
        rows.append(r)
        print(f"{mode:28s} {metric:22s} {shape:34s} p50={r['p50']} {unit}")

    # 1. Packing plans on LongWriter-like lengths.
    mixes = [("long_only", 6000, 0), ("long+short_1:20", 6000, 120000), ("short+long_20:1", 6000, 300)]
    if args.quick:
        mixes = [(name, n_long // 10, n_short // 10) for name, n_long, n_short in mixes]
    for name, n_long, n_short in mixes:
        lengths = longwriter_lengths(n_long, n_short, seed=0)
        shape = f"n={len(lengths)} max_length={MAX_LENGTH}"
        times, effs = [], []
        for epoch in range(args.repeats):
            t0 = time.perf_counter()
            plan = pack_lengths(lengths, MAX_LENGTH, seed=0, epoch=epoch)
            times.append(time.perf_counter() - t0)
            effs.append(packing_efficiency(lengths, plan, MAX_LENGTH))
        record(f"pack_lengths/{name}", "samples_per_s", "samples/s", shape, [len(lengths) / t for t in times])
        record(f"pack_lengths/{name}", "packing_efficiency", "fraction", shape, effs)
        record(f"pack_lengths/{name}", "mean_length", "tokens", shape, [float(lengths.mean())])
        lower_bound = -(-int(lengths.sum()) // MAX_LENGTH)
        over = [
            len(pack_lengths(lengths, MAX_LENGTH, seed=0, epoch=e)) - lower_bound for e in range(args.repeats)
        ]
        record(f"pack_lengths/{name}", "rows_over_lower_bound", "rows", shape, over)

        # Dealing each step's rows to 8 ranks: by token count (before) and by estimated cost (now).
        plan = pack_lengths(lengths, MAX_LENGTH, seed=0)
        for accum in (1, 8, 32):
            by_tokens, by_cost = rank_wait(plan, lengths, world=8, accum=accum)
            if not by_cost:  # fewer rows than one global batch (--quick)
                continue
            dshape = f"{shape} ranks=8 accum={accum} steps={len(by_cost)}"
            record(f"deal_rows/{name}/by_tokens", "rank_wait", "fraction", dshape, by_tokens)
            record(f"deal_rows/{name}/by_cost", "rank_wait", "fraction", dshape, by_cost)

    # 2. Tokenization (build_dataset) + 3. loader, on a synthetic LongWriter-like jsonl.
    n_long, n_short = (60, 200) if args.quick else (600, 2000)
    lengths = longwriter_lengths(n_long, n_short, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        write_corpus(corpus, lengths, seed=1)
        tokenizers = {"debug-qwen2": load_tokenizer("debug-qwen2"), "bpe8k-chatml": None}
        tokenizers["bpe8k-chatml"] = load_tokenizer(train_bpe(corpus, os.path.join(tmp, "bpe")))
        for tname, tok in tokenizers.items():
            shape = f"rows={len(lengths)} tok={tname}"

            def build(lazy=False, cache=None, tok=tok):
                return build_dataset(
                    [corpus], tok, max_length=MAX_LENGTH, seed=0, lazy_tokenize=lazy, cache_dir=cache
                )

            times, ds = timed(build, args.repeats)
            n_tok = int(ds.lengths.sum())
            record("build_dataset/eager", "samples_per_s", "samples/s", shape, [len(ds) / t for t in times])
            record("build_dataset/eager", "tokens_per_s", "tokens/s", shape, [n_tok / t for t in times])
            cold = []
            for r in range(args.repeats):
                t0 = time.perf_counter()
                build(lazy=True, cache=os.path.join(tmp, f"cache-{tname}-{r}"))
                cold.append(time.perf_counter() - t0)
            warm, _ = timed(
                lambda tname=tname, build=build: build(True, os.path.join(tmp, f"cache-{tname}-0")),
                args.repeats,
            )
            record(
                "build_dataset/lazy_cold", "samples_per_s", "samples/s", shape, [len(ds) / t for t in cold]
            )
            record(
                "build_dataset/lazy_warm", "samples_per_s", "samples/s", shape, [len(ds) / t for t in warm]
            )
            lazy_ds = build(True, os.path.join(tmp, f"cache-{tname}-0"))
            for mode, d, workers in (("eager", ds, 0), ("lazy", lazy_ds, 0), ("lazy", lazy_ds, 2)):
                loader = StepLoader(
                    d,
                    max_length=MAX_LENGTH,
                    batch_size=1,
                    gradient_accumulation_steps=1,
                    rank=0,
                    world_size=1,
                    seed=0,
                    num_workers=workers,
                )
                t_list = []
                for epoch in range(min(args.repeats, 3)):
                    loader.set_epoch(epoch)
                    t0 = time.perf_counter()
                    n = sum(1 for _ in loader)
                    t_list.append(time.perf_counter() - t0)
                eff = packing_efficiency(d.lengths, loader._plan(0), MAX_LENGTH)
                lshape = f"{shape} rows={n} workers={workers}"
                record(
                    f"StepLoader/{mode}", "samples_per_s", "samples/s", lshape, [len(d) / t for t in t_list]
                )
                record(f"StepLoader/{mode}", "packing_efficiency", "fraction", lshape, [eff])

    if args.no_save:
        return
    results = Path(args.results_dir)
    csv_path = results / "data.csv"
    append_rows(csv_path, rows)
    md = [
        "# Data pipeline benchmark",
        "",
        f"- command: `python -m benchmarks.bench_data{' --quick' if args.quick else ''}` (repeats={args.repeats})",
        f"- date: {env['date']}, git {env['git_sha']}",
        f"- device: {env['device']} (shared with other jobs; CPU only)",
        f"- versions: {env['versions']}",
        f"- max_length {MAX_LENGTH}; long samples lognormal(3500, 0.55) clipped to 500..17000 tokens, "
        "short chat samples uniform 300..1500 tokens",
        "",
        "| mode | metric | shape | p50 | p20 | p80 | unit |",
        "|---|---|---|---|---|---|---|",
    ]
    md += [
        f"| {r['mode']} | {r['metric']} | {r['shape']} | {r['p50']} | {r['p20']} | {r['p80']} | {r['unit']} |"
        for r in rows
    ]
    (results / "data.md").write_text("\n".join(md) + "\n")
    print(f"appended {len(rows)} rows to {csv_path}")


if __name__ == "__main__":
    main()

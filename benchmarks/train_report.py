"""bench_train's results: rounds merged, per-step metrics (tokens/s, MFU, memory, loss), the markdown report
and the plot."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from benchmarks.common import percentiles


def merge_rounds(runs: list[dict]) -> dict:
    """One result from the rounds of a configuration: measured steps pooled, the highest peak memory, the
    first failure if any round failed."""
    bad = [r for r in runs if r["status"] != "ok"]
    if bad:
        return bad[0]
    out = dict(runs[0])
    out["steps"] = runs[0]["steps"][:1] + [s for r in runs for s in r["steps"] if not s["warmup"]]
    out["steps"][0] = dict(out["steps"][0], warmup=True)  # kept only for loss_step1
    out["peak_memory_mib"] = max(r["peak_memory_mib"] for r in runs)
    out["n_measured"] = len(out["steps"]) - 1
    return out


def pcts(values) -> tuple[float, float, float]:
    p20, p50, p80 = percentiles(list(values))
    return p20, p50, p80


def summarize(result: dict, args, peak: float, cuda: bool) -> dict[str, tuple[str, list[float]]]:
    """metric -> (unit, per-step values) over the measured steps."""
    from engine.metrics import step_flops

    if result["status"] != "ok":
        return {}
    steps = [s for s in result["steps"] if not s["warmup"]]
    out = {
        "tokens_per_s": ("tokens/s", [s["tokens"] / s["time"] for s in steps]),
        "step_time": ("s", [s["time"] for s in steps]),
        "mfu_causal": ("fraction", [step_flops(args, s["tokens"], s["sum_sq_doc"]) / s["time"] / peak for s in steps]),
        "mfu_full_attn": ("fraction", [step_flops(args, s["row_tokens"], s["sum_sq_row"], attention="full") / s["time"] / peak for s in steps]),
        "peak_memory": ("MiB", [result["peak_memory_mib"]]),
        **({"peak_reserved": ("MiB", [result["peak_reserved_mib"]])} if "peak_reserved_mib" in result else {}),
        # CPU seconds of the process (all threads); with one thread, well above tokens_per_s means the
        # worker waited for a core held by another job. Not recorded on GPU.
        **({} if cuda else {"tokens_per_cpu_s": ("tokens/CPU-s", [s["tokens"] / s["cpu_time"] for s in steps])}),
        "loss_step1": ("nats", [result["steps"][0]["loss"]]),
    }  # fmt: skip
    return out


def fmt_p(v: tuple[float, float, float], f: str = "{:.4g}") -> str:
    return f"{f.format(v[1])} ({f.format(v[0])}–{f.format(v[2])})"


def plot(table: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in table if r["status"] == "ok"]
    if not ok:
        return
    names = [r["name"] for r in ok]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 0.45 * len(ok) + 1.6), sharey=True)
    y = np.arange(len(ok))
    tps = np.array([r["p"]["tokens_per_s"] for r in ok])  # (n, 3): p20, p50, p80
    colors = ["tab:blue" if r["provider"] == "engine" else "tab:orange" for r in ok]
    a1.barh(y, tps[:, 1], xerr=[tps[:, 1] - tps[:, 0], tps[:, 2] - tps[:, 1]], color=colors)
    a1.set_xlabel("real tokens/s per device (p50, p20-p80)")
    a2.barh(y, [r["p"]["peak_memory"][1] for r in ok], color=colors)
    a2.set_xlabel("peak memory (MiB)")
    a1.set_yticks(y, names, fontsize=8)
    a1.invert_yaxis()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_report(table, env, cmd, shape, peak_note, schedule, fills, docs, load_before, load_after, cuda) -> str:  # fmt: skip
    warmup, steps, rounds, threads = schedule
    ok = {r["name"]: r for r in table if r["status"] == "ok"}
    lines = [
        f"# Training benchmark: {env['device']}, {env['date'][:10]}",
        "",
        f"- command: `{cmd}` (from the repository root)",
        f"- date: {env['date']}, git {env['git_sha']}",
        f"- device: {env['device']}; versions: {env['versions']}",
        f"- load average (1/5/15 min) before: {'/'.join(f'{x:.1f}' for x in load_before)}, after: "
        f"{'/'.join(f'{x:.1f}' for x in load_after)}" + ("" if cuda else f" on {os.cpu_count()} cores"),
        f"- workload: {shape}; {rounds} interleaved round(s) of every configuration, each a fresh process "
        f"with {warmup} warm-up steps discarded and {steps} measured; one step = the documents of "
        f"one packed row ({np.mean(docs):.1f} documents, row fill {np.mean(fills):.4f} on average)",
        f"- peak FLOP/s for MFU: {peak_note}",
        f"- torch threads per worker: {threads or 'torch default'}",
        f"- peak memory: {next((r['memory_method'] for r in table if r['memory_method']), 'n/a')}",
        "",
        "| configuration | tokens/s p50 (p20–p80) | step time s | MFU causal | MFU full attn | peak memory MiB | "
        + ("peak reserved MiB | " if cuda else "tokens/CPU-s p50 | ")
        + "loss step 1 | attention |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {r['status']}: {r['reason'][:120]} |" + " |" * 7)
            continue
        p = r["p"]
        lines.append(
            f"| {r['name']} | {fmt_p(p['tokens_per_s'], '{:.0f}')} | {p['step_time'][1]:.4g} | "
            f"{p['mfu_causal'][1]:.4f} | {p['mfu_full_attn'][1]:.4f} | {p['peak_memory'][1]:.1f} | "
            + (f"{p['peak_reserved'][1]:.1f} | " if cuda else f"{p['tokens_per_cpu_s'][1]:.0f} | ")
            + f"{p['loss_step1'][1]:.6f} | {r['attn_impl']} |"
        )
    base = next((ok[n] for n in ok if n.startswith("transformers packed loss=plain")), None)
    if base is not None:
        metrics = ["tokens_per_s"] + ([] if cuda else ["tokens_per_cpu_s"])
        lines += ["", f"Speed-up (p50 over p50) against `{base['name']}`, in {' and '.join(metrics)}:", ""]
        for name, r in ok.items():
            ratios = [f"{r['p'][m][1] / base['p'][m][1]:.2f}x" for m in metrics]
            lines.append(f"- {name}: {' / '.join(ratios)}")
    losses = [r["p"]["loss_step1"][1] for r in ok.values()]
    if losses:
        lines += ["", f"First-step loss over all configurations: {min(losses):.6f} .. {max(losses):.6f} "
                  f"(spread {max(losses) - min(losses):.2e}; same weights and tokens, so it checks that every "
                  "provider trains the same model on the same targets)."]  # fmt: skip
    liger = ok.get("transformers+liger packed loss=liger ac=full")
    goals = [
        ok[n]
        for n in ("engine packed loss=triton ac=full", "engine packed loss=triton ac=full compile")
        if n in ok
    ]
    if goals:
        lines += ["", "Goals (packed rows, full checkpointing): >= 1.5x the tokens/s of transformers + Liger "
                  "(issue 12), MFU >= 45% for qwen2.5-0.5b on one H100 (issue 5):", ""]  # fmt: skip
        for r in goals:
            vs = [
                f"{r['p']['tokens_per_s'][1] / b['p']['tokens_per_s'][1]:.2f}x {b['name']}"
                for b in (base, liger)
                if b
            ]
            lines.append(f"- {r['name']}: MFU causal {r['p']['mfu_causal'][1]:.3f}, MFU full attn "
                         f"{r['p']['mfu_full_attn'][1]:.3f}" + "".join(f"; {v}" for v in vs))  # fmt: skip
    if not cuda:
        lines += [
            "",
            "CPU notes: the machine is shared with other jobs, so wall-clock numbers rank configurations "
            "only roughly (consecutive runs differ by up to ~30% per configuration; --rounds N pools N "
            "interleaved runs). Tokens per CPU-second close to tokens/s means the worker was rarely waiting "
            "for a core. "
            "At the debug flavour's vocabulary of 512 the output projection is a small part of a step, so the "
            "loss implementations differ little in speed (the logits they avoid are a few MiB); MFU is "
            "against this machine's measured GEMM rate and says little about a GPU. The GPU mode is the "
            "measurement that matters: `python -m benchmarks.bench_train` on a CUDA machine.",
        ]
    return "\n".join(lines) + "\n"

"""bench_long_ce's results: the goal lines (MET / NOT MET), the markdown report and the plot."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import torch

from engine.metrics import peak_bf16

GOAL_SHAPES, GOAL_TOKENS = ("qwen2-7b", "glm4-9b"), 28672


def _index(rows: list[dict]) -> dict:
    return {(r["provider"], r["mode"], r["metric"], r["shape"]): r["p50"] for r in rows}


def _field(shape: str, key: str) -> str:
    return shape.split(f"{key}=")[1].split(",")[0]


def _verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def goal_lines(rows: list[dict], device: torch.device, missing: dict[str, str]) -> list[str]:
    get = _index(rows)
    shapes = sorted({r["shape"] for r in rows if r["metric"] == "time"})
    out = []
    err = lambda p, s: [get.get((p, "fwd+bwd", k, s)) for k in ("err_loss", "err_dx", "err_dw")]
    for s in shapes:  # informational: ours against the full-logits path
        t, m = get.get(("ours", "fwd+bwd", "time", s)), get.get(("ours", "fwd+bwd", "peak_memory", s))
        bt, bm = get.get(("torch", "fwd+bwd", "time", s)), get.get(("torch", "fwd+bwd", "peak_memory", s))
        if None not in (t, m, bt, bm):
            out.append(
                f"- {s}: ours {t / bt:.2f}x the time and {100 * m / max(bm, 1e-9):.1f}% the peak memory "
                "of torch"
            )
    if device.type != "cuda":
        goal = next((s for s in shapes if s.startswith("cpu-goal:N=4096,") and ",float32," in s), None)
        m, bm = (get.get((p, "fwd+bwd", "peak_memory", goal)) for p in ("ours", "torch"))
        if None not in (m, bm):
            out.append(
                f"- CPU goal (N=4096, H=512, V=32768 fp32, fwd+bwd): speed-mode twin peak {m:.0f} MiB = "
                f"{100 * m / bm:.1f}% of the naive path's {bm:.0f} MiB (goal <= 10%): "
                f"{_verdict(m <= 0.1 * bm)}"
            )
        else:
            out.append(
                "- CPU speed-mode memory goal: NOT MEASURED (needs cpu-goal N=4096 fp32 with ours and torch)"
            )
        bf16 = next((s for s in shapes if s.startswith("cpu-goal:N=4096,") and ",bfloat16," in s), None)
        mr = get.get(("ours_recompute", "fwd+bwd", "peak_memory", bf16))
        if mr is not None:
            budget = (4096 * 512 + 32768 * 512) * 2 / 2**20 + 160
            out.append(
                f"- CPU recompute goal (bf16): peak {mr:.0f} MiB vs dX + dW + 160 MiB = {budget:.0f} MiB: "
                f"{_verdict(mr <= budget)}"
            )
        else:
            why = missing.get("ours_recompute", "no bf16 cpu-goal case in this run")
            out.append(f"- CPU recompute goal (bf16, <= dX + dW + 160 MiB): NOT MEASURED ({why})")
        out.append(
            "- GPU goals (>= 75% of dense bf16 peak, faster than Liger fp32 and CCE without filter at "
            "equal or better error, recompute <= dX + dW + 256 MiB): NOT MEASURED, no GPU in this run"
        )
        return out
    gpu = torch.cuda.get_device_name()
    peak = (peak_bf16(gpu) or float("nan")) / 1e12  # dense bf16 TFLOP/s
    goal = [
        s for s in shapes if s.split(":")[0] in GOAL_SHAPES and f"N={GOAL_TOKENS}," in s and "bfloat16" in s
    ]
    if not goal:
        out.append(
            f"- GPU goals: NOT MEASURED (no {'/'.join(GOAL_SHAPES)} N={GOAL_TOKENS} bf16 case in this run)"
        )
    why = lambda p: missing.get(p, "not timed")
    for s in goal:
        n, h, v = (int(_field(s, k)) for k in ("N", "H", "V"))
        t, tf, tfv = (get.get(("ours", "fwd+bwd", k, s)) for k in ("time", "throughput", "throughput_valid"))
        if t is None:
            out.append(f"- {s}: ours NOT MEASURED")
            continue
        judged = float(_field(s, "ignore")) == 0.0
        out.append(
            f"- {s}: ours {tf:.0f} TFLOP/s on 6 N H V ({tfv:.0f} on 6 N_valid H V) = "
            f"{100 * tf / peak:.0f}% of "
            f"{gpu}'s {peak:.0f}: "
            + (
                f"goal >= 75% {_verdict(tf >= 0.75 * peak)}"
                if judged
                else "the 75% goal is judged at ignore=0.0"
            )
        )
        for other in ("liger_fp32", "cce_exact"):
            ot = get.get((other, "fwd+bwd", "time", s))
            if ot is None:
                out.append(f"- {s}: ours vs {other}: NOT MEASURED ({why(other)})")
                continue
            ours_e, other_e = err("ours", s), err(other, s)
            ok_err = all(o <= 1.1 * x + 1e-6 for o, x in zip(ours_e, other_e) if None not in (o, x))
            out.append(
                f"- {s}: ours {t:.1f} ms vs {other} {ot:.1f} ms ({ot / t:.2f}x), errors (loss/dX/dW) "
                f"{_fmt(ours_e)} vs {_fmt(other_e)}; faster at <= 1.1x its error: "
                f"{_verdict(t < ot and ok_err)}"
            )
        rt, rm = (get.get(("ours_recompute", "fwd+bwd", k, s)) for k in ("time", "peak_memory"))
        ct = get.get(("cce_exact", "fwd+bwd", "time", s))
        if rt is None:
            out.append(f"- {s}: recompute goals NOT MEASURED ({why('ours_recompute')})")
            continue
        budget = (n * h + v * h) * 2 / 2**20 + 256  # dX + dW in bf16 + 256 MiB
        out.append(
            f"- {s}: recompute peak {rm:.0f} MiB vs dX + dW + 256 MiB = {budget:.0f}: "
            f"{_verdict(rm <= budget)}"
        )
        out.append(
            f"- {s}: recompute {rt:.1f} ms vs cce_exact {ct:.1f} ms: {_verdict(rt < ct)}"
            if ct is not None
            else f"- {s}: recompute vs cce_exact: NOT MEASURED ({why('cce_exact')})"
        )
    return out


def _fmt(errs: list) -> str:
    return "/".join("-" if e is None else f"{e:.1e}" for e in errs)


def write_report(rows, env, device, path, plot_path, csv_path, argv, kinds, missing, skipped) -> None:
    cmd = " ".join(["python -m benchmarks.bench_long_ce", *(shlex.quote(a) for a in argv)])
    get = _index(rows)
    lines = [
        f"# long-ce benchmark, {env['device']}, {env['date']}",
        "",
        f"Command: `{cmd}`",
        "",
        f"Environment: device `{env['device']}`, `{env['versions']}`, git `{env['git_sha']}`, "
        f"torch threads {torch.get_num_threads()}, load average at the end {os.getloadavg()[0]:.1f} "
        "(providers are measured round-robin so they see the same load).",
        "Time: "
        + ("CUDA events around the call" if device.type == "cuda" else "wall clock")
        + "; peak memory: "
        + (
            "CUDA max_memory_allocated minus memory allocated before the call (the returned gradients "
            "included)."
            if device.type == "cuda"
            else "RSS high-water mark (VmHWM after /proc/self/clear_refs) minus RSS before the call."
        ),
        "Errors: relative to the reference (loss |o - r| / |r|, dX and dW Frobenius), the twin on fp32 "
        "copies "
        "for 16-bit inputs, the fp64 definition for fp32 inputs. TFLOP/s: 6 N H V (2 N H V for fwd) and the "
        "same with N_valid, the labels that are not ignored.",
        "",
        "| case | mode | provider | kind | time p20/p50/p80 (ms) | peak MiB | TFLOP/s 6NHV / 6N_valid HV | "
        "err loss / dX / dW |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["metric"] != "time":
            continue
        at = lambda metric, r=r: get.get((r["provider"], r["mode"], metric, r["shape"]))
        e = [at(k) for k in ("err_loss", "err_dx", "err_dw")]
        lines.append(
            f"| {r['shape']} | {r['mode']} | {r['provider']} | {kinds.get(r['provider'], '')} | "
            f"{r['p20']:.1f} / {r['p50']:.1f} / {r['p80']:.1f} | {at('peak_memory'):.1f} | "
            f"{at('throughput'):.3f} / {at('throughput_valid'):.3f} | "
            f"{_fmt(e if r['mode'] == 'fwd+bwd' else e[:1])} |"
        )
    if missing:
        lines += ["", "Unavailable here: " + "; ".join(f"`{k}` ({v})" for k, v in missing.items()) + "."]
    if skipped:
        lines += ["", "Skipped (--budget_s spent): " + ", ".join(map(str, skipped)) + "."]
    lines += [
        "",
        "## Goals",
        "",
        *goal_lines(rows, device, missing),
        "",
        f"Plot: `{plot_path.name}`; rows: `{csv_path.name}` beside this report.",
    ]
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    """p50 time and peak memory per provider, one row of bar charts per case and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((r["shape"], r["mode"]) for r in rows if r["metric"] == "time")) or [
        ("none", "")
    ]
    fig, axes = plt.subplots(len(keys), 2, figsize=(12, 2.2 + 1.6 * len(keys)), squeeze=False)
    for i, (shape, mode) in enumerate(keys):
        for j, (metric, unit) in enumerate((("time", "ms"), ("peak_memory", "MiB"))):
            pts = [
                (r["provider"], r["p50"])
                for r in rows
                if (r["shape"], r["mode"], r["metric"]) == (shape, mode, metric)
            ]
            ax = axes[i][j]
            ax.barh([p for p, _ in pts], [x for _, x in pts])
            ax.set_xlabel(f"{metric} p50 ({unit})")
            ax.set_title(f"{shape} {mode}", fontsize=7)
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

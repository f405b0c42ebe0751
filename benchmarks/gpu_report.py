"""The GPU check's goals (issues 11 and 12, one table) judged from the rows of a run, pytest's JUnit files
read into rows, and the summary markdown (benchmarks/gpu_check.py writes it after every step).

Each goal reads long-format rows (benchmarks/common.py) by provider, mode, metric and shape, and is MET, NOT MET,
or NOT MEASURED with the reason (a row it needs is absent). A kernel goal holds at a flavour when it holds in
every case measured there (bench_long_ce's input kinds x ignored fractions; the peak share at no ignored labels).
PROVIDERS maps each role to the bench_long_ce provider names it accepts (first found wins).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

KERNEL_SHAPES = ("qwen2-7b", "glm4-9b")  # issue 11's goal shapes, N = 28,672, bf16
GOAL_TOKENS = 28672
PROVIDERS = {  # role -> bench_long_ce provider names, first found wins
    "ours_speed": ("ours",),
    "ours_recompute": ("ours_recompute",),
    "liger_fp32": ("liger_fp32",),
    "cce_exact": ("cce_exact",),
}
ERR_METRICS = ("err_loss", "err_dx", "err_dw")  # accuracy gate rows: error vs an fp32 reference
ERR_SLACK = 1.1  # "equal or better error": ours <= 1.1 x theirs + 1e-6, as bench_long_ce's own goal lines

MET, NOT_MET, NOT_MEASURED = "MET", "NOT MET", "NOT MEASURED"
ENV_KEYS = ("gpu", "gpu_count", "gpu_memory", "driver", "cuda", "torch", "triton", "python", "platform", "git_sha",
            "date", "budget_s", "elapsed_s", "packages", "peak_bf16_tflops", "gemm_bf16_tflops")  # fmt: skip


def _f(x) -> float:
    return float(x)


def _field(shape: str, key: str) -> str | None:
    """A key=value field of a bench_long_ce shape, "qwen2-7b:N=28672,H=3584,V=152064,bfloat16[,inputs=..,ignore=..]"."""
    for part in shape.split(":", 1)[-1].split(","):
        if part.startswith(f"{key}="):
            return part.split("=", 1)[1]
    return None


def _cases(rows: list[dict], flavour: str, ignore0: bool = False) -> list[str]:
    """The goal cases of a flavour: N=28,672 bf16 shapes (every input kind / ignored fraction measured);
    ignore0: only those without ignored labels (where 6NHV is all useful work)."""
    out = set()
    for r in rows:
        s = r["shape"]
        if s.startswith(f"{flavour}:N={GOAL_TOKENS},") and "bfloat16" in s.split(","):
            if not ignore0 or float(_field(s, "ignore") or 0) == 0:
                out.add(s)
    return sorted(out)


def _p50(rows: list[dict], role: str, metric: str, shape: str) -> float | None:
    """p50 of the fwd+bwd row of `role` (a PROVIDERS key) at exactly `shape`."""
    for name in PROVIDERS[role]:
        for r in rows:
            if (r["provider"], r["mode"], r["metric"], r["shape"]) == (name, "fwd+bwd", metric, shape):
                return _f(r["p50"])
    return None


def _worst(values: list[float | None], worst=max) -> float | None:
    """The worst case over a flavour's cases; None when a case is missing one of its numbers, or none ran."""
    return None if not values or any(v is None for v in values) else worst(values)


def _judge(parts: list[tuple[str, float | None, bool]], missing: str) -> tuple[str, str]:
    """parts: (label, value or None, ok). MET needs every part measured and ok."""
    text = "; ".join(f"{label} {v:.3g}" for label, v, _ in parts if v is not None)
    absent = [label for label, v, _ in parts if v is None]
    if absent:
        what = "no rows" if len(absent) == len(parts) else f"no rows for {', '.join(absent)}"
        return NOT_MEASURED, (text + "; " if text else "") + f"{what} ({missing})"
    return (MET if all(ok for _, _, ok in parts) else NOT_MET), text


def kernel_peak_share(rows: list[dict], env: dict) -> tuple[str, str]:
    peak = env.get("peak_bf16_tflops")
    parts = []
    for fl in KERNEL_SHAPES:
        tf = [_p50(rows, "ours_speed", "throughput", s) for s in _cases(rows, fl, ignore0=True)]
        share = _worst(tf, min) / peak if _worst(tf, min) is not None and peak else None
        parts.append((f"{fl} (lowest case)", share, share is not None and share >= 0.75))
    status, text = _judge(
        parts,
        "bench_long_ce ours (speed) TFLOP/s, no ignored labels" + ("" if peak else "; GPU peak unknown"),
    )
    gemm = env.get("gemm_bf16_tflops")
    if (
        gemm and peak and status != NOT_MEASURED
    ):  # the ceiling cuBLAS reaches on this GPU, beside the datasheet's
        text += f" (of the datasheet's {peak:.0f} TFLOP/s; a bf16 8192^3 matmul reached {gemm:.0f} here)"
    return status, text


def _ratio_goal(ours: str, other: str) -> Callable[[list[dict], dict], tuple[str, str]]:
    def judge(rows: list[dict], env: dict) -> tuple[str, str]:
        parts = []
        for fl in KERNEL_SHAPES:
            ratios = []
            for s in _cases(rows, fl):
                a, b = _p50(rows, ours, "time", s), _p50(rows, other, "time", s)
                ratios.append(b / a if a and b else None)  # other's time / ours: > 1 means ours is faster
            r = _worst(ratios, min)
            parts.append((f"{fl} {other}/{ours} time (slowest case)", r, r is not None and r > 1.0))
        return _judge(parts, f"bench_long_ce providers {PROVIDERS[ours]} and {PROVIDERS[other]}")

    return judge


def kernel_error_not_worse(rows: list[dict], env: dict) -> tuple[str, str]:
    parts = []
    for fl in KERNEL_SHAPES:
        for other in ("liger_fp32", "cce_exact"):
            excess = []  # ours / (1.1 x theirs + 1e-6), worst over cases and loss / dX / dW: <= 1 is MET
            for s in _cases(rows, fl):
                for m in ERR_METRICS:
                    a, b = _p50(rows, "ours_speed", m, s), _p50(rows, other, m, s)
                    excess.append(a / (ERR_SLACK * b + 1e-6) if a is not None and b is not None else None)
            e = _worst(excess)
            parts.append((f"{fl} ours/({ERR_SLACK} x {other}) error", e, e is not None and e <= 1.0))
    return _judge(parts, f"accuracy gate rows {ERR_METRICS}")


def recompute_memory(rows: list[dict], env: dict) -> tuple[str, str]:
    parts = []
    for fl in KERNEL_SHAPES:
        over = []
        for s in _cases(rows, fl):
            n, h, v = (int(_field(s, k)) for k in ("N", "H", "V"))
            budget = (n * h + v * h) * 2 / 2**20 + 256  # dX + dW in bf16 + 256 MiB
            got = _p50(rows, "ours_recompute", "peak_memory", s)
            over.append(got / budget if got is not None else None)
        o = _worst(over)
        parts.append((f"{fl} peak/(dX+dW+256MiB)", o, o is not None and o <= 1.0))
    return _judge(parts, "bench_long_ce ours (recompute) peak_memory")


def not_here(reason: str) -> Callable[[list[dict], dict], tuple[str, str]]:
    return lambda rows, env: (NOT_MEASURED, reason)


def train_vs_liger(flavour: str) -> Callable[[list[dict], dict], tuple[str, str]]:
    """Best engine packed ac=full configuration (eager or compiled) over transformers+liger packed ac=full."""

    def judge(rows: list[dict], env: dict) -> tuple[str, str]:
        def best(provider: str) -> tuple[float, str] | None:
            cands = [
                (_f(r["p50"]), r["mode"])
                for r in rows
                if r["provider"] == provider and r["metric"] == "tokens_per_s"
                and r["shape"].startswith(f"{flavour} T={GOAL_TOKENS} ")
                and r["mode"].startswith("packed") and "ac=full" in r["mode"]
            ]  # fmt: skip
            return max(cands) if cands else None

        ours, base = best("engine"), best("transformers+liger")
        ratio = ours[0] / base[0] if ours and base else None
        label = f"engine ({ours[1]})" if ours else "engine"
        return _judge([(f"{label} / transformers+liger", ratio, ratio is not None and ratio >= 1.5)],
                      f"bench_train {flavour} T={GOAL_TOKENS} tokens_per_s")  # fmt: skip

    return judge


@dataclass(frozen=True)
class Goal:
    name: str
    metric: str
    threshold: str
    source: str
    judge: Callable[[list[dict], dict], tuple[str, str]]


GOALS = [
    Goal("long-ce speed mode near peak", "bench_long_ce ours (speed) fwd+bwd TFLOP/s on 6NHV / dense bf16 peak, "
         "Qwen2-7B and GLM-4-9B, N=28,672, bf16", ">= 0.75 at both", "issue 11", kernel_peak_share),
    Goal("long-ce speed mode beats Liger", "time of Liger (accum_dtype fp32) / time of ours (speed), same run",
         "> 1 at both shapes", "issue 11", _ratio_goal("ours_speed", "liger_fp32")),
    Goal("long-ce speed mode beats CCE", "time of CCE (filter_eps=None) / time of ours (speed), same run",
         "> 1 at both shapes", "issue 11", _ratio_goal("ours_speed", "cce_exact")),
    Goal("long-ce speed mode error", "ours (speed) loss / dX / dW error vs fp32 reference, over Liger fp32's and "
         "CCE exact's (x 1.1 + 1e-6)", "<= 1 each", "issue 11", kernel_error_not_worse),
    Goal("long-ce recompute memory", "ours (recompute) fwd+bwd peak extra memory / (dX + dW + 256 MiB)",
         "<= 1 at both shapes", "issue 11", recompute_memory),
    Goal("long-ce recompute beats CCE", "time of CCE (filter_eps=None) / time of ours (recompute)",
         "> 1 at both shapes", "issue 11", _ratio_goal("ours_recompute", "cce_exact")),
    Goal("long-ce CPU twin memory", "twin peak / naive peak, N=4096 H=512 V=32768 fp32 fwd+bwd", "<= 0.10",
         "issue 11", not_here("CPU goal: `python -m benchmarks.bench_long_ce --quick` on CPU measures it")),
    Goal("long-ce CPU recompute memory", "recompute twin peak extra, bf16, same CPU shape", "<= dX + dW + 160 MiB",
         "issue 11", not_here("CPU goal: `python -m benchmarks.bench_long_ce --quick` on CPU measures it")),
    Goal("engine vs transformers+Liger, qwen2.5-0.5b", "bench_train tokens/s per GPU, best engine packed ac=full "
         "(eager or compiled) / transformers+Liger packed ac=full, 28,672 packed tokens", ">= 1.5", "issue 12",
         train_vs_liger("qwen2.5-0.5b")),
    Goal("engine vs transformers+Liger, 1.5B", "the same for the ~1.5B shape (flavour qwen2.5-1.5b)", ">= 1.5",
         "issue 12", train_vs_liger("qwen2.5-1.5b")),
    Goal("Qwen2-7B MFU on 8 GPUs", "MFU, full-attention convention, Qwen2-7B at 28,672, 8 GPUs", ">= 0.55",
         "issue 12", not_here("needs 8 GPUs: this check runs on one")),
]  # fmt: skip


def judge_goals(rows: list[dict], env: dict) -> list[dict]:
    out = []
    for g in GOALS:
        try:
            status, measured = g.judge(rows, env)
        except (KeyError, ValueError, IndexError) as e:  # a malformed row must not lose the summary
            status, measured = NOT_MEASURED, f"could not read the rows: {type(e).__name__}: {e}"
        out.append({"goal": g.name, "metric": g.metric, "threshold": g.threshold, "source": g.source,
                    "status": status, "measured": measured})  # fmt: skip
    return out


def junit_counts(path: Path) -> tuple[dict[str, int], list[str]]:
    """(counts of passed / failed / errors / skipped, ids of the failed and errored tests) of a JUnit file."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    bad = []
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        tid = f"{case.get('classname', '')}::{case.get('name', '')}"
        if "failure" in kinds:
            counts["failed"] += 1
            bad.append(tid)
        elif "error" in kinds:
            counts["errors"] += 1
            bad.append(tid)
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, bad


def log_counts(log: Path) -> tuple[dict[str, int], list[str]]:
    """The same from `pytest -v` output lines ("tests/x.py::test_a PASSED  [ 10%]"): a killed run has no JUnit."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    kinds = {
        "PASSED": "passed",
        "FAILED": "failed",
        "ERROR": "errors",
        "SKIPPED": "skipped",
        "XFAIL": "skipped",
    }
    bad = []
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        parts = line.split()
        if len(parts) >= 2 and "::" in parts[0] and parts[1] in kinds:
            counts[kinds[parts[1]]] += 1
            if parts[1] in ("FAILED", "ERROR"):
                bad.append(parts[0])
    return counts, bad


# --------------------------------------------------------------------------------------------- summary
def _cell(s: object) -> str:
    return "n/a" if s is None else str(s).replace("|", "\\|").replace("\n", " ")


def _profile_lines(profile: dict) -> list[str]:
    """The profiled step (benchmarks/gpu_profile.py's summary json): time by category, memory."""
    lines: list[str] = []
    cat = profile["category_s"]
    total = sum(cat.values()) or 1.0
    lines += ["", f"## Profiled step: {profile['flavour']}, {profile['tokens']} tokens, {profile['dtype']}", "",
              f"Step {profile['step_s']:.3f} s unprofiled ({profile['tokens_per_s']:.0f} tokens/s"
              + (f", MFU {profile['mfu_doc']:.3f} doc convention" if profile.get("mfu_doc") else "")
              + f"), {profile['profiled_step_s']:.3f} s profiled; kernel (CPU: op) self time by category:", "",
              "| category | s | share | top names |", "|---|---|---|---|"]  # fmt: skip
    for c, s in sorted(cat.items(), key=lambda kv: -kv[1]):
        top = ", ".join(f"`{n[:60]}`" for n, _ in profile["category_top"].get(c, [])[:3])
        lines.append(f"| {c} | {s:.4f} | {s / total:.1%} | {_cell(top)} |")
    mem = profile["memory"]
    lines += ["", "Memory: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in mem.items() if k != "peak_sites_mib")]  # fmt: skip
    if mem.get("peak_sites_mib"):
        lines += ["", "Live at the history's peak (MiB by allocation site):",
                  *(f"- {site}: {mib:.0f}" for site, mib in mem["peak_sites_mib"])]  # fmt: skip
    return lines


def render_summary(env: dict, steps: list[dict], goals: list[dict], wheels: list[dict], profile: dict | None,
                   n_rows: int) -> str:  # fmt: skip
    lines = [
        f"# GPU check{' (dry run, CPU)' if env['dry_run'] else ''}: {env['gpu']}, {env['date']}",
        "",
        f"Command: `{env['command']}`",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {_cell(env.get(k))} |" for k in ENV_KEYS),
        "",
    ]  # fmt: skip
    if wheels:
        by = {}
        for w in wheels:
            by.setdefault(w["status"], []).append(w["dist"] + (f" {w['detail']}" if w["detail"] else ""))
        lines += [
            "Wheels from .whl/: " + "; ".join(f"{k}: {', '.join(sorted(set(v)))}" for k, v in by.items()),
            "",
        ]
    else:
        lines += [
            "Wheels from .whl/: none installed" + (" (dry run)" if env["dry_run"] else " (.whl/ empty)"),
            "",
        ]
    lines += ["## What ran (in this order)", "", "| part | step | status | wall s | box s | produces |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for s in steps:
        wall = f"{s['wall_s']:.0f}" if s.get("wall_s") is not None else ""
        lines.append(f"| {s['part']} | {s['name']} | {_cell(s['status'])} | {wall} | {s['box_s']:.0f} "
                     f"| {_cell(s['produces'])} |")  # fmt: skip
    failed = [(s["name"], t) for s in steps for t in s.get("failed_tests", [])]
    if failed:
        lines += ["", "Failed tests:", *(f"- {n}: `{t}`" for n, t in failed[:30])]
    lines += ["", "## Goals (issues 11, 12)", "", "| goal | metric | threshold | source | status | measured |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for g in goals:
        lines.append(f"| {g['goal']} | {_cell(g['metric'])} | {_cell(g['threshold'])} | {g['source']} "
                     f"| **{g['status']}** | {_cell(g['measured'])} |")  # fmt: skip
    if profile:
        lines += _profile_lines(profile)
    lines += ["", f"Rows: `gpu_check.csv` ({n_rows} long-format rows of every step); each step's folder (log.txt: "
              "its output; its own CSV, report, plot, junit.xml) in `steps.tar.gz`.", ""]  # fmt: skip
    return "\n".join(lines)

"""Benchmark of the fused linear + cross-entropy (long-ce) against the usual ways of computing it, with an
accuracy gate in the same run.

    python -m benchmarks.bench_long_ce            # CUDA: Qwen2-7B and GLM-4-9B output layers, N=28,672, bf16
    python -m benchmarks.bench_long_ce --quick    # CPU goal shape N=4096, H=512, V=32768 fp32 (minutes)
    python -m benchmarks.bench_long_ce --smoke --out-dir /tmp/x   # toy shape, seconds (tests)
    python -m benchmarks.bench_long_ce --shapes qwen2-7b --providers ours liger_fp32 cce_exact \\
        --inputs normal --ignore 0.1 --budget_s 120   # a time-boxed subset (the prepared GPU check)

Providers (same inputs, reduction="sum"; kind "exact": every term of the gradient is computed, the error
columns show the rounding; "approximate": terms are dropped by design):
  ours            kernels.linear_cross_entropy, speed mode (Triton on CUDA, the chunked twin on CPU), given
                  the host-known valid-label count (num_valid, as the CPU loader knows it), no label check
  ours_twin       the same with impl="torch" (CUDA only; on CPU `ours` is the twin)
  ours_recompute  kernels.linear_cross_entropy(..., recompute=True), the exact low-memory mode
  torch           full logits + F.cross_entropy (autograd: what PyTorch itself does in this dtype)
  torch_compile   torch.compile'd chunk (logits + CE of N/8 rows) summed over 8 chunks
  torch_lce       torch.nn.functional.linear_cross_entropy, chunked (acc_policy="accurate"), when present
  liger, liger_fp32   Liger-Kernel's fused linear CE: default, and accum_dtype=torch.float32
  cce, cce_exact      Apple's Cut Cross-Entropy: default (gradient filter: approximate), filter_eps=None
  quack           QuACK's chunked_linear_cross_entropy, when importable
A provider that is not importable (or not applicable here) is reported as unavailable, with the reason.

Cases: shapes x tokens x inputs x ignored fraction of labels.  Inputs "normal": hidden ~ N(0, 1), logits
~ N(0, 1); "peaked": LM-like, the label's logit leads the rest by 8..16, so most probabilities are tiny
(CCE's gradient filter is data-dependent).  Per case: first the accuracy gate (each provider once, loss /
dX / dW relative errors against a reference: the twin on fp32 copies for 16-bit inputs, the fp64
definition for fp32 inputs), then the timing, round-robin over providers: CUDA events around the call
(>= 3 warm-ups on CUDA), p20/p50/p80, peak memory, TFLOP/s on 6 N H V and on 6 N_valid H V (2x for "fwd").
--budget_s bounds the whole run: each case gets an even share of what is left (warm-ups and one round
always run), and cases that no longer fit are skipped and listed.
Rows go to <out-dir>/long_ce.csv (long format), plus a png plot and a dated markdown report with goal lines.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import common
from engine.metrics import peak_bf16
from engine.models import FLAVOURS as FLAVOUR_ARGS
from kernels import linear_cross_entropy, naive_linear_cross_entropy

RESULTS = Path(__file__).parent / "results"
SHAPES = {  # name: (hidden, vocab)
    **{k: (FLAVOUR_ARGS[k].hidden_size, FLAVOUR_ARGS[k].vocab_size) for k in ("qwen2-7b", "glm4-9b")},
    "cpu-goal": (512, 32768),  # the CPU goal of the issue
    "toy": (32, 1024),
}
GOAL_SHAPES, GOAL_TOKENS = ("qwen2-7b", "glm4-9b"), 28672
MODES = ("fwd", "fwd+bwd")
# (shapes, tokens, inputs, ignored fractions, modes) per run kind
DEFAULTS = {
    "gpu": (GOAL_SHAPES, (GOAL_TOKENS,), ("normal", "peaked"), (0.0, 0.1, 0.5), ("fwd+bwd",)),
    "quick": (("cpu-goal",), (4096,), ("normal",), (0.1,), MODES),
    "smoke": (("toy",), (256,), ("normal", "peaked"), (0.1,), MODES),
}


@dataclass
class Provider:
    name: str
    kind: str  # "exact" or "approximate (...)"
    fn: Callable | None = None  # fn(hidden, weight, labels, n_valid) -> summed loss
    why: str = ""  # why unavailable


def _optional(name: str, kind: str, build: Callable[[], Callable]) -> Provider:
    try:
        return Provider(name, kind, build())
    except Exception as e:  # noqa: BLE001 - optional packages fail to import in many ways
        return Provider(name, kind, why=f"{type(e).__name__}: {str(e)[:120]}")


def _compile_chunked(n_chunks: int = 8) -> Callable:
    @torch.compile  # default dynamic: one recompile marks the token dimension dynamic
    def chunk_ce(h, w, y):
        return F.cross_entropy((h @ w.T).float(), y, reduction="sum")

    return lambda h, w, y, n: sum(chunk_ce(hc, w, yc) for hc, yc in zip(h.chunk(n_chunks), y.chunk(n_chunks)))


def _recompute() -> Callable:
    if "recompute" not in inspect.signature(linear_cross_entropy).parameters:
        raise ImportError("kernels.linear_cross_entropy has no recompute= yet (branch kernel-recompute)")
    return lambda h, w, y, n: linear_cross_entropy(h, w, y, recompute=True, check_labels=False)


def _torch_lce() -> Callable:
    opts = torch.nn.LinearCrossEntropyOptions(acc_policy="accurate")
    return lambda h, w, y, n: F.linear_cross_entropy(h, w, y, reduction="sum", options=opts)


def _liger(**kw) -> Callable:
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum", **kw)
    return lambda h, w, y, n: loss(w, h, y)


def _cce(**kw) -> Callable:
    from cut_cross_entropy import linear_cross_entropy as cce

    return lambda h, w, y, n: cce(h, w, y, reduction="sum", **kw)


def _quack() -> Callable:
    from quack.linear_cross_entropy import chunked_linear_cross_entropy

    return lambda h, w, y, n: chunked_linear_cross_entropy(h, w, y, reduction="sum")


def providers(device: torch.device, chunk_rows: int | None) -> list[Provider]:
    cuda = device.type == "cuda"

    def ours(impl):
        kw = dict(impl=impl, chunk_rows=chunk_rows, check_labels=False)
        return lambda h, w, y, n: linear_cross_entropy(h, w, y, num_valid=n, **kw)

    gpu_only = "needs CUDA"
    table = [
        Provider("ours", "exact", ours("auto")),
        Provider("ours_twin", "exact", ours("torch"))
        if cuda
        else Provider("ours_twin", "exact", why="= ours"),
        _optional("ours_recompute", "exact", _recompute),
        Provider("torch", "exact", lambda h, w, y, n: F.cross_entropy((h @ w.T).float(), y, reduction="sum")),
        _optional("torch_compile", "exact", _compile_chunked),
        _optional("torch_lce", "exact", _torch_lce),
    ]
    for name, kind, build in [
        ("liger", "exact (16-bit dW accumulation)", _liger),
        ("liger_fp32", "exact", lambda: _liger(accum_dtype=torch.float32)),
        ("cce", "approximate (gradient filter)", _cce),
        ("cce_exact", "exact", lambda: _cce(filter_eps=None)),
        ("quack", "exact", _quack),
    ]:
        table.append(_optional(name, kind, build) if cuda else Provider(name, kind, why=gpu_only))
    return table


def make_inputs(n, h, v, dtype, device, inputs: str, ignore: float, seed: int = 0):
    """hidden [n, h], weight [v, h], labels [n] on `device`, and the valid-label count (host int)."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, device=device, generator=g)
    weight = torch.randn(v, h, device=device, generator=g) / h**0.5  # rows of norm ~1: logits ~ N(0, 1)
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    if inputs == "peaked":
        margin = 8.0 + 8.0 * torch.rand(n, 1, device=device, generator=g)
        hidden = 0.5 * hidden + margin * weight[labels]  # z_y ~ margin, the rest ~ N(0, 1/4)
    drop = torch.rand(n, device=device, generator=g) < ignore
    labels[drop] = -100
    n_valid = n - int(drop.sum())
    return hidden.to(dtype), weight.to(dtype), labels, n_valid


def _loss_and_grads(fn, hidden, weight, labels, n_valid, need_grads: bool):
    h, w = (t.detach().requires_grad_(need_grads) for t in (hidden, weight))
    with torch.set_grad_enabled(need_grads):
        loss = fn(h, w, labels, n_valid)
        if need_grads:
            loss.backward()
    return loss.detach(), h.grad, w.grad


def reference(hidden, weight, labels, n_valid, need_grads: bool):
    """fp32 chunked twin on fp32 copies for 16-bit inputs; the fp64 definition for fp32 inputs."""
    if hidden.dtype == torch.float32:
        fn = lambda h, w, y, n: naive_linear_cross_entropy(h, w, y, reduction="sum", upcast=torch.float64)
        up = torch.float64
    else:
        fn = lambda h, w, y, n: linear_cross_entropy(h, w, y, impl="torch", num_valid=n, check_labels=False)
        up = torch.float32
    loss, dx, dw = _loss_and_grads(fn, hidden.to(up), weight.to(up), labels, n_valid, need_grads)
    return [loss] + ([] if dx is None else [dx, dw])


def errors(out, ref) -> list[float]:
    """Relative errors of (loss, dX, dW) in the reference's precision: |o - r| / |r| (Frobenius)."""
    return [((o.to(r.dtype) - r).norm() / r.norm().clamp_min(1e-30)).item() for o, r in zip(out, ref)]


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(provs, case, dtype, device, args, env, budget_s) -> list[dict]:
    name, n, ignore, inputs = case
    h, v = SHAPES[name]
    shape = f"{name}:N={n},H={h},V={v},{str(dtype).removeprefix('torch.')},inputs={inputs},ignore={ignore}"
    hidden, weight, labels, n_valid = make_inputs(n, h, v, dtype, device, inputs, ignore)
    need_grads = "fwd+bwd" in args.modes
    ref = reference(hidden, weight, labels, n_valid, need_grads)
    _free(device)
    errs, failed = {}, {}
    for p in provs:
        try:
            errs[p.name] = errors(_loss_and_grads(p.fn, hidden, weight, labels, n_valid, need_grads), ref)
        except Exception as e:  # noqa: BLE001 - an optional provider may reject a shape or dtype
            failed[p.name] = f"{type(e).__name__}: {str(e)[:200]}"
            print(f"{p.name:15s} {shape}: FAILED {failed[p.name]}")
        _free(device)
    del ref
    _free(device)
    rows = []
    for p, mode in ((p, m) for m in args.modes for p in provs if p.name in errs):
        e = errs[p.name]
        names = ("err_loss", "err_dx", "err_dw") if mode == "fwd+bwd" else ("err_loss",)
        rows += [common.row(env, p.name, mode, k, "rel", shape, [x]) for k, x in zip(names, e)]
    flops = {m: (2 if m == "fwd" else 6) * h * v for m in args.modes}
    for mode in args.modes:
        t_mode = time.perf_counter()

        def setup():
            hidden.grad = weight.grad = None

        def case_fn(fn, mode=mode):
            if mode == "fwd":
                return (lambda: torch.no_grad()(fn)(hidden, weight, labels, n_valid)), None
            return (lambda: fn(hidden, weight, labels, n_valid).backward()), setup

        if mode == "fwd+bwd":
            hidden.requires_grad_(True)
            weight.requires_grad_(True)
        cases = {p.name: case_fn(p.fn) for p in provs if p.name in errs}
        box = None if budget_s is None else budget_s / len(args.modes)
        results = common.measure_round_robin(cases, device, warmup=args.warmup, reps=args.reps, budget_s=box)
        hidden.requires_grad_(False)
        weight.requires_grad_(False)
        del cases
        _free(device)
        for prov, m in results.items():
            if m.error is not None or not m.times_ms:
                print(f"{prov:15s} {mode:8s} {shape}: FAILED {m.error}")
                continue
            new = [
                common.row(env, prov, mode, "time", "ms", shape, m.times_ms),
                common.row(env, prov, mode, "peak_memory", "MiB", shape, [b / 2**20 for b in m.peaks]),
                common.row(
                    env,
                    prov,
                    mode,
                    "throughput",
                    "TFLOP/s",
                    shape,
                    [flops[mode] * n / t / 1e9 for t in m.times_ms],
                ),
                common.row(
                    env,
                    prov,
                    mode,
                    "throughput_valid",
                    "TFLOP/s",
                    shape,
                    [flops[mode] * n_valid / t / 1e9 for t in m.times_ms],
                ),
            ]
            if device.type == "cpu":  # CPU seconds of all threads: less sensitive to other tenants' load
                new.append(common.row(env, prov, mode, "cpu_time", "s", shape, m.cpu_s))
            rows += new
            e = " ".join(f"{x:.1e}" for x in errs[prov][: 3 if mode == "fwd+bwd" else 1])
            print(
                f"{prov:15s} {mode:8s} {shape}: {new[0]['p50']:9.1f} ms  {new[1]['p50']:9.1f} MiB  "
                f"{new[2]['p50']:7.2f} / {new[3]['p50']:7.2f} TFLOP/s  err {e}"
            )
        print(f"  ({mode} timed in {time.perf_counter() - t_mode:.0f} s)")
    return rows


def run(args) -> Path:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    kind = "smoke" if args.smoke else ("quick" if args.quick or device.type != "cuda" else "gpu")
    shapes, tokens, inputs, ignores, modes = DEFAULTS[kind]
    shapes, tokens = args.shapes or shapes, args.tokens or tokens
    inputs, ignores = args.inputs or inputs, args.ignore if args.ignore is not None else ignores
    args.modes = args.modes or list(modes)
    if device.type == "cuda":
        args.warmup = max(3, args.warmup)  # cuBLAS heuristics, Triton autotuning, allocator warm-up
    env = common.environment(device, (*common.DEFAULT_PACKAGES, "quack"))
    names = args.providers or (["torch", "ours"] if args.smoke else None)
    table = [p for p in providers(device, args.chunk_rows) if names is None or p.name in names]
    provs = [p for p in table if p.fn is not None]
    missing = {p.name: p.why for p in table if p.fn is None}
    for name, why in missing.items():
        print(f"{name:15s} unavailable: {why}")
    cases = [(s, n, ig, inp) for ig in ignores for inp in inputs for n in tokens for s in shapes]
    t0, rows, skipped = time.perf_counter(), [], []
    for i, case in enumerate(cases):
        box = None
        if args.budget_s is not None:
            left = args.budget_s - (time.perf_counter() - t0)
            if left <= 0:
                skipped += cases[i:]
                print(f"budget of {args.budget_s:.0f} s spent: {len(cases) - i} case(s) SKIPPED")
                break
            box = left / (len(cases) - i)
        rows += run_case(provs, case, dtype, device, args, env, box)
        _free(device)
    out_dir = Path(args.out_dir)
    csv_path = out_dir / "long_ce.csv"
    common.append_rows(csv_path, rows)
    tag = f"{common.device_slug(device)}_{env['date'][:10]}"  # the UTC date every row carries
    plot_path = out_dir / f"long_ce_{tag}.png"
    _plot(rows, plot_path)
    report = out_dir / f"long_ce_{tag}.md"
    kinds = {p.name: p.kind for p in table}
    _report(rows, env, device, report, plot_path, csv_path, args.argv, kinds, missing, skipped)
    print(f"rows -> {csv_path}\nplot -> {plot_path}\nreport -> {report}")
    return report


def _index(rows: list[dict]) -> dict:
    return {(r["provider"], r["mode"], r["metric"], r["shape"]): r["p50"] for r in rows}


def _field(shape: str, key: str) -> str:
    return shape.split(f"{key}=")[1].split(",")[0]


def _verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def _goal_lines(rows: list[dict], device: torch.device, missing: dict[str, str]) -> list[str]:
    get = _index(rows)
    shapes = sorted({r["shape"] for r in rows if r["metric"] == "time"})
    out = []
    err = lambda p, s: [get.get((p, "fwd+bwd", k, s)) for k in ("err_loss", "err_dx", "err_dw")]
    for s in shapes:  # informational: ours against the full-logits path
        t, m = get.get(("ours", "fwd+bwd", "time", s)), get.get(("ours", "fwd+bwd", "peak_memory", s))
        bt, bm = get.get(("torch", "fwd+bwd", "time", s)), get.get(("torch", "fwd+bwd", "peak_memory", s))
        if None not in (t, m, bt, bm):
            out.append(
                f"- {s}: ours {t / bt:.2f}x the time and {100 * m / max(bm, 1e-9):.1f}% the peak memory of torch"
            )
    if device.type != "cuda":
        goal = next((s for s in shapes if s.startswith("cpu-goal:N=4096,") and ",float32," in s), None)
        m, bm = (get.get((p, "fwd+bwd", "peak_memory", goal)) for p in ("ours", "torch"))
        if None not in (m, bm):
            out.append(
                f"- CPU goal (N=4096, H=512, V=32768 fp32, fwd+bwd): speed-mode twin peak {m:.0f} MiB = "
                f"{100 * m / bm:.1f}% of the naive path's {bm:.0f} MiB (goal <= 10%): {_verdict(m <= 0.1 * bm)}"
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
    peak = (peak_bf16(gpu) or float("nan")) / 1e12
    goal = [
        s for s in shapes if s.split(":")[0] in GOAL_SHAPES and f"N={GOAL_TOKENS}," in s and "bfloat16" in s
    ]
    if not goal:
        out.append(
            f"- GPU goals: NOT MEASURED (no {'/'.join(GOAL_SHAPES)} N={GOAL_TOKENS} bf16 case in this run)"
        )
    for s in goal:
        n, h, v = (int(_field(s, k)) for k in ("N", "H", "V"))
        tf, tfv = (get.get(("ours", "fwd+bwd", k, s)) for k in ("throughput", "throughput_valid"))
        t = get.get(("ours", "fwd+bwd", "time", s))
        if tf is None:
            out.append(f"- {s}: ours NOT MEASURED")
            continue
        line = f"- {s}: ours {tf:.0f} TFLOP/s on 6NHV ({tfv:.0f} on 6 N_valid H V) = {100 * tf / peak:.0f}% of {gpu}'s {peak:.0f}"
        out.append(
            line
            + (
                f" (goal >= 75%): {_verdict(tf >= 0.75 * peak)}"
                if float(_field(s, "ignore")) == 0
                else " (the 75% goal is judged at ignore=0.0)"
            )
        )
        for other in ("liger_fp32", "cce_exact"):
            ot = get.get((other, "fwd+bwd", "time", s))
            if ot is None:
                out.append(f"- {s}: ours vs {other}: NOT MEASURED ({missing.get(other, 'not timed')})")
                continue
            ours_e, other_e = err("ours", s), err(other, s)
            ok_err = all(o <= 1.1 * x + 1e-6 for o, x in zip(ours_e, other_e) if None not in (o, x))
            out.append(
                f"- {s}: ours {t:.1f} ms vs {other} {ot:.1f} ms ({ot / t:.2f}x), errors (loss, dX, dW) "
                f"{_fmt(ours_e)} vs {_fmt(other_e)} (ours <= 1.1x theirs): {_verdict(t < ot and ok_err)}"
            )
        rt, rm = (get.get(("ours_recompute", "fwd+bwd", k, s)) for k in ("time", "peak_memory"))
        if rt is None:
            out.append(f"- {s}: recompute goals NOT MEASURED ({missing.get('ours_recompute', 'not timed')})")
            continue
        budget = (n * h + v * h) * 2 / 2**20 + 256
        ct = get.get(("cce_exact", "fwd+bwd", "time", s))
        out.append(
            f"- {s}: recompute peak {rm:.0f} MiB vs dX + dW + 256 MiB = {budget:.0f} MiB: {_verdict(rm <= budget)}; "
            + (
                f"{rt:.1f} ms vs cce_exact {ct:.1f} ms: {_verdict(rt < ct)}"
                if ct
                else "cce_exact NOT MEASURED"
            )
        )
    return out


def _fmt(errs: list) -> str:
    return "/".join("-" if e is None else f"{e:.1e}" for e in errs)


def _report(rows, env, device, path, plot_path, csv_path, argv, kinds, missing, skipped) -> None:
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
            "CUDA max_memory_allocated minus memory allocated before the call (the returned gradients included)."
            if device.type == "cuda"
            else "RSS high-water mark (VmHWM after /proc/self/clear_refs) minus RSS before the call."
        ),
        "Errors: relative to the reference (loss |o - r| / |r|, dX and dW Frobenius), the twin on fp32 copies "
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
        key = (r["provider"], r["mode"])
        e = [get.get(key + (k, r["shape"])) for k in ("err_loss", "err_dx", "err_dw")]
        lines.append(
            f"| {r['shape']} | {r['mode']} | {r['provider']} | {kinds.get(r['provider'], '')} | "
            f"{r['p20']:.1f} / {r['p50']:.1f} / {r['p80']:.1f} | {get[key + ('peak_memory', r['shape'])]:.1f} | "
            f"{get[key + ('throughput', r['shape'])]:.3f} / {get[key + ('throughput_valid', r['shape'])]:.3f} | "
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
        *_goal_lines(rows, device, missing),
        "",
        f"Plot: `{plot_path.name}`; rows: `{csv_path}`.",
    ]
    path.write_text("\n".join(lines) + "\n")


def _plot(rows: list[dict], path: Path) -> None:
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


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description="long-ce benchmark")
    p.add_argument("--quick", action="store_true", help="the CPU goal case only (a few minutes on CPU)")
    p.add_argument("--smoke", action="store_true", help="toy shape, one rep (for tests)")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)"
    )
    p.add_argument("--shapes", nargs="*", choices=sorted(SHAPES), default=None)
    p.add_argument("--tokens", type=int, nargs="*", default=None, help="token counts N")
    p.add_argument("--providers", nargs="*", default=None)
    p.add_argument("--inputs", nargs="*", choices=("normal", "peaked"), default=None)
    p.add_argument("--ignore", type=float, nargs="*", default=None, help="fractions of ignored labels")
    p.add_argument("--modes", nargs="*", choices=MODES, default=None)
    p.add_argument(
        "--chunk_rows", type=int, default=None, help="ours: rows per chunk (default: the kernel's)"
    )
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per provider (>= 3 on CUDA)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--budget_s", type=float, default=None, help="wall-clock budget of the whole run")
    p.add_argument("--out-dir", default=str(RESULTS))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    args.argv = argv
    if args.warmup is None:
        args.warmup = 0 if args.smoke else 1
    if args.reps is None:
        args.reps = 1 if args.smoke else (3 if args.quick else 5)
    return run(args)


if __name__ == "__main__":
    main()

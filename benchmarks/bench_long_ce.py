"""Benchmark of the fused linear + cross-entropy (long-ce) against the usual ways of computing it.

    python -m benchmarks.bench_long_ce            # CUDA: model flavours x 4k..28k tokens, bf16
    python -m benchmarks.bench_long_ce --quick    # CPU goal shape N=4096, H=512, V=32768 fp32 (minutes)
    python -m benchmarks.bench_long_ce --smoke --out-dir /tmp/x   # toy shape, seconds (tests)

Providers (same run, same inputs; all with reduction="sum"):
  torch           full logits + F.cross_entropy (the naive path)
  torch_compile   torch.compile'd chunk (logits + CE of N/8 rows) summed over 8 chunks
  ours_triton     kernels.linear_cross_entropy(impl="triton")   (CUDA only)
  ours_torch      kernels.linear_cross_entropy(impl="torch")    (the chunked PyTorch twin)
  liger           Liger-Kernel's fused linear cross entropy     (when importable)
  cce             Apple's Cut Cross-Entropy                     (when importable)
Modes: "fwd" = loss only (inputs do not require grad); "fwd+bwd" = loss and dX, dW (weight and hidden
require grad).  Metrics: time (ms), peak memory (MiB, see benchmarks/common.py for how, per device), and
TFLOP/s counting 2*N*H*V (fwd) or 6*N*H*V (fwd+bwd) useful FLOPs.
Rows go to <out-dir>/long_ce.csv (long format), plus a png plot and a dated markdown report.
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import common
from engine.metrics import peak_bf16
from engine.models import FLAVOURS as FLAVOUR_ARGS
from kernels import linear_cross_entropy

RESULTS = Path(__file__).parent / "results"
# (hidden, vocab) of the model flavours whose output layer is benchmarked.
FLAVOURS = {
    name: (FLAVOUR_ARGS[name].hidden_size, FLAVOUR_ARGS[name].vocab_size)
    for name in ("qwen2-7b", "qwen2.5-0.5b", "glm4-9b")
}
GPU_TOKENS = (4096, 8192, 16384, 28672)
QUICK_SHAPE = ("cpu-goal", 4096, 512, 32768)  # the CPU goal of the issue
QUICK_TOKENS = (2048, 4096)  # two points per line in the plot
SMOKE_SHAPE = ("toy", 256, 32, 1024)


def _naive(h, w, y):
    return F.cross_entropy((h @ w.T).float(), y, reduction="sum")


def _compile_chunked(n_chunks: int = 8) -> Callable:
    @torch.compile  # default dynamic: one recompile marks the token dimension dynamic
    def chunk_ce(h, w, y):
        return F.cross_entropy((h @ w.T).float(), y, reduction="sum")

    def fn(h, w, y):
        return sum(chunk_ce(hc, w, yc) for hc, yc in zip(h.chunk(n_chunks), y.chunk(n_chunks)))

    return fn


def _liger() -> Callable | None:
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception:  # noqa: BLE001 - optional, may fail at import in many ways
        return None
    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return lambda h, w, y: loss(w, h, y)


def _cce() -> Callable | None:
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except Exception:  # noqa: BLE001
        return None
    return lambda h, w, y: cce(h, w, y, reduction="sum")


def providers(device: torch.device, names: list[str] | None) -> dict[str, Callable]:
    table: dict[str, Callable | None] = {
        "torch": _naive,
        "torch_compile": _compile_chunked(),
        "ours_triton": (lambda h, w, y: linear_cross_entropy(h, w, y, impl="triton"))
        if device.type == "cuda"
        else None,
        "ours_torch": lambda h, w, y: linear_cross_entropy(h, w, y, impl="torch"),
        "liger": _liger() if device.type == "cuda" else None,
        "cce": _cce() if device.type == "cuda" else None,
    }
    chosen = {k: v for k, v in table.items() if v is not None and (names is None or k in names)}
    skipped = [k for k, v in table.items() if v is None and (names is None or k in names)]
    if skipped:
        print(f"not available here: {', '.join(skipped)}")
    return chosen


def make_cases(provs: dict[str, Callable], mode: str, n, h, v, dtype, device) -> dict:
    """(run, setup) per provider on one shared set of inputs."""
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float32).to(device, dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(device, dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.1] = -100
    labels = labels.to(device)
    if mode == "fwd+bwd":
        hidden.requires_grad_(True)
        weight.requires_grad_(True)

    def setup():
        hidden.grad = weight.grad = None

    def case(fn):
        if mode == "fwd":

            def run():
                with torch.no_grad():
                    fn(hidden, weight, labels)

            return run, None
        return (lambda: fn(hidden, weight, labels).backward()), setup

    return {name: case(fn) for name, fn in provs.items()}


def run(args) -> Path:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.smoke:
        shapes = [SMOKE_SHAPE]
    elif args.quick or device.type != "cuda":
        shapes = [(QUICK_SHAPE[0], n, *QUICK_SHAPE[2:]) for n in QUICK_TOKENS]
    else:
        shapes = [(name, n, h, v) for name, (h, v) in FLAVOURS.items() for n in GPU_TOKENS]
    if args.tokens:
        shapes = [(s[0], n, s[2], s[3]) for s in shapes for n in args.tokens]
        shapes = list(dict.fromkeys(shapes))
    out_dir = Path(args.out_dir)
    env = common.environment(device)
    names = args.providers
    if args.smoke and names is None:
        names = ["torch", "ours_torch"]  # torch.compile alone would take ~1 min to compile
    provs = providers(device, names)
    modes = args.modes
    rows = []
    for name, n, h, v in shapes:
        shape = f"{name}:N={n},H={h},V={v},{str(dtype).removeprefix('torch.')}"
        for mode in modes:
            flops = (2 if mode == "fwd" else 6) * n * h * v
            cases = make_cases(provs, mode, n, h, v, dtype, device)
            results = common.measure_round_robin(cases, device, warmup=args.warmup, reps=args.reps)
            del cases
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            for prov, m in results.items():
                if m.error is not None or not m.times_ms:
                    print(f"{prov:14s} {mode:8s} {shape}: FAILED {m.error}")
                    continue
                new = [
                    common.row(env, prov, mode, "time", "ms", shape, m.times_ms),
                    common.row(env, prov, mode, "peak_memory", "MiB", shape, [p / 2**20 for p in m.peaks]),
                    common.row(
                        env, prov, mode, "throughput", "TFLOP/s", shape, [flops / t / 1e9 for t in m.times_ms]
                    ),
                ]
                if device.type == "cpu":  # CPU seconds of all threads: less sensitive to other tenants' load
                    new.append(common.row(env, prov, mode, "cpu_time", "s", shape, m.cpu_s))
                rows += new
                print(
                    f"{prov:14s} {mode:8s} {shape}: {new[0]['p50']:9.1f} ms  {new[1]['p50']:9.1f} MiB  "
                    f"{new[2]['p50']:7.3f} TFLOP/s"
                    + (f"  {new[3]['p50']:6.2f} cpu-s" if len(new) > 3 else "")
                )
    csv_path = out_dir / "long_ce.csv"
    common.append_rows(csv_path, rows)
    tag = f"{common.device_slug(device)}_{env['date'][:10]}"  # the UTC date every row carries
    plot_path = out_dir / f"long_ce_{tag}.png"
    _plot(rows, plot_path)
    report = out_dir / f"long_ce_{tag}.md"
    _report(rows, env, device, report, plot_path, csv_path, args.argv)
    print(f"rows -> {csv_path}\nplot -> {plot_path}\nreport -> {report}")
    return report


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in rows})
    fig, axes = plt.subplots(len(modes), 2, figsize=(11, 3.6 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        for j, metric in enumerate(("time", "peak_memory")):
            ax = axes[i][j]
            lines: dict[str, list[tuple[int, float]]] = {}
            for r in rows:
                if r["mode"] == mode and r["metric"] == metric:
                    flavour = r["shape"].split(":")[0]
                    tokens = int(r["shape"].split("N=")[1].split(",")[0])
                    lines.setdefault(f"{r['provider']} {flavour}", []).append((tokens, r["p50"]))
            for label, pts in sorted(lines.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            ax.set_xlabel("tokens (N)")
            ax.set_ylabel("ms (p50)" if metric == "time" else "peak MiB (p50)")
            ax.set_title(f"{mode}: {metric}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _goal_lines(rows: list[dict], device: torch.device) -> list[str]:
    get = {(r["provider"], r["mode"], r["metric"], r["shape"]): r["p50"] for r in rows}
    shapes = sorted({r["shape"] for r in rows})
    out = []
    for shape in shapes:
        for mode in ("fwd", "fwd+bwd"):
            base_t, base_m = (
                get.get(("torch", mode, "time", shape)),
                get.get(("torch", mode, "peak_memory", shape)),
            )
            for prov in ("ours_torch", "ours_triton"):
                t, m = get.get((prov, mode, "time", shape)), get.get((prov, mode, "peak_memory", shape))
                if None in (t, m, base_t, base_m):
                    continue
                out.append(
                    f"- {shape} {mode}: {prov} time {t / base_t:.2f}x of naive torch, "
                    f"peak memory {100 * m / max(base_m, 1e-9):.1f}% of naive torch"
                )
    if device.type != "cuda":
        goal = QUICK_SHAPE
        shape = next(
            (s for s in shapes if s.startswith(f"{goal[0]}:N={goal[1]},") and s.endswith("float32")), None
        )
        t, m = (get.get(("ours_torch", "fwd+bwd", k, shape)) for k in ("time", "peak_memory"))
        bt, bm = (get.get(("torch", "fwd+bwd", k, shape)) for k in ("time", "peak_memory"))
        if None not in (t, m, bt, bm):
            mem_ok, time_ok = m <= 0.10 * bm, t <= 0.7 * bt
            out.append(
                f"- CPU goal (N={goal[1]}, H={goal[2]}, V={goal[3]} fp32, fwd+bwd, twin vs naive): peak memory "
                f"{100 * m / bm:.1f}% (goal <= 10%: {'MET' if mem_ok else 'NOT MET'}), time {t / bt:.2f}x "
                f"(goal <= 0.7x: {'MET' if time_ok else 'NOT MET'})."
            )
        out.append(
            "- H100 goals (>= 70% of dense bf16 peak on 6*N*H*V, beats Liger and CCE, <= dX + dW + 256 MiB): "
            "NOT MEASURED, no GPU in this run; `python -m benchmarks.bench_long_ce` on a CUDA machine measures them."
        )
    else:
        gpu = torch.cuda.get_device_name()
        peak = (peak_bf16(gpu) or float("nan")) / 1e12  # dense bf16 TFLOP/s of this GPU
        for shape in shapes:
            tf = get.get(("ours_triton", "fwd+bwd", "throughput", shape))
            if tf is None:
                continue
            out.append(
                f"- {shape}: ours_triton fwd+bwd {tf:.0f} TFLOP/s = {100 * tf / peak:.0f}% of "
                f"{gpu} dense bf16 peak ({peak:.0f}; goal >= 70% on an H100)"
            )
            n, h, v = (int(shape.split(f"{k}=")[1].split(",")[0]) for k in ("N", "H", "V"))
            mem = get.get(("ours_triton", "fwd+bwd", "peak_memory", shape))
            budget = (n * h * 2 + v * h * 2) / 2**20 + 256  # dX + dW (bf16) + 256 MiB
            out.append(
                f"- {shape}: ours_triton fwd+bwd peak {mem:.0f} MiB vs dX + dW + 256 MiB = {budget:.0f} MiB"
            )
            t = get.get(("ours_triton", "fwd+bwd", "time", shape))
            for other in ("liger", "cce"):
                o = get.get((other, "fwd+bwd", "time", shape))
                if o is not None:
                    out.append(f"- {shape}: ours_triton {t:.1f} ms vs {other} {o:.1f} ms ({o / t:.2f}x)")
    return out


def _report(rows, env, device, path: Path, plot_path: Path, csv_path: Path, argv: list[str]) -> None:
    cmd = " ".join(["python -m benchmarks.bench_long_ce", *(shlex.quote(a) for a in argv)])
    lines = [
        f"# long-ce benchmark, {env['device']}, {env['date']}",
        "",
        f"Command: `{cmd}`",
        "",
        f"Environment: device `{env['device']}`, `{env['versions']}`, git `{env['git_sha']}`, "
        f"torch threads {torch.get_num_threads()}, load average at the end {os.getloadavg()[0]:.1f} "
        "(other tenants share this machine: providers are measured round-robin so they see the same load).",
        "Peak memory: "
        + (
            "CUDA max_memory_allocated minus memory allocated before the call."
            if device.type == "cuda"
            else "RSS high-water mark (/proc/self/status VmHWM after resetting it via /proc/self/clear_refs) "
            "minus RSS before the call."
        ),
        "",
        "| shape | mode | provider | time p20/p50/p80 (ms) | peak MiB p50 | TFLOP/s p50 |",
        "|---|---|---|---|---|---|",
    ]
    get = {(r["provider"], r["mode"], r["metric"], r["shape"]): r for r in rows}
    for r in rows:
        if r["metric"] != "time":
            continue
        key = (r["provider"], r["mode"])
        mem = get[key + ("peak_memory", r["shape"])]["p50"]
        tf = get[key + ("throughput", r["shape"])]["p50"]
        lines.append(
            f"| {r['shape']} | {r['mode']} | {r['provider']} | {r['p20']:.1f} / {r['p50']:.1f} / {r['p80']:.1f} "
            f"| {mem:.1f} | {tf:.3f} |"
        )
    lines += [
        "",
        "## Goals",
        "",
        *_goal_lines(rows, device),
        "",
        f"Plot: `{plot_path.name}`; rows: `{csv_path}`.",
    ]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description="long-ce benchmark")
    p.add_argument("--quick", action="store_true", help="the CPU goal shape only (a few minutes on CPU)")
    p.add_argument("--smoke", action="store_true", help="toy shape, one rep (for tests)")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)"
    )
    p.add_argument("--tokens", type=int, nargs="*", default=None, help="override the token counts")
    p.add_argument("--providers", nargs="*", default=None)
    p.add_argument("--modes", nargs="*", default=["fwd", "fwd+bwd"])
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out-dir", default=str(RESULTS))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    args.argv = argv
    if args.warmup is None:
        args.warmup = 0 if args.smoke else 1
    if args.reps is None:
        args.reps = 1 if args.smoke else (3 if args.quick else 10)
    return run(args)


if __name__ == "__main__":
    main()

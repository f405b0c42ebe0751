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
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.long_ce_report import GOAL_SHAPES, GOAL_TOKENS, plot, write_report
from engine.models import FLAVOURS as FLAVOUR_ARGS
from kernels import linear_cross_entropy, naive_linear_cross_entropy

RESULTS = Path(__file__).parent / "results"
SHAPES = {  # name: (hidden, vocab)
    **{k: (FLAVOUR_ARGS[k].hidden_size, FLAVOUR_ARGS[k].vocab_size) for k in ("qwen2-7b", "glm4-9b")},
    "cpu-goal": (512, 32768),  # the CPU goal of the issue
    "toy": (32, 1024),
}
MODES = ("fwd", "fwd+bwd")
# Per run kind: shapes, tokens, inputs, ignored fractions, modes, providers (None: all).  The quick mode
# leaves out torch_lce (available with --providers), which takes ~10x the twin's time on CPU.
DEFAULTS = {
    "gpu": (GOAL_SHAPES, (GOAL_TOKENS,), ("normal", "peaked"), (0.0, 0.1, 0.5), ("fwd+bwd",), None),
    "quick": (
        ("cpu-goal",),
        (4096,),
        ("normal",),
        (0.1,),
        MODES,
        ("ours", "ours_recompute", "torch", "torch_compile"),
    ),
    "smoke": (("toy",), (256,), ("normal", "peaked"), (0.1,), MODES, ("torch", "ours")),
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


def run_case(provs, case, device, args, env, budget_s) -> list[dict]:
    name, n, ignore, inputs, dtype = case
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
    kind = "smoke" if args.smoke else ("quick" if args.quick or device.type != "cuda" else "gpu")
    shapes, tokens, inputs, ignores, modes, names = DEFAULTS[kind]
    shapes, tokens, names = args.shapes or shapes, args.tokens or tokens, args.providers or names
    inputs, ignores = args.inputs or inputs, args.ignore if args.ignore is not None else ignores
    args.modes = args.modes or list(modes)
    if device.type == "cuda":
        args.warmup = max(3, args.warmup)  # cuBLAS heuristics, Triton autotuning, allocator warm-up
    env = common.environment(device, (*common.DEFAULT_PACKAGES, "quack"))
    table = [p for p in providers(device, args.chunk_rows) if names is None or p.name in names]
    provs = [p for p in table if p.fn is not None]
    missing = {p.name: p.why for p in table if p.fn is None}
    for name, why in missing.items():
        print(f"{name:15s} unavailable: {why}")
    dtypes = args.dtype or ["bfloat16" if device.type == "cuda" else "float32"]
    if kind == "quick" and not args.dtype and any(p.name == "ours_recompute" for p in provs):
        dtypes.append("bfloat16")  # the CPU goal of the recompute mode is in bf16
    cases = [
        (s, n, ig, inp, getattr(torch, dt))
        for dt in dtypes
        for ig in ignores
        for inp in inputs
        for n in tokens
        for s in shapes
    ]
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
        rows += run_case(provs, case, device, args, env, box)
        _free(device)
    out_dir = Path(args.out_dir)
    csv_path = out_dir / "long_ce.csv"
    common.append_rows(csv_path, rows)
    tag = f"{common.device_slug(device)}_{env['date'][:10]}"  # the UTC date every row carries
    plot_path = out_dir / f"long_ce_{tag}.png"
    plot(rows, plot_path)
    report = out_dir / f"long_ce_{tag}.md"
    kinds = {p.name: p.kind for p in table}
    write_report(rows, env, device, report, plot_path, csv_path, args.argv, kinds, missing, skipped)
    print(f"rows -> {csv_path}\nplot -> {plot_path}\nreport -> {report}")
    return report


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description="long-ce benchmark")
    p.add_argument("--quick", action="store_true", help="the CPU goal case only (a few minutes on CPU)")
    p.add_argument("--smoke", action="store_true", help="toy shape, one rep (for tests)")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--dtype", nargs="*", default=None, help="bfloat16 / float16 / float32 (default: bf16 on CUDA)"
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

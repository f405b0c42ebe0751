"""One profiled engine training step: where the time goes (GEMMs, attention, loss, elementwise,
communication) and what holds memory, at the largest shape that fits one GPU with FSDP2 over 1 rank.

    python -m benchmarks.gpu_profile --out DIR                     # CUDA: the largest candidate that fits
    python -m benchmarks.gpu_profile --out DIR --flavour qwen2-7b --max-length 16384
    python -m benchmarks.gpu_profile --out DIR --smoke             # CPU: debug-qwen2, 256 tokens (the dry run)

The model path is the trainer's own (engine.train.build_sharded_model: meta build, full activation
checkpointing, FSDP2 on a 1-rank mesh, seeded init; engine.step.optimizer_step: long-ce forward/backward, clip,
AdamW) on one packed row of LongWriter-like documents (benchmarks.train_workload). Step 1 warms up (Triton
compilation, allocator), step 2 is timed without the profiler, step 3 runs under torch.profiler with the CUDA
allocator's history recorded.

Time by category: the profiler's key_averages, self time of every CUDA kernel (on CPU: of every CPU op),
classified by name (CATEGORIES, first match wins). The loss's dW / logits products are cuBLAS GEMMs and count
as "gemm"; "loss" holds the long-ce Triton kernels and the twin's softmax / cross-entropy ops.

"auto" (CUDA) tries CANDIDATES, largest first, whose engine.memory plan fits the GPU with a margin, each in a
fresh subprocess (an out-of-memory attempt leaves nothing behind), until one succeeds. Qwen2-7B at 28,672 tokens
plans 138.8 GiB for one rank: over an H200's 139.8 GiB with the CUDA context, so it is tried at 16,384.

Writes DIR/profile_<flavour>.json (summary), DIR/profile.csv (long-format rows), DIR/trace_<flavour>.json.gz
(chrome trace), DIR/memory_snapshot_<flavour>.pickle.gz (torch.cuda.memory._snapshot, when under 16 MiB).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

CANDIDATES = [  # (flavour, tokens), tried largest first; names missing from engine.models.FLAVOURS are skipped
    ("glm4-9b", 28672),
    ("qwen2-7b", 28672),
    ("qwen2-7b", 16384),
    ("qwen2.5-1.5b", 28672),
    ("qwen2.5-0.5b", 28672),
]
MARGIN_GIB = 3.0  # CUDA context, allocator fragmentation and step temporaries the plan leaves out
SNAPSHOT_CAP = 16 * 2**20  # the most one file brought back from a GPU runner may be
CATEGORIES = [  # (category, regex on the lower-cased kernel / op name); the first match wins
    ("communication", r"nccl|c10d|all_?gather|reduce_?scatter|all_?reduce|gloo|record_param_comms|broadcast"),
    # kernels/: long_ce.py's rows / dW kernels, long_ce_recompute.py's stats / grad kernels (issue 11)
    ("loss", r"_rows_kernel|_dw_kernel|_stats_kernel|_grad_kernel|long_ce|cross_entropy|nll_loss|log_softmax|"
             r"logsumexp"),
    ("attention", r"flash|fmha|attention|sdpa|varlen|scaled_dot_product"),
    ("gemm", r"gemm|cutlass|xmma|nvjet|cublas|wgmma|_mm_f32_kernel|aten::(mm|addmm|bmm|baddbmm|matmul|linear|_scaled_mm)$|"
             r"^(mm|addmm|bmm)backward"),
    ("optimizer", r"adam|_foreach|multi_tensor|clip_grad"),
    # CUDA kernels by their families; CPU ops by the aten names of pointwise / reduction / copy ops
    ("elementwise", r"elementwise|vectorized|unrolled|reduce_kernel|triton_(poi|red|per)|catarray|memcpy|memset|"
                    r"copy_kernel|fill_kernel|index|aten::(add|mul|div|sub|neg|pow|rsqrt|exp|silu|sigmoid|where|"
                    r"fill|copy|cat|clamp|mean|sum|norm|embedding|_to_copy|clone|masked_fill|zero|rand|uniform|"
                    r"normal|lt|gt|eq|ne|ge|le|bitwise|cumsum|repeat_interleave|_fused_rms_norm)(_|$)"),
]  # fmt: skip
_PATTERNS = [(c, re.compile(p)) for c, p in CATEGORIES]


def categorize(name: str) -> str:
    low = name.lower()
    return next((c for c, p in _PATTERNS if p.search(low)), "other")


def category_times(events, cuda: bool) -> tuple[dict[str, float], dict[str, list[tuple[str, float]]]]:
    """Seconds per category, and the top names of each, from key_averages() events (FunctionEventAvg):
    self device time of CUDA kernels, or self CPU time of CPU ops."""
    from torch.autograd import DeviceType

    def device_us(e) -> float:  # renamed from self_cuda_time_total in torch 2.x
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

    events = [e for e in events if not e.key.startswith("ProfilerStep")]
    if cuda:
        picked = [(e.key, device_us(e)) for e in events if e.device_type == DeviceType.CUDA]
        if not any(us for _, us in picked):  # kernels not listed on their own: the ops' device time
            picked = [(e.key, device_us(e)) for e in events]
    else:
        picked = [(e.key, e.self_cpu_time_total) for e in events]
    totals: dict[str, float] = {c: 0.0 for c, _ in CATEGORIES}
    totals["other"] = 0.0
    names: dict[str, list[tuple[str, float]]] = {c: [] for c in totals}
    for key, us in picked:
        c = categorize(key)
        totals[c] += us / 1e6
        names[c].append((key[:120], us / 1e6))
    top = {c: sorted(v, key=lambda kv: -kv[1])[:5] for c, v in names.items()}
    return totals, top


def _frame(frames: list[dict]) -> str:
    """The first frame in this project's code (engine/, kernels/, benchmarks/), else the innermost."""
    for f in frames:
        if re.search(r"/(engine|kernels|benchmarks)/", f.get("filename", "")):
            return f"{Path(f['filename']).name}:{f.get('line', '?')} {f.get('name', '')}"
    if frames:
        f = frames[0]
        return f"{Path(f.get('filename', '?')).name}:{f.get('line', '?')} {f.get('name', '')}"
    return "?"


def summarize_snapshot(snapshot: dict, baseline_bytes: int = 0) -> dict:
    """What held memory: the segments at the end of the step, and the peak of the recorded allocation history
    (alloc / free_completed events of device 0) with the allocation sites live at that peak."""
    segments = snapshot.get("segments", [])
    live: dict[int, tuple[int, str]] = {}  # addr -> (bytes, allocation site)
    cur = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    events = (snapshot.get("device_traces") or [[]])[0]
    for ev in events:
        action, addr, size = ev.get("action"), ev.get("addr"), ev.get("size", 0)
        if action == "alloc":
            live[addr] = (size, _frame(ev.get("frames", [])))
            cur += size
            if cur > peak:
                peak, at_peak = cur, dict(live)
        elif action == "free_completed" and addr in live:
            cur -= live.pop(addr)[0]
    sites: dict[str, int] = {}
    for size, site in at_peak.values():
        sites[site] = sites.get(site, 0) + size
    mib = 2**20
    return {
        "segments": len(segments),
        "reserved_mib": sum(s.get("total_size", 0) for s in segments) / mib,
        "allocated_mib": sum(s.get("allocated_size", 0) for s in segments) / mib,
        "trace_events": len(events),
        "ooms": sum(ev.get("action") == "oom" for ev in events),
        "history_peak_mib": (baseline_bytes + peak) / mib,
        "peak_sites_mib": sorted(((s, b / mib) for s, b in sites.items()), key=lambda kv: -kv[1])[:10],
    }


def pick_candidates(
    total_bytes: float, names: set[str], tokens: int | None = None
) -> list[tuple[str, int, float]]:
    """(flavour, tokens, planned GiB) of CANDIDATES (all at `tokens` if given) that exist and whose plan fits
    total_bytes with MARGIN_GIB."""
    from engine.memory import GiB, plan_memory
    from engine.models import FLAVOURS

    out = []
    cands = dict.fromkeys((f, tokens or t) for f, t in CANDIDATES)
    for flavour, tokens in cands:
        if flavour in names:
            plan = plan_memory(FLAVOURS[flavour], world_size=1, tokens_per_micro_batch=tokens).total / GiB
            if plan + MARGIN_GIB <= total_bytes / GiB:
                out.append((flavour, tokens, plan))
    return out


def profile_step(flavour: str, tokens: int, out: Path) -> dict:
    """Build the trainer's model, run warm-up + timed + profiled steps, write the files; returns the summary."""
    import torch

    from benchmarks import common
    from benchmarks.train_workload import make_steps, step_stats
    from engine.config import Config
    from engine.metrics import peak_flops, step_flops
    from engine.objectives import SFTObjective
    from engine.parallel import init_distributed, shutdown_distributed
    from engine.step import optimizer_step
    from engine.train import build_optimizer_and_schedule, build_sharded_model

    info = init_distributed()
    cuda = info.device.type == "cuda"
    cfg = Config()
    cfg.model.model, cfg.model.torch_dtype = flavour, "bfloat16" if cuda else "float32"
    cfg.train.gradient_checkpointing = True
    cfg.optim.lr_scheduler_type = "constant"
    t0 = time.perf_counter()
    model = build_sharded_model(cfg, info)
    opt, sched = build_optimizer_and_schedule(model, cfg, 3)
    steps = make_steps(model.args.vocab_size, tokens, 3, 0, "packed")
    build_s = time.perf_counter() - t0

    def step(k: int) -> float:
        common.synchronize(info.device)
        t = time.perf_counter()
        optimizer_step(
            model, opt, sched, steps[k], SFTObjective("long-ce"), max_grad_norm=1.0, device=info.device
        )
        common.synchronize(info.device)
        return time.perf_counter() - t

    warm_s, step_s = step(0), step(1)
    activities = [torch.profiler.ProfilerActivity.CPU]
    baseline = 0
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(max_entries=100_000, stacks="python")
    with torch.profiler.profile(activities=activities) as prof:
        profiled_s = step(2)
    memory: dict = {"method": "n/a on CPU: no allocator history; peak RSS only"}
    stem = f"{flavour}_T{tokens}"
    snap = None
    if cuda:
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        memory = summarize_snapshot(snap, baseline)
        memory.update(
            peak_allocated_mib=torch.cuda.max_memory_allocated() / 2**20,
            peak_reserved_mib=torch.cuda.max_memory_reserved() / 2**20,
            alloc_retries=torch.cuda.memory_stats().get("num_alloc_retries", 0),
            total_mib=torch.cuda.get_device_properties(info.device).total_memory / 2**20,
        )
    else:
        from engine.metrics import max_memory_gb

        memory["peak_rss_mib"] = max_memory_gb(info.device) * 1024
    totals, top = category_times(prof.key_averages(), cuda)
    stats = step_stats(steps[1])
    peak = peak_flops(info.device)
    summary = {
        "flavour": flavour, "tokens": tokens, "device": common.device_name(info.device),
        "dtype": cfg.model.torch_dtype, "build_s": build_s, "warmup_step_s": warm_s, "step_s": step_s,
        "profiled_step_s": profiled_s, "tokens_per_s": stats["tokens"] / step_s,
        "mfu_doc": step_flops(model.args, stats["tokens"], stats["sum_sq_doc"]) / step_s / peak if peak else None,
        "category_s": totals, "category_top": top, "memory": memory,
    }  # fmt: skip
    # The summary and rows first: the trace and the snapshot take the longest to write.
    (out / f"profile_{stem}.json").write_text(json.dumps(summary, indent=1))
    env = common.environment(info.device)
    shape = f"{flavour} T={tokens} {cfg.model.torch_dtype} ranks=1 ac=full"
    rows: list[dict] = []

    def add(metric: str, unit: str, value: float) -> None:
        rows.append(common.row(env, "engine", "profiled step", metric, unit, shape, [value], fmt=".6g"))

    add("step_time", "s", step_s)
    add("tokens_per_s", "tokens/s", summary["tokens_per_s"])
    if summary["mfu_doc"] is not None:
        add("mfu_doc", "fraction", summary["mfu_doc"])
    kernel_total = sum(totals.values()) or 1.0
    for c, sec in totals.items():
        add(f"time_{c}", "s", sec)
        add(f"share_{c}", "fraction", sec / kernel_total)
    for k in ("peak_allocated_mib", "peak_reserved_mib", "peak_rss_mib"):
        if k in memory:
            add(k.removesuffix("_mib"), "MiB", memory[k])
    common.append_rows(out / "profile.csv", rows)
    if snap is not None:
        blob = gzip.compress(pickle.dumps(snap), compresslevel=1)  # level 9 takes many seconds on 100 MB
        if len(blob) <= SNAPSHOT_CAP:
            (out / f"memory_snapshot_{stem}.pickle.gz").write_bytes(blob)
    trace = out / f"trace_{stem}.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
    shutdown_distributed()
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--flavour", default="auto", help="engine.models flavour, or auto (CUDA: largest that fits)"
    )
    ap.add_argument("--max-length", type=int, default=None, help="tokens of the packed row")
    ap.add_argument("--smoke", action="store_true", help="debug-qwen2, 256 tokens (CPU dry run)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.smoke:
        a.flavour, a.max_length = "debug-qwen2", a.max_length or 256
    if a.flavour != "auto":
        s = profile_step(a.flavour, a.max_length or 28672, out)
        print(json.dumps({k: v for k, v in s.items() if k != "category_top"}, indent=1))
        return 0
    import torch

    from engine.models import FLAVOURS

    if not torch.cuda.is_available():
        print("error: --flavour auto needs CUDA; name a flavour or use --smoke", file=sys.stderr)
        return 2
    total = torch.cuda.get_device_properties(0).total_memory
    tries = pick_candidates(total, set(FLAVOURS), a.max_length)
    env = dict(os.environ)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # packed shapes vary per step
    for flavour, tokens, plan in tries:
        print(
            f"profiling {flavour} at {tokens} tokens (plan {plan:.1f} GiB of {total / 2**30:.1f})", flush=True
        )
        cmd = [sys.executable, "-m", "benchmarks.gpu_profile", "--out", a.out, "--flavour", flavour,
               "--max-length", str(tokens)]  # fmt: skip
        if subprocess.run(cmd, env=env).returncode == 0:
            return 0
        print(f"{flavour} at {tokens} tokens failed; trying the next candidate", flush=True)
    print("error: no candidate ran", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

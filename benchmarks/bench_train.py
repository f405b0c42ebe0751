"""Training throughput, MFU and peak memory of the engine, against the alternatives a user would pick.

    python -m benchmarks.bench_train --quick        # CPU: debug-qwen2, 2,048-token packs (a few minutes)
    python -m benchmarks.bench_train                # GPU: qwen2.5-0.5b and -1.5b, 28,672-token packs, full set
    python -m benchmarks.bench_train --configs core --budget_s 420   # GPU: eager, compiled, HF, HF+Liger
    python -m benchmarks.bench_train --smoke --results-dir /tmp/x   # test suite: the --quick set, tiny, in-process
    python -m benchmarks.bench_train --plan qwen2-7b --nproc 4 --gpu a100-80gb   # memory plan + projection

Workload: documents with LongWriter-like lengths (benchmarks.bench_data.longwriter_lengths: lognormal long
replies mixed with short chat samples), scaled to max_length / 28,672, random token ids, the first 10% of
each document a prompt (labels -100). Optimizer step k holds the documents of one packed row
(engine.data.pack_lengths), whatever the layout: "packed" = that row as one [1, T] micro-batch with
cu_seqlens / position_ids; "padded" = one document per row, micro-batches of rows x longest <= max_length
padded to their longest; "bs1" = one document per micro-batch (the LongWriter recipe's packing off,
batch_size 1). Unpacked layouts accumulate gradients over their micro-batches. So every configuration trains on the same tokens and its
first-step loss is the same number. --nproc N runs the engine under torchrun, every rank on the same steps.

Every configuration runs in a fresh subprocess (clean allocator, clean peak-memory counters, Liger's
monkey-patching cannot leak). A step = forward + backward of all its micro-batches + gradient clipping +
AdamW, timed with a device sync; the first --warmup steps are discarded.

Metrics (long-format rows in results/train.csv, percentiles over the measured steps):
  tokens_per_s  real (non-padding) tokens per second per device (GPU)
  step_time     seconds per optimizer step
  mfu_causal    model FLOPs / step time / peak with causal-halved attention over each document, what document
                masking really computes: 6 N (real tokens) + 6 n_layers d_q sum_docs L^2
                (engine.metrics.step_flops)
  mfu_full_attn the convention torchtitan and MPT publish: every row one sequence of its full (padded) length
                with full, not causal-halved, attention: 6 N (B*T) + 12 n_layers d_q sum_rows T^2
                (engine.metrics.step_flops(..., attention="full")). Neither counts the recompute of activation checkpointing
                (MFU, not HFU).
  peak_memory   GPU: torch.cuda.max_memory_allocated over the whole run (params, grads, AdamW, activations).
                CPU: high-water mark of the resident set (VmHWM, reset through /proc/self/clear_refs after the
                imports and a toy warm-up step) minus the resident set at that moment, in the fresh
                subprocess (benchmarks.common.peak_memory_bytes).
  peak_reserved GPU only: torch.cuda.max_memory_reserved (what the caching allocator held, cached blocks
                included: what decides an out-of-memory).
  loss_step1    the first step's loss (same weights, same tokens: every provider should agree).
  tokens_per_cpu_s  (CPU only) real tokens per process CPU-second.
Peak FLOP/s: the bf16 dense peak of engine.metrics.PEAK_BF16 on GPU; on CPU the best fp32 GEMM rate measured
in this run (1024^3 matmuls, same thread count), so CPU "MFU" is against what this machine's BLAS reaches.

This file is the command line and the parent (launch, rounds, CSV). The rest: train_workload.py
(configurations, documents, micro-batches), train_worker.py (one configuration in one process; the engine
runner), train_baselines.py (transformers / Liger runners), train_report.py (metrics, report, plot),
train_plan.py (--plan).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from benchmarks.common import append_rows, device_slug, environment, row
from benchmarks.train_plan import GPUS, write_plan
from benchmarks.train_report import merge_rounds, pcts, plot, render_report, summarize
from benchmarks.train_worker import run_worker
from benchmarks.train_workload import (
    REF_LENGTH,
    RunSpec,
    core_configs,
    cpu_configs,
    gpu_configs,
    make_steps,
    smoke_configs,
    step_stats,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GPU_FLAVOURS = "qwen2.5-0.5b,qwen2.5-1.5b"  # the full mode's shapes (random init)
MIN_CONFIG_S = 30  # --budget_s: a configuration is not started with less time left


# ------------------------------------------------------------------------------------------------- parent
def cpu_gemm_peak(threads: int | None = None, n: int = 1024, reps: int = 20) -> float:
    """Best fp32 GEMM FLOP/s of this machine right now (the CPU stand-in for a datasheet peak)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def prepare_hf_dir(flavour: str, seed: int, out_dir: str) -> str:
    """The engine's seeded random init of `flavour`, written as an HF checkpoint: both providers train the
    very same weights."""
    from engine.models import build_model, save_pretrained
    from engine.parallel import load_full_tensors_, random_init_tensors

    model = build_model(flavour, init=False)
    load_full_tensors_(model, random_init_tensors(model, seed, std=model.args.initializer_range))
    save_pretrained(model, out_dir)
    return out_dir


def launch(spec: RunSpec, timeout: float, isolate: bool = True) -> dict:
    """Run one configuration in a fresh subprocess (isolate) or in this process (smoke tests: fast, but
    peak memory may reuse what earlier configurations freed, and a patched transformers stays patched)."""
    if not isolate:
        return run_worker(spec)
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "out.json")
        cmd = [sys.executable, "-m", "benchmarks.bench_train", "--worker", json.dumps(asdict(spec)), "--worker-out", out_path]  # fmt: skip
        if spec.nproc > 1:
            run = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={spec.nproc}"]
            cmd = [sys.executable, *run, *cmd[1:]]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "error", "config": spec.config, "reason": f"timeout after {timeout:.0f} s"}
        if p.returncode != 0 or not os.path.exists(out_path):
            tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"status": "error", "config": spec.config, "reason": f"exit {p.returncode}: {tail[0]}"}
        with open(out_path) as f:
            return json.load(f)


def run_suite(ns) -> int:
    import torch

    cuda = torch.cuda.is_available()
    if ns.smoke:
        ns.in_process = True
        configs, flavours, T, warmup, steps, rounds = smoke_configs(), "debug-qwen2", 256, 1, 1, 1
    elif ns.quick:
        configs, flavours, T, warmup, steps, rounds = cpu_configs(), "debug-qwen2", 2048, 2, 10, 1
    else:
        if not cuda:
            print("error: the full mode needs a CUDA GPU; use --quick on CPU", file=sys.stderr)
            return 2
        configs, flavours, T, warmup, steps, rounds = gpu_configs(), GPU_FLAVOURS, 28672, 3, 10, 1
    flavours = [f for f in (ns.flavour or flavours).split(",") if f]
    T, warmup, steps = ns.max_length or T, ns.warmup if ns.warmup is not None else warmup, ns.steps or steps
    rounds, nproc = ns.rounds or rounds, ns.nproc or 1
    # CPU: one thread per worker by default. On a machine shared with other jobs, a second OpenMP thread
    # waits at every barrier for a core someone else holds: a 256x64x128 matmul then stalls ~16 ms at p99
    # instead of ~0.2 ms, and step times swing 10x between identical runs.
    threads = ns.threads or (None if cuda else 1)
    if ns.configs == "core":
        configs = core_configs(configs, cuda)
    if ns.only:
        configs = [c for c in configs if any(sub in c.name for sub in ns.only)]
    dev = torch.device("cuda" if cuda else "cpu")
    if threads:
        torch.set_num_threads(threads)  # before environment(): the CPU device name carries the thread count
    env = environment(dev)
    results_dir = Path(ns.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    if cuda:
        from engine.metrics import peak_flops

        peak = peak_flops(torch.device("cuda"))
        if peak is None:
            print("error: unknown GPU peak; add it to engine.metrics.PEAK_BF16", file=sys.stderr)
            return 2
        peak_note = f"bf16 dense datasheet peak {peak / 1e12:.0f} TFLOP/s (engine.metrics.PEAK_BF16)"
    else:
        peak = cpu_gemm_peak(threads, reps=5 if ns.smoke else 20)
        peak_note = f"best fp32 1024^3 GEMM measured in this run: {peak / 1e9:.1f} GFLOP/s"
    deadline = time.monotonic() + ns.budget_s if ns.budget_s else None
    schedule = (T, warmup, steps, rounds, threads, nproc, peak, peak_note, deadline)
    rows, reports = [], []
    for flavour in flavours:
        f_rows, report = run_flavour(ns, env, configs, flavour, schedule, cuda)
        rows += f_rows
        reports.append(report)
    rows.append(row(env, "hardware", "peak", "peak_flops", "FLOP/s", peak_note, [peak], fmt=".6g"))
    csv_path = results_dir / "train.csv"
    append_rows(csv_path, rows)
    stem = f"train_{device_slug(dev)}_{env['date'][:10]}" + ("_smoke" if ns.smoke else "")
    (results_dir / f"{stem}.md").write_text("\n".join(text for text, _ in reports))
    for k, (_, (table, title)) in enumerate(reports):  # one plot per flavour
        plot(table, results_dir / f"{stem}{'' if k == 0 else f'_{flavours[k]}'}.png", title)
    print(f"appended {len(rows)} rows to {csv_path}; wrote {stem}.md and its plot(s)")
    return 0


def run_flavour(ns, env, configs, flavour: str, schedule: tuple, cuda: bool) -> tuple[list[dict], tuple]:
    """Every configuration on one model shape; returns its CSV rows and (report markdown, plot data)."""
    from engine.models import resolve_args

    T, warmup, steps, rounds, threads, nproc, peak, peak_note, deadline = schedule
    args = resolve_args(flavour)
    load_before = os.getloadavg()
    probe = make_steps(args.vocab_size, T, warmup + steps, 0, "packed")
    fills = [step_stats(s)["tokens"] / T for s in probe]
    docs = [len(s[0]["doc_lengths"]) for s in probe]
    shape = f"{flavour} T={T} {'bf16' if cuda else 'fp32'} docs/step={np.mean(docs):.1f}" + (
        f" ranks={nproc}" if nproc > 1 else ""
    )
    print(f"{len(configs)} configs, {shape}, warmup {warmup}, steps {steps}; peak {peak_note}", flush=True)
    backend = "aot_eager" if ns.smoke else "inductor"  # the smoke test builds no C++
    table, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = None
        if nproc == 1 and any(c.provider.startswith("transformers") for c in configs):
            hf_dir = prepare_hf_dir(flavour, 0, os.path.join(tmp, "hf"))
        # Rounds interleave the configurations (A B C, A B C): on a shared machine a burst of someone
        # else's load then spreads over all of them instead of penalising one.
        results: dict[str, list[dict]] = {c.name: [] for c in configs}
        for r in range(rounds):
            for c in configs:
                spec = RunSpec(asdict(c), flavour, T, warmup, steps, hf_dir=hf_dir, threads=threads, nproc=nproc,
                               compile_backend=backend)  # fmt: skip
                t0 = time.perf_counter()
                left = None if deadline is None else deadline - time.monotonic()
                if nproc > 1 and c.provider != "engine":
                    res = {"status": "skipped", "config": spec.config,
                           "reason": "transformers baselines run in one process (multi-GPU needs accelerate/FSDP)"}  # fmt: skip
                elif left is not None and left < MIN_CONFIG_S:
                    res = {
                        "status": "skipped",
                        "config": spec.config,
                        "reason": f"--budget_s: {left:.0f} s left",
                    }
                else:
                    res = launch(spec, min(ns.timeout, left or ns.timeout), isolate=not ns.in_process)
                results[c.name].append(res)
                msg = res["status"] if res["status"] != "ok" else (
                    f"{np.median([s['tokens'] / s['time'] for s in res['steps'] if not s['warmup']]):9.0f} tok/s  "
                    f"peak {res['peak_memory_mib']:8.1f} MiB  loss1 {res['steps'][0]['loss']:.5f}"
                )  # fmt: skip
                print(f"  [{r + 1}/{rounds}] {c.name:46s} {msg}  [{time.perf_counter() - t0:.0f} s] "
                      f"{res.get('reason', '')[:80]}", flush=True)  # fmt: skip
    for c in configs:
        res = merge_rounds(results[c.name])
        summary = summarize(res, args, peak, cuda)
        table.append(
            {"name": c.name, "provider": c.provider, "mode": c.mode, "status": res["status"],
             "reason": res.get("reason", ""), "attn_impl": res.get("attn_impl", ""),
             "memory_method": res.get("memory_method", ""), "n_steps": res.get("n_measured", 0),
             "p": {m: pcts(v) for m, (_, v) in summary.items()}}
        )  # fmt: skip
        for metric, (unit, values) in summary.items():
            rows.append(row(env, c.provider, c.mode, metric, unit, shape, values, fmt=".6g"))
    cmd = "python -m benchmarks.bench_train " + " ".join(ns.argv)
    report = render_report(table, env, cmd, shape, peak_note, (warmup, steps, rounds, threads), fills, docs, load_before, os.getloadavg(), cuda)  # fmt: skip
    return rows, (report, (table, f"bench_train {shape} | {env['device']} | {env['date']}"))


# ----------------------------------------------------------------------------------------------------- cli
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU quick mode: debug-qwen2, 2,048-token packs")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="the --quick configurations at 256 tokens, 1+1 steps (test suite)",
    )
    ap.add_argument(
        "--flavour",
        help=f"engine.models flavour(s), comma-separated (default: debug-qwen2 quick, {GPU_FLAVOURS} GPU)",
    )
    ap.add_argument("--max-length", type=int, help="tokens per packed row")
    ap.add_argument("--warmup", type=int, help="steps discarded")
    ap.add_argument("--steps", type=int, help="steps measured")
    ap.add_argument("--rounds", type=int, help="interleaved repeats of the whole set (default 1)")
    ap.add_argument("--only", nargs="*", help="run configurations whose name contains one of these")
    ap.add_argument(
        "--configs",
        choices=("all", "core"),
        default="all",
        help="core: engine eager + compiled, transformers, transformers + Liger (packed, full checkpointing)",
    )
    ap.add_argument("--budget_s", type=float, help="wall-clock box for the whole run: no configuration starts "
                    f"with less than {MIN_CONFIG_S} s left, and none runs past it")  # fmt: skip
    ap.add_argument("--threads", type=int, help="torch threads per worker (CPU default 1; GPU: torch's)")
    ap.add_argument(
        "--in-process", action="store_true", help="no subprocess per configuration (--smoke does this)"
    )
    ap.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    ap.add_argument("--results-dir", default=str(RESULTS))
    ap.add_argument("--plan", metavar="FLAVOUR", help="write the memory plan + throughput projection")
    ap.add_argument(
        "--nproc", type=int, help="--plan: GPUs (default 4); suite: engine ranks under torchrun (1)"
    )
    ap.add_argument("--gpu", default="a100-80gb", choices=sorted(GPUS))
    ap.add_argument("--mfu", type=float, default=0.55)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    ns.argv = argv
    if ns.worker:
        spec = RunSpec(**json.loads(ns.worker))
        res = run_worker(spec)
        if int(os.environ.get("RANK", 0)) == 0:  # rank 0 reports (its own step times and memory)
            with open(ns.worker_out, "w") as f:
                json.dump(res, f)
        return 0
    if ns.plan:
        T = ns.max_length or REF_LENGTH
        name = f"{ns.plan.replace('.', '_').replace('-', '_')}_plan.md"
        print(write_plan(ns.plan, ns.nproc or 4, ns.gpu, T, ns.mfu, Path(ns.results_dir) / name))
        return 0
    return run_suite(ns)


if __name__ == "__main__":
    sys.exit(main())

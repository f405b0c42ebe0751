"""Training throughput, MFU and peak memory of the engine, against the alternatives a user would pick.

    python -m benchmarks.bench_train --quick        # CPU: debug-qwen2, 2,048-token packs (a few minutes)
    python -m benchmarks.bench_train                # GPU: qwen2.5-0.5b, 28,672-token packs, full set
    python -m benchmarks.bench_train --smoke --results-dir /tmp/x   # test suite: 2 tiny configs, < 30 s
    python -m benchmarks.bench_train --plan qwen2-7b --nproc 4 --gpu a100-80gb   # memory plan + projection

Workload: documents with LongWriter-like lengths (benchmarks.bench_data.longwriter_lengths: lognormal long
replies mixed with short chat samples), scaled to max_length / 28,672, random token ids, the first 10% of
each document a prompt (labels -100). Optimizer step k holds the documents of one best-fit-decreasing packed
row, whatever the layout: "packed" = that row as one [1, T] micro-batch with cu_seqlens / position_ids;
"padded" = one document per row, micro-batches of rows x longest <= max_length padded to their longest;
"bs1" = one document per micro-batch (the LongWriter recipe's packing off, batch_size 1). Unpacked layouts
accumulate gradients over their micro-batches. So every configuration trains on the same tokens and its
first-step loss is the same number. --nproc N runs the engine under torchrun, every rank on the same steps.

Every configuration runs in a fresh subprocess (clean allocator, clean peak-memory counters, Liger's
monkey-patching cannot leak). A step = forward + backward of all its micro-batches + gradient clipping +
AdamW, timed with a device sync; the first --warmup steps are discarded.

Metrics (long-format rows in results/train.csv, percentiles over the measured steps):
  tokens_per_s  real (non-padding) tokens per second per device
  step_time     seconds per optimizer step
  mfu_row       model FLOPs / step time / peak, counting every row as ONE causal sequence of its full (padded)
                length: 6 N (B*T) + 6 n_layers d_q sum_rows T^2. The convention of most published MFU numbers.
  mfu_doc       the same with only what document masking really computes: 6 N (real tokens)
                + 6 n_layers d_q sum_docs L^2 (engine.metrics.step_flops). Recompute of activation
                checkpointing is not counted in either (MFU, not HFU).
  peak_memory   GPU: torch.cuda.max_memory_allocated over the whole run (params, grads, AdamW, activations).
                CPU: high-water mark of the resident set (VmHWM, reset through /proc/self/clear_refs after the
                imports and a toy warm-up step) minus the resident set at that moment, in the fresh
                subprocess (benchmarks.common.peak_memory_bytes).
  loss_step1    the first step's loss (same weights, same tokens: every provider should agree).
  tokens_per_cpu_s  (CPU only) real tokens per process CPU-second.
Peak FLOP/s: the bf16 dense peak of engine.metrics.PEAK_BF16 on GPU; on CPU the best fp32 GEMM rate measured
in this run (1024^3 matmuls, same thread count), so CPU "MFU" is against what this machine's BLAS reaches.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import (
    CSV_FIELDS,
    append_rows,
    device_slug,
    environment,
    peak_memory_bytes,
    percentiles,
    synchronize,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIELDS = CSV_FIELDS
REF_LENGTH = 28672  # the LongWriter max_length the length distribution is defined for


# ------------------------------------------------------------------------------------------ configurations
LAYOUTS = ("packed", "padded", "bs1")


@dataclass(frozen=True)
class BenchConfig:
    provider: str  # "engine" | "transformers" | "transformers+liger"
    # "packed": the step's documents in one row (cu_seqlens / position_ids); "padded": one document per row,
    # micro-batches of rows x longest <= max_length padded to their longest; "bs1": one document per
    # micro-batch, no padding (the LongWriter ms-swift recipe: packing off, batch_size 1, accumulation).
    layout: str = "packed"
    # engine: "triton" | "twin" (kernels impl="torch") | "plain" (logits + F.cross_entropy);
    # transformers: "plain" (its own loss) | "liger" (Liger's fused linear cross-entropy)
    loss: str = "plain"
    ac: str = "off"  # "off" | "full" | "every2" (every k-th block, k=2; engine only)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")

    @property
    def mode(self) -> str:
        return f"{self.layout} loss={self.loss} ac={self.ac}"

    @property
    def name(self) -> str:
        return f"{self.provider} {self.mode}"


def cpu_configs() -> list[BenchConfig]:
    E, HF = "engine", "transformers"
    return [
        BenchConfig(E, "packed", "twin", "off"),
        BenchConfig(E, "packed", "plain", "off"),
        BenchConfig(E, "packed", "twin", "full"),
        BenchConfig(E, "packed", "twin", "every2"),
        BenchConfig(E, "padded", "twin", "off"),
        BenchConfig(E, "bs1", "twin", "off"),
        BenchConfig(HF, "packed", "plain", "off"),
        BenchConfig(HF, "padded", "plain", "off"),
        BenchConfig(HF, "packed", "plain", "full"),
        BenchConfig("transformers+liger", "packed", "liger", "off"),
    ]


def gpu_configs() -> list[BenchConfig]:
    E, HF = "engine", "transformers"
    return [
        BenchConfig(E, "packed", "triton", "full"),  # the goal configuration
        BenchConfig(E, "packed", "twin", "full"),
        BenchConfig(E, "packed", "plain", "full"),
        BenchConfig(E, "packed", "triton", "off"),
        BenchConfig(E, "packed", "triton", "every2"),
        BenchConfig(E, "padded", "triton", "full"),
        BenchConfig(E, "bs1", "triton", "full"),  # examples/longwriter_qwen2_7b.yaml's layout
        BenchConfig(HF, "packed", "plain", "full"),  # the baseline of the goal
        BenchConfig(HF, "padded", "plain", "full"),
        BenchConfig(HF, "packed", "plain", "off"),
        BenchConfig("transformers+liger", "packed", "liger", "full"),
    ]


def smoke_configs() -> list[BenchConfig]:
    return [
        BenchConfig("engine", "packed", "twin", "off"),
        BenchConfig("transformers", "packed", "plain", "off"),
    ]


@dataclass
class RunSpec:
    """What one worker subprocess runs (JSON on its command line)."""

    config: dict
    flavour: str
    max_length: int
    warmup: int
    steps: int
    seed: int = 0
    hf_dir: str | None = None  # HF checkpoint of the same random weights (transformers providers)
    threads: int | None = None
    nproc: int = 1  # > 1: the engine under torchrun, every rank on the same steps (per-device numbers)


# ----------------------------------------------------------------------------------------------- workload
def doc_lengths_pool(max_length: int, n_rows: int, seed: int) -> list[list[int]]:
    """Rows (lists of document lengths) of a best-fit-decreasing packing of LongWriter-like lengths."""
    from benchmarks.bench_data import longwriter_lengths
    from engine.data import pack_lengths

    scale = max_length / REF_LENGTH
    n_long = max(64, n_rows * 30)  # a pool of ~4x the rows needed: BFD fills rows to ~99% on a large pool
    lengths = longwriter_lengths(n_long, n_long // 2, seed=seed)
    lengths = np.clip(np.round(lengths * scale), 8, max_length).astype(np.int64)
    plan = pack_lengths(lengths, max_length, seed=seed)
    # The best-filled rows of the pool, in the plan's shuffled order: a real dataset of thousands of samples
    # packs to ~99.7% (benchmarks/results/data.md); a small pool leaves loosely filled leftover rows that
    # would not be representative.
    fill = np.array([lengths[row].sum() for row in plan])
    keep = np.sort(np.argsort(-fill, kind="stable")[:n_rows])
    if len(keep) < n_rows:
        raise AssertionError(f"pool too small: {len(plan)} rows < {n_rows}")
    return [[int(lengths[i]) for i in plan[j]] for j in keep]


def make_document(length: int, vocab: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, aligned labels): targets are the next token, the first 10% (the prompt) and the last
    token have none (-100)."""
    ids = rng.integers(0, vocab, length, dtype=np.int64)
    labels = np.full(length, -100, dtype=np.int64)
    start = max(1, length // 10) - 1
    labels[start : length - 1] = ids[start + 1 :]
    return ids, labels


def make_steps(vocab: int, max_length: int, n_steps: int, seed: int, layout: str) -> list[list[dict]]:
    """Micro-batches (engine.data.collate_rows dicts + "row_lengths") of every optimizer step."""
    from engine.data import collate_rows

    rng = np.random.default_rng([seed, 0xB7])
    steps = []
    for row in doc_lengths_pool(max_length, n_steps, seed):
        docs = [make_document(n, vocab, rng) for n in row]
        if layout == "packed":
            groups = [[docs]]  # one micro-batch, one row holding every document
        elif layout == "bs1":
            groups = [[[d]] for d in docs]
        else:  # one document per row; micro-batches of similar lengths under a max_length token budget
            docs = sorted(docs, key=lambda d: -len(d[0]))
            groups, cur = [], []
            for d in docs:  # longest first: cur[0] holds the longest row of the micro-batch
                if cur and (len(cur) + 1) * len(cur[0][0][0]) > max_length:
                    groups.append(cur)
                    cur = []
                cur.append([d])
            groups.append(cur)
        mbs = []
        for rows in groups:
            mb = collate_rows(rows, pad_token_id=0)
            mb["row_lengths"] = [sum(len(ids) for ids, _ in r) for r in rows]
            mbs.append(mb)
        steps.append(mbs)
    return steps


def step_stats(micro_batches: list[dict]) -> dict:
    """Token counts and attention extents of one step for the two MFU conventions."""
    out = {"tokens": 0, "row_tokens": 0, "sum_sq_doc": 0, "sum_sq_row": 0, "n_target": 0}
    for mb in micro_batches:
        B, T = mb["input_ids"].shape
        out["tokens"] += sum(mb["doc_lengths"])
        out["sum_sq_doc"] += sum(n * n for n in mb["doc_lengths"])
        out["row_tokens"] += B * T
        out["sum_sq_row"] += B * T * T
        out["n_target"] += mb["num_target_tokens"]
    return out


# ------------------------------------------------------------------------------------------------- worker
def _engine_runner(spec: RunSpec, cfg: BenchConfig, device):
    """The trainer's own model path (meta build -> AC -> FSDP2 -> init) and its step function."""
    import torch

    from engine.config import Config
    from engine.models import default_loss_fn
    from engine.models.attention import resolve_attn_impl
    from engine.optim import build_optimizer, build_scheduler
    from engine.parallel import init_distributed
    from engine.train import build_sharded_model, optimizer_step

    info = init_distributed()
    c = Config()
    c.model.model = spec.flavour
    c.model.torch_dtype = "bfloat16" if device.type == "cuda" else "float32"
    c.model.loss_impl = {"triton": "triton", "twin": "torch"}.get(cfg.loss, "auto")
    c.train.seed = spec.seed
    c.train.gradient_checkpointing = cfg.ac != "off"
    c.train.gradient_checkpointing_every = 2 if cfg.ac == "every2" else 1
    model = build_sharded_model(c, info)
    if cfg.loss == "plain":
        model.loss_fn = default_loss_fn
    o = c.optim
    opt = build_optimizer(
        model,
        lr=o.learning_rate,
        weight_decay=o.weight_decay,
        betas=(o.adam_beta1, o.adam_beta2),
        eps=o.adam_epsilon,
    )
    sched = build_scheduler(opt, kind="constant", warmup_ratio=0.0, total_steps=spec.warmup + spec.steps)

    def step(micro_batches):  # the trainer's own step: long-ce forward/backward, clip, AdamW, LR
        return optimizer_step(model, opt, sched, micro_batches, c, device, stop=None)["loss"]

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return step, {
        "attn_impl": resolve_attn_impl(model.attn_impl, device, dtype),
        "params": model.args.num_params(),
    }


def _apply_liger(model_type: str) -> None:
    import liger_kernel.transformers as lk  # optional; ImportError -> "skipped"

    fn = {"qwen2": "apply_liger_kernel_to_qwen2", "glm4": "apply_liger_kernel_to_glm4"}.get(model_type)
    if fn is None or not hasattr(lk, fn):
        raise ImportError(f"liger_kernel has no patch for model_type {model_type!r}")
    getattr(lk, fn)()  # the defaults a user gets: fused linear CE, RMSNorm, RoPE, SwiGLU kernels


def _hf_runner(spec: RunSpec, cfg: BenchConfig, device):
    """transformers' own model and loss (HF Trainer equivalent: fp32 weights, bf16 autocast on GPU,
    loss = sum / num_items_in_batch over the step, non-reentrant gradient checkpointing, fused AdamW)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_cfg = AutoConfig.from_pretrained(spec.hf_dir)
    if cfg.provider == "transformers+liger":
        _apply_liger(hf_cfg.model_type)
    attn = "sdpa"
    if device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            attn = "flash_attention_2"  # packed rows through position_ids need it to skip masked blocks
    model = AutoModelForCausalLM.from_pretrained(spec.hf_dir, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    model.to(device).train()
    if cfg.ac == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.ac != "off":
        raise ValueError(f"transformers has no {cfg.ac!r} activation checkpointing")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=device.type == "cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step(micro_batches):
        n_target = sum(mb["num_target_tokens"] for mb in micro_batches)
        n_items = torch.tensor(n_target, device=device)
        total = torch.zeros((), device=device)
        for mb in micro_batches:
            ids = mb["input_ids"].to(device, non_blocking=True)
            # HF shifts labels inside; ours are aligned: shift them right so HF's shift restores them.
            hf_labels = torch.full_like(mb["labels"], -100)
            hf_labels[:, 1:] = mb["labels"][:, :-1]
            kw = {}
            # packed: no attention mask, transformers derives the documents from position_ids
            if cfg.layout == "packed":
                kw["position_ids"] = mb["position_ids"].to(device, non_blocking=True)
            else:
                B, T = ids.shape
                lens = torch.tensor(mb["row_lengths"])
                kw["attention_mask"] = (torch.arange(T)[None, :] < lens[:, None]).long().to(device)
            with amp:
                out = model(
                    input_ids=ids,
                    labels=hf_labels.to(device),
                    num_items_in_batch=n_items,
                    use_cache=False,
                    **kw,
                )
            out.loss.backward()
            total += out.loss.detach().float()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total.item()  # one host sync per step, as the engine's step

    return step, {"attn_impl": attn, "params": sum(p.numel() for p in model.parameters())}


def _warm_runtime() -> None:
    """A toy training step: the CPU runtime's one-time allocations (thread pools, BLAS / oneDNN buffers,
    autograd engine; ~110 MiB here) land before the memory baseline instead of in every configuration."""
    import torch
    import torch.nn.functional as F

    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 512))
    q = torch.randn(1, 4, 256, 16, requires_grad=True)
    att = F.scaled_dot_product_attention(q, q, q, is_causal=True).sum()
    loss = F.cross_entropy(m(torch.randn(2048, 64)), torch.randint(0, 512, (2048,))) + att
    loss.backward()
    torch.optim.AdamW(m.parameters()).step()


def run_worker(spec: RunSpec) -> dict:
    """Build one configuration, run warmup + measured steps, return per-step numbers (one process)."""
    import torch

    from engine.models import resolve_args

    if spec.threads:
        torch.set_num_threads(spec.threads)
    cfg = BenchConfig(**spec.config)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    args = resolve_args(spec.flavour)
    data = make_steps(args.vocab_size, spec.max_length, spec.warmup + spec.steps, spec.seed, cfg.layout)
    # Import what the run needs before the memory baseline, so the delta is the run's own memory.
    if cfg.provider.startswith("transformers"):
        import transformers  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401
    else:
        from torch.distributed.algorithms._checkpoint import checkpoint_wrapper  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401

        import engine.train  # noqa: F401
    import torch.distributed as dist

    had_group = dist.is_initialized()
    if device.type == "cpu":
        _warm_runtime()
    gc.collect()
    out = {"status": "ok", "config": spec.config, "threads": torch.get_num_threads()}

    def run() -> None:
        if cfg.provider == "engine":
            step, info = _engine_runner(spec, cfg, device)
        elif spec.nproc > 1:
            raise ImportError("transformers baselines run in one process (multi-GPU needs accelerate/FSDP)")
        else:
            step, info = _hf_runner(spec, cfg, device)
        out.update(info)
        records = []
        for k, mbs in enumerate(data):
            synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            loss = step(mbs)
            synchronize(device)
            records.append(
                {"time": time.perf_counter() - t0, "cpu_time": time.process_time() - c0, "loss": loss,
                 "warmup": k < spec.warmup}
            )  # fmt: skip
            records[-1].update(step_stats(mbs))
        out["steps"] = records

    if device.type == "cuda":
        out["memory_method"] = "torch.cuda.max_memory_allocated over the whole run (benchmarks.common)"
    else:
        out["memory_method"] = (
            "CPU resident-set high-water mark (VmHWM) minus the RSS before the run, after a toy warm-up "
            "step, in a fresh process per configuration unless --in-process/--smoke (benchmarks.common.peak_memory_bytes)"
        )
    try:
        out["peak_memory_mib"] = peak_memory_bytes(run, device) / 2**20
    except ImportError as e:
        out.update(status="skipped", reason=str(e))
    except torch.OutOfMemoryError as e:
        out.update(status="oom", reason=str(e).splitlines()[0])
    except Exception as e:  # a failing configuration is a row in the report, not the end of the suite
        out.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if out["status"] != "ok" and device.type == "cuda":
        out["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    if dist.is_initialized() and not had_group:  # in-process runs leave no process group behind
        dist.destroy_process_group()
    return out


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
        "mfu_row": ("fraction", [step_flops(args, s["row_tokens"], s["sum_sq_row"]) / s["time"] / peak for s in steps]),
        "mfu_doc": ("fraction", [step_flops(args, s["tokens"], s["sum_sq_doc"]) / s["time"] / peak for s in steps]),
        "peak_memory": ("MiB", [result["peak_memory_mib"]]),
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


def run_suite(ns) -> int:
    import torch

    from engine.models import resolve_args

    cuda = torch.cuda.is_available()
    if ns.smoke:
        ns.in_process = True
        configs, flavour, T, warmup, steps, rounds = smoke_configs(), "debug-qwen2", 256, 1, 2, 1
    elif ns.quick:
        configs, flavour, T, warmup, steps, rounds = cpu_configs(), "debug-qwen2", 2048, 2, 10, 1
    else:
        if not cuda:
            print("error: the full mode needs a CUDA GPU; use --quick on CPU", file=sys.stderr)
            return 2
        configs, flavour, T, warmup, steps, rounds = gpu_configs(), "qwen2.5-0.5b", 28672, 3, 10, 1
    flavour = ns.flavour or flavour
    T, warmup, steps = ns.max_length or T, ns.warmup if ns.warmup is not None else warmup, ns.steps or steps
    rounds, nproc = ns.rounds or rounds, ns.nproc or 1
    # CPU: one thread per worker by default. On a machine shared with other jobs, a second OpenMP thread
    # waits at every barrier for a core someone else holds: a 256x64x128 matmul then stalls ~16 ms at p99
    # instead of ~0.2 ms, and step times swing 10x between identical runs.
    threads = ns.threads or (None if cuda else 1)
    if ns.only:
        configs = [c for c in configs if any(s in c.name for s in ns.only)]
    args = resolve_args(flavour)
    dev = torch.device("cuda" if cuda else "cpu")
    if threads:
        torch.set_num_threads(threads)  # before environment(): the CPU device name carries the thread count
    env = environment(dev)
    slug = device_slug(dev)
    results_dir = Path(ns.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    if cuda:
        from engine.metrics import peak_flops

        peak = peak_flops(torch.device("cuda"))
        peak_note = f"bf16 dense datasheet peak {peak / 1e12:.0f} TFLOP/s (engine.metrics.PEAK_BF16)"
        if peak is None:
            print("error: unknown GPU peak; add it to engine.metrics.PEAK_BF16", file=sys.stderr)
            return 2
    else:
        peak = cpu_gemm_peak(threads, reps=5 if ns.smoke else 20)
        peak_note = f"best fp32 1024^3 GEMM measured in this run: {peak / 1e9:.1f} GFLOP/s"
    probe = make_steps(args.vocab_size, T, warmup + steps, 0, "packed")
    fills = [step_stats(s)["tokens"] / T for s in probe]
    docs = [len(s[0]["doc_lengths"]) for s in probe]
    shape = f"{flavour} T={T} {'bf16' if cuda else 'fp32'} docs/step={np.mean(docs):.1f}" + (
        f" ranks={nproc}" if nproc > 1 else ""
    )
    print(f"{len(configs)} configs, {shape}, warmup {warmup}, steps {steps}; peak {peak_note}", flush=True)

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
                spec = RunSpec(asdict(c), flavour, T, warmup, steps, hf_dir=hf_dir, threads=threads, nproc=nproc)  # fmt: skip
                t0 = time.perf_counter()
                if nproc > 1 and c.provider != "engine":
                    res = {"status": "skipped", "config": spec.config,
                           "reason": "transformers baselines run in one process (multi-GPU needs accelerate/FSDP)"}  # fmt: skip
                else:
                    res = launch(spec, ns.timeout, isolate=not ns.in_process)
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
            p20, p50, p80 = pcts(values)
            rows.append(
                {"provider": c.provider, "mode": c.mode, "metric": metric, "unit": unit, "shape": shape,
                 "p20": f"{p20:.6g}", "p50": f"{p50:.6g}", "p80": f"{p80:.6g}"}
                | {k: env[k] for k in ("device", "versions", "git_sha", "date")}
            )  # fmt: skip
    rows.append(
        {"provider": "hardware", "mode": "peak", "metric": "peak_flops", "unit": "FLOP/s", "shape": peak_note,
         "p20": f"{peak:.6g}", "p50": f"{peak:.6g}", "p80": f"{peak:.6g}"}
        | {k: env[k] for k in ("device", "versions", "git_sha", "date")}
    )  # fmt: skip
    load_after = os.getloadavg()

    csv_path = results_dir / "train.csv"
    append_rows(csv_path, rows)
    stem = f"train_{slug}_{env['date'][:10]}" + ("_smoke" if ns.smoke else "")
    plot(table, results_dir / f"{stem}.png", f"bench_train {shape} | {env['device']} | {env['date']}")
    cmd = "python -m benchmarks.bench_train " + " ".join(ns.argv)
    report = render_report(table, env, cmd, shape, peak_note, (warmup, steps, rounds, threads), fills, docs, load_before, load_after, cuda)  # fmt: skip
    (results_dir / f"{stem}.md").write_text(report)
    print(f"appended {len(rows)} rows to {csv_path}; wrote {stem}.md and {stem}.png")
    return 0


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
        "| configuration | tokens/s p50 (p20–p80) | step time s | MFU row | MFU doc | peak memory MiB | "
        + ("" if cuda else "tokens/CPU-s p50 | ")
        + "loss step 1 | attention |",
        "|---|---|---|---|---|---|---|---|" + ("" if cuda else "---|"),
    ]
    for r in table:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {r['status']}: {r['reason'][:120]} |" + " |" * (6 if cuda else 7))
            continue
        p = r["p"]
        lines.append(
            f"| {r['name']} | {fmt_p(p['tokens_per_s'], '{:.0f}')} | {p['step_time'][1]:.4g} | "
            f"{p['mfu_row'][1]:.4f} | {p['mfu_doc'][1]:.4f} | {p['peak_memory'][1]:.1f} | "
            + ("" if cuda else f"{p['tokens_per_cpu_s'][1]:.0f} | ")
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
    goal = ok.get("engine packed loss=triton ac=full")
    if goal is not None and base is not None:
        ratio = goal["p"]["tokens_per_s"][1] / base["p"]["tokens_per_s"][1]
        lines += ["", "Goal (one H100, qwen2.5-0.5b, 28,672-token packs, full checkpointing): MFU >= 45% and "
                  f">= 1.5x transformers + plain loss: MFU doc {goal['p']['mfu_doc'][1]:.3f}, MFU row "
                  f"{goal['p']['mfu_row'][1]:.3f}, speed-up {ratio:.2f}x."]  # fmt: skip
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


# --------------------------------------------------------------------------------------------------- plan
GPUS = {  # usable GiB as PyTorch reports the total, dense bf16 peak FLOP/s
    "a100-80gb": (79.15, 312e12),
    "a100-40gb": (39.39, 312e12),
    "h100-80gb": (79.11, 989e12),
    "h200": (139.8, 989e12),
}


def write_plan(flavour: str, nproc: int, gpu: str, max_length: int, mfu: float, out: Path) -> str:
    """Memory plan (engine.memory.plan_memory) and the throughput projection at a target MFU."""
    import torch

    from benchmarks.bench_data import longwriter_lengths
    from engine.memory import plan_memory
    from engine.metrics import matmul_params
    from engine.models import resolve_args

    a = resolve_args(flavour)
    cap, peak = GPUS[gpu]
    margin = 1.0 + 0.05 * cap  # CUDA context + NCCL buffers (~1 GiB) and allocator fragmentation (~5%)

    def plan(world=nproc, ac=True, every=1, fused=True):
        return plan_memory(a, world_size=world, tokens_per_micro_batch=max_length, param_dtype=torch.bfloat16,
                           gradient_checkpointing=ac, checkpoint_every=every, fused_loss=fused).gib()  # fmt: skip

    variants = [
        (f"{nproc} GPUs, full AC, fused loss (the recipe)", plan()),
        (f"{nproc} GPUs, AC every 2nd block, fused loss", plan(every=2)),
        (f"{nproc} GPUs, no AC, fused loss", plan(ac=False)),
        (f"{nproc} GPUs, full AC, plain loss (logits materialised)", plan(fused=False)),
        ("2 GPUs, full AC, fused loss", plan(world=2)),
        ("8 GPUs, full AC, fused loss", plan(world=8)),
    ]
    keys = list(variants[0][1])
    N = matmul_params(a)
    d_q = a.num_heads * a.head_dim
    att = 6 * a.num_layers * d_q  # attention FLOPs per token per unit of document length (causal, fwd+bwd)
    lengths = longwriter_lengths(6000, 0, seed=0)  # LongWriter-like long replies (bench_data), <= 17,000
    mean_l, mean_l2 = float(lengths.mean()), float((lengths.astype(np.float64) ** 2).mean())
    cases = [
        ("LongWriter-like documents, packing off (the recipe) or packed with document masking",
         6 * N + att * mean_l2 / mean_l),
        (f"one {max_length:,}-token document per row (full-row attention, worst case)", 6 * N + att * max_length),
    ]  # fmt: skip
    L = [
        f"# {flavour} at {max_length:,} tokens on {nproc}x {gpu}: memory plan and projected throughput",
        "",
        f"Generated by `python -m benchmarks.bench_train --plan {flavour} --nproc {nproc} --gpu {gpu} "
        f"--max-length {max_length} --mfu {mfu}` (engine/memory.py plan_memory + engine/metrics.py FLOPs); "
        "nothing here was measured on a GPU.",
        "",
        f"Model: {a.num_params() / 1e9:.3f} B parameters, {N / 1e9:.3f} B in matmuls (all but the input "
        f"embedding), {a.num_layers} layers, d_q = {a.num_heads} x {a.head_dim} = {d_q}, vocab {a.vocab_size:,}. "
        f"FSDP2 over {nproc} ranks, bf16 compute, fp32 master weights / gradients / AdamW, one {max_length:,}-token "
        "micro-batch per rank.",
        "",
        "## Memory plan per GPU (GiB)",
        "",
        "| variant | " + " | ".join(keys) + " | fits? |",
        "|---|" + "---|" * (len(keys) + 1),
    ]
    for name, g in variants:
        fits = g["total"] + margin <= cap
        L.append(f"| {name} | " + " | ".join(f"{g[k]:.2f}" for k in keys) + f" | {'yes' if fits else 'NO'} |")
    rec = variants[0][1]
    L += [
        "",
        f"Capacity {cap} GiB ({gpu} as PyTorch reports it); margin {margin:.1f} GiB for the CUDA context, NCCL "
        "buffers and allocator fragmentation. The recipe needs "
        f"{rec['total']:.1f} + {margin:.1f} = {rec['total'] + margin:.1f} GiB: "
        + ("it fits" if rec["total"] + margin <= cap else "it does NOT fit")
        + f" with {cap - rec['total'] - margin:.1f} GiB to spare. The plan is an estimate: compare with "
        "`max_memory_gb` in metrics.jsonl of the first steps of a real run.",
        "",
        f"## Projected throughput at {mfu:.0%} MFU",
        "",
        f"FLOPs per token (forward + backward, no recompute) = 6 N + 6 n_layers d_q L_eff = 6 x {N / 1e9:.4f}e9 "
        f"+ {att:,} x L_eff, where L_eff = E[L^2] / E[L] for documents of length L (causal attention over each "
        f"document only). LongWriter-like lengths (benchmarks.bench_data: lognormal around 3,500 tokens, clipped "
        f"to 500..17,000): E[L] = {mean_l:,.0f}, E[L^2] / E[L] = {mean_l2 / mean_l:,.0f}.",
        "",
        "| case | FLOPs/token | tokens/s per GPU | tokens/s total | hours per 1B tokens |",
        "|---|---|---|---|---|",
    ]
    for name, fpt in cases:
        tps = mfu * peak / fpt
        L.append(
            f"| {name} | {fpt / 1e9:.2f} GFLOP | {tps:,.0f} | {tps * nproc:,.0f} | {1e9 / (tps * nproc) / 3600:.1f} |"
        )
    fpt = cases[0][1]
    tps = mfu * peak / fpt
    hfu = (8 * N + att * 4 / 3 * mean_l2 / mean_l) / fpt
    step_tokens = nproc * 64 * mean_l
    L += [
        "",
        f"Arithmetic (first row): tokens/s per GPU = MFU x peak / FLOPs per token = {mfu} x {peak / 1e12:.0f}e12 / "
        f"{fpt / 1e9:.3f}e9 = {tps:,.0f}; x {nproc} GPUs = {tps * nproc:,.0f} tokens/s.",
        f"With the recipe's global batch ({nproc} ranks x 64 accumulation x 1 sequence of E[L] = {mean_l:,.0f} "
        f"tokens = {step_tokens:,.0f} tokens) an optimizer step takes {step_tokens / (tps * nproc):.1f} s.",
        f"Full activation checkpointing recomputes each block's forward: the GPU executes {hfu:.3f}x the model "
        f"FLOPs, so {mfu:.0%} MFU means {mfu * hfu:.0%} hardware FLOPs utilisation: every GEMM, the attention "
        "and all the memory-bound ops together at that fraction of the datasheet peak on average. Treat it as "
        "a target to check with this benchmark's GPU mode, not an expectation; at 40% MFU the same arithmetic "
        f"gives {0.40 * peak / fpt:,.0f} tokens/s per GPU ({1e9 / (0.40 * peak / fpt * nproc) / 3600:.1f} h "
        "per 1B tokens).",
        f"Memory is planned at a full {max_length:,}-token micro-batch (the longest allowed document with "
        "packing off, every micro-batch with packing on): the worst case of the run.",
    ]
    text = "\n".join(L) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


# ----------------------------------------------------------------------------------------------------- cli
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU quick mode: debug-qwen2, 2,048-token packs")
    ap.add_argument("--smoke", action="store_true", help="2 tiny configs, few steps (test suite)")
    ap.add_argument("--flavour", help="engine.models flavour (default: debug-qwen2 quick, qwen2.5-0.5b GPU)")
    ap.add_argument("--max-length", type=int, help="tokens per packed row")
    ap.add_argument("--warmup", type=int, help="steps discarded")
    ap.add_argument("--steps", type=int, help="steps measured")
    ap.add_argument("--rounds", type=int, help="interleaved repeats of the whole set (default 1)")
    ap.add_argument("--only", nargs="*", help="run configurations whose name contains one of these")
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

"""bench_train's worker: build one configuration, run its warm-up + measured steps, return per-step numbers.

Runs in a fresh process per configuration (`python -m benchmarks.bench_train --worker ...`), or in-process
for the smoke test."""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import time
from unittest import mock

from benchmarks.common import peak_memory_bytes, synchronize
from benchmarks.train_baselines import hf_runner
from benchmarks.train_workload import BenchConfig, RunSpec, make_steps, step_stats


def _engine_runner(spec: RunSpec, cfg: BenchConfig, device):
    """The trainer's own model path (meta build -> AC -> FSDP2 -> init) and its step function."""
    import torch

    from engine.config import Config
    from engine.models import default_loss_fn
    from engine.models.attention import resolve_attn_impl
    from engine.objectives import SFTObjective
    from engine.parallel import init_distributed
    from engine.step import optimizer_step
    from engine.train import build_optimizer_and_schedule, build_sharded_model

    info = init_distributed()
    c = Config()
    c.model.model = spec.flavour
    c.model.torch_dtype = "bfloat16" if device.type == "cuda" else "float32"
    c.model.loss_impl = {"triton": "triton", "twin": "torch"}.get(cfg.loss, "auto")
    c.train.seed = spec.seed
    c.train.gradient_checkpointing = {"off": False, "selective": "selective"}.get(cfg.ac, True)
    c.train.gradient_checkpointing_every = 2 if cfg.ac == "every2" else 1
    c.train.compile = cfg.compile
    with contextlib.ExitStack() as stack:
        if cfg.compile and spec.compile_backend != "inductor":  # --smoke: no C++ build
            import engine.parallel
            import engine.train

            compile_fn = functools.partial(engine.parallel.apply_compile, backend=spec.compile_backend)
            stack.enter_context(mock.patch.object(engine.train, "apply_compile", compile_fn))
        model = build_sharded_model(c, info)
    if cfg.loss == "plain":
        model.loss_fn = default_loss_fn
    c.optim.lr_scheduler_type, c.optim.warmup_ratio = "constant", 0.0
    opt, sched = build_optimizer_and_schedule(model, c, spec.warmup + spec.steps)

    def step(micro_batches):  # the trainer's own step: long-ce forward/backward, clip, AdamW, LR
        return optimizer_step(
            model,
            opt,
            sched,
            micro_batches,
            SFTObjective(c.train.loss_name),
            max_grad_norm=c.optim.max_grad_norm,
            device=device,
        )["loss"]

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return step, {
        "attn_impl": resolve_attn_impl(model.attn_impl, device, dtype),
        "params": model.args.num_params(),
    }


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
            step, info = hf_runner(spec, cfg, device)
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
    if device.type == "cuda":  # what the caching allocator held at its peak (allocated + cached blocks)
        out["peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    if cfg.compile:
        torch._dynamo.reset()  # in-process runs: the next configuration starts uncompiled
    if dist.is_initialized() and not had_group:  # in-process runs leave no process group behind
        dist.destroy_process_group()
    return out

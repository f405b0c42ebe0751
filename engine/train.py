"""The training loop (SFT, or DPO with --rlhf_type dpo). One process, or any number of torchrun ranks on one or
many nodes (NCCL on GPU, gloo on CPU):

    python -m engine.train --config examples/longwriter_qwen2_7b.yaml [--key value ...]
    torchrun --nproc_per_node 4 -m engine.train --config examples/longwriter_qwen2_7b.yaml
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:PORT \
        -m engine.train ...                       (output_dir on a filesystem every node sees)
    ... --resume_from_checkpoint latest          (after a crash or SIGTERM: continues exactly)
    ... --resume_from_checkpoint RUN_DIR --resume_only_model --learning_rate 2e-6   (annealing stage)
    python -m engine.train --rlhf_type dpo --model outputs/sft/final --dataset pairs.jsonl ...   (DPO stage)
    python -m engine.train --help                (every key, its type and default)

One optimizer step = gradient_accumulation_steps micro-batches per rank. Long-ce: the step's target tokens
are counted and all-reduced before any forward, every micro-batch back-propagates sum(token losses) / count,
and FSDP sums (not averages) gradients, so each target token of the global batch weighs the same however the
batch is split into micro-batches and ranks. The objective (engine.objectives: SFT or DPO) owns the per-step
arithmetic; this loop owns steps, checkpoints, metrics and resume for both.
"""

from __future__ import annotations

import functools
import gc
import math
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from engine.checkpoint import (
    checkpoint_info,
    directory_bytes,
    export_hf,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
    sigterm_advice,
)
from engine.config import Config, parse_config, step_range, usage
from engine.memory import plan_memory
from engine.metrics import MetricsLogger, memory_record, peak_flops, row_counts, throughput
from engine.models.attn_backends import select_attn_impl
from engine.objectives import DPOObjective, SFTObjective
from engine.optim import build_optimizer, build_scheduler
from engine.parallel import (
    DistInfo,
    apply_activation_checkpointing,
    apply_compile,
    apply_fsdp,
    apply_neftune,
    init_distributed,
    load_full_tensors_,
    random_init_tensors,
    reshard,
    shutdown_distributed,
)
from engine.profiling import StepProfiler
from engine.step import all_reduce_floats, evaluate, optimizer_step

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def build_sharded_model(cfg: Config, info: DistInfo, *, source: str | None = None, frozen: bool = False):
    """Meta-device build -> NEFTune hooks -> activation checkpointing -> compile -> FSDP2 -> materialise the
    shards (pretrained tensors streamed from the HF directory, or a seeded random init for a flavour name).

    frozen (the DPO reference, from `source`): no NEFTune, no checkpointing (it runs under no_grad), no
    compile, no gradients; shards stored in the compute dtype, which FSDP would gather anyway (the same
    values as the policy's fp32 master weights cast at each all-gather, at half the memory for bf16)."""
    from torch.distributed.device_mesh import init_device_mesh

    import kernels
    from engine.models import build_model, iter_checkpoint, load_pretrained

    src, t = source or cfg.model.model, cfg.train
    dtype = DTYPES[cfg.model.torch_dtype] if frozen else torch.float32
    pretrained = Path(src).is_dir()
    # the kernel train() probed at start-up (cached): the model holds a concrete impl, never "auto"
    attn = select_attn_impl(cfg.model.attn_impl, info.device, DTYPES[cfg.model.torch_dtype]).name
    if pretrained:
        model = load_pretrained(src, dtype=dtype, device="meta", attn_impl=attn)
    else:
        model = build_model(src, dtype=dtype, device="meta", attn_impl=attn)
    # Labels are token ids of a tokenizer whose vocabulary run() checks against the model's once, so the
    # kernel's per-call range check (a host sync per micro-batch on CUDA) is skipped. DPO and the "sequence"
    # loss need per-token losses (summed per response / per document by engine.objectives).
    reduction = "none" if cfg.rlhf.rlhf_type or t.loss_name == "sequence" else "sum"
    model.loss_fn = functools.partial(
        kernels.linear_cross_entropy, reduction=reduction, impl=cfg.model.loss_impl, check_labels=False,
        label_smoothing=t.label_smoothing_factor, z_loss=t.z_loss, recompute=cfg.model.loss_recompute,
    )  # fmt: skip
    if frozen:
        model.requires_grad_(False)
    else:
        apply_neftune(model, t.neftune_noise_alpha)
        if t.gradient_checkpointing:
            apply_activation_checkpointing(
                model, every=t.gradient_checkpointing_every, selective=t.gradient_checkpointing == "selective",
                min_tokens=t.gradient_checkpointing_min_tokens,
            )  # fmt: skip
        if t.compile:
            apply_compile(model)
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    apply_fsdp(model, mesh, param_dtype=DTYPES[cfg.model.torch_dtype])
    model.to_empty(device=info.device)
    if pretrained:
        load_full_tensors_(model, iter_checkpoint(src))
    else:
        load_full_tensors_(
            model, random_init_tensors(model, cfg.train.seed, std=model.args.initializer_range)
        )
    if frozen:  # it never runs a backward, after which FSDP would free the gathered root and last block
        model.register_forward_hook(lambda module, args, output: reshard(module))
        model.eval()
    return model


def build_objective(cfg: Config, info: DistInfo, model, loaders: list) -> tuple[object, list[str]]:
    """SFTObjective, or DPOObjective with a resident frozen reference, or with reference log-probs precomputed
    into the loaders' datasets (then no reference stays in memory). Runs before any checkpoint is loaded:
    the default reference is the starting model. Returns the objective and lines for the run log."""
    r = cfg.rlhf
    if r.rlhf_type is None:
        return SFTObjective(cfg.train.loss_name), []
    kw = dict(beta=r.beta, loss_type=r.loss_type, label_smoothing=r.label_smoothing, rpo_alpha=r.rpo_alpha)
    src = r.ref_model or cfg.model.model
    if not r.precompute_ref_log_probs:
        ref = build_sharded_model(cfg, info, source=src, frozen=True)
        return DPOObjective(**kw, ref_model=ref), [f"DPO reference {src}: resident (frozen, sharded)"]
    from engine.reference import attach_reference_log_probs, source_fingerprint

    ref = model if r.ref_model is None else build_sharded_model(cfg, info, source=src, frozen=True)
    m = cfg.model
    key = f"{source_fingerprint(src, cfg.train.seed)}|{m.torch_dtype}|{m.attn_impl}|{m.loss_impl}"
    cache = cfg.data.dataset_cache_dir or str(Path(cfg.checkpoint.output_dir) / "cache")
    notes = [f"DPO reference {src}: precomputed"]
    for loader in filter(None, loaders):
        notes.append(
            attach_reference_log_probs(ref, loader, info.device, cache_dir=cache, key=key, rank=info.rank)
        )
    del ref
    gc.collect()  # a separate reference goes before training (FSDP modules sit in reference cycles)
    return DPOObjective(**kw), notes


def build_optimizer_and_schedule(model, cfg: Config, total_steps: int):
    """AdamW over the (sharded) parameters and its LR schedule, from cfg.optim."""
    o = cfg.optim
    optimizer = build_optimizer(
        model, lr=o.learning_rate, weight_decay=o.weight_decay, betas=(o.adam_beta1, o.adam_beta2),
        eps=o.adam_epsilon,
    )  # fmt: skip
    scheduler = build_scheduler(
        optimizer, kind=o.lr_scheduler_type, warmup_ratio=o.warmup_ratio, total_steps=total_steps
    )
    return optimizer, scheduler


def build_data(cfg: Config, info: DistInfo, tokenizer):
    from engine.data import PAIR_FORMAT, SFT_FORMAT, StepLoader, build_dataset, split_dataset

    d, t = cfg.data, cfg.train
    kw = dict(
        row_format=PAIR_FORMAT if cfg.rlhf.rlhf_type else SFT_FORMAT,
        max_length=d.max_length,
        seed=t.seed,
        truncation_strategy=d.truncation_strategy,
        check_dataset_strategy=d.check_dataset_strategy,
        lazy_tokenize=d.lazy_tokenize,
        cache_dir=d.dataset_cache_dir or str(Path(cfg.checkpoint.output_dir) / "cache"),
    )

    def build_all():
        train_ds = build_dataset(d.dataset, tokenizer, **kw)
        return train_ds, (build_dataset(d.val_dataset, tokenizer, **kw) if d.val_dataset else None)

    if d.lazy_tokenize and info.world_size > 1:  # rank 0 measures and caches; the others read its cache
        if info.rank == 0:
            train_ds, val_ds = build_all()
        dist.barrier()
        if info.rank != 0:
            train_ds, val_ds = build_all()
    else:
        train_ds, val_ds = build_all()
    if d.split_dataset_ratio > 0 and val_ds is None:
        train_ds, val_ds = split_dataset(train_ds, d.split_dataset_ratio, t.seed)

    def loader(ds, accum):
        return StepLoader(
            ds, max_length=d.max_length, batch_size=t.batch_size, gradient_accumulation_steps=accum,
            rank=info.rank, world_size=info.world_size, seed=t.seed, packing=d.packing,
            num_workers=d.dataloader_num_workers,
        )  # fmt: skip

    train_loader = loader(train_ds, t.gradient_accumulation_steps)
    # The loader completes a last partial step with filler rows; a run whose first step would be partial
    # is almost surely a mistake (wrong dataset or batch), so it is an error.
    rows = train_loader.global_batch
    have = len(train_loader.global_documents(0, 0))
    if have < rows:
        raise ValueError(
            f"dataset too small for one optimizer step: {len(train_ds)} samples give {have} rows "
            f"(packing={d.packing}, max_length {d.max_length}), fewer than one global batch of {rows} rows "
            f"(world_size {info.world_size} x gradient_accumulation_steps x batch_size)"
        )
    val_loader = loader(val_ds, 1) if val_ds is not None and len(val_ds) else None
    return train_loader, val_loader


class _Stop:
    """SIGTERM sets a flag; ranks agree on it (all-reduce MAX) between micro-batches."""

    def __init__(self):
        self.flag = False
        self.old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.flag = True

    def __call__(self) -> bool:
        return bool(all_reduce_floats([float(self.flag)], torch.device("cpu"), dist.ReduceOp.MAX)[0])

    def restore(self):
        signal.signal(signal.SIGTERM, self.old)


def train(cfg: Config, *, on_step=None) -> dict:
    """Run one training job; returns a summary. on_step(step, record) is called on every rank (tests)."""
    out = Path(cfg.checkpoint.output_dir)
    info = init_distributed(timeout_s=cfg.train.ddp_timeout, trace_dir=str(out / "comm_traces"))
    rank, device, t, c = info.rank, info.device, cfg.train, cfg.checkpoint
    random.seed(t.seed + rank)
    np.random.seed(t.seed + rank)
    torch.manual_seed(t.seed + rank)  # per-rank stream (NEFTune noise); model init has its own generators
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    # an explicit --attn_impl that cannot run here fails now, before any data or weights are loaded
    attn = select_attn_impl(cfg.model.attn_impl, device, DTYPES[cfg.model.torch_dtype])
    resume = resolve_resume(out, c.resume_from_checkpoint)
    if (resume is None or c.resume_only_model) and list_checkpoints(out):
        raise ValueError(
            f"output_dir {out} already holds {list_checkpoints(out)[-1][1].name}: continue it with "
            "--resume_from_checkpoint latest, or train into another output_dir"
        )

    from engine.data import load_tokenizer

    try:
        tokenizer = load_tokenizer(
            cfg.model.tokenizer or cfg.model.model, template=cfg.model.template, system=cfg.model.system
        )
    except ValueError as e:  # e.g. a non-debug flavour name: random weights, but whose tokenizer?
        key = "tokenizer" if cfg.model.tokenizer else "model"
        raise ValueError(f"--{key}: {e}; give --tokenizer DIR|FILE for a flavour without one") from None
    train_loader, val_loader = build_data(cfg, info, tokenizer)
    steps_per_epoch = len(train_loader)
    total = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * steps_per_epoch)

    model = build_sharded_model(cfg, info)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise ValueError(
            f"the tokenizer of {cfg.model.tokenizer or cfg.model.model} has {tokenizer.vocab_size} ids but the "
            f"model's vocabulary has {model.args.vocab_size} rows: token ids would fall outside the embedding"
        )
    objective, objective_notes = build_objective(cfg, info, model, [train_loader, val_loader])
    optimizer, scheduler = build_optimizer_and_schedule(model, cfg, total)

    step, resumed_note = 0, None
    if resume is not None:
        state = load_checkpoint(resume, model=model, optimizer=optimizer, only_model=c.resume_only_model)
        if state is not None and not checkpoint_info(resume).get("has_optimizer", True):
            resumed_note = (
                f"{resume.name} holds no optimizer state (--save_on_sigterm model / --save_only_model): weights, "
                "step, LR schedule, data position and RNG continue; AdamW's moments restart from zero"
            )
        if state is not None:  # exact resume: schedule, data position, RNG
            step = state["step"]
            scheduler.load_state_dict(state["scheduler"])
            train_loader.load_state_dict(state["loader"])
            set_rng_state(state["rng"], device)

    log = MetricsLogger(
        out, enabled=rank == 0, total_steps=total, start_step=step, report_to=cfg.log.report_to,
        progress_bar=cfg.log.progress_bar,
    )  # fmt: skip
    tokens_per_mb = t.batch_size * cfg.data.max_length
    plan = plan_memory(
        model.args, world_size=info.world_size, tokens_per_micro_batch=tokens_per_mb,
        param_dtype=DTYPES[cfg.model.torch_dtype], gradient_checkpointing=bool(t.gradient_checkpointing),
        checkpoint_every=t.gradient_checkpointing_every, fused_loss=cfg.model.loss_impl != "torch",
        reference=None if cfg.rlhf.rlhf_type is None else "precomputed" if cfg.rlhf.precompute_ref_log_probs
        else "resident",
        loss_recompute=cfg.model.loss_recompute,
    )  # fmt: skip
    log.write(
        f"{cfg.model.model}: {model.args.num_params() / 1e6:.1f}M params, world {info.world_size}, "
        f"{steps_per_epoch} steps/epoch, {total} steps" + (f", resumed from {resume}" if resume else "")
    )
    log.write(plan.format())
    log.write(f"chat template: {tokenizer.chat_template.origin}")
    for note in objective_notes:
        log.write(note)
    if resumed_note:
        log.write(resumed_note)
    for line in [attn.describe(), *attn.warnings()]:
        log.write(line)
    log.write(
        f"train data: {train_loader.dataset.summary()}, packing efficiency {train_loader.packing_efficiency():.4f}"
    )
    if info.world_size > 1:  # what dealing micro-batches by cost leaves (engine.data.loader.cost_spread)
        spread = train_loader.cost_spreads(train_loader.epoch)
        log.write(
            f"rank cost spread (slowest rank over the mean): mean {spread.mean():.2%}, max {spread.max():.2%}"
        )
    if val_loader is not None:
        log.write(f"val data: {val_loader.dataset.summary()}")

    def snapshot() -> dict:  # this rank's state at a step boundary
        return {
            "step": step, "scheduler": scheduler.state_dict(),
            "loader": train_loader.state_dict(), "rng": rng_state(device),
        }  # fmt: skip

    saves = []  # seconds of each save, for the SIGTERM advice after the first

    def save(reason: str, *, with_optimizer: bool = not c.save_only_model) -> Path:
        t_save = time.perf_counter()
        path = save_checkpoint(
            out / f"checkpoint-{step}", model=model, optimizer=optimizer if with_optimizer else None,
            rank_state=boundary, info={"step": step, "epoch": step / steps_per_epoch, "reason": reason, "config": cfg.to_dict()},
            save_total_limit=c.save_total_limit,
        )  # fmt: skip
        saves.append(time.perf_counter() - t_save)
        log.write(f"saved {path} ({reason}, {saves[-1]:.1f} s)")
        if len(saves) == 1 and rank == 0:  # how long a SIGTERM save takes, and what the launcher must allow
            log.write(
                sigterm_advice(
                    seconds=saves[0], nbytes=directory_bytes(path), name=path.name, choice=c.save_on_sigterm,
                    model_bytes=4 * sum(p.numel() for p in model.parameters()),  # fp32 master weights
                    micro_batch_s=last_step_s / t.gradient_accumulation_steps,
                )
            )  # fmt: skip
        return path

    def log_eval() -> None:
        epoch = round(step / steps_per_epoch, 4)
        metrics = evaluate(model, val_loader, objective, device)
        log.log({"step": step, "epoch": epoch, **{f"eval_{k}": v for k, v in metrics.items()}})

    stop = _Stop()
    prof = StepProfiler(step_range(cfg.log.profile_steps), out, rank, device)
    peak = peak_flops(device)
    bad_in_row, skipped, losses, last_saved, stopped, last_step_s = 0, 0, [], None, False, 0.0
    boundary = snapshot()
    t_start = time.perf_counter()
    try:
        while step < total and not stopped:
            # the loader owns the position: after an epoch's last step (or a resume) it reads the next epoch
            epoch = train_loader.epoch
            train_loader.set_epoch(epoch)
            t0 = time.perf_counter()
            for micro_batches in train_loader:
                lr = scheduler.get_last_lr()[0]
                prof.begin(step + 1)
                res = optimizer_step(
                    model, optimizer, scheduler, micro_batches, objective,
                    max_grad_norm=cfg.optim.max_grad_norm, device=device, stop=stop,
                )  # fmt: skip
                if res is None:
                    stopped = True
                    break
                step += 1
                dt = last_step_s = time.perf_counter() - t0
                if prof.end(step) is not None:  # after dt: writing the trace is not the step's time
                    log.write(f"profile of steps {cfg.log.profile_steps} written to {prof.dir}")
                finite, grad_norm = res["finite"], res["grad_norm"]
                bad_in_row = 0 if finite else bad_in_row + 1
                skipped += not finite
                rows = all_reduce_floats(row_counts(micro_batches), torch.device("cpu"))  # gloo: no GPU sync
                record = {
                    "step": step, "epoch": round(step / steps_per_epoch, 4), **res["metrics"], "lr": lr,
                    "grad_norm": grad_norm, "tokens": res["tokens"],
                    **throughput(model.args, res, rows, dt, info.world_size, peak), "step_time_s": dt,
                    **memory_record(device), "rank_cost_spread": round(train_loader.last_cost_spread, 5),
                }  # fmt: skip
                if not finite:
                    record["skipped"] = True
                losses.append(res["loss"])
                log.log(record)
                if not finite:
                    log.write(f"step {step}: non-finite loss/grad norm ({res['loss']}, {grad_norm}); skipped")
                    if bad_in_row >= t.max_nonfinite_steps:
                        raise RuntimeError(
                            f"{bad_in_row} non-finite steps in a row (last: step {step}); aborting"
                        )
                if not cfg.log.progress_bar and step % cfg.log.logging_steps == 0:
                    log.write(
                        f"step {step}/{total} loss {res['loss']:.4f} lr {lr:.3e} grad_norm {grad_norm:.3f} "
                        f"tokens/s/GPU {record['tokens_per_s_per_gpu']:.0f}"
                    )
                if on_step is not None:
                    on_step(step, record)
                boundary = snapshot()
                if val_loader is not None and cfg.log.eval_steps and step % cfg.log.eval_steps == 0:
                    log_eval()
                if c.save_steps and step % c.save_steps == 0:
                    last_saved = save("periodic")
                if step >= total:
                    break
                t0 = time.perf_counter()  # a step's time includes loading its batch, not evals or saves
        if stopped and c.save_on_sigterm == "none":
            log.write(f"stopped by SIGTERM after step {step}; not saved (--save_on_sigterm none)")
        elif stopped and last_saved is not None and last_saved.name == f"checkpoint-{step}":
            log.write(
                f"stopped by SIGTERM after step {step}, saved just before; resume with --resume_from_checkpoint latest"
            )
        elif stopped:
            save("SIGTERM", with_optimizer=c.save_on_sigterm == "full" and not c.save_only_model)
            log.write(f"stopped by SIGTERM after step {step}; resume with --resume_from_checkpoint latest")
        else:
            if last_saved is None or last_saved.name != f"checkpoint-{step}":
                save("end")
            if val_loader is not None and cfg.log.eval_steps and step % cfg.log.eval_steps:
                log_eval()
            if c.save_final:
                export_hf(model, out / "final", tokenizer=tokenizer, dtype=DTYPES[c.final_dtype])
                log.write(f"exported {out / 'final'}")
    finally:
        if prof.close() is not None:
            log.write(f"profile of steps {cfg.log.profile_steps} (stopped inside) in {prof.dir}")
        stop.restore()
        log.close()
    return {
        "steps": step, "losses": losses, "skipped": skipped, "stopped": stopped, "model": model,
        "wall_s": time.perf_counter() - t_start,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(usage())
        return 0
    try:
        cfg = parse_config(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stopped = train(cfg)["stopped"]
    shutdown_distributed()
    return 143 if stopped else 0


if __name__ == "__main__":
    sys.exit(main())

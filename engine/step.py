"""One optimizer step of the training loop, and evaluation, for any objective (engine.objectives).

The objective's normalising counts (target tokens for long-ce, pairs for DPO) are counted and all-reduced before
any forward, every micro-batch back-propagates its loss already divided by them, and FSDP sums (not averages)
gradients (engine.parallel.apply_fsdp), so each token (or pair) of the global batch weighs the same however the
batch is split into micro-batches and ranks. Takes only the values it needs: engine/train.py holds the config.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist

from engine.optim import clip_grad_norm_


def all_reduce_floats(values: list[float], device, op=dist.ReduceOp.SUM) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def to_device(mb: dict, device) -> dict:
    """The micro-batch's tensors on the device (pinned first on CUDA, so the copies are truly asynchronous);
    max_seqlen stays a host int. Nothing of it ever comes back to the host during the step."""

    def move(t: torch.Tensor) -> torch.Tensor:
        if torch.device(device).type == "cuda":
            t = t.pin_memory()
        return t.to(device, non_blocking=True)

    return {
        "input_ids": move(mb["input_ids"]),
        "position_ids": move(mb["position_ids"]),
        "cu_seqlens": move(mb["cu_seqlens"]),
        "max_seqlen": mb["max_seqlen"],
        "labels": move(mb["labels"]),
        "num_target_tokens": mb[
            "num_target_tokens"
        ],  # host int: the fused loss skips ignored rows without a sync
    }


def model_loss(model, batch: dict) -> torch.Tensor:
    """model(...) with labels: whatever model.loss_fn returns (a sum for SFT, per-token losses for DPO). The
    loader's target count goes to the loss as num_valid (kernels.linear_cross_entropy compacts the ignored
    rows away with it, where it would otherwise compute them as zeros or read the count back)."""
    return model(
        batch["input_ids"],
        batch["position_ids"],
        batch["cu_seqlens"],
        batch["max_seqlen"],
        labels=batch["labels"],
        loss_kwargs={"num_valid": batch["num_target_tokens"]},
    )


def forward_backward(model, micro_batches: list[dict], objective, *, device, stop=None) -> dict | None:
    """Forward + backward of one optimizer step's micro-batches on this rank. Returns the loss, the objective's
    metrics (all ranks) and token counts, or None when `stop()` turns true between micro-batches (SIGTERM: the step
    is abandoned)."""
    local = [
        *objective.counts(micro_batches),
        sum(sum(mb["doc_lengths"]) for mb in micro_batches),
        sum(sum(n * n for n in mb["doc_lengths"]) for mb in micro_batches),
    ]
    *counts, n_tokens, sum_sq = all_reduce_floats(local, device)
    stats = torch.zeros(objective.n_stats, dtype=torch.float64, device=device)
    for mb in micro_batches:
        if stop is not None and stop():
            return None
        loss, mb_stats = objective.loss(model, to_device(mb, device), mb, counts)
        stats += mb_stats
        loss.backward()
    dist.all_reduce(stats)
    metrics = objective.summary(stats.tolist(), counts)
    return {"loss": metrics["loss"], "metrics": metrics, "tokens": int(n_tokens), "sum_sq": int(sum_sq)}


def optimizer_step(
    model, optimizer, scheduler, micro_batches, objective, *, max_grad_norm: float, device, stop=None
) -> dict | None:
    """One optimizer step: forward/backward of the micro-batches, clip by the global norm, AdamW, LR.

    A non-finite loss or gradient norm (the same on every rank: both are all-reduced) skips the AdamW update
    but still advances the schedule and the data. None when SIGTERM abandoned the step.
    """
    res = forward_backward(model, micro_batches, objective, device=device, stop=stop)
    if res is None:
        return None
    grad_norm = clip_grad_norm_(model.parameters(), max_grad_norm).item()
    finite = math.isfinite(res["loss"]) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # a skipped first step makes torch warn about the call order
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
    return dict(res, grad_norm=grad_norm, finite=finite)


@torch.no_grad()
def evaluate(model, loader, objective, device) -> dict:
    """The objective's metrics over the whole validation set (all ranks), e.g. the token-mean loss for SFT."""
    model.eval()
    stats = torch.zeros(objective.n_stats, dtype=torch.float64, device=device)
    counts = None
    for micro_batches in loader:
        step_counts = objective.counts(micro_batches)
        counts = step_counts if counts is None else [a + b for a, b in zip(counts, step_counts)]
        for mb in micro_batches:
            stats += objective.loss(model, to_device(mb, device), mb, step_counts)[1]
    model.train()
    dist.all_reduce(stats)
    counts = all_reduce_floats(counts, device)
    return objective.summary(stats.tolist(), counts, training=False)

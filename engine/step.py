"""One optimizer step of the SFT loop, and evaluation: the per-step arithmetic of long-ce.

Long-ce: the step's target tokens are counted and all-reduced before any forward, every micro-batch
back-propagates sum(token losses) / count, and FSDP sums (not averages) gradients (engine.parallel.apply_fsdp),
so each target token of the global batch weighs the same however the batch is split into micro-batches and
ranks. Takes only the values it needs: engine/train.py holds the config.
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
    }


def forward_backward(model, micro_batches: list[dict], *, loss_name: str, device, stop=None) -> dict:
    """Forward + backward of one optimizer step's micro-batches on this rank. Returns the global loss and
    token counts, or None when `stop()` turns true between micro-batches (SIGTERM: the step is abandoned)."""
    local = [
        sum(mb["num_target_tokens"] for mb in micro_batches),
        sum(sum(mb["doc_lengths"]) for mb in micro_batches),
        sum(sum(n * n for n in mb["doc_lengths"]) for mb in micro_batches),
        sum(mb["num_target_tokens"] > 0 for mb in micro_batches),  # filler micro-batches have none
    ]
    n_target, n_tokens, sum_sq, n_nonempty = all_reduce_floats(local, device)
    denom = max(n_target, 1.0)
    n_mean = max(n_nonempty, 1.0)  # "mean" averages over the micro-batches that have targets
    acc = torch.zeros((), dtype=torch.float64, device=device)
    for mb in micro_batches:
        if stop is not None and stop():
            return None
        b = to_device(mb, device)
        loss_sum = model(
            b["input_ids"], b["position_ids"], b["cu_seqlens"], b["max_seqlen"], labels=b["labels"]
        )
        if loss_name == "long-ce":
            loss = loss_sum / denom  # every target token of the global step weighs 1 / n_target
            acc += loss_sum.detach()
        else:  # "mean": each micro-batch's own token mean, then the mean over micro-batches and ranks
            loss = loss_sum / max(mb["num_target_tokens"], 1) / n_mean
            acc += loss.detach() * n_mean
        loss.backward()
    dist.all_reduce(acc)
    loss = acc.item() / (denom if loss_name == "long-ce" else n_mean)
    return {"loss": loss, "num_tokens": int(n_target), "tokens": int(n_tokens), "sum_sq": int(sum_sq)}


def optimizer_step(
    model, optimizer, scheduler, micro_batches, *, loss_name: str, max_grad_norm: float, device, stop=None
) -> dict | None:
    """One optimizer step: forward/backward of the micro-batches, clip by the global norm, AdamW, LR.

    A non-finite loss or gradient norm (the same on every rank: both are all-reduced) skips the AdamW update
    but still advances the schedule and the data. None when SIGTERM abandoned the step.
    """
    res = forward_backward(model, micro_batches, loss_name=loss_name, device=device, stop=stop)
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
def evaluate(model, loader, device) -> float:
    """Token-mean loss over the whole validation set (all ranks)."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for micro_batches in loader:
        for mb in micro_batches:
            b = to_device(mb, device)
            total += model(
                b["input_ids"], b["position_ids"], b["cu_seqlens"], b["max_seqlen"], labels=b["labels"]
            )
            count += mb["num_target_tokens"]
    model.train()
    total_sum, count = all_reduce_floats([total.item(), count], device)
    return total_sum / max(count, 1.0)

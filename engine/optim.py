"""AdamW with HF-Trainer parameter groups, a warmup + decay LR schedule, and DTensor-aware gradient clipping."""

from __future__ import annotations

import math

import torch
from torch import nn


def is_norm(module: nn.Module) -> bool:
    # RMSNorm / LayerNorm of any implementation: HF Trainer excludes ALL_LAYERNORM_LAYERS by type, we match
    # by class name so model code needs no registration.
    return isinstance(module, nn.LayerNorm | nn.RMSNorm) or "norm" in type(module).__name__.lower()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """HF Trainer's rule: decay every parameter except biases and norm weights (embeddings are decayed)."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue  # tied weights: counted once, where first met
            seen.add(id(p))
            (no_decay if is_norm(module) or p_name == "bias" or p_name.endswith("bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    # fused on CUDA (one kernel per param group); foreach elsewhere. Both handle DTensor shards: the update is
    # elementwise, so each rank updates its own shard with fp32 state of the same shape.
    on_cuda = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=on_cuda or None
    )


def lr_lambda(step: int, *, kind: str, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based), as in transformers' schedules.

    Linear warmup from 0 over `warmup_steps`, then cosine to 0 / linear to 0 / constant at the peak.
    """
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    if kind == "constant":
        return 1.0
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    raise ValueError(f"unknown lr_scheduler_type {kind!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, kind: str, warmup_ratio: float, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup_steps = math.ceil(warmup_ratio * total_steps)  # transformers' get_warmup_steps
    fn = _Schedule(kind, warmup_steps, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


class _Schedule:
    """Picklable lr_lambda (LambdaLR.state_dict skips plain functions but keeps callable objects' __dict__)."""

    def __init__(self, kind: str, warmup_steps: int, total_steps: int):
        self.kind, self.warmup_steps, self.total_steps = kind, warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        return lr_lambda(step, kind=self.kind, warmup_steps=self.warmup_steps, total_steps=self.total_steps)


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip by the true global norm over all shards; returns that norm (a plain replicated tensor).

    With FSDP2 the grads are DTensors sharded on dim 0; `get_total_norm` returns a DTensor with a Partial
    placement, and `.full_tensor()` all-reduces it (torchtitan's clip_grad_norm_ does the same). max_norm 0
    only measures. A non-finite norm is returned unclipped: the caller skips the step.
    """
    from torch.distributed.tensor import DTensor

    parameters = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in parameters]
    total = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite=False)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm > 0 and torch.isfinite(total):
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total

"""Loss kernels.  Imports torch only at import time; Triton is imported when impl resolves to "triton"."""

from __future__ import annotations

import importlib

import torch
from torch import nn

from .long_ce_chunked import TORCH_STEPS, LinearCrossEntropyFunction
from .long_ce_recompute_chunked import TORCH_RECOMPUTE_STEPS, RecomputeLinearCrossEntropyFunction
from .long_ce_recompute_chunked import default_chunk_bytes as recompute_chunk_bytes
from .long_ce_ref import LongCEOptions, naive_linear_cross_entropy

__all__ = [
    "LinearCrossEntropy",
    "LongCEOptions",
    "linear_cross_entropy",
    "naive_linear_cross_entropy",
    "recompute_chunk_bytes",
]

IMPLS = ("auto", "triton", "torch")


def _default_chunk_bytes(device: torch.device) -> int:
    # GPU: big chunks keep the three GEMMs efficient; 256 MiB bf16 is 832 rows at V = 152,064 (882 rounded
    # down to a multiple of 64 by chunk_rows).
    # CPU: small chunks stay in cache and keep peak memory low (tuned with benchmarks/bench_long_ce.py).
    return 256 * 2**20 if device.type == "cuda" else 64 * 2**20


def _check_inputs(hidden, weight, labels, bias) -> None:
    if any(type(t).__name__ == "DTensor" for t in (hidden, weight, bias)):
        raise ValueError(
            "linear_cross_entropy got a DTensor (a sharded FSDP2 parameter?): call it inside the forward of "
            "the module that owns the weight, where FSDP has all-gathered it (see the docstring)"
        )
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise ValueError(
            f"expected hidden [N, H], weight [V, H], labels [N]; got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != labels.shape[0]:
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, labels {tuple(labels.shape)}"
        )
    devices = {t.device for t in (hidden, weight, labels, bias) if t is not None}
    if len(devices) > 1:  # a CPU labels tensor would otherwise be read as a device pointer by Triton
        raise ValueError(
            f"hidden, weight, labels and bias must be on one device, got {sorted(map(str, devices))}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 (or int32), got {labels.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")


def _check_labels(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    # One host sync on CUDA (.item()); on CPU it is free.  check_labels=False skips it: out-of-range
    # labels then give a NaN loss for their rows instead of an error (never an out-of-bounds access).
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"labels must be in [0, {vocab}) or ignore_index={ignore_index}; found {first}")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "sum",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    impl: str = "auto",
    check_labels: bool = True,
    chunk_bytes: int | None = None,
    recompute: bool = False,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T + bias` without materialising the [N, V] logits.

    Exact equivalent (returns fp32; labels are aligned targets, no shift inside):

        z = (hidden @ weight.T + bias).float()                 # [N, V]
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        loss = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="none",
                               label_smoothing=label_smoothing)
        loss = loss + z_loss * torch.logsumexp(z, -1) ** 2 * (labels != ignore_index)
        return {"none": loss, "sum": loss.sum(),
                "mean": loss.sum() / (labels != ignore_index).sum()}[reduction]

    (so "mean" over zero counted tokens is NaN, as in PyTorch).  The logits are computed chunk by chunk in
    the input dtype, all softmax math is fp32, and gradients for hidden / weight / bias (whichever require
    grad) are produced during the forward; the backward scales them by grad_output in place, so it can
    run once (retain_graph + a second backward raises, except with reduction="none", which recomputes).

    impl: "triton" (CUDA; or CPU tensors under TRITON_INTERPRET=1), "torch" (the chunked PyTorch twin),
    "auto" (Triton for CUDA tensors, the twin otherwise).
    check_labels: raise ValueError for labels outside [0, V) other than ignore_index (one host sync on
    CUDA); with False nothing syncs and such rows give a NaN loss.
    chunk_bytes: size of the one [C, V] chunk buffer (default 256 MiB on CUDA, 64 MiB on CPU).
    recompute: the exact low-memory mode (kernels/long_ce_recompute_chunked.py): the forward keeps only
    per-row log-sum-exp statistics, the backward recomputes the logits in [r, c] blocks (8 N H V FLOPs
    instead of 6), writes each dW tile once in the weight's dtype (no fp32 [V, H] buffer) and accumulates
    dX in fp32.  Extra memory: dW + 4 N H (the fp32 dX) + chunk_bytes, here the budget of its block
    buffers, by default 256 MiB - 2 N H - 8 MiB on CUDA (kernels.recompute_chunk_bytes): extra <= dX + dW
    + 256 MiB for 16-bit inputs while N H <= 116 Mi (Qwen2-7B at 28k tokens: 1.45 GiB).  Its backward
    may run more than once (retain_graph).

    Under FSDP2 call this inside the forward of the module that owns `weight` (the lm_head or the root
    model), where FSDP has all-gathered it; from another method, register it with
    `torch.distributed.fsdp.register_fsdp_forward_method(module, "name")`.  Never pass the sharded DTensor.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    _check_inputs(hidden, weight, labels, bias)
    labels = labels.long()  # int32 labels are accepted; gather/scatter index with int64
    if check_labels:
        _check_labels(labels, weight.shape[0], ignore_index)
    if chunk_bytes is None and recompute:
        need_dx = torch.is_grad_enabled() and hidden.requires_grad
        n, h = hidden.shape
        chunk_bytes = recompute_chunk_bytes(n, h, hidden.element_size(), hidden.device.type, need_dx)
    elif chunk_bytes is None:
        chunk_bytes = _default_chunk_bytes(hidden.device)
    opts = LongCEOptions(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        softcap=None if softcap is None else float(softcap),
        chunk_bytes=int(chunk_bytes),
    )
    if recompute:
        steps = _triton_or(
            TORCH_RECOMPUTE_STEPS, impl, hidden, ".long_ce_recompute", "TRITON_RECOMPUTE_STEPS"
        )
        fn = RecomputeLinearCrossEntropyFunction
    else:
        steps = _triton_or(TORCH_STEPS, impl, hidden, ".long_ce", "TRITON_STEPS")
        fn = LinearCrossEntropyFunction
    return fn.apply(hidden, weight, bias, labels, opts, steps, torch.is_grad_enabled())


def _triton_or(twin_steps, impl: str, hidden: torch.Tensor, module: str, name: str):
    """The Triton steps `module.name` for CUDA tensors (impl="auto") or on request, else the twin's."""
    if impl == "triton" or (impl == "auto" and hidden.is_cuda):
        try:  # lazy: `import kernels` must work without Triton or its GPU backend
            return getattr(importlib.import_module(module, __name__), name)
        except ImportError:
            if impl == "triton":
                raise
    return twin_steps


class LinearCrossEntropy(nn.Module):
    """Module form: options at construction, tensors at call: `loss = module(hidden, weight, labels)`.

    It owns no parameter on purpose: call it from the forward of the module that owns the output weight
    (so FSDP2 has gathered it), passing `self.lm_head.weight`.
    """

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        reduction: str = "sum",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        impl: str = "auto",
        check_labels: bool = True,
        chunk_bytes: int | None = None,
        recompute: bool = False,
    ) -> None:
        super().__init__()
        LongCEOptions(ignore_index, reduction, label_smoothing, z_loss, softcap)  # validate early
        self.kwargs = dict(
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            impl=impl,
            check_labels=check_labels,
            chunk_bytes=chunk_bytes,
            recompute=recompute,
        )

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return linear_cross_entropy(hidden, weight, labels, bias=bias, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items() if k != "chunk_bytes")

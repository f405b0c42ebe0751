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


def _check_labels(labels: torch.Tensor, vocab: int, ignore_index: int, num_valid: int | None) -> int:
    """The number of labels != ignore_index, after checking their range: one host sync on CUDA (free on
    CPU).  check_labels=False skips it: out-of-range labels then give a NaN loss for their rows instead of
    an error (never an out-of-bounds access)."""
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab))
    n_bad, n_valid = torch.stack([bad.sum(), valid.sum()]).tolist()
    if n_bad:
        first = labels[bad][0].item()
        raise ValueError(f"labels must be in [0, {vocab}) or ignore_index={ignore_index}; found {first}")
    if num_valid is not None and num_valid != n_valid:
        raise ValueError(f"num_valid={num_valid}, but {n_valid} labels are not ignore_index={ignore_index}")
    return n_valid


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
    chunk_rows: int | None = None,
    chunk_bytes: int | None = None,
    num_valid: int | None = None,
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
    grad) are produced during the forward (6 N_valid H V FLOPs, N_valid = rows not ignored) and kept in
    fp32; the backward scales them by grad_output and casts each once, so it can run once
    (retain_graph + a second backward raises, except with reduction="none", which recomputes).
    Extra memory: the [C, V] chunk buffer, fp32 dW [V, H] and dX [N_valid, H], and for the final cast
    the 16-bit dW beside the fp32 one (Qwen2-7B, N = 28,672, bf16: 1.02 + 2.03 + 0.38 GiB, then 1.02 more).

    impl: "triton" (CUDA; or CPU tensors under TRITON_INTERPRET=1), "torch" (the chunked PyTorch twin),
    "auto" (Triton for CUDA tensors, the twin otherwise).
    check_labels: raise ValueError for labels outside [0, V) other than ignore_index (one host sync on
    CUDA, which also counts the valid rows); with False nothing syncs and such rows give a NaN loss.
    chunk_rows: rows per chunk; default 3584 on CUDA (a multiple of 128 that keeps the fp32 dW
    accumulator's traffic under a third of the dW GEMM's time; costs 3584 * V * itemsize bytes of chunk
    buffer, 1.02 GiB at V = 152,064 bf16), 64 MiB worth of rows on CPU; the rows are then evened out over
    the chunks.  chunk_bytes: the chunk buffer's size instead (at most one of the two).
    num_valid: the number of labels != ignore_index when the caller knows it on the host (the loader
    counts targets on the CPU): ignored rows are then skipped exactly without a host sync; otherwise they
    are skipped when the count is free (CPU labels, or check_labels) and computed as zero rows on a GPU.
    recompute: the exact low-memory mode (kernels/long_ce_recompute_chunked.py): the forward keeps only
    per-row log-sum-exp statistics, the backward recomputes the logits in [r, c] blocks (8 N H V FLOPs
    instead of 6, ignored rows included), writes each dW tile once in the weight's dtype (no fp32 [V, H]
    buffer) and accumulates dX in fp32.  Extra memory: dW + 4 N H (the fp32 dX) + chunk_bytes, here the
    budget of its block buffers (chunk_rows does not apply), by default 256 MiB - 2 N H - 8 MiB on CUDA
    (kernels.recompute_chunk_bytes): extra <= dX + dW + 256 MiB for 16-bit inputs while N H <= 116 Mi
    (Qwen2-7B at 28k tokens: 1.45 GiB).  Its backward may run more than once (retain_graph).

    Under FSDP2 call this inside the forward of the module that owns `weight` (the lm_head or the root
    model), where FSDP has all-gathered it; from another method, register it with
    `torch.distributed.fsdp.register_fsdp_forward_method(module, "name")`.  Never pass the sharded DTensor.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    _check_inputs(hidden, weight, labels, bias)
    labels = labels.long()  # int32 labels are accepted; gather/scatter index with int64
    if check_labels:
        num_valid = _check_labels(labels, weight.shape[0], ignore_index, num_valid)
    opts = LongCEOptions(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        softcap=None if softcap is None else float(softcap),
        chunk_rows=chunk_rows,
        chunk_bytes=chunk_bytes,
        num_valid=num_valid,
    )
    if recompute:
        if chunk_rows is not None:
            raise ValueError("chunk_rows is the speed mode's; recompute=True takes chunk_bytes (its budget)")
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
        chunk_rows: int | None = None,
        chunk_bytes: int | None = None,
        recompute: bool = False,
    ) -> None:
        super().__init__()
        LongCEOptions(ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_rows, chunk_bytes)
        self.kwargs = dict(
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            impl=impl,
            check_labels=check_labels,
            chunk_rows=chunk_rows,
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
        return ", ".join(
            f"{k}={v!r}" for k, v in self.kwargs.items() if k not in ("chunk_rows", "chunk_bytes")
        )

"""Chunked driver and autograd.Function of long-ce, shared by the Triton path and the PyTorch twin.

For each chunk of C rows (C chosen so one [C, V] buffer fits in `chunk_bytes`):

    logits = x_c @ W^T                     [C, V]  GEMM, 2*C*H*V FLOPs, input dtype
    rows(logits) -> loss_c, dlogits        in place: fp32 math, one rounding to the buffer dtype
    dX_c = dlogits @ W                     [C, H]  GEMM, 2*C*H*V
    dW_acc += dlogits^T @ x_c              [V, H]  fp32 accumulator, 2*C*H*V
    db_acc += dlogits.sum(0)               [V]     fp32

so gradients are produced during the forward (6*N*H*V FLOPs in all, no recompute of the logits) and the
backward only scales them by grad_output.  Extra memory: the chunk buffer, the fp32 dW accumulator and
dX.  Nothing syncs with the host: the "mean" token count stays a device tensor.

reduction="none" is the exception: its grad_output is a per-token vector that is unknown during the
forward and cannot be folded into dW afterwards, so the forward computes only the loss (2*N*H*V) and the
backward runs the chunked pass again with grad_output as a per-row scale (another 6*N*H*V).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .long_ce_ref import LongCEOptions, accumulate_dw_torch, rows_torch


@dataclass(frozen=True)
class Steps:
    """The two per-chunk kernels of one implementation (see long_ce_ref.rows_torch for the contract)."""

    rows: Callable[..., None]
    accumulate_dw: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


TORCH_STEPS = Steps(rows=rows_torch, accumulate_dw=accumulate_dw_torch)


def chunk_rows(n: int, v: int, element_size: int, chunk_bytes: int) -> int:
    """Rows per chunk: as many as fit in chunk_bytes, a multiple of 64 when that is possible (GEMM tiles)."""
    c = max(1, chunk_bytes // max(1, v * element_size))
    if c >= 128:
        c -= c % 64
    return min(n, c) if n > 0 else 1


def chunked_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    opts: LongCEOptions,
    steps: Steps,
    *,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    row_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Returns per-row loss [N] fp32, dX [N, H] (input dtype), dW_acc [V, H] fp32, db_acc [V] fp32.

    Gradients are those of sum_i row_scale_i * loss_i (row_scale None = all ones).
    """
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    write_grad = need_dx or need_dw or need_db
    loss = torch.empty(N, dtype=torch.float32, device=dev)
    dx = torch.empty(N, H, dtype=hidden.dtype, device=dev) if need_dx else None
    dw_acc = torch.zeros(V, H, dtype=torch.float32, device=dev) if need_dw else None
    db_acc = torch.zeros(V, dtype=torch.float32, device=dev) if need_db else None
    C = chunk_rows(N, V, hidden.element_size(), opts.chunk_bytes)
    buf = torch.empty(min(C, N), V, dtype=hidden.dtype, device=dev)  # the one chunk buffer, reused
    wt = weight.T
    for s in range(0, N, C):
        e = min(N, s + C)
        x = hidden[s:e]  # [c, H]
        logits = buf[: e - s]  # [c, V]
        torch.mm(x, wt, out=logits)
        rs = None if row_scale is None else row_scale[s:e]
        steps.rows(logits, bias, labels[s:e], loss[s:e], opts, rs, write_grad)
        if need_dx:
            torch.mm(logits, weight, out=dx[s:e])
        if need_dw:
            steps.accumulate_dw(dw_acc, logits, x)
        if need_db:
            db_acc += logits.sum(0, dtype=torch.float32)
    return loss, dx, dw_acc, db_acc


def _reduce(loss_rows: torch.Tensor, labels: torch.Tensor, opts: LongCEOptions):
    if opts.reduction == "none":
        return loss_rows, None
    total = loss_rows.sum()
    if opts.reduction == "sum":
        return total, None
    count = (labels != opts.ignore_index).sum().float()  # stays on the device: no host sync
    return total / count, count


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts: LongCEOptions, steps: Steps, grad_enabled: bool):
        # needs_input_grad stays True under torch.no_grad(), hence the caller's grad_enabled.
        need_dx = grad_enabled and ctx.needs_input_grad[0]
        need_dw = grad_enabled and ctx.needs_input_grad[1]
        need_db = grad_enabled and bias is not None and ctx.needs_input_grad[2]
        ctx.opts, ctx.steps = opts, steps
        ctx.needs = (need_dx, need_dw, need_db)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        if opts.reduction == "none":
            loss_rows, _, _, _ = chunked_pass(
                hidden, weight, bias, labels, opts, steps, need_dx=False, need_dw=False, need_db=False
            )
            if need_dx or need_dw or need_db:
                ctx.save_for_backward(hidden, weight, bias, labels)
            return loss_rows
        loss_rows, dx, dw, db = chunked_pass(
            hidden, weight, bias, labels, opts, steps, need_dx=need_dx, need_dw=need_dw, need_db=need_db
        )
        loss, count = _reduce(loss_rows, labels, opts)
        # dW and db stay in their fp32 accumulators until the backward has scaled them by grad_output, so a
        # 16-bit weight's gradient is rounded once (the trainer's grad_output is 1 / token count, not 1).
        # Same memory as rounding here: the fp32 and the 16-bit dW coexist only inside the .to() either way.
        ctx.grads = [dx, dw, db, count]
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        need_dx, need_dw, need_db = ctx.needs
        opts = ctx.opts
        if opts.reduction == "none":
            hidden, weight, bias, labels = ctx.saved_tensors
            _, dx, dw, db = chunked_pass(
                hidden,
                weight,
                bias,
                labels,
                opts,
                ctx.steps,
                need_dx=need_dx,
                need_dw=need_dw,
                need_db=need_db,
                row_scale=grad_out.float(),
            )
            dw = None if dw is None else dw.to(ctx.weight_dtype)
            db = None if db is None else db.to(ctx.bias_dtype)
            return dx, dw, db, None, None, None, None
        if ctx.grads is None:
            raise RuntimeError(
                "linear_cross_entropy: backward ran twice; its gradients are computed in the forward and "
                "scaled in place once (use retain_graph only with reduction='none')"
            )
        dx, dw, db, count = ctx.grads
        ctx.grads = None
        g = grad_out.float()
        if count is not None:
            g = g / count.clamp(min=1.0)  # no counted token: loss NaN (as PyTorch), gradients 0 (as PyTorch)
        # Scale in place: no second copy of dX / dW (grad_out stays on the device, no sync to test == 1).
        for t in (dx, dw, db):
            if t is not None:
                t.mul_(g)
        dw = None if dw is None else dw.to(ctx.weight_dtype)  # frees the fp32 accumulator
        db = None if db is None else db.to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None

"""Chunked driver and autograd.Function of long-ce's speed mode, shared by the Triton path and the twin.

Only the rows whose label is not ignore_index enter the chunks (`compact_rows`).  For each chunk of C of
them (`plan_chunk_rows`):

    x_c    = hidden[rows]              [C, H]  gathered (a view when no row is ignored)
    logits = x_c @ W^T                 [C, V]  GEMM, 2*C*H*V FLOPs, input dtype, one reused buffer
    rows(logits) -> loss_c, dlogits            in place: fp32 math, one rounding to the buffer dtype
    dX_c   = dlogits @ W               [C, H]  GEMM, 2*C*H*V, fp32 output
    dW_acc = / += dlogits^T @ x_c      [V, H]  GEMM, 2*C*H*V, fp32 accumulator (first chunk: plain product)
    db_acc = / += dlogits.sum(0)       [V]     fp32

so every gradient is made during the forward (6*N_valid*H*V FLOPs in all, no recompute of the logits) and
the backward scales dX, dW, db by grad_output and casts them to the input dtypes in one pass each: each
gradient is rounded once.  Extra memory: the chunk buffer (C * V * itemsize: 1.02 GiB at the CUDA default
C = 3584, V = 152,064, bf16), the fp32 dW accumulator (V * H * 4), the fp32 dX (N_valid * H * 4) and, for
the final cast, the 16-bit dW beside the fp32 one.  Nothing syncs with the host.

reduction="none" is the exception: its grad_output is a per-token vector that is unknown during the
forward and cannot be folded into dW afterwards, so the forward computes only the loss (2*N*H*V) and the
backward runs the chunked pass again with grad_output as a per-row scale (another 6*N*H*V).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .long_ce_ref import LongCEOptions, matmul_f32_torch, rows_torch

# Default rows per chunk on CUDA.  dW_acc costs one fp32 read + write (8 V H bytes) per chunk against
# 2 C H V FLOPs of the dW GEMM: C / 4 FLOP per byte.  At 3 x the H100 / H200 ridge (989 TFLOP/s over
# 3.35 TB/s = 295 FLOP/byte) that is C >= 3540, so the accumulator traffic is at most a third of the dW
# GEMM's time even where cuBLAS does not overlap its epilogue (A100: 312 / 2.0 = 156, 6 x).  A multiple
# of 128 (GEMM tiles); independent of H and V, it costs C * V * itemsize bytes of chunk buffer.
CUDA_CHUNK_ROWS = 3584
# CPU: a chunk that stays in cache and keeps peak memory low (tuned with benchmarks/bench_long_ce.py).
CPU_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Steps:
    """The per-chunk kernels of one implementation (contracts: long_ce_ref.rows_torch / matmul_f32_torch)."""

    rows: Callable[..., None]
    matmul_f32: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], None]


TORCH_STEPS = Steps(rows=rows_torch, matmul_f32=matmul_f32_torch)


def plan_chunk_rows(n: int, v: int, element_size: int, device_type: str, opts: LongCEOptions) -> int:
    """Rows per chunk for n rows: opts.chunk_rows exactly; else a target (CUDA_CHUNK_ROWS on CUDA, or the
    rows that fit in chunk_bytes / CPU_CHUNK_BYTES, rounded down to a multiple of 128 once >= 128), then
    evened out over the chunks that target needs (rounded up to a multiple of 128), so that a last,
    ragged chunk does not cost a full-size buffer."""
    if n == 0:
        return 1
    if opts.chunk_rows is not None:
        return min(n, opts.chunk_rows)
    if opts.chunk_bytes is None and device_type == "cuda":
        target = CUDA_CHUNK_ROWS
    else:
        target = max(1, (opts.chunk_bytes or CPU_CHUNK_BYTES) // max(1, v * element_size))
        if target >= 128:
            target -= target % 128
    n_chunks = -(-n // target)
    c = -(-n // n_chunks)
    if c >= 128:
        c = -(-c // 128) * 128  # <= target: target is a multiple of 128 here
    return min(n, c)


def compact_rows(labels: torch.Tensor, opts: LongCEOptions) -> tuple[torch.Tensor | None, int | None]:
    """(indices of the rows to compute or None for all rows in order, number of valid rows or None).

    The count must be known on the host to size the chunk loop: free for CPU labels, given by the caller
    (opts.num_valid: the loader counts targets on the CPU) or by the label check's one sync.  The indices
    come from a stable sort on the device (no host sync).  Unknown count on a GPU: every row is computed,
    an ignored one at the cost of a zero-filled gradient row in the rows kernel.
    """
    n_valid = opts.num_valid
    if n_valid is None:
        if labels.device.type != "cpu":
            return None, None
        n_valid = int((labels != opts.ignore_index).sum())
    if n_valid == labels.shape[0]:
        return None, n_valid
    ignored = (labels == opts.ignore_index).to(torch.int8)
    return torch.argsort(ignored, stable=True)[:n_valid], n_valid


def _chunk_buffer(c: int, v: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # On CUDA the row stride is a multiple of 16 elements: every row starts 32-byte aligned, which the rows
    # kernel's 16-byte vector loads and cuBLAS's leading dimension both want (free for 16-divisible V).
    pad = 16 if device.type == "cuda" else 1
    return torch.empty(c, -(-v // pad) * pad, dtype=dtype, device=device)[:, :v]


@dataclass
class ChunkedResult:
    loss: torch.Tensor  # [n] fp32 per computed row (the rows of `rows`, or all N)
    rows: torch.Tensor | None  # indices of the computed rows in the input, None = all rows in order
    n_valid: int | None  # rows whose label is not ignore_index, when known on the host
    dx: torch.Tensor | None  # [n, H] fp32, unscaled
    dw: torch.Tensor | None  # [V, H] fp32, unscaled
    db: torch.Tensor | None  # [V] fp32, unscaled


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
) -> ChunkedResult:
    """Per-row losses and the fp32 gradients of sum_i row_scale_i * loss_i (row_scale None = all ones)."""
    H = hidden.shape[1]
    V = weight.shape[0]
    dev = hidden.device
    f32 = dict(dtype=torch.float32, device=dev)
    rows, n_valid = compact_rows(labels, opts)
    n = labels.shape[0] if rows is None else n_valid
    if rows is not None:
        labels = labels[rows]
        row_scale = None if row_scale is None else row_scale[rows]
    write_grad = need_dx or need_dw or need_db
    loss = torch.empty(n, **f32)
    dx = torch.empty(n, H, **f32) if need_dx else None
    # Written by the first chunk (a plain product, no zero fill); zeros only when no row is computed.
    dw = (torch.zeros if n == 0 else torch.empty)(V, H, **f32) if need_dw else None
    db = (torch.zeros if n == 0 else torch.empty)(V, **f32) if need_db else None
    C = plan_chunk_rows(n, V, hidden.element_size(), dev.type, opts)
    buf = _chunk_buffer(min(C, n), V, hidden.dtype, dev)
    wt = weight.T
    for s in range(0, n, C):
        e = min(n, s + C)
        x = hidden[s:e] if rows is None else hidden.index_select(0, rows[s:e])  # [c, H]
        logits = buf[: e - s]  # [c, V]
        torch.mm(x, wt, out=logits)
        rs = None if row_scale is None else row_scale[s:e]
        steps.rows(logits, bias, labels[s:e], loss[s:e], opts, rs, write_grad)
        if need_dx:
            steps.matmul_f32(logits, weight, dx[s:e], False)
        if need_dw:
            steps.matmul_f32(logits.T, x, dw, s > 0)
        if need_db:
            if s == 0:
                torch.sum(logits, 0, dtype=torch.float32, out=db)
            else:
                db += logits.sum(0, dtype=torch.float32)
    return ChunkedResult(loss, rows, n_valid, dx, dw, db)


def scale_cast(acc: torch.Tensor, g: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """acc * g in `dtype`, one pass: in place for fp32, else read fp32 / write `dtype` (one rounding)."""
    if dtype == acc.dtype:
        return acc if g is None else acc.mul_(g)
    if g is None:
        return acc.to(dtype)
    return torch.mul(acc, g, out=torch.empty(acc.shape, dtype=dtype, device=acc.device))


def expand_rows(t: torch.Tensor, rows: torch.Tensor | None, n_rows: int) -> torch.Tensor:
    """Rows computed in compacted order -> all n_rows, zeros where a row was skipped."""
    if rows is None:
        return t
    return t.new_zeros((n_rows, *t.shape[1:])).index_copy_(0, rows, t)


def _grads(ctx, res: ChunkedResult, g: torch.Tensor | None):
    dx = (
        None if res.dx is None else expand_rows(scale_cast(res.dx, g, ctx.hidden_dtype), res.rows, ctx.n_rows)
    )
    res.dx = None  # the fp32 dX is freed before the 16-bit dW exists
    dw = None if res.dw is None else scale_cast(res.dw, g, ctx.weight_dtype)
    res.dw = None
    db = None if res.db is None else scale_cast(res.db, g, ctx.bias_dtype)
    return dx, dw, db, None, None, None, None


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts: LongCEOptions, steps: Steps, grad_enabled: bool):
        # needs_input_grad stays True under torch.no_grad(), hence the caller's grad_enabled.
        need_dx = grad_enabled and ctx.needs_input_grad[0]
        need_dw = grad_enabled and ctx.needs_input_grad[1]
        need_db = grad_enabled and bias is not None and ctx.needs_input_grad[2]
        ctx.opts, ctx.steps = opts, steps
        ctx.needs = (need_dx, need_dw, need_db)
        ctx.n_rows = hidden.shape[0]
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        if opts.reduction == "none":
            res = chunked_pass(
                hidden, weight, bias, labels, opts, steps, need_dx=False, need_dw=False, need_db=False
            )
            if need_dx or need_dw or need_db:
                ctx.save_for_backward(hidden, weight, bias, labels)
            return expand_rows(res.loss, res.rows, ctx.n_rows)
        res = chunked_pass(
            hidden, weight, bias, labels, opts, steps, need_dx=need_dx, need_dw=need_dw, need_db=need_db
        )
        loss = res.loss.sum()
        count = None
        if opts.reduction == "mean":
            # The host count when known, else counted on the device: no host sync either way.
            count = res.n_valid
            count = (labels != opts.ignore_index).sum().float() if count is None else float(count)
            loss = loss / count
        # The gradients stay fp32 until the backward has scaled them by grad_output, so a 16-bit weight's
        # gradient is rounded once (the trainer's grad_output is 1 / token count, not 1).
        ctx.res, ctx.count = res, count
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        need_dx, need_dw, need_db = ctx.needs
        opts = ctx.opts
        if opts.reduction == "none":
            hidden, weight, bias, labels = ctx.saved_tensors
            res = chunked_pass(
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
            return _grads(ctx, res, None)
        if ctx.res is None:
            raise RuntimeError(
                "linear_cross_entropy: backward ran twice; its gradients are computed in the forward and "
                "scaled once (use retain_graph only with reduction='none')"
            )
        res, ctx.res = ctx.res, None
        g = grad_out.float()
        if ctx.count is not None:
            # No counted token: loss NaN (as PyTorch), gradients 0 (as PyTorch).
            g = g / (max(ctx.count, 1.0) if isinstance(ctx.count, float) else ctx.count.clamp(min=1.0))
        return _grads(ctx, res, g)

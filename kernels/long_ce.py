"""Triton kernels of long-ce (fused linear + cross-entropy); the chunked driver is kernels/long_ce_chunked.py.

Per chunk of rows the driver runs: logits = x @ W^T (cuBLAS) -> `_rows_kernel` (loss and dlogits in place)
-> dX = dlogits @ W (cuBLAS) -> `_dw_kernel` (dW_acc += dlogits^T @ x into an fp32 accumulator, read-
modify-write by the one program that owns each tile: deterministic, no atomics).

Offsets are int64 (rows * stride overflows int32 once N * V > 2^31; Qwen2-7B at 28k tokens has 4.4e9
logits).  Under TRITON_INTERPRET=1 the kernels also run on CPU tensors (tests); tl.dot on bf16 operands
is wrong in the interpreter, so interpreter tests use fp32 / fp16.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .launch import Launch
from .long_ce_chunked import Steps
from .long_ce_ref import LongCEOptions


@triton.jit
def _tanh(x):
    # tanh without libdevice: 1 - 2 / (exp(2x) + 1) is exact at +-inf and has no overflow NaN.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _load_z(row_ptr, bias_ptr, cols, mask, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Logits of one block in fp32 (+bias, softcapped); masked lanes are -inf.  Also returns tanh."""
    z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    t = z
    if HAS_SOFTCAP:
        t = _tanh(z / softcap)
        z = softcap * t
    z = tl.where(mask, z, float("-inf"))
    return z, t


@triton.jit
def _rows_kernel(
    logits_ptr,  # [C, V] chunk buffer, input dtype; overwritten with dlogits when WRITE_GRAD
    stride_row,
    bias_ptr,  # [V] or dummy
    labels_ptr,  # [C] int64 / int32
    loss_ptr,  # [C] fp32 out
    scale_ptr,  # [C] fp32 per-row grad scale or dummy
    V,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row  # int64 offset: row * V passes 2^31 at large N * V
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < V)

    # Pass 1: online log-sum-exp, sum of z (label smoothing) and z[label], all fp32.
    m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)
    s = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
    z_sum = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
    z_y = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z, t = _load_z(row_ptr, bias_ptr, cols, mask, softcap, HAS_BIAS, HAS_SOFTCAP)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
        z_y += tl.sum(tl.where(cols == label, z, 0.0), axis=0)
    # Keep log(s) apart from the max m: lse = m + log(s) rounds to ulp(|m|) (~2e-6 at logits ~30), which
    # would swamp 1 - p_y on confident rows; z - m and m - z_y are exact-ish, log(s) is small and exact-ish.
    log_s = tl.log(s)
    lse = m + log_s
    # = lse - (1 - eps) z_y - eps mean(z) + zl lse^2, with lse - z_y and lse - mean(z) formed around m
    loss = (
        (1.0 - label_smoothing) * ((m - z_y) + log_s)
        + label_smoothing * ((m - z_sum / V) + log_s)
        + z_loss * lse * lse
    )
    loss = tl.where(valid, loss, 0.0)
    loss = tl.where(valid & ~in_range, float("nan"), loss)  # bad label: poison, never index out of bounds
    tl.store(loss_ptr + row, loss)

    if WRITE_GRAD:
        # Pass 2: dlogits = scale * [p (1 + 2 zl lse) - eps / V - (1 - eps) 1{j = y}] * (1 - t^2),
        # formed in fp32 and rounded once on the store (p_y - 1 survives on confident rows).
        scale = tl.where(valid, 1.0, 0.0)
        if HAS_SCALE:
            scale = scale * tl.load(scale_ptr + row).to(tl.float32)
        coef = 1.0 + 2.0 * z_loss * lse
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            z, t = _load_z(row_ptr, bias_ptr, cols, mask, softcap, HAS_BIAS, HAS_SOFTCAP)
            g = tl.exp((z - m) - log_s) * coef - label_smoothing / V  # p_j, formed around m (see above)
            g = tl.where(cols == label, g - (1.0 - label_smoothing), g)
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            g = g * scale
            tl.store(row_ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dw_kernel(
    g_ptr,  # [C, V] dlogits
    x_ptr,  # [C, H] hidden chunk
    dw_ptr,  # [V, H] fp32 accumulator
    C,
    V,
    H,
    stride_gc,
    stride_gv,
    stride_xc,
    stride_xh,
    stride_wv,
    stride_wh,
    DOT_PRECISION: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_C: tl.constexpr,
    GROUP_V: tl.constexpr,
):
    # Grouped tile order: GROUP_V vocab tiles share each x column block while it is hot in L2.
    pid = tl.program_id(0)
    n_v = tl.cdiv(V, BLOCK_V)
    n_h = tl.cdiv(H, BLOCK_H)
    per_group = GROUP_V * n_h
    first_v = (pid // per_group) * GROUP_V
    group_size = min(n_v - first_v, GROUP_V)
    pid_v = first_v + (pid % per_group) % group_size
    pid_h = (pid % per_group) // group_size

    offs_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_h = pid_h.to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_V, BLOCK_H], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        g = tl.load(  # [BLOCK_V, BLOCK_C] = dlogits^T tile
            g_ptr + offs_c[None, :] * stride_gc + offs_v[:, None] * stride_gv,
            mask=(offs_c[None, :] < C) & (offs_v[:, None] < V),
            other=0.0,
        )
        x = tl.load(  # [BLOCK_C, BLOCK_H]
            x_ptr + offs_c[:, None] * stride_xc + offs_h[None, :] * stride_xh,
            mask=(offs_c[:, None] < C) & (offs_h[None, :] < H),
            other=0.0,
        )
        acc = tl.dot(g, x, acc, input_precision=DOT_PRECISION)
    ptrs = dw_ptr + offs_v[:, None] * stride_wv + offs_h[None, :] * stride_wh
    mask = (offs_v[:, None] < V) & (offs_h[None, :] < H)
    acc += tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, acc, mask=mask)


# triton.jit decides at decoration time whether a kernel is interpreted, so the mode is fixed at import.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_device(t: torch.Tensor) -> None:
    if not (t.is_cuda or _INTERPRET):
        raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU); use impl='torch'")


def rows_launch(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    loss_out: torch.Tensor,
    opts: LongCEOptions,
    row_scale: torch.Tensor | None,
    write_grad: bool,
) -> Launch:
    """The `_rows_kernel` launch for one chunk (tests compile exactly this; see kernels/launch.py)."""
    C, V = logits.shape
    assert logits.stride(1) == 1 and loss_out.is_contiguous()
    bias_arg = bias if bias is not None else loss_out
    scale_arg = row_scale if row_scale is not None else loss_out
    block_v = 64 if _INTERPRET else min(4096, triton.next_power_of_2(V))
    args = (
        logits,
        logits.stride(0),
        bias_arg,
        labels,
        loss_out,
        scale_arg,
        V,
        opts.ignore_index,
        opts.label_smoothing,
        opts.z_loss,
        1.0 if opts.softcap is None else opts.softcap,
    )
    kwargs = dict(
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=opts.softcap is not None,
        HAS_SCALE=row_scale is not None,
        WRITE_GRAD=write_grad,
        BLOCK_V=block_v,
        num_warps=1 if _INTERPRET else 8,
    )
    return Launch(_rows_kernel, (C,), args, kwargs)


def rows_triton(logits, bias, labels, loss_out, opts, row_scale, write_grad) -> None:
    _check_device(logits)
    if logits.shape[0] == 0:
        return
    bias = bias.contiguous() if bias is not None else None
    row_scale = row_scale.contiguous() if row_scale is not None else None
    rows_launch(logits, bias, labels.contiguous(), loss_out, opts, row_scale, write_grad)()


def dw_launch(dw_acc: torch.Tensor, grad: torch.Tensor, x: torch.Tensor) -> Launch:
    """The `_dw_kernel` launch for one chunk: dw_acc[V, H] (fp32) += grad[C, V]^T @ x[C, H]."""
    C, V = grad.shape
    H = x.shape[1]
    if _INTERPRET:
        bv, bh, bc, warps, stages = 32, 32, 16, 1, 1
    else:  # H100-friendly defaults; 128x128x64 bf16 tiles, 3-stage pipeline
        bv, bh, bc, warps, stages = 128, 128, 64, 8, 3
    grid = (triton.cdiv(V, bv) * triton.cdiv(H, bh),)
    args = (grad, x, dw_acc, C, V, H, *grad.stride(), *x.stride(), *dw_acc.stride())
    kwargs = dict(
        DOT_PRECISION="ieee" if grad.dtype == torch.float32 else "tf32",
        BLOCK_V=bv,
        BLOCK_H=bh,
        BLOCK_C=bc,
        GROUP_V=8,
        num_warps=warps,
        num_stages=stages,
    )
    return Launch(_dw_kernel, grid, args, kwargs)


def accumulate_dw_triton(dw_acc: torch.Tensor, grad: torch.Tensor, x: torch.Tensor) -> None:
    _check_device(grad)
    if grad.shape[0] == 0:
        return
    dw_launch(dw_acc, grad, x)()


TRITON_STEPS = Steps(rows=rows_triton, accumulate_dw=accumulate_dw_triton)

"""Triton kernels of long-ce's speed mode; the chunked driver is kernels/long_ce_chunked.py.

Per chunk the driver runs: logits = x @ W^T (cuBLAS) -> `_rows_kernel` (loss and dlogits in place) ->
dX = dlogits @ W and dW_acc (+)= dlogits^T @ x, both cuBLAS with fp32 output (`matmul_f32_triton`).
Where this torch has no fp32-output GEMM for 16-bit operands (long_ce_ref.fp32_out_matmul_supported)
those two run on `_mm_f32_kernel` instead: the one program that owns an output tile starts from its old
fp32 value, accumulates the chunk and stores it once (deterministic, no atomics).

`_rows_kernel` is persistent and L2-aware.  Each program walks rows r = pid, pid + G, ...: pass 1 reads
the row once (online log-sum-exp), pass 2 reads it again and writes dlogits in place.  G is chosen so
that the G rows in flight take at most half of L2 (G = 86 at V = 152,064 bf16 on a 50 MiB L2): pass 2
then re-reads from L2, and the rows step costs one HBM read and one HBM write of the chunk.  The
alternative, the row statistics in the epilogue of a Triton logits GEMM, would save the same read pass
(~2.6 ms of HBM time at the Qwen2-7B shape on an H100) but trade cuBLAS for a Triton GEMM on a third of
the FLOPs (~31 TFLOP, ~45 ms): losing more than 6% of cuBLAS's speed there would cost more than the pass
saved (estimates, kernels/README.md).

Offsets are int64 (rows * stride overflows int32 once N * V > 2^31; Qwen2-7B at 28k tokens has 4.4e9
logits).  Under TRITON_INTERPRET=1 the kernels also run on CPU tensors (tests); tl.dot on bf16 operands
is wrong in the interpreter, so interpreter tests use fp32 / fp16.  Triton 3.6's interpreter cannot
iterate `range()` to a runtime integer (it hands kernels 1-element arrays, which NumPy >= 2.3 refuses to
turn into an index): loop bounds are constexprs (V), `while` loops (rows) or get the bound as a host
integer under the interpreter only (`K_HOST`).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .launch import Launch
from .long_ce_chunked import Steps
from .long_ce_ref import LongCEOptions, fp32_out_matmul_supported, matmul_f32_torch


@triton.jit
def _tanh(x):
    # tanh without libdevice: 1 - 2 / (exp(2x) + 1) is exact at +-inf and has no overflow NaN.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _load_z(row_ptr, bias_ptr, cols, softcap, V, V_PAD, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Logits of one block in fp32 (+bias, softcapped), -inf past V, and their tanh.

    The row is read up to V_PAD (a multiple of 16 on CUDA: the chunk buffer's padded row), so the loads are
    16-byte vectors whatever V is; the lanes in [V, V_PAD) hold scratch and are masked here, in registers.
    """
    z = tl.load(row_ptr + cols, mask=cols < V_PAD, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
    t = z
    if HAS_SOFTCAP:
        t = _tanh(z / softcap)
        z = softcap * t
    return tl.where(cols < V, z, float("-inf")), t


@triton.jit
def _rows_kernel(
    logits_ptr,  # [C, V] chunk buffer (rows V_PAD wide), input dtype; overwritten with dlogits if WRITE_GRAD
    stride_row,
    bias_ptr,  # [V] or dummy
    labels_ptr,  # [C] int64 / int32
    loss_ptr,  # [C] fp32 out
    scale_ptr,  # [C] fp32 per-row grad scale or dummy
    C,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    V: tl.constexpr,  # compile-time trip counts and masks: one compile per vocabulary size
    V_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    while row < C:  # persistent: the grid holds as many rows in flight as fit in half of L2
        row_ptr = logits_ptr + row * stride_row  # int64 offset: row * V passes 2^31 at large N * V
        label = tl.load(labels_ptr + row).to(tl.int64)
        if label != ignore_index:
            # Pass 1 (HBM read): online log-sum-exp, sum of z (label smoothing) and z[label], all fp32.
            m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)
            s = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
            z_sum = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
            z_y = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
            for start in range(0, V_PAD, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                z, _ = _load_z(row_ptr, bias_ptr, cols, softcap, V, V_PAD, HAS_BIAS, HAS_SOFTCAP)
                m_new = tl.maximum(m, tl.max(z, axis=0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
                m = m_new
                z_sum += tl.sum(tl.where(cols < V, z, 0.0), axis=0)
                z_y += tl.sum(tl.where(cols == label, z, 0.0), axis=0)
            # Keep log(s) apart from the max m: lse = m + log(s) rounds to ulp(|m|) (~2e-6 at logits ~30),
            # which would swamp 1 - p_y on confident rows; z - m and m - z_y stay exact-ish.
            log_s = tl.log(s)
            lse = m + log_s
            # = lse - (1 - eps) z_y - eps mean(z) + zl lse^2, with lse - z_y and lse - mean(z) formed around m
            loss = (
                (1.0 - label_smoothing) * ((m - z_y) + log_s)
                + label_smoothing * ((m - z_sum / V) + log_s)
                + z_loss * lse * lse
            )
            in_range = (label >= 0) & (label < V)
            tl.store(loss_ptr + row, tl.where(in_range, loss, float("nan")))  # bad label: poison, no OOB
            if WRITE_GRAD:
                # Pass 2 (the row is still in L2; one HBM write): dlogits = scale * [p (1 + 2 zl lse)
                # - eps / V - (1 - eps) 1{j = y}] * (1 - t^2), in fp32, rounded once on the in-place store.
                scale = 1.0
                if HAS_SCALE:
                    scale = tl.load(scale_ptr + row).to(tl.float32)
                coef = 1.0 + 2.0 * z_loss * lse
                for start in range(0, V_PAD, BLOCK_V):
                    cols = start + tl.arange(0, BLOCK_V)
                    z, t = _load_z(row_ptr, bias_ptr, cols, softcap, V, V_PAD, HAS_BIAS, HAS_SOFTCAP)
                    g = tl.exp((z - m) - log_s) * coef - label_smoothing / V  # p_j, formed around m
                    g = tl.where(cols == label, g - (1.0 - label_smoothing), g)
                    if HAS_SOFTCAP:
                        g = g * (1.0 - t * t)
                    tl.store(row_ptr + cols, (g * scale).to(logits_ptr.dtype.element_ty), mask=cols < V_PAD)
        else:  # only reached when the driver could not compact the rows (count unknown on the host)
            tl.store(loss_ptr + row, 0.0)
            if WRITE_GRAD:
                zero = tl.zeros([BLOCK_V], tl.float32).to(logits_ptr.dtype.element_ty)
                for start in range(0, V_PAD, BLOCK_V):
                    cols = start + tl.arange(0, BLOCK_V)
                    tl.store(row_ptr + cols, zero, mask=cols < V_PAD)
        row += tl.num_programs(0)


@triton.jit
def _mm_f32_kernel(
    a_ptr,  # [K, M] (any strides): out = a^T @ b
    b_ptr,  # [K, N]
    out_ptr,  # [M, N] fp32: written (ACCUMULATE False) or accumulated into
    M,
    N,
    K,
    stride_ak,
    stride_am,
    stride_bk,
    stride_bn,
    stride_om,
    stride_on,
    ACCUMULATE: tl.constexpr,
    K_HOST: tl.constexpr,  # K as a host int under the interpreter (see the module docstring), else 0
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles share each b column block while it is hot in L2.
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    group_size = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if ACCUMULATE:  # the old tile is the initial accumulator: loaded before the main loop, stored once
        acc = tl.load(out_ptrs, mask=out_mask, other=0.0)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K if K_HOST == 0 else K_HOST, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        a = tl.load(  # [BLOCK_M, BLOCK_K] = a^T tile
            a_ptr + offs_k[None, :] * stride_ak + offs_m[:, None] * stride_am,
            mask=(offs_k[None, :] < K) & (offs_m[:, None] < M),
            other=0.0,
        )
        b = tl.load(  # [BLOCK_K, BLOCK_N]
            b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
            mask=(offs_k[:, None] < K) & (offs_n[None, :] < N),
            other=0.0,
        )
        acc = tl.dot(a, b, acc)
    tl.store(out_ptrs, acc, mask=out_mask)


# triton.jit decides at decoration time whether a kernel is interpreted, so the mode is fixed at import.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Rows kernel: 16 warps x 32 lanes, 16 elements (two 16-byte vectors of bf16) per lane per block.
ROWS_BLOCK_V, ROWS_WARPS, ROWS_MAX_REGISTERS = 8192, 16, 128
# _mm_f32_kernel tiles (H100-friendly: 128x128x64, 3-stage cp.async pipeline).
MM_TILE = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
# When a launch is planned for meta tensors (compile tests): an H100 / H200.
DEFAULT_L2_BYTES, DEFAULT_SMS = 50 * 2**20, 132


def _check_device(t: torch.Tensor) -> None:
    if not (t.is_cuda or _INTERPRET):
        raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU); use impl='torch'")


@functools.cache
def _l2_and_sms(device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return DEFAULT_L2_BYTES, DEFAULT_SMS
    p = torch.cuda.get_device_properties(device)
    return p.L2_cache_size, p.multi_processor_count


def rows_programs(c: int, row_bytes: int, device: torch.device) -> int:
    """Persistent grid of the rows kernel: rows in flight <= half of L2, at most 4 per SM, at most c."""
    if _INTERPRET:
        return max(1, min(c, 3))  # several rows per program, so the persistent loop is exercised
    l2, sms = _l2_and_sms(device)
    return max(1, min(c, (l2 // 2) // row_bytes, 4 * sms))


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
    # The driver pads its buffer's rows to a multiple of 16 elements; the kernel reads and overwrites that
    # padding (scratch), so rows stay 16-byte vectors for any V.  Any other stride: exactly V columns.
    v_pad = logits.stride(0) if 0 <= logits.stride(0) - V < 16 else V
    block_v = 64 if _INTERPRET else min(ROWS_BLOCK_V, triton.next_power_of_2(v_pad))
    args = (
        logits,
        logits.stride(0),
        loss_out if bias is None else bias,
        labels,
        loss_out,
        loss_out if row_scale is None else row_scale,
        C,
        opts.ignore_index,
        opts.label_smoothing,
        opts.z_loss,
        1.0 if opts.softcap is None else opts.softcap,
    )
    kwargs = dict(
        V=V,
        V_PAD=v_pad,
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=opts.softcap is not None,
        HAS_SCALE=row_scale is not None,
        WRITE_GRAD=write_grad,
        BLOCK_V=block_v,
        num_warps=1 if _INTERPRET else max(4, min(ROWS_WARPS, block_v // 512)),
        # The whole register file of an SM for one program of 512 threads: the grid has no more programs
        # than SMs at large V, so ptxas should not trade spills for a second resident program.
        maxnreg=ROWS_MAX_REGISTERS,
    )
    grid = (rows_programs(C, logits.stride(0) * logits.element_size(), logits.device),)
    return Launch(_rows_kernel, grid, args, kwargs)


def rows_triton(logits, bias, labels, loss_out, opts, row_scale, write_grad) -> None:
    _check_device(logits)
    if logits.shape[0] == 0:
        return
    bias = None if bias is None else bias.contiguous()
    row_scale = None if row_scale is None else row_scale.contiguous()
    rows_launch(logits, bias, labels.contiguous(), loss_out, opts, row_scale, write_grad)()


def mm_launch(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> Launch:
    """The `_mm_f32_kernel` launch for out[M, N] (fp32) (+)= a[M, K] @ b[K, N]."""
    M, K = a.shape
    N = b.shape[1]
    tile = dict(MM_TILE)
    if _INTERPRET:
        tile.update(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=1, num_stages=1)
    grid = (triton.cdiv(M, tile["BLOCK_M"]) * triton.cdiv(N, tile["BLOCK_N"]),)
    at = a.T  # the kernel reads a as its transpose [K, M]
    args = (at, b, out, M, N, K, *at.stride(), *b.stride(), *out.stride())
    return Launch(
        _mm_f32_kernel, grid, args, dict(ACCUMULATE=accumulate, K_HOST=K if _INTERPRET else 0, **tile)
    )


def matmul_f32_triton(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """long_ce_ref.matmul_f32_torch's contract: cuBLAS where it has fp32 output, else `_mm_f32_kernel`."""
    if a.dtype == torch.float32 or fp32_out_matmul_supported(out.device):
        matmul_f32_torch(a, b, out, accumulate)
        return
    _check_device(out)
    if a.shape[0] == 0 or b.shape[1] == 0:
        return
    if a.shape[1] == 0:
        if not accumulate:
            out.zero_()
        return
    mm_launch(a, b, out, accumulate)()


TRITON_STEPS = Steps(rows=rows_triton, matmul_f32=matmul_f32_triton)

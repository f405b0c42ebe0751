"""Triton kernels of the exact low-memory long-ce (`recompute=True`); the driver, the autograd.Function and
the PyTorch twin of these two passes are in kernels/long_ce_recompute_chunked.py.

Both kernels run over one logits block z [r, c] (vocabulary columns v0 .. v0 + c), one program per row,
reading the row once (memory-bound: 2 bytes per logit in the forward, 4 in the backward, against 2 H FLOPs
per logit in each GEMM around them, so ~1-3% of the GEMM time at H = 3584 by arithmetic):

    _stats_kernel  the forward: folds the block into the row's running (max m, sum s) online, adds z[label]
                   and (smoothing) sum z; the program owns the row's [N]-vector entries, no atomics
    _grad_kernel   the backward: overwrites z with g = scale * d loss / d z in fp32, one rounding on the store

The block width C is a constexpr (two values per run: the chunk's and the vocabulary's last): it bounds the
column loop (Triton 3.6's interpreter cannot iterate to a runtime integer), and with C a multiple of 16 the
masked loads and stores are still 16-byte vectors.  Logits are loaded by the speed mode's `_load_z`.
Offsets are int64 (row * stride passes 2^31 for large blocks).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .launch import Launch
from .long_ce import _INTERPRET, _check_device, _load_z, matmul_f32_triton
from .long_ce_recompute_chunked import RecomputeSteps
from .long_ce_ref import LongCEOptions


@triton.jit
def _block_label(labels_ptr, row, v0, C: tl.constexpr):
    """The row's label as a column of this block, or -1: never a padding lane (those hold -inf)."""
    label = tl.load(labels_ptr + row).to(tl.int64) - v0
    return tl.where((label >= 0) & (label < C), label, -1)


@triton.jit
def _stats_kernel(
    z_ptr,  # [r, C] logits block, input dtype (read only)
    stride_z,
    bias_ptr,  # [C] (the block's columns) or dummy
    labels_ptr,  # [r] int64
    m_ptr,  # [r] fp32 running max, in/out
    s_ptr,  # [r] fp32 running sum of exp(z - m), in/out
    zy_ptr,  # [r] fp32 running z[label], in/out
    zsum_ptr,  # [r] fp32 running sum of z (SMOOTH) or dummy
    v0,
    softcap,
    C: tl.constexpr,  # the block's width (two values per run: the chunk and the vocabulary's last)
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    SMOOTH: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = z_ptr + row * stride_z
    label = _block_label(labels_ptr, row, v0, C)
    m = tl.load(m_ptr + row)
    s = tl.load(s_ptr + row)
    z_y = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
    z_sum = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
    for start in range(0, C, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z, _ = _load_z(row_ptr, bias_ptr, cols, softcap, C, C, HAS_BIAS, HAS_SOFTCAP)  # -inf past C
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)  # m = -inf at first: 0 * 0
        m = m_new
        z_sum += tl.sum(tl.where(cols < C, z, 0.0), axis=0)
        z_y += tl.sum(tl.where(cols == label, z, 0.0), axis=0)
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(zy_ptr + row, tl.load(zy_ptr + row) + z_y)
    if SMOOTH:
        tl.store(zsum_ptr + row, tl.load(zsum_ptr + row) + z_sum)


@triton.jit
def _grad_kernel(
    z_ptr,  # [r, C] logits block, input dtype; overwritten with g
    stride_z,
    bias_ptr,  # [C] or dummy
    labels_ptr,  # [r] int64
    m_ptr,  # [r] fp32 row max (forward)
    logs_ptr,  # [r] fp32 log sum exp(z - m) (forward)
    scale_ptr,  # [r] fp32 grad_output (/ count), 0 on ignored rows
    v0,
    eps_over_v,  # label_smoothing / V (the whole vocabulary's V, not C)
    label_smoothing,
    z_loss,
    softcap,
    C: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = z_ptr + row * stride_z
    label = _block_label(labels_ptr, row, v0, C)
    m = tl.load(m_ptr + row)
    log_s = tl.load(logs_ptr + row)
    scale = tl.load(scale_ptr + row)
    coef = 1.0 + 2.0 * z_loss * (m + log_s)
    for start in range(0, C, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z, t = _load_z(row_ptr, bias_ptr, cols, softcap, C, C, HAS_BIAS, HAS_SOFTCAP)
        g = tl.exp((z - m) - log_s) * coef - eps_over_v  # p formed around m, as in the forward
        g = tl.where(cols == label, g - (1.0 - label_smoothing), g)
        if HAS_SOFTCAP:
            g = g * (1.0 - t * t)
        tl.store(row_ptr + cols, (g * scale).to(z_ptr.dtype.element_ty), mask=cols < C)


def _blocking(c: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a block of c columns: one or a few 16-byte vectors per lane."""
    if _INTERPRET:  # small blocks exercise the column loop and its ragged end
        return 32, 1
    block_v = min(2048, triton.next_power_of_2(c))
    return block_v, 4 if block_v >= 1024 else 2


def stats_launch(z, bias, labels, v0: int, m, s, z_y, z_sum, opts: LongCEOptions) -> Launch:
    """The `_stats_kernel` launch for one block (tests compile exactly this; see kernels/launch.py)."""
    r, c = z.shape
    assert z.stride(1) == 1 and all(t.is_contiguous() for t in (labels, m, s, z_y))
    block_v, warps = _blocking(c)
    args = (
        z,
        z.stride(0),
        m if bias is None else bias,
        labels,
        m,
        s,
        z_y,
        m if z_sum is None else z_sum,
        v0,
        1.0 if opts.softcap is None else opts.softcap,
    )
    kwargs = dict(
        C=c,
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=opts.softcap is not None,
        SMOOTH=z_sum is not None,
        BLOCK_V=block_v,
        num_warps=warps,
    )
    return Launch(_stats_kernel, (r,), args, kwargs)


def grad_launch(z, bias, labels, v0: int, v: int, m, log_s, scale, opts: LongCEOptions) -> Launch:
    """The `_grad_kernel` launch for one block."""
    r, c = z.shape
    assert z.stride(1) == 1 and all(t.is_contiguous() for t in (labels, m, log_s, scale))
    block_v, warps = _blocking(c)
    args = (
        z,
        z.stride(0),
        m if bias is None else bias,
        labels,
        m,
        log_s,
        scale,
        v0,
        opts.label_smoothing / v,
        opts.label_smoothing,
        opts.z_loss,
        1.0 if opts.softcap is None else opts.softcap,
    )
    kwargs = dict(
        C=c,
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=opts.softcap is not None,
        BLOCK_V=block_v,
        num_warps=warps,
    )
    return Launch(_grad_kernel, (r,), args, kwargs)


def stats_triton(z, bias, labels, v0, m, s, z_y, z_sum, opts) -> None:
    _check_device(z)
    if z.shape[0]:
        stats_launch(z, bias, labels, v0, m, s, z_y, z_sum, opts)()


def grad_triton(z, bias, labels, v0, v, m, log_s, scale, opts) -> None:
    _check_device(z)
    if z.shape[0]:
        grad_launch(z, bias, labels, v0, v, m, log_s, scale, opts)()


TRITON_RECOMPUTE_STEPS = RecomputeSteps(
    stats=stats_triton, grad=grad_triton, matmul_f32=matmul_f32_triton, scratch_per_elem=0, upcasts=False
)

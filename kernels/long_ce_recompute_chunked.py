"""Exact low-memory long-ce (`linear_cross_entropy(..., recompute=True)`): driver, autograd.Function and the
PyTorch twin of its two elementwise passes (the Triton kernels are kernels/long_ce_recompute.py).

The forward keeps per-row statistics only; the backward recomputes the logits block by block.  Blocks are
[r, c]: the vocabulary is walked in chunks of c columns (outer loop), the rows in blocks of r (inner loop).

    forward, per block                                                   2 N H V FLOPs in all
        z = x_r @ W_c^T          [r, c]  GEMM in the input dtype (fp32 accumulation inside cuBLAS / oneDNN)
        stats(z)                         online max m and sum s = sum exp(z - m), z[label], sum z: [N] fp32
      loss = lse - (1 - eps) z_y - eps mean(z) + zl lse^2, lse = m + log s; m and log s are saved
    backward, per block                                                  6 N H V: recompute, dW, dX
        z = x_r @ W_c^T          [r, c]  recomputed (same GEMM as the forward, so bitwise the same z)
        grad(z)                          in place: g = scale_i * d loss_i / d z, fp32 math, one rounding
        dW_c (+)= g^T @ x_r      [c, H]  r = N: one GEMM writes dW_c in the weight dtype (one rounding);
                                         r < N: an fp32 [c, H] accumulator, rounded once per chunk
        dX_r += g @ W_c          [r, H]  fp32 accumulator (the speed mode's matmul_f32: cuBLAS 16-bit
                                         x 16-bit -> fp32 with beta = 1, or its fallbacks)
        db_c += g.sum(0)         [c]     fp32
      dX is rounded once at the end, in place in the accumulator's storage (_DxAccumulator).

scale_i = grad_output (x 1 / count for "mean", per row for "none") is folded into g before its rounding, as
PyTorch's own 16-bit backward does (so fp16 gradients below ~6e-8 underflow, as in PyTorch; bf16 has fp32's
range).  Every output tile has one owner and no atomics are used: two runs are bitwise equal.

Memory beyond the inputs (16-bit, need dX and dW): dW (V H, the weight dtype) + the fp32 dX accumulator
(4 N H = dX + 2 N H) + the block buffers (`chunk_bytes`, see default_chunk_bytes) + [N]-sized vectors.
The default budget is 256 MiB - 2 N H - 8 MiB on CUDA (floor 16 MiB), so extra <= dX + dW + 256 MiB:
  Qwen2-7B  N=28,672 H=3584 V=152,064 bf16: dX 196 MiB, dW 1,039 MiB, fp32 dX 392 MiB, blocks <= 52 MiB
  GLM-4-9B  N=28,672 H=4096 V=151,552 bf16: dX 224 MiB, dW 1,184 MiB, fp32 dX 448 MiB, blocks <= 24 MiB
(tests/kernels/test_long_ce_recompute.py::test_plan_fits_the_goal_at_both_shapes checks this arithmetic;
plan_blocks picks the block shapes).  Past N H = 116 Mi (2 N H > 232 MiB) the 16 MiB floor applies and extra
is dX + dW + 2 N H + 16 MiB: over the goal, which this design cannot meet there.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .long_ce_ref import UPCAST_BLOCK_BYTES, LongCEOptions, fp32_out_matmul_supported, matmul_f32_torch

MiB = 2**20
# Cost of one block's ~4 kernel launches in plan_blocks, as bytes of HBM traffic (~10 us at ~3 TB/s).
_BLOCK_OVERHEAD_BYTES = 32 * MiB


@dataclass(frozen=True)
class RecomputeSteps:
    """The passes of one implementation (contracts: stats_torch, grad_torch, long_ce_ref.matmul_f32_torch)."""

    stats: Callable[..., None]
    grad: Callable[..., None]
    matmul_f32: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], None]  # the speed mode's
    scratch_per_elem: int  # bytes of temporaries per block element beyond the block (the twin's fp32 copies)
    upcasts: bool  # its matmul_f32 makes fp32 operand copies (<= UPCAST_BLOCK_BYTES) without fp32-out GEMMs


# ----------------------------------------------------------------------------- the PyTorch twin


def _logits_fp32(z: torch.Tensor, bias: torch.Tensor | None, opts: LongCEOptions):
    """fp32 logits of a block (+ bias, softcapped) and t = tanh(z / softcap) (None without softcap).
    z is scratch: an fp32 block is worked on in place."""
    zf = z.float()
    if bias is not None:
        zf.add_(bias.float())
    if opts.softcap is None:
        return zf, None
    t = zf.div_(opts.softcap).tanh_()
    return t * opts.softcap, t


def _label_columns(labels: torch.Tensor, v0: int, c: int):
    """Column of each row's label inside the block (clamped) and whether the block holds it."""
    local = labels - v0
    hit = (local >= 0) & (local < c)
    return local.clamp(0, c - 1)[:, None], hit


def stats_torch(z, bias, labels, v0: int, m, s, z_y, z_sum, opts: LongCEOptions) -> None:
    """Fold a logits block z [r, c] (columns v0 .. v0 + c) into the running per-row statistics, in place:
    m = max z, s = sum exp(z - m) (rescaled when m grows), z_y += z[label], z_sum += sum z (smoothing only).
    z is scratch (overwritten)."""
    zf, _ = _logits_fp32(z, bias, opts)
    col, hit = _label_columns(labels, v0, z.shape[1])
    z_y.add_(torch.where(hit, zf.gather(1, col).squeeze(1), 0.0))
    if z_sum is not None:
        z_sum.add_(zf.sum(1))
    m_new = torch.maximum(m, zf.amax(1))
    s.mul_(torch.exp(m - m_new)).add_(zf.sub_(m_new[:, None]).exp_().sum(1))
    m.copy_(m_new)


def grad_torch(z, bias, labels, v0: int, v: int, m, log_s, scale, opts: LongCEOptions) -> None:
    """Overwrite a logits block z [r, c] with g = scale_i * d loss_i / d z_ij,

        g = scale * [p (1 + 2 zl lse) - eps / V - (1 - eps) 1{j = y}] * (1 - t^2),  p = exp((z - m) - log s)

    in fp32, rounded once to z's dtype: the true-class term meets the fp32 probability before the rounding
    (p_y - 1 survives on confident rows), and p is formed around m (lse = m + log s would round to ulp(m))."""
    zc, t = _logits_fp32(z, bias, opts)
    g = zc.sub_(m[:, None]).sub_(log_s[:, None]).exp_()
    eps = opts.label_smoothing
    if opts.z_loss:
        g.mul_((1.0 + 2.0 * opts.z_loss * (m + log_s))[:, None])
    if eps:
        g.sub_(eps / v)
    col, hit = _label_columns(labels, v0, z.shape[1])
    g.scatter_add_(1, col, torch.where(hit, eps - 1.0, 0.0)[:, None])
    if t is not None:
        g.mul_(t.square_().neg_().add_(1.0))
    g.mul_(scale[:, None])
    if g.data_ptr() != z.data_ptr():
        z.copy_(g)  # the one rounding


TORCH_RECOMPUTE_STEPS = RecomputeSteps(
    stats=stats_torch, grad=grad_torch, matmul_f32=matmul_f32_torch, scratch_per_elem=12, upcasts=True
)


# ----------------------------------------------------------------------------- planning and accumulation


def default_chunk_bytes(n: int, h: int, itemsize: int, device_type: str, need_dx: bool) -> int:
    """Budget of the block buffers.  The goal is extra <= dX + dW + 256 MiB on CUDA (96 MiB on CPU); the fp32
    dX accumulator holds 2 N H bytes more than a 16-bit dX; 8 MiB are left for [N] vectors and rounding."""
    total = (256 if device_type == "cuda" else 96) * MiB
    excess = n * h * (4 - itemsize) if need_dx else 0
    return max(16 * MiB, total - excess - 8 * MiB)


@functools.lru_cache(maxsize=256)
def plan_blocks(
    n: int,
    h: int,
    v: int,
    budget: int,
    *,
    block_elem: int,
    acc_w: bool,
    need_dx: bool,
    need_dw: bool,
) -> tuple[int, int]:
    """(rows r, columns c) of the logits block: least fp32-accumulator traffic with buffers within budget.

    Buffers: the block with its scratch (r c block_elem) and, with r < N and a 16-bit weight (acc_w), the
    fp32 [c, H] dW accumulator.  Traffic (a heuristic): the fp32 dX accumulator is read and written once
    per vocabulary chunk (8 N H bytes), the dW accumulator once per row block (8 V H, only when r < N),
    plus a fixed cost per block for its kernel launches.  r = N needs no dW accumulator: preferred when it
    fits.
    """
    best = None
    for c in sorted({v, *range(128, v, 128), *(2**i for i in range(7) if 2**i < v)}):
        for multi in (False, True):
            per_row = c * block_elem
            fixed = 4 * c * h * (acc_w and need_dw and multi)
            r = n if not multi else min(n - 1, (budget - fixed) // per_row)
            if r < 1 or fixed + r * per_row > budget:
                continue
            if multi and r >= 256:
                r -= r % 128  # GEMM tile multiple
            blocks = math.ceil(n / r) * math.ceil(v / c)
            cost = blocks * _BLOCK_OVERHEAD_BYTES + need_dx * 8 * n * h * math.ceil(v / c)
            cost += (need_dw and multi) * 8 * v * h * math.ceil(n / r)
            if best is None or (cost, -r * c) < best[0]:
                best = ((cost, -r * c), (r, c))
            if not multi:
                break  # r = N fits: a multi-block plan with this c has no advantage
    return best[1] if best is not None else (1, 1)


class _DxAccumulator:
    """fp32 dX accumulator [N, H].  For a 16-bit dX it is two row halves: the first half's storage
    (ceil(N/2) H 4 >= N H 2 bytes) becomes the returned 16-bit dX, rounded in place, so the gradient handed
    to autograd owns N H 2 bytes and no third dX-sized buffer ever exists."""

    def __init__(self, n: int, h: int, dtype: torch.dtype, device: torch.device) -> None:
        self.n, self.h, self.dtype = n, h, dtype
        self.split = n if dtype == torch.float32 else (n + 1) // 2
        self.parts = [
            torch.zeros(k, h, dtype=torch.float32, device=device) for k in (self.split, n - self.split)
        ]

    def addmm_(self, s: int, e: int, g: torch.Tensor, w: torch.Tensor, matmul_f32) -> None:
        """rows [s, e) += g @ w (g [e - s, c], w [c, H] in the input dtype) with fp32 accumulation."""
        for part, lo in zip(self.parts, (0, self.split)):
            a, b = max(s, lo), min(e, lo + part.shape[0])
            if a < b:
                matmul_f32(g[a - s : b - s], w, part[a - lo : b - lo], True)

    def finish(self) -> torch.Tensor:
        top, bot = self.parts
        self.parts = []
        if self.dtype == torch.float32:
            return top
        n, h, split = self.n, self.h, self.split
        out = top.view(-1).view(self.dtype)[: n * h].view(n, h)
        # out's row i lies over top's fp32 rows [i/2, (i+1)/2).  Rounding rows [s, e) in place is safe once
        # rows < s are done and e <= 2s: it reads top rows [s, e) and writes over rows [s/2, e/2), both done.
        k = min(split, max(1, MiB // (4 * h)))
        first = top[:k].to(self.dtype)  # rows [0, k) overlap their own destination: through a copy
        s = k
        while s < split:
            e = min(split, 2 * s)
            out[s:e].copy_(top[s:e])
            s = e
        out[:k].copy_(first)
        out[split:].copy_(bot)  # lies over top rows [split/2, N/2), all done
        return out


def _blocks(n: int, v: int, plan: tuple[int, int]):
    r, c = plan
    for v0 in range(0, v, c):
        yield v0, min(v, v0 + c), [(s, min(n, s + r)) for s in range(0, n, r)]


def _gemm_ready(t: torch.Tensor) -> torch.Tensor:
    # cuBLAS clones an operand with no unit stride at every call: copy it once instead.
    return t if 1 in t.stride() else t.contiguous()


# ----------------------------------------------------------------------------- the two passes


def forward_pass(hidden, weight, bias, labels, opts: LongCEOptions, steps: RecomputeSteps, plan):
    """Per-row loss [N] and the statistics the backward needs, m and log s ([N] fp32 each)."""
    n, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    m = torch.full((n,), float("-inf"), dtype=torch.float32, device=dev)
    s, z_y = (torch.zeros(n, dtype=torch.float32, device=dev) for _ in range(2))
    z_sum = torch.zeros(n, dtype=torch.float32, device=dev) if opts.label_smoothing else None
    buf = torch.empty(min(n, plan[0]) * min(v, plan[1]), dtype=hidden.dtype, device=dev)
    for v0, v1, rows in _blocks(n, v, plan):
        w, b = weight[v0:v1], None if bias is None else bias[v0:v1]
        for r0, r1 in rows:
            z = buf[: (r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0)
            torch.mm(hidden[r0:r1], w.T, out=z)
            zs = None if z_sum is None else z_sum[r0:r1]
            steps.stats(z, b, labels[r0:r1], v0, m[r0:r1], s[r0:r1], z_y[r0:r1], zs, opts)
    log_s = s.log_()
    # Formed around m (as the speed path's rows kernel): lse - z_y = (m - z_y) + log s keeps 1 - p_y.
    eps = opts.label_smoothing
    loss = (1.0 - eps) * ((m - z_y) + log_s)
    if eps:
        loss += eps * ((m - z_sum / v) + log_s)
    if opts.z_loss:
        loss += opts.z_loss * (m + log_s).square()
    valid = labels != opts.ignore_index
    loss = torch.where(valid, loss, 0.0)
    # Out-of-range labels (only with check_labels=False) poison the loss instead of crashing.
    loss = torch.where(valid & ((labels < 0) | (labels >= v)), float("nan"), loss)
    return loss, m, log_s


def backward_pass(hidden, weight, bias, labels, m, log_s, scale, opts, steps, plan, needs):
    """dX (hidden's dtype), dW (weight's dtype), db (bias's dtype) of sum_i scale_i loss_i, or None each."""
    need_dx, need_dw, need_db = needs
    n, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    multi = plan[0] < n
    dx = _DxAccumulator(n, h, hidden.dtype, dev) if need_dx else None
    dw = torch.empty(v, h, dtype=weight.dtype, device=dev) if need_dw else None
    dw_acc = None
    if need_dw and multi and weight.dtype != torch.float32:
        dw_acc = torch.empty(min(v, plan[1]), h, dtype=torch.float32, device=dev)
    db = torch.zeros(v, dtype=torch.float32, device=dev) if need_db else None
    buf = torch.empty(min(n, plan[0]) * min(v, plan[1]), dtype=hidden.dtype, device=dev)
    acc = None
    for v0, v1, rows in _blocks(n, v, plan):
        w, b = weight[v0:v1], None if bias is None else bias[v0:v1]
        if need_dw and multi:  # fp32: dW is its own accumulator
            acc = dw[v0:v1] if dw_acc is None else dw_acc[: v1 - v0]
        for r0, r1 in rows:
            x = hidden[r0:r1]
            g = buf[: (r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0)
            torch.mm(x, w.T, out=g)
            steps.grad(g, b, labels[r0:r1], v0, v, m[r0:r1], log_s[r0:r1], scale[r0:r1], opts)
            if need_dw and not multi:
                torch.mm(g.T, x, out=dw[v0:v1])  # the whole of dW_c in one GEMM: one rounding
            elif need_dw:
                steps.matmul_f32(g.T, x, acc, r0 > 0)  # the first row block writes, the others add
            if need_dx:
                dx.addmm_(r0, r1, g, w, steps.matmul_f32)
            if need_db:
                db[v0:v1] += g.sum(0, dtype=torch.float32)
        if dw_acc is not None:
            dw[v0:v1].copy_(acc)  # one rounding per dW tile
    del buf, dw_acc, acc  # before dX is rounded: the peak stays dW + fp32 dX + the blocks
    return (
        None if dx is None else dx.finish(),
        dw,
        None if db is None else db.to(bias.dtype),
    )


def make_plan(hidden, weight, opts: LongCEOptions, steps: RecomputeSteps, needs) -> tuple[int, int]:
    need_dx, need_dw, _ = needs
    (n, h), sixteen = hidden.shape, hidden.dtype != torch.float32
    budget = opts.chunk_bytes
    if budget is None:
        budget = default_chunk_bytes(n, h, hidden.element_size(), hidden.device.type, need_dx)
    if sixteen and steps.upcasts and not fp32_out_matmul_supported(hidden.device):
        budget = max(budget // 2, budget - UPCAST_BLOCK_BYTES)  # matmul_f32's fp32 operand copies
    return plan_blocks(
        n,
        h,
        weight.shape[0],
        budget,
        block_elem=hidden.element_size() + steps.scratch_per_elem,
        acc_w=sixteen,
        need_dx=need_dx,
        need_dw=need_dw,
    )


class RecomputeLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts: LongCEOptions, steps: RecomputeSteps, grad_enabled):
        # needs_input_grad stays True under torch.no_grad(), hence the caller's grad_enabled.
        needs = (
            grad_enabled and ctx.needs_input_grad[0],
            grad_enabled and ctx.needs_input_grad[1],
            grad_enabled and bias is not None and ctx.needs_input_grad[2],
        )
        labels = labels.contiguous()
        bias_c = None if bias is None else bias.contiguous()
        x = _gemm_ready(hidden)
        plan = make_plan(x, weight, opts, steps, needs)
        loss_rows, m, log_s = forward_pass(x, weight, bias_c, labels, opts, steps, plan)
        loss, count = loss_rows, None
        if opts.reduction != "none":
            loss = loss_rows.sum()
        if opts.reduction == "mean":  # the host count when known, else counted on the device: no sync
            n_valid = opts.num_valid
            count = (labels != opts.ignore_index).sum().float() if n_valid is None else float(n_valid)
            loss = loss / count
        if any(needs):
            # The inputs are saved as given (a non-contiguous hidden is copied again in the backward rather
            # than held in between); the plan is reused so the recomputed z is the forward's, bit for bit.
            ctx.save_for_backward(hidden, weight, bias, labels, m, log_s)
            ctx.opts, ctx.steps, ctx.plan, ctx.needs, ctx.count = opts, steps, plan, needs, count
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, labels, m, log_s = ctx.saved_tensors
        opts, count = ctx.opts, ctx.count
        scale = grad_out.float().expand(labels.shape[0])  # "none": already per row
        if count is not None:  # no counted token: loss NaN, gradients 0 (as PyTorch)
            scale = scale / (max(count, 1.0) if isinstance(count, float) else count.clamp(min=1.0))
        scale = torch.where(labels != opts.ignore_index, scale, 0.0)  # no host sync anywhere
        bias_c = None if bias is None else bias.contiguous()
        dx, dw, db = backward_pass(
            _gemm_ready(hidden), weight, bias_c, labels, m, log_s, scale, opts, ctx.steps, ctx.plan, ctx.needs
        )
        return dx, dw, db, None, None, None, None

"""PyTorch twin of the fused linear + cross-entropy ("long-ce").

Two per-chunk steps, each the plain-PyTorch counterpart of a step of the Triton path in `kernels/long_ce.py`:

* `rows_torch`: logits chunk [C, V] -> per-row loss, and (optionally) d loss / d logits written back
  into the same buffer (so the chunk buffer is the only N x V-shaped memory that ever exists);
* `matmul_f32_torch`: out[M, N] (fp32) = or += a[M, K] @ b[K, N] with 16-bit or fp32 operands and fp32
  accumulation, no fp32 copy of a whole operand (dW_acc += dlogits^T @ x and dX_c = dlogits @ W).

The chunked driver that strings them together (shared with the Triton path, so the twin really is
chunked, compacted and accumulated the same way) lives in `kernels/long_ce_chunked.py`.
`naive_linear_cross_entropy` is the exact unchunked definition, used as the fp64 oracle in tests and as
the "torch" provider in benchmarks.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

REDUCTIONS = ("sum", "mean", "none")


@dataclass(frozen=True)
class LongCEOptions:
    """Non-tensor options of one call (travel as one object through autograd, like CCE's CCEParams)."""

    ignore_index: int = -100
    reduction: str = "sum"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    # Rows per chunk: exactly chunk_rows, or as many as fit in chunk_bytes, or None for the default
    # (long_ce_chunked.plan_chunk_rows); at most one of the two is set.
    chunk_rows: int | None = None
    chunk_bytes: int | None = None
    # Number of labels != ignore_index when the caller knows it on the host (None: unknown).
    num_valid: int | None = None

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        if self.z_loss < 0.0:
            raise ValueError(f"z_loss must be >= 0, got {self.z_loss}")
        if self.softcap is not None and not self.softcap > 0.0:
            raise ValueError(f"softcap must be > 0 or None, got {self.softcap}")
        if self.chunk_rows is not None and self.chunk_bytes is not None:
            raise ValueError("give chunk_rows or chunk_bytes, not both")
        for key in ("chunk_rows", "chunk_bytes"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.num_valid is not None and self.num_valid < 0:
            raise ValueError(f"num_valid must be >= 0, got {self.num_valid}")


def naive_linear_cross_entropy(
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
    upcast: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The definition, with the full [N, V] logits (the exact equivalent quoted in the public docstring)."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits.to(upcast)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(
        logits, labels, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(logits, -1).square() * (labels != ignore_index)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (labels != ignore_index).sum()


def rows_torch(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    loss_out: torch.Tensor,
    opts: LongCEOptions,
    row_scale: torch.Tensor | None,
    write_grad: bool,
) -> None:
    """Per-row loss of a logits chunk [C, V]; with write_grad, d(sum of loss * row_scale)/d logits in place.

    All math is fp32 (the chunk is upcast once; an fp32 chunk is worked on in place); the true-class term
    -(1 - eps) is subtracted from the fp32 probability before the single rounding to the buffer dtype (a
    bf16 read-modify-write would lose it on confident rows, where p_y ~ 1).  Built on ATen's fused,
    row-wise log_softmax, which reads each row once from cache: ~3x cheaper on CPU than logsumexp.
    """
    C, V = logits.shape
    z = logits.float()  # [C, V] fp32; aliases `logits` when the chunk is already fp32
    if bias is not None:
        z.add_(bias.float())  # in place either way: z is the chunk buffer (fp32) or its fp32 copy
    t = None
    if opts.softcap is not None:
        t = torch.tanh(z / opts.softcap)  # [C, V], kept for the derivative 1 - t^2
        z = t * opts.softcap
    valid = labels != opts.ignore_index
    in_range = (labels >= 0) & (labels < V)
    safe = torch.where(in_range, labels, 0)[:, None]  # [C, 1]
    eps = opts.label_smoothing
    z_y = z.gather(1, safe).squeeze(1)  # [C]
    z_sum = z.sum(-1) if eps else None
    if z.is_cuda:  # aliasing in/out is not a documented guarantee of the CUDA kernel
        ls = torch.log_softmax(z, -1)
    else:  # CPU: row-wise kernel, in place of z (tested against the out-of-place result)
        ls = torch.ops.aten._log_softmax.out(z, -1, False, out=z)  # log p
    ls_y = ls.gather(1, safe).squeeze(1)
    lse = z_y - ls_y  # log-sum-exp, exact from any one column
    loss = -(1.0 - eps) * ls_y
    if eps:  # -(eps / V) sum_j log p_j = eps * (lse - mean_j z_j)
        loss = loss + eps * (lse - z_sum / V)
    if opts.z_loss:
        loss = loss + opts.z_loss * lse.square()
    loss = torch.where(valid, loss, 0.0)
    # Out-of-range labels (only reachable with check_labels=False) poison the loss instead of crashing.
    loss = torch.where(valid & ~in_range, float("nan"), loss)
    loss_out.copy_(loss)
    if not write_grad:
        return
    g = ls.exp_()  # p = softmax(z), in place
    if opts.z_loss:  # d(zl * lse^2)/dz_j = 2 zl lse p_j
        g.mul_((1.0 + 2.0 * opts.z_loss * lse)[:, None])
    if eps:
        g.sub_(eps / V)
    g.scatter_add_(1, safe, torch.where(in_range, eps - 1.0, 0.0)[:, None])
    if t is not None:
        g.mul_(1.0 - t.square())
    if row_scale is not None:
        g.mul_(torch.where(valid, row_scale.float(), 0.0)[:, None])
    elif g.is_cuda:
        g.mul_(valid.float()[:, None])  # no data-dependent branch: no host sync
    elif not bool(valid.all()):  # CPU: the check is free; zero only the ignored rows
        g[~valid] = 0.0
    if g.data_ptr() != logits.data_ptr():
        logits.copy_(g)  # the one rounding to the buffer dtype


@functools.cache
def fp32_out_matmul_supported(device: torch.device) -> bool:
    """Whether torch.mm / torch.addmm take 16-bit operands with `out_dtype=torch.float32` on this device.

    cuBLAS does (bf16 x bf16 -> fp32 accumulate, beta = 1 into the fp32 output in place: no [V, H]
    temporary); torch >= 2.8 exposes it on CUDA, and torch 2.11 / 2.13 accept an fp32 `self` (the
    accumulator) there.  CPU builds have the operator but no kernel.  Probed once per device, logged.
    """
    if device.type != "cuda":
        return False
    try:
        a = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
        acc = torch.ones(16, 16, dtype=torch.float32, device=device)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        ok = bool(acc[0, 0] == 17.0)  # one host sync, once per device
    except (RuntimeError, TypeError, NotImplementedError) as e:
        log.warning("long-ce: torch %s has no fp32-output addmm on %s (%s)", torch.__version__, device, e)
        return False
    log.info("long-ce: 16-bit GEMMs accumulate into fp32 with torch.addmm(out_dtype=float32) on %s", device)
    return ok


# Upcast block of the CPU fallback below: the fp32 copies of the operand blocks stay under this size.
UPCAST_BLOCK_BYTES = 32 * 2**20


def matmul_f32_torch(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """out[M, N] (fp32) = a @ b, or += a @ b with accumulate; a [M, K], b [K, N] fp32 or 16-bit.

    fp32 operands: torch.mm / addmm into `out`.  16-bit: cuBLAS with fp32 output where the device has it
    (fp32_out_matmul_supported), else the K dimension in blocks upcast to fp32, so no fp32 copy of a whole
    operand exists (a whole fp32 copy of the weight would cost as much as the dW accumulator).
    """
    if a.dtype == torch.float32:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif fp32_out_matmul_supported(out.device):
        if accumulate:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:
        M, K = a.shape
        step = max(1, UPCAST_BLOCK_BYTES // (4 * (M + b.shape[1])))
        for k0 in range(0, K, step):
            a_k, b_k = a[:, k0 : k0 + step].float(), b[k0 : k0 + step].float()
            if accumulate or k0 > 0:
                out.addmm_(a_k, b_k)
            else:
                torch.mm(a_k, b_k, out=out)

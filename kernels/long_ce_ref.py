"""PyTorch twin of the fused linear + cross-entropy ("long-ce").

Two per-chunk steps, each the plain-PyTorch counterpart of a Triton kernel in `kernels/long_ce.py`:

* `rows_torch`: logits chunk [C, V] -> per-row loss, and (optionally) d loss / d logits written back
  into the same buffer (so the chunk buffer is the only N x V-shaped memory that ever exists);
* `accumulate_dw_torch`: dW_acc[V, H] (fp32) += dlogits[C, V]^T @ x[C, H].

The chunked driver that strings them together (shared with the Triton path, so the twin really is
chunked the same way) lives in `kernels/long_ce_chunked.py`.  `naive_linear_cross_entropy` is the exact
unchunked definition, used as the fp64 oracle in tests and as the "torch" provider in benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

REDUCTIONS = ("sum", "mean", "none")


@dataclass(frozen=True)
class LongCEOptions:
    """Non-tensor options of one call (travel as one object through autograd, like CCE's CCEParams)."""

    ignore_index: int = -100
    reduction: str = "sum"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    # Rows per chunk are chosen so that one [C, V] chunk buffer holds at most this many bytes.
    chunk_bytes: int = 32 * 2**20

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        if self.z_loss < 0.0:
            raise ValueError(f"z_loss must be >= 0, got {self.z_loss}")
        if self.softcap is not None and not self.softcap > 0.0:
            raise ValueError(f"softcap must be > 0 or None, got {self.softcap}")
        if self.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {self.chunk_bytes}")


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


def accumulate_dw_torch(dw_acc: torch.Tensor, grad: torch.Tensor, x: torch.Tensor) -> None:
    """dw_acc[V, H] (fp32) += grad[C, V]^T @ x[C, H], accumulated in fp32."""
    dw_acc.addmm_(grad.T.float(), x.float())  # .float() of an fp32 tensor is the tensor itself: no copy

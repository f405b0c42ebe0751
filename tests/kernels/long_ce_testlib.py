"""Shared cases for the long-ce tests: inputs, the fp64 oracle, and the 'as good as PyTorch' judgement."""

from __future__ import annotations

import torch

from kernels import linear_cross_entropy, naive_linear_cross_entropy

# Absolute slack on top of PyTorch's own error, relative to the size of the reference.
SLACK = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_inputs(
    n: int,
    h: int,
    v: int,
    dtype: torch.dtype,
    *,
    seed: int = 0,
    ignore_frac: float = 0.2,
    peaked: bool = False,
    bias: bool = False,
    ignore_index: int = -100,
):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    labels = torch.randint(0, v, (n,), generator=g)
    drop = torch.rand(n, generator=g) < ignore_frac
    if n >= 2 and ignore_frac < 1.0:
        # The edge classes are always exercised (and never ignored).
        labels[0], labels[-1] = 0, v - 1
        drop[0] = drop[-1] = False
    if peaked:
        # Confident rows: the label's logit leads the runner-up by a margin of 6..14, so 1 - p_y spans
        # ~1e-2 .. 1e-6 (not below: there even fp32 rounds p_y to 1).  Below ~2e-3 (bf16) / ~2.5e-4 (fp16)
        # p_y rounds to 1: a gradient formed as round(p_y) - 1 loses the true-class term (the trap).
        # hidden moves along w_y until the margin holds.
        margin = 6.0 + 8.0 * torch.rand(n, generator=g, dtype=torch.float64)
        w_y = weight[labels]  # [n, h]
        hidden = hidden * 0.5  # small logits elsewhere: their own low-precision rounding stays small
        for _ in range(8):
            z = hidden @ weight.T  # [n, v]
            z_y = z.gather(1, labels[:, None]).squeeze(1)
            runner_up = z.scatter(1, labels[:, None], float("-inf")).max(-1).values
            hidden = hidden + ((margin - (z_y - runner_up)) / w_y.square().sum(-1))[:, None] * w_y
    labels[drop] = ignore_index
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(hidden), cast(weight), labels, cast(b)


def loss_and_grads(fn, hidden, weight, labels, bias, grad_scale, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    if bias is not None:
        leaves.append(bias.detach().clone().requires_grad_())
    loss = fn(leaves[0], leaves[1], labels, bias=leaves[2] if bias is not None else None, **kw)
    if loss.dim() == 0:
        go = torch.tensor(grad_scale, dtype=loss.dtype)
    else:
        go = torch.linspace(-grad_scale, grad_scale, loss.numel(), dtype=loss.dtype)
    grads = torch.autograd.grad(loss, leaves, go)
    return [loss.detach().double()] + [g.double() for g in grads]


def check_against_fp64(
    hidden, weight, labels, bias, *, impl: str, grad_scale: float = 3.0, rowwise: bool = False, **kw
) -> None:
    """ours(dtype) vs fp64 truth, judged against PyTorch's own error in the same dtype.

    rowwise: also judge d_hidden row by row, relative to each row's own size.  On a confident row the whole
    gradient is O(1 - p_y), far below the tensor's max, so only a per-row measure sees the true-class term
    lost by a low-precision read-modify-write (tests/kernels/test_long_ce_ref.py::test_bf16_trap_is_caught).
    """
    dtype = hidden.dtype
    ours_kw = {k: kw.pop(k) for k in ("chunk_rows", "chunk_bytes", "num_valid", "recompute") if k in kw}
    up = lambda t: None if t is None else t.double()
    truth = loss_and_grads(
        naive_linear_cross_entropy,
        up(hidden),
        up(weight),
        labels,
        up(bias),
        grad_scale,
        upcast=torch.float64,
        **kw,
    )
    ours = loss_and_grads(
        linear_cross_entropy, hidden, weight, labels, bias, grad_scale, impl=impl, **ours_kw, **kw
    )
    names = ["loss", "d_hidden", "d_weight", "d_bias"]
    torch_lp = None
    if dtype != torch.float32 or rowwise:
        torch_lp = loss_and_grads(naive_linear_cross_entropy, hidden, weight, labels, bias, grad_scale, **kw)
    if rowwise:
        err, ref = row_error(ours[1], truth[1]), row_error(torch_lp[1], truth[1])
        assert err <= 1.5 * ref + 0.05, f"d_hidden per-row relative error {err:.3g} vs PyTorch's {ref:.3g}"
    if dtype == torch.float32:
        torch_lp = None  # fp32: judged by SLACK alone
    for i, (o, t) in enumerate(zip(ours, truth)):
        assert o.shape == t.shape, names[i]
        finite = torch.isfinite(t)
        assert torch.equal(finite, torch.isfinite(o)), f"{names[i]}: NaN/inf pattern differs"
        o, t = o[finite], t[finite]
        if t.numel() == 0:
            continue
        err = (o - t).abs().max().item()
        bound = SLACK[dtype] * (1.0 + t.abs().max().item())
        if torch_lp is not None:
            bound += (torch_lp[i][finite] - t).abs().max().item()
        assert err <= bound, f"{names[i]}: error {err:.3g} > bound {bound:.3g} ({dtype}, {kw})"


def row_error(o: torch.Tensor, t: torch.Tensor) -> float:
    """Largest per-row relative error ||o_i - t_i|| / ||t_i|| (rows where t_i = 0 must be 0 exactly)."""
    num = (o - t).norm(dim=-1)
    den = t.norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), num * float("inf")).nan_to_num(0.0).max().item()

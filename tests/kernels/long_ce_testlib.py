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
    if peaked:
        # Confident rows: logits of size ~30 whose argmax is the label (p_y ~ 1, the bf16 trap).
        hidden = hidden * 8.0
        labels = (hidden @ weight.T).argmax(-1)
    drop = torch.rand(n, generator=g) < ignore_frac
    labels[drop] = ignore_index
    if n >= 2 and ignore_frac < 1.0:
        # The edge classes are always exercised (after the drop, so they are never ignored).
        labels[0], labels[-1] = 0, v - 1
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


def check_against_fp64(hidden, weight, labels, bias, *, impl: str, grad_scale: float = 3.0, **kw) -> None:
    """ours(dtype) vs fp64 truth, judged against PyTorch's own error in the same dtype."""
    dtype = hidden.dtype
    ours_kw = {"chunk_bytes": kw.pop("chunk_bytes", None)}
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
    if dtype != torch.float32:
        torch_lp = loss_and_grads(naive_linear_cross_entropy, hidden, weight, labels, bias, grad_scale, **kw)
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

"""CUDA-only checks of the speed mode (impl="triton"): the Qwen2-7B shape in bf16 (also for recompute=True,
whose other GPU checks are test_long_ce_recompute_gpu.py), memory, determinism.

bf16 at N = 28,672, H = 3584, V = 152,064 is judged against an fp32 chunked reference (the twin on fp32
copies of the same inputs): our error must be at most PyTorch's own bf16 error (full bf16 logits, then
F.cross_entropy on their fp32 upcast, autograd) times a small factor.  Inputs: N(0, 1) hidden states and
"peaked" LM-like logits (a few confident classes per row, where 1 - p_y is small).
"""

import gc

import pytest
import torch

import kernels.long_ce as lc
import kernels.long_ce_ref as ref
from kernels import linear_cross_entropy, naive_linear_cross_entropy
from kernels.long_ce_chunked import CUDA_CHUNK_ROWS

pytestmark = pytest.mark.gpu

QWEN2_7B = (28_672, 3584, 152_064)


def _inputs(n, h, v, dtype, *, seed=0, peaked=False, ignore_frac=0.2):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, h, device="cuda", generator=g)
    weight = torch.randn(v, h, device="cuda", generator=g) / h**0.5
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    if peaked:  # logits ~ N(0, 1) plus a margin of 8..16 on the label's class: p_y ~ 1 - 1e-3 .. 1 - 1e-7
        hidden = hidden + (8 + 8 * torch.rand(n, 1, device="cuda", generator=g)) * weight[labels]  # |w_y| ~ 1
    labels[torch.rand(n, device="cuda", generator=g) < ignore_frac] = -100
    return hidden.to(dtype), weight.to(dtype), labels


def _run(fn, hidden, weight, labels, **kw):
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    loss = fn(h, w, labels, **kw)
    (loss * 3).backward()
    out = loss.detach().float(), h.grad.float(), w.grad.float()
    del h, w, loss
    gc.collect()
    torch.cuda.empty_cache()
    return out


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("recompute", [False, True], ids=["speed", "recompute"])
@pytest.mark.parametrize("peaked", [False, True], ids=["normal", "peaked"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_qwen2_7b_shape_bf16_as_good_as_pytorch(reduction, peaked, recompute):
    hidden, weight, labels = _inputs(*QWEN2_7B, torch.bfloat16, peaked=peaked)
    truth = _run(
        linear_cross_entropy, hidden.float(), weight.float(), labels, reduction=reduction, impl="torch"
    )
    kw = dict(reduction=reduction, impl="triton", recompute=recompute)
    ours = _run(linear_cross_entropy, hidden, weight, labels, **kw)
    torch_bf16 = _run(naive_linear_cross_entropy, hidden, weight, labels, reduction=reduction)
    for name, o, p, t in zip(("loss", "dX", "dW"), ours, torch_bf16, truth):
        assert torch.isfinite(o).all(), name
        assert _rel(o, t) <= 1.25 * _rel(p, t) + 1e-4, (
            f"{name}: ours {_rel(o, t):.3g}, PyTorch bf16 {_rel(p, t):.3g}"
        )


def test_cublas_and_triton_gemm_paths_agree(monkeypatch):
    """The fp32-output cuBLAS GEMMs and the Triton fallback (torch without out_dtype) give the same result."""
    hidden, weight, labels = _inputs(8192, 2048, 32_000, torch.bfloat16, seed=2)
    assert ref.fp32_out_matmul_supported(hidden.device), "this torch lacks mm/addmm out_dtype on CUDA"
    cublas = _run(linear_cross_entropy, hidden, weight, labels, impl="triton", chunk_rows=3000)
    monkeypatch.setattr(lc, "fp32_out_matmul_supported", lambda device: False)
    fallback = _run(linear_cross_entropy, hidden, weight, labels, impl="triton", chunk_rows=3000)
    for name, a, b in zip(("loss", "dX", "dW"), cublas, fallback):
        assert _rel(a, b) < 1e-5, (name, _rel(a, b))


def test_ignored_rows_skipped_or_zeroed_agree():
    """With a host count the ignored rows are compacted away; without one (no sync) they go through the rows
    kernel as zero rows.  Same result, up to fp32 summation order."""
    hidden, weight, labels = _inputs(8192, 2048, 32_000, torch.bfloat16, seed=3, ignore_frac=0.5)
    n_valid = int((labels != -100).sum())
    skipped = _run(linear_cross_entropy, hidden, weight, labels, num_valid=n_valid, check_labels=False)
    zeroed = _run(linear_cross_entropy, hidden, weight, labels, check_labels=False)
    for name, a, b in zip(("loss", "dX", "dW"), skipped, zeroed):
        assert _rel(a, b) < 1e-5, (name, _rel(a, b))


def test_bitwise_deterministic():
    hidden, weight, labels = _inputs(4096, 1024, 32_000, torch.bfloat16, seed=1)
    a = _run(linear_cross_entropy, hidden, weight, labels, impl="triton")
    b = _run(linear_cross_entropy, hidden, weight, labels, impl="triton")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_memory_bound():
    """Peak extra memory of forward + backward: the planned max(chunk + fp32 dW + fp32 dX, dX + fp32 dW +
    bf16 dW) (engine.memory's plan) plus 64 MiB of small buffers."""
    n, h, v = 16_384, 2048, 152_064
    hidden, weight, labels = _inputs(n, h, v, torch.bfloat16)
    hidden.requires_grad_()
    weight.requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    linear_cross_entropy(hidden, weight, labels, impl="triton", check_labels=False).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    budget = max(CUDA_CHUNK_ROWS * v * 2 + v * h * 4 + n * h * 4, n * h * 2 + v * h * 6) + 64 * 2**20
    assert extra <= budget, f"{extra / 2**20:.0f} MiB > {budget / 2**20:.0f} MiB"

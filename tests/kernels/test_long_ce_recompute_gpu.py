"""CUDA-only checks of recompute=True (Triton passes, cuBLAS GEMMs) at the shapes it exists for.

Its bf16 accuracy at Qwen2-7B against an fp32 reference is test_long_ce_gpu.py's (parametrized over the mode).
Peak memory is torch.cuda.max_memory_allocated over forward + backward minus what was allocated before
(inputs), after one warm-up call (cuBLAS workspace, the out_dtype probe), against dX + dW + 256 MiB.
"""

import pytest
import torch
from test_long_ce_gpu import _inputs, _rel, _run  # the speed mode's GPU checks: same inputs and measures

from kernels import linear_cross_entropy
from kernels.long_ce_recompute_chunked import mixed_gemm_ok

pytestmark = pytest.mark.gpu
MiB = 2**20
SHAPES = {"qwen2-7b": (28_672, 3584, 152_064), "glm4-9b": (28_672, 4096, 151_552)}


def test_this_torch_accumulates_bf16_products_in_fp32():
    # Without it the GEMM operands are upcast: correct, but the memory goal below is not met.
    assert mixed_gemm_ok(torch.device("cuda"), torch.bfloat16), f"torch {torch.__version__}"


def test_triton_equals_twin_and_is_deterministic():
    hidden, weight, labels = _inputs(4096, 1024, 32_000, torch.bfloat16, seed=1)
    kw = dict(recompute=True, label_smoothing=0.1, z_loss=1e-4, chunk_bytes=24 * MiB)
    a = _run(hidden, weight, labels, impl="triton", **kw)
    b = _run(hidden, weight, labels, impl="triton", **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    twin = _run(hidden, weight, labels, impl="torch", **kw)  # another block plan: close, not bitwise
    for name, x, y in zip(("loss", "dX", "dW"), a, twin):
        assert _rel(x, y) < 1e-2, name


@pytest.mark.parametrize("model", SHAPES)
def test_memory_goal(model):
    n, h, v = SHAPES[model]
    hidden, weight, labels = _inputs(n, h, v, torch.bfloat16)
    small = _inputs(256, h, 1024, torch.bfloat16)
    _run(*small, impl="triton", recompute=True)  # warm-up: cuBLAS workspace, probe, compiles
    hidden.requires_grad_()
    weight.requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    linear_cross_entropy(hidden, weight, labels, impl="triton", recompute=True).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    dx, dw = n * h * 2, v * h * 2
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    # After the backward only the two gradients remain: dX rounded in place holds dX bytes, not 2 dX.
    assert torch.cuda.memory_allocated() - base <= dx + dw + MiB
    assert extra <= dx + dw + 256 * MiB, (
        f"{extra / MiB:.0f} MiB > dX + dW + 256 = {(dx + dw) / MiB + 256:.0f}"
    )

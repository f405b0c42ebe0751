"""CUDA-only checks of recompute=True (Triton passes, cuBLAS GEMMs) at the shapes it exists for.

Its bf16 accuracy at Qwen2-7B against an fp32 reference is test_long_ce_gpu.py's (parametrized over the mode).
Peak memory is benchmarks.common.peak_memory_bytes (torch.cuda.max_memory_allocated over forward + backward
minus what was allocated before: the inputs), after one warm-up call (cuBLAS workspace, the out_dtype
probe), against dX + dW + 256 MiB.
"""

import pytest
import torch
from test_long_ce_gpu import _inputs, _rel, _run  # the speed mode's GPU checks: same inputs and measures

import kernels.long_ce as lc
from benchmarks import common
from kernels import linear_cross_entropy
from kernels.long_ce_ref import fp32_out_matmul_supported

pytestmark = pytest.mark.gpu
MiB = 2**20
SHAPES = {"qwen2-7b": (28_672, 3584, 152_064), "glm4-9b": (28_672, 4096, 151_552)}


def test_triton_equals_twin_deterministic_and_gemm_fallback_agrees(monkeypatch):
    hidden, weight, labels = _inputs(4096, 1024, 32_000, torch.bfloat16, seed=1)
    kw = dict(recompute=True, label_smoothing=0.1, z_loss=1e-4, chunk_bytes=24 * MiB)
    a = _run(linear_cross_entropy, hidden, weight, labels, impl="triton", **kw)
    b = _run(linear_cross_entropy, hidden, weight, labels, impl="triton", **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    twin = _run(linear_cross_entropy, hidden, weight, labels, impl="torch", **kw)  # another block plan
    # A torch without fp32-output addmm: the accumulating GEMMs run on long_ce's _mm_f32_kernel.
    monkeypatch.setattr(lc, "fp32_out_matmul_supported", lambda device: False)
    fallback = _run(linear_cross_entropy, hidden, weight, labels, impl="triton", **kw)
    for name, x, y, z in zip(("loss", "dX", "dW"), a, twin, fallback):
        assert _rel(x, y) < 1e-2 and _rel(x, z) < 1e-5, (name, _rel(x, y), _rel(x, z))


@pytest.mark.parametrize("model", SHAPES)
def test_memory_goal(model):
    # Without fp32-output addmm (fp32 accumulation by cuBLAS) the Triton fallback is slower, not bigger.
    assert fp32_out_matmul_supported(torch.device("cuda")), f"torch {torch.__version__}"
    n, h, v = SHAPES[model]
    hidden, weight, labels = _inputs(n, h, v, torch.bfloat16)
    _run(linear_cross_entropy, *_inputs(256, h, 1024, torch.bfloat16), recompute=True)  # warm-up
    hidden.requires_grad_()
    weight.requires_grad_()
    base = torch.cuda.memory_allocated()
    extra = common.peak_memory_bytes(  # as the benchmark measures it
        lambda: linear_cross_entropy(hidden, weight, labels, impl="triton", recompute=True).backward(), "cuda"
    )
    dx, dw = n * h * 2, v * h * 2
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    # After the backward only the two gradients remain: dX rounded in place holds dX bytes, not 2 dX.
    assert torch.cuda.memory_allocated() - base <= dx + dw + MiB
    assert extra <= dx + dw + 256 * MiB, (
        f"{extra / MiB:.0f} MiB > dX + dW + 256 = {(dx + dw) / MiB + 256:.0f}"
    )

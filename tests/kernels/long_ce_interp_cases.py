"""Cases for the Triton path (impl="triton") on CPU through the Triton interpreter, vs the fp64 definition.

Not collected directly (no test_ prefix): test_long_ce_triton_interp.py runs this file in a pytest
subprocess with TRITON_INTERPRET=1 in its environment, because triton reads the mode both when kernels
are decorated and later at run time, and the mode must not leak into the other tests of the session.
The interpreter is slow and computes tl.dot on bf16 wrongly: small shapes, fp32 / fp16 only.
"""

import os

import pytest
import torch
from long_ce_testlib import check_against_fp64, loss_and_grads, make_inputs

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "run through test_long_ce_triton_interp.py (needs TRITON_INTERPRET=1)", allow_module_level=True
    )

import kernels.long_ce as long_ce  # noqa: E402
from kernels import linear_cross_entropy  # noqa: E402

CASES = [
    # (n, h, v), dtype, options; chunk_rows is set so that every case runs several ragged chunks
    ((1, 1, 2), torch.float32, dict(reduction="sum")),  # only a masked tail block (V < BLOCK_V = 64)
    ((20, 16, 128), torch.float32, dict(reduction="mean")),  # only full, unmasked blocks
    ((37, 31, 123), torch.float32, dict(reduction="mean", label_smoothing=0.1, z_loss=1e-3, softcap=4.0)),
    ((37, 31, 123), torch.float16, dict(reduction="sum")),
    ((37, 31, 123), torch.float16, dict(reduction="none", ignore_index=5)),
    # every option in low precision through the per-row grad_output path
    ((37, 31, 123), torch.float16, dict(reduction="none", label_smoothing=0.1, z_loss=1e-3, softcap=4.0)),
    pytest.param((252, 123, 507), torch.float32, dict(reduction="sum"), marks=pytest.mark.slow),  # ~70 s
]


@pytest.mark.parametrize("shape,dtype,kw", CASES, ids=str)
def test_triton_interp_matches_fp64(shape, dtype, kw):
    assert long_ce._INTERPRET
    n, h, v = shape
    hidden, weight, labels, bias = make_inputs(
        n, h, v, dtype, seed=v, bias=n == 37, ignore_index=kw.get("ignore_index", -100)
    )
    check_against_fp64(hidden, weight, labels, bias, impl="triton", chunk_rows=16, **kw)


def test_triton_interp_peaked_fp16():
    hidden, weight, labels, _ = make_inputs(32, 32, 96, torch.float16, seed=1, peaked=True, ignore_frac=0.0)
    # "sum": with "mean" over 32 rows the confident rows' fp16 gradients underflow (in PyTorch too).
    check_against_fp64(hidden, weight, labels, None, impl="triton", reduction="sum", rowwise=True)


def test_triton_interp_equals_twin_and_edge_rows():
    hidden, weight, labels, bias = make_inputs(20, 16, 70, torch.float32, bias=True)
    hidden = torch.cat([hidden, hidden], 1)[:, ::2]  # non-contiguous
    labels[:5] = -100
    a = loss_and_grads(
        linear_cross_entropy, hidden, weight, labels, bias, 2.0, impl="triton", chunk_bytes=3000
    )
    b = loss_and_grads(
        linear_cross_entropy, hidden, weight, labels, bias, 2.0, impl="torch", chunk_bytes=3000
    )
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    again = loss_and_grads(
        linear_cross_entropy, hidden, weight, labels, bias, 2.0, impl="triton", chunk_bytes=3000
    )
    assert all(torch.equal(x, y) for x, y in zip(a, again))  # deterministic
    labels[:] = -100
    for reduction in ("sum", "mean", "none"):
        out = loss_and_grads(
            linear_cross_entropy, hidden, weight, labels, bias, 2.0, impl="triton", reduction=reduction
        )
        assert all((g == 0).all() for g in out[1:]), reduction
        if reduction == "mean":  # 0 / 0, as PyTorch
            assert torch.isnan(out[0])
        else:
            assert (out[0] == 0).all(), reduction
    labels[3] = 70  # out of range, unchecked: NaN, no crash
    assert torch.isnan(linear_cross_entropy(hidden, weight, labels, impl="triton", check_labels=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_kernel_ignored_rows_without_compaction(dtype):
    """The rows kernel on a chunk that still holds ignored rows (a GPU call without a host count): loss 0
    and a zero gradient row for them, the twin's result for the others; 3 programs walk 11 rows.  The
    chunk sits in a buffer whose rows are padded (70 -> 80 columns, as the driver's CUDA buffer) with NaN
    scratch: the kernel reads the padding in its vectors and must mask it."""
    from kernels.long_ce_ref import LongCEOptions, rows_torch

    _, _, labels, bias = make_inputs(11, 4, 70, torch.float32, bias=True, ignore_frac=0.4)
    logits = torch.randn(11, 70, dtype=torch.float64).mul(3).to(dtype)
    scale = torch.linspace(-1, 2, 11)
    assert (labels == -100).any() and (labels != -100).any()
    opts = LongCEOptions(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    outs = []
    for fn in (long_ce.rows_triton, rows_torch):
        buf, loss = torch.full((11, 80), float("nan"), dtype=dtype)[:, :70], torch.empty(11)
        buf.copy_(logits)
        fn(buf, bias.to(dtype), labels, loss, opts, scale, True)
        outs.append((buf.float(), loss))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, **tol)
    assert (outs[0][0][labels == -100] == 0).all() and (outs[0][1][labels == -100] == 0).all()


@pytest.mark.parametrize("accumulate", [False, True])
def test_mm_f32_kernel_both_layouts(accumulate):
    """The fallback fp32-output GEMM (used where torch has no out_dtype GEMM, e.g. CPU here) in its two
    launched layouts: dW (+)= g^T @ x and dX = g @ W, with ragged tiles."""
    g = torch.randn(37, 70, dtype=torch.float64)
    x, w = torch.randn(37, 20, dtype=torch.float64), torch.randn(70, 20, dtype=torch.float64)
    for a, b in ((g.T, x), (g, w)):
        out = torch.randn(a.shape[0], b.shape[1])
        want = a @ b + (out.double() if accumulate else 0)
        long_ce.matmul_f32_triton(a.half(), b.half(), out, accumulate)
        torch.testing.assert_close(out.double(), want, rtol=2e-3, atol=2e-2)

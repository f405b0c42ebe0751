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
    # (n, h, v), dtype, options; chunk_bytes is set so that every case runs several ragged chunks
    ((1, 1, 2), torch.float32, dict(reduction="sum")),
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
    check_against_fp64(hidden, weight, labels, bias, impl="triton", chunk_bytes=16 * v * 4, **kw)


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

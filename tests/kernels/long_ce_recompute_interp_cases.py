"""Cases for the recompute mode's Triton kernels on CPU through the Triton interpreter, vs the fp64 definition
and vs the PyTorch twin.  Run by test_long_ce_triton_interp.py in a subprocess (TRITON_INTERPRET=1, see
long_ce_interp_cases.py for why); fp32 / fp16 only (the interpreter's bf16 stores are wrong)."""

import os

import pytest
import torch
from long_ce_testlib import check_against_fp64, loss_and_grads, make_inputs

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "run through test_long_ce_triton_interp.py (needs TRITON_INTERPRET=1)", allow_module_level=True
    )

import kernels.long_ce_recompute as lcr  # noqa: E402
import kernels.long_ce_recompute_chunked as rc  # noqa: E402
from kernels import linear_cross_entropy  # noqa: E402

CASES = [
    # (n, h, v), [rows, cols] block plan, dtype, options: ragged blocks in both directions, a row block
    # (10..20) across the fp16 dX accumulator's two halves (37 -> 19 + 18)
    ((1, 1, 2), (1, 1), torch.float32, dict(reduction="sum")),
    (
        (37, 31, 123),
        (10, 50),
        torch.float32,
        dict(reduction="mean", label_smoothing=0.1, z_loss=1e-3, softcap=4.0),
    ),
    ((37, 31, 128), (10, 64), torch.float16, dict(reduction="sum")),  # BLOCK_V divides c: unmasked loads
    ((37, 31, 123), (37, 70), torch.float16, dict(reduction="none", ignore_index=5)),
    (
        (37, 31, 123),
        (16, 123),
        torch.float16,
        dict(reduction="none", label_smoothing=0.1, z_loss=1e-3, softcap=4.0),
    ),
]


@pytest.mark.parametrize("shape,plan,dtype,kw", CASES, ids=str)
def test_recompute_triton_interp_matches_fp64(shape, plan, dtype, kw, monkeypatch):
    assert lcr._INTERPRET
    monkeypatch.setattr(rc, "make_plan", lambda *a: plan)
    n, h, v = shape
    hidden, weight, labels, bias = make_inputs(
        n, h, v, dtype, seed=v, bias=n == 37, ignore_index=kw.get("ignore_index", -100)
    )
    check_against_fp64(hidden, weight, labels, bias, impl="triton", recompute=True, **kw)


def test_recompute_triton_interp_peaked_fp16(monkeypatch):
    monkeypatch.setattr(rc, "make_plan", lambda *a: (12, 40))
    hidden, weight, labels, _ = make_inputs(32, 32, 96, torch.float16, seed=1, peaked=True, ignore_frac=0.0)
    check_against_fp64(
        hidden, weight, labels, None, impl="triton", reduction="sum", rowwise=True, recompute=True
    )


def test_recompute_triton_interp_equals_twin_and_edge_rows(monkeypatch):
    monkeypatch.setattr(rc, "make_plan", lambda *a: (7, 33))
    hidden, weight, labels, bias = make_inputs(20, 16, 70, torch.float32, bias=True)
    hidden = torch.cat([hidden, hidden], 1)[:, ::2]  # non-contiguous
    labels[:5] = -100
    kw = dict(recompute=True, label_smoothing=0.05, z_loss=1e-3, softcap=6.0)
    a = loss_and_grads(linear_cross_entropy, hidden, weight, labels, bias, 2.0, impl="triton", **kw)
    b = loss_and_grads(linear_cross_entropy, hidden, weight, labels, bias, 2.0, impl="torch", **kw)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    again = loss_and_grads(linear_cross_entropy, hidden, weight, labels, bias, 2.0, impl="triton", **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, again))  # deterministic
    monkeypatch.setattr(rc, "make_plan", lambda *a: (20, 70))  # one block: the interpreter is slow
    labels[:] = -100
    for reduction in ("sum", "mean", "none"):
        out = loss_and_grads(
            linear_cross_entropy, hidden, weight, labels, bias, 2.0, impl="triton", reduction=reduction, **kw
        )
        assert all((g == 0).all() for g in out[1:]), reduction
        assert torch.isnan(out[0]).all() if reduction == "mean" else (out[0] == 0).all(), reduction
    labels[3] = 70  # out of range, unchecked: NaN, no crash
    assert torch.isnan(linear_cross_entropy(hidden, weight, labels, impl="triton", check_labels=False, **kw))

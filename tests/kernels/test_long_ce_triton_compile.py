"""The Triton kernels compiled exactly as their launchers specialise them (tests/kernels/triton_compile_lib.py),
for sm_80 and sm_90, without a GPU."""

import pytest
import torch

pytest.importorskip("triton")
from triton_compile_lib import ARCHES, compile_or_skip, meta  # noqa: E402

import kernels.long_ce as lc  # noqa: E402
from kernels.long_ce_ref import LongCEOptions  # noqa: E402

C, H, V = 832, 3584, 152_064  # a chunk at the Qwen2-7B shape


@pytest.mark.parametrize("arch", ARCHES)
def test_rows_kernel_as_launched(arch):
    logits, labels, loss = meta(C, V), meta(C, dtype=torch.int64), meta(C, dtype=torch.float32)
    k = compile_or_skip(lc.rows_launch(logits, None, labels, loss, LongCEOptions(), None, True), arch)
    assert {"logits_ptr", "stride_row", "V"} <= k.divisible
    assert k.local_bytes == 0


@pytest.mark.parametrize("arch", ARCHES)
def test_dw_kernel_as_launched(arch):
    g, x, dw = meta(C, V), meta(C, H), meta(V, H, dtype=torch.float32)
    k = compile_or_skip(lc.dw_launch(dw, g, x), arch)
    assert k.signature["stride_gv"] == "constexpr" and k.signature["stride_xh"] == "constexpr"
    assert k.has(r"wgmma\.mma_async") if arch == 90 else k.has(r"mma\.sync")
    assert k.local_bytes == 0

"""The recompute mode's Triton passes compiled exactly as their launchers specialise them at the shapes the
planner picks for Qwen2-7B and GLM-4-9B (tests/kernels/triton_compile_lib.py), for sm_80 and sm_90, without a
GPU.  They are memory-bound row passes: what they rely on is 16-byte vector loads and stores of the block,
no spills, and few registers (many programs in flight per SM)."""

import pytest
import torch

pytest.importorskip("triton")
from triton_compile_lib import ARCHES, compile_or_skip, meta  # noqa: E402

import kernels.long_ce_recompute as lcr  # noqa: E402
import kernels.long_ce_recompute_chunked as rc  # noqa: E402
from kernels.long_ce_ref import LongCEOptions  # noqa: E402

N = 28_672
SHAPES = {"qwen2-7b": (3584, 152_064), "glm4-9b": (4096, 151_552)}
REGISTER_CAP = 64  # 128-thread programs: >= 8 resident per SM by registers
OPTIONS = {
    "plain": (LongCEOptions(), False),
    "all": (LongCEOptions(label_smoothing=0.1, z_loss=1e-4, softcap=30.0), True),
}


def _blocks(model):
    """[r, c] of a full block and of the vocabulary's last (ragged) chunk, as the CUDA path plans them."""
    h, v = SHAPES[model]
    budget = rc.default_chunk_bytes(N, h, 2, "cuda", need_dx=True)
    r, c = rc.plan_blocks(N, h, v, budget, block_elem=2, acc_w=True, need_dx=True, need_dw=True)
    return [(r, c), (r, v - (v - 1) // c * c)]


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("opt", OPTIONS)
@pytest.mark.parametrize("model", SHAPES)
def test_recompute_passes_as_launched(model, opt, arch):
    opts, has_bias = OPTIONS[opt]
    v = SHAPES[model][1]
    for r, c in _blocks(model):
        z, labels = meta(r, c), meta(r, dtype=torch.int64)
        bias = meta(c) if has_bias else None
        m, s, z_y, z_sum = (meta(r, dtype=torch.float32) for _ in range(4))
        z_sum = z_sum if opts.label_smoothing else None
        stats = compile_or_skip(lcr.stats_launch(z, bias, labels, 0, m, s, z_y, z_sum, opts), arch)
        grad = compile_or_skip(lcr.grad_launch(z, bias, labels, c, v, m, s, z_y, opts), arch)
        for name, k in (("stats", stats), ("grad", grad)):
            where = f"{name} [{r}, {c}] sm_{arch}"
            assert {"z_ptr", "stride_z"} <= k.divisible, where  # 16-aligned rows: vector access
            assert k.signature["C"] == "constexpr", where
            assert k.local_bytes == 0, f"{where}: {k.local_bytes} bytes of local memory (spills)"
            assert k.registers <= REGISTER_CAP, f"{where}: {k.registers} registers"
            assert k.has(r"ld\.global(\.\w+)*\.v4\.b32"), f"{where}: no 16-byte loads"
        assert grad.has(r"st\.global(\.\w+)*\.v4\.b32"), f"grad [{r}, {c}] sm_{arch}: no 16-byte stores"

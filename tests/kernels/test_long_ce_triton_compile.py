"""The Triton kernels compiled exactly as their launchers specialise them (triton_compile_lib.py: the JIT's
own divisibility-16 and unit-stride specialisation, the real block sizes, warps and stages), for sm_80 and
sm_90 without a GPU, and checked for what the design relies on:

- `_rows_kernel` (memory-bound, no matrix work): 16-byte vector loads and stores (ld/st.global.v4),
  whatever V (the driver pads its rows to 16 elements); no local memory (spills); registers <=
  ROWS_MAX_REGISTERS (128: one 512-thread program per SM owns the register file); a persistent grid whose
  rows in flight fit in half of L2.
- `_mm_f32_kernel` (the fallback fp32-output GEMM, in its dW and dX layouts): tensor cores (wgmma on
  sm_90, mma.sync on sm_80), a cp.async software pipeline, no spills, <= 255 registers.
"""

import re

import pytest
import torch

pytest.importorskip("triton")
from triton_compile_lib import ARCHES, compile_or_skip, meta  # noqa: E402

import kernels.long_ce as lc  # noqa: E402
from kernels.long_ce_ref import LongCEOptions  # noqa: E402

C, H, V = 3584, 3584, 152_064  # one default chunk at the Qwen2-7B shape

ROWS_VARIANTS = {  # (options, bias, per-row scale, write_grad): what the driver launches
    "speed": (LongCEOptions(), False, False, True),
    "all-options": (LongCEOptions(label_smoothing=0.1, z_loss=1e-4, softcap=30.0), True, True, True),
    "loss-only": (LongCEOptions(reduction="none"), False, False, False),
}


def _rows(variant: str, v: int = V, dtype=torch.bfloat16):
    opts, bias, scale, write_grad = ROWS_VARIANTS[variant]
    v_pad = -(-v // 16) * 16  # the driver's CUDA chunk buffer (long_ce_chunked._chunk_buffer)
    logits = meta(C, v_pad, dtype=dtype)[:, :v]
    return lc.rows_launch(
        logits,
        meta(v, dtype=dtype) if bias else None,
        meta(C, dtype=torch.int64),
        meta(C, dtype=torch.float32),
        opts,
        meta(C, dtype=torch.float32) if scale else None,
        write_grad,
    )


def _count(k, pattern: str) -> int:
    return len(re.findall(pattern, k.ptx))


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("variant", ROWS_VARIANTS)
def test_rows_kernel_as_launched(arch, variant):
    launch = _rows(variant)
    k = compile_or_skip(launch, arch)
    assert {"logits_ptr", "stride_row"} <= k.divisible and k.signature["V"] == "constexpr"
    assert k.num_warps == lc.ROWS_WARPS and launch.kwargs["BLOCK_V"] == lc.ROWS_BLOCK_V
    assert _count(k, r"ld\.global[.\w:]*\.v4\.b32") >= 2, "rows are not read in 16-byte vectors"
    if ROWS_VARIANTS[variant][3]:
        assert _count(k, r"st\.global[.\w:]*\.v4\.b32") >= 2, "dlogits are not written in 16-byte vectors"
    assert k.local_bytes == 0 and k.stack_bytes == 0, (
        f"spills: {k.local_bytes} B local, {k.stack_bytes} B stack"
    )
    assert k.registers <= lc.ROWS_MAX_REGISTERS, k.registers
    # H100 / H200 L2 (50 MiB): 86 bf16 rows of 152,064 in flight take 25 MiB, half of it.
    assert launch.grid == ((lc.DEFAULT_L2_BYTES // 2) // (V * 2),) == (86,)


@pytest.mark.parametrize("arch", ARCHES)
def test_rows_kernel_vectorises_odd_vocabularies(arch):
    # V = 32,001 in the driver's buffer padded to 32,016 columns: still only 16-byte vectors, no scalar loads.
    k = compile_or_skip(_rows("speed", v=32_001), arch)
    assert _count(k, r"ld\.global[.\w:]*\.v4\.b32") >= 2 and _count(k, r"ld\.global\.[^v\n]*b16") == 0
    assert k.local_bytes == 0 and k.stack_bytes == 0 and k.registers <= lc.ROWS_MAX_REGISTERS


MM_LAYOUTS = {  # out (+)= a @ b as the driver calls it: dW_acc [V, H] += g^T @ x, dX [C, H] = g @ W
    "dW": lambda g: (g.T, meta(C, H), meta(V, H, dtype=torch.float32)),
    "dX": lambda g: (g, meta(V, H), meta(C, H, dtype=torch.float32)),
}


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("layout", MM_LAYOUTS)
@pytest.mark.parametrize("accumulate", [False, True])
def test_mm_f32_kernel_as_launched(arch, layout, accumulate):
    a, b, out = MM_LAYOUTS[layout](meta(C, V))
    k = compile_or_skip(lc.mm_launch(a, b, out, accumulate), arch)
    unit = "stride_am" if layout == "dW" else "stride_ak"
    assert k.signature[unit] == "constexpr" and {"a_ptr", "b_ptr", "out_ptr"} <= k.divisible
    if arch >= 90:
        assert k.has(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.bf16\.bf16"), "no wgmma on sm_90"
    else:
        assert k.has(r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.bf16\.bf16\.f32"), "no mma.sync on sm_80"
    assert k.has(r"cp\.async\.(cg|ca)\.shared\.global") and k.has(r"cp\.async\.commit_group"), "no pipeline"
    assert k.local_bytes == 0 and k.stack_bytes == 0, (
        f"spills: {k.local_bytes} B local, {k.stack_bytes} B stack"
    )
    assert k.registers <= 255

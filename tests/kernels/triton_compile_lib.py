"""Compile a Triton launch exactly as its launcher specialises it, for a GPU architecture, without a GPU.

A launcher in kernels/ builds a `kernels.launch.Launch` (kernel, grid, args, kwargs) and calls it.  Tests
build the same Launch from meta tensors of the real shapes (a meta tensor has the strides of the real one
and data_ptr() 0, i.e. 16-byte aligned like every caching-allocator block) and pass it to
`compile_launch(launch, arch)`, which runs Triton's own argument specialisation (the JIT's binder: pointers
and integers divisible by 16 get `tt.divisibility`, integers equal to 1 become constexprs, exactly as at a
real launch) against a backend for `arch` instead of the active driver's, compiles, and returns what the
design must be checked against: the PTX, the SASS, registers, spills, shared memory.

Uses two private Triton entry points (`create_function_from_signature`, `JITFunction._pack_args`), the
same in Triton 3.6 and 3.9; `compile_or_skip` turns "this Triton cannot target that arch here" (no NVIDIA
backend, no ptxas, API moved) into a pytest skip with the reason, and lets real compile errors fail.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

ARCHES = (80, 90)  # A100 (mma.sync, cp.async), H100/H200 (wgmma, TMA)


def meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A tensor of the real shape and strides that owns no memory (data_ptr 0: 16-byte aligned)."""
    return torch.empty(*shape, dtype=dtype, device="meta")


@dataclass
class Compiled:
    arch: int
    signature: dict  # argument name -> Triton type ("*bf16", "i32", "constexpr", ...)
    divisible: set  # names of the arguments specialised as divisible by 16
    ptx: str
    sass: str
    registers: int  # per thread
    local_bytes: int  # local memory per thread (spills, stack arrays): 0 means no spills
    stack_bytes: int
    shared_bytes: int  # dynamic shared memory per program
    num_warps: int

    def has(self, pattern: str) -> bool:
        """Regex search in the PTX."""
        return re.search(pattern, self.ptx) is not None

    def sass_has(self, pattern: str) -> bool:
        return re.search(pattern, self.sass) is not None


def _tool(name: str) -> str:
    import triton

    return getattr(triton.knobs.nvidia, name).path


def _resource_usage(cubin: bytes) -> tuple[dict[str, int], str]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        sass = subprocess.run(
            [_tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True, check=True
        ).stdout
    # " Function _rows_kernel:\n  REG:40 STACK:0 SHARED:0 LOCAL:0 ..."
    fields = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    return fields, sass


def compile_launch(launch, arch: int) -> Compiled:
    """Compile `launch` (a kernels.launch.Launch) for sm_<arch> with the launcher's specialisation."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    # What JITFunction.run does before it compiles, with this target's backend instead of the driver's.
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, launch.kwargs, bound, specialization, options
    )
    kernel = triton.compile(
        ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__
    )
    names = list(signature)
    divisible = {
        names[path[0]]
        for path, values in attrs.items()
        if any(v[0] == "tt.divisibility" and v[1] >= 16 for v in values)
    }
    usage, sass = _resource_usage(kernel.asm["cubin"])
    return Compiled(
        arch=arch,
        signature=signature,
        divisible=divisible,
        ptx=kernel.asm["ptx"],
        sass=sass,
        registers=usage["REG"],
        local_bytes=usage["LOCAL"],
        stack_bytes=usage["STACK"],
        shared_bytes=kernel.metadata.shared,
        num_warps=kernel.metadata.num_warps,
    )


def compile_or_skip(launch, arch: int) -> Compiled:
    """compile_launch, or pytest.skip with the reason when this Triton build cannot target sm_<arch>."""
    import pytest

    try:
        import triton.backends.nvidia  # noqa: F401
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this Triton has no NVIDIA backend / binder API: {e}")
    try:
        return compile_launch(launch, arch)
    except FileNotFoundError as e:  # ptxas / cuobjdump missing from this build
        pytest.skip(f"cannot compile for sm_{arch} here: {e}")
    except RuntimeError as e:
        if "ptxas" in str(e).lower() and "not supported" in str(e).lower():
            pytest.skip(f"this ptxas cannot target sm_{arch}: {str(e)[:200]}")
        raise

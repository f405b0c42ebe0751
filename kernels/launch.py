"""`Launch`: one Triton kernel launch exactly as a launcher specialises it, so tests can compile that very
specialisation for a GPU architecture without a GPU (tests/kernels/triton_compile_lib.py).

A launcher builds `Launch(kernel, grid, args, kwargs)` from its tensors and calls it; the compile tests
build the same object from meta tensors of the real shapes (same strides, same 16-divisible pointers and
integers as on the device, same block sizes, warps and stages) and hand it to the compiler instead.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Launch(NamedTuple):
    kernel: Any  # a triton.JITFunction
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict  # constexprs and launch options (num_warps, num_stages)

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)

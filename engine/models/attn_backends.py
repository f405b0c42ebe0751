"""The optional varlen attention kernels, probed once: import, device check and one tiny call against SDPA.

A flash-attn build that does not match the installed torch fails at import ("undefined symbol"), a wheel
built for other GPUs fails at its first call ("no kernel image"), and torch's own varlen_attn changed its
signature between releases (no `enable_gqa` in 2.11). So each kernel is imported and run once, on a
16-token GQA batch of two documents checked against per-document SDPA, before a run commits to it; "auto"
takes the first that passes in AUTO_ORDER and names the reason of every one it skipped. Nothing here is
imported at module import time: `import engine` works without flash-attn, CUDA or a GPU.

    "flash3"  flash_attn_interface.flash_attn_varlen_func (flash-attn 3, Hopper sm90)
    "flash"   flash_attn.flash_attn_varlen_func (flash-attn 2, sm80+)
    "varlen"  torch.nn.attention.varlen.varlen_attn (torch >= 2.10, sm80+)
Each loaded kernel is `fn(q, k, v, cu_seqlens, max_seqlen) -> out`: q/out (N, nh, hd), k/v (N, nkv, hd),
causal within each document of the int32 cu_seqlens (on q's device).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KERNELS = ("flash3", "flash", "varlen")
ATTN_IMPLS = ("auto", *KERNELS, "sdpa")
AUTO_ORDER = KERNELS  # fastest first; "sdpa" (the plain per-document twin) is the last resort
MODULES = {"flash3": "flash_attn_interface", "flash": "flash_attn", "varlen": "torch.nn.attention.varlen"}
HALF = (torch.float16, torch.bfloat16)


def _first(out):
    # flash-attn 3 returns (out, softmax_lse) in some releases and out alone in others
    return out[0] if isinstance(out, tuple) else out


def _load(name: str) -> Callable:
    """Import the kernel and wrap it in the common signature; raises what the import raises."""
    mod = importlib.import_module(MODULES[name])
    if name in ("flash3", "flash"):
        f = mod.flash_attn_varlen_func

        def fn(q, k, v, cu, m):
            return _first(f(q, k, v, cu, cu, m, m, causal=True))

        return fn
    f = mod.varlen_attn
    if "enable_gqa" in inspect.signature(f).parameters:

        def fn(q, k, v, cu, m):
            return f(q, k, v, cu, cu, m, m, window_size=(-1, 0), enable_gqa=True)

        return fn

    def fn_repeat(q, k, v, cu, m):
        # torch 2.11's varlen_attn has no enable_gqa: give every query head its own copy of its kv head
        rep = q.shape[1] // k.shape[1]
        k, v = (t.repeat_interleave(rep, dim=1) for t in (k, v))  # (N, nh, hd)
        return f(q, k, v, cu, cu, m, m, window_size=(-1, 0))

    return fn_repeat


def _requirement_error(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `name` cannot run on this device / dtype, before anything is imported (None: it may)."""
    if device.type != "cuda":
        return f"needs a CUDA device, got {device}"
    if dtype not in HALF:
        return f"needs fp16/bf16 compute, got {dtype}"
    major, minor = torch.cuda.get_device_capability(device)
    if name == "flash3" and major != 9:
        return f"flash-attn 3 needs a Hopper GPU (sm90), this is sm{major}{minor}"
    if major < 8:
        return f"needs sm80 or newer, this is sm{major}{minor}"
    return None


def _smoke(fn: Callable, device: torch.device, dtype: torch.dtype) -> None:
    """One forward + backward on 2 documents (7 + 9 tokens), 4 query heads over 2 kv heads, hd 64,
    against causal SDPA per document; raises on an error, a wrong result or a missing gradient."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(16, h, 64, generator=g).to(device, dtype) for h in (4, 2, 2))
    q.requires_grad_()
    cu = torch.tensor([0, 7, 16], dtype=torch.int32, device=device)
    out = fn(q, k, v, cu, 9)
    out.float().sum().backward()
    ref = torch.cat(
        [
            F.scaled_dot_product_attention(
                *(t[s:e].transpose(0, 1)[None].float() for t in (q.detach(), k, v)), is_causal=True,
                enable_gqa=True,
            )[0].transpose(0, 1)
            for s, e in ((0, 7), (7, 16))
        ]
    )  # fmt: skip
    if tuple(out.shape) != (16, 4, 64):
        raise RuntimeError(f"output shape {tuple(out.shape)}, expected (16, 4, 64)")
    err = (out.float() - ref).abs().max().item()
    if not err < 0.05:  # bf16 output rounding is ~1e-2 here; a masking or GQA error is O(1)
        raise RuntimeError(f"output differs from per-document SDPA by {err:.3g}")
    if q.grad is None or not torch.isfinite(q.grad).all():
        raise RuntimeError("backward gave no finite gradient")


@dataclass(frozen=True)
class Probe:
    name: str
    fn: Callable | None  # the loaded kernel; None when it cannot be used
    status: str  # "ok" | "absent" (package not installed) | "unsupported" (device/dtype) | "broken"
    error: str | None = None  # why not (None when usable)


@functools.cache
def probe(name: str, device: torch.device, dtype: torch.dtype) -> Probe:
    """Import, check and run kernel `name` once per (device, dtype); never raises for a bad package."""
    if name not in KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}: one of {KERNELS}")
    why = _requirement_error(name, device, dtype)
    if why is not None:
        return Probe(name, None, "unsupported", why)
    module = MODULES[name]
    try:
        fn = _load(name)
    except ModuleNotFoundError as e:
        if e.name is not None and module.startswith(e.name):
            return Probe(name, None, "absent", f"{module} is not installed")
        return Probe(name, None, "broken", f"import {module} failed: {type(e).__name__}: {e}")
    except Exception as e:  # a build for another torch / CUDA: ImportError or OSError (undefined symbol, .so)
        return Probe(name, None, "broken", f"import {module} failed: {type(e).__name__}: {e}")
    try:
        # the first forward may come under no_grad or inference_mode (evaluation, generation)
        with torch.inference_mode(False), torch.enable_grad():
            _smoke(fn, device, dtype)
    except Exception as e:  # e.g. "no kernel image is available for execution on the device"
        return Probe(name, None, "broken", f"test call failed: {type(e).__name__}: {e}")
    return Probe(name, fn, "ok")


@dataclass(frozen=True)
class AttnChoice:
    name: str  # a concrete impl: one of KERNELS or "sdpa"
    requested: str
    skipped: tuple[Probe, ...] = ()  # the kernels "auto" passed over, in AUTO_ORDER

    def describe(self) -> str:
        line = f"attention: {self.name}" + (" (auto)" if self.requested == "auto" else "")
        reasons: dict[str, list[str]] = {}  # one reason for several kernels is said once
        for p in self.skipped:
            reasons.setdefault(p.error, []).append(p.name)
        if reasons:
            line += "; not used: " + "; ".join(f"{', '.join(n)}: {why}" for why, n in reasons.items())
        return line

    def warnings(self) -> list[str]:
        """One line per kernel that is installed but failed (a fallback the user should hear about)."""
        return [
            f"attention kernel {p.name} is installed but unusable, falling back to {self.name}: {p.error}"
            for p in self.skipped
            if p.status == "broken"
        ]


def select_attn_impl(requested: str, device: torch.device, dtype: torch.dtype) -> AttnChoice:
    """Resolve `requested` ("auto", "sdpa" or a kernel) for compute on (device, dtype) by probing.

    "auto": the first usable kernel of AUTO_ORDER (none is off CUDA or in fp32), else "sdpa". An explicit kernel
    that cannot be used is a ValueError naming why (so a run fails before it loads data or weights)."""
    if requested not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {requested!r}")
    if requested == "sdpa":
        return AttnChoice("sdpa", requested)
    if requested != "auto":
        p = probe(requested, device, dtype)
        if p.fn is None:
            raise ValueError(
                f"attn_impl={requested!r} cannot be used: {p.error} (attn_impl 'auto' falls back)"
            )
        return AttnChoice(requested, requested)
    skipped = []
    for name in AUTO_ORDER:
        p = probe(name, device, dtype)
        if p.fn is not None:
            return AttnChoice(name, requested, tuple(skipped))
        skipped.append(p)
    return AttnChoice("sdpa", requested, tuple(skipped))


# (impl, device, dtype) -> concrete impl name / loaded kernel: plain dicts, cheap in every forward and
# readable by torch.compile (which would trace into a functools.cache-wrapped probe)
_AUTO: dict[tuple, str] = {}
_READY: dict[tuple, Callable] = {}


def resolve_auto(device: torch.device, dtype: torch.dtype) -> str:
    """ "auto" at forward time (library use; the trainer resolves at start-up): probe once, warn once."""
    key = (device, dtype)
    name = _AUTO.get(key)
    if name is None:
        choice = select_attn_impl("auto", device, dtype)
        for msg in choice.warnings():
            warnings.warn(msg, stacklevel=2)
        name = _AUTO[key] = choice.name
    return name


def kernel(name: str, device: torch.device, dtype: torch.dtype) -> Callable:
    """The loaded kernel `name` for q on (device, dtype); ValueError naming why when it cannot be used."""
    key = (name, device, dtype)
    fn = _READY.get(key)
    if fn is None:
        select_attn_impl(name, device, dtype)  # the ValueError with the reason
        fn = _READY[key] = probe(name, device, dtype).fn
    return fn


def clear_cache() -> None:
    """Forget every probe (tests that fake a package)."""
    probe.cache_clear()
    _AUTO.clear()
    _READY.clear()

"""engine.models.attn_backends: the start-up probe of the optional attention kernels and its fallbacks.

On CPU the kernels' packages are replaced by fakes (a broken build that fails at import, one that fails
at its first call, one that computes a wrong result, a working one computed with SDPA), and the device
requirement is lifted, so the probe runs its real import / test-call / compare path on CPU tensors."""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from engine.models import attn_backends as ab
from engine.models import build_model

CPU = torch.device("cpu")
UNDEFINED = "/x/flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: undefined symbol: _ZN3c104cuda9SetDeviceEi"


def _sdpa_varlen(q, k, v, cu, causal=True):
    """A correct varlen attention on CPU: (N, nh, hd) with GQA, per document."""
    outs = []
    b = cu.tolist()
    for s, e in zip(b[:-1], b[1:]):
        o = F.scaled_dot_product_attention(
            *(t[s:e].transpose(0, 1)[None] for t in (q, k, v)), is_causal=causal, enable_gqa=True
        )
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


def _flash_module(name, *, honour_causal=True, fail=None):
    """A fake flash-attn-like module: flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, causal)."""
    mod = types.ModuleType(name)

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, causal=False):
        if fail is not None:
            raise fail
        return _sdpa_varlen(q, k, v, cu_q, causal=causal and honour_causal), None  # (out, lse)

    mod.flash_attn_varlen_func = flash_attn_varlen_func
    return mod


def _varlen_module(name, *, gqa_kwarg: bool):
    """A fake torch varlen module; without gqa_kwarg it has 2.11's signature and refuses fewer kv heads."""
    mod = types.ModuleType(name)
    if gqa_kwarg:

        def varlen_attn(q, k, v, cu_q, cu_k, mq, mk, *, window_size=(-1, -1), enable_gqa=False):
            assert enable_gqa and window_size == (-1, 0)
            return _sdpa_varlen(q, k, v, cu_q)
    else:

        def varlen_attn(q, k, v, cu_q, cu_k, mq, mk, *, window_size=(-1, -1)):
            if k.shape[1] != q.shape[1]:
                raise RuntimeError("number of heads in key/value must equal query")
            return _sdpa_varlen(q, k, v, cu_q)

    mod.varlen_attn = varlen_attn
    return mod


class _Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `name` and fails while executing it, as a flash-attn built for another torch does."""

    def __init__(self, name, exc):
        self.name, self.exc = name, exc

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise self.exc


@pytest.fixture
def fakes(monkeypatch):
    """Point the three kernels at fake module names, lift the CUDA requirement, clear the caches."""
    names = {"flash3": "fake_fa3_absent", "flash": "fake_fa2", "varlen": "fake_varlen"}
    monkeypatch.setattr(ab, "MODULES", names)
    monkeypatch.setattr(ab, "_requirement_error", lambda name, device, dtype: None)
    ab.clear_cache()

    def install(kind, module=None, exc=None):
        if exc is not None:
            finder = _Broken(names[kind], exc)
            monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
        else:
            monkeypatch.setitem(sys.modules, names[kind], module)

    yield install
    ab.clear_cache()


@pytest.mark.parametrize(
    "exc",
    [ImportError(UNDEFINED), OSError("libcudart.so.12: cannot open shared object file: No such file")],
    ids=["undefined-symbol", "missing-so"],
)
def test_auto_falls_back_past_a_broken_flash_attn(fakes, exc):
    fakes("flash", exc=exc)
    fakes("varlen", _varlen_module("fake_varlen", gqa_kwarg=True))
    choice = ab.select_attn_impl("auto", CPU, torch.bfloat16)
    assert choice.name == "varlen"
    assert [(p.name, p.status) for p in choice.skipped] == [("flash3", "absent"), ("flash", "broken")]
    text = choice.describe()
    assert text.startswith("attention: varlen (auto)") and str(exc) in text and "not installed" in text
    (warning,) = choice.warnings()  # the absent flash-attn 3 is no warning; the broken flash-attn 2 is
    assert "flash is installed but unusable, falling back to varlen" in warning and str(exc) in warning
    # an explicit request for the broken kernel is an error that says why
    with pytest.raises(ValueError, match="attn_impl='flash' cannot be used: import fake_fa2 failed"):
        ab.select_attn_impl("flash", CPU, torch.bfloat16)


def test_a_kernel_that_fails_or_is_wrong_at_its_test_call_is_skipped(fakes):
    fakes("flash3", _flash_module("fake_fa3_absent", fail=RuntimeError("no kernel image is available")))
    fakes("flash", _flash_module("fake_fa2", honour_causal=False))  # imports, runs, but attends to the future
    choice = ab.select_attn_impl("auto", CPU, torch.bfloat16)
    assert choice.name == "sdpa"  # fake_varlen is absent too: the plain twin is the last resort
    errors = {p.name: p.error for p in choice.skipped}
    assert "no kernel image" in errors["flash3"] and "differs from per-document SDPA" in errors["flash"]
    assert errors["varlen"] == "fake_varlen is not installed"


def test_working_kernels_in_order_and_torch_2_11_varlen_without_enable_gqa(fakes):
    fakes("flash3", _flash_module("fake_fa3_absent"))  # returns (out, lse) like some flash-attn 3 builds
    fakes("varlen", _varlen_module("fake_varlen", gqa_kwarg=False))
    assert ab.select_attn_impl("auto", CPU, torch.bfloat16).name == "flash3"
    # 2.11's varlen_attn has no enable_gqa: the kv heads are repeated, and the result is still right
    assert ab.select_attn_impl("varlen", CPU, torch.bfloat16).name == "varlen"
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(12, h, 8, generator=g) for h in (6, 2, 2))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    out = ab.kernel("varlen", CPU, torch.bfloat16)(q, k, v, cu, 7)
    torch.testing.assert_close(out, _sdpa_varlen(q, k, v, cu))


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_model_forward_uses_the_probed_kernel(fakes, mode):
    """attn_impl names the kernel the model calls; "auto" resolves once at the first forward, whose probe
    (a forward + backward) works even under no_grad / inference_mode."""
    calls = []
    mod = _varlen_module("fake_varlen", gqa_kwarg=True)
    inner = mod.varlen_attn
    mod.varlen_attn = functools.wraps(inner)(lambda *a, **k: calls.append(1) or inner(*a, **k))
    fakes("varlen", mod)
    ids = torch.randint(0, 300, (2, 9))
    torch.manual_seed(0)
    ref = build_model("debug-qwen2", attn_impl="sdpa")
    got = build_model("debug-qwen2", attn_impl="auto")
    got.load_state_dict(ref.state_dict())
    cu = torch.tensor([0, 4, 9, 18], dtype=torch.int32)
    with mode():
        torch.testing.assert_close(got(ids, cu_seqlens=cu), ref(ids, cu_seqlens=cu))
    assert len(calls) == 1 + ref.args.num_layers  # the probe's test call, then one per block


def test_cpu_and_fp32_choose_sdpa_and_explicit_kernels_say_why():
    ab.clear_cache()
    choice = ab.select_attn_impl("auto", CPU, torch.bfloat16)
    assert choice.name == "sdpa" and choice.warnings() == []
    assert (
        choice.describe()
        == "attention: sdpa (auto); not used: flash3, flash, varlen: needs a CUDA device, got cpu"
    )
    for impl in ab.KERNELS:
        with pytest.raises(ValueError, match=f"attn_impl='{impl}' cannot be used: needs a CUDA device"):
            ab.select_attn_impl(impl, CPU, torch.bfloat16)
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        ab.select_attn_impl("eager", CPU, torch.float32)


@pytest.mark.gpu
def test_every_usable_kernel_matches_sdpa_on_gpu():
    """On the GPU: torch's varlen_attn must pass its probe (it ships with torch >= 2.10, whatever the
    version's signature), and every usable kernel gives the SDPA twin's packed logits in bf16."""
    ab.clear_cache()
    dev = torch.device("cuda")
    assert ab.probe("varlen", dev, torch.bfloat16).status == "ok", ab.probe("varlen", dev, torch.bfloat16)
    torch.manual_seed(0)
    ref = build_model("debug-qwen2", attn_impl="sdpa", dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, 300, (2, 64), device="cuda")
    cu = torch.tensor([0, 17, 64, 100, 128], dtype=torch.int32)
    with torch.no_grad():
        want = ref(ids, cu_seqlens=cu).float()
        for name in ab.KERNELS:
            if ab.probe(name, dev, torch.bfloat16).status != "ok":
                continue
            ref.attn_impl = name
            got = ref(ids, cu_seqlens=cu).float()
            assert (got - want).abs().max() < 5e-2, name

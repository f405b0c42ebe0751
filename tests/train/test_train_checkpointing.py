"""Selective activation checkpointing (op-level policy) and the length threshold, checked as torchtitan
does: gradients equal to no checkpointing, and the recompute counted in backward FLOPs
(torch.utils.flop_counter.FlopCounterMode) against the FLOPs of exactly the ops the policy recomputes."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from engine.config import parse_config
from engine.models import build_model, clean_param_name
from engine.parallel import SAC_MATMULS, apply_activation_checkpointing

pytestmark = pytest.mark.usefixtures("one_thread")


class OpLog(TorchDispatchMode):
    """Every op called, in order, and the FLOPs of every matmul (2 M K N; addmm's bias not counted, as in
    FlopCounterMode)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.flops: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        if func._schema.name in SAC_MATMULS:
            a, b = args[-2:]  # mm(a, b), addmm(bias, a, b)
            self.flops.append(2 * a.shape[0] * a.shape[1] * b.shape[1])
        return func(*args, **(kwargs or {}))

    def attention_forwards(self) -> int:
        return sum(n.startswith("aten::_scaled_dot_product") and "backward" not in n for n in self.names)


def _batch(T: int, B: int = 2, seed: int = 0):
    """B packed rows of T tokens, 3 documents each (boundaries in cu_seqlens), aligned labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (B, T), generator=g)
    labels = torch.randint(0, 256, (B, T), generator=g)
    cuts = [0, T // 5, T // 2, T]
    cu = torch.tensor([r * T + c for r in range(B) for c in cuts[:-1]] + [B * T], dtype=torch.int32)
    return ids, labels, cu


def _grads_and_backward_flops(model, T: int):
    """Gradients, the FLOPs of backward, and how many attention forwards backward re-ran."""
    ids, labels, cu = _batch(T)
    model.zero_grad()
    loss = model(ids, cu_seqlens=cu, max_seqlen=T - T // 2, labels=labels)
    with FlopCounterMode(display=False) as fc, OpLog() as ops:
        loss.backward()
    grads = {clean_param_name(n): p.grad.clone() for n, p in model.named_parameters()}
    return grads, fc.get_total_flops(), ops.attention_forwards()


def _pair(**ac):
    torch.manual_seed(0)
    ref = build_model("debug-qwen2")
    model = build_model("debug-qwen2")
    model.load_state_dict(ref.state_dict())
    assert apply_activation_checkpointing(model, **ac) == [0, 1]
    return ref, model


def test_selective_checkpointing_same_grads_recomputes_every_other_matmul():
    ref, sac = _pair(selective=True)
    _, full = _pair()
    T = 48
    g_ref, f_ref, a_ref = _grads_and_backward_flops(ref, T)
    g_sac, f_sac, a_sac = _grads_and_backward_flops(sac, T)
    for n, g in g_ref.items():
        torch.testing.assert_close(g_sac[n], g, rtol=0, atol=0, msg=n)
    # A Qwen2 block's matmuls in forward order: q, k, v, o, gate, up, down. The policy keeps the 1st, 3rd,
    # ... and recomputes k, o, up.
    ids, labels, cu = _batch(T)
    with torch.no_grad(), OpLog() as fwd:
        ref(ids, cu_seqlens=cu, labels=labels)
    n_layers = len(ref.model.layers)
    assert len(fwd.flops) == 7 * n_layers + 1  # + the output projection of the loss
    per_block = fwd.flops[:7]
    assert f_sac - f_ref == sum(per_block[1::2]) * n_layers
    # Attention outputs are kept: backward re-runs no attention forward (full checkpointing re-runs each
    # document's, 3 per row x 2 rows x 2 blocks; FlopCounterMode has no formula for the CPU SDPA kernel).
    assert a_ref == a_sac == 0 and fwd.attention_forwards() == 12
    # Full checkpointing recomputes every matmul but the last (down: no backward formula reads its
    # output, and non-reentrant checkpointing stops recomputing once it has what backward needs).
    _, f_full, a_full = _grads_and_backward_flops(full, T)
    assert f_full - f_ref == sum(per_block[:-1]) * n_layers and a_full == 12


def test_min_tokens_skips_short_micro_batches():
    """A micro-batch under the threshold is not checkpointed (no recompute), one at or over it is."""
    ref, thr = _pair(min_tokens=100)
    _, full = _pair()
    for T, checkpointed in ((32, False), (64, True)):  # B = 2: 64 and 128 tokens
        g_ref, f_ref, _ = _grads_and_backward_flops(ref, T)
        g_thr, f_thr, _ = _grads_and_backward_flops(thr, T)
        _, f_full, _ = _grads_and_backward_flops(full, T)
        for n, g in g_ref.items():
            torch.testing.assert_close(g_thr[n], g, rtol=0, atol=0, msg=n)
        assert f_full > f_ref
        assert f_thr == (f_full if checkpointed else f_ref)


@pytest.mark.parametrize(
    "value, expect", [("true", True), ("false", False), ("selective", "selective"), ("1", True)]
)
def test_gradient_checkpointing_flag_takes_bool_or_selective(tmp_path, value, expect):
    cfg = parse_config(["--dataset", "a", "--gradient_checkpointing", value])
    assert cfg.train.gradient_checkpointing == expect
    if value != "1":  # yaml reads true/false as bools, 1 as an int (refused, as for every bool key)
        f = tmp_path / "c.yaml"
        f.write_text(f"dataset: a\ngradient_checkpointing: {value}\n")
        assert parse_config(["--config", str(f)]).train.gradient_checkpointing == expect
    with pytest.raises(ValueError, match="'gradient_checkpointing'.*selective"):
        parse_config(["--dataset", "a", "--gradient_checkpointing", "sometimes"])

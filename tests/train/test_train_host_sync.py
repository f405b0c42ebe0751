"""No host syncs per micro-batch on the training hot path.

A GPU is not needed to see one: every op that makes the host wait for the device either reads a value
(aten._local_scalar_dense: .item(), bool(t), int(t), float(t)), copies a tensor to the CPU (.cpu(),
.tolist(), .to("cpu"), numpy()), or has an output shape that depends on values (nonzero, masked_select,
unique, repeat_interleave without output_size). The model is run on the meta device, where none of these
can be answered without data; a dispatch mode counts each one (with the Python line that caused it) and
answers with a dummy, so one run reports all of them. The attention backend is the GPU one (varlen_attn,
which has a meta implementation), not the CPU twin, which reads the boundaries on the host by design.
"""

from __future__ import annotations

import functools
import traceback

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import engine.models.attention as attention
import engine.models.attn_backends as attn_backends
import engine.step as step_mod
import kernels
from engine.data import collate_rows
from engine.models import build_model
from engine.objectives import SFTObjective
from engine.parallel import apply_activation_checkpointing, apply_neftune

DATA_DEPENDENT = {"aten::nonzero", "aten::masked_select", "aten::unique_dim", "aten::_unique2"}


class HostSyncCounter(TorchDispatchMode):
    """Records every device -> host read or copy, and every op whose output shape depends on values."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[tuple[str, str]] = []  # (op, the innermost line of engine/ or kernels/ code)

    def _record(self, op: str) -> None:
        frames = [
            f for f in traceback.extract_stack() if "/engine/" in f.filename or "/kernels/" in f.filename
        ]
        self.syncs.append((op, f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name == "aten::_local_scalar_dense" and args[0].device.type != "cpu":
            self._record(name)
            return 0
        if name == "aten::_to_copy" and args[0].device.type != "cpu":
            dst = kwargs.get("device")
            if dst is not None and torch.device(dst).type == "cpu":
                self._record("copy to cpu")
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        dependent = name in DATA_DEPENDENT or (  # repeats given as a tensor: the output length is its sum
            name == "aten::repeat_interleave"
            and func._overloadname in ("Tensor", "self_Tensor")
            and "output_size" not in kwargs
        )
        if dependent and args[0].device.type != "cpu":
            self._record(name)
            raise RuntimeError(f"{name}: output shape depends on values (a host sync)")
        return func(*args, **kwargs)


def _micro_batches(n: int, seed: int = 0) -> list[dict]:
    """n packed micro-batches of 1 row x 3 documents (one of them a prompt without targets)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        docs = []
        for length in rng.integers(8, 40, 3).tolist():
            ids = rng.integers(0, 256, length)
            labels = ids.copy()
            labels[: length // 3] = -100
            docs.append((ids, labels))
        out.append(collate_rows([docs], length=128, pad_token_id=0))
    return out


@pytest.fixture
def hot_path_model(monkeypatch):
    """The trainer's model on meta: bf16, NEFTune, full activation checkpointing, the untied
    [norm, lm_head] head, GPU attention. The loss is the plain one (default_loss_fn): on a GPU the trainer
    runs the Triton kernel with check_labels=False, which cannot run on meta (its own tests cover it), and
    the kernel's CPU twin reads a flag on CPU tensors on purpose (free there; skipped for CUDA tensors)."""
    monkeypatch.setattr(attention, "resolve_attn_impl", lambda impl, device, dtype: "varlen")
    # varlen_attn has a meta implementation; the start-up probe (CUDA only) is what it skips here
    monkeypatch.setattr(attention, "kernel", lambda name, device, dtype: attn_backends._load("varlen"))
    model = build_model("debug-glm4", device="meta", dtype=torch.bfloat16, attn_impl="varlen")
    apply_neftune(model, alpha=5.0)
    apply_activation_checkpointing(model)
    model.train()
    return model


def test_no_host_sync_in_forward_backward(hot_path_model):
    meta = torch.device("meta")
    for mb in _micro_batches(2):
        b = step_mod.to_device(mb, meta)
        with HostSyncCounter() as counter:
            loss = hot_path_model(
                b["input_ids"], b["position_ids"], b["cu_seqlens"], b["max_seqlen"], labels=b["labels"]
            )
            (loss / 100.0).backward()
        assert counter.syncs == []
        assert hot_path_model.lm_head.weight.grad is not None  # the backward really ran


def test_host_syncs_per_step_do_not_grow_with_micro_batches(hot_path_model, monkeypatch):
    """engine.step.forward_backward: the two per-step reads (the all-reduced token counts before the
    forwards, the loss after them) and none per micro-batch. Collectives are no-ops here (meta tensors)."""
    monkeypatch.setattr(step_mod.dist, "all_reduce", lambda *a, **k: None)
    counts = []
    for n in (1, 4):
        with HostSyncCounter() as counter:
            step_mod.forward_backward(
                hot_path_model, _micro_batches(n), SFTObjective("long-ce"), device=torch.device("meta")
            )
        assert all(where.startswith(step_mod.__file__) for _, where in counter.syncs), counter.syncs
        counts.append(len(counter.syncs))
    assert counts == [2, 2]


def test_the_counter_sees_host_syncs(hot_path_model):
    """The check can fail: position_ids without cu_seqlens make the model read the boundaries on the
    host, and the fused loss's label range check reads a flag back."""
    b = step_mod.to_device(_micro_batches(1)[0], torch.device("meta"))
    with HostSyncCounter() as counter:
        hot_path_model(b["input_ids"], b["position_ids"], labels=b["labels"])
    assert [op for op, _ in counter.syncs] == ["copy to cpu"]
    assert "attention.py" in counter.syncs[0][1]
    hot_path_model.loss_fn = functools.partial(kernels.linear_cross_entropy, impl="torch", check_labels=True)
    with HostSyncCounter() as counter:
        hot_path_model(
            b["input_ids"], b["position_ids"], b["cu_seqlens"], b["max_seqlen"], labels=b["labels"]
        )
    assert counter.syncs and all("kernels" in where for _, where in counter.syncs)

"""GPU twins of the CPU checks of issue 12's "Would be slow" items (skipped without CUDA): the hot path
under CUDA's own sync detector, and torch.compile (inductor, varlen attention) against eager in bf16."""

from __future__ import annotations

import functools

import pytest
import torch

import kernels
from engine.data import collate_rows
from engine.models import build_model
from engine.parallel import apply_activation_checkpointing, apply_compile, apply_neftune
from engine.step import to_device

pytestmark = pytest.mark.gpu


def _micro_batches(n: int, T: int = 512, vocab: int = 256) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for k in range(n):
        lengths = [T // 2 - 7 * k, T // 4 + 5 * k, 40]  # packed rows of varying length and document count
        docs = []
        for n_tok in lengths[: 2 + k % 2]:
            ids = torch.randint(0, vocab, (n_tok,), generator=g).numpy()
            docs.append((ids, ids.copy()))
        out.append(collate_rows([docs], pad_token_id=0))
    return out


def _model(compile_: bool, selective: bool = False):
    torch.manual_seed(0)
    model = build_model("debug-glm4", device="cuda", dtype=torch.bfloat16, attn_impl="varlen")
    model.loss_fn = functools.partial(kernels.linear_cross_entropy, reduction="sum", check_labels=False)
    apply_neftune(model, alpha=5.0)
    apply_activation_checkpointing(model, selective=selective)
    if compile_:
        apply_compile(model)
    return model.train()


def test_hot_path_never_syncs_under_cuda_sync_debug_mode():
    """forward + backward of packed micro-batches (NEFTune, checkpointing, varlen attention, the Triton
    loss) with torch.cuda.set_sync_debug_mode("error"): any synchronising call raises."""
    model = _model(compile_=False)
    device = torch.device("cuda")
    batches = [to_device(mb, device) for mb in _micro_batches(4)]
    warm = batches.pop(0)  # first calls may sync once (Triton compile and autotune): not the steady state
    model(
        warm["input_ids"], warm["position_ids"], warm["cu_seqlens"], warm["max_seqlen"], labels=warm["labels"]
    ).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in batches:
            loss = model(
                b["input_ids"], b["position_ids"], b["cu_seqlens"], b["max_seqlen"], labels=b["labels"]
            )
            (loss / 1000.0).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item()


@pytest.mark.parametrize("selective", [False, True])
def test_compiled_blocks_match_eager_bf16(selective):
    from torch._dynamo.utils import counters

    device = torch.device("cuda")
    losses = {}
    for compile_ in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = _model(compile_, selective)
        torch.manual_seed(1)  # the same NEFTune noise in both runs
        out = []
        for mb in _micro_batches(4):
            b = to_device(mb, device)
            loss = model(
                b["input_ids"], b["position_ids"], b["cu_seqlens"], b["max_seqlen"], labels=b["labels"]
            )
            loss.backward()
            out.append(loss.item())
        losses[compile_] = out
        if compile_:
            assert 1 <= counters["stats"]["unique_graphs"] <= 2
    torch._dynamo.reset()
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)

"""engine.parallel.apply_fsdp's layout (torchtitan's): which parameters share an FSDP unit, which units
reshard after forward, no input casts; and on 2 gloo ranks, gradients and per-token losses equal to one
process for an untied model (loss inside the [norm, lm_head] unit) and a tied one (loss in the root)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from dist_testlib import run_on_gloo_ranks

import kernels
from engine.models import build_model, clean_param_name
from engine.parallel import apply_activation_checkpointing, apply_fsdp


def fsdp_states(model) -> list:
    """The FSDP2 state of every unit (FSDP2's private state: the public API does not expose the layout)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    states = []
    for m in model.modules():
        state = fully_shard.state(m) if isinstance(m, FSDPModule) else None
        if state is not None and state._fsdp_param_group is not None and state not in states:
            states.append(state)
    return states


def fsdp_units(model) -> dict[frozenset[str], bool]:
    """Parameter names of every unit -> whether it reshards after forward (read after FSDP's lazy init)."""
    return {
        frozenset(clean_param_name(p._param_fqn) for p in s._fsdp_param_group.fsdp_params): (
            s._fsdp_param_group.post_forward_mesh_info is not None
        )
        for s in fsdp_states(model)
    }


def _sharded(flavour: str, mesh, ref=None, dtype=torch.float32):
    model = build_model(flavour, device="meta")
    model.loss_fn = functools.partial(kernels.linear_cross_entropy, reduction="sum", impl="torch")
    apply_activation_checkpointing(model)
    apply_fsdp(model, mesh, param_dtype=dtype)
    model.to_empty(device="cpu")
    if ref is not None:
        from engine.parallel import load_full_tensors_

        load_full_tensors_(model, ref.state_dict().items())
    return model


@pytest.fixture
def one_rank_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


@pytest.mark.parametrize("flavour", ["debug-glm4", "debug-qwen2"])
def test_fsdp_units_and_reshard_settings(one_rank_mesh, flavour):
    torch.manual_seed(0)
    ref = build_model(flavour)
    model = _sharded(flavour, one_rank_mesh, ref)
    ids = torch.randint(0, 256, (1, 24))
    model(ids, labels=ids)  # FSDP's lazy init decides the root's setting
    block = [frozenset(n for n, _ in ref.named_parameters() if f"layers.{i}." in n) for i in (0, 1)]
    expect = {block[0]: True, block[1]: False}  # the last block is needed at once by backward
    if ref.lm_head is not None:
        expect[frozenset({"model.norm.weight", "lm_head.weight"})] = False  # gathered for the loss + backward
        expect[frozenset({"model.embed_tokens.weight"})] = False  # the root, at FSDP's default
    else:  # tied: the output weight is the embedding, so norm and loss stay with the root
        expect[frozenset({"model.embed_tokens.weight", "model.norm.weight"})] = False
    assert fsdp_units(model) == expect
    bf16 = fsdp_states(_sharded(flavour, one_rank_mesh, dtype=torch.bfloat16))
    assert len(bf16) == len(expect)
    assert {(s._mp_policy.param_dtype, s._mp_policy.cast_forward_inputs) for s in bf16} == {
        (torch.bfloat16, False)
    }
    assert not any(s._mp_policy.cast_forward_inputs for s in fsdp_states(model))


def _batch(B=4, T=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (B, T), generator=g)
    labels = torch.randint(0, 256, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = -100
    labels[2:, : T // 2] = -100  # uneven target counts between the two ranks' rows
    return ids, labels


def _check(rank: int, world: int, flavour: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    ref = build_model(flavour)
    ref.loss_fn = functools.partial(kernels.linear_cross_entropy, reduction="sum", impl="torch")
    model = _sharded(flavour, init_device_mesh("cpu", (world,)), ref)
    ids, labels = _batch()
    ref_loss = ref(ids, labels=labels) / (labels != -100).sum()
    ref_loss.backward()
    rows = slice(rank * len(ids) // world, (rank + 1) * len(ids) // world)
    count = (labels != -100).sum()  # the all-reduced long-ce normaliser (the whole batch's targets)
    loss = model(ids[rows], labels=labels[rows]) / count
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), p_ref.grad, rtol=1e-5, atol=1e-6, msg=name)
    # reduction="none": per-token losses through the same unit (DPO's per-sequence log-probs)
    per_token = functools.partial(kernels.linear_cross_entropy, reduction="none", impl="torch")
    ref.loss_fn = model.loss_fn = per_token
    with torch.no_grad():
        mine, full = model(ids[rows], labels=labels[rows]), ref(ids, labels=labels)
    torch.testing.assert_close(mine, full.view(len(ids), -1)[rows].flatten(), rtol=1e-5, atol=1e-6)


def _both_flavours(rank: int, world: int) -> None:
    torch.set_num_threads(1)
    for flavour in ("debug-glm4", "debug-qwen2"):  # untied, tied
        _check(rank, world, flavour)


@pytest.mark.dist
def test_fsdp_layout_two_ranks_equal_single_process(tmp_path):
    run_on_gloo_ranks(_both_flavours, 2, str(tmp_path / "store"))

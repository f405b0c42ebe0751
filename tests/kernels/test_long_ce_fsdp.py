"""long-ce under FSDP2 on 2 gloo ranks: the loss is computed inside the forward of the module that owns the
output weight (where FSDP has all-gathered it), and the gradients equal a single process's.

Normalisation: every rank returns sum(token losses) / (all-reduced number of target tokens) and FSDP's
gradient averaging is turned off (set_gradient_divide_factor(1.0) + set_force_sum_reduction_for_comms(True):
the reduce-scatter is a plain SUM on NCCL and gloo alike; gloo would otherwise sum where NCCL averages,
pytorch#162338), so the summed gradient is d(global sum / global count).
"""

import pytest
import torch
import torch.distributed as dist
from dist_testlib import run_on_gloo_ranks
from torch import nn

from kernels import linear_cross_entropy

V, H, B, T = 96, 16, 4, 10


class LMHeadWithLoss(nn.Linear):
    """lm_head as its own FSDP unit: its forward returns the loss, so the gather happens around it."""

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(hidden, self.weight, labels, reduction="sum", impl="torch")


class TinyLM(nn.Module):
    """head_unit=True: lm_head is its own FSDP unit and returns the loss (the engine's LMHead).  False:
    lm_head stays in the root's unit and the root forward computes the loss with its weight (the engine's
    pattern for tied embeddings)."""

    def __init__(self, head_unit: bool) -> None:
        super().__init__()
        self.head_unit = head_unit
        self.embed = nn.Embedding(V, H)
        self.block = nn.Linear(H, H)
        self.lm_head = (LMHeadWithLoss if head_unit else nn.Linear)(H, V, bias=False)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.block(self.embed(ids))).flatten(0, 1)  # (B*T, H)
        if self.head_unit:
            return self.lm_head(hidden, labels.flatten())
        return linear_cross_entropy(
            hidden, self.lm_head.weight, labels.flatten(), reduction="sum", impl="torch"
        )


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = -100
    labels[2:] = -100  # rank 1 gets few targets: uneven counts must still weigh every token the same
    labels[3, 0] = 5
    return ids, labels


def _check_variant(rank: int, world: int, head_unit: bool) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    ref = TinyLM(head_unit)
    model = TinyLM(head_unit)
    model.load_state_dict(ref.state_dict())
    ids, labels = _batch()

    # Single-process truth: global sum / global count over the whole batch.
    ref_loss = ref(ids, labels) / (labels != -100).sum()
    ref_loss.backward()

    units = (model.block, model.lm_head, model) if head_unit else (model.block, model)
    for module in units:
        fully_shard(module)
        # No averaging, and plain SUM collectives (a factor alone becomes PREMUL_SUM, which gloo lacks).
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    rows = slice(rank * B // world, (rank + 1) * B // world)
    count = (labels[rows] != -100).sum()  # this rank's targets
    dist.all_reduce(count)  # global target-token count, the long-ce normaliser
    loss = model(ids[rows], labels[rows]) / count
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    # Outside the forward the weight is a sharded DTensor: refused with guidance, not silently wrong.
    try:
        linear_cross_entropy(torch.zeros(2, H), model.lm_head.weight, torch.zeros(2, dtype=torch.long))
    except ValueError as e:
        assert "DTensor" in str(e)
    else:
        raise AssertionError("a sharded weight was accepted")
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), p_ref.grad, rtol=1e-5, atol=1e-6, msg=name)


def _both_variants(rank: int, world: int) -> None:
    for head_unit in (True, False):
        _check_variant(rank, world, head_unit)


@pytest.mark.dist
def test_fsdp2_gloo_gradients_equal_single_process(tmp_path):
    run_on_gloo_ranks(_both_variants, 2, str(tmp_path / "store"))

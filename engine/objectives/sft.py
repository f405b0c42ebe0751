"""SFT: long-ce (every target token of the global step weighs the same) or the per-micro-batch "mean"."""

from __future__ import annotations

import torch

from engine.step import model_loss


class SFTObjective:
    """loss_name "long-ce": sum(token losses) / (target tokens of the whole step, all ranks); "mean": each
    micro-batch's own token mean, averaged over the step's micro-batches that have targets (filler ones have
    none). Evaluation is always the token mean over the whole set."""

    reduction = "sum"
    n_stats = 2  # [sum of token losses, sum of the "mean" contributions]

    def __init__(self, loss_name: str = "long-ce"):
        if loss_name not in ("long-ce", "mean"):
            raise ValueError(f"loss_name must be 'long-ce' or 'mean', got {loss_name!r}")
        self.loss_name = loss_name

    def counts(self, micro_batches: list[dict]) -> list[float]:
        return [
            sum(mb["num_target_tokens"] for mb in micro_batches),
            sum(mb["num_target_tokens"] > 0 for mb in micro_batches),  # filler micro-batches have none
        ]

    def loss(self, model, batch: dict, mb: dict, counts: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        n_target, n_nonempty = counts
        loss_sum = model_loss(model, batch)
        n_mean = max(n_nonempty, 1.0)
        mean = loss_sum / max(mb["num_target_tokens"], 1) / n_mean
        stats = torch.stack([loss_sum.detach(), mean.detach() * n_mean]).double()
        if self.loss_name == "long-ce":
            return loss_sum / max(n_target, 1.0), stats  # every target token weighs 1 / n_target
        return mean, stats

    def summary(self, stats: list[float], counts: list[float], training: bool = True) -> dict:
        n_target, n_nonempty = counts
        if not training or self.loss_name == "long-ce":
            loss = stats[0] / max(n_target, 1.0)
        else:
            loss = stats[1] / max(n_nonempty, 1.0)
        return {"loss": loss, "num_tokens": int(n_target)} if training else {"loss": loss}

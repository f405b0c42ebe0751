"""SFT: long-ce (every target token of the global step weighs the same), the per-micro-batch "mean", or
"sequence" (every document of the global step weighs the same)."""

from __future__ import annotations

import torch

from engine.step import model_loss

LOSS_NAMES = ("long-ce", "mean", "sequence")


def document_targets(mb: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host-side, from a micro-batch's labels and cu_seqlens: (is_target (B*T,) bool, document of each token
    (B*T,), target count of each document). Labels never cross a document."""
    is_target = mb["labels"].flatten() != -100
    cu = mb["cu_seqlens"].long()
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1), cu.diff())
    counts = torch.zeros(len(cu) - 1, dtype=torch.float64).index_add_(0, seg, is_target.double())
    return is_target, seg, counts


class SFTObjective:
    """loss_name "long-ce": sum(token losses) / (target tokens of the whole step, all ranks); "mean": each
    micro-batch's own token mean, averaged over the step's micro-batches that have targets (filler ones have
    none); "sequence" (THUDM LongAlign / LongWriter's pack loss): sum over documents of (its mean token loss)
    / (documents with targets in the step, all ranks). Evaluation is always the token mean over the whole set.
    """

    n_stats = 3  # [sum of token losses, sum of the "mean" contributions, sum of document means]

    def __init__(self, loss_name: str = "long-ce"):
        if loss_name not in LOSS_NAMES:
            raise ValueError(f"loss_name must be one of {LOSS_NAMES}, got {loss_name!r}")
        self.loss_name = loss_name
        # "sequence" weighs each token by its document: model.loss_fn returns per-token losses
        self.reduction = "none" if loss_name == "sequence" else "sum"

    def counts(self, micro_batches: list[dict]) -> list[float]:
        docs = (
            sum(int((document_targets(mb)[2] > 0).sum()) for mb in micro_batches)
            if self.reduction == "none"
            else 0
        )
        return [
            sum(mb["num_target_tokens"] for mb in micro_batches),
            sum(mb["num_target_tokens"] > 0 for mb in micro_batches),  # filler micro-batches have none
            docs,
        ]

    def loss(self, model, batch: dict, mb: dict, counts: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        n_target, n_nonempty, n_docs = counts
        out = model_loss(model, batch)  # a sum, or per-token losses (B*T,) for "sequence"
        doc_sum = torch.zeros((), dtype=torch.float64, device=out.device)
        if self.reduction == "none":
            is_target, seg, per_doc = document_targets(mb)
            weights = torch.where(is_target, 1.0 / per_doc[seg].clamp(min=1.0), 0.0)  # 1 / own doc's count
            doc_sum = (out.double() * weights.to(out.device, non_blocking=True)).sum()
            out = out.sum()
        loss_sum = out
        n_mean = max(n_nonempty, 1.0)
        mean = loss_sum / max(mb["num_target_tokens"], 1) / n_mean
        stats = torch.stack([loss_sum.detach().double(), mean.detach().double() * n_mean, doc_sum.detach()])
        if self.loss_name == "long-ce":
            return loss_sum / max(n_target, 1.0), stats  # every target token weighs 1 / n_target
        if self.loss_name == "sequence":
            return (doc_sum / max(n_docs, 1.0)).to(loss_sum.dtype), stats
        return mean, stats

    def summary(self, stats: list[float], counts: list[float], training: bool = True) -> dict:
        n_target, n_nonempty, n_docs = counts
        if not training or self.loss_name == "long-ce":
            loss = stats[0] / max(n_target, 1.0)
        elif self.loss_name == "sequence":
            loss = stats[2] / max(n_docs, 1.0)
        else:
            loss = stats[1] / max(n_nonempty, 1.0)
        return {"loss": loss, "num_tokens": int(n_target)} if training else {"loss": loss}

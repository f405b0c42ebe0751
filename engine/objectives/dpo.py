"""DPO (Rafailov et al. 2023) on packed pairs, with TRL's sigmoid / IPO / hinge losses, conservative label
smoothing and the RPO NLL term.

A micro-batch holds whole pairs: documents 2p and 2p + 1 are pair p's chosen and rejected (engine.data
.preference). model.loss_fn is kernels.linear_cross_entropy with reduction="none": per-token losses [B * T]
through the fused kernel (no [T, V] logits), and a response's log-probability is minus the sum of its target
tokens' losses, accumulated per document in float64. The step loss is the mean over every pair of the step on
every rank (the pair count is all-reduced before the forwards), plus rpo_alpha times the token-mean NLL of all
the step's chosen responses:

    logits = (pi_c - pi_r) - (ref_c - ref_r)                  pi, ref: summed response log-probs
    sigmoid: -(1 - ls) * logsigmoid(beta * logits) - ls * logsigmoid(-beta * logits)
    hinge:   relu(1 - beta * logits)
    ipo:     (logits - 1 / (2 * beta)) ** 2                   with log-probs averaged per response token
    rewards/chosen = beta * (pi_c - ref_c), rewards/rejected = beta * (pi_r - ref_r)

(TRL's DPOTrainer.dpo_loss and get_batch_loss_metrics up to v0.28, which ms-swift's `rlhf` wraps; IPO's
per-token averaging of the log-probs, rewards and logps/* metrics included.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.step import model_loss

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_pair_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair DPO losses [P] from per-sequence log-probs [P] (already length-averaged for IPO)."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(
            -beta * logits
        )
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def document_index(mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(token -> document [B * T] long, padding -> D; target tokens per document [D]) of a collated
    micro-batch, on the host. Documents are the cu_seqlens segments that hold targets (every response has
    one; padding and filler rows have none), in order, so their count must equal len(doc_lengths)."""
    if "_doc_index" not in mb:  # memoised: counts() and loss() both need it
        seg_len = (mb["cu_seqlens"][1:] - mb["cu_seqlens"][:-1]).long()
        seg = torch.repeat_interleave(torch.arange(len(seg_len)), seg_len)  # [B * T]
        is_target = (mb["labels"].reshape(-1) != -100).long()
        seg_targets = torch.zeros(len(seg_len), dtype=torch.long).index_add_(0, seg, is_target)
        real = seg_targets > 0
        n_docs = int(real.sum())
        assert n_docs == len(mb["doc_lengths"]) and n_docs % 2 == 0, "a document without response tokens"
        doc_of_seg = torch.where(real, real.cumsum(0) - 1, n_docs)
        mb["_doc_index"] = (doc_of_seg[seg], seg_targets[real])
    return mb["_doc_index"]


def document_log_probs(model, batch: dict, tok_doc: torch.Tensor, n_docs: int) -> torch.Tensor:
    """Summed log-probs of each document's target tokens [D] (float64), from per-token losses."""
    tok_loss = model_loss(model, batch)  # [B * T] fp32, 0 where labels are -100
    sums = torch.zeros(n_docs + 1, dtype=torch.float64, device=tok_loss.device)
    return -sums.index_add(0, tok_doc.to(tok_loss.device), tok_loss.double())[:n_docs]


class DPOObjective:
    """The DPO objective for engine.step. Reference log-probs come from `ref_model` (frozen, FSDP-sharded
    like the policy, run under no_grad) or, when it is None, from each micro-batch's "ref_logps" [P, 2]
    (precomputed: engine.reference)."""

    reduction = "none"
    # [sum of pair losses, rewards/chosen, rewards/rejected, accuracies, margins, logps/chosen,
    #  logps/rejected, chosen NLL sum]
    n_stats = 8

    def __init__(
        self,
        *,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        rpo_alpha: float | None = None,
        ref_model=None,
    ):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.rpo_alpha, self.ref_model = rpo_alpha, ref_model

    def counts(self, micro_batches: list[dict]) -> list[float]:
        pairs = chosen_tokens = tokens = 0
        for mb in micro_batches:
            _, doc_targets = document_index(mb)
            pairs += len(doc_targets) // 2
            chosen_tokens += int(doc_targets[0::2].sum())
            tokens += int(doc_targets.sum())
        return [pairs, chosen_tokens, tokens]

    def reference(self, batch: dict, mb: dict) -> torch.Tensor:
        tok_doc, doc_targets = document_index(mb)
        if self.ref_model is None:
            return mb["ref_logps"].reshape(-1).to(batch["labels"].device, torch.float64)
        with torch.no_grad():
            return document_log_probs(self.ref_model, batch, tok_doc, len(doc_targets))

    def loss(self, model, batch: dict, mb: dict, counts: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        n_pairs, n_chosen_tokens, _ = counts
        tok_doc, doc_targets = document_index(mb)
        ref = self.reference(batch, mb)
        logps = document_log_probs(model, batch, tok_doc, len(doc_targets))  # [2P]: chosen, rejected, ...
        nll_sum = -logps[0::2].sum()
        if self.loss_type == "ipo":  # TRL averages IPO's log-probs over the response tokens
            scale = doc_targets.to(logps.device, torch.float64)
            logps, ref = logps / scale, ref / scale
        pc, pr, rc, rr = logps[0::2], logps[1::2], ref[0::2], ref[1::2]
        losses = dpo_pair_losses(
            pc, pr, rc, rr, beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing
        )
        loss = losses.sum() / max(n_pairs, 1.0)
        if self.rpo_alpha is not None:
            loss = loss + self.rpo_alpha * nll_sum / max(n_chosen_tokens, 1.0)
        with torch.no_grad():
            rewards_c, rewards_r = self.beta * (pc - rc), self.beta * (pr - rr)
            sums = [
                losses,
                rewards_c,
                rewards_r,
                rewards_c > rewards_r,
                rewards_c - rewards_r,
                pc,
                pr,
                nll_sum,
            ]
            stats = torch.stack([x.sum().double() for x in sums])
        return loss, stats

    def summary(self, stats: list[float], counts: list[float], training: bool = True) -> dict:
        n_pairs, n_chosen_tokens, tokens = counts
        p, c = max(n_pairs, 1.0), max(n_chosen_tokens, 1.0)
        names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
        out = {"loss": stats[0] / p + (self.rpo_alpha * stats[7] / c if self.rpo_alpha is not None else 0.0)}
        out.update({name: v / p for name, v in zip(names + ("logps/chosen", "logps/rejected"), stats[1:7])})
        if self.rpo_alpha is not None:
            out["nll_loss"] = stats[7] / c
        if training:
            out.update(num_tokens=int(tokens), pairs=int(n_pairs))
        return out

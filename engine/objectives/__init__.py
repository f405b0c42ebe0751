"""Training objectives: how one optimizer step's micro-batches become a loss, for the one loop in engine/train.py.

An objective is an object with

    reduction: str                        the reduction its model.loss_fn must use ("sum" | "none")
    n_stats: int                          length of the statistics vector loss() returns
    counts(micro_batches) -> list[float]  this rank's normalising counts of the step (engine.step all-reduces
                                          them before any forward, so the split into micro-batches and ranks
                                          does not change the loss)
    loss(model, batch, mb, counts) -> (loss, stats)
                                          one micro-batch: the tensor to back-propagate (already divided by
                                          the global counts) and a float64 [n_stats] vector of detached sums
                                          (batch: the micro-batch on the device; mb: the host copy)
    summary(stats, counts, training) -> dict
                                          the metrics of a step (training) or of an evaluation pass from the
                                          all-reduced stats and counts; always has "loss"

engine.step drives it (counts -> all-reduce -> per micro-batch loss + backward -> all-reduce of the stats ->
summary); train.py picks the objective (SFTObjective, or DPOObjective for --rlhf_type dpo) and never forks.
"""

from engine.objectives.dpo import DPOObjective, dpo_pair_losses
from engine.objectives.sft import SFTObjective

__all__ = ["DPOObjective", "SFTObjective", "dpo_pair_losses"]

"""StepLoader: one optimizer step's micro-batches for this rank, identical documents whatever the split.

The epoch plan (packed rows, or one row per sample when packing=False) depends only on (seed, epoch,
sample lengths, max_length). Optimizer step k takes plan rows [k * G, (k + 1) * G) with
G = world_size * gradient_accumulation_steps * batch_size; only then are those G rows dealt out
(deal_rows): sorted by token count and cut into micro-batches of batch_size rows (so rows of similar
length share a micro-batch and padding stays small), the micro-batches sorted by estimated cost, and
micro-batch j goes to rank j % world_size as accumulation step j // world_size. So 1x4, 2x2 and 4x1
(ranks x accumulation) see the same documents in step k, and the micro-batches that the ranks run at the
same time (every FSDP collective waits for the slowest) cost about the same.

Cost of a micro-batch, in matmul-token equivalents: its B * T tokens (padding included) plus
ATTENTION_WEIGHT x the sum of its documents' (and padding segments') squared lengths. The weight is the
FLOP ratio of causal attention to the matmuls (engine.metrics.step_flops): n_layers * d_q / matmul
parameters, 1.42e-5 for Qwen2-7B, 1.75e-5 for Llama-3.1-8B, 1.87e-5 for GLM-4-9B, 4.35e-5 for
Qwen2.5-0.5B; flash attention runs at a lower FLOP rate than the GEMMs, which the default (2e-5) leans
towards. What balancing leaves is measured per step (cost_spread: the slowest rank's excess over the
mean, summed over accumulation steps) and simulated at 8 ranks by benchmarks.bench_data.

Last partial step (fewer than G rows left): with drop_last=False it is kept and completed with filler
rows (padding only, every label -100), so every rank runs the same number of micro-batches and no
collective hangs; with drop_last=True it is dropped. An empty dataset, or one with fewer than G rows
when drop_last=True, is a ValueError.

Resume: state_dict() records (epoch, next step); after the last step of epoch e it reads (e + 1, 0).
set_epoch(e) keeps the position when e is the current epoch (as after load_state_dict), else starts e
at step 0.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from engine.data.packing import collate_rows, pack_lengths, packing_efficiency

logger = logging.getLogger(__name__)

FILLER = -1
ATTENTION_WEIGHT = 2e-5  # cost of a document of L tokens: L + ATTENTION_WEIGHT * L^2 (module docstring)


def _identity(x):
    return x


def deal_rows(
    rows: list[list[int]],
    lengths: np.ndarray,
    batch_size: int,
    pad_length: int | None,
    attention_weight: float = ATTENTION_WEIGHT,
    square_lengths: np.ndarray | None = None,
) -> tuple[list[list[int]], list[float]]:
    """One step's rows -> micro-batches (lists of row positions) in dealing order, and their costs.

    lengths[i]: sample i's tokens; square_lengths[i]: the sum of its documents' squared lengths (a DPO
    pair attends over its chosen and rejected documents apart: c^2 + r^2, not (c + r)^2), default
    lengths**2 (one document per sample). Micro-batch j goes to rank j % world as accumulation step
    j // world: after the sort by cost, the `world` micro-batches that run at the same time are neighbours
    in cost. Only lengths are read."""
    if not rows:
        return [], []
    lengths = np.asarray(lengths, dtype=np.int64)
    square_lengths = lengths**2 if square_lengths is None else np.asarray(square_lengths, dtype=np.int64)
    counts = np.array([0 if row == [FILLER] else len(row) for row in rows], dtype=np.int64)  # (R,)
    flat = np.array([i for row in rows if row != [FILLER] for i in row], dtype=np.int64)  # (sum counts,)
    row_of = np.repeat(np.arange(len(rows)), counts)
    # per row: tokens and documents' squared lengths (int64 sums: exact, as the costs must be on every rank)
    sizes = np.zeros(len(rows), dtype=np.int64)
    square = np.zeros(len(rows), dtype=np.int64)
    np.add.at(sizes, row_of, lengths[flat])
    np.add.at(square, row_of, square_lengths[flat])
    order = np.argsort(-sizes, kind="stable")
    starts = np.arange(0, len(order), batch_size)  # micro-batch m = order[starts[m] : starts[m] + batch_size]
    n_rows = np.diff(np.append(starts, len(order)))  # (M,) rows per micro-batch
    if pad_length:
        T = np.full(len(starts), pad_length, dtype=np.int64)
    else:  # collate_rows pads every row to the micro-batch's longest
        T = np.maximum(1, np.maximum.reduceat(sizes[order], starts))
    pad = T.repeat(n_rows) - sizes[order]  # each row's trailing padding segment
    attention = np.add.reduceat(square[order] + pad * pad, starts)
    costs = (n_rows * T + attention_weight * attention).tolist()
    by_cost = np.argsort(-np.asarray(costs), kind="stable").tolist()
    return [order[starts[j] : starts[j] + batch_size].tolist() for j in by_cost], [costs[j] for j in by_cost]


def cost_spread(costs: list[float], world: int) -> float:
    """Time lost to waiting in one step: sum over accumulation steps of the slowest rank's cost, over the
    sum of the mean cost, minus 1 (0 = perfectly balanced). costs in dealing order (deal_rows)."""
    groups = np.asarray(costs, dtype=np.float64).reshape(-1, world)  # (accumulation steps, ranks)
    return float(groups.max(1).sum() / max(groups.mean(1).sum(), 1e-12) - 1.0)


class _StepBatches(torch.utils.data.Dataset):
    """Map-style view: item k = this rank's micro-batches of step k (built in DataLoader workers)."""

    def __init__(self, loader: StepLoader, epoch: int):
        self.dataset = loader.dataset
        self.steps = loader._steps(epoch)
        self.deal_args = (
            loader.lengths,
            loader.batch_size,
            loader.pad_length,
            loader.attention_weight,
            loader.square_lengths,
        )
        self.rank_of = (loader.rank, loader.world_size)

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, k: int) -> list[dict]:
        rank, world = self.rank_of
        rows = self.steps[k]
        micro = deal_rows(rows, *self.deal_args)[0][rank::world]  # this rank's micro-batches, in order
        pad, pad_length = self.dataset.pad_token_id, self.deal_args[2]
        arrays = getattr(self.dataset, "sample_arrays", {})
        batches = []
        for m in micro:  # only this rank's documents are read
            samples = [rows[j] if rows[j] != [FILLER] else [] for j in m]
            # a sample's documents (a DPO pair's chosen and rejected) stay together, in order, in one row
            docs = [[d for i in row for d in self.dataset.documents(i)] for row in samples]
            mb = collate_rows(docs, length=pad_length, pad_token_id=pad)
            mb["samples"] = [i for row in samples for i in row]  # sample of each document group, in order
            for name, values in arrays.items():
                mb[name] = torch.from_numpy(values[mb["samples"]])
            batches.append(mb)
        return batches


class StepLoader:
    def __init__(
        self,
        dataset,
        *,
        max_length: int,
        batch_size: int,
        gradient_accumulation_steps: int,
        rank: int,
        world_size: int,
        seed: int,
        packing: bool = True,
        num_workers: int = 0,
        drop_last: bool = False,
        pad_to: str = "longest",
        attention_weight: float = ATTENTION_WEIGHT,
    ):
        """pad_to: "longest" (micro-batch padded to its longest row) or "max_length" (fixed shapes).
        attention_weight: the L^2 weight of the cost by which micro-batches are dealt (module docstring)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size < 1 or gradient_accumulation_steps < 1:
            raise ValueError(
                f"batch_size and gradient_accumulation_steps must be >= 1, got {batch_size}, {gradient_accumulation_steps}"
            )
        if pad_to not in ("longest", "max_length"):
            raise ValueError(f"pad_to must be 'longest' or 'max_length', got {pad_to!r}")
        lengths = np.asarray(dataset.lengths, dtype=np.int64)
        if len(lengths) == 0:
            raise ValueError("StepLoader: the dataset is empty")
        if lengths.max() > max_length:
            raise ValueError(
                f"StepLoader: a sample has {int(lengths.max())} tokens > max_length={max_length} "
                "(build the dataset with the same max_length)"
            )
        self.dataset = dataset
        self.lengths = lengths
        square = getattr(dataset, "square_lengths", None)  # absent: one document per sample
        self.square_lengths = lengths**2 if square is None else np.asarray(square, dtype=np.int64)
        self.max_length = max_length
        self.batch_size = batch_size
        self.accum = gradient_accumulation_steps
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.packing = packing
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.pad_length = max_length if pad_to == "max_length" else None
        self.attention_weight = attention_weight
        self.last_cost_spread = 0.0  # of the step last handed out (cost_spread)
        self.global_batch = world_size * gradient_accumulation_steps * batch_size
        self.epoch = 0
        self._next_step = 0
        self._cache: tuple[int, list] | None = None
        self._spreads: tuple[int, np.ndarray] | None = None  # (epoch, cost_spreads(epoch))
        if len(self) == 0:
            raise ValueError(
                f"StepLoader: the dataset gives {len(self._plan(0))} rows, fewer than one global batch of "
                f"{self.global_batch} rows (world_size {world_size} x gradient_accumulation_steps "
                f"{gradient_accumulation_steps} x batch_size {batch_size}) with drop_last=True"
            )

    # -- plan ---------------------------------------------------------------------------------------
    def _plan(self, epoch: int) -> list[list[int]]:
        if self._cache is None or self._cache[0] != epoch:
            if self.packing:
                plan = pack_lengths(self.lengths, self.max_length, seed=self.seed, epoch=epoch)
            else:
                perm = np.random.default_rng([self.seed, epoch, 0x5A3]).permutation(len(self.lengths))
                plan = [[i] for i in perm.tolist()]
            self._cache = (epoch, plan)
            logger.info(
                "epoch %d: %d samples -> %d rows of <= %d tokens (packing efficiency %.4f), %d steps of %d rows",
                epoch,
                len(self.lengths),
                len(plan),
                self.max_length,
                packing_efficiency(self.lengths, plan, self.max_length),
                -(-len(plan) // self.global_batch),
                self.global_batch,
            )
        return self._cache[1]

    def packing_efficiency(self, epoch: int | None = None) -> float:
        """Real tokens / (rows x max_length) of the epoch's plan (filler rows not counted)."""
        return packing_efficiency(
            self.lengths, self._plan(self.epoch if epoch is None else epoch), self.max_length
        )

    def _steps(self, epoch: int) -> list[list[list[int]]]:
        """Global rows of every step of the epoch (filler rows are [FILLER])."""
        plan = self._plan(epoch)
        G = self.global_batch
        steps = []
        for k in range(self.steps_in_epoch(epoch)):
            rows = plan[k * G : (k + 1) * G]
            steps.append(rows + [[FILLER]] * (G - len(rows)))
        return steps

    def deal(self, rows: list[list[int]]) -> tuple[list[list[int]], list[float]]:
        return deal_rows(
            rows, self.lengths, self.batch_size, self.pad_length, self.attention_weight, self.square_lengths
        )

    def cost_spreads(self, epoch: int) -> np.ndarray:
        """cost_spread of every step of the epoch (the same on every rank; 0 on one rank), dealt once per
        epoch here: the workers deal each step again for its batches, the main process need not."""
        if self._spreads is None or self._spreads[0] != epoch:
            steps = self._steps(epoch)
            if self.world_size == 1:  # nobody waits: cost_spread is exactly 0
                spreads = np.zeros(len(steps))
            else:
                spreads = np.array([cost_spread(self.deal(rows)[1], self.world_size) for rows in steps])
            self._spreads = (epoch, spreads)
        return self._spreads[1]

    def steps_in_epoch(self, epoch: int) -> int:
        n = len(self._plan(epoch))
        return n // self.global_batch if self.drop_last else -(-n // self.global_batch)

    def __len__(self) -> int:
        return self.steps_in_epoch(self.epoch)

    def global_documents(self, epoch: int, step: int) -> list[list[int]]:
        """The rows (sample indices) of optimizer step `step`, over all ranks; for tests and logging."""
        return [r for r in self._steps(epoch)[step] if r != [FILLER]]

    # -- iteration ----------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self._next_step = 0

    def __iter__(self):
        epoch, start = self.epoch, self._next_step
        view = _StepBatches(self, epoch)
        n_steps = len(view)
        spreads = self.cost_spreads(epoch)
        if self.num_workers > 0:
            batches = torch.utils.data.DataLoader(
                view,
                batch_size=None,
                sampler=range(start, n_steps),
                num_workers=self.num_workers,
                collate_fn=_identity,
                # its own generator: otherwise every new iterator draws a worker seed from the global torch
                # RNG, which shifts NEFTune's noise stream and breaks exact resume mid-epoch
                generator=torch.Generator().manual_seed(self.seed),
            )
        else:
            batches = (view[k] for k in range(start, n_steps))
        for k, micro_batches in zip(range(start, n_steps), batches):
            # Record progress before handing the step out: a checkpoint taken while the caller
            # processes step k resumes at k + 1.
            if k + 1 == n_steps:
                self.epoch, self._next_step = epoch + 1, 0
            else:
                self.epoch, self._next_step = epoch, k + 1
            self.last_cost_spread = float(spreads[k])
            yield micro_batches

    # -- resume -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step": self._next_step,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "num_samples": len(self.lengths),
            "total_tokens": int(self.lengths.sum()),
            "packing": self.packing,
            "max_length": self.max_length,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "global_batch", "num_samples", "total_tokens", "packing", "max_length"):
            if key in state and state[key] != self.state_dict()[key]:
                raise ValueError(
                    f"cannot resume the loader: {key} was {state[key]!r} in the checkpoint, "
                    f"now {self.state_dict()[key]!r} (same data, seed and global batch are needed)"
                )
        self.epoch = int(state["epoch"])
        self._next_step = int(state["step"])

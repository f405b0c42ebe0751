"""Planned per-GPU memory of one FSDP2 training step, from the model shape alone (no allocation).

Counts what the trainer holds: fp32 parameter, gradient and AdamW shards (1/world each), the gathered compute
copies FSDP keeps alive (root + about two blocks), and activations at the given tokens per micro-batch with
the chosen activation checkpointing. Activations assume flash/varlen attention (no T x T matrix) and the
per-block tensors autograd saves in engine.models' Qwen2/GLM blocks. It is a plan: the caching allocator's
fragmentation and the CUDA context (~0.5-1 GiB) come on top; compare with torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

GiB = 1024**3


@dataclass
class MemoryPlan:
    params: float  # bytes, this rank's shard of the fp32 master weights
    grads: float  # fp32 gradient shard
    optimizer: float  # AdamW exp_avg + exp_avg_sq shards (fp32)
    gathered_params: float  # compute copies alive at the peak (root + prefetched blocks)
    grad_buffers: float  # unsharded gradients of one block before its reduce-scatter
    activations: float  # saved for backward at the end of the forward pass
    recompute_peak: float  # one block's full activations + their gradients during backward
    loss: float  # logits (torch loss) or one chunk of them (fused loss)

    @property
    def total(self) -> float:
        return sum(asdict(self).values())

    def gib(self) -> dict[str, float]:
        out = {k: round(v / GiB, 2) for k, v in asdict(self).items()}
        out["total"] = round(self.total / GiB, 2)
        return out

    def format(self) -> str:
        rows = [f"  {k:<16} {v:>9.2f} GiB" for k, v in self.gib().items()]
        return "planned per-GPU memory:\n" + "\n".join(rows)


def block_params(args) -> int:
    h, d = args.hidden_size, args.head_dim
    q, kv = args.num_heads * d, args.num_kv_heads * d
    attn = h * (q + 2 * kv) + (q + 2 * kv) * args.qkv_bias + q * h
    norms = (4 if args.arch == "glm4" else 2) * h
    return attn + 3 * h * args.intermediate_size + norms


def block_activation_bytes(args, tokens: int, act_bytes: int) -> int:
    """Bytes autograd saves inside one decoder block for `tokens` tokens (no checkpointing)."""
    h, i = args.hidden_size, args.intermediate_size
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    per_token = (
        2 * (h * 4 + h * act_bytes)  # two RMSNorms: fp32 input copy + normalised output
        + act_bytes * (q + 2 * kv)  # q, k, v projections
        + act_bytes * (q + kv)  # rotated q, k (attention inputs)
        + act_bytes * q
        + 4 * args.num_heads  # attention output + log-sum-exp
        + act_bytes * 4 * i  # gate, up, silu(gate), silu(gate) * up
    )
    return tokens * per_token


def plan_memory(
    args,
    *,
    world_size: int,
    tokens_per_micro_batch: int,
    param_dtype: torch.dtype = torch.bfloat16,
    gradient_checkpointing: bool = True,
    checkpoint_every: int = 1,
    fused_loss: bool = True,
    loss_chunk_tokens: int = 4096,
) -> MemoryPlan:
    n = args.num_params()
    shard = n / world_size
    b = torch.finfo(param_dtype).bits // 8  # compute dtype bytes
    h, v, t = args.hidden_size, args.vocab_size, tokens_per_micro_batch
    root = v * h * (1 if args.tie_embeddings else 2) + h  # embeddings, lm_head, final norm
    blk = block_params(args)

    n_ckpt = math.ceil(args.num_layers / checkpoint_every) if gradient_checkpointing else 0
    full_block = block_activation_bytes(args, t, b)
    saved = n_ckpt * t * h * b + (args.num_layers - n_ckpt) * full_block
    saved += 3 * t * h * max(b, 4)  # embedding output (+ NEFTune noise), final norm input/output
    recompute = 2 * full_block if n_ckpt else t * h * b * 2  # one block's activations and their grads
    if fused_loss:
        loss = min(t, loss_chunk_tokens) * v * 4 * 2  # one fp32 chunk of logits + its gradient
    else:
        loss = t * v * (b + 4 + 4)  # logits, fp32 copy, fp32 grad
    return MemoryPlan(
        params=shard * 4,
        grads=shard * 4,
        optimizer=shard * 8,
        gathered_params=(root + 2 * blk) * b,
        grad_buffers=blk * 4 * 2,
        activations=saved,
        recompute_peak=recompute,
        loss=loss,
    )

"""Planned per-GPU memory of one FSDP2 training step, from the model shape alone (no allocation).

Counts what the trainer holds: fp32 parameter, gradient and AdamW shards (1/world each), the gathered compute
copies FSDP keeps alive (root + about two blocks), and activations at the given tokens per micro-batch with
the chosen activation checkpointing, and for DPO a resident reference model. Activations assume flash/varlen attention (no T x T matrix) and the
per-block tensors autograd saves in engine.models' Qwen2/GLM blocks. It is a plan: the caching allocator's
fragmentation and the CUDA context (~0.5-1 GiB) come on top; compare with torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

import kernels
from kernels.long_ce_chunked import CUDA_CHUNK_ROWS

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
    reference: float = 0.0  # DPO's frozen reference: compute-dtype shards + its last block kept gathered

    @property
    def total(self) -> float:
        return sum(asdict(self).values())

    def gib(self) -> dict[str, float]:
        out = {k: round(v / GiB, 2) for k, v in asdict(self).items()}
        out["total"] = round(self.total / GiB, 2)
        return out

    def format(self) -> str:
        rows = [
            f"  {k:<16} {v:>9.2f} GiB" for k, v in self.gib().items() if k != "reference" or self.reference
        ]
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
    loss_chunk_rows: int = CUDA_CHUNK_ROWS,  # kernels' default on CUDA
    loss_recompute: bool = False,
    reference: str | None = None,
) -> MemoryPlan:
    """reference (DPO): None (SFT), "precomputed" (log-probs from one pass before training: nothing resident)
    or "resident" (a frozen FSDP copy; its no_grad forward saves no activations, and its transient gathered
    blocks are freed before the policy's forward)."""
    if reference not in (None, "precomputed", "resident"):
        raise ValueError(f"reference must be None, 'precomputed' or 'resident', got {reference!r}")
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
    if fused_loss and loss_recompute:
        # linear_cross_entropy(recompute=True): dW in the weight dtype, the fp32 dX accumulator [T, H] and
        # its block buffers (the kernel's own default budget: dX + dW + 256 MiB in all at 16 bits)
        loss = kernels.recompute_chunk_bytes(t, h, b, "cuda", True) + v * h * b + t * h * 4
    elif fused_loss:
        # kernels.linear_cross_entropy (speed mode): gradients made during the forward, kept in fp32 until
        # the backward casts them.  Peak: the [C, V] chunk + fp32 dW [V, H] + fp32 dX [T, H] in the forward,
        # or dX + fp32 dW + 16-bit dW during dW's final cast.
        forward = min(loss_chunk_rows, t) * v * b + v * h * 4 + t * h * 4
        loss = max(forward, t * h * b + v * h * (4 + b))
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
        reference=(shard * b + blk * b) if reference == "resident" else 0.0,
    )


def main(argv: list[str] | None = None) -> None:
    """python -m engine.memory --model qwen2-7b --world_size 4 --max_length 28672 [--no_checkpointing]"""
    import argparse

    from engine.models import FLAVOURS, read_config

    p = argparse.ArgumentParser(description="planned per-GPU memory of one FSDP2 training step")
    p.add_argument("--model", default="qwen2-7b", help="flavour name or HF directory")
    p.add_argument("--world_size", type=int, default=4)
    p.add_argument("--max_length", type=int, default=28672)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--torch_dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--gradient_checkpointing_every", type=int, default=1)
    p.add_argument("--no_checkpointing", action="store_true")
    p.add_argument("--loss_impl", default="auto", choices=("auto", "triton", "torch"))
    p.add_argument(
        "--rlhf_type", default=None, choices=("dpo",), help="plan a DPO run (a reference model too)"
    )
    p.add_argument("--precompute_ref_log_probs", action="store_true", help="DPO without a resident reference")
    p.add_argument("--loss_recompute", action="store_true", help="the fused loss's exact low-memory mode")
    a = p.parse_args(argv)
    args = FLAVOURS[a.model] if a.model in FLAVOURS else read_config(a.model)[0]
    plan = plan_memory(
        args,
        world_size=a.world_size,
        tokens_per_micro_batch=a.batch_size * a.max_length,
        param_dtype=getattr(torch, a.torch_dtype),
        gradient_checkpointing=not a.no_checkpointing,
        checkpoint_every=a.gradient_checkpointing_every,
        fused_loss=a.loss_impl != "torch",
        reference=None
        if a.rlhf_type is None
        else "precomputed"
        if a.precompute_ref_log_probs
        else "resident",
        loss_recompute=a.loss_recompute,
    )
    dpo = (
        f", DPO ({'precomputed' if a.precompute_ref_log_probs else 'resident'} reference)"
        if a.rlhf_type
        else ""
    )
    print(f"{a.model}, {a.world_size} ranks, {a.batch_size} x {a.max_length} tokens per micro-batch{dpo}")
    print(plan.format())


if __name__ == "__main__":
    main()

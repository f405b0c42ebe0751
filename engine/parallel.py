"""Functions that change a model in place from outside: activation checkpointing, FSDP2, NEFTune, and the
materialisation of a meta-device model into sharded parameters. Model files know none of this.

Required order (as torchtitan's parallelize.py):
    build on meta -> apply_neftune (hooks, any time before training) -> apply_activation_checkpointing
    -> apply_compile -> apply_fsdp (AC wraps each block *before* compile, so the compiled graph holds the
    checkpointed region; both before fully_shard, so the FSDP unit is the compiled, checkpointed block, its
    hooks run outside the graph and its all-gather is redone before the recompute) -> to_empty +
    load_full_tensors_ (a checkpoint's tensors, or random_init_tensors, copied into the shards).
"""

from __future__ import annotations

import datetime
import functools
import gc
import os
import sys
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from engine.models import clean_param_name


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(timeout_s: float = 1800.0, trace_dir: str | None = None) -> DistInfo:
    """Join the torchrun job (RANK/WORLD_SIZE/MASTER_* in the environment) or make a 1-process group.

    NCCL for CUDA tensors plus gloo for CPU ones (DCP, the loader and the SIGTERM flag exchange small CPU
    objects); gloo only on CPU. A 1-process group keeps one code path: FSDP2 on a 1-device mesh, DTensors
    everywhere. timeout_s (--ddp_timeout): how long a collective may wait before the group aborts (and,
    on CUDA, the flight recorder dumps the last collectives of every rank into trace_dir).
    """
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        conf = cuda_allocator_defaults(os.environ)
        if conf is not None:  # the environment is read once, maybe already: apply it to this process too
            torch.cuda.memory._set_allocator_settings(conf)
        if trace_dir is not None:
            fr = flight_recorder_env(trace_dir, os.environ)
            os.environ.update(fr)
            if "TORCH_FR_DUMP_TEMP_FILE" in fr:
                os.makedirs(trace_dir, exist_ok=True)
        torch.cuda.set_device(device)
    ifname = gloo_multinode_env(os.environ)
    if ifname and os.environ.get("RANK") == "0":
        print(f"gloo (CPU collectives across nodes) uses GLOO_SOCKET_IFNAME={ifname}", file=sys.stderr)
    if not dist.is_initialized():
        backend = "cuda:nccl,cpu:gloo" if cuda else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if "RANK" in os.environ:
            dist.init_process_group(backend, device_id=device if cuda else None, timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def cuda_allocator_defaults(env: dict) -> str | None:
    """expandable_segments:True unless the user configured the allocator (PYTORCH_CUDA_ALLOC_CONF, or
    PYTORCH_ALLOC_CONF of newer torch): packed micro-batches change shape every step, and fixed-size
    segments then fragment until an allocation retries or fails. Returns what it set (None: left alone)."""
    if env.get("PYTORCH_CUDA_ALLOC_CONF") or env.get("PYTORCH_ALLOC_CONF"):
        return None
    env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return env["PYTORCH_CUDA_ALLOC_CONF"]


def flight_recorder_env(trace_dir: str, env: dict) -> dict[str, str]:
    """NCCL flight recorder defaults (as torchtitan sets them) that `env` does not set yet, under either
    name (torch 2.11 reads the TORCH_FR_* names and still the older TORCH_NCCL_* ones): keep the last 2000
    collectives per rank and dump them on a timeout to trace_dir/rank_<r>; `python -m
    torch.distributed.flight_recorder.fr_trace trace_dir -p rank_` then names the rank and collective
    that hung."""
    defaults = {  # name -> (older name, value)
        "TORCH_FR_BUFFER_SIZE": ("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000"),
        "TORCH_NCCL_DUMP_ON_TIMEOUT": (None, "1"),
        "TORCH_FR_DUMP_TEMP_FILE": ("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", os.path.join(trace_dir, "rank_")),
    }
    return {k: v for k, (old, v) in defaults.items() if k not in env and (old is None or old not in env)}


def gloo_multinode_env(env: dict) -> str | None:
    """On several nodes, point gloo (the CPU half of the group) at the interface that reaches MASTER_ADDR.

    gloo binds the address its hostname resolves to, which on many hosts is 127.0.1.1, and then every
    CPU collective across nodes hangs until the timeout; NCCL picks its interface itself. An explicit
    GLOO_SOCKET_IFNAME wins, then a plain NCCL_SOCKET_IFNAME list, then the route to MASTER_ADDR.
    Returns the interface it set (None: one node, or left alone)."""
    world, local = int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", 1)))
    if world <= local or env.get("GLOO_SOCKET_IFNAME"):
        return None
    nccl = env.get("NCCL_SOCKET_IFNAME", "")
    if nccl and not nccl.startswith(("^", "=")):  # "^docker,lo" excludes and "=eth0" is exact-match syntax
        ifname = nccl
    else:
        ifname = interface_to(env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if ifname:
        env["GLOO_SOCKET_IFNAME"] = ifname
    return ifname


def interface_to(host: str, port: int) -> str | None:
    """Name of the local network interface the kernel routes `host` through (None when unknown)."""
    import fcntl
    import socket
    import struct

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))  # UDP connect: picks the route, sends nothing
            ip = s.getsockname()[0]
        for _, name in socket.if_nameindex():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:
                    req = struct.pack("256s", name.encode()[:15])
                    addr = fcntl.ioctl(s.fileno(), 0x8915, req)[20:24]  # SIOCGIFADDR
                except OSError:
                    continue  # no IPv4 address on this interface
            if socket.inet_ntoa(addr) == ip:
                return name
    except OSError:
        return None
    return None


def shutdown_distributed() -> None:
    """Leave the process group cleanly: free unreachable sharded modules (reference cycles) while the group
    still exists, wait until every rank is idle, then destroy it, so that no rank shuts its backend down
    while a peer's last collective is in flight (gloo once aborted in teardown: "terminate called without
    an active exception"). Call it on every rank, after the last collective."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------- activation checkpointing
def apply_activation_checkpointing(
    model: nn.Module, every: int = 1, *, selective: bool = False, min_tokens: int = 0
) -> list[int]:
    """Wrap every `every`-th decoder block (0, k, 2k, ...) in a non-reentrant checkpoint; returns their ids.

    Full (default): only each block's input is kept; its internals are recomputed in backward.
    selective: torchtitan's op-level policy (selective_checkpoint_policy): the outputs of attention and of
    every other matmul are kept, the rest (elementwise ops, norms, the other matmuls) is recomputed.
    min_tokens: a micro-batch of fewer tokens (B * T) is not checkpointed at all: for unpacked rows, whose
    length varies, short ones keep their (small) activations instead of paying the recompute.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )

    kwargs = {"context_fn": selective_checkpoint_contexts} if selective else {}
    fn = functools.partial(_checkpoint_long, min_tokens=min_tokens, **kwargs)
    layers = model.model.layers
    wrapped = []
    for i in range(len(layers)):
        if i % every == 0:
            layers[i] = checkpoint_wrapper(
                layers[i], checkpoint_impl=CheckpointImpl.NO_REENTRANT, checkpoint_fn=fn
            )
            wrapped.append(i)
    return wrapped


def _checkpoint_long(block: nn.Module, x: torch.Tensor, *args, min_tokens: int, **kwargs) -> torch.Tensor:
    """Checkpoint the call of a block on x (B, T, H) unless it holds fewer than min_tokens tokens."""
    from torch.utils.checkpoint import checkpoint

    if x.shape[0] * x.shape[1] < min_tokens:
        return block(x, *args)
    return checkpoint(block, x, *args, use_reentrant=False, **kwargs)


# Matmuls of the blocks (nn.Linear dispatches as mm, or addmm with a bias) and attention forwards (SDPA's
# backends, torch's varlen_attn, flash-attn), by op name so that a backend not installed needs no import.
SAC_MATMULS = ("aten::mm", "aten::addmm")
SAC_ATTENTION = ("aten::_scaled_dot_product", "aten::_flash_attention_forward", "torch_attn::_varlen_attn")


def selective_checkpoint_policy(counts: dict):
    """The policy of one checkpointed call: keep attention outputs and every other matmul output (the 1st,
    3rd, ... of the block, in the same order in forward and in the recompute), recompute everything else.
    Half the matmul recompute of full checkpointing for the memory of about half the matmul outputs."""
    from torch.utils.checkpoint import CheckpointPolicy

    def policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
        name = func._schema.name
        if name.startswith(SAC_ATTENTION) or name.startswith("flash_attn::"):
            return CheckpointPolicy.MUST_SAVE
        if name in SAC_MATMULS:
            mode = "recompute" if ctx.is_recompute else "forward"
            counts[mode] = counts.get(mode, 0) + 1
            return CheckpointPolicy.MUST_SAVE if counts[mode] % 2 else CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def selective_checkpoint_contexts():
    """context_fn of torch.utils.checkpoint: a fresh matmul count for every checkpointed call."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(selective_checkpoint_policy({}))


# ---------------------------------------------------------------- torch.compile
def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile each decoder block (fullgraph: a graph break is an error, not a silent slowdown).

    Blocks share their code, so one graph serves all of them (dynamo treats the parameters as inputs).
    Packed micro-batches vary in length T and in document count, so those dimensions are marked dynamic
    before the first call: one graph for every shape, plus at most one recompile when an int input
    (max_seqlen, read by flash / varlen on GPU) first changes and becomes symbolic
    (tests/train/test_train_compile.py counts the graphs).
    """
    layers = model.model.layers
    for i, layer in enumerate(layers):
        layers[i] = torch.compile(layer, backend=backend, fullgraph=True)
        layers[i].register_forward_pre_hook(_mark_dynamic)


def _mark_dynamic(module: nn.Module, args: tuple) -> None:
    x, rope, meta = args[:3]  # a block's (hidden (B, T, H), (cos, sin) (B, T, rd), AttnMeta)
    for t in (x, *rope):
        torch._dynamo.maybe_mark_dynamic(t, 1)  # T
    if meta is not None and meta.cu_seqlens is not None:
        torch._dynamo.maybe_mark_dynamic(meta.cu_seqlens, 0)  # documents + 1


# ---------------------------------------------------------------- FSDP2
def apply_fsdp(
    model: nn.Module,
    mesh,
    *,
    param_dtype: torch.dtype = torch.bfloat16,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
) -> None:
    """fully_shard each decoder block, then [final norm, lm_head] as one unit, then the root (embeddings,
    and with tied embeddings the norm and the output projection too), as torchtitan does.

    - Blocks reshard after forward (reshard_after_forward), except the last, which backward needs at once.
    - [norm, lm_head] stays gathered after forward (backward starts there) and the loss is computed inside
      lm_head's forward (engine.models.model.LMHead), where its weight is gathered.
    - The root keeps FSDP's default (no reshard after forward for the root): an explicit True would free
      and re-gather embed + norm + lm_head (2.18 GB in bf16 at Qwen2-7B) at the start of every backward.
    - cast_forward_inputs=False: the embedding output is already in the compute dtype, and a cast of every
      block's inputs is a tree walk per block per micro-batch for nothing.
    Parameters stay fp32 (master weights; AdamW state is fp32 of the same shards). With param_dtype bf16 the
    all-gathered compute copy is bf16 and gradients are reduced in fp32. Gradient reduction is a plain SUM
    (divide factor 1): the long-ce loss is already divided by the global token count, and forcing SUM keeps
    gloo, which sums where it should average (pytorch#162338), and NCCL on one path.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if param_dtype == torch.float32:
        mp = MixedPrecisionPolicy(cast_forward_inputs=False)  # fp32 runs: no casts at all
    else:
        mp = MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False
        )
    layers = model.model.layers
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward and not last)
    if model.lm_head is not None:  # tied: the output weight is the embedding's, which lives in the root
        fully_shard([model.model.norm, model.lm_head], mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)


def reshard(model: nn.Module) -> None:
    """Free every FSDP unit's all-gathered parameters (a no-op for units already sharded). Needed after a
    no_grad forward: the root and the last block keep theirs gathered for a backward that never comes, and
    until resharded the module's parameters are those gathered tensors, not the shards an optimizer must
    hold or the memory plan counts."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@torch.no_grad()
def load_full_tensors_(
    model: nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]], *, strict=True
) -> None:
    """Copy full (unsharded) tensors into the model's own (possibly DTensor-sharded) parameters and buffers.

    Every rank reads the same full tensor and keeps its own shard (src_data_rank=None: no communication), so
    memory holds one full tensor at a time, never the whole model.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    targets = {
        clean_param_name(n): t for n, t in list(model.named_parameters()) + list(model.named_buffers())
    }
    seen = set()
    for name, full in named_tensors:
        if name not in targets:
            if strict:
                raise KeyError(f"checkpoint tensor {name!r} has no parameter in the model")
            continue
        dst = targets[name]
        if tuple(full.shape) != tuple(dst.shape):
            raise ValueError(
                f"{name}: checkpoint shape {tuple(full.shape)} != model shape {tuple(dst.shape)}"
            )
        if isinstance(dst, DTensor):
            full = full.to(device=dst.device, dtype=dst.dtype)
            dst.copy_(distribute_tensor(full, dst.device_mesh, dst.placements, src_data_rank=None))
        else:
            dst.copy_(full)
        seen.add(name)
    missing = {clean_param_name(n) for n, _ in model.named_parameters()} - seen
    if strict and missing:
        raise KeyError(f"parameters missing from the checkpoint: {sorted(missing)[:8]}")


def random_init_tensors(model: nn.Module, seed: int, std: float = 0.02):
    """HF-style init (normal(0, std) weights, zero biases, unit norm weights) per parameter, generated from a
    generator seeded by (seed, name): identical on every rank and every world size, whatever the order."""
    from engine.optim import is_norm

    norms = {
        clean_param_name(f"{mn}.{pn}" if mn else pn)
        for mn, m in model.named_modules()
        if is_norm(m)
        for pn, _ in m.named_parameters(recurse=False)
    }
    for name, p in model.named_parameters():
        name = clean_param_name(name)
        dev = p.device
        if name in norms:
            yield name, torch.ones(p.shape, dtype=torch.float32, device=dev)
        elif name.endswith("bias"):
            yield name, torch.zeros(p.shape, dtype=torch.float32, device=dev)
        else:
            g = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            yield name, torch.empty(p.shape, dtype=torch.float32, device=dev).normal_(0.0, std, generator=g)


# ---------------------------------------------------------------- NEFTune
def token_doc_lengths(shape: tuple[int, int], position_ids=None, cu_seqlens=None) -> torch.Tensor:
    """(B*T,) int64: the length of the document each token of a [B, T] batch belongs to, from cu_seqlens,
    else position_ids (a document starts at position 0 and at every row start), else one per row. Computed
    where the inputs are, with static shapes: nothing is copied back to the host."""
    from engine.models.attention import token_segments

    B, T = shape
    if cu_seqlens is not None:
        cu = cu_seqlens.long()
        seg = token_segments(cu, B * T)
        return cu[seg + 1] - cu[seg]
    if position_ids is not None:
        starts = position_ids.reshape(B, T) == 0
        starts[:, 0] = True  # a row always starts a document
        seg = starts.flatten().long().cumsum(0) - 1  # (B*T,) document index of each token
        counts = torch.zeros(B * T, dtype=torch.long, device=seg.device).index_add_(
            0, seg, torch.ones_like(seg)
        )
        return counts[seg]
    return torch.full((B * T,), T, dtype=torch.long)


def neftune_scale(token_lengths: torch.Tensor, hidden: int, alpha: float) -> torch.Tensor:
    """Per-token noise magnitude alpha / sqrt(L * d), L = the token's own document length (token_lengths,
    one per token): float32, same shape."""
    return alpha * torch.rsqrt(token_lengths.double() * hidden).float()


def apply_neftune(model: nn.Module, alpha: float) -> list:
    """NEFTune (Jain et al. 2023): add Uniform(-1, 1) * alpha / sqrt(L * d) to the input embeddings while
    training. HF computes L from the padded row; with packing each document gets its own L, so a packed
    document sees exactly the noise it would see alone. L comes from the batch's cu_seqlens on the device
    (no copy back to the host per micro-batch). Returns the hook handles."""
    if alpha <= 0:
        return []
    seen: dict = {}

    def capture(module, args, kwargs):
        # CausalLM.forward(input_ids, position_ids=None, cu_seqlens=None, max_seqlen=None, labels=None)
        names = ("input_ids", "position_ids", "cu_seqlens")
        seen.update({n: (args[i] if i < len(args) else kwargs.get(n)) for i, n in enumerate(names)})

    def add_noise(module, inputs, output):
        if not module.training:
            return output
        B, T, H = output.shape  # (B, T, d)
        dev = output.device
        pos, cu = (None if seen[n] is None else seen[n].to(dev) for n in ("position_ids", "cu_seqlens"))
        scale = neftune_scale(token_doc_lengths((B, T), pos, cu).to(dev), H, alpha).view(B, T, 1)
        noise = torch.rand(output.shape, device=dev, dtype=torch.float32).mul_(2).sub_(1)
        return output + (noise * scale).to(output.dtype)

    return [
        model.register_forward_pre_hook(capture, with_kwargs=True),
        model.model.embed_tokens.register_forward_hook(add_noise),
    ]

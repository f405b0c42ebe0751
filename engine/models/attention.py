"""Causal attention over packed documents behind one interface.

Implementations, chosen by an explicit attn_impl argument:
  "flash3" flash-attn 3 (Hopper), "flash" flash-attn 2, "varlen" torch's varlen_attn: CUDA kernels for
           fp16/bf16, imported and test-run once by engine.models.attn_backends
  "sdpa"   F.scaled_dot_product_attention per document: the plain twin, runs anywhere
  "auto"   the first kernel that passes its probe, on CUDA with a half dtype; sdpa otherwise.
Documents are given by cu_seqlens over the flattened B*T tokens; a document never attends to another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.args import ModelArgs
from engine.models.attn_backends import ATTN_IMPLS, kernel, resolve_auto
from engine.models.layers import apply_rotary


def resolve_attn_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete impl for q on (device, dtype): "auto" probed once (engine.models.attn_backends)."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
    return resolve_auto(device, dtype) if impl == "auto" else impl


@dataclass
class AttnMeta:
    """Per-forward attention metadata, built once by the model and shared by every block."""

    impl: str  # as requested ("auto" is resolved per call from the dtype/device q actually has)
    # int32 (n_docs + 1,) on the CPU; None means every row of the batch is one causal document.
    cu_seqlens: torch.Tensor | None
    max_seqlen: int
    B: int = 0
    T: int = 0
    # The boundaries on the compute device (flash / varlen kernels read them there); copied once, lazily.
    _cu_device: torch.Tensor | None = field(default=None, repr=False)

    def cu_seqlens_on(self, device: torch.device) -> torch.Tensor:
        if self._cu_device is None or self._cu_device.device != device:
            cu = self.cu_seqlens
            if cu is None:  # plain rows: one document per row
                cu = torch.arange(0, self.B * self.T + 1, self.T, dtype=torch.int32)
            self._cu_device = cu.to(device, non_blocking=True)
        return self._cu_device


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document boundaries over the flattened (B, T) positions: a document starts where the position is 0
    and at every row start. Needs the positions on the host (a device sync when they are on the GPU)."""
    B, T = position_ids.shape
    starts = position_ids.detach().cpu().flatten() == 0
    starts[::T] = True  # rows never continue into each other
    idx = starts.nonzero().flatten()
    return torch.cat([idx, torch.tensor([B * T])]).to(torch.int32)


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, B: int, T: int) -> torch.Tensor:
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths)
    return (torch.arange(B * T) - starts).view(B, T)


def make_attn_meta(
    impl: str,
    B: int,
    T: int,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
) -> AttnMeta:
    """The impl is resolved in each block from q's own device and dtype (under FSDP mixed precision the
    compute dtype is the block's, not necessarily that of the root's parameters)."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int32)
        if cu_seqlens.device.type != "cpu":
            cu_seqlens = cu_seqlens.cpu()  # contract: CPU; tolerate device tensors at the cost of a sync
        if cu_seqlens[0] != 0 or cu_seqlens[-1] != B * T:
            raise ValueError(f"cu_seqlens must start at 0 and end at B*T={B * T}, got {cu_seqlens.tolist()}")
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return AttnMeta(impl, cu_seqlens, T if max_seqlen is None else max_seqlen, B, T)


def sdpa_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """q (N, nh, hd), k/v (N, nkv, hd) with N = B*T; causal SDPA run on each document alone."""
    outs = []
    bounds = cu_seqlens.tolist()  # a host tensor: no device sync
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        qd, kd, vd = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))  # (1, nh, L, hd)
        od = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)
        outs.append(od[0].transpose(0, 1))  # (L, nh, hd)
    return torch.cat(outs, dim=0)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
    """q (B, T, nh, hd), k/v (B, T, nkv, hd) -> (B, T, nh, hd)."""
    B, T, nh, hd = q.shape
    impl = resolve_attn_impl(meta.impl, q.device, q.dtype)
    if impl == "sdpa" and meta.cu_seqlens is None:
        # Every row is one document: one batched causal call.
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )  # (B, nh, T, hd)
        return o.transpose(1, 2)
    qf, kf, vf = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)  # (B*T, nh|nkv, hd)
    if impl == "sdpa":
        return sdpa_varlen(qf, kf, vf, meta.cu_seqlens).view(B, T, nh, hd)
    fn = kernel(impl, q.device, q.dtype)  # loaded and checked once; ValueError naming why it cannot run
    o = fn(qf, kf, vf, meta.cu_seqlens_on(q.device), meta.max_seqlen)
    return o.view(B, T, nh, hd)


class Attention(nn.Module):
    """GQA self-attention with optional q/k/v bias and rotary on the first rotary_dim channels of a head."""

    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.rope_layout = args.rope_layout
        h, q, kv = args.hidden_size, args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.q_proj = nn.Linear(h, q, bias=args.qkv_bias)
        self.k_proj = nn.Linear(h, kv, bias=args.qkv_bias)
        self.v_proj = nn.Linear(h, kv, bias=args.qkv_bias)
        self.o_proj = nn.Linear(q, h, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        meta: AttnMeta | None,
        cache=None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)  # (B, T, nh, hd)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, nkv, hd)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, nkv, hd)
        cos, sin = rope
        q = apply_rotary(q, cos, sin, self.rope_layout)
        k = apply_rotary(k, cos, sin, self.rope_layout)
        if cache is not None:  # generation: attend to the cached prefix (engine/models/generate.py)
            o = cache.attend(self.layer_idx, q, k, v)
        else:
            o = varlen_attention(q, k, v, meta)
        return self.o_proj(o.reshape(B, T, -1))

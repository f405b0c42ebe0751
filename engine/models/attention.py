"""Causal attention over packed documents behind one interface.

Implementations, chosen by an explicit attn_impl argument:
  "flash3" flash-attn 3 (Hopper), "flash" flash-attn 2, "varlen" torch's varlen_attn: CUDA kernels for
           fp16/bf16, imported and test-run once by engine.models.attn_backends
  "sdpa"   F.scaled_dot_product_attention per document: the plain twin, runs anywhere
  "auto"   the first kernel that passes its probe, on CUDA with a half dtype; sdpa otherwise.
Documents are given by cu_seqlens over the flattened B*T tokens; a document never attends to another.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class AttnMeta:
    """Attention metadata of one forward, built once by the model before the blocks and only read inside
    them: nothing is written into it or cached on it from inside a block (a write there, inside a
    checkpointed region, breaks torch.compile), and building it copies nothing back to the host."""

    impl: str  # as requested ("auto" is resolved per call from the dtype/device q actually has)
    # int32 (segments + 1,) boundaries over the flattened B*T tokens, on the compute device (flash / varlen
    # read them there; the sdpa twin on CPU reads them as host ints). None: every row is one document.
    cu_seqlens: torch.Tensor | None
    max_seqlen: int  # a host int (the loader's), so no kernel launch has to read it back from the device


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document boundaries over the flattened (B, T) positions: a document starts where the position is 0
    and at every row start. Reads the positions on the host (a device sync when they are on the GPU): the
    training path passes the loader's cu_seqlens instead."""
    B, T = position_ids.shape
    starts = position_ids.detach().cpu().flatten() == 0
    starts[::T] = True  # rows never continue into each other
    idx = starts.nonzero().flatten()
    return torch.cat([idx, torch.tensor([B * T])]).to(torch.int32)


def token_segments(cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """(n_tokens,) int64: the index of the segment of cu_seqlens each token belongs to, computed where
    cu_seqlens is (a searchsorted of static shape: no host sync, traceable by torch.compile)."""
    tokens = torch.arange(n_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    # no slice of cu_seqlens: torch.compile would specialise on its length being 1 (one document)
    return torch.searchsorted(cu_seqlens, tokens, right=True) - 1


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """(B, T) positions restarting at 0 at every boundary, on cu_seqlens' device (no host sync)."""
    cu = cu_seqlens.long()
    tokens = torch.arange(B * T, device=cu.device)
    return (tokens - cu[token_segments(cu, B * T)]).view(B, T)


def make_attn_meta(
    impl: str,
    B: int,
    T: int,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    device: torch.device | None = None,
) -> AttnMeta:
    """Once per forward, outside the blocks: cu_seqlens moved to `device` (default: where it is), int32.

    The boundaries are checked only when they are on the host (free there); on a device the loader's
    values are trusted, since a check would read them back. max_seqlen=None is derived from them, which
    on a device costs a sync: the training path passes the loader's host int. The impl is resolved in
    each block from q's own device and dtype (under FSDP mixed precision the compute dtype is the
    block's, not necessarily that of the root's parameters)."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
    if cu_seqlens is None:
        return AttnMeta(impl, None, T if max_seqlen is None else max_seqlen)
    if cu_seqlens.device.type == "cpu":
        cu_seqlens = cu_seqlens.to(torch.int32)
        if cu_seqlens[0] != 0 or cu_seqlens[-1] != B * T:
            raise ValueError(f"cu_seqlens must start at 0 and end at B*T={B * T}, got {cu_seqlens.tolist()}")
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    cu_seqlens = cu_seqlens.to(device or cu_seqlens.device, torch.int32, non_blocking=True)
    return AttnMeta(impl, cu_seqlens, max_seqlen)


def sdpa_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """q (N, nh, hd), k/v (N, nkv, hd) with N = B*T; causal SDPA run on each document alone. Reads the
    boundaries as host ints: free for CPU tensors, one sync per call on a GPU (the fp32 fallback there)."""
    outs = []
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        qd, kd, vd = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))  # (1, nh, L, hd)
        od = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)
        outs.append(od[0].transpose(0, 1))  # (L, nh, hd)
    return torch.cat(outs, dim=0)


def sdpa_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The same attention as sdpa_varlen in one SDPA call over all N tokens with a block-diagonal causal
    (N, N) mask: what torch.compile traces for the sdpa twin, since a graph cannot loop over boundaries
    read on the host. O(N^2) memory: for CPU-sized rows (on a GPU, compile traces flash / varlen)."""
    seg = token_segments(cu_seqlens, q.shape[0])  # (N,) document of each token
    mask = (seg[:, None] == seg[None, :]).tril()  # (N, N): same document, key not after query
    q1, k1, v1 = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, nh|nkv, N, hd)
    o = F.scaled_dot_product_attention(q1, k1, v1, attn_mask=mask, enable_gqa=True)  # (1, nh, N, hd)
    return o[0].transpose(0, 1)


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
        twin = sdpa_masked if torch.compiler.is_compiling() else sdpa_varlen
        return twin(qf, kf, vf, meta.cu_seqlens).view(B, T, nh, hd)
    cu = meta.cu_seqlens
    if cu is None:  # one document per row (built here on the device: nothing to copy)
        cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=q.device)
    fn = kernel(impl, q.device, q.dtype)  # loaded and checked once; ValueError naming why it cannot run
    o = fn(qf, kf, vf, cu, meta.max_seqlen)
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

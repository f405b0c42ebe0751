"""Layers shared by every architecture: RMSNorm, rotary embedding (both layouts, partial), SwiGLU."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back before the weight multiply (same rounding as HF Qwen2/GLM).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rope_inv_freq(rotary_dim: int, theta: float, scaling=None, device=None) -> tuple[torch.Tensor, float]:
    """(inv_freq (rotary_dim / 2,), cos/sin multiplier) of a default, llama3 or yarn rotary, computed as
    transformers' modeling_rope_utils does (dynamic scaling depends on the length: see rotary_cos_sin)."""
    d = rotary_dim
    exponents = torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d
    inv_freq = 1.0 / (theta**exponents)
    kind = scaling.rope_type if scaling is not None else "default"
    if kind in ("default", "dynamic"):
        return inv_freq, 1.0
    if kind == "llama3":
        old = scaling.original_max_position_embeddings
        low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn
    f = scaling.factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = scaling.attention_factor
    if attn is None:
        both = scaling.mscale and scaling.mscale_all_dim
        attn = mscale(f, scaling.mscale) / mscale(f, scaling.mscale_all_dim) if both else mscale(f)

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times in the window
        window = scaling.original_max_position_embeddings
        return d * math.log(window / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the frequency (fast dims), 0: interpolate by factor (slow dims)
    return inv_freq / f * (1 - extrapolate) + inv_freq * extrapolate, float(attn)


def rotary_cos_sin(
    position_ids: torch.Tensor,
    rotary_dim: int,
    theta: float,
    layout: str,
    dtype: torch.dtype,
    *,
    scaling=None,
    max_position_embeddings: int | None = None,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, T, rotary_dim), laid out to match the channels they rotate.

    Computed per call (rotary_dim / 2 frequencies, negligible) instead of a buffer, so a model built on the
    meta device needs nothing recomputed after to_empty(). scaling: an args.RopeScaling or None. Dynamic
    (NTK) scaling needs `lengths` (B, T): the length of each token's document (transformers uses the longest
    position of the forward, max(position_ids) + 1, on a fresh model: the same for one document), and
    max_position_embeddings, the window past which the base grows.
    """
    dev = position_ids.device
    inv_freq, attn_factor = rope_inv_freq(rotary_dim, theta, scaling, dev)
    if scaling is not None and scaling.rope_type == "dynamic":
        assert lengths is not None and max_position_embeddings is not None
        f, d = scaling.factor, rotary_dim
        n = torch.clamp(lengths, min=max_position_embeddings).float()[..., None]  # (B, T, 1)
        base = theta * ((f * n / max_position_embeddings) - (f - 1)) ** (d / (d - 2))
        exponents = torch.arange(0, d, 2, dtype=torch.int64, device=dev).float() / d
        freqs = position_ids[..., None].float() * (1.0 / base**exponents)  # (B, T, rd/2)
    else:
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, rd/2)
    if layout == "half":  # channel j pairs with channel j + rd/2
        emb = torch.cat((freqs, freqs), dim=-1)
    elif layout == "interleaved":  # channel 2i pairs with channel 2i + 1
        emb = freqs.repeat_interleave(2, dim=-1)
    else:
        raise ValueError(f"unknown rope layout {layout!r}")
    cos, sin = emb.cos(), emb.sin()
    if attn_factor != 1.0:  # yarn scales cos and sin in fp32 before the cast, as transformers does
        cos, sin = cos * attn_factor, sin * attn_factor
    return cos.to(dtype), sin.to(dtype)  # (B, T, rd)


def document_lengths(position_ids: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """(B, T) length of the document each token belongs to: max(position) + 1 over its cu_seqlens segment,
    or over the whole batch when there are no boundaries (what transformers uses for dynamic rope)."""
    if cu_seqlens is None:
        return (position_ids.max() + 1).expand_as(position_ids)
    B, T = position_ids.shape
    cu = cu_seqlens.to(device=position_ids.device, dtype=torch.int64)
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1, device=cu.device), cu.diff())  # (B*T,)
    flat = position_ids.flatten()
    doc_max = torch.zeros(len(cu) - 1, dtype=flat.dtype, device=flat.device)
    doc_max = doc_max.scatter_reduce(0, seg, flat, reduce="amax", include_self=False)
    return (doc_max[seg] + 1).view(B, T)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """Rotate the first rotary_dim channels of every head of x (B, T, nh, hd); the rest pass through."""
    rd = cos.shape[-1]
    cos, sin = cos[:, :, None], sin[:, :, None]  # (B, T, 1, rd)
    xr, xp = x[..., :rd], x[..., rd:]
    if layout == "half":
        x1, x2 = xr.chunk(2, dim=-1)
        rot = torch.cat((-x2, x1), dim=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack((-x2, x1), dim=-1).flatten(-2)
    out = xr * cos + rot * sin
    return torch.cat((out, xp), dim=-1) if xp.shape[-1] else out


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)). fused=True keeps gate and up in one [2I, H] matrix (GLM's gate_up_proj)."""

    def __init__(self, hidden: int, intermediate: int, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        if fused:
            self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        else:
            self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
            self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, I) each
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)

"""Layers shared by every architecture: RMSNorm, rotary embedding (both layouts, partial), SwiGLU."""

from __future__ import annotations

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


def rotary_cos_sin(
    position_ids: torch.Tensor, rotary_dim: int, theta: float, layout: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, T, rotary_dim), laid out to match the channels they rotate.

    Computed per call (rotary_dim / 2 frequencies, negligible) instead of a buffer, so a model built on the
    meta device needs nothing recomputed after to_empty().
    """
    dev = position_ids.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float, device=dev) / rotary_dim))
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, rd/2)
    if layout == "half":  # channel j pairs with channel j + rd/2
        emb = torch.cat((freqs, freqs), dim=-1)
    elif layout == "interleaved":  # channel 2i pairs with channel 2i + 1
        emb = freqs.repeat_interleave(2, dim=-1)
    else:
        raise ValueError(f"unknown rope layout {layout!r}")
    return emb.cos().to(dtype), emb.sin().to(dtype)  # (B, T, rd)


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

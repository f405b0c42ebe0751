"""Qwen2 / Qwen2.5 decoder block: pre-norm attention (q/k/v bias) + pre-norm SwiGLU with separate gate/up.

Rotary: the whole head, half-split layout, base rope_theta (ModelArgs from config.json).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.models.args import ModelArgs
from engine.models.attention import Attention, AttnMeta
from engine.models.layers import RMSNorm, SwiGLU


class Qwen2Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(args, layer_idx)
        self.mlp = SwiGLU(args.hidden_size, args.intermediate_size, fused=False)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttnMeta | None, cache=None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, meta, cache)  # (B, T, H)
        return x + self.mlp(self.post_attention_layernorm(x))

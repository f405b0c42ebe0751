"""GLM-4 decoder block (THUDM glm-4-9b / HF `glm`, and GLM-4-0414 / HF `glm4`).

Differences from Qwen2: gate and up live in one fused gate_up_proj; rotary covers the first half of each
head with interleaved pairs, base 10000 * rope_ratio (chatglm config) or rope_theta (HF config); glm4 adds
a norm on the attention output and on the MLP output before each residual add.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.models.args import ModelArgs
from engine.models.attention import Attention, AttnMeta
from engine.models.layers import RMSNorm, SwiGLU


class GlmBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        h, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, layer_idx)
        self.mlp = SwiGLU(h, args.intermediate_size, fused=True)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.post_norms = args.arch == "glm4"
        if self.post_norms:
            self.post_self_attn_layernorm = RMSNorm(h, eps)
            self.post_mlp_layernorm = RMSNorm(h, eps)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttnMeta | None, cache=None
    ) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), rope, meta, cache)  # (B, T, H)
        if self.post_norms:
            a = self.post_self_attn_layernorm(a)
        x = x + a
        m = self.mlp(self.post_attention_layernorm(x))
        if self.post_norms:
            m = self.post_mlp_layernorm(m)
        return x + m

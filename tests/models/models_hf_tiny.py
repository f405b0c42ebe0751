"""Tiny random transformers models (the parity oracle) for tests/models; imported by the test files."""

from __future__ import annotations

import torch
import transformers as tf

from engine.models import CausalLM, build_model
from engine.models.hf_config import args_from_config

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)

# name -> (HF class, config class, config kwargs). Covers qkv bias on/off, tied embeddings, GQA 2:1 and 4:1,
# and the rope scalings llama3, yarn and dynamic.
CASES = {
    "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config, dict(num_key_value_heads=2, rope_theta=1e6)),
    "qwen2.5-tied": (
        tf.Qwen2ForCausalLM,
        tf.Qwen2Config,
        dict(num_key_value_heads=1, rope_theta=1e6, tie_word_embeddings=True),
    ),
    # Llama 3.1: no q/k/v bias, untied, llama3 scaling with a 64-token window (wavelengths 6..2e4 cross all
    # three bands); the tied variant without scaling.
    "llama3.1": (
        tf.LlamaForCausalLM,
        tf.LlamaConfig,
        dict(
            num_key_value_heads=2,
            rope_theta=1e4,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "llama-tied": (
        tf.LlamaForCausalLM,
        tf.LlamaConfig,
        dict(num_key_value_heads=1, rope_theta=5e5, tie_word_embeddings=True),
    ),
    # Qwen2 past its window as the Qwen2 / Qwen2.5 cards configure it (yarn), and dynamic NTK; windows of 8
    # positions so the 9-17 token test documents are past them.
    "qwen2-yarn": (
        tf.Qwen2ForCausalLM,
        tf.Qwen2Config,
        dict(
            num_key_value_heads=2,
            rope_theta=1e6,
            max_position_embeddings=32,
            rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=8),
        ),
    ),
    "qwen2-dynamic": (
        tf.Qwen2ForCausalLM,
        tf.Qwen2Config,
        dict(
            num_key_value_heads=2,
            rope_theta=1e4,
            max_position_embeddings=8,
            rope_scaling=dict(rope_type="dynamic", factor=2.0),
        ),
    ),
    "glm": (
        tf.GlmForCausalLM,
        tf.GlmConfig,
        dict(num_key_value_heads=2, head_dim=16, rope_theta=5e6, attention_bias=True, pad_token_id=0),
    ),
    "glm4": (
        tf.Glm4ForCausalLM,
        tf.Glm4Config,
        dict(num_key_value_heads=1, head_dim=24, rope_theta=1e4, attention_bias=False, pad_token_id=0),
    ),
}


def hf_model(case: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    cls, cfg_cls, kw = CASES[case]
    cfg = cfg_cls(**COMMON, **kw, eos_token_id=[1, 2], bos_token_id=None)
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # every parameter random (HF would init biases to 0 and norms to 1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model.to(dtype).eval()


def ours_from_hf(hf, dtype: torch.dtype = torch.float32, attn_impl: str = "sdpa") -> CausalLM:
    args, _ = args_from_config(hf.config.to_dict())
    model = build_model(args, dtype=dtype, attn_impl=attn_impl, init=False)
    state = {k: v for k, v in hf.state_dict().items() if not (args.tie_embeddings and k == "lm_head.weight")}
    model.load_state_dict(state, strict=True)
    return model.eval()

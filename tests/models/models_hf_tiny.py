"""Tiny random transformers models (the parity oracle) for tests/models; imported by the test files."""

from __future__ import annotations

import torch
import transformers as tf

from engine.models import CausalLM, build_model
from engine.models.hf_config import args_from_config

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)

# name -> (HF class, config class, config kwargs). Covers qkv bias on/off, tied embeddings, GQA 2:1 and 4:1.
CASES = {
    "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config, dict(num_key_value_heads=2, rope_theta=1e6)),
    "qwen2.5-tied": (
        tf.Qwen2ForCausalLM,
        tf.Qwen2Config,
        dict(num_key_value_heads=1, rope_theta=1e6, tie_word_embeddings=True),
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

"""ModelArgs (one frozen dataclass for every architecture) and the named flavours."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Arch = Literal["qwen2", "llama", "glm", "glm4"]
ROPE_SCALING_TYPES = ("llama3", "yarn", "dynamic")


@dataclass(frozen=True)
class RopeScaling:
    """config.json's rope_scaling / rope_parameters for a scaled rotary (transformers' names and defaults).

    llama3:  Llama 3.1: long wavelengths divided by factor, a smooth band between low/high_freq_factor.
    yarn:    Qwen2 past 32k: frequencies blended between interpolation and extrapolation by a ramp over
             [beta_fast, beta_slow] rotations; cos/sin times attention_factor (default 0.1 ln(factor) + 1).
    dynamic: NTK-aware: the base grows with the document length L > max_position_embeddings.
    """

    rope_type: str
    factor: float
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_SCALING_TYPES:
            raise ValueError(f"unknown rope scaling type {self.rope_type!r}; supported: {ROPE_SCALING_TYPES}")


@dataclass(frozen=True)
class ModelArgs:
    # "qwen2": Qwen2 / Qwen2.5. "llama": Llama 3.x, the Qwen2 block without q/k/v bias. "glm": GLM-4-9B(-chat), the chatglm / HF `glm` architecture.
    # "glm4": GLM-4-0414, which adds a norm after attention and after the MLP in every block.
    arch: Arch
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # Rotary covers the first rotary_dim channels of every head: head_dim for qwen2, head_dim // 2 for GLM.
    rotary_dim: int
    # "half": rotate (x[:d/2], x[d/2:]) (Qwen2/Llama); "interleaved": rotate pairs (x[2i], x[2i+1]) (GLM).
    rope_layout: Literal["half", "interleaved"]
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = True
    tie_embeddings: bool = False
    max_position_embeddings: int = 32768
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(
                f"rotary_dim={self.rotary_dim} must be even and in (0, head_dim={self.head_dim}]"
            )
        if self.arch not in ("qwen2", "llama", "glm", "glm4"):
            raise ValueError(f"unknown arch {self.arch!r}")

    def num_params(self) -> int:
        """Exact parameter count (tied embeddings counted once)."""
        h, d, kv = self.hidden_size, self.head_dim, self.num_kv_heads * self.head_dim
        q = self.num_heads * d
        attn = h * (q + 2 * kv) + (q + 2 * kv) * self.qkv_bias + q * h
        mlp = 3 * h * self.intermediate_size
        norms = (4 if self.arch == "glm4" else 2) * h
        emb = self.vocab_size * h
        return self.num_layers * (attn + mlp + norms) + h + emb * (1 if self.tie_embeddings else 2)


def _qwen2(**kw) -> ModelArgs:
    kw.setdefault("head_dim", kw["hidden_size"] // kw["num_heads"])
    kw.setdefault("rotary_dim", kw["head_dim"])
    return ModelArgs(arch="qwen2", rope_layout="half", qkv_bias=True, **kw)


def _llama(**kw) -> ModelArgs:
    kw.setdefault("head_dim", kw["hidden_size"] // kw["num_heads"])
    kw.setdefault("rotary_dim", kw["head_dim"])
    return ModelArgs(arch="llama", rope_layout="half", qkv_bias=False, **kw)


def _glm(arch: Arch = "glm", **kw) -> ModelArgs:
    kw.setdefault("rotary_dim", kw["head_dim"] // 2)
    return ModelArgs(arch=arch, rope_layout="interleaved", **kw)


# Debug tokenizer ids (engine/data/tokenizer.py: 256 byte tokens, then the special tokens in order).
# debug-qwen2: <|endoftext|>=256, <|im_start|>=257, <|im_end|>=258.
# debug-glm4: <|endoftext|>=256, ..., <|user|>=263, <|assistant|>=264, <|observation|>=265.
# debug-llama: <|begin_of_text|>=256, <|end_of_text|>=257, ..., <|eom_id|>=264, <|eot_id|>=265 (Llama 3 order).
FLAVOURS: dict[str, ModelArgs] = {
    "debug-qwen2": _qwen2(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        rms_norm_eps=1e-6, rope_theta=1e6, tie_embeddings=True, max_position_embeddings=4096,
        eos_token_ids=(258, 256), pad_token_id=256, bos_token_id=None,
    ),
    "debug-glm4": _glm(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, rms_norm_eps=1.5625e-7, rope_theta=10000.0 * 500, qkv_bias=True,
        max_position_embeddings=4096, eos_token_ids=(256, 263, 265), pad_token_id=256,
    ),
    # Untied head, llama3 rope scaling with an original window of 64 so tests cross all three bands.
    "debug-llama": _llama(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        rms_norm_eps=1e-5, rope_theta=5e5, max_position_embeddings=4096,
        rope_scaling=RopeScaling("llama3", 8.0, 64, 1.0, 4.0),
        eos_token_ids=(265, 257, 264), bos_token_id=256, pad_token_id=257,
    ),
    # Values from the public config.json files.
    "qwen2-7b": _qwen2(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
        num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=131072,
        eos_token_ids=(151643,), bos_token_id=151643,
    ),
    "qwen2.5-7b": _qwen2(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
        num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=131072,
        eos_token_ids=(151643,), bos_token_id=151643,
    ),
    "qwen2.5-0.5b": _qwen2(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
        num_kv_heads=2, rms_norm_eps=1e-6, rope_theta=1e6, tie_embeddings=True, max_position_embeddings=32768,
        eos_token_ids=(151643,), bos_token_id=151643,
    ),
    "qwen2.5-1.5b": _qwen2(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
        num_kv_heads=2, rms_norm_eps=1e-6, rope_theta=1e6, tie_embeddings=True, max_position_embeddings=32768,
        eos_token_ids=(151643,), bos_token_id=151643,
    ),
    # meta-llama/Llama-3.1-8B(-Instruct); THUDM/LongWriter-llama3.1-8b has the same shape.
    "llama3.1-8b": _llama(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=5e5, max_position_embeddings=131072,
        rope_scaling=RopeScaling("llama3", 8.0, 8192, 1.0, 4.0),
        eos_token_ids=(128001, 128008, 128009), bos_token_id=128000,
    ),
    # THUDM/glm-4-9b(-chat): rope base 10000 * rope_ratio 500, layernorm_epsilon 1.5625e-07.
    "glm4-9b": _glm(
        vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_layers=40, num_heads=32,
        num_kv_heads=2, head_dim=128, rms_norm_eps=1.5625e-7, rope_theta=10000.0 * 500, qkv_bias=True,
        max_position_embeddings=131072, eos_token_ids=(151329, 151336, 151338), pad_token_id=151329,
    ),
}  # fmt: skip


def resolve_args(name_or_args: str | ModelArgs, **overrides) -> ModelArgs:
    if isinstance(name_or_args, ModelArgs):
        args = name_or_args
    elif name_or_args in FLAVOURS:
        args = FLAVOURS[name_or_args]
    else:
        raise ValueError(f"unknown model flavour {name_or_args!r}; known: {sorted(FLAVOURS)}")
    return replace(args, **overrides) if overrides else args

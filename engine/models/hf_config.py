"""config.json <-> ModelArgs and the weight-name tables between our modules and each checkpoint format.

Formats: "qwen2" (Qwen2ForCausalLM), "llama" (LlamaForCausalLM), "glm" (GlmForCausalLM, glm-4-9b-chat-hf), "glm4" (Glm4ForCausalLM,
GLM-4-0414) and "chatglm" (THUDM glm-4-9b-chat remote code: fused query_key_value, dense_h_to_4h).
Our parameter names are the HF names of qwen2 / llama / glm / glm4, so those convert by identity.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch

from engine.models.args import ROPE_SCALING_TYPES, ModelArgs, RopeScaling

FORMATS = ("qwen2", "llama", "glm", "glm4", "chatglm")
ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "glm": "GlmForCausalLM",
    "glm4": "Glm4ForCausalLM",
    "chatglm": "ChatGLMModel",
}
CHATGLM_AUTO_MAP = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

# ----------------------------------------------------------------------------------------------- config


def _eos_tuple(v) -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(v) if isinstance(v, list | tuple) else (int(v),)


_SCALING_KEYS = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
# Keys transformers keeps in a rope dict that are not scaling parameters.
_ROPE_OTHER_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


def _rope(cfg: dict, path: str) -> tuple[float, float | None, RopeScaling | None]:
    """(rope_theta, partial_rotary_factor, scaling) from a legacy (top-level rope_theta, rope_scaling) or a
    transformers-5 (rope_parameters) config. Scaling types outside llama3 / yarn / dynamic, and keys of
    theirs we do not model, are errors naming the key rather than a rotary computed wrongly."""
    rp = cfg.get("rope_parameters") or {}
    legacy = cfg.get("rope_scaling") or {}
    theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    prf = rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    scaling = None
    for key, d in (("rope_parameters", rp), ("rope_scaling", legacy)):
        kind = d.get("rope_type", d.get("type", "default"))
        if kind == "default":
            continue
        if kind not in ROPE_SCALING_TYPES:
            raise ValueError(
                f"{path}: {key}.rope_type {kind!r} is not supported (default, {', '.join(ROPE_SCALING_TYPES)})"
            )
        unknown = sorted(set(d) - _SCALING_KEYS - _ROPE_OTHER_KEYS)
        if unknown:
            raise ValueError(f"{path}: {key}.{unknown[0]} is not supported for rope_type {kind!r}")
        kw = {k: v for k, v in d.items() if k in _SCALING_KEYS and v is not None}
        if "factor" not in kw and kind != "yarn":
            raise ValueError(f"{path}: {key}.factor is missing for rope_type {kind!r}")
        # as transformers: the pretraining window defaults to max_position_embeddings
        if kind in ("llama3", "yarn"):
            kw.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings", 32768))
        if kind == "yarn" and "factor" not in kw:
            kw["factor"] = cfg.get("max_position_embeddings", 32768) / kw["original_max_position_embeddings"]
        found = RopeScaling(rope_type=kind, **kw)
        if scaling is not None and found != scaling:
            raise ValueError(f"{path}: rope_parameters and rope_scaling disagree ({scaling} vs {found})")
        scaling = found
    return float(theta), prf, scaling


_REQUIRED_SCALING_KEYS = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "dynamic": ("factor",),
}


def _rope_dict(scaling: RopeScaling | None) -> dict:
    """The scaling as config.json spells it: the type's required keys, plus yarn's non-default options."""
    if scaling is None:
        return {"rope_type": "default"}
    out = {"rope_type": scaling.rope_type}
    for f in dataclasses.fields(RopeScaling):
        v = getattr(scaling, f.name)
        required = f.name in _REQUIRED_SCALING_KEYS[scaling.rope_type]
        if required or (scaling.rope_type == "yarn" and f.name != "rope_type" and v != f.default):
            out[f.name] = v
    return out


def args_from_config(cfg: dict, path: str = "config.json") -> tuple[ModelArgs, str]:
    """ModelArgs and the checkpoint format from a config.json dict."""
    mt = cfg.get("model_type")
    if mt == "chatglm":
        for key, want in (
            ("rmsnorm", True),
            ("add_bias_linear", False),
            ("apply_residual_connection_post_layernorm", False),
            ("post_layer_norm", True),
            ("original_rope", True),
        ):
            if cfg.get(key, want) != want:
                raise ValueError(f"{path}: chatglm config {key}={cfg[key]!r} is not supported (need {want})")
        heads = cfg["num_attention_heads"]
        hd = cfg.get("kv_channels", cfg["hidden_size"] // heads)
        args = ModelArgs(
            arch="glm",
            vocab_size=cfg["padded_vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["ffn_hidden_size"],
            num_layers=cfg["num_layers"],
            num_heads=heads,
            num_kv_heads=cfg["multi_query_group_num"] if cfg.get("multi_query_attention", False) else heads,
            head_dim=hd,
            rms_norm_eps=cfg["layernorm_epsilon"],
            rope_theta=10000.0 * cfg.get("rope_ratio", 1),
            rotary_dim=hd // 2,
            rope_layout="interleaved",
            qkv_bias=cfg.get("add_qkv_bias", False),
            tie_embeddings=False,
            max_position_embeddings=cfg.get("seq_length", 8192),
            eos_token_ids=_eos_tuple(cfg.get("eos_token_id")),
            bos_token_id=cfg.get("bos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            initializer_range=cfg.get("initializer_range", 0.02),
        )
        return args, "chatglm"
    if mt not in ("qwen2", "llama", "glm", "glm4"):
        raise ValueError(f"{path}: unknown model_type {mt!r}; supported: {FORMATS}")
    if mt == "llama" and cfg.get("mlp_bias", False):
        raise ValueError(f"{path}: mlp_bias=true is not supported")
    if mt == "llama" and cfg.get("pretraining_tp", 1) != 1:
        raise ValueError(f"{path}: pretraining_tp={cfg['pretraining_tp']!r} is not supported (need 1)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act={cfg['hidden_act']!r} is not supported (need silu)")
    if cfg.get("use_sliding_window", False):
        raise ValueError(f"{path}: use_sliding_window=true is not supported")
    theta, prf, scaling = _rope(cfg, path)
    heads = cfg["num_attention_heads"]
    glm = mt in ("glm", "glm4")
    hd = cfg.get("head_dim") or cfg["hidden_size"] // heads
    args = ModelArgs(
        arch=mt,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=hd,
        rms_norm_eps=cfg["rms_norm_eps"],
        rope_theta=theta,
        rotary_dim=int(hd * (prf if prf is not None else (0.5 if glm else 1.0))),
        rope_layout="interleaved" if glm else "half",
        rope_scaling=scaling,
        # Qwen2 always has q/k/v bias; Llama's attention_bias defaults to false, GLM's to true
        qkv_bias=True if mt == "qwen2" else cfg.get("attention_bias", mt != "llama"),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
        eos_token_ids=_eos_tuple(cfg.get("eos_token_id")),
        bos_token_id=cfg.get("bos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
        initializer_range=cfg.get("initializer_range", 0.02),
    )
    return args, mt


def config_from_args(args: ModelArgs, fmt: str, dtype: torch.dtype, base: dict | None = None) -> dict:
    """config.json for `fmt`; `base` (the source config in the same format) keeps keys we do not model."""
    eos = list(args.eos_token_ids)
    eos_v = eos[0] if len(eos) == 1 else eos
    cfg = dict(base or {})
    dname = DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    if fmt == "chatglm":
        if args.rope_scaling is not None:
            raise ValueError("the chatglm format has no rope scaling; save a scaled model as 'glm'")
        cfg.update(
            architectures=[ARCHITECTURES[fmt]],
            model_type="chatglm",
            auto_map=cfg.get("auto_map", CHATGLM_AUTO_MAP),
            num_layers=args.num_layers,
            padded_vocab_size=args.vocab_size,
            hidden_size=args.hidden_size,
            ffn_hidden_size=args.intermediate_size,
            kv_channels=args.head_dim,
            num_attention_heads=args.num_heads,
            multi_query_attention=args.num_kv_heads != args.num_heads,
            multi_query_group_num=args.num_kv_heads,
            layernorm_epsilon=args.rms_norm_eps,
            rope_ratio=args.rope_theta / 10000.0,
            add_qkv_bias=args.qkv_bias,
            add_bias_linear=False,
            rmsnorm=True,
            post_layer_norm=True,
            original_rope=True,
            apply_residual_connection_post_layernorm=False,
            apply_query_key_layer_scaling=True,
            attention_softmax_in_fp32=True,
            fp32_residual_connection=False,
            bias_dropout_fusion=True,
            attention_dropout=0.0,
            hidden_dropout=0.0,
            seq_length=args.max_position_embeddings,
            tie_word_embeddings=False,
            use_cache=True,
            eos_token_id=eos_v,
            pad_token_id=args.pad_token_id,
            torch_dtype=dname,
        )
        return cfg
    if fmt not in ("qwen2", "llama", "glm", "glm4"):
        raise ValueError(f"unknown checkpoint format {fmt!r}; supported: {FORMATS}")
    rope = {**_rope_dict(args.rope_scaling), "rope_theta": args.rope_theta}
    # legacy rope_scaling for vLLM and transformers 4 (None when unscaled), rope_parameters for transformers 5
    cfg["rope_scaling"] = _rope_dict(args.rope_scaling) if args.rope_scaling is not None else None
    cfg.update(
        architectures=[ARCHITECTURES[fmt]],
        model_type=fmt,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        hidden_act="silu",
        max_position_embeddings=args.max_position_embeddings,
        initializer_range=args.initializer_range,
        rms_norm_eps=args.rms_norm_eps,
        rope_theta=args.rope_theta,
        tie_word_embeddings=args.tie_embeddings,
        attention_dropout=0.0,
        use_cache=True,
        bos_token_id=args.bos_token_id,
        eos_token_id=eos_v,
        pad_token_id=args.pad_token_id,
        torch_dtype=dname,
        dtype=dname,
    )
    if fmt == "qwen2":
        if args.rotary_dim != args.head_dim or args.head_dim * args.num_heads != args.hidden_size:
            raise ValueError("qwen2 format needs rotary_dim == head_dim == hidden_size / num_heads")
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=args.num_layers)
    elif fmt == "llama":
        cfg.update(head_dim=args.head_dim, attention_bias=args.qkv_bias, mlp_bias=False, pretraining_tp=1)
    else:
        prf = args.rotary_dim / args.head_dim
        rope["partial_rotary_factor"] = prf
        cfg.update(head_dim=args.head_dim, attention_bias=args.qkv_bias, partial_rotary_factor=prf)
    cfg["rope_parameters"] = rope
    return cfg


def read_config(path: str | os.PathLike) -> tuple[ModelArgs, str, dict]:
    """(ModelArgs, checkpoint format, raw config dict) of a checkpoint directory."""
    f = Path(path) / "config.json"
    if not f.is_file():
        raise ValueError(f"{f}: config.json not found")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: invalid JSON: {e}") from e
    try:
        args, fmt = args_from_config(cfg, str(f))
    except KeyError as e:
        raise ValueError(f"{f}: missing config key {e.args[0]!r}") from e
    return args, fmt, cfg


def config_dtype(cfg: dict) -> torch.dtype | None:
    name = cfg.get("torch_dtype") or cfg.get("dtype")
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    return dt if isinstance(dt, torch.dtype) else None


# ------------------------------------------------------------------------------------------ name tables

_CHATGLM_LAYER = {  # chatglm suffix -> our suffix, inside transformer.encoder.layers.N / model.layers.N
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",  # [gate; up] in both layouts
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_CHATGLM_TOP = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^(transformer\.encoder|model)\.layers\.(\d+)\.(.+)$")


def import_tensor(fmt: str, args: ModelArgs, key: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One checkpoint tensor -> our (name, tensor) pairs (a fused chatglm qkv gives three)."""
    if fmt != "chatglm":
        return [(key, t)]
    if key in _CHATGLM_TOP:
        return [(_CHATGLM_TOP[key], t)]
    m = _LAYER_RE.match(key)
    if m is None or m.group(1) != "transformer.encoder":
        return [(key, t)]  # unknown: reported as unexpected by the caller
    i, suffix = m.group(2), m.group(3)
    pre = f"model.layers.{i}."
    if suffix in _CHATGLM_LAYER:
        return [(pre + _CHATGLM_LAYER[suffix], t)]
    if suffix in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
        kind = suffix.rsplit(".", 1)[1]
        q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        parts = t.split([q, kv, kv], dim=0)  # rows: [q (nh*hd); k (nkv*hd); v (nkv*hd)]
        return [(f"{pre}self_attn.{p}_proj.{kind}", x) for p, x in zip("qkv", parts)]
    return [(key, t)]


def export_state(state: dict[str, torch.Tensor], args: ModelArgs, fmt: str) -> dict[str, torch.Tensor]:
    """Our full state dict -> checkpoint names and tensors of `fmt` (works on meta tensors too)."""
    allowed = {"qwen2": ("qwen2",), "llama": ("llama",), "glm": ("glm", "chatglm"), "glm4": ("glm4",)}[
        args.arch
    ]
    if fmt not in allowed:
        raise ValueError(f"a {args.arch} model cannot be saved as format {fmt!r}; choose one of {allowed}")
    if fmt != "chatglm":
        return dict(state)
    top = {v: k for k, v in _CHATGLM_TOP.items()}
    layer = {v: k for k, v in _CHATGLM_LAYER.items()}
    out = {}
    for name, t in state.items():
        if name in top:
            out[top[name]] = t
            continue
        m = _LAYER_RE.match(name)
        assert m is not None, name
        i, suffix = m.group(2), m.group(3)
        pre = f"transformer.encoder.layers.{i}."
        if suffix in layer:
            out[pre + layer[suffix]] = t
        elif suffix.startswith("self_attn.q_proj."):
            kind = suffix.rsplit(".", 1)[1]
            parts = [state[f"model.layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{pre}self_attention.query_key_value.{kind}"] = torch.cat(parts, dim=0)
        elif not suffix.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            raise ValueError(f"no chatglm name for parameter {name!r}")
    return out

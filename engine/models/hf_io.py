"""Hugging Face checkpoints: config.json <-> ModelArgs, safetensors (single or sharded) load and save,
and the weight-name tables between our modules and each checkpoint format.

Formats: "qwen2" (Qwen2ForCausalLM), "glm" (GlmForCausalLM, glm-4-9b-chat-hf), "glm4" (Glm4ForCausalLM,
GLM-4-0414) and "chatglm" (THUDM glm-4-9b-chat remote code: fused query_key_value, dense_h_to_4h).
Our parameter names are the HF names of qwen2 / glm / glm4, so those three convert by identity.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from engine.models.args import ModelArgs
from engine.models.model import CausalLM, build_model

FORMATS = ("qwen2", "glm", "glm4", "chatglm")
ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
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
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "tokenization_chatglm.py",
    "chat_template.jinja",
    "chat_template.json",
)
REMOTE_CODE_FILES = ("configuration_chatglm.py", "modeling_chatglm.py")
# Buffers some checkpoints carry; recomputed by us, never loaded.
IGNORED_KEYS = re.compile(r".*(rotary_emb|rotary_pos_emb)\.inv_freq$")
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# ----------------------------------------------------------------------------------------------- config


def _eos_tuple(v) -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(v) if isinstance(v, list | tuple) else (int(v),)


def _rope(cfg: dict, path: str) -> tuple[float, float | None]:
    """(rope_theta, partial_rotary_factor) from a legacy (top-level) or transformers-5 (rope_parameters)
    config; any scaled rope type is refused rather than silently computed wrongly."""
    rp = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    for d in (rp, scaling):
        kind = d.get("rope_type", d.get("type", "default"))
        if kind != "default":
            raise ValueError(f"{path}: rope type {kind!r} is not supported (only default rotary)")
    theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    prf = rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    return float(theta), prf


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
    if mt not in ("qwen2", "glm", "glm4"):
        raise ValueError(f"{path}: unknown model_type {mt!r}; supported: {FORMATS}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act={cfg['hidden_act']!r} is not supported (need silu)")
    if cfg.get("use_sliding_window", False):
        raise ValueError(f"{path}: use_sliding_window=true is not supported")
    theta, prf = _rope(cfg, path)
    heads = cfg["num_attention_heads"]
    glm = mt != "qwen2"
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
        qkv_bias=cfg.get("attention_bias", True) if glm else True,
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
        cfg.update(
            architectures=["ChatGLMModel"],
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
    if fmt not in ("qwen2", "glm", "glm4"):
        raise ValueError(f"unknown checkpoint format {fmt!r}; supported: {FORMATS}")
    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    cfg.pop("rope_scaling", None)
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
    allowed = {"qwen2": ("qwen2",), "glm": ("glm", "chatglm"), "glm4": ("glm4",)}[args.arch]
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


# ---------------------------------------------------------------------------------------- safetensors


def _read_header(file: Path) -> dict[str, dict]:
    """Tensor entries of a safetensors header, after checking the file holds every byte they describe."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from e
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{file}: truncated ({size} bytes, the header describes {8 + n + end})")
    return header


def checkpoint_files(path: str | os.PathLike) -> dict[Path, dict[str, dict]]:
    """{shard file: {key: header entry}} of a directory with model.safetensors or a sharded index."""
    d = Path(path)
    index = d / "model.safetensors.index.json"
    single = d / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: invalid index ({e})") from e
        files: dict[Path, dict[str, dict]] = {}
        for fname in sorted(set(weight_map.values())):
            f = d / fname
            if not f.is_file():
                key = next(k for k, v in weight_map.items() if v == fname)
                raise ValueError(f"{f}: shard listed in {index.name} is missing (holds e.g. {key!r})")
            files[f] = _read_header(f)
        for key, fname in weight_map.items():
            if key not in files[d / fname]:
                raise ValueError(f"{d / fname}: key {key!r} listed in {index.name} is not in the shard")
        return files
    if single.is_file():
        return {single: _read_header(single)}
    raise ValueError(f"{d}: no model.safetensors or model.safetensors.index.json")


def _expected_shapes(args: ModelArgs, fmt: str) -> dict[str, tuple[int, ...]]:
    meta = build_model(args, device="meta").state_dict()
    return {k: tuple(v.shape) for k, v in export_state(meta, args, fmt).items()}


def validate_checkpoint(path: str | os.PathLike, args: ModelArgs, fmt: str) -> dict[Path, list[str]]:
    """Check every key and shape from the headers alone (nothing is loaded); {file: keys to load}."""
    expected = _expected_shapes(args, fmt)
    plan: dict[Path, list[str]] = {}
    seen: set[str] = set()
    for f, header in checkpoint_files(path).items():
        keys = []
        for key, entry in header.items():
            if IGNORED_KEYS.match(key):
                continue
            shape = tuple(entry["shape"])
            if (
                key == "lm_head.weight"
                and args.tie_embeddings
                and shape == expected["model.embed_tokens.weight"]
            ):
                continue  # some exports of tied models also store the (identical) output matrix
            if key not in expected:
                raise ValueError(f"{f}: unexpected key {key!r} for a {fmt} checkpoint")
            if shape != expected[key]:
                raise ValueError(f"{f}: key {key!r} has shape {list(shape)}, expected {list(expected[key])}")
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{f}: key {key!r} has unsupported dtype {entry['dtype']}")
            seen.add(key)
            keys.append(key)
        plan[f] = keys
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"{Path(path)}: missing key {missing[0]!r} ({len(missing)} missing in all)")
    return plan


def iter_checkpoint(
    path: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (our parameter name, full CPU tensor) for every parameter of a checkpoint directory, converted
    from its format. The whole checkpoint is validated from the headers before the first tensor is read,
    so a caller copying into (sharded) parameters never stops half-way on bad input."""
    from safetensors import safe_open

    args, fmt, _ = read_config(path)
    plan = validate_checkpoint(path, args, fmt)
    for f, keys in plan.items():
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for key in keys:
                    t = sf.get_tensor(key)
                    for name, x in import_tensor(fmt, args, key, t):
                        yield name, (x if dtype is None else x.to(dtype)).contiguous()
        except Exception as e:  # safetensors raises its own error type
            if isinstance(e, ValueError):
                raise
            raise ValueError(f"{f}: failed to read ({e})") from e


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attn_impl: str = "auto",
) -> CausalLM:
    """Build the model of a checkpoint directory (qwen2 | chatglm | glm | glm4) and load its weights.

    dtype None = the checkpoint's torch_dtype (float32 when absent). The model is built on the meta device
    and materialised once on `device`; device="meta" validates the checkpoint and loads nothing."""
    args, fmt, cfg = read_config(path)
    dtype = dtype or config_dtype(cfg) or torch.float32
    model = build_model(args, dtype=dtype, device="meta", attn_impl=attn_impl)
    model.source_dir, model.source_format = str(path), fmt
    if torch.device(device).type == "meta":
        validate_checkpoint(path, args, fmt)
        return model
    model.to_empty(device=device)
    load_weights_(model, path)
    return model


@torch.no_grad()
def load_weights_(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy a checkpoint into an existing (plain-tensor) model of the same shapes, in place."""
    params = dict(model.named_parameters())
    loaded = set()
    for name, t in iter_checkpoint(path):
        if name not in params:
            raise ValueError(f"{path}: checkpoint parameter {name!r} does not exist in the model")
        p = params[name]
        if p.shape != t.shape:
            raise ValueError(f"{path}: key {name!r} has shape {list(t.shape)}, model has {list(p.shape)}")
        p.copy_(t)
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{path}: missing key {missing[0]!r} ({len(missing)} missing in all)")


# --------------------------------------------------------------------------------------------- saving


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
    if m is None:
        raise ValueError(f"cannot parse size {size!r} (e.g. '5GB', '500MB', 1000000)")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    mult |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(m.group(1)) * mult[unit])


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:  # a tensor larger than the limit gets a shard of its own
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards


def default_format(args: ModelArgs) -> str:
    return args.arch  # qwen2 -> qwen2, glm -> glm (HF-native), glm4 -> glm4


def save_pretrained(
    model: CausalLM,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    format: str | None = None,
    max_shard_size: int | str = "5GB",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write an HF checkpoint directory that transformers and vLLM load.

    format None = the HF-native format of the architecture (a chatglm-loaded GLM-4 becomes "glm");
    "chatglm" keeps THUDM's remote-code layout. state_dict: a full (gathered) state dict to save instead
    of model.state_dict(). Files are written to a temporary directory and renamed into place."""
    from safetensors.torch import save_file

    args = model.args
    fmt = format or default_format(args)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; supported: {FORMATS}")
    state = state_dict if state_dict is not None else model.state_dict()
    dtype = dtype or next(iter(state.values())).dtype
    state = {k: v.detach().to(device="cpu", dtype=dtype) for k, v in state.items()}
    tensors = {k: v.contiguous() for k, v in export_state(state, args, fmt).items()}
    shards = _shard(tensors, parse_size(max_shard_size))

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    src_dir = getattr(model, "source_dir", None)
    src = Path(src_dir) if src_dir else None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        names = ["model.safetensors"]
        if len(shards) > 1:
            names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
            weight_map = {k: n for n, s in zip(names, shards) for k in s}
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for n, s in zip(names, shards):
            save_file(s, str(tmp / n), metadata={"format": "pt"})

        base = None
        if (
            src is not None
            and getattr(model, "source_format", None) == fmt
            and (src / "config.json").is_file()
        ):
            base = json.loads((src / "config.json").read_text())
        cfg = config_from_args(args, fmt, dtype, base)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        gen = {}
        if src is not None and (src / "generation_config.json").is_file():
            gen = json.loads((src / "generation_config.json").read_text())
        gen.update(eos_token_id=cfg["eos_token_id"], pad_token_id=args.pad_token_id)
        if args.bos_token_id is not None:
            gen["bos_token_id"] = args.bos_token_id
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        copy = (TOKENIZER_FILES if tokenizer is None else ()) + (
            REMOTE_CODE_FILES if fmt == "chatglm" else ()
        )
        if src is not None and src.resolve() != out.resolve():
            for n in copy:
                if (src / n).is_file() and not (tmp / n).exists():
                    shutil.copy2(src / n, tmp / n)
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)  # the whole directory appears at once
        return
    # Existing directory (may hold other files): drop stale weights, then rename each new file over.
    for f in out.iterdir():
        if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", f.name):
            f.unlink()
    for f in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):  # config.json last
        os.replace(f, out / f.name)

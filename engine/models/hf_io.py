"""Hugging Face checkpoints: safetensors (single or sharded) validation, loading and saving.

Config translation and weight-name tables live in hf_config.py.
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
from engine.models.hf_config import (
    FORMATS,
    config_dtype,
    config_from_args,
    export_state,
    import_tensor,
    read_config,
)
from engine.models.model import CausalLM, build_model

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
        cut = [k for k, v in header.items() if 8 + n + v["data_offsets"][1] > size]
        cut.sort(key=lambda k: header[k]["data_offsets"][0])  # the first key cut short, in file order
        raise ValueError(
            f"{file}: truncated ({size} bytes, the header describes {8 + n + end}): key {cut[0]!r}"
            + (f" and {len(cut) - 1} more lie" if len(cut) > 1 else " lies")
            + " past the end"
        )
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
    seen: dict[str, Path] = {}
    files = checkpoint_files(path)
    for f, header in files.items():
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
            if key in seen:  # which copy would win is arbitrary: refuse
                raise ValueError(f"{f}: key {key!r} is also stored in {seen[key]}")
            seen[key] = f
            keys.append(key)
        plan[f] = keys
    missing = sorted(set(expected) - set(seen))
    if missing:
        # The file that should have listed it: the index of a sharded checkpoint, else the single file.
        index = Path(path) / "model.safetensors.index.json"
        where = index if index.is_file() else next(iter(files))
        raise ValueError(f"{where}: missing key {missing[0]!r} ({len(missing)} missing in all)")
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
    fmt = format or args.arch  # the HF-native format has the architecture's name (glm, not chatglm)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; supported: {FORMATS}")
    state = state_dict if state_dict is not None else model.state_dict()
    state = {clean_param_name(k): v for k, v in state.items()}
    expected = set(build_model(args, device="meta").state_dict())
    if set(state) != expected:
        bad = sorted(set(state) ^ expected)[0]
        kind = "unexpected" if bad in state else "missing"
        raise ValueError(f"save_pretrained: {kind} state_dict key {bad!r}")
    if any(hasattr(v, "full_tensor") for v in state.values()):
        raise ValueError("save_pretrained: state holds DTensors; pass state_dict= a gathered full state dict")
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


def clean_param_name(name: str) -> str:
    """A parameter name without the prefixes of wrappers applied from outside (activation checkpointing,
    torch.compile): the name in the model's own state_dict."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


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

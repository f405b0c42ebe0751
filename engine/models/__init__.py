"""Qwen2 / Qwen2.5 / GLM-4 causal LMs written from scratch, their named flavours, HF checkpoint I/O and
KV-cache generation. Model code only: distribution, checkpointing policy and loss kernels live outside."""

from engine.models.args import FLAVOURS, ModelArgs, resolve_args
from engine.models.attention import ATTN_IMPLS
from engine.models.generate import generate
from engine.models.hf_config import read_config
from engine.models.hf_io import (
    clean_param_name,
    iter_checkpoint,
    load_pretrained,
    load_weights_,
    save_pretrained,
)
from engine.models.model import CausalLM, build_model, default_loss_fn

__all__ = [
    "ATTN_IMPLS",
    "FLAVOURS",
    "CausalLM",
    "ModelArgs",
    "build_model",
    "clean_param_name",
    "default_loss_fn",
    "generate",
    "iter_checkpoint",
    "load_pretrained",
    "load_weights_",
    "read_config",
    "resolve_args",
    "save_pretrained",
]

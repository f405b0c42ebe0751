"""CausalLM: embedding -> decoder blocks -> final norm -> output projection, for every architecture.

Only architecture lives here: FSDP, activation checkpointing, compile and the fused loss kernel are applied
from outside (the trainer wraps each of .model.layers, shards [.model.norm, .lm_head] as one unit and
replaces .loss_fn).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.args import ModelArgs, resolve_args
from engine.models.attention import (
    AttnMeta,
    cu_seqlens_from_position_ids,
    make_attn_meta,
    position_ids_from_cu_seqlens,
)
from engine.models.glm4 import GlmBlock
from engine.models.layers import RMSNorm, document_lengths, rotary_cos_sin
from engine.models.qwen2 import Qwen2Block

# Llama is the Qwen2 block without q/k/v bias (args.qkv_bias): one module, no near-copy.
BLOCKS: dict[str, type[nn.Module]] = {
    "qwen2": Qwen2Block,
    "llama": Qwen2Block,
    "glm": GlmBlock,
    "glm4": GlmBlock,
}


def default_loss_fn(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, **_) -> torch.Tensor:
    """Sum of token cross-entropies; same as F.cross_entropy((hidden @ weight.T).float(), labels, "sum").
    Keyword hints meant for a fused loss (e.g. num_valid) are ignored."""
    logits = F.linear(hidden, weight).float()  # (N, V)
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


class LMHead(nn.Linear):
    """The output projection (V, H). Given labels, its forward returns loss_fn(hidden, weight, labels): the
    loss is computed inside this module's forward because under FSDP2 that is where its weight is gathered
    (engine.parallel.apply_fsdp makes [final norm, lm_head] one unit that stays gathered for backward)."""

    def forward(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor | None = None,
        loss_fn: Callable | None = None,
        loss_kwargs: dict | None = None,
    ) -> torch.Tensor:
        if labels is None:
            return F.linear(hidden, self.weight)  # (B, T, V)
        return loss_fn(hidden.flatten(0, 1), self.weight, labels.flatten(), **(loss_kwargs or {}))


class DecoderStack(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        block = BLOCKS[args.arch]
        self.layers = nn.ModuleList(block(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, meta: AttnMeta | None, cache=None
    ) -> torch.Tensor:
        a = self.args
        x = self.embed_tokens(input_ids)  # (B, T, H)
        lengths = None
        if a.rope_scaling is not None and a.rope_scaling.rope_type == "dynamic":
            lengths = document_lengths(position_ids, meta.cu_seqlens if meta is not None else None)
        rope = rotary_cos_sin(
            position_ids,
            a.rotary_dim,
            a.rope_theta,
            a.rope_layout,
            x.dtype,
            scaling=a.rope_scaling,
            max_position_embeddings=a.max_position_embeddings,
            lengths=lengths,
        )  # (B, T, rd) each
        for layer in self.layers:
            x = layer(x, rope, meta, cache)
        return self.norm(x)


class CausalLM(nn.Module):
    def __init__(self, args: ModelArgs, attn_impl: str = "auto") -> None:
        super().__init__()
        self.args = args
        self.attn_impl = attn_impl
        self.model = DecoderStack(args)
        # Tied models have no lm_head module: the output projection reads the embedding matrix (and the
        # loss is computed in this root forward, where FSDP has gathered it).
        self.lm_head = None if args.tie_embeddings else LMHead(args.hidden_size, args.vocab_size, bias=False)
        # (hidden (N, H), weight (V, H), labels (N,), **loss_kwargs) -> loss; any reduction ("none": per-token
        # losses); loss_kwargs are the caller's hints (the trainer passes num_valid)
        self.loss_fn: Callable[..., torch.Tensor] = default_loss_fn

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight  # (V, H)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        labels: torch.Tensor | None = None,
        loss_kwargs: dict | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) without labels, else loss_fn(hidden, output weight, labels, **loss_kwargs) over
        the B*T tokens (loss_kwargs: what the caller knows that the loss may use, e.g. num_valid).

        Packed rows: give cu_seqlens (int32, over the flattened tokens) and max_seqlen (a host int). No
        path copies anything back from the device when both are given (position_ids, when absent, are
        derived on the device); position_ids alone make the boundaries be read on the host (a sync)."""
        B, T = input_ids.shape
        dev = input_ids.device
        if cu_seqlens is not None:
            if position_ids is None:
                position_ids = position_ids_from_cu_seqlens(cu_seqlens.to(dev, non_blocking=True), B, T)
        elif position_ids is None:
            position_ids = torch.arange(T, device=dev).expand(B, T)
        else:
            cu_seqlens = cu_seqlens_from_position_ids(position_ids)
        meta = make_attn_meta(self.attn_impl, B, T, cu_seqlens, max_seqlen, dev)
        hidden = self.model(input_ids, position_ids, meta)  # (B, T, H)
        if self.lm_head is not None:
            return self.lm_head(hidden, labels, self.loss_fn, loss_kwargs)
        if labels is None:
            return F.linear(hidden, self.output_weight)  # (B, T, V)
        return self.loss_fn(hidden.flatten(0, 1), self.output_weight, labels.flatten(), **(loss_kwargs or {}))

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter: N(0, initializer_range) for matrices, 0 for biases, 1 for norms.
        Used after to_empty() on a meta-built model."""
        std = self.args.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, RMSNorm):
                m.reset_parameters()


def build_model(
    name_or_args: str | ModelArgs,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_impl: str = "auto",
    init: bool = True,
) -> CausalLM:
    """Build on the meta device (no memory), then materialise on `device` and initialise unless
    device is "meta" or init=False (e.g. when a checkpoint will overwrite every parameter)."""
    args = resolve_args(name_or_args)
    with torch.device("meta"):
        model = CausalLM(args, attn_impl=attn_impl).to(dtype)
    if torch.device(device).type != "meta":
        model.to_empty(device=device)
        if init:
            model.init_weights()
    return model

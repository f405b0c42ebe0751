"""Autoregressive generation with a KV cache (batch 1), used by evaluation's --engine_checkpoint.

The decoder blocks take an optional cache object; when given, attention writes this step's k/v into it
and attends over the cached prefix (KVCache.attend) instead of the varlen path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.models.model import CausalLM


class KVCache:
    """Preallocated keys/values of every layer: (L, B, max_len, nkv, hd) each."""

    def __init__(self, model: CausalLM, batch: int, max_len: int) -> None:
        a = model.args
        w = model.model.embed_tokens.weight
        shape = (a.num_layers, batch, max_len, a.num_kv_heads, a.head_dim)
        self.k = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.v = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.pos = 0  # tokens already cached; advanced by the caller after each forward

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, T, nh, hd), k/v (B, T, nkv, hd) of positions pos..pos+T-1 -> (B, T, nh, hd)."""
        T = q.shape[1]
        s, e = self.pos, self.pos + T
        if e > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} tokens, asked for {e}")
        self.k[layer_idx, :, s:e] = k
        self.v[layer_idx, :, s:e] = v
        kk = self.k[layer_idx, :, :e].transpose(1, 2)  # (B, nkv, e, hd)
        vv = self.v[layer_idx, :, :e].transpose(1, 2)
        mask = None
        if T > 1 and s > 0:  # query i (position s+i) sees keys 0..s+i
            qpos = torch.arange(s, e, device=q.device)[:, None]
            mask = torch.arange(e, device=q.device)[None, :] <= qpos  # (T, e)
        # Prefill of an empty cache is plain causal (no mask: flash-capable); one new token sees everything.
        causal = T > 1 and s == 0
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), kk, vv, attn_mask=mask, is_causal=causal, enable_gqa=True
        )
        return o.transpose(1, 2)  # (B, T, nh, hd)


def _forward_last(model: CausalLM, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits of the last position only (a long prompt never materialises [T, V] logits)."""
    B, T = ids.shape
    pos = torch.arange(cache.pos, cache.pos + T, device=ids.device).expand(B, T)
    hidden = model.model(ids, pos, None, cache)  # (B, T, H)
    cache.pos += T
    return F.linear(hidden[:, -1], model.output_weight).float()  # (B, V)


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """logits (B, V) fp32 -> (B,) token ids; temperature 0 = argmax."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        drop = sp.cumsum(dim=-1) - sp > top_p  # keep the smallest prefix whose mass reaches top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.inference_mode()
def generate(
    model: CausalLM,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_ids: list[int] | tuple[int, ...] | None = None,
    seed: int | None = None,
) -> list[int]:
    """New token ids after prompt_ids (without the eos that stopped generation)."""
    if not prompt_ids:
        raise ValueError("prompt_ids is empty")
    eos = set(model.args.eos_token_ids if eos_token_ids is None else eos_token_ids)
    dev = model.model.embed_tokens.weight.device
    gen = None
    if seed is not None:
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed)
    cache = KVCache(model, 1, len(prompt_ids) + max_new_tokens)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=dev)  # (1, T)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = _forward_last(model, ids, cache)  # (1, V)
        tok = int(sample_next(logits, temperature, top_p, gen)[0])
        if tok in eos:
            break
        out.append(tok)
        ids = torch.tensor([[tok]], dtype=torch.long, device=dev)
    return out

"""bench_train's baselines: transformers' own model and loss, optionally with Liger-Kernel's patches.

Imported only inside the worker process of a transformers configuration (optional packages stay lazy)."""

from __future__ import annotations

import contextlib

from benchmarks.train_workload import BenchConfig, RunSpec


def _apply_liger(model_type: str) -> None:
    import liger_kernel.transformers as lk  # optional; ImportError -> "skipped"

    fn = {"qwen2": "apply_liger_kernel_to_qwen2", "glm4": "apply_liger_kernel_to_glm4"}.get(model_type)
    if fn is None or not hasattr(lk, fn):
        raise ImportError(f"liger_kernel has no patch for model_type {model_type!r}")
    getattr(lk, fn)()  # the defaults a user gets: fused linear CE, RMSNorm, RoPE, SwiGLU kernels


def hf_runner(spec: RunSpec, cfg: BenchConfig, device):
    """transformers' own model and loss (HF Trainer equivalent: fp32 weights, bf16 autocast on GPU,
    loss = sum / num_items_in_batch over the step, non-reentrant gradient checkpointing, fused AdamW)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_cfg = AutoConfig.from_pretrained(spec.hf_dir)
    if cfg.provider == "transformers+liger":
        _apply_liger(hf_cfg.model_type)
    attn = "sdpa"
    if device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            attn = "flash_attention_2"  # packed rows through position_ids need it to skip masked blocks
    model = AutoModelForCausalLM.from_pretrained(spec.hf_dir, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    model.to(device).train()
    if cfg.ac == "full":
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif cfg.ac != "off":
        raise ValueError(f"transformers has no {cfg.ac!r} activation checkpointing")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=device.type == "cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step(micro_batches):
        n_target = sum(mb["num_target_tokens"] for mb in micro_batches)
        n_items = torch.tensor(n_target, device=device)
        total = torch.zeros((), device=device)
        for mb in micro_batches:
            ids = mb["input_ids"].to(device, non_blocking=True)
            # HF shifts labels inside; ours are aligned: shift them right so HF's shift restores them.
            hf_labels = torch.full_like(mb["labels"], -100)
            hf_labels[:, 1:] = mb["labels"][:, :-1]
            kw = {}
            # packed: no attention mask, transformers derives the documents from position_ids
            if cfg.layout == "packed":
                kw["position_ids"] = mb["position_ids"].to(device, non_blocking=True)
            else:
                B, T = ids.shape
                lens = torch.tensor(mb["row_lengths"])
                kw["attention_mask"] = (torch.arange(T)[None, :] < lens[:, None]).long().to(device)
            with amp:
                out = model(
                    input_ids=ids,
                    labels=hf_labels.to(device),
                    num_items_in_batch=n_items,
                    use_cache=False,
                    **kw,
                )
            out.loss.backward()
            total += out.loss.detach().float()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total.item()  # one host sync per step, as the engine's step

    return step, {"attn_impl": attn, "params": sum(p.numel() for p in model.parameters())}

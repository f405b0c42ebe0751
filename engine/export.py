"""Export any training checkpoint (DCP, written by any number of ranks) to an HF directory, without training:

    python -m engine.export output/run/checkpoint-500 output/run/hf-500 [--dtype bfloat16|float32]
        [--model SRC] [--tokenizer SRC] [--device cpu|cuda]

One process on CPU (or one GPU): DCP reads every rank's shards into one full model. The model and
tokenizer come from the run's config in trainer_state.json (the HF directory it started from, or the
flavour name); --model / --tokenizer point elsewhere when those have moved. The result is what the run's
own final/ would be at that step: safetensors + config.json + generation_config.json + tokenizer files,
loadable by transformers and vLLM.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def export_checkpoint(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    model_src: str | None = None,
    tokenizer_src: str | None = None,
    device: str = "cpu",
) -> Path:
    """Write checkpoint_dir's weights as an HF directory at out_dir; returns out_dir."""
    from engine.checkpoint import checkpoint_info
    from engine.data import load_tokenizer
    from engine.models import build_model, load_pretrained, save_pretrained

    ckpt = Path(checkpoint_dir)
    if not (ckpt / ".metadata").is_file() or not (ckpt / "trainer_state.json").is_file():
        raise ValueError(f"{ckpt}: not a complete training checkpoint (.metadata, trainer_state.json)")
    run = checkpoint_info(ckpt).get("config", {}).get("model", {})
    src = model_src or run.get("model")
    if src is None:
        raise ValueError(f"{ckpt}/trainer_state.json names no model: pass --model DIR|FLAVOUR")
    # the architecture (and, from an HF directory, its config.json and generation_config.json as the base)
    if Path(src).is_dir():
        model = load_pretrained(src, dtype=dtype, device="meta")
    else:
        try:
            model = build_model(src, dtype=dtype, device="meta")
        except (KeyError, ValueError) as e:
            raise ValueError(
                f"the run's model {src!r} is neither an HF directory nor a flavour ({e}): pass --model DIR|FLAVOUR"
            ) from None
    model.to_empty(device=device)
    # DCP reads the shards of every rank into these full tensors (the checkpoint is fp32; copy_ casts)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(ckpt))
    model.load_state_dict(state["model"])
    tok_src = tokenizer_src or run.get("tokenizer") or src
    try:
        tokenizer = load_tokenizer(tok_src)
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer {tok_src!r}: {e}; pass --tokenizer DIR|FILE") from None
    save_pretrained(model, out_dir, tokenizer=tokenizer, dtype=dtype)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    ap.add_argument("--model", default=None, help="HF directory or flavour (default: the run's --model)")
    ap.add_argument("--tokenizer", default=None, help="default: the run's --tokenizer, else its --model")
    ap.add_argument("--device", default="cpu")
    ns = ap.parse_args(argv)
    try:
        out = export_checkpoint(
            ns.checkpoint_dir, ns.out_dir, dtype=DTYPES[ns.dtype], model_src=ns.model,
            tokenizer_src=ns.tokenizer, device=ns.device,
        )  # fmt: skip
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {ns.checkpoint_dir} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

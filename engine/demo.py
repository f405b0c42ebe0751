"""`make demo`: train debug-qwen2 on the bundled LongWriter-format sample with N ranks under torchrun.

    python -m engine.demo --nproc 2 [--output_dir output/demo] [--epochs 3]

Runs the real launcher as a subprocess (gloo on CPU, NCCL on GPU): progress bar, falling loss, a
checkpoint, the HF export (reloaded here to check it), and a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "longwriter_demo.jsonl"
CONFIG = REPO / "examples" / "demo_debug_qwen2.toml"


def demo_flags(output_dir: Path, epochs: float, on_gpu: bool) -> list[str]:
    flags = ["--config", str(CONFIG), "--output_dir", str(output_dir), "--num_train_epochs", str(epochs)]
    flags += ["--dataset", str(DATA)]  # absolute: the config's path is relative to the repository
    return flags + (["--torch_dtype", "bfloat16"] if on_gpu else [])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="ranks (processes) on this machine")
    p.add_argument("--output_dir", default=str(REPO / "outputs" / "demo"))
    p.add_argument("--epochs", type=float, default=3.0)
    args = p.parse_args(argv)

    import torch

    out = Path(args.output_dir)
    shutil.rmtree(out, ignore_errors=True)  # a fresh run every time
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    cmd += ["-m", "engine.train", *demo_flags(out, args.epochs, torch.cuda.is_available())]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=REPO, env=env).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        print(f"demo: training failed (exit {rc})", file=sys.stderr)
        return rc

    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    from engine.checkpoint import list_checkpoints
    from engine.models import load_pretrained

    ckpts = list_checkpoints(out)  # complete checkpoints only, oldest first
    final = load_pretrained(out / "final")  # the export reloads (transformers loads it too: tests/train)
    head = sum(r["loss"] for r in steps[:3]) / len(steps[:3])
    tail = sum(r["loss"] for r in steps[-3:]) / len(steps[-3:])
    tok_s = sum(r["tokens"] for r in steps) / sum(r["step_time_s"] for r in steps)
    print(
        f"demo: {args.nproc} ranks, {len(steps)} steps in {wall:.0f} s, loss {head:.3f} -> {tail:.3f} "
        f"(first/last 3 steps), {tok_s:.0f} tokens/s, checkpoint {ckpts[-1][1].name if ckpts else 'none'}, "
        f"HF export {out / 'final'} ({final.args.num_params() / 1e6:.2f}M params)",
        flush=True,
    )
    return 0 if tail < head else 1


if __name__ == "__main__":
    sys.exit(main())

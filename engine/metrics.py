"""Progress bar, metrics.jsonl, optional TensorBoard, and the throughput / MFU / memory numbers."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

import torch

# Dense bf16 peak per GPU (FLOP/s), by a substring of torch.cuda.get_device_name(). The first key found in
# the name wins, so the specific names come before their family: "NVIDIA H100 PCIe" (756) and "NVIDIA H100
# NVL" (835) before plain "H100", which is the SXM part ("NVIDIA H100 80GB HBM3", 989).
PEAK_BF16 = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
}


def matmul_params(args) -> int:
    """Parameters that take part in a matmul per token: all but the embedding lookup (the output projection
    counts; with tied embeddings it is the embedding matrix)."""
    n = args.num_params()
    return n if args.tie_embeddings else n - args.vocab_size * args.hidden_size


def step_flops(args, num_tokens: int, sum_sq_doc_len: int) -> float:
    """Model FLOPs of forward + backward (no recompute): 6 N per token plus causal attention, which costs
    6 * L^2 * d_q per layer for a document of length L (QK^T and PV, half the matrix, x3 for backward)."""
    d_q = args.num_heads * args.head_dim
    return 6.0 * matmul_params(args) * num_tokens + 6.0 * args.num_layers * d_q * sum_sq_doc_len


def peak_bf16(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by its name (PEAK_BF16, first match), None when unknown."""
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_bf16(torch.cuda.get_device_name(device))


def max_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    # CPU: peak resident set of this process (ru_maxrss is KiB on Linux, bytes on macOS)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024**3 if sys.platform == "darwin" else 1024**2)


def _step_of(line: str, default: int) -> float:
    """The step of a metrics.jsonl line; a torn last line (killed mid-write) sorts after every step."""
    try:
        return json.loads(line).get("step", default)
    except (json.JSONDecodeError, AttributeError):
        return math.inf


class MetricsLogger:
    """Rank 0 writes; other ranks hold a no-op logger. metrics.jsonl gets one line per optimizer step and
    one per evaluation. On resume, lines past the resumed step (from the interrupted run) are dropped so
    the file reads as one uninterrupted run."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        report_to: list[str] = (),
        progress_bar: bool = True,
    ):
        self.enabled = enabled
        self.bar = self.tb = self.file = None
        if not enabled:
            return
        path = Path(output_dir) / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            keep = [ln for ln in path.read_text().splitlines() if _step_of(ln, -1) <= start_step]
            path.write_text("".join(ln + "\n" for ln in keep))
        self.file = path.open("a")
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stderr
            )
        if "tensorboard" in report_to:
            try:  # lazy: optional dependency
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.write(
                    "report_to tensorboard: the tensorboard package is not installed; metrics.jsonl only"
                )
            else:
                self.tb = SummaryWriter(str(Path(output_dir) / "runs"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(("eval/" if k.startswith("eval") else "train/") + k, v, step)
        if self.bar is not None and "loss" in record:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}"
            )

    def write(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()

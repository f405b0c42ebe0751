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


def step_flops(args, num_tokens: int, sum_sq_doc_len: int, *, attention: str = "causal") -> float:
    """Model FLOPs of forward + backward (no recompute): 6 N per token plus attention over documents of
    length L (QK^T and PV, 4 L^2 d_q per layer forward, x3 with backward):
      attention="causal": half the L x L matrix, 6 L^2 d_q per layer: what causal kernels compute;
      attention="full":   the whole matrix, 12 L^2 d_q per layer: the convention torchtitan and MPT
                          publish (they pass the row length as L and count no causal or document saving).
    """
    d_q = args.num_heads * args.head_dim
    per_layer = {"causal": 6.0, "full": 12.0}[attention]
    return 6.0 * matmul_params(args) * num_tokens + per_layer * args.num_layers * d_q * sum_sq_doc_len


def row_counts(micro_batches: list[dict]) -> list[float]:
    """[tokens, sum of T^2] over the rows (B x T, padding included) of the micro-batches that hold a
    document: what the full-attention convention counts (all-filler micro-batches are left out)."""
    tokens = sq = 0
    for mb in micro_batches:
        if mb["doc_lengths"]:
            B, T = mb["input_ids"].shape
            tokens, sq = tokens + B * T, sq + B * T * T
    return [float(tokens), float(sq)]


def throughput(
    args, res: dict, rows: list[float], seconds: float, world_size: int, peak: float | None
) -> dict:
    """The speed of one optimizer step in two conventions, so figures compare with what others publish.

    tokens_per_s_global counts the real tokens of all ranks, tokens_per_s_per_gpu divides by the world
    size (torchtitan's "tps" is per GPU). MFU (peak: dense bf16 per GPU; absent on CPU):
      mfu_causal     real tokens, causal attention within each document: the model FLOPs the GPUs did;
      mfu_full_attn  every row one sequence of its padded length T with full T x T attention (rows =
                     row_counts()): the torchtitan / MPT convention, higher than mfu_causal for the same run.
    """
    out = {
        "tokens_per_s_global": res["tokens"] / seconds,
        "tokens_per_s_per_gpu": res["tokens"] / seconds / world_size,
    }
    if peak:
        budget = seconds * peak * world_size
        out["mfu_causal"] = step_flops(args, res["tokens"], res["sum_sq"]) / budget
        out["mfu_full_attn"] = step_flops(args, rows[0], rows[1], attention="full") / budget
    return out


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


def memory_record(device: torch.device) -> dict:
    """Peak allocated memory (GiB; on CPU the peak RSS) and, on CUDA, what the caching allocator holds:
    peak reserved (GiB) and how often an allocation had to free cached blocks and retry (each retry is a
    synchronising cudaFree; rising counts mean fragmentation: expandable_segments, a smaller micro-batch)."""
    out = {"max_memory_gb": round(max_memory_gb(device), 3)}
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        out["max_reserved_gb"] = round(stats.get("reserved_bytes.all.peak", 0) / 1024**3, 3)
        out["alloc_retries"] = int(stats.get("num_alloc_retries", 0))
        out["ooms"] = int(stats.get("num_ooms", 0))
    return out


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
                loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                tok_s_gpu=f"{record['tokens_per_s_per_gpu']:.0f}",
            )  # fmt: skip

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

"""Shared helpers of the tests/train suite: a tiny chat dataset, in-process and torchrun launches."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
WORDS = "the quick brown fox jumps over a lazy dog while long writer stories grow chapter by chapter".split()


def make_dataset(path: Path, n: int = 48, seed: int = 0) -> Path:
    """n LongWriter-format rows of 20-300 debug tokens (bytes): packs of a few documents at max_length 256."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            q = " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))
            a = " ".join(rng.choices(WORDS, k=rng.randint(3, 30)))
            row = {
                "messages": [
                    {"role": "user", "content": f"Write {i}: {q}"},
                    {"role": "assistant", "content": a},
                ]
            }
            f.write(json.dumps(row) + "\n")
    return path


def make_pairs(path: Path, n: int = 24, seed: int = 0) -> Path:
    """n ms-swift preference rows (chosen and rejected replies of 3-30 words): a few pairs per packed row."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            q = " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))
            good, bad = (" ".join(rng.choices(WORDS, k=rng.randint(3, 30))) for _ in range(2))
            row = {"messages": [{"role": "user", "content": f"Write {i}: {q}"},
                                {"role": "assistant", "content": good}], "rejected_response": bad}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    return path


def base_args(data: Path, out: Path, **over) -> list[str]:
    """A debug-qwen2 fp32 run; keyword overrides become flags."""
    kw = dict(
        model="debug-qwen2", dataset=str(data), max_length=256, batch_size=1, gradient_accumulation_steps=4,
        max_steps=4, learning_rate=3e-3, warmup_ratio=0.25, torch_dtype="float32", loss_impl="torch",
        output_dir=str(out), save_steps=0, save_final=False, progress_bar=False, seed=1234, max_grad_norm=0.5,
    )  # fmt: skip
    kw.update(over)
    argv = []
    for k, v in kw.items():
        argv += [f"--{k}", str(v)]
    return argv


def run_inprocess(argv: list[str], *, on_step=None, probe=None):
    """train() in this process (1-rank gloo group); probe(model) runs before the group is destroyed."""
    from engine.config import parse_config
    from engine.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: more threads than free cores makes every op crawl
    try:
        summary = train(parse_config(argv), on_step=on_step)
        if probe is not None:
            summary["probe"] = probe(summary["model"])
        return summary
    finally:
        torch.set_num_threads(threads)
        if dist.is_initialized():
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env


def torchrun_cmd(nproc: int, argv: list[str], *, extra: list[str] | None = None) -> list[str]:
    rdzv = extra or ["--standalone"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *rdzv,
        f"--nproc_per_node={nproc}",
        "-m",
        "engine.train",
        *argv,
    ]


# torchrun --standalone picks its store port by binding port 0 and letting it go: another process can take
# it in between. Only that infrastructure failure is retried; anything else fails the test at once.
PORT_RACE = ("Address already in use", "EADDRINUSE")


def retry_port_race(launch):
    """launch() -> (ok, log, result); called once more only when it failed on the free-port race.
    Returns (ok, result) of the last call."""
    for attempt in range(2):
        ok, log, result = launch()
        if ok or attempt or not any(m in log for m in PORT_RACE):
            return ok, result


def run_torchrun(nproc: int, argv: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    def launch():
        p = subprocess.run(
            torchrun_cmd(nproc, argv),
            cwd=REPO,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return p.returncode == 0, p.stdout + p.stderr, p

    ok, p = retry_port_race(launch)
    assert ok, p.stdout[-3000:] + p.stderr[-5000:]
    return p


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if x]


def train_steps(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if "loss" in r]


def load_final(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "final" / "model.safetensors"))

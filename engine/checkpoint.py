"""Resumable distributed checkpoints (torch.distributed.checkpoint) and the consolidated HF export.

Layout of output_dir/checkpoint-{step}:
    .metadata, __*_*.distcp     DCP: {"model": ..., "optim": ...} sharded as trained (any world size can read)
    rank{r}.pt                  this rank's RNG states, loader state, scheduler state, step counters
    trainer_state.json          step / epoch / config, for people
A checkpoint is written into checkpoint-{step}.tmp and renamed by rank 0 after a barrier, so a directory
named checkpoint-{step} is always complete; a crash mid-save leaves only a .tmp, which is ignored.
Each rank writes its shards with several threads (DCP's FileSystemWriter thread_count), so a save that has
to fit in the SIGTERM grace period is not one file stream per rank.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed, with DCP metadata), oldest first."""
    out = []
    root = Path(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            m = _CKPT.match(p.name)
            if m and p.is_dir() and (p / ".metadata").is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def resolve_resume(output_dir: str | Path, value: str | None) -> Path | None:
    """`value`: a checkpoint directory; a run directory (its newest complete checkpoint-N); or "latest"/"auto"
    (newest in output_dir, None when there is none yet: the run starts fresh)."""
    if value is None:
        return None
    if value in ("latest", "auto", "true", "True"):
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1][1] if ckpts else None
    p = Path(value)
    if (p / ".metadata").is_file():
        return p
    ckpts = list_checkpoints(p)
    if ckpts:
        return ckpts[-1][1]
    raise ValueError(
        f"resume_from_checkpoint: {value} is neither a complete checkpoint nor a run directory with one"
    )


def rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def default_thread_count() -> int:
    """Writer threads per rank: the CPUs of this rank's share of the node, 1 to 8."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(8, (os.cpu_count() or 1) // local_world))


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    rank_state: dict,
    info: dict,
    save_total_limit: int | None = None,
    thread_count: int | None = None,
) -> Path:
    """Collective: every rank calls it. optimizer None = weights only (--save_only_model, or a SIGTERM
    save with --save_on_sigterm model). thread_count: writer threads per rank (default_thread_count())."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crashed save
        tmp.mkdir(parents=True)
    _barrier()
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
    else:
        state = {"model": get_model_state_dict(model)}
    writer = dcp.FileSystemWriter(str(tmp), thread_count=thread_count or default_thread_count())
    dcp.save(state, storage_writer=writer)
    torch.save(rank_state, tmp / f"rank{rank}.pt")
    if rank == 0:
        info = dict(
            info,
            world_size=dist.get_world_size() if dist.is_initialized() else 1,
            has_optimizer=optimizer is not None,
        )
        (tmp / "trainer_state.json").write_text(json.dumps(info, indent=2, default=str))
    _barrier()  # every rank's files are written
    if rank == 0:
        if path.exists():  # the same step saved again (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(path)
        os.replace(tmp, path)
        if save_total_limit:
            for _, old in list_checkpoints(path.parent)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    only_model: bool = False,
) -> dict | None:
    """Load weights (and, unless only_model, optimizer state); returns this rank's rank_state or None.

    A weights-only checkpoint (checkpoint_info(path)["has_optimizer"] False) resumes everything but the
    optimizer: the returned rank_state still continues step, schedule, data and RNG, and the optimizer
    keeps its fresh (zero-moment) state."""
    path = Path(path)
    info = checkpoint_info(path)

    def load_model_only():
        msd = get_model_state_dict(model)
        dcp.load({"model": msd}, checkpoint_id=str(path))
        set_model_state_dict(model, msd)

    if only_model or optimizer is None:
        load_model_only()
        return None
    world = dist.get_world_size() if dist.is_initialized() else 1
    if info["world_size"] != world:
        raise ValueError(
            f"{path} was written by {info['world_size']} ranks, this run has {world}: exact resume needs the "
            "same world size (RNG and loader state are per rank); use --resume_only_model to load weights"
        )
    if info.get("has_optimizer", True):
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        load_model_only()
    return torch.load(path / f"rank{_rank()}.pt", weights_only=False)


def checkpoint_info(path: str | Path) -> dict:
    """trainer_state.json of a checkpoint: step, epoch, reason, config, world_size, has_optimizer."""
    return json.loads((Path(path) / "trainer_state.json").read_text())


def directory_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def export_hf(
    model: nn.Module, out_dir: str | Path, *, tokenizer=None, dtype: torch.dtype = torch.bfloat16
) -> None:
    """Collective: gather the full state dict to rank 0 (on CPU), which writes HF safetensors + tokenizer
    (engine.models.save_pretrained writes into a temporary directory and renames it into place)."""
    from engine.models import save_pretrained

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model, options=opts)  # rank 0 holds the tensors, other ranks get {}
    if _rank() == 0:
        save_pretrained(model, out_dir, tokenizer=tokenizer, dtype=dtype, state_dict=full)
    del full
    _barrier()


def _torchrun_shutdown_timeout_flag() -> bool:
    """Whether this torch's torchrun has --shutdown-timeout (2.13 has it; 2.11 waits a fixed 30 s)."""
    import inspect

    from torch.distributed.elastic.agent.server.api import SimpleElasticAgent

    return "shutdown_timeout" in inspect.signature(SimpleElasticAgent.__init__).parameters


def sigterm_advice(
    *, seconds: float, nbytes: int, model_bytes: int, choice: str, micro_batch_s: float, name: str
) -> str:
    """What a SIGTERM save of `choice` ("full" | "model" | "none") will take, from a measured save of
    nbytes in `seconds`, and how long the launcher must wait between SIGTERM and SIGKILL for it.

    A SIGTERM is acted on between micro-batches, so the wait is (one micro-batch) + (the save); the save of
    a choice is estimated at the measured rate: "full" writes fp32 weights + 2 AdamW moments (3 x
    model_bytes), "model" the weights alone."""
    rate = nbytes / max(seconds, 1e-9)
    head = f"{name}: {nbytes / 1e9:.2f} GB in {seconds:.1f} s ({rate / 1e9:.2f} GB/s)"
    if choice == "none":
        return f"{head}; --save_on_sigterm none: a SIGTERM exits without saving (resume from the last checkpoint)"
    est = (3 if choice == "full" else 1) * model_bytes / rate
    need = math.ceil(1.25 * (est + micro_batch_s) + 5)
    line = (
        f"{head}. On SIGTERM (--save_on_sigterm {choice}) the run finishes its micro-batch (~{micro_batch_s:.1f} s) "
        f"and saves ~{(3 if choice == 'full' else 1) * model_bytes / 1e9:.2f} GB (~{est:.1f} s): the launcher must "
        f"wait >= {need} s between SIGTERM and SIGKILL"
    )
    if _torchrun_shutdown_timeout_flag():
        line += f" (torchrun --shutdown-timeout {need}, default 30 s"
    else:
        line += " (this torch's torchrun waits a fixed 30 s: torch >= 2.13 has --shutdown-timeout"
    line += f"; SLURM: KillWait >= {need} s, or #SBATCH --signal=TERM@{need + 60} to be warned ahead of the limit)"
    if need > 30:
        line += "; with less, choose --save_on_sigterm model or none"
    return line

"""DPO's precomputed reference (--precompute_ref_log_probs): one no_grad pass of the frozen reference over the
data before training, giving each pair's summed response log-probs [n, 2] (chosen, rejected).

The pass runs the training loader's own epoch-0 micro-batches (each rank its share, all-reduced), so the values
are those a resident reference computes in the first epoch. They are cached next to the dataset cache under a
key of the dataset's fingerprint (files, tokenizer, template, lengths, mixing, split) and the reference's (its
files' names, sizes and mtimes, or flavour and seed) plus the compute dtype and kernels: a changed model or
data gets a new file. The table is attached as dataset.sample_arrays["ref_logps"]; the loader copies each
micro-batch's rows into mb["ref_logps"] [P, 2], which DPOObjective reads when it has no reference model.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from engine.objectives.dpo import document_index, document_log_probs
from engine.parallel import reshard
from engine.step import to_device

CACHE_VERSION = 1


def source_fingerprint(source: str, seed: int) -> str:
    """What a reference's weights depend on: an HF directory's config and weight files (name, size, mtime;
    hashing 18 GB of weights would cost minutes), or a flavour name and the random-init seed."""
    p = Path(source)
    if not p.is_dir():
        return f"flavour:{source}|seed:{seed}"
    h = hashlib.sha256(str(p.resolve()).encode())
    for f in sorted(p.iterdir()):
        if f.suffix in (".json", ".safetensors", ".bin"):
            st = f.stat()
            h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


@torch.no_grad()
def reference_log_probs(model, loader, device) -> np.ndarray:
    """[len(dataset), 2] float64 summed response log-probs of every pair under `model`, on every rank."""
    was_training = model.training
    model.eval()
    n = len(loader.dataset)
    table = torch.zeros(n, 2, dtype=torch.float64)
    seen = torch.zeros(n, dtype=torch.float64)
    one_pass = copy.copy(
        loader
    )  # the same plan and split, from the start of epoch 0; `loader` keeps its state
    one_pass.load_state_dict({"epoch": 0, "step": 0})
    for micro_batches in one_pass:
        for mb in micro_batches:  # filler micro-batches too: every rank joins every FSDP all-gather
            tok_doc, doc_targets = document_index(mb)
            logps = document_log_probs(model, to_device(mb, device), tok_doc, len(doc_targets))
            idx = torch.tensor(mb["samples"], dtype=torch.long)
            table[idx] = logps.view(-1, 2).cpu()
            seen[idx] += 1
    dist.all_reduce(table)  # each pair was computed by exactly one rank, the others hold zeros
    dist.all_reduce(seen)
    assert bool((seen == 1).all()), "the reference pass must see every pair exactly once"
    reshard(model)  # the policy itself may have run the pass: its optimizer must see the shards
    model.train(was_training)
    return table.numpy()


def attach_reference_log_probs(model, loader, device, *, cache_dir: str | Path, key: str, rank: int) -> str:
    """Set loader.dataset.sample_arrays["ref_logps"] from the cache, or from one pass (then cached by rank 0).
    All ranks agree on "cached" (or all run the pass, whose forwards are collective). Returns a log line."""
    ds = loader.dataset
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{key}|{ds.fingerprint}".encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"ref-logps-{digest}.npy"
    have = torch.tensor([float(path.is_file())], dtype=torch.float64)
    dist.all_reduce(have, op=dist.ReduceOp.MIN)
    if have.item() == 1.0:
        table = np.load(path)
        if table.shape != (len(ds), 2):
            raise ValueError(f"{path}: shape {table.shape}, expected ({len(ds)}, 2): delete this cache file")
        how = "read"
    else:
        table = reference_log_probs(model, loader, device)
        if rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, table)
            os.replace(tmp, path)  # atomic: a killed run never leaves half a table
        how = "computed"
    ds.sample_arrays["ref_logps"] = table
    return f"reference log-probs of {len(ds)} pairs {how}: {path}"

"""bench_train's configurations and workload: which provider / layout / loss / checkpointing runs, and the
micro-batches of every optimizer step (LongWriter-like documents packed by engine.data.pack_lengths, then laid
out packed, padded or one document per micro-batch). See benchmarks/bench_train.py for the whole picture."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REF_LENGTH = 28672  # the LongWriter max_length the length distribution is defined for

# ------------------------------------------------------------------------------------------ configurations
LAYOUTS = ("packed", "padded", "bs1")


@dataclass(frozen=True)
class BenchConfig:
    provider: str  # "engine" | "transformers" | "transformers+liger"
    # "packed": the step's documents in one row (cu_seqlens / position_ids); "padded": one document per row,
    # micro-batches of rows x longest <= max_length padded to their longest; "bs1": one document per
    # micro-batch, no padding (the LongWriter ms-swift recipe: packing off, batch_size 1, accumulation).
    layout: str = "packed"
    # engine: "triton" | "twin" (kernels impl="torch") | "plain" (logits + F.cross_entropy);
    # transformers: "plain" (its own loss) | "liger" (Liger's fused linear cross-entropy)
    loss: str = "plain"
    # "off" | "full" | "every2" (every k-th block, k=2) | "selective" (op-level policy); the last two engine only
    ac: str = "off"
    compile: bool = False  # engine: torch.compile each block (--compile true)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")

    @property
    def mode(self) -> str:
        return f"{self.layout} loss={self.loss} ac={self.ac}" + (" compile" if self.compile else "")

    @property
    def name(self) -> str:
        return f"{self.provider} {self.mode}"


def cpu_configs() -> list[BenchConfig]:
    E, HF = "engine", "transformers"
    return [
        BenchConfig(E, "packed", "twin", "off"),
        BenchConfig(E, "packed", "plain", "off"),
        BenchConfig(E, "packed", "twin", "full"),
        BenchConfig(E, "packed", "twin", "full", compile=True),
        BenchConfig(E, "packed", "twin", "selective"),
        BenchConfig(E, "packed", "twin", "every2"),
        BenchConfig(E, "padded", "twin", "off"),
        BenchConfig(E, "bs1", "twin", "off"),
        BenchConfig(HF, "packed", "plain", "off"),
        BenchConfig(HF, "padded", "plain", "off"),
        BenchConfig(HF, "packed", "plain", "full"),
        BenchConfig("transformers+liger", "packed", "liger", "off"),
    ]


def gpu_configs() -> list[BenchConfig]:
    E, HF = "engine", "transformers"
    return [
        BenchConfig(E, "packed", "triton", "full"),  # the goal configuration, eager
        BenchConfig(E, "packed", "triton", "full", compile=True),  # and compiled
        BenchConfig(HF, "packed", "plain", "full"),  # the baseline of the goal
        BenchConfig("transformers+liger", "packed", "liger", "full"),
        BenchConfig(E, "packed", "triton", "selective", compile=True),
        BenchConfig(E, "packed", "twin", "full"),
        BenchConfig(E, "packed", "plain", "full"),
        BenchConfig(E, "packed", "triton", "off"),
        BenchConfig(E, "packed", "triton", "every2"),
        BenchConfig(E, "padded", "triton", "full"),
        BenchConfig(E, "bs1", "triton", "full"),  # examples/longwriter_qwen2_7b.yaml's layout
        BenchConfig(HF, "padded", "plain", "full"),
        BenchConfig(HF, "packed", "plain", "off"),
    ]


def core_configs(configs: list[BenchConfig], cuda: bool) -> list[BenchConfig]:
    """--configs core: engine eager and compiled, transformers and transformers + Liger, all packed with
    full checkpointing (the comparison of issue 12, a few minutes per shape on one GPU)."""
    keep = {"engine": "triton" if cuda else "twin", "transformers": "plain", "transformers+liger": "liger"}
    return [c for c in configs if c.layout == "packed" and c.ac == "full" and c.loss == keep[c.provider]]


def smoke_configs() -> list[BenchConfig]:
    # The test suite's smoke run is the CPU quick mode itself (every one of its configurations, so each
    # provider / layout / loss / checkpointing / compile path is exercised), only at a tiny size and step
    # count, and compiling with backend aot_eager (no C++ build).
    return cpu_configs()


@dataclass
class RunSpec:
    """What one worker subprocess runs (JSON on its command line)."""

    config: dict
    flavour: str
    max_length: int
    warmup: int
    steps: int
    seed: int = 0
    hf_dir: str | None = None  # HF checkpoint of the same random weights (transformers providers)
    threads: int | None = None
    nproc: int = 1  # > 1: the engine under torchrun, every rank on the same steps (per-device numbers)
    compile_backend: str = "inductor"  # --smoke: "aot_eager"


# ----------------------------------------------------------------------------------------------- workload
def doc_lengths_pool(max_length: int, n_rows: int, seed: int) -> list[list[int]]:
    """Rows (lists of document lengths) of an engine.data.pack_lengths packing of LongWriter-like lengths."""
    from benchmarks.bench_data import longwriter_lengths
    from engine.data import pack_lengths

    scale = max_length / REF_LENGTH
    n_long = max(64, n_rows * 30)  # a pool of ~4x the rows needed: rows fill to ~99.9% on a large pool
    lengths = longwriter_lengths(n_long, n_long // 2, seed=seed)
    lengths = np.clip(np.round(lengths * scale), 8, max_length).astype(np.int64)
    plan = pack_lengths(lengths, max_length, seed=seed)
    # The best-filled rows of the pool, in the plan's shuffled order: a real dataset of thousands of samples
    # packs to ~99.7% (benchmarks/results/data.md); a small pool leaves loosely filled leftover rows that
    # would not be representative.
    fill = np.array([lengths[row].sum() for row in plan])
    keep = np.sort(np.argsort(-fill, kind="stable")[:n_rows])
    if len(keep) < n_rows:
        raise AssertionError(f"pool too small: {len(plan)} rows < {n_rows}")
    return [[int(lengths[i]) for i in plan[j]] for j in keep]


def make_document(length: int, vocab: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, aligned labels): targets are the next token, the first 10% (the prompt) and the last
    token have none (-100)."""
    ids = rng.integers(0, vocab, length, dtype=np.int64)
    labels = np.full(length, -100, dtype=np.int64)
    start = max(1, length // 10) - 1
    labels[start : length - 1] = ids[start + 1 :]
    return ids, labels


def make_steps(vocab: int, max_length: int, n_steps: int, seed: int, layout: str) -> list[list[dict]]:
    """Micro-batches (engine.data.collate_rows dicts + "row_lengths") of every optimizer step."""
    from engine.data import collate_rows

    rng = np.random.default_rng([seed, 0xB7])
    steps = []
    for row in doc_lengths_pool(max_length, n_steps, seed):
        docs = [make_document(n, vocab, rng) for n in row]
        if layout == "packed":
            groups = [[docs]]  # one micro-batch, one row holding every document
        elif layout == "bs1":
            groups = [[[d]] for d in docs]
        else:  # one document per row; micro-batches of similar lengths under a max_length token budget
            docs = sorted(docs, key=lambda d: -len(d[0]))
            groups, cur = [], []
            for d in docs:  # longest first: cur[0] holds the longest row of the micro-batch
                if cur and (len(cur) + 1) * len(cur[0][0][0]) > max_length:
                    groups.append(cur)
                    cur = []
                cur.append([d])
            groups.append(cur)
        mbs = []
        for rows in groups:
            mb = collate_rows(rows, pad_token_id=0)
            mb["row_lengths"] = [sum(len(ids) for ids, _ in r) for r in rows]
            mbs.append(mb)
        steps.append(mbs)
    return steps


def step_stats(micro_batches: list[dict]) -> dict:
    """Token counts and attention extents of one step for the two MFU conventions."""
    out = {"tokens": 0, "row_tokens": 0, "sum_sq_doc": 0, "sum_sq_row": 0, "n_target": 0}
    for mb in micro_batches:
        B, T = mb["input_ids"].shape
        out["tokens"] += sum(mb["doc_lengths"])
        out["sum_sq_doc"] += sum(n * n for n in mb["doc_lengths"])
        out["row_tokens"] += B * T
        out["sum_sq_row"] += B * T * T
        out["n_target"] += mb["num_target_tokens"]
    return out

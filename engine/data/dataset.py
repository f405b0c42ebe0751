"""jsonl rows -> validated, tokenized samples with aligned labels: SFT conversations, or DPO pairs.

A sample is one or more documents: one conversation for SFT (SFT_FORMAT), a chosen and a rejected
conversation for DPO (engine.data.preference.PAIR_FORMAT); the loader packs a sample's documents as a unit.

Mixing follows ms-swift's dataset specs: "path" takes every row, "path#N" takes N rows drawn with a seeded
generator (N <= rows: a subset without replacement; N > rows: every row N // rows times plus a subset of
N % rows rows, as ms-swift's sample_dataset does). Sampling happens after validation and after over-long
rows are deleted, so a "#N" spec yields exactly N samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.data.chat import FieldError, aligned_labels, encode_conversations, normalize_row
from engine.data.template import ChatTemplateError
from engine.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Bump when the templates or the cached quantities change: cached lengths must match fresh tokenization.
CACHE_VERSION = 2
_ENCODE_CHUNK = 256
_MAX_REPORTED_ERRORS = 20


@dataclass(frozen=True)
class RowFormat:
    """How one jsonl row becomes one sample of len(fields) documents."""

    name: str
    fields: tuple[str, ...]  # the row field each document comes from (named in errors)
    normalize: Callable  # row -> ([messages of each document], metadata); raises FieldError
    encode: Callable  # (tokenizer, [messages, ...]) -> [(input_ids int32[T], trainable bool[T]), ...]

    def truncate(self, lengths: np.ndarray, max_length: int) -> np.ndarray:
        """Per-document kept lengths [n, k] of samples over the budget (truncation_strategy="truncate"): one
        document keeps its first max_length tokens; two share the budget, each getting at least half."""
        if lengths.shape[1] == 1:
            return np.minimum(lengths, max_length)
        a, b = lengths[:, 0], lengths[:, 1]
        a_kept = np.minimum(a, np.maximum(max_length // 2, max_length - b))
        return np.stack([a_kept, np.minimum(b, max_length - a_kept)], axis=1)


def _normalize_sft(row) -> tuple[list[list[dict]], dict]:
    messages, meta = normalize_row(row)
    return [messages], meta


SFT_FORMAT = RowFormat("sft", ("messages",), _normalize_sft, encode_conversations)


@dataclass
class _Source:
    """The valid rows of one file, tokenized (eager) or only measured (lazy)."""

    path: str
    file_hash: str  # sha256 of the file's bytes
    lines: list[int]  # 1-based line numbers of the kept rows
    conversations: list[list[list[dict]]]  # per sample, the messages of each document
    metadata: list[dict]
    doc_lengths: np.ndarray  # [n, documents per sample] token lengths after truncation
    tokens: list[list[tuple[np.ndarray, np.ndarray]]] | None  # per sample, (input_ids, trainable) when eager
    stats: dict = field(default_factory=dict)

    @property
    def lengths(self) -> np.ndarray:
        return self.doc_lengths.sum(axis=1)

    @property
    def square_lengths(self) -> np.ndarray:
        return (self.doc_lengths**2).sum(axis=1)


def parse_spec(spec: str) -> tuple[str, int | None]:
    """'path' -> (path, None); 'path#N' -> (path, N)."""
    path, sep, count = spec.rpartition("#")
    if not sep or not count.isdigit():
        return spec, None
    n = int(count)
    if n <= 0:
        raise ValueError(f"dataset spec {spec!r}: the sample count after '#' must be positive")
    return path, n


def _backend_versions() -> str:
    """Tokenizer library versions: an upgrade may split text differently with the same vocabulary files."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("tokenizers", "tiktoken", "sentencepiece"):
        try:
            out.append(f"{pkg}={version(pkg)}")
        except PackageNotFoundError:
            pass
    return ",".join(out)


class _Problems:
    """Bad rows: raise (check_dataset_strategy="error") or skip, count and report ("warning")."""

    def __init__(self, strategy: str):
        if strategy not in ("error", "warning"):
            raise ValueError(f"check_dataset_strategy must be 'error' or 'warning', got {strategy!r}")
        self.strategy = strategy
        self.count = 0
        self.messages: list[str] = []

    def __call__(self, path: str, line: int, field_name: str, message: str) -> None:
        text = f"{path}:{line}: field {field_name!r}: {message}"
        if self.strategy == "error":
            raise ValueError(text + " (use check_dataset_strategy='warning' to skip such rows)")
        self.count += 1
        if len(self.messages) < _MAX_REPORTED_ERRORS:
            self.messages.append(text)
        logger.warning("skipping row: %s", text)


def _read_rows(path: str, problems: _Problems, normalize) -> tuple[list[int], list, list[dict], int, str]:
    """-> (line numbers, documents' messages, metadata) of the valid rows, the number of non-blank rows, and
    the sha256 of the file's bytes (the length cache's key: one read of the file, not two)."""
    lines, convs, metas = [], [], []
    n_rows = 0
    digest = hashlib.sha256()
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is one bad row, not a crash of the file
        for lineno, raw in enumerate(f, 1):
            digest.update(raw)
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte-order mark
            if not raw.strip():
                continue
            n_rows += 1
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                problems(path, lineno, "<json>", f"not UTF-8 text: {e}")
                continue
            except json.JSONDecodeError as e:
                problems(path, lineno, "<json>", f"malformed JSON: {e}")
                continue
            try:
                msgs, meta = normalize(row)
            except FieldError as e:
                problems(path, lineno, e.field, e.message)
                continue
            lines.append(lineno)
            convs.append(msgs)
            metas.append(meta)
    return lines, convs, metas, n_rows, digest.hexdigest()


def _measure(tokenizer: Tokenizer, samples: list[list[list[dict]]], keep_tokens: bool, fmt: RowFormat):
    """-> (raw lengths [n, k], target counts [n, k], tokens per sample or None); k documents per sample."""
    k = len(fmt.fields)
    convs = [c for s in samples for c in s]
    lengths = np.zeros(len(convs), dtype=np.int64)
    targets = np.zeros(len(convs), dtype=np.int64)
    flat = [] if keep_tokens else None
    for start in range(0, len(convs), _ENCODE_CHUNK):
        try:
            chunk = fmt.encode(tokenizer, convs[start : start + _ENCODE_CHUNK])
        except ChatTemplateError as e:  # index of the sample (k documents each), for the caller's line lookup
            raise ChatTemplateError(str(e), (start + e.index) // k) from None
        for j, (ids, mask) in enumerate(chunk):
            lengths[start + j] = len(ids)
            targets[start + j] = int(mask[1:].sum())
            if flat is not None:
                flat.append((ids, mask))
    tokens = [flat[i : i + k] for i in range(0, len(flat), k)] if flat is not None else None
    return lengths.reshape(-1, k), targets.reshape(-1, k), tokens


def _load_source(
    path: str,
    tokenizer: Tokenizer,
    *,
    max_length: int,
    truncation_strategy: str,
    problems: _Problems,
    lazy: bool,
    cache_dir: str | None,
    fmt: RowFormat = SFT_FORMAT,
) -> _Source:
    if not os.path.isfile(path):
        raise ValueError(f"dataset file not found: {path}")
    invalid_before = problems.count
    lines, convs, metas, n_rows, file_hash = _read_rows(path, problems, fmt.normalize)
    cache_file = None
    if lazy and cache_dir:
        # fmt.name: an SFT and a DPO reading of one file cache [n, 1] and [n, 2] lengths
        key = hashlib.sha256(
            f"v{CACHE_VERSION}|{file_hash}|{tokenizer.fingerprint}|{_backend_versions()}|{fmt.name}".encode()
        ).hexdigest()[:32]
        cache_file = os.path.join(cache_dir, f"lengths-{key}.npz")
    cached = None
    if cache_file and os.path.exists(cache_file):
        with np.load(cache_file) as z:
            if len(z["lengths"]) == len(convs):
                k = len(fmt.fields)
                cached = (z["lengths"].reshape(-1, k), z["targets"].reshape(-1, k))
    if cached is not None:
        raw_len, targets = cached
        tokens = None
    else:
        try:
            raw_len, targets, tokens = _measure(tokenizer, convs, keep_tokens=not lazy, fmt=fmt)
        except ChatTemplateError as e:  # a template that cannot render or mask this row: name the row
            raise ValueError(f"{path}:{lines[e.index]}: {e}") from None
        if cache_file:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{cache_file}.{os.getpid()}.tmp.npz"
            np.savez(tmp, lengths=raw_len, targets=targets)
            os.replace(tmp, cache_file)  # atomic: concurrent ranks may write the same file

    keep = np.ones(len(convs), dtype=bool)
    for i, j in zip(*np.nonzero(targets == 0)):
        if keep[i]:
            keep[i] = False
            problems(path, lines[i], fmt.fields[j], "no trainable token in this sample")
    over = keep & (raw_len.sum(axis=1) > max_length)
    n_over = int(over.sum())
    lengths = raw_len.copy()
    lengths[over] = fmt.truncate(raw_len[over], max_length)
    n_no_target_after_trunc = 0
    if truncation_strategy == "delete":
        keep &= ~over
        if n_over:
            logger.warning("%s: deleted %d samples longer than max_length=%d", path, n_over, max_length)
    elif truncation_strategy == "truncate":
        # Every truncated document still needs a target inside its kept tokens.
        for i in np.flatnonzero(over):
            docs = tokens[i] if tokens is not None else fmt.encode(tokenizer, convs[i])
            if not all(mask[1:n].any() for (_, mask), n in zip(docs, lengths[i])):
                keep[i] = False
                n_no_target_after_trunc += 1
        if n_over:
            logger.warning(
                "%s: truncated %d samples to max_length=%d (%d dropped: no target left)",
                path,
                n_over,
                max_length,
                n_no_target_after_trunc,
            )
    else:
        raise ValueError(f"truncation_strategy must be 'delete' or 'truncate', got {truncation_strategy!r}")
    idx = np.flatnonzero(keep)
    stats = {
        "rows": n_rows,
        "invalid": problems.count - invalid_before,
        "over_length": n_over,
        "over_length_deleted": n_over if truncation_strategy == "delete" else n_no_target_after_trunc,
        "truncated": n_over - n_no_target_after_trunc if truncation_strategy == "truncate" else 0,
        "kept": len(idx),
    }
    return _Source(
        path=path,
        file_hash=file_hash,
        lines=[lines[i] for i in idx],
        conversations=[convs[i] for i in idx],
        metadata=[metas[i] for i in idx],
        doc_lengths=lengths[idx].astype(np.int64),
        tokens=[tokens[i] for i in idx] if tokens is not None else None,
        stats=stats,
    )


def _sample(n_avail: int, n: int, rng: np.random.Generator) -> np.ndarray:
    full, rest = divmod(n, n_avail)
    parts = [np.arange(n_avail)] * full + [np.sort(rng.choice(n_avail, size=rest, replace=False))]
    return np.concatenate(parts).astype(np.int64)


class SFTDataset:
    """Tokenized samples (one conversation each for SFT, a chosen/rejected pair for DPO).
    ds[i] -> {"input_ids": list[int], "labels": list[int]} of its first document (labels ALIGNED);
    ds.documents(i) -> every document as arrays; ds.lengths[i] = the sample's tokens (all its documents),
    ds.square_lengths[i] = the sum of its documents' squared lengths (what attention costs).
    sample_arrays: per-sample arrays the loader copies into each micro-batch (name -> [len(ds), ...];
    e.g. DPO's precomputed reference log-probs)."""

    def __init__(
        self,
        sources: list[_Source],
        index: np.ndarray,
        *,
        tokenizer: Tokenizer,
        max_length: int,
        report,
        row_format: RowFormat = SFT_FORMAT,
    ):
        self._sources = sources
        # index[i] = (source number, row within source); duplicates come from "#N" oversampling.
        self._index = index
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.report = report
        self.row_format = row_format
        self.sample_arrays: dict[str, np.ndarray] = {}
        self.lengths = np.zeros(len(index), dtype=np.int64)
        self.square_lengths = np.zeros(len(index), dtype=np.int64)  # the loader's attention cost
        for k, src in enumerate(sources):
            sel = index[:, 0] == k
            self.lengths[sel] = src.lengths[index[sel, 1]]
            self.square_lengths[sel] = src.square_lengths[index[sel, 1]]

    def __len__(self) -> int:
        return len(self._index)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def lazy(self) -> bool:
        return any(s.tokens is None for s in self._sources)

    @property
    def fingerprint(self) -> str:
        """Hash of everything a sample's tokens depend on: file contents, tokenizer (its fingerprint covers
        the template), format, max_length and truncation (the kept lengths), mixing and split (the index)."""
        h = hashlib.sha256(
            f"v{CACHE_VERSION}|{self.row_format.name}|{self.tokenizer.fingerprint}|"
            f"{_backend_versions()}|{self.max_length}|{[s.file_hash for s in self._sources]}".encode()
        )
        h.update(np.ascontiguousarray(self._index).tobytes())
        for k, src in enumerate(self._sources):
            h.update(np.ascontiguousarray(src.doc_lengths[self._index[self._index[:, 0] == k, 1]]).tobytes())
        return h.hexdigest()[:32]

    def documents(self, i: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(input_ids int64[T], labels int64[T])] of sample i's documents, truncated as planned."""
        s, r = self._index[i]
        src = self._sources[s]
        if src.tokens is not None:
            docs = src.tokens[r]
        else:  # lazy: tokenized here, i.e. inside the loader's workers
            docs = self.row_format.encode(self.tokenizer, src.conversations[r])
        fresh = np.array([[len(ids) for ids, _ in docs]], dtype=np.int64)
        kept = fresh if fresh.sum() <= self.max_length else self.row_format.truncate(fresh, self.max_length)
        if not np.array_equal(kept[0], src.doc_lengths[r]):
            raise ValueError(
                f"{src.path}:{src.lines[r]}: {kept[0].tolist()} tokens now, {src.doc_lengths[r].tolist()} in the "
                "length cache (a tokenizer changed without changing its files?): delete the dataset cache directory"
            )
        return [
            (ids[:n].astype(np.int64), aligned_labels(ids[:n], mask[:n]))
            for (ids, mask), n in zip(docs, kept[0])
        ]

    def arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids int64[T], labels int64[T]) of sample i's first (for SFT: only) document."""
        return self.documents(i)[0]

    def __getitem__(self, i: int) -> dict:
        ids, labels = self.arrays(int(i))
        return {"input_ids": ids.tolist(), "labels": labels.tolist()}

    def summary(self) -> str:
        """One line for the run log: what was read, skipped, deleted and truncated (nothing goes silently)."""
        r = self.report
        text = (
            f"{len(self)} samples, {int(self.lengths.sum())} tokens from {r['rows']} rows "
            f"(invalid rows skipped {r['invalid']}, over max_length {r['over_length']}: "
            f"deleted {r['over_length_deleted']}, truncated {r['truncated']})"
        )
        if r.get("errors"):
            text += f"; first skipped row: {r['errors'][0]}"
        return text

    def messages(self, i: int) -> list[dict]:
        """The messages of sample i's first document (SFT: the conversation; DPO: the chosen one)."""
        s, r = self._index[i]
        return self._sources[s].conversations[r][0]

    def metadata(self, i: int) -> dict:
        """Extra row fields ("length", "response_length", ...) plus the row's origin (_file, _line)."""
        s, r = self._index[i]
        src = self._sources[s]
        return {**src.metadata[r], "_file": src.path, "_line": src.lines[r]}

    def subset(self, indices: Sequence[int], name: str = "subset") -> SFTDataset:
        sub = SFTDataset(
            self._sources,
            self._index[np.asarray(indices, dtype=np.int64)].reshape(-1, 2),
            tokenizer=self.tokenizer,
            max_length=self.max_length,
            report={**self.report, "split": name},
            row_format=self.row_format,
        )
        sub.sample_arrays = {k: v[np.asarray(indices, dtype=np.int64)] for k, v in self.sample_arrays.items()}
        sub.report["samples"] = len(sub)
        return sub


def build_dataset(
    specs: Sequence[str],
    tokenizer: Tokenizer,
    *,
    max_length: int,
    seed: int = 42,
    truncation_strategy: str = "delete",
    check_dataset_strategy: str = "error",
    lazy_tokenize: bool = False,
    cache_dir: str | None = None,
    row_format: RowFormat = SFT_FORMAT,
) -> SFTDataset:
    """Read, validate, tokenize and mix jsonl files given as ms-swift specs ("path" or "path#N"); row_format
    says what a row is (SFT_FORMAT, or engine.data.preference.PAIR_FORMAT for DPO pairs)."""
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise ValueError("build_dataset: no dataset given")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    problems = _Problems(check_dataset_strategy)
    sources: dict[str, _Source] = {}
    parts = []
    per_spec = []
    for k, spec in enumerate(specs):
        path, n = parse_spec(spec)
        if path not in sources:
            sources[path] = _load_source(
                path,
                tokenizer,
                max_length=max_length,
                truncation_strategy=truncation_strategy,
                problems=problems,
                lazy=lazy_tokenize,
                cache_dir=cache_dir,
                fmt=row_format,
            )
        src = sources[path]
        n_avail = len(src.lengths)
        if n is None:
            rows = np.arange(n_avail, dtype=np.int64)
        elif n_avail == 0:
            raise ValueError(f"dataset spec {spec!r}: no usable rows to sample {n} from")
        else:
            # One generator per spec position so files do not share random streams.
            rows = _sample(n_avail, n, np.random.default_rng([seed, k]))
        s_idx = list(sources).index(path)
        parts.append(np.stack([np.full(len(rows), s_idx), rows], axis=1))
        per_spec.append({"spec": spec, "samples": len(rows)})
    index = np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, 2), dtype=np.int64)
    src_list = list(sources.values())
    totals = {key: sum(s.stats[key] for s in src_list) for key in src_list[0].stats}
    report = {
        **totals,
        "samples": len(index),
        "files": {s.path: s.stats for s in src_list},
        "specs": per_spec,
        "errors": problems.messages,
        "truncation_strategy": truncation_strategy,
        "check_dataset_strategy": check_dataset_strategy,
    }
    if len(index) == 0:
        raise ValueError(f"build_dataset: no usable samples in {list(specs)} (report: {totals})")
    ds = SFTDataset(
        src_list, index, tokenizer=tokenizer, max_length=max_length, report=report, row_format=row_format
    )
    logger.info(
        "dataset: %d samples, %d tokens (rows %d, invalid %d, over-length %d: deleted %d, truncated %d)",
        len(ds),
        int(ds.lengths.sum()),
        totals["rows"],
        totals["invalid"],
        totals["over_length"],
        totals["over_length_deleted"],
        totals["truncated"],
    )
    return ds


def split_dataset(ds: SFTDataset, ratio: float, seed: int = 42) -> tuple[SFTDataset, SFTDataset]:
    """Random (train, val) split; val gets round(len * ratio) samples, at least 1 (ms-swift split_dataset_ratio)."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"split ratio must be in (0, 1), got {ratio}")
    if len(ds) < 2:
        raise ValueError(f"cannot split a dataset of {len(ds)} sample(s)")
    n_val = min(len(ds) - 1, max(1, round(len(ds) * ratio)))
    perm = np.random.default_rng([seed, 0x5E7]).permutation(len(ds))
    return ds.subset(np.sort(perm[n_val:]), "train"), ds.subset(np.sort(perm[:n_val]), "val")

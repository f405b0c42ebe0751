"""Shared benchmark helpers: the environment of a run, percentile timing, peak memory, long-format CSV.

A number without its environment is not published: every CSV row carries device, versions, git sha, date.
Peak memory: on CUDA `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (bytes held by the
caching allocator's tensors, minus what was allocated before the call); on CPU the kernel's resident-set
high-water mark: write "5" to /proc/self/clear_refs (resets VmHWM to the current RSS), run, read VmHWM
from /proc/self/status, minus the RSS before the call (Linux only; no tracemalloc, which misses
torch's allocations anyway).  RSS counts only touched pages, so torch.empty without writes costs nothing.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

CSV_FIELDS = [
    "provider",
    "mode",
    "metric",
    "unit",
    "shape",
    "p20",
    "p50",
    "p80",
    "device",
    "versions",
    "git_sha",
    "date",
]


def git_sha() -> str:
    try:
        args = ["git", "rev-parse", "--short", "HEAD"]
        out = subprocess.run(args, capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent)
        sha = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu-{torch.get_num_threads()}threads-{cpu}".replace(" ", "-")


def device_slug(device: torch.device | str) -> str:
    """Short name for file names: "cpu", "h100", "a100", ..."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "").strip()
    return name.split()[0] if name else "cuda"


DEFAULT_PACKAGES = ("triton", "transformers", "liger_kernel", "cut_cross_entropy")


def versions(extra: Iterable[str] = DEFAULT_PACKAGES) -> str:
    parts = [f"python={platform.python_version()}", f"torch={torch.__version__}"]
    if torch.version.cuda:
        parts.append(f"cuda={torch.version.cuda}")
    for name in extra:
        try:
            mod = __import__(name)
            parts.append(f"{name}={getattr(mod, '__version__', '?')}")
        except Exception:  # noqa: BLE001 - optional packages may fail to import in many ways
            pass
    return " ".join(parts)


def environment(device: torch.device | str, packages: Iterable[str] = DEFAULT_PACKAGES) -> dict[str, str]:
    """The columns every row of a run shares; `packages`: the optional packages whose versions matter."""
    return {
        "device": device_name(device),
        "versions": versions(packages),
        "git_sha": git_sha(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def percentiles(values: list[float], qs: tuple[float, ...] = (0.2, 0.5, 0.8)) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    return [torch.quantile(t, q).item() for q in qs]


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def cpu_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_kib("VmHWM")
        return True
    except (OSError, KeyError):
        return False


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str) -> int:
    """Peak extra memory of one call of fn (see module docstring for how, per device)."""
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    base = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    fn()
    return max(0, _proc_status_kib("VmHWM") - base) * 1024


@dataclass
class Measurement:
    """Per timed call: wall-clock ms, process CPU seconds (all threads), peak extra memory in bytes."""

    times_ms: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    error: str | None = None


def measure_round_robin(
    cases: dict[str, tuple[Callable[[], object], Callable[[], object] | None]],
    device: torch.device | str,
    *,
    warmup: int = 1,
    reps: int = 5,
    budget_s: float | None = None,
) -> dict[str, Measurement]:
    """Measure several (run, setup) cases, interleaved: rep 1 of every case, then rep 2, ...

    On a shared machine the load drifts; interleaving gives every case the same drift instead of handing
    one provider a quiet minute and the next a busy one.  A case that raises (e.g. out of memory) is
    recorded with its error and dropped from the rotation.  On CUDA the time is CUDA events recorded
    around `run` on the current stream (setup and the memory bookkeeping stay outside); elsewhere wall
    clock.  budget_s: no new round of reps starts once this many seconds have passed (the warm-ups and
    one round always run), so every case keeps the same number of reps.
    """
    out = {name: Measurement() for name in cases}
    cuda = torch.device(device).type == "cuda"

    def once(name: str, record: bool) -> None:
        run, setup = cases[name]
        if setup is not None:
            setup()
        if not record:
            run()
            return
        box: list[float] = []

        def timed() -> None:
            synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                box.extend([start.elapsed_time(end), time.process_time() - c0])
            else:
                run()
                box.extend([(time.perf_counter() - t0) * 1e3, time.process_time() - c0])

        peak = peak_memory_bytes(timed, device)
        m = out[name]
        m.times_ms.append(box[0])
        m.cpu_s.append(box[1])
        m.peaks.append(peak)

    t_start = time.perf_counter()
    for i in range(warmup + reps):
        if budget_s is not None and i > warmup and time.perf_counter() - t_start > budget_s:
            break
        for name in cases:
            if out[name].error is not None:
                continue
            try:
                once(name, record=i >= warmup)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                out[name].error = f"{type(e).__name__}: {str(e)[:200]}"
                if cuda:
                    torch.cuda.empty_cache()
    return out


def append_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    """Append long-format rows (CSV_FIELDS) to path, writing the header if the file is new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow(row)


def read_rows(path: str | os.PathLike) -> list[dict]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def row(
    env: dict[str, str],
    provider: str,
    mode: str,
    metric: str,
    unit: str,
    shape: str,
    values: list[float],
    fmt: str | None = None,
) -> dict:
    """One long-format row; `fmt` (e.g. ".6g") writes the percentiles as formatted strings."""
    ps = percentiles(values)
    if fmt is not None:
        ps = [format(p, fmt) for p in ps]
    p20, p50, p80 = ps
    return dict(
        env, provider=provider, mode=mode, metric=metric, unit=unit, shape=shape, p20=p20, p50=p50, p80=p80
    )

"""--profile_steps A,B: a torch.profiler trace (and on CUDA a memory snapshot) of optimizer steps A..B.

Written per rank into output_dir/profile/steps_A-B/:
    rank{r}.trace.json      Chrome / Perfetto trace (chrome://tracing, ui.perfetto.dev); each step is a
                            "step_N" range around its ops (and its kernels on CUDA)
    rank{r}.ops.txt         the ops sorted by self time (key_averages), to read without a viewer
    rank{r}.memory.pickle   CUDA only: every allocation of those steps with its stack, for
                            https://pytorch.org/memory_viz (torch.cuda.memory._dump_snapshot)
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


class StepProfiler:
    """Profiles the optimizer steps first..last (1-based, inclusive); a no-op when steps is None."""

    def __init__(
        self, steps: tuple[int, int] | None, output_dir: str | Path, rank: int, device: torch.device
    ):
        self.steps, self.rank, self.cuda = steps, rank, device.type == "cuda"
        self.dir = Path(output_dir) / "profile" / (f"steps_{steps[0]}-{steps[1]}" if steps else "")
        self.prof = None
        self.range = contextlib.nullcontext()

    def begin(self, step: int) -> None:
        """Call before optimizer step `step` runs."""
        if self.steps is None or not self.steps[0] <= step <= self.steps[1]:
            return
        if self.prof is None:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            if self.cuda:  # the allocator records from here on (stacks: python frames of each allocation)
                torch.cuda.memory._record_memory_history(max_entries=200_000)
            self.prof = profile(activities=acts, record_shapes=True, acc_events=True)  # one cycle: all of it
            self.prof.__enter__()
        self.range = torch.profiler.record_function(f"step_{step}")
        self.range.__enter__()

    def end(self, step: int) -> Path | None:
        """Call after optimizer step `step` finished; after the last profiled step it writes the files and
        returns their folder."""
        if self.prof is None:
            return None
        self.range.__exit__(None, None, None)
        self.range = contextlib.nullcontext()
        return self.close() if step >= self.steps[1] else None

    def close(self) -> Path | None:
        """Stop and write what was recorded (also when the run stops inside the range); the folder."""
        if self.prof is None:
            return None
        self.range.__exit__(None, None, None)
        if self.cuda:
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        self.dir.mkdir(parents=True, exist_ok=True)
        r = self.rank
        self.prof.export_chrome_trace(str(self.dir / f"rank{r}.trace.json"))
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        (self.dir / f"rank{r}.ops.txt").write_text(self.prof.key_averages().table(sort_by=sort, row_limit=60))
        if self.cuda:
            torch.cuda.memory._dump_snapshot(str(self.dir / f"rank{r}.memory.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        self.prof = None
        return self.dir

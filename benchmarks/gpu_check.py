"""The prepared GPU check: one command that turns a short GPU slot into every GPU fact the project lacks.

    python -m benchmarks.gpu_check [--out DIR] [--budget_s 540] [--only SUBSTR ...]   # on the GPU node
    python -m benchmarks.gpu_check --dry-run [--out DIR]     # CPU, smoke sizes, no wheels (the default suite)
    make gpu-check [GPU_PY=python3] [GPU_CHECK_ARGS=...]      (make gpu-wheels first, where a registry is)

Uses the node's own Python and torch; never a registry. Wheels in .whl/ (benchmarks/gpu_wheels.py) that the
node lacks are unpacked into <work>/site-packages, put on the children's PYTHONPATH after the repository.
Then every step of STEPS runs as a subprocess (`python -m <argv>`) in its own process group with its own time
box, in the table's order (its priority: the facts most wanted first); a step past its box is killed with its
group and what it wrote stays. After every step the summary (summary.md, gpu_check.csv) is rewritten, so a kill
of the whole check at the slot's end still leaves everything finished so far. Time boxes add up to DEFAULT_BUDGET_S
(9 minutes on one H100/H200, Triton compilation and model building included); --budget_s scales them, and no
step starts past the budget.

Results go to --out (default benchmarks/results/gpu_check_<gpu>_<date>/; the dry run: a temporary directory),
as at most 5 files in one folder (a GPU runner may bring back only a few files): summary.md, gpu_check.csv (the
long-format rows of every step, benchmarks/common.py), steps.tar.gz (each step's folder: log.txt, its own CSV,
report, plot, junit.xml), and the profiled step's chrome trace and CUDA memory snapshot when each is under
16 MiB. The step folders themselves are under --work (default a temporary directory, printed). On a node without
.git, rows whose git_sha is "unknown" get the check's sha (--git-sha, else .whl/manifest.txt from make gpu-wheels).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import common
from benchmarks.gpu_report import judge_goals, junit_counts, log_counts, render_summary
from benchmarks.gpu_wheels import install_wheels

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 540.0
DRY_BUDGET_S = 115.0
DRY_BOX_S = 100.0
# -v: a killed run's log still tells which tests passed; a module that fails to import must not stop the others
PYTEST = ("pytest", "-v", "-rfE", "-p", "no:cacheprovider", "--continue-on-collection-errors",
          "--junitxml={out}/junit.xml")  # fmt: skip
CPU_MARK = "not gpu and not slow and not dist"
FILE_CAP = 16 * 2**20  # per file brought back from a GPU runner's output folder


@dataclass(frozen=True)
class Step:
    """One row of the check: `python -m <argv>` on the GPU ("{out}" = the step's folder), `smoke` the dry
    run's argv (None: not in the dry run), its time box at the full budget, and what it produces."""

    part: str
    name: str
    argv: tuple[str, ...]
    smoke: tuple[str, ...] | None
    box_s: float
    produces: str
    flavour: str | None = None  # skipped when engine.models.FLAVOURS lacks it


# THE table: every invocation the check makes, in run order. Flags follow today's CLIs; update them here.
TRAIN_GPU = (
    "--max-length",
    "28672",
    "--warmup",
    "2",
    "--steps",
    "4",
    "--timeout",
    "90",
    "--configs",
    "core",
    "--results-dir",
    "{out}",
)  # engine eager + compiled, transformers, transformers + Liger
# a benchmark's own --budget_s: its (scaled) box less 10 s for start-up and writing its files
BUDGET = "{budget}"
LONG_CE = ("benchmarks.bench_long_ce", "--warmup", "3", "--out-dir", "{out}")
STEPS = [
    Step("tests", "gpu",
         (*PYTEST, "-m", "gpu", "tests"),
         None, 85,
         "pytest -m gpu: bf16 parity, kernel at the Qwen2-7B shape, determinism, memory bounds, attention "
         "backends (JUnit rows)"),
    Step("long_ce", "n28672",
         (*LONG_CE, "--shapes", "qwen2-7b", "glm4-9b", "--tokens", "28672", "--modes", "fwd+bwd", "--reps", "3",
          "--budget_s", BUDGET),
         ("benchmarks.bench_long_ce", "--smoke", "--device", "cpu", "--out-dir", "{out}"), 85,
         "fused loss fwd+bwd at N=28,672, Qwen2-7B and GLM-4-9B, N(0,1) and peaked inputs, 0/10/50% ignored, "
         "every importable provider with the accuracy gate: time, TFLOP/s, peak memory"),
    Step("train", "qwen2.5-0.5b",
         ("benchmarks.bench_train", "--flavour", "qwen2.5-0.5b", *TRAIN_GPU, "--budget_s", BUDGET),
         ("benchmarks.bench_train", "--smoke", "--only", "engine packed loss=twin ac=off",
          "--results-dir", "{out}"),
         140,
         "engine eager and compiled vs transformers vs transformers+Liger, 28,672 packed tokens: tokens/s per "
         "GPU, both MFU conventions, peak reserved memory"),
    Step("train", "qwen2.5-1.5b",
         ("benchmarks.bench_train", "--flavour", "qwen2.5-1.5b", *TRAIN_GPU, "--budget_s", BUDGET),
         None, 75,
         "the same at the ~1.5B shape", flavour="qwen2.5-1.5b"),
    Step("profile", "engine-step",
         ("benchmarks.gpu_profile", "--out", "{out}"),
         ("benchmarks.gpu_profile", "--smoke", "--out", "{out}"), 90,
         "one profiled engine step at the largest shape that fits (FSDP2, 1 rank): time by category, memory "
         "snapshot summary, chrome trace"),
    Step("long_ce", "n4096-16384",
         (*LONG_CE, "--shapes", "qwen2-7b", "--tokens", "4096", "16384", "--modes", "fwd", "fwd+bwd",
          "--inputs", "normal", "--ignore", "0.0", "--reps", "5", "--budget_s", BUDGET),
         None, 35,
         "Qwen2-7B at N=4,096 and 16,384, fwd and fwd+bwd"),
    Step("tests", "cpu-subset",
         (*PYTEST, "-m", CPU_MARK, "tests/kernels/test_long_ce_ref.py", "tests/models", "tests/data",
          "tests/train/test_train_units.py"),
         (*PYTEST, "-m", CPU_MARK, "tests/data/test_data_packing.py"), 30,
         "a CPU-suite subset under the node's torch / transformers (JUnit rows; the Triton interpreter tests "
         "run in the default suite under torch 2.11 + triton 3.6 by make test-compat)"),
]  # fmt: skip
assert sum(s.box_s for s in STEPS) <= DEFAULT_BUDGET_S


def run_boxed(
    cmd: list[str], box_s: float, log: Path, env: dict | None, cwd: Path = ROOT
) -> tuple[int | None, float]:
    """Run cmd in its own process group, output to `log` as it comes; past box_s the group is killed
    (_kill_group). Returns (exit code, or None when killed; wall seconds)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        p = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = p.wait(timeout=max(box_s, 0.1))
        except subprocess.TimeoutExpired:
            rc = None
        except BaseException:  # interrupted (SIGTERM / SIGINT): take the step down with us
            _kill_group(p)
            raise
        _kill_group(p)  # past its box; or done, with leftovers of its group
    return rc, time.perf_counter() - t0


def _kill_group(p: subprocess.Popen) -> None:
    """SIGTERM the group (5 s to flush files and exit), then SIGKILL whatever of it is left (grandchildren too:
    a bench_train worker or a torchrun rank must not hold the GPU into the next step)."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass


def _log_failures(log: Path) -> int:
    """Lines where a benchmark reports a failed case (bench_long_ce FAILED, bench_train error/oom, tracebacks)."""
    pat = re.compile(r"\bFAILED\b|\b(error|oom)\b|^Traceback")
    return sum(bool(pat.search(line)) for line in log.read_text(errors="replace").splitlines()[1:])


def collect(step: Step, argv: tuple[str, ...], folder: Path, check_env: dict) -> dict:
    """The rows a step left in its folder (also after a kill: whatever it wrote), pytest counts included."""
    res: dict = {"rows": [], "tests": ""}
    for csv_path in sorted(folder.glob("*.csv")):
        res["rows"] += common.read_rows(csv_path)
    if argv[0] == "pytest":
        junit = folder / "junit.xml"  # written at the end; a killed run leaves only its -v log lines
        counts, bad = junit_counts(junit) if junit.exists() else log_counts(folder / "log.txt")
        res["failed_tests"] = bad
        res["tests"] = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        shape = "pytest " + " ".join(a for a in argv if a.startswith("tests"))
        for k, v in counts.items():
            res["rows"].append(common.row(check_env, "pytest", step.name, k, "tests", shape, [v], fmt="g"))
    return res


def run_step(
    step: Step, argv: tuple[str, ...], box_s: float, folder: Path, env: dict, check_env: dict
) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    budget = f"{max(box_s - 10.0, 10.0):.0f}"
    cmd = [sys.executable, "-m", *(a.replace("{out}", str(folder)).replace(BUDGET, budget) for a in argv)]
    rc, wall = run_boxed(cmd, box_s, folder / "log.txt", env)
    res = collect(step, argv, folder, check_env)
    tests = f" ({res['tests']})" if res["tests"] else ""
    if rc is None:
        res["status"] = f"timeout: killed after {box_s:.0f} s, partial output kept{tests}"
    elif rc != 0:
        res["status"] = f"failed: exit {rc}{tests}"
    else:
        n_bad = 0 if argv[0] == "pytest" else _log_failures(folder / "log.txt")
        res["status"] = f"ok{tests}" + (f"; {n_bad} log lines report a failed case" if n_bad else "")
    res["wall_s"] = wall
    res["rows"].append(common.row(check_env, "gpu_check", f"{step.part}/{step.name}", "wall_time", "s",
                                  "step", [wall], fmt=".4g"))  # fmt: skip
    return res


def _driver() -> str:
    try:
        q = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        out = subprocess.run(q, capture_output=True, text=True, timeout=15).stdout.strip().splitlines()
        return out[0] if out else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no nvidia-smi)"


def _sha(explicit: str | None) -> str:
    if explicit:
        return explicit
    sha = common.git_sha()
    manifest = ROOT / ".whl" / "manifest.txt"
    if sha == "unknown" and manifest.exists():
        m = re.search(r"at git (\S+)", manifest.read_text())
        if m:
            return f"{m.group(1)} (from .whl/manifest.txt)"
    return sha


def gemm_tflops(n: int = 8192, reps: int = 10) -> float:
    """bf16 n^3 matmul rate of this GPU now (3 warm-ups, CUDA events): the ceiling next to the datasheet peak."""
    import torch

    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    rate = 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return rate


def node_environment(args, cuda: bool) -> dict:
    import torch

    from engine.metrics import peak_bf16

    env = {
        "dry_run": args.dry_run, "command": "python -m benchmarks.gpu_check " + shlex.join(args.argv),
        "gpu": torch.cuda.get_device_name(0) if cuda else "none (CPU)",
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpu_memory": f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB" if cuda else "",
        "driver": _driver() if cuda else "", "cuda": torch.version.cuda or "",
        "torch": torch.__version__, "python": platform.python_version(),
        "platform": " ".join((platform.system(), platform.machine(), "glibc", platform.libc_ver()[1])),
        "git_sha": _sha(args.git_sha), "budget_s": args.budget_s, "elapsed_s": 0,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }  # fmt: skip
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not importable"
    env["packages"] = common.versions()
    env["peak_bf16_tflops"] = (peak_bf16(env["gpu"]) or 0) / 1e12 or None
    env["gemm_bf16_tflops"] = round(gemm_tflops(), 1) if cuda else None
    env["row_env"] = common.environment("cuda" if cuda else "cpu")  # the columns of the check's own rows
    return env


def write_summary(out: Path, env: dict, steps: list[dict], wheels: list[dict]) -> None:
    """Rewrite out/summary.md, out/gpu_check.csv and out/steps.tar.gz from what the steps have left so far."""
    rows = [r for s in steps for r in s.get("rows", [])]
    if env.get("gemm_bf16_tflops"):
        shape = "bf16 8192x8192x8192 matmul, 3 warm-ups + 10 reps"
        rows.append(common.row(env["row_env"], "hardware", "gemm", "throughput", "TFLOP/s", shape,
                               [env["gemm_bf16_tflops"]], fmt=".4g"))  # fmt: skip
    sha = env["git_sha"].split()[0]
    for r in rows:
        if r.get("git_sha") in (None, "", "unknown"):
            r["git_sha"] = sha
    profile = None
    folders = [Path(s["folder"]) for s in steps if s.get("folder")]
    for folder in folders:
        for f in sorted(folder.glob("profile_*.json")):
            profile = json.loads(f.read_text())
        for f in [*folder.glob("trace_*.json.gz"), *folder.glob("memory_snapshot_*.pickle.gz")]:
            if f.stat().st_size < FILE_CAP and not (out / f.name).exists():
                shutil.copyfile(f, out / f.name)
    tmp = out / "gpu_check.csv.tmp"
    tmp.unlink(missing_ok=True)
    common.append_rows(tmp, rows)
    tmp.replace(out / "gpu_check.csv")
    with tarfile.open(out / "steps.tar.gz.tmp", "w:gz") as tar:
        for folder in folders:
            for f in sorted(folder.rglob("*")):
                if (
                    f.is_file()
                    and f.stat().st_size < FILE_CAP // 4
                    and not f.name.startswith(("trace_", "memory_"))
                ):
                    tar.add(f, arcname=str(f.relative_to(folder.parent)))
    (out / "steps.tar.gz.tmp").replace(out / "steps.tar.gz")
    text = render_summary(env, steps, judge_goals(rows, env), wheels, profile, len(rows))
    (out / "summary.md.tmp").write_text(text)
    (out / "summary.md.tmp").replace(out / "summary.md")


class Interrupted(Exception):
    """SIGTERM / SIGINT (the slot ends): the running step's group is killed, the summary written."""


def _interrupt(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def _prepare(args, cuda: bool, work: Path) -> tuple[Path, dict, dict, list[dict]]:
    """(results folder, environment of the run, children's environment, wheel records)."""
    env = node_environment(args, cuda)
    if args.out:
        out = Path(args.out)
    elif args.dry_run:
        out = Path(tempfile.mkdtemp(prefix="gpu_check_dry_"))
    else:
        slug = env["gpu"].lower().replace("nvidia", "").strip().split()[0]
        out = ROOT / "benchmarks" / "results" / f"gpu_check_{slug}_{env['date'][:10]}"
    out.mkdir(parents=True, exist_ok=True)
    child_env = dict(os.environ)
    if args.dry_run:
        child_env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU path, on any machine
        # smoke sizes: on a shared machine a second OpenMP thread mostly waits for a core
        child_env.setdefault("OMP_NUM_THREADS", "1")
    wheels: list[dict] = []
    site = None
    if not args.dry_run and any(Path(args.wheels).glob("*.whl")):
        site = work / "site-packages"
        wheels = install_wheels(Path(args.wheels), site)
        sys.path.append(str(site))  # after site-packages: the summary's versions see what was added
        env["packages"] = common.versions()
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), str(site) if site else "", os.environ.get("PYTHONPATH", "")) if p
    )
    return out, env, child_env, wheels


def _skip_reason(step: Step, argv: tuple[str, ...] | None, box: float, left: float, only: list[str] | None):
    from engine.models import FLAVOURS

    if only and not any(o in f"{step.part}/{step.name}" for o in only):
        return "skipped: not selected (--only)"
    if argv is None:
        return "skipped: not in the dry run (GPU only)"
    if step.flavour and step.flavour not in FLAVOURS:
        return f"skipped: engine.models has no flavour {step.flavour!r}"
    if box < 5.0:
        return f"skipped: out of budget ({max(left, 0):.0f} s left)"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="results folder (default benchmarks/results/gpu_check_<gpu>_<date>/)")
    ap.add_argument("--budget_s", type=float, help=f"total seconds (default {DEFAULT_BUDGET_S:.0f}; dry run "
                    f"{DRY_BUDGET_S:.0f}); scales every time box")  # fmt: skip
    ap.add_argument("--dry-run", action="store_true", help="CPU, smoke sizes, no wheels, temporary --out")
    ap.add_argument("--only", nargs="*", help="run only steps whose part/name contains one of these")
    ap.add_argument("--git-sha", help="the sha to record when the node's copy has no .git")
    ap.add_argument("--wheels", default=str(ROOT / ".whl"), help="folder of optional wheels")
    ap.add_argument("--work", help="where the steps' folders go (default: a new temporary directory)")
    args = ap.parse_args(argv)
    args.argv = argv
    t_start = time.perf_counter()
    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("error: no CUDA device; --dry-run runs the CPU smoke version", file=sys.stderr)
        return 2
    args.budget_s = budget = args.budget_s or (DRY_BUDGET_S if args.dry_run else DEFAULT_BUDGET_S)
    scale = budget / DEFAULT_BUDGET_S
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_work_"))
    work.mkdir(parents=True, exist_ok=True)
    out, env, child_env, wheels = _prepare(args, cuda, work)
    print(f"gpu check -> {out} (steps' folders: {work}; {env['gpu']}, torch {env['torch']}, "
          f"python {env['python']}, {budget:.0f} s)")  # fmt: skip
    steps = [{"part": s.part, "name": s.name, "status": "pending", "box_s": s.box_s * scale,
              "produces": s.produces} for s in STEPS]  # fmt: skip
    write_summary(out, env, steps, wheels)
    old = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for i, (step, rec) in enumerate(zip(STEPS, steps)):
            left = budget - (time.perf_counter() - t_start) - 3.0  # seconds kept for the last summary
            argv_i = step.smoke if args.dry_run else step.argv
            box = min(DRY_BOX_S if args.dry_run else step.box_s * scale, left)
            rec["box_s"] = max(box, 0.0)
            rec["status"] = _skip_reason(step, argv_i, box, left, args.only) or "running"
            if rec["status"] == "running":
                rec["folder"] = str(work / f"{i + 1:02d}_{step.part}_{step.name}")
                print(f"[{i + 1}/{len(STEPS)}] {step.part}/{step.name} (box {box:.0f} s) ...", flush=True)
                env["row_env"] = common.environment("cuda" if cuda else "cpu")
                rec.update(run_step(step, argv_i, box, Path(rec["folder"]), child_env, env["row_env"]))
            print(f"    {step.part}/{step.name}: {rec['status']}", flush=True)
            env["elapsed_s"] = round(time.perf_counter() - t_start)
            write_summary(out, env, steps, wheels)
    except Interrupted as e:
        for step, rec in zip(STEPS, steps):
            if rec["status"] == "running":
                rec["status"] = f"interrupted ({e}): the step's process group was killed"
                argv_i = step.smoke if args.dry_run else step.argv
                rec["rows"] = collect(step, argv_i, Path(rec["folder"]), env["row_env"])["rows"]
        env["elapsed_s"] = round(time.perf_counter() - t_start)
        write_summary(out, env, steps, wheels)
        print(f"interrupted ({e}); summary -> {out / 'summary.md'}", file=sys.stderr)
        return 130
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    print((out / "summary.md").read_text())
    print(
        f"summary -> {out / 'summary.md'}; rows -> {out / 'gpu_check.csv'}; steps -> {out / 'steps.tar.gz'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The optional wheels of the prepared GPU check: downloaded where a registry is reachable, installed on the GPU
node (which has none) into a temporary target directory.

    python -m benchmarks.gpu_wheels [--python 3.12 3.11] [--arch x86_64] [--dest .whl] [--with-quack]
    make gpu-wheels [GPU_PYTHON="3.12 3.11"] [GPU_ARCH=x86_64] [GPU_WHEELS_ARGS=--with-quack]

Each wheel is fetched with `pip download --no-deps --only-binary=:all:` for every target Python version (pure
wheels are shared; the few compiled ones, pydantic-core and jiter, come once per version), so the node's Python
need not be known in advance: 3.12 is what the H200 image lent to this project had (Python 3.12.3, torch
2.11.0+cu130, triton 3.6.0, as read there in 2026-11), 3.11 is what /work/venv-compat (torch 2.11 + triton 3.6)
has; gpu_check prints the node's. Versions are pinned (the ones this project was checked with); bump them in
WHEELS. The repository plus .whl/ must stay under 64 MiB, the most that one copy to a node carries. QuACK's
CUTLASS DSL libraries are ~92 MB per CUDA major (measured: nvidia-cutlass-dsl-libs-cu12 and -cu13 4.8.1, and
4.8.1 requires the cu12 one even for CUDA 13), so the QuACK stack is left out unless --with-quack.

On the node, install_wheels() unpacks (no pip needed) the wheels whose tags the running interpreter accepts and
whose distribution it does not already have: the image's own packages always win, a wheel only fills a gap.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAP_BYTES = 64 * 2**20  # repository + .whl/ in one copy to the node
# glibc >= 2.28 (any current GPU image); older pips do not widen manylinux_2_28 to the older tags themselves.
PLATFORMS = ("manylinux_2_28_{arch}", "manylinux_2_17_{arch}", "manylinux2014_{arch}")

# (requirement, group, why). Groups: every group but "quack" is downloaded by default.
WHEELS = [
    ("liger-kernel==0.8.5", "liger", "bench_long_ce / bench_train provider (needs only torch + triton)"),
    ("cut-cross-entropy==25.1.1", "cce", "bench_long_ce provider (needs only torch + triton)"),
    ("openai==3.57.0", "openai", "data_gen.llm client: the data_gen / evaluation tests import it"),
    ("anyio==4.16.0", "openai", "openai dependency"),
    ("httpx2==2.16.2", "openai", "openai dependency"),
    ("httpcore2==2.16.2", "openai", "httpx2 dependency"),
    ("h11==0.16.0", "openai", "httpcore2 dependency"),
    ("truststore==0.10.5", "openai", "httpx2 dependency"),
    ("idna==3.20", "openai", "anyio / httpx2 dependency"),
    ("sniffio==1.3.1", "openai", "openai dependency"),
    ("jiter==0.19.0", "openai", "openai dependency (compiled)"),
    ("pydantic==2.14.4", "openai", "openai dependency"),
    ("pydantic-core==2.50.5", "openai", "pydantic dependency (compiled)"),
    ("annotated-types==0.8.0", "openai", "pydantic dependency"),
    ("typing-inspection==0.4.5", "openai", "pydantic dependency"),
    ("typing-extensions==4.16.0", "openai", "openai / pydantic dependency"),
    ("pytest-timeout==2.4.0", "test", "pyproject's pytest `timeout` option"),
    ("accelerate==1.15.0", "test", "transformers' Trainer (tests/kernels/test_long_ce_hf_trainer.py)"),
    ("psutil==7.2.2", "test", "accelerate dependency (compiled, abi3)"),
    (
        "dashscope==2.0.2",
        "test",
        "test data: its qwen.tiktoken (Qwen2 BPE ranks) for the template tests; never imported",
    ),
    ("quack-kernels==0.6.5", "quack", "bench_long_ce provider (needs the CUTLASS DSL below)"),
    ("nvidia-cutlass-dsl==4.8.1", "quack", "QuACK dependency"),
    ("nvidia-cutlass-dsl-libs-base==4.8.1", "quack", "CUTLASS DSL (3 MB)"),
    ("nvidia-cutlass-dsl-libs-cu12==4.8.1", "quack", "CUTLASS DSL, a hard requirement of 4.8.1 (92 MB)"),
    ("nvidia-cutlass-dsl-libs-cu13==4.8.1", "quack", "CUTLASS DSL for CUDA 13 torch builds (92 MB)"),
    ("apache-tvm-ffi==0.1.15.post2", "quack", "QuACK dependency (compiled)"),
    ("torch-c-dlpack-ext==0.1.5", "quack", "QuACK dependency (compiled)"),
    ("einops==0.8.2", "quack", "QuACK dependency"),
]


def _dist_name(wheel: Path) -> str:
    return wheel.name.split("-")[0].replace("_", "-").lower()


def repo_bytes() -> int:
    """Bytes of what a copy of the working tree carries: tracked plus untracked files git does not ignore."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return sum((ROOT / p).stat().st_size for p in out.split("\0") if p and (ROOT / p).is_file())


def download(dest: Path, pythons: list[str], arch: str, with_quack: bool, pip: list[str]) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    reqs = [r for r, group, _ in WHEELS if with_quack or group != "quack"]
    for py in pythons:
        abi = "cp" + py.replace(".", "")
        cmd = [*pip, "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
               "--python-version", py, "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none",
               *(a for p in PLATFORMS for a in ("--platform", p.format(arch=arch))), *reqs]  # fmt: skip
        print("$ " + " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            print(f"error: pip download failed for python {py} (above)", file=sys.stderr)
            return 1
    wheels = sorted(dest.glob("*.whl"))
    groups = {r.split("==")[0]: g for r, g, _ in WHEELS}
    total, repo = sum(w.stat().st_size for w in wheels), repo_bytes()
    lines = [
        f"{w.stat().st_size / 2**20:8.2f} MiB  {groups.get(_dist_name(w), '?'):7s} {w.name}" for w in wheels
    ]
    lines += [
        f"{total / 2**20:8.2f} MiB  wheels ({len(wheels)} files)",
        f"{repo / 2**20:8.2f} MiB  repository (tracked + untracked not ignored)",
        f"{(total + repo) / 2**20:8.2f} MiB  together; cap {CAP_BYTES / 2**20:.0f} MiB",
    ]
    if not with_quack:
        lines.append(
            "left out: the QuACK stack (--with-quack): its CUTLASS DSL libraries are ~92 MB per CUDA major"
        )
    sha = subprocess.run(
        ["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=ROOT, capture_output=True, text=True
    )
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    (dest / "manifest.txt").write_text(
        f"downloaded {stamp} at git {sha.stdout.strip() or 'unknown'} for python {' '.join(pythons)}, "
        f"manylinux_2_28_{arch} and older\n" + "\n".join(lines) + "\n"
    )
    print("\n".join(lines))
    if total + repo > CAP_BYTES:
        print(f"error: over the {CAP_BYTES / 2**20:.0f} MiB cap: remove wheels from {dest}", file=sys.stderr)
        return 1
    return 0


def _compatible(wheel: Path) -> bool:
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename
    except ImportError:  # no packaging: accept pure-Python wheels only
        return wheel.name.endswith("-none-any.whl")
    return not parse_wheel_filename(wheel.name)[3].isdisjoint(set(sys_tags()))


def _unpack(wheel: Path, target: Path) -> None:
    """A wheel is a zip of the site-packages tree; <name>.data/purelib|platlib also belong at its root."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if info.is_dir() or ".." in parts:
                continue
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue  # scripts / headers / data: not needed on sys.path
                parts = parts[2:]
            out = target.joinpath(*parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)


def install_wheels(whl_dir: Path, target: Path) -> list[dict]:
    """Unpack into `target` every wheel of whl_dir this interpreter accepts and does not already have.
    Returns one record per wheel: {"wheel", "dist", "status": installed|present|incompatible|error, "detail"}."""
    records = []
    for wheel in sorted(Path(whl_dir).glob("*.whl")):
        rec = {"wheel": wheel.name, "dist": _dist_name(wheel), "detail": ""}
        try:
            rec.update(status="present", detail=importlib.metadata.version(rec["dist"]))
        except importlib.metadata.PackageNotFoundError:
            if any(r["dist"] == rec["dist"] and r["status"] == "installed" for r in records):
                rec.update(status="present", detail="installed from another wheel")
            elif not _compatible(wheel):
                rec.update(
                    status="incompatible", detail=f"tags not accepted by python {sys.version.split()[0]}"
                )
            else:
                try:
                    _unpack(wheel, target)
                    rec["status"] = "installed"
                except (OSError, zipfile.BadZipFile) as e:
                    rec.update(status="error", detail=f"{type(e).__name__}: {e}")
        records.append(rec)
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="download the GPU check's optional wheels into .whl/")
    ap.add_argument("--python", nargs="+", default=["3.12", "3.11"], help="target Python versions")
    ap.add_argument("--arch", default="x86_64", help="x86_64 | aarch64 (manylinux, glibc >= 2.17)")
    ap.add_argument("--dest", default=str(ROOT / ".whl"))
    ap.add_argument("--with-quack", action="store_true", help="also the QuACK stack (~190 MB: over the cap)")
    ap.add_argument("--pip", default=f"{sys.executable} -m pip", help="the pip command to download with")
    a = ap.parse_args(argv)
    return download(Path(a.dest), a.python, a.arch, a.with_quack, a.pip.split())


if __name__ == "__main__":
    sys.exit(main())

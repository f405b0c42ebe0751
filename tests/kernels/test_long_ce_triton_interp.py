"""Runs long_ce_interp_cases.py and long_ce_recompute_interp_cases.py (the Triton kernels under the CPU
interpreter) in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("marks", ["not slow", pytest.param("slow", marks=pytest.mark.slow)])
def test_triton_kernels_under_interpreter(marks):
    here = Path(__file__).parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        marks,
        str(here / "long_ce_interp_cases.py"),
        str(here / "long_ce_recompute_interp_cases.py"),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=here.parent.parent)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-2000:]

"""The torch / triton floor is one pair of numbers: setup.py's install_requires, the Makefile's
test-compat venv (where the suite is run under it) and the README say the same."""

import re
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", v).groups())


def test_floor_is_the_same_in_setup_makefile_and_readme():
    make = (REPO / "Makefile").read_text()
    setup = (REPO / "setup.py").read_text()
    readme = (REPO / "README.md").read_text()
    for pkg, key in (("torch", "TORCH_FLOOR"), ("triton", "TRITON_FLOOR")):
        floor = re.search(rf"^{key} := (\S+)$", make, re.M).group(1)
        major_minor = ".".join(floor.split(".")[:2])
        assert f'"{pkg}>={major_minor}"' in setup, (pkg, floor)
        assert f"{pkg} {major_minor}" in readme, (pkg, floor)
    torch_floor = re.search(r"^TORCH_FLOOR := (\S+)$", make, re.M).group(1)
    assert _version(torch.__version__) >= _version(torch_floor)

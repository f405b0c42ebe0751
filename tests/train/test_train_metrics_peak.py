"""engine.metrics peak table: the specific H100 variants are matched before the H100 (SXM) default."""

from __future__ import annotations

import pytest

from engine.metrics import peak_bf16


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_bf16_by_device_name(name, peak):
    assert peak_bf16(name) == peak

"""The long-ce benchmark's pipeline on a toy shape (so it cannot rot): rows, plot and report are written."""

import pytest

from benchmarks import bench_long_ce, common


def test_bench_long_ce_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    report = bench_long_ce.main(["--smoke", "--out-dir", str(tmp_path)])
    rows = common.read_rows(tmp_path / "long_ce.csv")
    assert {r["provider"] for r in rows} == {"torch", "ours_torch"}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    assert {r["metric"] for r in rows} == {"time", "peak_memory", "throughput", "cpu_time"}
    for r in rows:
        assert set(common.CSV_FIELDS) <= set(r) and r["git_sha"] and r["versions"] and r["device"]
        assert float(r["p20"]) <= float(r["p50"]) <= float(r["p80"])
    assert report.exists() and "python -m benchmarks.bench_long_ce --smoke" in report.read_text()
    assert list(tmp_path.glob("long_ce_*.png"))


def test_common_helpers(tmp_path):
    assert common.percentiles([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx([1.8, 3.0, 4.2])
    path = tmp_path / "x.csv"
    env = {"device": "d", "versions": "v", "git_sha": "s", "date": "t"}
    common.append_rows(path, [common.row(env, "p", "m", "time", "ms", "shape", [1.0, 2.0])])
    common.append_rows(path, [common.row(env, "q", "m", "time", "ms", "shape", [3.0])])
    rows = common.read_rows(path)
    assert [r["provider"] for r in rows] == ["p", "q"] and path.read_text().count("provider") == 1
    if common.cpu_peak_supported():
        import torch

        peak = common.peak_memory_bytes(lambda: torch.ones(64, 2**20 // 4).sum(), "cpu")  # 64 MiB touched
        assert 48 * 2**20 < peak < 256 * 2**20

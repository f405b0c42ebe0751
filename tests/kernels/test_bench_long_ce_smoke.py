"""The long-ce benchmark's pipeline on a toy shape (so it cannot rot): accuracy gate, rows, plot, report."""

import pytest

from benchmarks import bench_long_ce, common


def test_bench_long_ce_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    report = bench_long_ce.main(["--smoke", "--out-dir", str(tmp_path)])
    rows = common.read_rows(tmp_path / "long_ce.csv")
    assert {r["provider"] for r in rows} == {"torch", "ours"}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    timing = {"time", "peak_memory", "throughput", "throughput_valid", "cpu_time"}
    assert {r["metric"] for r in rows} == timing | {"err_loss", "err_dx", "err_dw"}
    assert {r["shape"].split("inputs=")[1] for r in rows} == {"normal,ignore=0.1", "peaked,ignore=0.1"}
    for r in rows:
        assert set(common.CSV_FIELDS) <= set(r) and r["git_sha"] and r["versions"] and r["device"]
        assert float(r["p20"]) <= float(r["p50"]) <= float(r["p80"])
        if r["metric"].startswith("err_"):  # fp32 against the fp64 definition
            assert float(r["p50"]) < 1e-5, r
    # N_valid < N (10% ignored): the valid-token rate is the lower one.
    tp = {(r["provider"], r["mode"], r["shape"], r["metric"]): float(r["p50"]) for r in rows}
    assert all(tp[k[:3] + ("throughput_valid",)] < v for k, v in tp.items() if k[3] == "throughput")
    text = report.read_text()
    assert "python -m benchmarks.bench_long_ce --smoke" in text and "| exact |" in text
    assert "NOT MEASURED" in text
    assert list(tmp_path.glob("long_ce_*.png"))


def test_bench_long_ce_gate_budget_and_unavailable(tmp_path, monkeypatch):
    """An inaccurate provider shows its error beside its time; an unavailable one is listed with its reason;
    a spent --budget_s skips the remaining cases instead of running them."""
    pytest.importorskip("matplotlib")
    real = bench_long_ce.providers

    def with_fakes(device, chunk_rows):
        table = [p for p in real(device, chunk_rows) if p.name == "ours"]
        off = lambda h, w, y, n: bench_long_ce.F.cross_entropy((h @ w.T).float(), y, reduction="sum") * 1.01
        return table + [
            bench_long_ce.Provider("off_by_1pct", "approximate (test)", off),
            bench_long_ce.Provider("missing", "exact", why="not installed (test)"),
        ]

    monkeypatch.setattr(bench_long_ce, "providers", with_fakes)
    argv = ["--smoke", "--modes", "fwd", "--budget_s", "0.01", "--out-dir", str(tmp_path)]
    report = bench_long_ce.main([*argv, "--providers", "ours", "off_by_1pct", "missing"])
    rows = common.read_rows(tmp_path / "long_ce.csv")
    err = {r["provider"]: float(r["p50"]) for r in rows if r["metric"] == "err_loss"}
    assert err["off_by_1pct"] == pytest.approx(0.01, rel=1e-3) and err["ours"] < 1e-6
    assert len({r["shape"] for r in rows}) == 1  # the first case ran, the second did not fit the budget
    text = report.read_text()
    assert "`missing` (not installed (test))" in text and "Skipped (--budget_s spent)" in text
    assert "| off_by_1pct | approximate (test) |" in text


def test_gpu_goal_lines_on_synthetic_rows(monkeypatch):
    """The GPU verdicts (they only run on a GPU) on made-up numbers: 80% of an H100's peak at ignore=0 is
    MET; faster than liger_fp32 at lower error MET; faster than cce_exact but at 2x its dW error NOT MET;
    the recompute mode unavailable is NOT MEASURED with its reason."""
    from benchmarks import long_ce_report

    monkeypatch.setattr(long_ce_report.torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    env = {"device": "d", "versions": "v", "git_sha": "s", "date": "t"}
    shape = "qwen2-7b:N=28672,H=3584,V=152064,bfloat16,inputs=normal,ignore=0.0"
    ms = 93.76e12 / (0.8 * 989e12) * 1e3  # 6 N H V at 80% of 989 TFLOP/s
    numbers = {
        "ours": (ms, 4000, [1e-3, 4e-3, 4e-3]),
        "liger_fp32": (1.2 * ms, 4000, [1e-3, 5e-3, 5e-3]),
        "cce_exact": (1.5 * ms, 2000, [1e-3, 4e-3, 2e-3]),
    }
    rows = []
    for prov, (t, mem, errs) in numbers.items():
        rows += [
            common.row(env, prov, "fwd+bwd", "time", "ms", shape, [t]),
            common.row(env, prov, "fwd+bwd", "peak_memory", "MiB", shape, [mem]),
            common.row(env, prov, "fwd+bwd", "throughput", "TFLOP/s", shape, [93.76e12 / t / 1e9]),
            common.row(env, prov, "fwd+bwd", "throughput_valid", "TFLOP/s", shape, [93.76e12 / t / 1e9]),
        ]
        rows += [
            common.row(env, prov, "fwd+bwd", k, "rel", shape, [e])
            for k, e in zip(("err_loss", "err_dx", "err_dw"), errs)
        ]
    lines = long_ce_report.goal_lines(
        rows, __import__("torch").device("cuda"), {"ours_recompute": "not merged"}
    )
    text = "\n".join(lines)
    assert "= 80% of NVIDIA H100 80GB HBM3's 989: goal >= 75% MET" in text
    assert [ln.endswith("MET") and not ln.endswith("NOT MET") for ln in lines if "vs liger_fp32" in ln] == [
        True
    ]
    assert [ln.endswith("NOT MET") for ln in lines if "vs cce_exact" in ln] == [True]
    assert "recompute goals NOT MEASURED (not merged)" in text

"""Smoke test of benchmarks/bench_train.py: the --smoke variant (2 tiny configurations, in-process) and the
--plan writer. Checks rows, keys and files; never speed."""

from __future__ import annotations

import csv

from benchmarks import bench_train


def test_bench_train_smoke_writes_rows_report_and_plot(tmp_path):
    assert bench_train.main(["--smoke", "--results-dir", str(tmp_path)]) == 0
    with open(tmp_path / "train.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench_train.FIELDS
        rows = list(reader)
    configs = {c.name for c in bench_train.smoke_configs()}
    metrics = {"tokens_per_s", "step_time", "mfu_row", "mfu_doc", "peak_memory", "loss_step1"}
    got = {(f"{r['provider']} {r['mode']}", r["metric"]) for r in rows}
    assert {(c, m) for c in configs for m in metrics} <= got
    assert any(r["provider"] == "hardware" and r["metric"] == "peak_flops" for r in rows)
    for r in rows:
        assert r["device"] and r["versions"] and r["git_sha"] and r["date"]
        assert float(r["p20"]) <= float(r["p50"]) <= float(r["p80"])
    # Same random weights and tokens through the engine and transformers: the first-step losses agree.
    loss = [float(r["p50"]) for r in rows if r["metric"] == "loss_step1"]
    assert len(loss) == 2 and abs(loss[0] - loss[1]) < 1e-4
    reports = list(tmp_path.glob("train_*_smoke.md"))
    assert len(reports) == 1 and "python -m benchmarks.bench_train --smoke" in reports[0].read_text()
    assert list(tmp_path.glob("train_*_smoke.png"))


def test_bench_train_plan_qwen2_7b(tmp_path):
    argv = ["--plan", "qwen2-7b", "--nproc", "4", "--gpu", "a100-80gb", "--results-dir", str(tmp_path)]
    assert bench_train.main(argv) == 0
    text = (tmp_path / "qwen2_7b_plan.md").read_text()
    assert "full AC, fused loss (the recipe)" in text and "tokens/s per GPU" in text

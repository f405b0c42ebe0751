"""Smoke test of benchmarks/bench_train.py: the CPU quick mode's configurations, every one of them, at a tiny
size and in-process (--smoke), and the --plan writer. Checks rows, keys and files; never speed."""

from __future__ import annotations

import csv

from benchmarks import bench_train
from benchmarks.common import CSV_FIELDS
from benchmarks.train_workload import cpu_configs

METRICS = {"tokens_per_s", "step_time", "mfu_causal", "mfu_full_attn", "peak_memory", "loss_step1"}


def test_bench_train_smoke_runs_the_quick_mode_set(tmp_path, capsys):
    assert bench_train.main(["--smoke", "--results-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    with open(tmp_path / "train.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_FIELDS
        rows = list(reader)
    quick = {c.name for c in cpu_configs()}
    assert {c.name for c in bench_train.smoke_configs()} == quick
    # Every quick-mode configuration ran, except Liger when it is not installed (then it says so).
    ran = {f"{r['provider']} {r['mode']}" for r in rows if r["provider"] != "hardware"}
    liger = {n for n in quick if n.startswith("transformers+liger")}
    assert quick - liger <= ran
    if not liger <= ran:
        assert "No module named 'liger_kernel'" in printed
    got = {(f"{r['provider']} {r['mode']}", r["metric"]) for r in rows}
    assert {(c, m) for c in ran for m in METRICS} <= got
    assert any(r["provider"] == "hardware" and r["metric"] == "peak_flops" for r in rows)
    for r in rows:
        assert r["device"] and r["versions"] and r["git_sha"] and r["date"]
        assert float(r["p20"]) <= float(r["p50"]) <= float(r["p80"])
    # Same random weights and tokens through every provider, layout, loss and checkpointing: the
    # first-step losses agree (checks that the configurations are compared like for like).
    loss = [float(r["p50"]) for r in rows if r["metric"] == "loss_step1"]
    assert len(loss) == len(ran) and max(loss) - min(loss) < 1e-4
    reports = list(tmp_path.glob("train_*_smoke.md"))
    assert len(reports) == 1 and "python -m benchmarks.bench_train --smoke" in reports[0].read_text()
    assert list(tmp_path.glob("train_*_smoke.png"))


def test_bench_train_plan_qwen2_7b(tmp_path):
    argv = ["--plan", "qwen2-7b", "--nproc", "4", "--gpu", "a100-80gb", "--results-dir", str(tmp_path)]
    assert bench_train.main(argv) == 0
    text = (tmp_path / "qwen2_7b_plan.md").read_text()
    assert "full AC, fused loss (the recipe)" in text and "tokens/s per GPU" in text


def test_core_configs_and_budget(tmp_path, capsys):
    """--configs core is issue 12's comparison; --budget_s starts no configuration without the time left
    for it (a budget of 1 s: every one is skipped, and the run still writes its report)."""
    from benchmarks.train_workload import core_configs, gpu_configs

    assert [c.name for c in core_configs(gpu_configs(), cuda=True)] == [
        "engine packed loss=triton ac=full",
        "engine packed loss=triton ac=full compile",
        "transformers packed loss=plain ac=full",
        "transformers+liger packed loss=liger ac=full",
    ]
    argv = ["--smoke", "--configs", "core", "--budget_s", "1", "--results-dir", str(tmp_path)]
    assert bench_train.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 3 and "--budget_s" in printed
    assert (
        "| engine packed loss=twin ac=full compile | skipped: --budget_s"
        in next(tmp_path.glob("*.md")).read_text()
    )

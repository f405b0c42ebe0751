"""--engine_checkpoint: the runner generates with the project's own model (tiny saved debug model, CPU)."""

import json
from pathlib import Path

import pytest

from data_gen.jsonl import read_appended
from evaluation.longbench_write import main

LBW = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "longwriter" / "longbench_write.jsonl"


@pytest.fixture(scope="module")
def debug_checkpoint(tmp_path_factory):
    try:
        import torch

        from engine.data import load_tokenizer
        from engine.models import build_model, save_pretrained
    except ImportError as e:  # engine.* is written by other helpers
        pytest.skip(f"engine.models / engine.data not importable yet: {e}")
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ckpt") / "debug-qwen2"
    save_pretrained(build_model("debug-qwen2"), out, tokenizer=load_tokenizer("debug-qwen2"))
    return out


@pytest.mark.skipif(not LBW.exists(), reason=f"{LBW} not found (see ../shared/data/longwriter)")
def test_engine_checkpoint_infer_is_resumable_and_seeded(debug_checkpoint, tmp_path):
    def run(out, limit):
        args = [
            "--stage",
            "infer",
            "eval_l",
            "--engine_checkpoint",
            str(debug_checkpoint),
            "--input",
            str(LBW),
        ]
        args += ["--output_dir", str(out), "--limit", str(limit), "--max_new_tokens", "8", "--device", "cpu"]
        return main(args)

    assert run(tmp_path / "a", 1) == 0
    rows = read_appended(str(tmp_path / "a" / "pred.jsonl"))
    assert [r["idx"] for r in rows] == [0]
    assert rows[0]["completion_tokens"] <= 8 and isinstance(rows[0]["response"], str)

    assert run(tmp_path / "a", 2) == 0  # resume: only idx 1 is generated
    rows = read_appended(str(tmp_path / "a" / "pred.jsonl"))
    assert [r["idx"] for r in rows] == [0, 1]

    assert run(tmp_path / "b", 2) == 0  # per-item seeds: same samples however the run was split
    assert [r["response"] for r in read_appended(str(tmp_path / "b" / "pred.jsonl"))] == [
        r["response"] for r in rows
    ]
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert (
        res["n_predictions"] == 2 and res["score_l"] is not None and res["config"]["model"] == "debug-qwen2"
    )

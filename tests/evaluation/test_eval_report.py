"""summarize / markdown_report / plot_length on a hand-made run (empty outputs, partial judging)."""

import pytest

from data_gen.quality import DIMENSIONS
from evaluation.report import markdown_report, plot_length, summarize


def _pred(idx, length, response, lang):
    return {"idx": idx, "prompt": f"p{idx}", "length": length, "response": response, "lang": lang}


def test_summarize_groups_and_plots(tmp_path):
    preds = [
        _pred(0, 100, " ".join(["w"] * 100), "en"),  # S_l 100
        _pred(1, 1000, "", "en"),  # empty output: S_l 0, no crash
        _pred(2, 3000, "字" * 1500, "zh"),  # r/a = 2 -> 50
        _pred(3, 5000, "字" * 8000, "zh"),  # a/r = 1.6 -> 80
    ]
    judged = {
        0: {"scores": dict.fromkeys(DIMENSIONS, 5)},
        2: {"scores": None},  # never parsed
        3: {"scores": dict.fromkeys(DIMENSIONS, 3)},
    }  # idx 1 not judged (transport failure)
    s = summarize(preds, judged)
    assert s["score_l"] == pytest.approx((100 + 0 + 50 + 80) / 4)
    assert s["score_q"] == pytest.approx((100 + 50) / 2) and s["n_judged"] == 3 and s["n_judge_missing"] == 1
    assert s["score"] == pytest.approx((s["score_l"] + s["score_q"]) / 2)
    assert [g["n"] for g in s["by_bucket"].values()] == [1, 1, 1, 1]
    assert s["by_language"]["zh"]["score_l"] == pytest.approx(65.0)
    assert s["by_required_length"]["1000"]["mean_output_length"] == 0
    assert summarize(preds, judged, missing="as_3")["score_q"] == pytest.approx((100 + 50 + 50) / 3)

    results = {
        "benchmark": "x.jsonl",
        "config": {"model": "m"},
        "n_prompts": 4,
        "n_predictions": 4,
        "n_infer_failed": 0,
        "lang_source": "test",
        "scores": s,
    }
    md = markdown_report(results)
    assert "| all | 4 | 57.5 | 75.0 | 66.2 | 3 | 1 |" in md and "Reading Experience" in md
    for path in plot_length(s, str(tmp_path)):
        assert (tmp_path / path.split("/")[-1]).stat().st_size > 1000


def test_summarize_without_judge_has_no_quality():
    s = summarize([_pred(0, 100, "w " * 100, "en")], None)
    assert "score_q" not in s and "score" not in s and s["score_l"] == 100


def test_official_pred_file_without_idx_is_scored(tmp_path):
    import json

    from evaluation.longbench_write import main

    inp = tmp_path / "in.jsonl"
    rows = [
        {"prompt": "写一篇文章", "type": "t", "length": 10},
        {"prompt": "Write a poem", "type": "t", "length": 4},
    ]
    inp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    # Official pred.py rows: the input row + response_length + response, no idx, in any order.
    official = [{**rows[1], "response_length": 4, "response": "one two three four"}]
    official.append({**rows[0], "response_length": 20, "response": "字" * 20})
    (out / "pred.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in official))
    assert main(["--stage", "eval_l", "--input", str(inp), "--output_dir", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["n_predictions"] == 2 and res["score_l"] == pytest.approx((100 + 100 * (1 - 1 / 3)) / 2)
    langs = res["scores"]["by_language"]
    assert (langs["zh"]["n"], langs["en"]["n"]) == (1, 1) and langs["en"]["score_l"] == 100


@pytest.mark.parametrize(
    "task, argv, message",
    [
        (None, ["--output_dir", "{tmp}/o"], "--input is required (or input_data_path in the task file"),
        (
            None,
            ["--stage", "eval_l", "--input", "{tmp}/no.jsonl", "--output_dir", "{tmp}/o"],
            "input file not found",
        ),
        (None, ["--task_cfg", "{tmp}/missing.yaml"], "task file not found"),
        ("stage: [eval_l]\ninput_data_path: null\noutput_dir: o\n", [], "input_data_path in the task file"),
        ("stage: [eval_l\n", [], "does not parse"),
        ("- just\n- a list\n", [], "must hold a mapping"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(tmp_path, capsys, task, argv, message):
    from evaluation.longbench_write import main

    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if task is not None:
        (tmp_path / "task.yaml").write_text(task)
        argv = ["--task_cfg", str(tmp_path / "task.yaml"), *argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_malformed_input_line_is_an_error_not_a_shifted_idx(tmp_path, capsys):
    from evaluation.longbench_write import main

    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "a", "length": 5}\n{"prompt": "b", "len\n{"prompt": "c", "length": 5}\n')
    argv = ["--stage", "eval_l", "--input", str(inp), "--output_dir", str(tmp_path / "o")]
    assert main(argv) == 2
    assert f"{inp}:2: not a JSON object" in capsys.readouterr().err

"""In-process DPO runs of engine.train: the first step's loss is exactly ln 2 when the reference is the
starting policy, precomputed and resident references give the same run, resume equals an uninterrupted run,
the reference cache is keyed by model and data, TRL's metric names, RPO, --ref_model, GLM-4."""

from __future__ import annotations

import math

import pytest
from train_testlib import base_args, make_pairs, read_metrics, run_inprocess, train_steps

import engine.reference as reference_mod

TRL_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected")  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", n=30)


def args(data, out, **over):
    # 10% held out, evaluated every 2 steps; 27 pairs pack into ~22 rows of 512: 5 steps of 4 rows per epoch
    kw = dict(rlhf_type="dpo", max_length=512, learning_rate=1e-3, split_dataset_ratio=0.1, eval_steps=2)
    return base_args(data, out, **{**kw, **over})


@pytest.fixture(scope="module")
def resident(data, tmp_path_factory):
    """4 steps with a resident reference (the starting model), checkpoints at 2 and 4, an fp32 export."""
    out = tmp_path_factory.mktemp("resident")
    run_inprocess(args(data, out, save_steps=2, save_final=True, final_dtype="float32"))
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ref_cache")


@pytest.fixture(scope="module")
def precomputed(data, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("precomputed")
    run_inprocess(args(data, out, save_steps=2, precompute_ref_log_probs="true", dataset_cache_dir=cache_dir))
    return out


def test_first_step_is_ln2_and_trl_metrics(resident):
    steps = train_steps(resident)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    first = steps[0]
    # policy == reference: every logit is exactly 0, so each pair's loss is -logsigmoid(0) = ln 2
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0
    assert first["rewards/accuracies"] == 0.0 and first["loss"] == pytest.approx(math.log(2), abs=1e-12)
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0 and first["pairs"] >= 4
    for r in steps:
        assert set(TRL_NAMES) <= set(r) and "nll_loss" not in r
        assert {"lr", "grad_norm", "tokens_per_s_per_gpu", "max_memory_gb"} <= set(r)
    assert steps[1]["lr"] == 0.0 or steps[2]["rewards/margins"] != 0.0  # the policy moved off the reference
    assert steps[3]["loss"] != pytest.approx(math.log(2), abs=1e-6)
    evals = [r for r in read_metrics(resident) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(f"eval_{n}" in evals[0] for n in TRL_NAMES)


def test_precomputed_reference_gives_the_same_run(resident, precomputed, cache_dir):
    """The precomputed table holds what the resident reference computes on the same epoch-0 micro-batches:
    the same losses, metrics and gradient norms, and no reference model during training."""
    a, b = train_steps(resident), train_steps(precomputed)
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        for k in (*TRL_NAMES, "grad_norm", "num_tokens", "pairs"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-9, abs=1e-12), (ra["step"], k)
    ev_a = [r for r in read_metrics(resident) if "eval_loss" in r]
    ev_b = [r for r in read_metrics(precomputed) if "eval_loss" in r]
    assert [r["eval_loss"] for r in ev_b] == pytest.approx([r["eval_loss"] for r in ev_a], rel=1e-9)
    assert len(list(cache_dir.glob("ref-logps-*.npy"))) == 2  # train and validation tables


@pytest.mark.parametrize("mode", ["resident", "precomputed"])
def test_resume_mid_run_matches_uninterrupted(
    data, resident, precomputed, cache_dir, tmp_path, monkeypatch, mode
):
    src = resident if mode == "resident" else precomputed
    extra = {}
    if mode == "precomputed":  # ... and loaded lazily in a worker process: the table travels with the dataset
        extra = dict(precompute_ref_log_probs="true", dataset_cache_dir=cache_dir, lazy_tokenize="true",
                     dataloader_num_workers=1)  # fmt: skip

    def no_pass(*a, **k):  # the resumed run must read the cached table (a recompute would use the
        raise AssertionError("reference recomputed despite its cache")  # starting weights: still right)

    monkeypatch.setattr(reference_mod, "reference_log_probs", no_pass)
    run_inprocess(args(data, tmp_path, resume_from_checkpoint=src / "checkpoint-2", **extra))
    full, resumed = train_steps(src), train_steps(tmp_path)
    assert [r["step"] for r in resumed] == [3, 4]
    for ra, rb in zip(full[2:], resumed):
        for k in (*TRL_NAMES, "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-9, abs=1e-12), (ra["step"], k)


def test_reference_cache_is_keyed_by_model_and_data(data, resident, precomputed, cache_dir, tmp_path):
    before = set(cache_dir.glob("ref-logps-*.npy"))
    pre = dict(max_steps=1, precompute_ref_log_probs="true", dataset_cache_dir=cache_dir)
    run_inprocess(args(data, tmp_path / "model", ref_model=str(resident / "final"), **pre))  # same data
    after_model = set(cache_dir.glob("ref-logps-*.npy"))
    assert len(after_model - before) == 2  # another reference: new train and validation tables
    other = make_pairs(tmp_path / "other.jsonl", n=30, seed=5)
    run_inprocess(args(other, tmp_path / "data", **pre))  # same reference, other data
    assert len(set(cache_dir.glob("ref-logps-*.npy")) - after_model) == 2


def test_rpo_and_another_reference_model(data, resident, tmp_path):
    """--ref_model (the resident run's export) differs from the starting policy: the first step is not ln 2,
    and resident and precomputed agree; --rpo_alpha adds alpha x the chosen responses' token-mean NLL."""
    ref = str(resident / "final")
    kw = dict(max_steps=2, ref_model=ref, rpo_alpha=0.5, split_dataset_ratio=0, eval_steps=0)
    run_inprocess(args(data, tmp_path / "a", **kw))
    run_inprocess(args(data, tmp_path / "b", precompute_ref_log_probs="true", **kw))
    a, b = train_steps(tmp_path / "a"), train_steps(tmp_path / "b")
    assert a[0]["rewards/margins"] != 0.0 and a[0]["nll_loss"] > 0
    for ra, rb in zip(a, b):
        for k in (*TRL_NAMES, "nll_loss", "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-9, abs=1e-12), (ra["step"], k)
    same = args(data, tmp_path / "c", max_steps=1, rpo_alpha=0.5, split_dataset_ratio=0, eval_steps=0)
    run_inprocess(same)
    (c,) = train_steps(tmp_path / "c")
    assert c["loss"] == pytest.approx(math.log(2) + 0.5 * c["nll_loss"], rel=1e-12)


def test_glm4_first_step_is_ln2(data, tmp_path):
    run_inprocess(args(data, tmp_path, model="debug-glm4", max_steps=1, split_dataset_ratio=0, eval_steps=0))
    (r,) = train_steps(tmp_path)
    assert r["rewards/margins"] == 0.0 and r["loss"] == pytest.approx(math.log(2), abs=1e-12)

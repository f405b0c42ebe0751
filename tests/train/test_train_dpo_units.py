"""DPO units: TRL's loss formulas on fixed numbers computed by hand (math, not torch), the step loss and
gradients invariant to the split into micro-batches (filler micro-batches included), config and memory plan."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

import kernels
from engine.config import parse_config
from engine.data import collate_rows
from engine.data.chat import aligned_labels
from engine.memory import plan_memory
from engine.models import FLAVOURS, build_model
from engine.objectives import DPOObjective, dpo_pair_losses
from engine.step import forward_backward

pytestmark = pytest.mark.usefixtures("one_thread")  # one_thread and pg: tests/conftest.py


def softplus(x: float) -> float:  # -log(sigmoid(-x))
    return math.log1p(math.exp(x))


# one pair: policy chosen/rejected -10 / -12.5, reference -11 / -11.5: logits = 2.5 - 0.5 = 2
PAIR = dict(policy_chosen=-10.0, policy_rejected=-12.5, ref_chosen=-11.0, ref_rejected=-11.5)
HAND = [  # (loss_type, beta, label_smoothing, expected) with expected written from TRL's dpo_loss by hand
    ("sigmoid", 0.1, 0.0, softplus(-0.2)),  # -log sigmoid(beta * 2)
    ("sigmoid", 0.1, 0.25, 0.75 * softplus(-0.2) + 0.25 * softplus(0.2)),  # conservative DPO
    ("sigmoid", 2.0, 0.0, softplus(-4.0)),
    ("hinge", 0.1, 0.0, 0.8),  # relu(1 - 0.2)
    ("hinge", 1.0, 0.0, 0.0),  # relu(1 - 2)
    ("ipo", 0.1, 0.0, 9.0),  # (2 - 1 / 0.2) ** 2
    ("ipo", 0.5, 0.0, 1.0),  # (2 - 1) ** 2
]


@pytest.mark.parametrize("loss_type, beta, ls, expected", HAND)
def test_pair_loss_formulas_on_hand_computed_numbers(loss_type, beta, ls, expected):
    t = {k: torch.tensor([v], dtype=torch.float64) for k, v in PAIR.items()}
    got = dpo_pair_losses(**t, beta=beta, loss_type=loss_type, label_smoothing=ls)
    assert got.item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_pair_losses(**t, beta=beta, loss_type="kto")


def test_summary_means_and_rpo_term():
    """stats are sums over pairs (and the chosen NLL over tokens): the summary divides by the all-reduced
    counts, and the RPO term adds rpo_alpha x token-mean NLL to the loss (TRL: losses + rpo_alpha * nll)."""
    obj = DPOObjective(beta=0.1, rpo_alpha=0.5)
    stats = [2.0, 0.3, -0.1, 3.0, 0.4, -40.0, -44.0, 120.0]
    m = obj.summary(stats, [4.0, 60.0, 130.0])
    assert m["loss"] == pytest.approx(2.0 / 4 + 0.5 * 120.0 / 60.0) and m["nll_loss"] == 2.0
    assert (m["rewards/chosen"], m["rewards/rejected"], m["rewards/accuracies"]) == (0.075, -0.025, 0.75)
    assert (m["rewards/margins"], m["logps/chosen"], m["logps/rejected"]) == (0.1, -10.0, -11.0)
    assert (m["num_tokens"], m["pairs"]) == (130, 4)
    assert "nll_loss" not in DPOObjective().summary(stats, [4.0, 60.0, 130.0])
    assert "pairs" not in obj.summary(stats, [4.0, 60.0, 130.0], training=False)


def _pair_docs(n_pairs: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_pairs):
        prompt = rng.integers(0, 256, int(rng.integers(3, 9)))
        pair = []
        for _ in range(2):
            ids = np.concatenate([prompt, rng.integers(0, 256, int(rng.integers(4, 25)))]).astype(np.int64)
            pair.append((ids, aligned_labels(ids, np.arange(len(ids)) >= len(prompt))))
        out.append(pair)
    return out


def _mb(pairs, idx):
    mb = collate_rows([[d for i in idx for d in pairs[i]]] if idx else [[]], length=None, pad_token_id=0)
    mb["samples"] = list(idx)
    return mb


@pytest.mark.parametrize("loss_type, rpo_alpha", [("sigmoid", 1.0), ("ipo", None)])
def test_step_is_invariant_to_the_micro_batch_split(pg, loss_type, rpo_alpha):
    """4 pairs as 1 micro-batch, as 4, and as 2 plus an all-filler one: same loss, metrics and gradients.
    Pairs differ in length, so a per-micro-batch mean (of pairs or of NLL tokens) would differ."""
    torch.manual_seed(0)
    model, ref = build_model("debug-qwen2"), build_model("debug-qwen2")
    for m in (model, ref):
        m.loss_fn = functools.partial(kernels.linear_cross_entropy, reduction="none", impl="torch")
    pairs = _pair_docs(4)
    obj = DPOObjective(beta=0.5, loss_type=loss_type, rpo_alpha=rpo_alpha, ref_model=ref)

    def run(split):
        model.zero_grad()
        res = forward_backward(model, [_mb(pairs, s) for s in split], obj, device=torch.device("cpu"))
        return res["metrics"], {n: p.grad.clone() for n, p in model.named_parameters()}

    (m1, g1), (m4, g4), (mf, gf) = run([[0, 1, 2, 3]]), run([[0], [1], [2], [3]]), run([[0, 3], [1, 2], []])
    assert m1["pairs"] == m4["pairs"] == mf["pairs"] == 4
    for other, grads in ((m4, g4), (mf, gf)):
        for k, v in m1.items():
            assert other[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
        for n in g1:
            torch.testing.assert_close(grads[n], g1[n], rtol=1e-5, atol=1e-7)
    assert m1["loss"] > 0 and any(g.abs().sum() > 0 for g in g1.values())


def test_config_flags_and_errors():
    cfg = parse_config(["--dataset", "p.jsonl", "--rlhf_type", "dpo", "--beta", "0.2", "--rpo_alpha", "1",
                        "--loss_type", "ipo", "--ref_model", "ref/", "--precompute_ref_log_probs", "true"])  # fmt: skip
    r = cfg.rlhf
    assert (r.rlhf_type, r.beta, r.rpo_alpha, r.loss_type, r.ref_model, r.precompute_ref_log_probs) == (
        "dpo", 0.2, 1.0, "ipo", "ref/", True,
    )  # fmt: skip
    d = parse_config(["--dataset", "p.jsonl", "--rlhf_type", "dpo"])
    assert (d.rlhf.beta, d.rlhf.rpo_alpha, d.rlhf.loss_type, d.rlhf.label_smoothing) == (
        0.1,
        None,
        "sigmoid",
        0.0,
    )
    assert d.train.neftune_noise_alpha == 0 and not d.rlhf.precompute_ref_log_probs
    bad = [
        (["--beta", "0.2"], "'beta'.*rlhf_type dpo"),  # a DPO flag on an SFT run
        (
            ["--rlhf_type", "dpo", "--loss_type", "ipo", "--label_smoothing", "0.1"],
            "'label_smoothing'.*sigmoid",
        ),
        (["--rlhf_type", "dpo", "--label_smoothing", "0.5"], "'label_smoothing'"),
        (["--rlhf_type", "dpo", "--beta", "0"], "'beta'"),
        (["--rlhf_type", "dpo", "--loss_name", "mean"], "'loss_name'"),
        (["--rlhf_type", "kto"], "'rlhf_type'.*dpo"),
        (["--rlhf_type", "dpo", "--loss_type", "kto"], "'loss_type'"),
    ]
    for argv, match in bad:
        with pytest.raises(ValueError, match=match):
            parse_config(["--dataset", "p.jsonl", *argv])


def test_memory_plan_of_a_dpo_run():
    args = FLAVOURS["qwen2-7b"]
    kw = dict(world_size=4, tokens_per_micro_batch=32768)
    sft = plan_memory(args, **kw)
    pre = plan_memory(args, **kw, reference="precomputed")
    res = plan_memory(args, **kw, reference="resident")
    assert pre.total == sft.total and "reference" not in sft.format()
    # the resident reference: bf16 shards (2 bytes / param / rank) plus one gathered block
    assert res.reference > args.num_params() * 2 / 4 and res.total - sft.total == res.reference
    assert "reference" in res.format()
    with pytest.raises(ValueError):
        plan_memory(args, **kw, reference="both")


def test_dpo_example_recipe():
    from pathlib import Path

    f = Path(__file__).resolve().parents[2] / "examples/longwriter_glm4_9b_dpo.yaml"
    cfg = parse_config(["--config", str(f)])
    assert (cfg.rlhf.rlhf_type, cfg.train.max_steps, cfg.rlhf.precompute_ref_log_probs) == ("dpo", 250, True)
    assert cfg.train.neftune_noise_alpha == 0 and cfg.data.packing and len(cfg.data.dataset) == 2
    # the comment quotes `python -m engine.memory` for both reference modes
    kw = dict(world_size=4, tokens_per_micro_batch=cfg.data.max_length)
    for mode in ("precomputed", "resident"):
        total = plan_memory(FLAVOURS["glm4-9b"], **kw, reference=mode).gib()["total"]
        assert f"{total:.2f} GiB" in f.read_text()

"""DPO against transformers: per-sequence log-probs of packed pairs through the fused kernel equal log_softmax
of transformers' logits gathered and summed over the response tokens; the loss and gradients of one step equal
TRL's DPO loss (its formulas, written out below) on those transformers log-probs."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models_hf_tiny import CASES, COMMON, hf_model, ours_from_hf

import kernels
from engine.data import collate_rows
from engine.data.chat import aligned_labels
from engine.objectives import DPOObjective
from engine.objectives.dpo import document_index, document_log_probs
from engine.step import forward_backward, to_device

pytestmark = pytest.mark.usefixtures("one_thread")  # one_thread and pg: tests/conftest.py


def make_pairs(n_pairs: int, seed: int = 0) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Pairs of documents: a shared random prompt, then a random response of 3-20 tokens (trainable)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n_pairs):
        prompt = rng.integers(0, COMMON["vocab_size"], int(rng.integers(2, 12)))
        docs = []
        for _ in range(2):
            resp = rng.integers(0, COMMON["vocab_size"], int(rng.integers(3, 20)))
            ids = np.concatenate([prompt, resp]).astype(np.int64)
            mask = np.arange(len(ids)) >= len(prompt)
            docs.append((ids, aligned_labels(ids, mask)))
        pairs.append(docs)
    return pairs


def packed(pairs, rows_of_pairs: list[list[int]]) -> dict:
    """One micro-batch: each row holds the listed pairs' documents back to back (chosen, rejected, ...)."""
    mb = collate_rows([[d for p in row for d in pairs[p]] for row in rows_of_pairs], pad_token_id=0)
    mb["samples"] = [p for row in rows_of_pairs for p in row]
    return mb


def hf_logps(hf, docs, grad: bool = False) -> torch.Tensor:
    """Transformers' per-document response log-probs: log_softmax(logits) gathered at the labels, summed."""
    out, dev = [], next(hf.parameters()).device
    with torch.set_grad_enabled(grad):
        for ids, labels in docs:
            logits = hf(input_ids=torch.from_numpy(ids)[None].to(dev)).logits[0].float()  # [T, V]
            lab = torch.from_numpy(labels).to(dev)
            keep = lab != -100
            out.append(F.log_softmax(logits, -1)[keep].gather(1, lab[keep, None]).sum().double().cpu())
    return torch.stack(out)


def ours(hf) -> torch.nn.Module:
    model = ours_from_hf(hf)
    model.loss_fn = functools.partial(kernels.linear_cross_entropy, reduction="none", impl="torch")
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_packed_log_probs_equal_transformers(case):
    hf = hf_model(case)
    model = ours(hf)
    pairs = make_pairs(5)
    # two rows: 3 pairs packed in the first (document boundaries inside a row), 2 in the second, padding after
    mb = packed(pairs, [[0, 1, 2], [3, 4]])
    tok_doc, doc_targets = document_index(mb)
    with torch.no_grad():
        got = document_log_probs(model, to_device(mb, "cpu"), tok_doc, len(doc_targets))
    docs = [d for p in pairs for d in p]
    if (
        "dynamic" in case
    ):  # transformers' dynamic rope keeps the longest length it has seen: a fresh model per doc
        want = torch.cat([hf_logps(hf_model(case), [d]) for d in docs])
    else:
        want = hf_logps(hf, docs)
    assert got.dtype == torch.float64 and got.shape == (10,)
    assert (doc_targets == torch.tensor([int((d[1] != -100).sum()) for p in pairs for d in p])).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def trl_loss(pc, pr, rc, rr, *, beta, loss_type, label_smoothing, lengths, rpo_alpha, nll):
    """TRL DPOTrainer (v0.28) get_batch_loss_metrics: dpo_loss, IPO's per-token log-probs, the RPO term."""
    if loss_type == "ipo":  # concatenated_forward: all_logps / loss_mask.sum(-1), for policy and reference
        lc, lr = lengths
        pc, pr, rc, rr = pc / lc, pr / lr, rc / lc, rr / lr
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        losses = (
            -F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing
        )
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    if rpo_alpha is not None:
        losses = losses + rpo_alpha * nll
    return losses.mean(), beta * (pc - rc), beta * (pr - rr)


VARIANTS = [
    dict(loss_type="sigmoid", label_smoothing=0.0, rpo_alpha=None),
    dict(loss_type="sigmoid", label_smoothing=0.2, rpo_alpha=0.5),
    dict(loss_type="ipo", label_smoothing=0.0, rpo_alpha=None),
    dict(loss_type="hinge", label_smoothing=0.0, rpo_alpha=None),
]


@pytest.mark.parametrize("case", ["qwen2", "glm4"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{x}" for x in v.values()))
def test_step_loss_and_grads_equal_trl_on_transformers_log_probs(pg, case, variant):
    beta = 2.0  # large enough that the hinge is active on some pairs and not on others
    policy_hf, ref_hf = hf_model(case, seed=0), hf_model(case, seed=1)
    pairs = make_pairs(4, seed=2)
    docs = [d for p in pairs for d in p]

    # transformers + TRL's formula, one batch holding the whole step
    policy_hf.zero_grad()
    pi = hf_logps(policy_hf, docs, grad=True)
    ref = hf_logps(ref_hf, docs)
    lengths = torch.tensor([int((lab != -100).sum()) for _, lab in docs], dtype=torch.float64)
    nll = -pi[0::2].sum() / lengths[0::2].sum()  # F.cross_entropy over all chosen tokens (token mean)
    want, want_rc, want_rr = trl_loss(
        pi[0::2], pi[1::2], ref[0::2], ref[1::2], beta=beta, lengths=(lengths[0::2], lengths[1::2]), nll=nll,
        **variant,
    )  # fmt: skip
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in policy_hf.named_parameters()}

    # ours: the same step split into two micro-batches (packed rows), reference resident
    model, ref_model = ours(policy_hf), ours(ref_hf)
    objective = DPOObjective(beta=beta, ref_model=ref_model, **variant)
    res = forward_backward(
        model, [packed(pairs, [[0, 1]]), packed(pairs, [[2], [3]])], objective, device="cpu"
    )
    m = res["metrics"]
    assert m["loss"] == pytest.approx(want.item(), rel=1e-5)
    assert m["rewards/chosen"] == pytest.approx(want_rc.mean().item(), rel=1e-4, abs=1e-6)
    assert m["rewards/margins"] == pytest.approx((want_rc - want_rr).mean().item(), rel=1e-4, abs=1e-6)
    assert m["rewards/accuracies"] == (want_rc > want_rr).double().mean().item()
    assert ("nll_loss" in m) == (variant["rpo_alpha"] is not None) and m["pairs"] == 4
    if variant["loss_type"] == "hinge":  # the hinge is exercised on both sides
        active = 1 - beta * ((pi[0::2] - pi[1::2]) - (ref[0::2] - ref[1::2])) > 0
        assert active.any() and not active.all()
    ours_grads = {n: p.grad for n, p in model.named_parameters()}
    assert ours_grads.keys() <= want_grads.keys() and len(ours_grads) > 10
    for name, g in ours_grads.items():  # fp32 vs fp32 (packed varlen + fused kernel vs eager + logits):
        ref_g = want_grads[name]  # error relative to the gradient's own scale
        assert (g - ref_g).norm() <= 1e-4 * ref_g.norm() and ref_g.norm() > 0, name
        torch.testing.assert_close(g, ref_g, rtol=0, atol=1e-4 * ref_g.abs().max().item(), msg=name)
    assert all(p.grad is None for p in ref_model.parameters())  # the reference gets no gradient


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["qwen2", "glm4"])
def test_bf16_cuda_log_probs_and_an_exact_first_step(case):
    """CUDA bf16 through the Triton kernel (the CPU twin of this is test_packed_log_probs_equal_transformers):
    the per-sequence log-probs are judged by their error against the fp32 truth next to transformers' own
    bf16 error, and the grad-enabled forward (the policy) equals the no_grad one (a reference with the same
    weights) bit for bit, which is what makes the first DPO step exactly ln 2 on GPU too."""
    pairs = make_pairs(5)
    docs = [d for p in pairs for d in p]
    mb = packed(pairs, [[0, 1, 2], [3, 4]])
    tok_doc, doc_targets = document_index(mb)
    truth = hf_logps(hf_model(case).cuda(), docs)  # fp32
    hf16 = hf_model(case, dtype=torch.bfloat16).cuda()
    ref_err = (hf_logps(hf16, docs) - truth).abs().max()
    model = ours_from_hf(hf16, dtype=torch.bfloat16, attn_impl="auto").cuda()
    model.loss_fn = functools.partial(kernels.linear_cross_entropy, reduction="none", impl="auto")
    batch = to_device(mb, "cuda")
    with torch.no_grad():
        frozen = document_log_probs(model, batch, tok_doc, len(doc_targets))
    policy = document_log_probs(model, batch, tok_doc, len(doc_targets))
    policy.sum().backward()
    assert torch.equal(policy.detach(), frozen)
    err = (frozen.cpu() - truth).abs().max()
    assert err <= 2 * ref_err + 1e-2, (err, ref_err)

"""Packing invariants (torchtitan-style): every sample once, no row over budget, positions restart per
document, no target crosses a document, padding only at the row end; plus loss equivalence."""

import numpy as np
import pytest
import torch

from engine.data import collate_rows, load_tokenizer, pack_lengths, packing_efficiency
from engine.data.chat import aligned_labels, encode_conversations

MAX = 28672


def longwriter_like(n_long, n_short, seed):
    rng = np.random.default_rng(seed)
    long = np.clip(rng.lognormal(np.log(3500), 0.55, n_long), 500, 17000).astype(np.int64)
    short = rng.integers(300, 1501, n_short)
    return np.concatenate([long, short])


def check_plan(lengths, plan, max_length):
    flat = sorted(i for row in plan for i in row)
    assert flat == list(range(len(lengths))), "every sample exactly once"
    for row in plan:
        assert row and sum(lengths[i] for i in row) <= max_length


CASES = {
    "longwriter": (longwriter_like(300, 1000, 0), MAX),
    "random_small": (np.random.default_rng(1).integers(1, 65, 500), 64),
    "all_max": (np.full(17, 64), 64),
    "all_one": (np.ones(200, dtype=np.int64), 64),
    "single": (np.array([5]), 64),
    # adversarial: nothing pairs (each just over half a row), and full rows mixed with many 1-token documents
    "half_plus_one": (np.full(31, 33), 64),
    "max_and_ones": (np.concatenate([np.full(9, 64), np.ones(70, dtype=np.int64), [63, 63, 2]]), 64),
    "empty": (np.zeros(0, dtype=np.int64), 64),
}


@pytest.mark.parametrize("case", list(CASES))
def test_plan_invariants(case):
    lengths, max_length = CASES[case]
    plan = pack_lengths(lengths, max_length, seed=3, epoch=1)
    check_plan(lengths, plan, max_length)
    assert plan == pack_lengths(lengths, max_length, seed=3, epoch=1), "deterministic per (seed, epoch)"
    if case == "all_max":
        assert len(plan) == 17
    if case == "all_one":
        assert len(plan) == 4 and packing_efficiency(lengths, plan, max_length) == pytest.approx(200 / 256)
    if case == "half_plus_one":
        assert len(plan) == 31
    if case == "max_and_ones":  # 9 full rows, the 63s each take a 1, the rest (70 - 2 + 2 tokens) fill 2 rows
        assert len(plan) == 9 + 2 + 2 and packing_efficiency(lengths, plan, max_length) > 0.9
    if case == "empty":
        assert plan == []


# LongWriter-like mixtures: long replies alone, and mixed with short chat samples in several ratios;
# "1:20_full" is benchmarks.bench_data's largest mix (6,000 long + 120,000 short), where best-fit
# decreasing needed ceil(total / max_length) + 7 rows.
MIXES = {"long_only": (2000, 0), "1:20": (1000, 20000), "20:1": (2000, 100), "1:1": (1000, 1000),
         "1:20_full": (6000, 120000)}  # fmt: skip


@pytest.mark.parametrize("mix", list(MIXES))
def test_rows_within_one_of_the_lower_bound(mix):
    n_long, n_short = MIXES[mix]
    for seed, epoch in ((0, 0), (1, 3)):
        lengths = longwriter_like(n_long, n_short, seed)
        plan = pack_lengths(lengths, MAX, seed=seed, epoch=epoch)
        check_plan(lengths, plan, MAX)
        assert len(plan) <= -(-int(lengths.sum()) // MAX) + 1


def test_efficiency_and_epoch_reshuffle():
    lengths = longwriter_like(2000, 40000, 7)
    plan0 = pack_lengths(lengths, MAX, seed=0, epoch=0)
    assert packing_efficiency(lengths, plan0, MAX) >= 0.99
    long_only = longwriter_like(2000, 0, 7)
    assert packing_efficiency(long_only, pack_lengths(long_only, MAX), MAX) >= 0.99
    plan1 = pack_lengths(lengths, MAX, seed=0, epoch=1)
    check_plan(lengths, plan1, MAX)
    assert plan0 != plan1
    # Documents meet different neighbours from epoch to epoch, not just shuffled rows.
    a, b = (pack_lengths(long_only, MAX, seed=0, epoch=e) for e in (0, 1))
    assert packing_efficiency(long_only, b, MAX) >= 0.99

    def pairs(plan):
        return {(i, j) for row in plan for i in row for j in row if i < j}

    assert len(pairs(a) & pairs(b)) < 0.2 * len(pairs(a))
    assert pack_lengths(lengths, MAX, seed=1, epoch=0) != plan0


def test_over_long_and_zero_lengths_raise():
    with pytest.raises(ValueError, match="max_length"):
        pack_lengths([3, 65, 2], 64)
    with pytest.raises(ValueError, match=">= 1"):
        pack_lengths([3, 0], 64)


def random_docs(rng, lengths, vocab=200):
    docs = []
    for n in lengths:
        ids = rng.integers(0, vocab, n)
        mask = rng.random(n) < 0.6
        docs.append((ids, aligned_labels(ids, mask)))
    return docs


def test_collated_rows_keep_documents_apart():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, 60)
    docs = random_docs(rng, lengths)
    plan = pack_lengths(lengths, 64, seed=0)
    batch = collate_rows([[docs[i] for i in row] for row in plan], length=64, pad_token_id=7)
    ids, pos, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
    B, T = ids.shape
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == B * T
    seg = torch.diff(cu)
    assert batch["max_seqlen"] == int(seg.max())
    flat_pos, flat_lab, flat_ids = pos.flatten(), labels.flatten(), ids.flatten()
    interior = 0
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert flat_pos[s:e].tolist() == list(range(e - s)), "positions restart at 0 per segment"
        assert flat_lab[e - 1] == -100, "the last token of a document has no target"
        inner = flat_lab[s : e - 1]
        keep = inner != -100
        assert torch.equal(inner[keep], flat_ids[s + 1 : e][keep]), "targets stay inside the document"
        interior += e % T != 0
    assert interior > len(plan), "the test must exercise boundaries inside rows"
    # Padding only at the row end, with ignored labels.
    for b, row in enumerate(plan):
        n = sum(int(lengths[i]) for i in row)
        assert (ids[b, n:] == 7).all() and (labels[b, n:] == -100).all()
        assert torch.equal(ids[b, :n], torch.from_numpy(np.concatenate([docs[i][0] for i in row])))
    assert batch["doc_lengths"] == [int(lengths[i]) for row in plan for i in row]
    assert batch["num_target_tokens"] == sum(int((d[1] != -100).sum()) for d in docs)
    # A filler row is padding only.
    filler = collate_rows([[], []], pad_token_id=7)
    assert filler["num_target_tokens"] == 0 and filler["input_ids"].shape == (2, 1)


def test_packed_row_loss_equals_sum_of_document_losses():
    import engine.models as models

    if not hasattr(models, "build_model"):
        pytest.skip("engine.models.build_model is not available yet (models helper)")
    torch.manual_seed(0)
    tok = load_tokenizer("debug-qwen2")
    model = models.build_model("debug-qwen2", dtype=torch.float32, device="cpu")
    model.eval()
    convs = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend."}],
        [{"role": "user", "content": "写诗"}, {"role": "assistant", "content": "床前明月光"}],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    ]
    docs = [(ids.astype(np.int64), aligned_labels(ids, m)) for ids, m in encode_conversations(tok, convs)]
    T = sum(len(d[0]) for d in docs) + 5  # leaves trailing padding
    batch = collate_rows([docs], length=T, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        packed = model(
            batch["input_ids"],
            position_ids=batch["position_ids"],
            cu_seqlens=batch["cu_seqlens"],
            max_seqlen=batch["max_seqlen"],
            labels=batch["labels"],
        )
        alone = sum(
            model(torch.from_numpy(ids)[None], labels=torch.from_numpy(lab)[None]) for ids, lab in docs
        )
    assert len(docs) == 3 and batch["cu_seqlens"].numel() == 5  # 3 documents + padding segment
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-4)

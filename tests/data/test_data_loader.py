import os

import numpy as np
import pytest
import torch

from engine.data import StepLoader, build_dataset, load_tokenizer
from engine.data.loader import cost_spread

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "data", "longwriter_demo.jsonl")
MAXLEN = 2048


@pytest.fixture(scope="module")
def ds():
    return build_dataset([DEMO], load_tokenizer("debug-qwen2"), max_length=MAXLEN, seed=0)


def make(ds, world, accum, batch=1, rank=0, **kw):
    kw.setdefault("max_length", MAXLEN)
    return StepLoader(
        ds, batch_size=batch, gradient_accumulation_steps=accum, rank=rank, world_size=world, seed=5, **kw
    )


def fingerprint(mb):
    """Documents of a micro-batch as tuples of token ids (order-free comparison within a step)."""
    docs = []
    flat = mb["input_ids"].flatten()
    labels = mb["labels"].flatten()
    cu = mb["cu_seqlens"].tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        if (labels[s:e] != -100).any():
            docs.append(tuple(flat[s:e].tolist()))
    return docs


def run_epoch(ds, world, accum, batch=1, epoch=0, **kw):
    """Per step: the sorted documents over all ranks, and the micro-batch count of each rank."""
    loaders = [make(ds, world, accum, batch, rank=r, **kw) for r in range(world)]
    for ld in loaders:
        ld.set_epoch(epoch)
    steps = []
    for per_rank in zip(*loaders):
        assert {len(mbs) for mbs in per_rank} == {accum}
        steps.append(sorted(d for mbs in per_rank for mb in mbs for d in fingerprint(mb)))
    return steps


@pytest.mark.parametrize("packing", [True, False])
def test_rank_and_accumulation_split_do_not_change_step_contents(ds, packing):
    kw = {"packing": packing, "max_length": 4096 if packing else MAXLEN}
    a = run_epoch(ds, 1, 4, **kw)
    b = run_epoch(ds, 2, 2, **kw)
    c = run_epoch(ds, 4, 1, **kw)
    assert a == b == c and len(a) >= 2
    all_docs = sorted(d for step in a for d in step)
    assert len(all_docs) == len(ds)  # every sample once per epoch
    assert run_epoch(ds, 2, 2, epoch=1, **kw) != b  # reshuffled each epoch


def test_micro_batch_layout_and_filler_rows(ds):
    ld = make(ds, 2, 2, batch=2, rank=1, max_length=4096)
    n_rows = len(ld._plan(0))
    assert n_rows % ld.global_batch != 0  # the last step is partial and gets fillers
    steps = list(ld)
    assert len(steps) == -(-n_rows // 8)
    for mbs in steps:
        for mb in mbs:
            B, T = mb["input_ids"].shape
            assert B == 2 and mb["cu_seqlens"][-1] == B * T and T <= 4096
            assert mb["num_target_tokens"] == int((mb["labels"] != -100).sum())
            assert mb["position_ids"].dtype == torch.long and mb["cu_seqlens"].dtype == torch.int32
    assert 0.9 < ld.packing_efficiency() <= 1.0
    last = make(ds, 2, 2, batch=2, rank=1, max_length=4096, drop_last=True)
    assert len(last) == n_rows // 8


def test_unpacked_rows_and_fixed_length(ds):
    ld = make(ds, 1, 2, batch=3, packing=False, pad_to="max_length")
    mb = next(iter(ld))[0]
    assert mb["input_ids"].shape == (3, MAXLEN) and len(mb["doc_lengths"]) == 3
    ld = make(ds, 1, 2, batch=3, packing=False)
    mb = next(iter(ld))[0]
    assert mb["input_ids"].shape[1] == max(mb["doc_lengths"])


def test_too_small_dataset_is_a_clear_error(tmp_path, ds):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        make(ds, 8, 8, batch=4, drop_last=True)
    assert len(make(ds, 8, 8, batch=4)) == 1  # drop_last=False: one step, mostly filler rows


def test_exact_resume_mid_epoch_and_across_epochs(ds):
    def collect(ld, n):
        out = []
        it = iter(ld)
        for _ in range(n):
            try:
                out.append(next(it))
            except StopIteration:
                ld.set_epoch(ld.epoch)  # next epoch already selected by the loader
                it = iter(ld)
                out.append(next(it))
        return out

    ref_loader = make(ds, 2, 2, rank=1, max_length=4096)
    per_epoch = len(ref_loader)
    total = per_epoch * 2 + 1
    ref = collect(ref_loader, total)
    for cut in (1, per_epoch - 1, per_epoch, per_epoch + 2):
        first = make(ds, 2, 2, rank=1, max_length=4096)
        collect(first, cut)
        state = first.state_dict()
        resumed = make(ds, 2, 2, rank=1, max_length=4096)
        resumed.load_state_dict(state)
        resumed.set_epoch(state["epoch"])
        got = collect(resumed, total - cut)
        assert len(got) == len(ref[cut:]) == total - cut
        for a, b in zip(got, ref[cut:]):
            assert len(a) == len(b) == 2  # accumulation steps of this rank
            for x, y in zip(a, b):
                assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    with pytest.raises(ValueError, match="global_batch"):
        make(ds, 1, 2, max_length=4096).load_state_dict(state)


def test_workers_produce_the_same_batches(tmp_path):
    tok = load_tokenizer("debug-glm4")
    lazy = build_dataset([DEMO], tok, max_length=MAXLEN, seed=0, lazy_tokenize=True, cache_dir=str(tmp_path))
    eager = build_dataset([DEMO], tok, max_length=MAXLEN, seed=0)
    a = list(make(lazy, 1, 2, num_workers=2, max_length=4096))
    b = list(make(eager, 1, 2, num_workers=0, max_length=4096))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for p, q in zip(x, y):
            for key in ("input_ids", "labels", "position_ids", "cu_seqlens"):
                assert torch.equal(p[key], q[key])
            assert p["doc_lengths"] == q["doc_lengths"]
    assert np.all(lazy.lengths == eager.lengths)
    # Starting a worker iterator leaves the global torch RNG alone (NEFTune's noise stream, exact resume).
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    next(iter(make(lazy, 1, 2, num_workers=1, max_length=4096)))
    assert torch.equal(torch.rand(3), want)


def test_ranks_are_dealt_by_cost():
    """8 ranks x 8 micro-batches of packed LongWriter-like rows: rows of equal tokens differ ~2x in
    attention cost, so dealing by tokens leaves the slowest rank ~8% ahead of the mean at every
    accumulation step; dealing by cost (tokens + ATTENTION_WEIGHT * sum L^2) far less. Every row is dealt
    once, and the dealing is a function of the step's rows alone (the same on every rank, on resume)."""
    from test_data_packing import longwriter_like

    from engine.data import pack_lengths
    from engine.data.loader import deal_rows

    lengths = longwriter_like(2000, 300, seed=0)
    plan = pack_lengths(lengths, 28672, seed=0)
    G, world = 64, 8
    by_tokens, by_cost = [], []
    for k in range(len(plan) // G):
        rows = plan[k * G : (k + 1) * G]
        micro, costs = deal_rows(rows, lengths, 1, None)
        assert sorted(j for m in micro for j in m) == list(range(G))
        assert (micro, costs) == deal_rows([list(r) for r in rows], lengths.copy(), 1, None)
        cost_of = {tuple(m): c for m, c in zip(micro, costs)}
        token_order = deal_rows(rows, lengths, 1, None, attention_weight=0.0)[0]  # the old dealing
        by_tokens.append(cost_spread([cost_of[tuple(m)] for m in token_order], world))
        by_cost.append(cost_spread(costs, world))
    assert len(by_cost) >= 3 and np.mean(by_tokens) > 0.04
    assert np.mean(by_cost) < 0.3 * np.mean(by_tokens)


@pytest.mark.parametrize("world", [1, 2])
def test_loader_reports_the_cost_spread_of_each_step(ds, world, monkeypatch):
    ld = make(ds, world, 2, batch=2, max_length=4096)
    spreads = ld.cost_spreads(0)
    want = [cost_spread(ld.deal(rows)[1], world) for rows in ld._steps(0)]

    def deal_again(rows):
        raise AssertionError("the main process dealt a step again (the epoch's spreads are known)")

    monkeypatch.setattr(ld, "deal", deal_again)
    seen = []
    for _ in ld:
        seen.append(ld.last_cost_spread)
    assert seen == spreads.tolist() == want and len(seen) == len(ld._steps(0))
    assert np.all(spreads >= 0) and (np.any(spreads > 0) if world > 1 else not np.any(spreads))


@pytest.mark.parametrize("pairs", [False, True], ids=["sft", "dpo"])
def test_dealt_cost_is_that_of_the_collated_micro_batches(ds, tmp_path, pairs):
    """A micro-batch's cost = B * T + ATTENTION_WEIGHT * sum of its attention segments' squared lengths,
    the segments being what collate_rows builds: a DPO pair's chosen and rejected documents apart (c^2 + r^2,
    not (c + r)^2) and each row's padding."""
    from test_data_preference import _pairs, write_jsonl

    from engine.data.loader import ATTENTION_WEIGHT
    from engine.data.preference import PAIR_FORMAT

    if pairs:
        path = write_jsonl(tmp_path / "p.jsonl", _pairs(40))
        ds = build_dataset([path], load_tokenizer("debug-qwen2"), max_length=400, row_format=PAIR_FORMAT)
    max_length = 400 if pairs else 4096
    ld = make(ds, 1, 2, batch=2, max_length=max_length)
    steps = ld._steps(0)
    n_docs = 0
    for k, micro_batches in enumerate(ld):
        for mb, cost in zip(micro_batches, ld.deal(steps[k])[1], strict=True):
            B, T = mb["input_ids"].shape
            segments = np.diff(mb["cu_seqlens"].numpy()).astype(np.int64)
            assert cost == pytest.approx(B * T + ATTENTION_WEIGHT * int((segments**2).sum()), rel=1e-12)
            n_docs += len(mb["doc_lengths"])
    assert n_docs == len(ds) * (2 if pairs else 1)  # every document was costed, a pair as two

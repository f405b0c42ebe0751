"""Preference pairs: row formats, masks equal to SFT's on the final reply, errors naming file/line/field,
pairs packed and dealt out as a unit, truncation of a pair, lazy = eager."""

import json

import numpy as np
import pytest

from engine.data import StepLoader, build_dataset, load_tokenizer
from engine.data.chat import encode_conversations
from engine.data.preference import PAIR_FORMAT, last_reply_mask, normalize_pair


@pytest.fixture(scope="module", params=["debug-qwen2", "debug-glm4"])
def tok(request):
    return load_tokenizer(request.param)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def swift(q, good, bad, **extra):
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": good}]
    return {"messages": msgs, "rejected_response": bad, **extra}


HISTORY = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
HISTORY += [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "A haiku on tea?"}]


def test_ms_swift_and_trl_rows_give_the_same_pair():
    chosen = [*HISTORY, {"role": "assistant", "content": "Green leaves steep."}]
    rejected = [*HISTORY, {"role": "assistant", "content": "No."}]
    want = [chosen, rejected]
    rows = [
        {"messages": chosen, "rejected_response": "No.", "id": 7},
        {"prompt": HISTORY, "chosen": [chosen[-1]], "rejected": [rejected[-1]], "id": 7},
    ]
    for r in rows:
        assert normalize_pair(r) == (want, {"id": 7})
    one_turn = {"prompt": "Q?", "chosen": "yes", "rejected": "no"}
    assert normalize_pair(one_turn)[0][1] == [
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": "no"},
    ]


def test_only_the_final_reply_is_trainable_with_sfts_mask(tok):
    """The chosen document is the SFT encoding of the chosen conversation, its mask cut to the last reply:
    the history's assistant turn is context, the final reply and its end token are the response."""
    (chosen, rejected), _ = normalize_pair({"prompt": HISTORY, "chosen": "Green leaves.", "rejected": "No."})
    ds_docs = PAIR_FORMAT.encode(tok, [chosen, rejected])
    for conv, (ids, mask) in zip((chosen, rejected), ds_docs):
        ((sft_ids, sft_mask),) = encode_conversations(tok, [conv])
        np.testing.assert_array_equal(ids, sft_ids)
        assert sft_mask.sum() > mask.sum() > 0  # SFT also trains the history's reply
        assert not (mask & ~sft_mask).any()  # a subset of SFT's trainable tokens ...
        last = np.flatnonzero(mask)
        assert (sft_mask[last[0] : last[-1] + 1]).all() and not mask[: last[0]].any()  # ... the last run
        text = tok.decode(ids[mask].tolist())  # the final reply (plus the template's end token)
        assert conv[-1]["content"] in text and "Hello!" not in text
    np.testing.assert_array_equal(
        last_reply_mask(np.array([0, 1, 1, 0, 0, 1, 1, 0], bool)), [0] * 5 + [1, 1, 0]
    )
    assert not last_reply_mask(np.zeros(3, bool)).any()


BAD = [
    ({"prompt": "q", "chosen": "a"}, "rejected", "missing"),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, "rejected", "empty response"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "chosen", "string"),
    (
        {"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
        "chosen[0].role",
        "assistant",
    ),
    ({"prompt": "q", "chosen": [], "rejected": "b"}, "chosen", "exactly one"),
    (
        {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
        "prompt[0].role",
        "user",
    ),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "prompt[0].content", "missing"),
    (swift("q", "a", 5), "rejected_response", "string"),
    (swift("q", "a", ""), "rejected_response", "empty"),
    (
        {"messages": [{"role": "user", "content": "q"}], "rejected_response": "b"},
        "messages[0].role",
        "assistant",
    ),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        "rejected_response",
        "",
    ),
]


@pytest.mark.parametrize("bad, field, message", BAD)
def test_bad_rows_name_file_line_and_field(tmp_path, bad, field, message):
    tok = load_tokenizer("debug-qwen2")
    path = write_jsonl(tmp_path / "p.jsonl", [swift("q1", "a1", "b1"), bad, swift("q3", "a3", "b3")])
    with pytest.raises(
        ValueError, match=rf"p\.jsonl:2: field '{__import__('re').escape(field)}': .*{message}"
    ):
        build_dataset([path], tok, max_length=512, row_format=PAIR_FORMAT)
    ds = build_dataset([path], tok, max_length=512, row_format=PAIR_FORMAT, check_dataset_strategy="warning")
    assert len(ds) == 2 and ds.report["invalid"] == 1 and f"{path}:2:" in ds.summary()


def _pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        swift(f"Write {i}", "g" * int(rng.integers(5, 60)), "b" * int(rng.integers(5, 60)), i=i)
        for i in range(n)
    ]


def test_pairs_pack_as_a_unit_chosen_then_rejected(tmp_path):
    tok = load_tokenizer("debug-qwen2")
    ds = build_dataset(
        [write_jsonl(tmp_path / "p.jsonl", _pairs(23))], tok, max_length=400, row_format=PAIR_FORMAT
    )
    assert (ds.lengths == [sum(len(d[0]) for d in ds.documents(i)) for i in range(len(ds))]).all()
    seen = []
    for world in (1, 2):
        loaders = [
            StepLoader(
                ds,
                max_length=400,
                batch_size=2,
                gradient_accumulation_steps=2,
                rank=r,
                world_size=world,
                seed=3,
            )
            for r in range(world)
        ]
        for steps in zip(*loaders):
            for mb in (mb for rank_mbs in steps for mb in rank_mbs):
                assert len(mb["doc_lengths"]) == 2 * len(mb["samples"])
                ids, labels, cu = mb["input_ids"].flatten(), mb["labels"].flatten(), mb["cu_seqlens"].tolist()
                real = [ids[s:e].tolist() for s, e in zip(cu[:-1], cu[1:]) if (labels[s:e] != -100).any()]
                for p, i in enumerate(mb["samples"]):  # chosen at 2p, rejected at 2p + 1, same micro-batch
                    want = [d[0].tolist() for d in ds.documents(i)]
                    assert real[2 * p : 2 * p + 2] == want
                    seen.append((world, i))
    for world in (1, 2):
        assert sorted(i for w, i in seen if w == world) == list(range(len(ds)))
    plan_rows = StepLoader(
        ds, max_length=400, batch_size=1, gradient_accumulation_steps=1, rank=0, world_size=1, seed=3
    )
    assert max(len(r) for r in plan_rows._plan(0)) > 1  # several pairs share a packed row: a real boundary


def test_truncate_a_pair_shares_the_budget(tmp_path):
    tok = load_tokenizer("debug-qwen2")
    rows = [swift("q", "g" * 300, "b" * 20), swift("q", "g" * 300, "b" * 300), swift("q", "g" * 10, "b" * 10)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    ds = build_dataset([path], tok, max_length=200, row_format=PAIR_FORMAT)
    assert len(ds) == 1 and ds.report["over_length_deleted"] == 2
    ds = build_dataset([path], tok, max_length=200, row_format=PAIR_FORMAT, truncation_strategy="truncate")
    assert len(ds) == 3 and ds.report["truncated"] == 2
    (c0, r0), (c1, r1) = ds.documents(0), ds.documents(1)
    assert len(c0[0]) + len(r0[0]) == 200 and len(r0[0]) == len(
        encode_conversations(tok, [normalize_pair(rows[0])[0][1]])[0][0]
    )
    assert len(c1[0]) == len(r1[0]) == 100  # both over half: each keeps half
    for _, labels in (c0, r0, c1, r1):
        assert (labels != -100).any() and labels[-1] == -100


def test_lazy_pairs_equal_eager(tmp_path):
    tok = load_tokenizer("debug-glm4")
    path = write_jsonl(tmp_path / "p.jsonl", _pairs(9))
    eager = build_dataset([path], tok, max_length=400, row_format=PAIR_FORMAT)
    lazy = build_dataset(
        [path], tok, max_length=400, row_format=PAIR_FORMAT, lazy_tokenize=True, cache_dir=str(tmp_path / "c")
    )
    again = build_dataset(
        [path], tok, max_length=400, row_format=PAIR_FORMAT, lazy_tokenize=True, cache_dir=str(tmp_path / "c")
    )
    assert lazy.fingerprint == eager.fingerprint == again.fingerprint
    for i in range(len(eager)):
        for (a, la), (b, lb) in zip(eager.documents(i), again.documents(i)):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(la, lb)
    # the same file as SFT rows: another fingerprint, and another length-cache entry ([n, 1] lengths, not [n, 2])
    sft = build_dataset([path], tok, max_length=400, lazy_tokenize=True, cache_dir=str(tmp_path / "c"))
    assert len(list((tmp_path / "c").iterdir())) == 2
    assert sft.fingerprint != eager.fingerprint and len(sft.documents(0)) == 1
    np.testing.assert_array_equal(sft.arrays(0)[0], eager.documents(0)[0][0])  # chosen = the SFT conversation

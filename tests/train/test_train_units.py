"""Unit tests of the trainer's pieces: config parsing, LR schedule, parameter groups, NEFTune, activation
checkpointing, long-ce invariance to the micro-batch split, memory plan."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import parse_config
from engine.memory import plan_memory
from engine.models import FLAVOURS, build_model
from engine.objectives import SFTObjective
from engine.optim import build_scheduler, lr_lambda, param_groups
from engine.parallel import apply_activation_checkpointing, apply_neftune, neftune_scale, token_doc_lengths

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")  # one_thread and pg: tests/conftest.py


# ------------------------------------------------------------------ config
def test_config_file_then_command_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "dataset: [a.jsonl, 'b.jsonl#5']\nlearning_rate: 1.0e-5\noptim:\n  warmup_ratio: 0.1\npacking: false\n"
    )
    cfg = parse_config(
        ["--config", str(f), "--learning_rate", "2e-6", "--gradient_checkpointing", "--seed=7"]
    )
    assert cfg.data.dataset == ["a.jsonl", "b.jsonl#5"] and not cfg.data.packing
    assert cfg.optim.learning_rate == 2e-6 and cfg.optim.warmup_ratio == 0.1
    assert cfg.train.gradient_checkpointing and cfg.train.seed == 7
    t = tmp_path / "c.toml"
    t.write_text('dataset = ["a.jsonl"]\n[train]\nloss_name = "mean"\n')
    assert parse_config(["--config", str(t)]).train.loss_name == "mean"
    swift = parse_config(["--dataset", "a", "--torch_dtype", "bf16", "--save_total_limit", "-1"])
    assert swift.model.torch_dtype == "bfloat16" and swift.checkpoint.save_total_limit is None


# every ms-swift `sft` flag issue 5 names (plus the data flags of issue 4): present, and settable from the CLI
ISSUE_FLAGS = {
    "model": "debug-glm4", "dataset": "a.jsonl", "val_dataset": "v.jsonl", "max_length": "1024",
    "packing": "false", "batch_size": "2", "gradient_accumulation_steps": "3", "num_train_epochs": "1.5",
    "max_steps": "7", "learning_rate": "2e-6", "lr_scheduler_type": "linear", "warmup_ratio": "0.05",
    "weight_decay": "0.01", "max_grad_norm": "0.3", "gradient_checkpointing": "false",
    "neftune_noise_alpha": "5", "loss_name": "mean", "torch_dtype": "fp32", "seed": "3",
    "output_dir": "o", "save_steps": "9", "save_total_limit": "2", "save_only_model": "true",
    "resume_from_checkpoint": "latest", "resume_only_model": "true", "eval_steps": "4",
    "logging_steps": "2", "report_to": "tensorboard", "lazy_tokenize": "true", "dataloader_num_workers": "1",
    "truncation_strategy": "truncate", "check_dataset_strategy": "warning",
}  # fmt: skip


def test_every_flag_of_the_issues_exists():
    argv = [x for k, v in ISSUE_FLAGS.items() for x in (f"--{k}", v)]
    cfg = parse_config(argv)
    flat = {k: v for group in cfg.to_dict().values() for k, v in group.items()}
    assert flat["max_length"] == 1024 and flat["packing"] is False and flat["num_train_epochs"] == 1.5
    assert flat["torch_dtype"] == "float32" and flat["report_to"] == ["tensorboard"]
    assert flat["val_dataset"] == ["v.jsonl"] and flat["resume_only_model"] is True
    assert set(ISSUE_FLAGS) <= set(flat)
    # A split of --dataset is the other source of a validation set (both together are refused).
    assert parse_config(["--dataset", "a", "--split_dataset_ratio", "0.02"]).data.split_dataset_ratio == 0.02


@pytest.mark.parametrize(
    "text, argv, match",
    [
        ("dataset: a\nlearnin_rate: 1\n", [], "unknown key 'learnin_rate' in config file"),
        ("dataset: a\nbatch_size: 1.5\n", [], "'batch_size' .*config file"),
        ("dataset: a\n", ["--loss_name", "ce"], "'loss_name'.*long-ce, sequence, mean"),
        ("dataset: a\n", ["--template", "qwen3"], "'template'.*qwen2_5.*longwriter"),
        ("dataset: a\n", ["--warmup_ratio", "2"], "'warmup_ratio'"),
        ("dataset: a\n", ["--no_such_flag", "1"], "unknown flag --no_such_flag"),
        ("dataset: a\n", ["--gradient_checkpointing", "maybe"], "'gradient_checkpointing'"),
        ("learning_rate: 1e-5\n", [], "'dataset'"),
        ("dataset: a\nval_dataset: b\n", ["--split_dataset_ratio", "0.1"], "'split_dataset_ratio'.*not both"),
        ("dataset: a\n", ["--profile_steps", "3,2"], "'profile_steps'.*1 <= A <= B"),
        ("dataset: a\n", ["--profile_steps", "x"], "'profile_steps'"),
        ("dataset: a\n", ["--save_on_sigterm", "half"], "'save_on_sigterm'.*full, model, none"),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, argv, match):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ValueError, match=match):
        parse_config(["--config", str(f), *argv])


def test_example_configs_parse():
    files = sorted((REPO / "examples").glob("*.yaml")) + sorted((REPO / "examples").glob("*.toml"))
    assert len(files) >= 3
    for f in files:
        cfg = parse_config(["--config", str(f)])
        assert cfg.data.dataset
    main = parse_config(["--config", str(REPO / "examples/longwriter_qwen2_7b.yaml")])
    assert (main.data.max_length, main.optim.learning_rate, main.optim.warmup_ratio) == (28672, 1e-5, 0.1)
    assert main.train.loss_name == "long-ce" and main.train.neftune_noise_alpha == 5
    assert main.train.gradient_accumulation_steps == 64 and main.train.gradient_checkpointing
    anneal = parse_config(["--config", str(REPO / "examples/longwriter_qwen2_7b_anneal.yaml")])
    assert anneal.optim.learning_rate == 2e-6 and anneal.checkpoint.resume_only_model
    for cfg in (
        parse_config(["--config", str(f)]) for f in files if f.suffix == ".yaml"
    ):  # the published recipe
        assert (cfg.optim.adam_beta1, cfg.optim.adam_beta2, cfg.optim.weight_decay) == (0.9, 0.95, 0.1)
    llama = parse_config(["--config", str(REPO / "examples/longwriter_llama3_1_8b.yaml")])
    assert llama.model.template == "longwriter" and llama.train.loss_name == "sequence" and llama.data.packing
    assert llama.data.dataset == ["data/longwriter-6k.jsonl", "data/general_sft.jsonl#120000"]  # 1:20 with 6k


# ------------------------------------------------------------------ optimizer and schedule
@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_lr_schedule_matches_transformers(kind):
    tf = pytest.importorskip("transformers")
    total, ratio = 37, 0.1
    p = torch.nn.Parameter(torch.zeros(1))
    ours = build_scheduler(torch.optim.SGD([p], lr=1.0), kind=kind, warmup_ratio=ratio, total_steps=total)
    warm = math.ceil(ratio * total)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = tf.get_scheduler(kind if kind != "constant" else "constant_with_warmup", ref_opt, warm, total)
    for _ in range(total):
        assert ours.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], abs=1e-12)
        ours.optimizer.step(), ours.step(), ref_opt.step(), ref.step()
    assert lr_lambda(0, kind="cosine", warmup_steps=4, total_steps=10) == 0.0
    assert lr_lambda(4, kind="cosine", warmup_steps=4, total_steps=10) == 1.0


def test_param_groups_follow_hf_trainer():
    model = build_model("debug-qwen2", device="meta")
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert all(n.endswith("bias") or "norm" in n for n in nd) and "model.norm.weight" in nd
    assert "model.embed_tokens.weight" in d and "model.layers.0.self_attn.q_proj.weight" in d
    assert not any(n.endswith("bias") or "norm" in n for n in d)
    assert len(d) + len(nd) == len(list(model.parameters()))


# ------------------------------------------------------------------ NEFTune
@torch.no_grad()
def test_neftune_scale_per_document():
    torch.manual_seed(0)
    model = build_model("debug-qwen2")
    apply_neftune(model, alpha=5.0)
    captured = {}
    model.model.embed_tokens.register_forward_hook(lambda m, i, o: captured.__setitem__("x", o))
    lens = [10, 200, 46]  # one packed row of 3 documents, T = 256
    ids = torch.randint(0, 256, (1, sum(lens)))
    cu = torch.tensor([0, 10, 210, 256], dtype=torch.int32)
    clean = model.model.embed_tokens.weight[ids]
    model.train()
    model(ids, cu_seqlens=cu, max_seqlen=200)
    noise = (captured["x"] - clean)[0]  # (T, d)
    d = model.args.hidden_size
    start = 0
    for n in lens:
        bound = 5.0 / math.sqrt(n * d)
        chunk = noise[start : start + n].abs()
        assert chunk.max() <= bound * (1 + 1e-5) and chunk.max() > 0.9 * bound  # uniform(-s, s) of its own L
        assert chunk.mean() == pytest.approx(bound / 2, rel=0.15)
        start += n
    model.eval()
    model(ids, cu_seqlens=cu, max_seqlen=200)
    torch.testing.assert_close(captured["x"], clean)  # training only
    # position_ids give the same per-token lengths as cu_seqlens; a row start always starts a document
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    per_token = torch.repeat_interleave(torch.tensor(lens), torch.tensor(lens))
    assert torch.equal(token_doc_lengths((1, 256), cu_seqlens=cu), per_token)
    assert torch.equal(token_doc_lengths((1, 256), position_ids=pos), per_token)
    two_rows = torch.tensor([[0, 1, 2, 0], [4, 5, 0, 1]])  # row 2 continues no document of row 1
    assert token_doc_lengths((2, 4), position_ids=two_rows).tolist() == [3, 3, 3, 1, 2, 2, 2, 2]
    assert neftune_scale(per_token, 64, 5.0).shape == (256,)


# ------------------------------------------------------------------ activation checkpointing
def _loss_and_grads(model, ids, labels):
    from torch.utils.flop_counter import FlopCounterMode

    model.zero_grad()
    loss = model(ids, labels=labels)
    with FlopCounterMode(display=False) as fc:
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, fc.get_total_flops()


def test_activation_checkpointing_same_grads_and_recompute_flops():
    torch.manual_seed(0)
    ref = build_model("debug-qwen2")
    ac = build_model("debug-qwen2")
    ac.load_state_dict(ref.state_dict())
    assert apply_activation_checkpointing(ac, every=1) == [0, 1]
    ids = torch.randint(0, 256, (2, 64))
    labels = torch.randint(0, 256, (2, 64))
    l_ref, g_ref, f_ref = _loss_and_grads(ref, ids, labels)
    l_ac, g_ac, f_ac = _loss_and_grads(ac, ids, labels)
    assert torch.equal(l_ref, l_ac)
    for n, g in g_ref.items():
        torch.testing.assert_close(g_ac[n.replace("layers.0.", "layers.0._checkpoint_wrapped_module.").replace(
            "layers.1.", "layers.1._checkpoint_wrapped_module.")], g, rtol=0, atol=0)  # fmt: skip
    # backward now re-runs each block's forward: the extra FLOPs equal the blocks' forward FLOPs
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        x = torch.randn(2, 64, ref.args.hidden_size)
        for layer in ref.model.layers:
            from engine.models.attention import make_attn_meta
            from engine.models.layers import rotary_cos_sin

            a = ref.args
            rope = rotary_cos_sin(
                torch.arange(64).expand(2, 64), a.rotary_dim, a.rope_theta, a.rope_layout, x.dtype
            )
            layer(x, rope, make_attn_meta(ref.attn_impl, 2, 64, None, None))
    # non-reentrant checkpoint stops recomputing once the last tensor backward needs is back (early stop), so
    # the final down_proj of each block is not redone: 3/4 of these blocks' matmul FLOPs < extra <= all of them
    extra, fwd = f_ac - f_ref, fc.get_total_flops()
    assert 0.75 * fwd <= extra <= fwd
    # every 2nd block: only block 0 is wrapped, half the recompute
    half = build_model("debug-qwen2")
    half.load_state_dict(ref.state_dict())
    assert apply_activation_checkpointing(half, every=2) == [0]
    assert _loss_and_grads(half, ids, labels)[2] - f_ref == extra // 2


# ------------------------------------------------------------------ long-ce invariance
def _micro(docs_per_row, seed=0):

    g = torch.Generator().manual_seed(seed)
    rows = []
    for lens in docs_per_row:
        row = []
        for n in lens:
            ids = torch.randint(0, 256, (n,), generator=g).numpy()
            lab = ids.copy()
            lab[: n // 3] = -100  # a prompt part without targets
            row.append((ids, lab))
        rows.append(row)
    return rows


@pytest.mark.parametrize("loss_name", ["long-ce", "mean"])
def test_long_ce_invariant_to_micro_batch_split(pg, loss_name):
    from engine.data import collate_rows
    from engine.step import forward_backward

    torch.manual_seed(0)
    model = build_model("debug-qwen2")
    rows = _micro([[5, 30], [80], [3, 3, 9], [40, 41]])  # very different target counts per row

    def run(split):
        model.zero_grad()
        mbs = [collate_rows(rows[i : i + split], pad_token_id=0) for i in range(0, 4, split)]
        out = forward_backward(model, mbs, SFTObjective(loss_name), device=torch.device("cpu"))
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    (o1, g1), (o4, g4) = run(4), run(1)
    assert o1["metrics"]["num_tokens"] == o4["metrics"]["num_tokens"] > 0
    same = all(torch.allclose(g1[n], g4[n], rtol=1e-5, atol=1e-7) for n in g1)
    if loss_name == "long-ce":
        assert o4["loss"] == pytest.approx(o1["loss"], rel=1e-6) and same
        # and it is the token mean of the whole batch
        big = collate_rows(rows, pad_token_id=0)
        with torch.no_grad():
            ref = model(
                big["input_ids"],
                big["position_ids"],
                big["cu_seqlens"],
                big["max_seqlen"],
                labels=big["labels"],
            )
        assert o1["loss"] == pytest.approx(ref.item() / big["num_target_tokens"], rel=1e-6)
    else:  # the per-micro-batch mean weighs short rows' tokens more: the split changes the result
        assert o4["loss"] != pytest.approx(o1["loss"], rel=1e-3) and not same


def test_sequence_loss_weighs_every_document_the_same(pg):
    """--loss_name sequence (THUDM's pack loss): the mean over the step's documents of each document's mean
    token loss, whatever the split into micro-batches (and ranks: the document count is all-reduced)."""
    import functools

    import kernels
    from engine.data import collate_rows
    from engine.step import forward_backward

    torch.manual_seed(0)
    model = build_model("debug-qwen2")
    model.loss_fn = functools.partial(kernels.linear_cross_entropy, reduction="none", impl="torch")
    rows = _micro([[5, 30], [80], [3, 3, 9], [40, 41]])
    filler = [(ids, np.full_like(lab, -100)) for ids, lab in _micro([[12]], seed=1)[0]]

    def run(batches):
        model.zero_grad()
        mbs = [collate_rows(b, pad_token_id=0) for b in batches]
        out = forward_backward(model, mbs, SFTObjective("sequence"), device=torch.device("cpu"))
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    (o1, g1), (o4, g4) = run([rows]), run([[r] for r in rows] + [[filler]])
    assert o4["loss"] == pytest.approx(o1["loss"], rel=1e-6)
    assert all(torch.allclose(g1[n], g4[n], rtol=1e-5, atol=1e-7) for n in g1)
    # the reference: each document alone, its token-mean cross-entropy, averaged over documents
    model.zero_grad()
    docs = [d for row in rows for d in row]
    assert len(docs) == 8 and all((lab != -100).any() for _, lab in docs)
    ref = 0.0
    for ids, lab in docs:
        logits = model(torch.as_tensor(ids)[None].long())[0]
        tgt = torch.as_tensor(lab).long()  # labels as the micro-batch holds them (already aligned)
        ref = ref + torch.nn.functional.cross_entropy(logits.float(), tgt, ignore_index=-100) / len(docs)
    ref.backward()
    assert o1["loss"] == pytest.approx(ref.item(), rel=1e-6)
    assert all(torch.allclose(g1[n], p.grad, rtol=1e-4, atol=1e-7) for n, p in model.named_parameters())


def test_mean_loss_ignores_filler_micro_batches(pg):
    # The loader pads a short last step with all-ignored filler rows: "mean" must average over the
    # micro-batches that have targets only, or the filler would pull the loss and gradients towards 0.
    from engine.data import collate_rows
    from engine.step import forward_backward

    torch.manual_seed(0)
    model = build_model("debug-qwen2")
    rows = _micro([[20], [7, 9]])
    filler = [(ids, np.full_like(lab, -100)) for ids, lab in _micro([[12]], seed=1)[0]]

    def run(batches):
        model.zero_grad()
        mbs = [collate_rows(b, pad_token_id=0) for b in batches]
        out = forward_backward(model, mbs, SFTObjective("mean"), device=torch.device("cpu"))
        return out["loss"], {n: p.grad.clone() for n, p in model.named_parameters()}

    (l2, g2), (l3, g3) = run([rows[:1], rows[1:]]), run([rows[:1], rows[1:], [filler]])
    assert l3 == pytest.approx(l2, rel=1e-6)
    assert all(torch.allclose(g2[n], g3[n], rtol=1e-5, atol=1e-8) for n in g2)


# ------------------------------------------------------------------ memory plan
def test_memory_plan_qwen2_7b_on_4_a100():
    args = FLAVOURS["qwen2-7b"]
    ac = plan_memory(args, world_size=4, tokens_per_micro_batch=28672, gradient_checkpointing=True)
    no_ac = plan_memory(args, world_size=4, tokens_per_micro_batch=28672, gradient_checkpointing=False)
    n = args.num_params()
    assert ac.params == ac.grads == n * 4 / 4 and ac.optimizer == n * 8 / 4
    assert 40 < ac.total / 2**30 < 80 < no_ac.total / 2**30
    # the recipe's comment quotes this plan (what `python -m engine.memory --model qwen2-7b` prints)
    assert f"{ac.gib()['total']:.2f} GiB" in (REPO / "examples/longwriter_qwen2_7b.yaml").read_text()
    torch_loss = plan_memory(args, world_size=4, tokens_per_micro_batch=28672, fused_loss=False)
    assert torch_loss.loss > 30 * 2**30  # 28672 x 152064 logits in bf16 + fp32 copies
    # long-ce's recompute mode: dW (bf16) + dX + at most 256 MiB (engine.memory --loss_recompute)
    low = plan_memory(args, world_size=4, tokens_per_micro_batch=28672, loss_recompute=True)
    dx, dw = 28672 * args.hidden_size * 2, args.vocab_size * args.hidden_size * 2
    assert dx + dw < low.loss <= dx + dw + 256 * 2**20 < ac.loss
    assert "total" in ac.format()


def test_memory_plan_llama3_1_8b_on_8_gpus():
    args = FLAVOURS["llama3.1-8b"]
    plan = plan_memory(args, world_size=8, tokens_per_micro_batch=32768, gradient_checkpointing=True)
    assert 30 < plan.total / 2**30 < 80  # fits an 80 GB GPU
    assert plan.params == args.num_params() * 4 / 8
    assert f"{plan.gib()['total']:.1f} GiB" in (REPO / "examples/longwriter_llama3_1_8b.yaml").read_text()


# ------------------------------------------------------------------ checkpoints on disk
def test_checkpoints_atomic_rotated_and_latest(pg, tmp_path):
    from engine.checkpoint import (
        checkpoint_info,
        list_checkpoints,
        load_checkpoint,
        resolve_resume,
        save_checkpoint,
    )

    torch.manual_seed(0)
    model = build_model("debug-qwen2")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 256, (1, 16)), labels=torch.randint(0, 256, (1, 16))).backward()
    opt.step()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path / f"checkpoint-{step}", model=model, optimizer=opt, rank_state={"step": step},
                        info={"step": step}, save_total_limit=2)  # fmt: skip
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    # a save that died half-way leaves only checkpoint-N.tmp: never listed, never resumed from
    (tmp_path / "checkpoint-9.tmp").mkdir()
    (tmp_path / "checkpoint-9.tmp" / "__0_0.distcp").write_bytes(b"partial")
    assert resolve_resume(tmp_path, "latest").name == "checkpoint-3"
    assert resolve_resume(tmp_path, str(tmp_path)).name == "checkpoint-3"  # a run directory
    assert resolve_resume(tmp_path / "empty", "latest") is None
    with pytest.raises(ValueError, match="not a complete checkpoint|neither"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-9.tmp"))
    # exact round trip of weights and AdamW state
    fresh = build_model("debug-qwen2")
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    state = load_checkpoint(tmp_path / "checkpoint-3", model=fresh, optimizer=fresh_opt)
    assert state == {"step": 3}
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n
        assert torch.equal(opt.state[p]["exp_avg_sq"], fresh_opt.state[q]["exp_avg_sq"])
    # a weights-only checkpoint resumes the weights and this rank's state; the optimizer stays fresh
    save_checkpoint(tmp_path / "checkpoint-4", model=model, optimizer=None, rank_state={"step": 4},
                    info={"step": 4}, thread_count=3)  # fmt: skip
    assert checkpoint_info(tmp_path / "checkpoint-4")["has_optimizer"] is False
    assert len(list((tmp_path / "checkpoint-4").glob("*.distcp"))) == 3  # one file per writer thread
    fresh2 = build_model("debug-qwen2")
    fresh2_opt = torch.optim.AdamW(fresh2.parameters(), lr=1e-3)
    assert load_checkpoint(tmp_path / "checkpoint-4", model=fresh2, optimizer=fresh2_opt) == {"step": 4}
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh2.parameters()))
    assert not fresh2_opt.state
    assert (
        load_checkpoint(tmp_path / "checkpoint-4", model=fresh, optimizer=fresh_opt, only_model=True) is None
    )


def test_sigterm_advice_names_the_launcher_timeout(monkeypatch):
    import engine.checkpoint as ck

    # 12 GB in 10 s (1.2 GB/s) measured; model 4 GB: a full save writes 12 GB (~10 s), weights 4 GB (~3.3 s)
    kw = dict(
        seconds=10.0, nbytes=12_000_000_000, model_bytes=4_000_000_000, micro_batch_s=2.0, name="checkpoint-5"
    )
    full = ck.sigterm_advice(choice="full", **kw)
    assert full.startswith("checkpoint-5: 12.00 GB in 10.0 s (1.20 GB/s)")
    assert "saves ~12.00 GB (~10.0 s)" in full and "wait >= 20 s" in full  # ceil(1.25 * (10 + 2) + 5)
    model = ck.sigterm_advice(choice="model", **kw)
    assert "saves ~4.00 GB (~3.3 s)" in model and "wait >= 12 s" in model
    assert "without saving" in ck.sigterm_advice(choice="none", **kw)
    slow = ck.sigterm_advice(choice="full", **dict(kw, seconds=60.0))  # 0.2 GB/s: a 60 s save
    assert "wait >= 83 s" in slow and "choose --save_on_sigterm model or none" in slow
    monkeypatch.setattr(ck, "_torchrun_shutdown_timeout_flag", lambda: True)
    assert "torchrun --shutdown-timeout 83" in ck.sigterm_advice(choice="full", **dict(kw, seconds=60.0))
    monkeypatch.setattr(ck, "_torchrun_shutdown_timeout_flag", lambda: False)
    assert "fixed 30 s" in ck.sigterm_advice(choice="full", **kw)


# ------------------------------------------------------------------ data wiring of the trainer
def test_defaults_follow_the_issue():
    cfg = parse_config(["--dataset", "a.jsonl"])
    assert cfg.data.max_length == 28672 and cfg.data.check_dataset_strategy == "error"
    assert cfg.train.loss_name == "long-ce" and cfg.data.truncation_strategy == "delete"


def test_build_data_val_by_file_by_ratio_and_lazy_cache(tmp_path):
    from train_testlib import make_dataset

    from engine.data import load_tokenizer
    from engine.parallel import DistInfo
    from engine.train import build_data

    train_f = make_dataset(tmp_path / "train.jsonl", n=40, seed=0)
    val_f = make_dataset(tmp_path / "val.jsonl", n=6, seed=1)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    tok = load_tokenizer("debug-qwen2")
    common = ["--dataset", str(train_f), "--max_length", "256", "--output_dir", str(tmp_path / "out")]
    # by file: the whole train file trains, the val file evaluates
    tr, va = build_data(parse_config([*common, "--val_dataset", str(val_f)]), info, tok)
    assert len(tr.dataset) == 40 and len(va.dataset) == 6
    assert {va.dataset.metadata(i)["_file"] for i in range(6)} == {str(val_f)}
    # by ratio: 10% of the train file held out, disjoint
    tr, va = build_data(parse_config([*common, "--split_dataset_ratio", "0.1"]), info, tok)
    assert (len(tr.dataset), len(va.dataset)) == (36, 4)
    lines = lambda ds: {ds.metadata(i)["_line"] for i in range(len(ds))}  # noqa: E731
    assert not lines(tr.dataset) & lines(va.dataset)
    # neither: no evaluation
    assert build_data(parse_config(common), info, tok)[1] is None
    # lazy: token lengths cached under output_dir/cache (or dataset_cache_dir), reused by the next run
    tr, _ = build_data(parse_config([*common, "--lazy_tokenize"]), info, tok)
    assert tr.dataset.lazy and len(list((tmp_path / "out" / "cache").glob("lengths-*.npz"))) == 1
    other = tmp_path / "shared_cache"
    build_data(parse_config([*common, "--lazy_tokenize", "--dataset_cache_dir", str(other)]), info, tok)
    assert len(list(other.glob("lengths-*.npz"))) == 1


def test_metrics_file_on_resume_drops_later_and_torn_lines(tmp_path):
    import json

    from engine.metrics import MetricsLogger

    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "eval_loss": 2.5}, {"step": 3}]
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"step": 4, "lo'  # killed mid-write
    (tmp_path / "metrics.jsonl").write_text(text)
    log = MetricsLogger(tmp_path, enabled=True, total_steps=4, start_step=2, progress_bar=False)
    log.log({"step": 3, "loss": 1.5, "lr": 1e-5, "tokens_per_s": 1.0})
    log.close()
    got = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert got == [*lines[:3], {"step": 3, "loss": 1.5, "lr": 1e-5, "tokens_per_s": 1.0}]

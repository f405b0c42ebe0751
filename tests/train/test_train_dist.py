"""Multi-process runs through the real launcher (torchrun, gloo on CPU)."""

from __future__ import annotations

import math
import subprocess

import pytest
import torch
from train_testlib import (
    REPO,
    base_args,
    child_env,
    free_port,
    load_final,
    make_dataset,
    make_pairs,
    retry_port_race,
    run_inprocess,
    run_torchrun,
    torchrun_cmd,
    train_steps,
)

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """4 steps of 2 ranks x 2 micro-batches on 15 samples, its final checkpoint-4 and fp32 HF export."""
    root = tmp_path_factory.mktemp("two_ranks")
    data = make_dataset(root / "train15.jsonl", n=15)
    run_torchrun(
        2,
        base_args(data, root / "two", gradient_accumulation_steps=2, save_final=True, final_dtype="float32"),
    )
    return data, root / "two"


@pytest.mark.parametrize("loss_name", ["long-ce", pytest.param("sequence", marks=pytest.mark.slow)])
def test_world_size_invariance(two_ranks, tmp_path, loss_name):
    """1 rank x 4 micro-batches == 2 ranks x 2 micro-batches: losses, clipped global grad norms, weights
    (long-ce: every target token weighs the same; sequence: every document, counted over both ranks).
    max_grad_norm 0.5 makes every step clip, so the DTensor-sharded norm is checked against one process.
    15 samples pack into 13 rows: step 4 holds 1 row and 3 filler rows, so in the 2-rank run rank 1 runs
    two all-filler micro-batches (no target) and must still join every collective."""
    data, two = two_ranks
    one = tmp_path / "one"
    kw = dict(save_final=True, final_dtype="float32", loss_name=loss_name)
    if loss_name != "long-ce":  # the fixture's run is long-ce
        two = tmp_path / "two"
        run_torchrun(2, base_args(data, two, gradient_accumulation_steps=2, **kw))
    run_inprocess(base_args(data, one, gradient_accumulation_steps=4, **kw))
    s1, s2 = train_steps(one), train_steps(two)
    assert len(s1) == len(s2) == 4
    for a, b in zip(s1, s2):
        assert a["num_tokens"] == b["num_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b["tokens_per_s_per_gpu"] == pytest.approx(b["tokens_per_s_global"] / 2)  # 2 ranks
    assert all(r["grad_norm"] > 0.5 for r in s1)  # clipping was exercised
    assert s1[3]["num_tokens"] < min(r["num_tokens"] for r in s1[:3]) / 2  # the partial step with fillers
    w1, w2 = load_final(one), load_final(two)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-5)


def test_dpo_world_size_invariance(tmp_path):
    """DPO, 1 rank x 4 micro-batches with a resident reference == 2 ranks x 2 with the reference log-probs
    precomputed (each rank computes its share of the pass, all-reduced): losses, TRL metrics, clipped grad
    norms, weights. The step's pairs are counted over both ranks before the forwards."""
    data = make_pairs(tmp_path / "pairs.jsonl", n=26)
    one, two = tmp_path / "one", tmp_path / "two"
    kw = dict(rlhf_type="dpo", max_length=512, learning_rate=1e-3, save_final=True, final_dtype="float32")
    run_inprocess(base_args(data, one, gradient_accumulation_steps=4, **kw))
    run_torchrun(
        2, base_args(data, two, gradient_accumulation_steps=2, precompute_ref_log_probs="true", **kw)
    )
    s1, s2 = train_steps(one), train_steps(two)
    assert len(s1) == len(s2) == 4 and s1[0]["loss"] == pytest.approx(math.log(2), abs=1e-12)
    for a, b in zip(s1, s2):
        assert a["pairs"] == b["pairs"] and a["num_tokens"] == b["num_tokens"]
        for k in ("loss", "rewards/accuracies", "logps/chosen", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (a["step"], k)
        # a margin is beta x a difference of log-probs ~1e2: judge it on that scale (fp32 sums of another
        # order after two updates move it by ~1e-7)
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], abs=1e-6), a["step"]
    assert all(r["grad_norm"] > 0.5 for r in s1)  # clipping was exercised
    w1, w2 = load_final(one), load_final(two)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-5)


def test_export_a_two_rank_checkpoint_in_one_process(two_ranks, tmp_path):
    """python -m engine.export on the 2-rank DCP checkpoint, in one process: the same tensors as the run's
    own fp32 final/ export, a directory transformers loads, and its logits equal the engine's."""
    import sys

    transformers = pytest.importorskip("transformers")
    from engine.models import load_pretrained

    _, two = two_ranks
    out = tmp_path / "hf"
    cmd = [sys.executable, "-m", "engine.export", str(two / "checkpoint-4"), str(out), "--dtype", "float32"]
    p = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    from safetensors.torch import load_file

    got, want = load_file(str(out / "model.safetensors")), load_final(two)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    ids = torch.tensor([[257, 72, 101, 108, 108, 111, 258, 10, 257, 33]])
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32)
    ours = load_pretrained(out, dtype=torch.float32, attn_impl="sdpa")
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)
    bad = subprocess.run([sys.executable, "-m", "engine.export", str(two), str(tmp_path / "x")], cwd=REPO,
                         env=child_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "not a complete training checkpoint" in bad.stderr


def test_two_node_launch_trains_a_step(data, tmp_path):
    """Two torchrun agents on one machine, as two nodes of one rank each, meeting at a c10d rendezvous.
    Lazy tokenization: rank 0 measures and caches the token lengths, rank 1 reads its cache."""
    args = base_args(data, tmp_path, max_steps=1, gradient_accumulation_steps=2, lazy_tokenize="true")

    def launch():
        port = free_port()
        procs = []
        for node in (0, 1):
            rdzv = ["--nnodes=2", f"--node_rank={node}", "--rdzv_backend=c10d",
                    f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-node-test"]  # fmt: skip
            procs.append(
                subprocess.Popen(
                    torchrun_cmd(1, args, extra=rdzv),
                    cwd=REPO,
                    env=child_env(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        outs = [p.communicate(timeout=240)[0] for p in procs]
        return [p.returncode for p in procs] == [0, 0], "\n".join(outs), outs

    ok, outs = retry_port_race(launch)
    assert ok, "\n".join(o[-3000:] for o in outs)
    steps = train_steps(tmp_path)
    assert [r["step"] for r in steps] == [1] and steps[0]["num_tokens"] > 0
    assert (tmp_path / "checkpoint-1").is_dir()
    assert len(list((tmp_path / "cache").glob("lengths-*.npz"))) == 1


def sigterm_torchrun(argv: list[str], out) -> tuple[int, str]:
    """Launch 2 ranks under torchrun, SIGTERM the agent once step 1 is logged; (exit code, output)."""
    import signal
    import time

    p = subprocess.Popen(torchrun_cmd(2, argv), cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.time() + 180
    while time.time() < deadline and p.poll() is None:
        if (out / "metrics.jsonl").is_file() and len(train_steps(out)) >= 1:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    log = p.communicate(timeout=120)[0]
    return p.returncode, log


@pytest.mark.slow
def test_sigterm_under_torchrun_then_resume(data, tmp_path):
    """SIGTERM to the torchrun agent mid-run: it forwards the signal, the ranks agree to stop, save a
    checkpoint and exit; `--resume_from_checkpoint latest` then completes the same trajectory as a 1-rank
    uninterrupted run (world-size invariance makes that the reference)."""
    from engine.checkpoint import list_checkpoints

    ref, out = tmp_path / "ref", tmp_path / "run"
    run_inprocess(base_args(data, ref, max_steps=12, gradient_accumulation_steps=4))
    argv = base_args(data, out, max_steps=12, gradient_accumulation_steps=2)
    _, log = sigterm_torchrun(argv, out)
    saved = [s for s, _ in list_checkpoints(out)]
    assert saved and saved[-1] < 12 and not (out / "final").exists(), log[-3000:]
    assert "stopped by SIGTERM" in log
    run_torchrun(2, [*argv, "--resume_from_checkpoint", "latest"])
    s_ref, s_run = train_steps(ref), train_steps(out)
    assert [r["step"] for r in s_run] == list(range(1, 13))
    for a, b in zip(s_ref, s_run):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


@pytest.mark.parametrize("choice", ["full", "model", "none"])
def test_sigterm_under_torchrun_saves_what_save_on_sigterm_says(data, tmp_path, choice):
    """Each --save_on_sigterm choice under the real launcher: the ranks stop together between micro-batches
    and write a full checkpoint, a weights-only one, or none; the first save prints its time and the
    launcher timeout it needs."""
    from engine.checkpoint import checkpoint_info, list_checkpoints

    argv = base_args(data, tmp_path, max_steps=40, gradient_accumulation_steps=2, save_on_sigterm=choice)
    _, log = sigterm_torchrun(argv, tmp_path)
    assert "stopped by SIGTERM" in log, log[-3000:]
    saved = list_checkpoints(tmp_path)
    if choice == "none":
        assert saved == [] and "not saved (--save_on_sigterm none)" in log
        return
    ((step, path),) = saved
    assert 1 <= step < 40 and checkpoint_info(path)["has_optimizer"] is (choice == "full")
    assert checkpoint_info(path)["world_size"] == 2 and len(list(path.glob("rank*.pt"))) == 2
    assert (
        f"--save_on_sigterm {choice}) the run finishes its micro-batch" in log
        and "between SIGTERM and SIGKILL" in log
    )


def test_make_demo(tmp_path):
    """`make demo` (engine.demo): 2 ranks under torchrun, falling loss, a checkpoint, the HF export and the
    one-line summary (one epoch here; the full demo runs 3 in about a minute on 2 cores)."""
    import sys

    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "engine.demo", "--nproc", "2", "--epochs", "1", "--output_dir", str(out)]

    def launch():
        p = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
        return p.returncode == 0, p.stdout + p.stderr, p

    ok, p = retry_port_race(launch)  # torchrun --standalone's free-port race
    assert ok, p.stdout[-3000:] + p.stderr[-3000:]
    summary = p.stdout.strip().splitlines()[-1]
    assert summary.startswith("demo: 2 ranks") and "HF export" in summary
    assert (out / "final" / "model.safetensors").is_file() and list(out.glob("checkpoint-*"))
    assert "train:" in p.stderr  # the tqdm bar of rank 0

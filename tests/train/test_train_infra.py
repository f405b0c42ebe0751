"""The trainer's process setup and what it reports: --ddp_timeout, gloo on several nodes, the CUDA
allocator default, the flight recorder, throughput per GPU and global, MFU in two conventions, memory."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from engine.metrics import matmul_params, memory_record, row_counts, step_flops, throughput
from engine.models import FLAVOURS
from engine.parallel import cuda_allocator_defaults, flight_recorder_env, gloo_multinode_env, init_distributed

REPO = Path(__file__).resolve().parents[2]


def test_ddp_timeout_reaches_the_process_group():
    from engine.config import parse_config

    assert parse_config(["--dataset", "a.jsonl", "--ddp_timeout", "77"]).train.ddp_timeout == 77
    with pytest.raises(ValueError, match="ddp_timeout"):
        parse_config(["--dataset", "a.jsonl", "--ddp_timeout", "0"])
    assert not dist.is_initialized()
    init_distributed(timeout_s=123)
    try:
        backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
        assert backend.options._timeout == datetime.timedelta(seconds=123)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "env, want",
    [
        ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "127.0.0.1"}, None),  # one node
        ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "NCCL_SOCKET_IFNAME": "ib0,eth0"}, "ib0,eth0"),
        ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "GLOO_SOCKET_IFNAME": "eth1"}, None),  # the user's wins
        # an exclusion list is not a name gloo understands: the route to MASTER_ADDR decides (loopback here)
        ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "NCCL_SOCKET_IFNAME": "^docker", "MASTER_ADDR": "127.0.0.1"}, "lo"),
    ],
)  # fmt: skip
def test_gloo_interface_on_several_nodes(env, want):
    before = dict(env)
    assert gloo_multinode_env(env) == want
    assert env.get("GLOO_SOCKET_IFNAME") == (want or before.get("GLOO_SOCKET_IFNAME"))


def test_cuda_allocator_default_respects_the_user():
    env = {}
    assert cuda_allocator_defaults(env) == "expandable_segments:True"
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    for key in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        env = {key: "max_split_size_mb:128"}
        assert cuda_allocator_defaults(env) is None and env == {key: "max_split_size_mb:128"}


def test_flight_recorder_defaults_leave_the_users_settings():
    env = flight_recorder_env("/runs/x/comm_traces", {})
    assert env == {"TORCH_FR_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
                   "TORCH_FR_DUMP_TEMP_FILE": "/runs/x/comm_traces/rank_"}  # fmt: skip
    # set by the user under the older names (or the new ones): not overridden
    user = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "20000", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/tmp/fr_"}
    assert flight_recorder_env("/runs/x", user) == {"TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}
    assert flight_recorder_env("/runs/x", {"TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}).keys() == {
        "TORCH_FR_BUFFER_SIZE", "TORCH_FR_DUMP_TEMP_FILE"}  # fmt: skip
    # the analyser of those dumps ships with torch (both the floor and the current version)
    import torch.distributed.flight_recorder.fr_trace  # noqa: F401


@pytest.mark.gpu
def test_expandable_segments_on_cuda_by_default():
    code = (
        "import os, torch; from engine.parallel import init_distributed; init_distributed();"
        "x = torch.empty(64 << 20, device='cuda');"
        "segs = torch.cuda.memory._snapshot()['segments'];"
        "print(os.environ['PYTORCH_CUDA_ALLOC_CONF'], all(s.get('is_expandable') for s in segs))"
    )
    env = {k: v for k, v in os.environ.items() if "ALLOC_CONF" not in k and k != "RANK"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env, timeout=120
    )
    assert out.stdout.split() == ["expandable_segments:True", "True"], out.stderr[-2000:]
    rec = memory_record(torch.device("cuda"))
    assert {"max_memory_gb", "max_reserved_gb", "alloc_retries", "ooms"} <= rec.keys()


def test_full_attention_convention_is_torchtitans_formula():
    """torchtitan (models/utils get_dense_model_nparams_and_flops) and MPT count 6 x (params without the
    embedding) + 12 x layers x heads x head_dim x seq_len per token; the causal convention halves the
    attention term, and over documents it counts sum L^2 instead of T^2."""
    a = FLAVOURS["qwen2-7b"]
    T = 28672
    titan_per_token = (
        6 * (a.num_params() - a.vocab_size * a.hidden_size) + 12 * a.num_layers * a.num_heads * a.head_dim * T
    )
    assert step_flops(a, 3 * T, 3 * T * T, attention="full") == pytest.approx(
        3 * T * titan_per_token, rel=1e-12
    )
    causal = step_flops(a, T, T * T)
    assert causal == pytest.approx(
        6 * matmul_params(a) * T + 6 * a.num_layers * a.num_heads * a.head_dim * T * T
    )


def test_throughput_per_gpu_global_and_both_mfu():
    a = FLAVOURS["qwen2-7b"]
    # 2 ranks x 1 micro-batch: one packed row of 3 documents each, and an all-filler micro-batch
    mb = {"input_ids": torch.zeros(1, 8192, dtype=torch.long), "doc_lengths": [4000, 3000, 1000]}
    filler = {"input_ids": torch.zeros(1, 1, dtype=torch.long), "doc_lengths": []}
    rows = row_counts([mb, filler])
    assert rows == [8192.0, 8192.0**2]
    res = {"tokens": 2 * 8000, "sum_sq": 2 * (4000**2 + 3000**2 + 1000**2)}
    rows = [2 * rows[0], 2 * rows[1]]  # what the all-reduce over the 2 ranks gives
    out = throughput(a, res, rows, seconds=2.0, world_size=2, peak=989e12)
    assert out["tokens_per_s_global"] == 8000 and out["tokens_per_s_per_gpu"] == 4000
    assert out["mfu_causal"] == pytest.approx(step_flops(a, 16000, res["sum_sq"]) / (2.0 * 989e12 * 2))
    assert out["mfu_full_attn"] == pytest.approx(
        step_flops(a, 16384, 2 * 8192**2, attention="full") / (2.0 * 989e12 * 2)
    )
    assert out["mfu_full_attn"] > 1.2 * out["mfu_causal"]  # the same run reads higher in that convention
    assert "mfu_causal" not in throughput(a, res, rows, 2.0, 2, peak=None)  # CPU: no peak, no MFU
    assert set(memory_record(torch.device("cpu"))) == {"max_memory_gb"}

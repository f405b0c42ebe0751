"""--compile true: every decoder block torch.compiled after activation checkpointing and before FSDP
(torchtitan's order), through the trainer itself, against the same run in eager mode.

The default suite compiles with backend="aot_eager" (dynamo + AOT autograd, the part that a write inside
the checkpointed region used to break; no C++ compile); the inductor run, which compiles C++ on CPU
(about 1-2 minutes on 2 shared cores), is marked slow.
"""

from __future__ import annotations

import pytest
import torch
from train_testlib import base_args, make_dataset, run_inprocess

import engine.parallel as parallel
import engine.step as step_mod
import engine.train as train_mod

STEPS = 3  # x 4 micro-batches of packed rows of varying length and document count


def _run(tmp_path, name: str, backend: str | None) -> dict:
    """Train STEPS steps (full activation checkpointing, the trainer's default); backend None = eager.
    Returns the losses, dynamo's counters and the (T, documents + 1) of every micro-batch."""
    from torch._dynamo.utils import counters

    data = make_dataset(tmp_path / "train.jsonl", n=48)
    shapes = []
    to_device = step_mod.to_device

    def recording(mb, device):
        shapes.append((mb["input_ids"].shape[1], len(mb["cu_seqlens"])))
        return to_device(mb, device)

    torch._dynamo.reset()
    counters.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(step_mod, "to_device", recording)
        if backend is not None:
            mp.setattr(train_mod, "apply_compile", lambda m: parallel.apply_compile(m, backend=backend))
        flags = {"compile": "true"} if backend else {}
        summary = run_inprocess(
            base_args(data, tmp_path / name, max_steps=STEPS, **flags),
            probe=lambda m: m.model.layers[0],
        )
    stats = {k: dict(v) for k, v in counters.items()}
    torch._dynamo.reset()
    return {"losses": summary["losses"], "counters": stats, "shapes": shapes, "layer": summary["probe"]}


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("eager"), "eager", None)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("compiled"), "compiled", "aot_eager")


def test_compile_wraps_checkpointed_blocks_in_order(compiled):
    """Checkpoint wrapper inside, compiled module around it, FSDP on the outside; no graph break (the
    blocks compile with fullgraph=True, so one would have failed the run)."""
    from torch._dynamo.eval_frame import OptimizedModule
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FSDPModule

    layer = compiled["layer"]
    assert isinstance(layer, OptimizedModule) and isinstance(layer, FSDPModule)
    assert isinstance(layer._orig_mod, CheckpointWrapper)
    assert compiled["counters"]["stats"]["calls_captured"] > 0
    assert not compiled["counters"].get("graph_break")


def test_compile_at_most_two_graphs_over_packed_shapes(compiled):
    lengths = {t for t, _ in compiled["shapes"]}
    docs = {d for _, d in compiled["shapes"]}
    assert len(compiled["shapes"]) == 4 * STEPS and len(lengths) >= 4 and len(docs) >= 2  # shapes varied
    assert 1 <= compiled["counters"]["stats"]["unique_graphs"] <= 2


def test_compile_losses_equal_eager(eager, compiled):
    assert eager["shapes"] == compiled["shapes"]
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-5)


@pytest.mark.slow
def test_inductor_losses_equal_eager(eager, tmp_path):
    """fp32 on CPU: inductor's C++ kernels against eager over several steps."""
    inductor = _run(tmp_path, "inductor", "inductor")
    assert inductor["shapes"] == eager["shapes"]
    assert inductor["losses"] == pytest.approx(eager["losses"], rel=1e-5)
    assert 1 <= inductor["counters"]["stats"]["unique_graphs"] <= 2


@pytest.mark.slow
def test_compile_with_selective_checkpointing_and_threshold(tmp_path):
    """The op-level policy (context_fn) and the length threshold traced by dynamo: same losses as eager."""
    data = make_dataset(tmp_path / "train.jsonl", n=48)
    flags = dict(max_steps=2, gradient_checkpointing="selective", gradient_checkpointing_min_tokens=220)
    eager = run_inprocess(base_args(data, tmp_path / "eager", **flags))["losses"]
    torch._dynamo.reset()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "apply_compile", lambda m: parallel.apply_compile(m, backend="aot_eager"))
        compiled = run_inprocess(base_args(data, tmp_path / "compiled", compile="true", **flags))["losses"]
    torch._dynamo.reset()
    assert compiled == pytest.approx(eager, rel=1e-5)

"""examples/hf_trainer_long_ce.py: long-ce as a transformers Trainer loss equals transformers' own loss."""

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

_PATH = Path(__file__).resolve().parents[2] / "examples" / "hf_trainer_long_ce.py"
_spec = importlib.util.spec_from_file_location("hf_trainer_long_ce", _PATH)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


def _batch(n=3):
    ds = example.ToyDataset(n=n)
    rows = [ds[i] for i in range(n)]
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


@pytest.mark.parametrize("num_items", [None, 40])
def test_compute_loss_equals_transformers(num_items):
    model = example.tiny_qwen2()
    batch = _batch()
    # compute_loss uses nothing of the Trainer's state: call it unbound (no accelerate needed here).
    ours = example.LongCETrainer.compute_loss(None, model, batch, num_items_in_batch=num_items)
    g_ours = torch.autograd.grad(ours, list(model.parameters()))
    kw = {} if num_items is None else {"num_items_in_batch": num_items}
    theirs = model(**batch, **kw).loss
    g_theirs = torch.autograd.grad(theirs, list(model.parameters()))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_example_trains_with_the_loss_of_the_stock_trainer(tmp_path):
    """Inside a real Trainer (gradient accumulation 2, so num_items_in_batch is used): the logged losses of
    the first optimizer steps, and hence the updates between them, equal the stock Trainer's."""
    pytest.importorskip("accelerate")  # transformers' Trainer needs it
    losses = example.main(["--steps", "3", "--output_dir", str(tmp_path / "ours")])
    theirs = example.main(["--steps", "3", "--output_dir", str(tmp_path / "hf"), "--baseline"])
    assert len(losses) == 3 and all(l == l and l > 0 for l in losses)  # noqa: E741
    assert losses == pytest.approx(theirs, rel=1e-4)
    assert losses[0] != losses[-1]  # the steps really updated the model

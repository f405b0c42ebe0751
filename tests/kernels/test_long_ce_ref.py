"""The PyTorch twin (impl="torch") against the fp64 definition, plus API behaviour shared by both impls."""

import subprocess
import sys

import pytest
import torch
from long_ce_testlib import check_against_fp64, loss_and_grads, make_inputs

import kernels
from kernels import LinearCrossEntropy, linear_cross_entropy, naive_linear_cross_entropy
from kernels.long_ce_chunked import CUDA_CHUNK_ROWS, compact_rows, plan_chunk_rows
from kernels.long_ce_ref import LongCEOptions

SHAPES = [(1, 1, 2), (37, 31, 123), (252, 123, 507)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_twin_matches_fp64(shape, dtype, reduction):
    n, h, v = shape
    hidden, weight, labels, _ = make_inputs(n, h, v, dtype, seed=n + v)
    # A small chunk_rows forces several chunks (and a ragged last one) at every shape.
    check_against_fp64(hidden, weight, labels, None, impl="torch", reduction=reduction, chunk_rows=7)


OPTIONS = [
    dict(label_smoothing=0.1),
    dict(z_loss=1e-3),
    dict(softcap=3.0),
    dict(label_smoothing=0.2, z_loss=1e-2, softcap=5.0, reduction="mean"),
    dict(ignore_index=7),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", OPTIONS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_twin_options(dtype, kw):
    hidden, weight, labels, bias = make_inputs(
        61, 40, 203, dtype, seed=3, bias=True, ignore_index=kw.get("ignore_index", -100)
    )
    check_against_fp64(hidden, weight, labels, bias, impl="torch", chunk_rows=16, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_twin_peaked(dtype, reduction):
    hidden, weight, labels, _ = make_inputs(64, 48, 300, dtype, seed=5, peaked=True, ignore_frac=0.0)
    check_against_fp64(hidden, weight, labels, None, impl="torch", reduction=reduction, rowwise=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bf16_trap_is_caught(dtype, monkeypatch):
    """The peaked check can fail: a twin that rounds p_y to the buffer dtype before subtracting 1 (the
    read-modify-write the design forbids) loses the true-class gradient on confident rows and is caught."""
    import kernels.long_ce_ref as ref
    from kernels.long_ce_chunked import Steps

    def rows_with_trap(logits, bias, labels, loss_out, opts, row_scale, write_grad):
        ref.rows_torch(logits, bias, labels, loss_out, opts, row_scale, write_grad)
        if write_grad:
            idx = labels.clamp(min=0)[:, None]
            p_y = (logits.gather(1, idx).float() + 1.0).to(logits.dtype)  # p_y rounded first
            logits.scatter_(1, idx, p_y - 1.0)

    monkeypatch.setattr(kernels, "TORCH_STEPS", Steps(rows_with_trap, ref.matmul_f32_torch))
    hidden, weight, labels, _ = make_inputs(64, 48, 300, dtype, seed=5, peaked=True, ignore_frac=0.0)
    with pytest.raises(AssertionError, match="per-row relative error"):
        check_against_fp64(hidden, weight, labels, None, impl="torch", reduction="sum", rowwise=True)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_every_label_ignored(reduction):
    hidden, weight, labels, _ = make_inputs(9, 8, 20, torch.float32, ignore_frac=1.0)
    assert (labels == -100).all()
    ours = loss_and_grads(linear_cross_entropy, hidden, weight, labels, None, 2.0, reduction=reduction)
    ref = loss_and_grads(naive_linear_cross_entropy, hidden, weight, labels, None, 2.0, reduction=reduction)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, equal_nan=True)
    assert all((g == 0).all() for g in ours[1:])


def test_non_contiguous_inputs():
    hidden, weight, labels, bias = make_inputs(40, 24, 90, torch.float32, bias=True)
    hidden_nc = torch.cat([hidden, hidden], 1)[:, ::2]  # stride (48, 2)
    weight_nc = weight.T.contiguous().T  # stride (1, 90)
    labels_nc = torch.stack([labels, labels], 1)[:, 0]
    assert not (hidden_nc.is_contiguous() or weight_nc.is_contiguous() or labels_nc.is_contiguous())
    check_against_fp64(hidden_nc, weight_nc, labels_nc, bias, impl="torch", chunk_rows=9)


@pytest.mark.parametrize("flags", [(h, w, b) for h in (0, 1) for w in (0, 1) for b in (0, 1) if h or w or b])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_every_combination_of_grad_flags(flags, reduction):
    hidden, weight, labels, bias = make_inputs(30, 16, 50, torch.float32, bias=True)
    ours = [t.clone().requires_grad_(bool(f)) for t, f in zip((hidden, weight, bias), flags)]
    ref = [t.clone().requires_grad_(bool(f)) for t, f in zip((hidden, weight, bias), flags)]
    loss = linear_cross_entropy(*ours[:2], labels, bias=ours[2], reduction=reduction, chunk_rows=8)
    want = naive_linear_cross_entropy(*ref[:2], labels, bias=ref[2], reduction=reduction)
    go = torch.linspace(-2, 3, loss.numel()).view(loss.shape)
    (loss * go).sum().backward()
    (want * go).sum().backward()
    for name, a, b in zip(("hidden", "weight", "bias"), ours, ref):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_no_grad_skips_gradient_work(monkeypatch):
    import kernels.long_ce_chunked as chunked

    seen = []
    real = chunked.chunked_pass
    monkeypatch.setattr(chunked, "chunked_pass", lambda *a, **k: seen.append(k["need_dw"]) or real(*a, **k))
    hidden, weight, labels, _ = make_inputs(8, 8, 16, torch.float32)
    weight.requires_grad_()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels)
        torch.testing.assert_close(loss, naive_linear_cross_entropy(hidden, weight, labels))
    linear_cross_entropy(hidden, weight, labels)
    assert seen == [False, True]


def test_deterministic_bitwise():
    hidden, weight, labels, bias = make_inputs(70, 32, 130, torch.float32, bias=True)
    a = loss_and_grads(linear_cross_entropy, hidden, weight, labels, bias, 1.0, chunk_bytes=3000)
    b = loss_and_grads(linear_cross_entropy, hidden, weight, labels, bias, 1.0, chunk_bytes=3000)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_second_backward_raises():
    hidden, weight, labels, _ = make_inputs(8, 8, 16, torch.float32)
    w = weight.clone().requires_grad_()
    loss = linear_cross_entropy(hidden, w, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("bad", [-1, 20, 10**6])
def test_out_of_range_labels_raise(bad):
    hidden, weight, labels, _ = make_inputs(8, 8, 20, torch.float32)
    labels[3] = bad
    with pytest.raises(ValueError, match="labels must be in"):
        linear_cross_entropy(hidden, weight, labels)
    # Without the (syncing) check: no crash, the bad row poisons the loss.
    assert torch.isnan(linear_cross_entropy(hidden, weight, labels, check_labels=False))


def test_bad_arguments():
    hidden, weight, labels, _ = make_inputs(8, 8, 20, torch.float32)
    for kw in [dict(reduction="avg"), dict(impl="cuda"), dict(label_smoothing=2.0), dict(softcap=0.0)]:
        with pytest.raises(ValueError):
            linear_cross_entropy(hidden, weight, labels, **kw)
    with pytest.raises(ValueError, match="share a dtype"):
        linear_cross_entropy(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="shape"):
        linear_cross_entropy(hidden, weight[:, :4], labels)
    with pytest.raises(ValueError, match="triton"):
        linear_cross_entropy(hidden, weight, labels, impl="triton")  # CPU tensors, no interpreter
    with pytest.raises(ValueError, match="one device"):
        linear_cross_entropy(hidden, weight, labels.to("meta"))
    with pytest.raises(ValueError, match="bias must have shape"):
        linear_cross_entropy(hidden, weight, labels, bias=torch.zeros(3))


def test_int32_labels():
    hidden, weight, labels, _ = make_inputs(12, 8, 30, torch.float32)
    torch.testing.assert_close(
        linear_cross_entropy(hidden, weight, labels.int()), naive_linear_cross_entropy(hidden, weight, labels)
    )


def test_module_wrapper():
    hidden, weight, labels, _ = make_inputs(12, 8, 30, torch.float32)
    mod = LinearCrossEntropy(reduction="mean", label_smoothing=0.1)
    assert "mean" in repr(mod)
    torch.testing.assert_close(
        mod(hidden, weight, labels),
        naive_linear_cross_entropy(hidden, weight, labels, reduction="mean", label_smoothing=0.1),
    )


def test_plan_chunk_rows():
    plan = lambda n, v, e, dev, **kw: plan_chunk_rows(n, v, e, dev, LongCEOptions(**kw))
    assert plan(28_672, 152_064, 2, "cuda") == CUDA_CHUNK_ROWS == 3584  # 8 chunks at the Qwen2-7B shape
    assert plan(20_000, 152_064, 2, "cuda") == 3456  # 6 even chunks (3334 -> 3456), not 5 x 3584 + 2080
    assert plan(1000, 152_064, 2, "cuda") == 1000  # one chunk of every row
    assert plan(3, 100, 4, "cpu") == 3 and plan(0, 100, 4, "cpu") == 1
    assert plan(10_000, 1000, 4, "cpu", chunk_bytes=4 * 1000 * 300) == 256  # 300 -> 256, 40 x 250 -> 256
    assert plan(10_000, 1000, 4, "cpu", chunk_bytes=1) == 1
    assert plan(10_000, 1000, 4, "cuda", chunk_rows=77) == 77  # the override is exact
    assert plan(4096, 32_768, 4, "cpu") == 512  # CPU: 64 MiB of fp32 rows
    for n in (1, 127, 128, 129, 3585, 28_672, 99_999):
        c = plan(n, 152_064, 2, "cuda")
        assert c <= min(n, 3584) and (c % 128 == 0 or c == n), (n, c)
        assert -(-n // c) == -(-n // 3584), (n, c)  # as few chunks as the target allows
    with pytest.raises(ValueError, match="not both"):
        LongCEOptions(chunk_rows=1, chunk_bytes=1)


def test_compact_rows():
    labels = torch.tensor([3, -100, 5, -100, -100, 7])
    rows, n = compact_rows(labels, LongCEOptions())
    assert n == 3 and rows.tolist() == [0, 2, 5]  # valid rows first, in order
    assert compact_rows(labels.clamp(min=0), LongCEOptions()) == (None, 6)
    meta = labels.to("meta")  # a device where the count is not free: no compaction without num_valid
    assert compact_rows(meta, LongCEOptions()) == (None, None)
    rows, n = compact_rows(meta, LongCEOptions(num_valid=3))
    assert n == 3 and rows.shape == (3,)


def test_ignored_rows_are_skipped(monkeypatch):
    """Only the valid rows reach the chunk kernels, whatever the chunking (the work is 6 N_valid H V)."""
    import kernels.long_ce_chunked as chunked

    seen = []
    real = kernels.TORCH_STEPS

    def rows(logits, bias, labels, *a):
        seen.append(labels.clone())
        real.rows(logits, bias, labels, *a)

    monkeypatch.setattr(kernels, "TORCH_STEPS", chunked.Steps(rows, real.matmul_f32))
    hidden, weight, labels, _ = make_inputs(50, 8, 40, torch.float32, ignore_frac=0.5)
    n_valid = int((labels != -100).sum())
    loss = loss_and_grads(linear_cross_entropy, hidden, weight, labels, None, 1.5, chunk_rows=7)
    ref = loss_and_grads(naive_linear_cross_entropy, hidden, weight, labels, None, 1.5)
    for a, b in zip(loss, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    got = torch.cat(seen)
    assert (
        got.numel() == n_valid
        and (got != -100).all()
        and [len(t) for t in seen][:-1] == [7] * (len(seen) - 1)
    )
    # A host count given by the caller is checked against the labels (check_labels) and used as is.
    with pytest.raises(ValueError, match="num_valid"):
        linear_cross_entropy(hidden, weight, labels, num_valid=n_valid + 1)
    torch.testing.assert_close(
        linear_cross_entropy(hidden, weight, labels, num_valid=n_valid, check_labels=False), ref[0].float()
    )


def test_import_does_not_need_triton():
    code = "import sys, kernels; assert 'triton' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_gradient_is_rounded_once(dtype):
    # The trainer back-propagates loss_sum / n_tokens: grad_output != 1. The fp32 accumulator is scaled
    # before its single rounding to the weight's dtype (rounding, then scaling in 16 bits, rounds twice);
    # the same for dX, which is kept in fp32 too.
    from kernels.long_ce_chunked import TORCH_STEPS, chunked_pass

    torch.manual_seed(0)
    hidden = torch.randn(96, 48).to(dtype).requires_grad_()
    weight = (torch.randn(300, 48) / 4).to(dtype).requires_grad_()
    labels = torch.randint(0, 300, (96,))
    (linear_cross_entropy(hidden, weight, labels, impl="torch") / 7.0).backward()
    res = chunked_pass(
        hidden.detach(),
        weight.detach(),
        None,
        labels,
        LongCEOptions(),
        TORCH_STEPS,
        need_dx=True,
        need_dw=True,
        need_db=False,
    )
    for grad, acc in ((weight.grad, res.dw), (hidden.grad, res.dx)):
        assert acc.dtype == torch.float32
        assert torch.equal(grad, (acc * (1.0 / 7.0)).to(dtype))
        twice = acc.to(dtype) * (1.0 / 7.0)  # what a 16-bit read-modify-write would give
        assert not torch.equal(grad, twice)

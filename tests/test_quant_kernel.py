"""The fused Triton fake-quantization kernel against its torch reference (kernels.quant).

Under TRITON_INTERPRET=1 (CI) the kernel runs on the CPU and must equal the reference bit for
bit. On a GPU machine run `TRITON_INTERPRET=0 pytest tests/test_quant_kernel.py` and the same
tests run compiled on CUDA, against the reference computed on the CPU copy of the weight."""
import os

import pytest
import torch

from autoprune_ray.kernels.quant import (_grouped, fake_quant_reference, fake_quantize, group_params,
                                         triton_fake_quantize)

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
BACKENDS = ("torch", "triton")

# (rows, cols, group_size): a divisible width, SmolLM2's 576 = 4·128 + 64, 100 = 3·32 + 4, 5 = 4 + 1
SHAPES = [(2, 256, 128), (3, 576, 128), (4, 100, 32), (2, 5, 4)]


def weight(rows: int, cols: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (torch.rand(rows, 1, generator=g) * 3 + 0.1)
    w[0, :: max(1, cols // 7)] *= 8   # a few outliers widen some groups' ranges
    return w.to(dtype).to(DEVICE)


def gram_diag(cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.rand(cols, generator=g) * 10 + 0.01).to(DEVICE)


def column_steps(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Each entry's quantization step (its group's scale), shaped like `w`, on the CPU."""
    scale, _ = group_params(_grouped(w.cpu(), group_size), bits)
    return scale.expand(-1, -1, group_size).reshape(w.shape[0], -1)[:, :w.shape[1]]


def assert_deq_matches(deq: torch.Tensor, w: torch.Tensor, bits: int, group_size: int) -> None:
    """Bit for bit under the interpreter. Compiled, a last-ulp difference in a division may move
    a value across a rounding boundary: at most one step, on a tiny fraction of the entries."""
    ref, _ = fake_quant_reference(w.cpu(), bits, group_size)
    deq = deq.cpu()
    assert deq.dtype == w.dtype and deq.shape == w.shape
    if DEVICE == "cpu":
        assert torch.equal(deq, ref)
        return
    diff = (deq.float() - ref.float()).abs()
    step = column_steps(w, bits, group_size)
    cast_slack = ref.float().abs() * 2 * torch.finfo(w.dtype).eps   # both sides rounded to W's dtype
    assert (diff <= step * 1.0001 + cast_slack).all()
    assert int((diff > cast_slack).sum()) <= max(1, deq.numel() // 1000)


def assert_err_matches(err: torch.Tensor, w: torch.Tensor, bits: int, group_size: int, h=None) -> None:
    # the sums run in a different order, so only the float32 rounding of the sum may differ
    _, ref = fake_quant_reference(w.cpu(), bits, group_size, None if h is None else h.cpu())
    rtol = 1e-5 if DEVICE == "cpu" else 1e-2   # compiled: a moved entry changes its error term
    torch.testing.assert_close(err.cpu(), ref, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows,cols,group_size", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("weighted", [False, True])
def test_kernel_equals_reference(bits, rows, cols, group_size, dtype, weighted):
    w = weight(rows, cols, seed=bits * 1000 + cols, dtype=dtype)
    h = gram_diag(cols, seed=cols) if weighted else None
    deq, err = triton_fake_quantize(w, bits, group_size, h)
    assert_deq_matches(deq, w, bits, group_size)
    assert_err_matches(err, w, bits, group_size, h)


def test_bfloat16_weights_round_like_torch():
    # SmolLM2 ships bf16 weights; the kernel rounds its fp32 result to bf16 to nearest even
    w = weight(3, 576, seed=5, dtype=torch.bfloat16)
    deq, err = triton_fake_quantize(w, 3, 128)
    assert_deq_matches(deq, w, 3, 128)
    assert_err_matches(err, w, 3, 128)


def test_out_receives_the_dequantized_weight():
    w = weight(3, 100, seed=2)
    out = torch.full_like(w, float("nan"))
    deq, _ = triton_fake_quantize(w, 4, 32, out=out)
    assert deq.data_ptr() == out.data_ptr()
    assert_deq_matches(out, w, 4, 32)


def test_group_wider_than_the_row_is_the_whole_row():
    w = weight(2, 100, seed=3)
    deq, err = triton_fake_quantize(w, 4, 4096)
    assert_deq_matches(deq, w, 4, 4096)
    assert_err_matches(err, w, 4, 4096)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_example(backend):
    # 2 bits: maxq = 3; group 4, so each row is a full group of 4 and a short group of 1.
    # Row 0, group [-1, 0.5, 1.5, 2]: lo = -1, hi = 2, scale = 3/3 = 1,
    #   zero = clamp(-rnd(-1/1), 0, 3) = -floor(-0.5) = 1;
    #   w/scale = [-1, 0.5, 1.5, 2] -> rnd = floor(x + 0.5) = [-1, 1, 2, 2] (halves round up)
    #   -> +zero [0, 2, 3, 3] -> clamp same -> -zero, ·scale: deq = [-1, 1, 2, 2];
    #   squared errors [0, 0.25, 0.25, 0].
    # Row 0, short group [-1.5]: the range includes 0, so lo = -1.5, hi = 0, scale = 0.5,
    #   zero = -rnd(-3) = 3; deq = (clamp(-3 + 3) - 3) · 0.5 = -1.5 (a range end is always exact).
    #   Row error 0.5; with h = [1, 2, 1, 1, 4]: 0.25·2 + 0.25·1 = 0.75.
    # Row 1, group [0, 1, 2, 3]: lo = 0, hi = 3, scale = 1, zero = -rnd(0) = 0: deq = W exactly.
    # Row 1, short group [-1]: lo = -1, hi = 0, scale = fl(1/3) = 0.333333343; -1/scale rounds to
    #   -3.0 in float32, so zero = 3, q = 0 and deq = -3 · fl(1/3) = -1.00000003, which rounds to -1.
    #   Row error 0.
    w = torch.tensor([[-1.0, 0.5, 1.5, 2.0, -1.5], [0.0, 1.0, 2.0, 3.0, -1.0]], device=DEVICE)
    h = torch.tensor([1.0, 2.0, 1.0, 1.0, 4.0], device=DEVICE)
    deq, err = fake_quantize(w, 2, 4, backend=backend)
    assert deq.tolist() == [[-1.0, 1.0, 2.0, 2.0, -1.5], [0.0, 1.0, 2.0, 3.0, -1.0]]
    assert err.tolist() == [0.5, 0.0]
    _, err_h = fake_quantize(w, 2, 4, h=h, backend=backend)
    assert err_h.tolist() == [0.75, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_zero_and_constant_groups_stay_finite(backend, dtype):
    w = torch.tensor([[0.0] * 4 + [5.0] * 4 + [-2.0] * 4 + [1e-30] * 4],
                     device=DEVICE).to(dtype)
    for bits in (2, 4, 8):
        deq, err = fake_quantize(w, bits, 4, backend=backend)
        assert torch.isfinite(deq).all() and torch.isfinite(err).all()
        assert (deq[0, :4] == 0).all()
        # a constant group is one end of its range [min(c, 0), max(c, 0)], so it is on the grid
        torch.testing.assert_close(deq[0, 4:12].float(), w[0, 4:12].float(), rtol=1e-6, atol=0)
        assert (deq[0, 12:].float().abs() <= 1e-30).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [dict(bits=0), dict(bits=9), dict(bits=2.5), dict(group_size=0),
                                 dict(shape=(2, 3, 8)), dict(shape=(8,)), dict(h_len=7)])
def test_bad_inputs_raise(backend, bad):
    w = torch.randn(*bad.get("shape", (2, 8))).to(DEVICE)
    h = torch.ones(bad["h_len"], device=DEVICE) if "h_len" in bad else None
    with pytest.raises(ValueError):
        fake_quantize(w, bad.get("bits", 4), bad.get("group_size", 4), h=h, backend=backend)


def test_backends_auto_and_unknown():
    w = weight(2, 100, seed=4)
    deq, err = fake_quantize(w, 3, 32)   # auto: the kernel on CUDA, the reference on the CPU
    assert_deq_matches(deq, w, 3, 32)
    assert_err_matches(err, w, 3, 32)
    with pytest.raises(ValueError):
        fake_quantize(w, 3, 32, backend="cuda")

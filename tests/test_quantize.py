import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch

from autoprune_ray.compress.bits import (GROUP_OVERHEAD_BITS, LayerSize, allocate, allocate_greedy, allocate_ilp,
                                         average_bits, budget_bits, total_cost, uniform_bits)
from autoprune_ray.compress.eval import reconstruction_error
from autoprune_ray.compress.gptq import gptq_quantize
from autoprune_ray.kernels.quant import fake_quant_reference, group_params, quantize_dequantize
from tests_support import correlated_inputs

CHOICES = [2, 3, 4, 8]

# One row, group_size 4, so the second group is short (2 columns). Ranges are 21·2^-k so that
# every scale is exact in binary: rnd(x) = floor(x + 0.5), lo/hi include 0.
#   group 1 = [-0.75, 0.25, 1.0, 1.875]: lo = -0.75, hi = 1.875, range 2.625
#     2 bits: scale = 2.625/3 = 0.875, zero = -rnd(-0.857) = 1
#             q = rnd(w/scale) + zero = [-1+1, 0+1, 1+1, 2+1] = [0, 1, 2, 3] -> [-0.875, 0, 0.875, 1.75]
#     3 bits: scale = 2.625/7 = 0.375, zero = -rnd(-2) = 2
#             q = [-2+2, 1+2, 3+2, 5+2] = [0, 3, 5, 7] -> [-0.75, 0.375, 1.125, 1.875]
#   group 2 = [0.5, 1.3125]: lo = min(0.5, 0) = 0, hi = 1.3125
#     2 bits: scale = 0.4375, zero = 0, q = [rnd(1.14), 3] = [1, 3] -> [0.4375, 1.3125]
#     3 bits: scale = 0.1875, zero = 0, q = [rnd(2.67), 7] = [3, 7] -> [0.5625, 1.3125]
HAND_ROW = [-0.75, 0.25, 1.0, 1.875, 0.5, 1.3125]
HAND = {2: ([0.875, 0.4375], [1, 0], [-0.875, 0.0, 0.875, 1.75, 0.4375, 1.3125]),
        3: ([0.375, 0.1875], [2, 0], [-0.75, 0.375, 1.125, 1.875, 0.5625, 1.3125])}


@pytest.mark.parametrize("bits", [2, 3])
def test_fake_quant_matches_hand_computation(bits):
    row = torch.tensor([HAND_ROW])
    scales, zeros, expected = HAND[bits]
    for (lo, hi), scale, zero in zip([(0, 4), (4, 6)], scales, zeros):
        s, z = group_params(row[:, lo:hi], bits)
        assert s.item() == scale and z.item() == zero
    deq, err = fake_quant_reference(row, bits, group_size=4)
    assert deq[0].tolist() == expected
    assert err.item() == pytest.approx(sum((a - b) ** 2 for a, b in zip(HAND_ROW, expected)))


def naive_gptq(weight, gram, bits, group_size, damp=0.01):
    """GPTQ without lazy blocks or a Cholesky factor: after rounding column j, the remaining
    columns take the OBS update -err_j · H⁻¹[j, k] / H⁻¹[j, j] with H⁻¹ of the remaining columns."""
    w = weight.double().clone()
    h = gram.double() + damp * gram.diagonal().double().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
    out = torch.zeros_like(w)
    for j in range(w.shape[1]):
        if j % group_size == 0:
            scale, zero = group_params(w[:, j:j + group_size].float(), bits)
        out[:, j] = quantize_dequantize(w[:, j:j + 1].float(), scale, zero, bits).squeeze(1).double()
        h_inv = torch.linalg.inv(h[j:, j:])
        w[:, j:] -= ((w[:, j] - out[:, j]) / h_inv[0, 0]).unsqueeze(1) * h_inv[0].unsqueeze(0)
    return out.float()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_on_output_reconstruction(seed, bits):
    x = correlated_inputs(seed)
    gram = x.T @ x
    w = torch.randn(48, 72, generator=torch.Generator().manual_seed(100 + seed))
    gptq = gptq_quantize(w, gram, bits, group_size=32, blocksize=16)   # 72 = 2·32 + 8: a short group
    rtn, _ = fake_quant_reference(w, bits, group_size=32)
    assert reconstruction_error(w, gptq, gram) < 0.5 * reconstruction_error(w, rtn, gram)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_lies_on_a_per_group_grid(bits):
    x = correlated_inputs(3, width=40)
    w = torch.randn(16, 40)
    q = gptq_quantize(w, x.T @ x, bits, group_size=16, blocksize=8)
    for row in q:
        for group in row.split(16):
            assert group.unique().numel() <= 2 ** bits


def test_gptq_matches_a_naive_unblocked_implementation():
    """Groups straddle the 8-column blocks, so this also checks that a group's grid is taken
    from fully error-updated weights whatever the blocksize."""
    x = correlated_inputs(4, tokens=512, width=30)
    gram = x.T @ x
    w = torch.randn(12, 30, generator=torch.Generator().manual_seed(5))
    expected = naive_gptq(w, gram, 3, group_size=12)
    for blocksize in (1, 8, 128):
        assert torch.allclose(gptq_quantize(w, gram, 3, 12, blocksize=blocksize), expected, atol=1e-4)


def test_gptq_on_uncorrelated_inputs_starts_like_rtn():
    w = torch.randn(32, 24, generator=torch.Generator().manual_seed(6))
    rtn, _ = fake_quant_reference(w, 3, group_size=32)
    # exact identity: H⁻¹ is diagonal, no error travels, so every column is RTN's
    assert torch.equal(gptq_quantize(w, 5 * torch.eye(24), 3, group_size=32), rtn)
    x = torch.randn(4096, 24, generator=torch.Generator().manual_seed(7))
    q = gptq_quantize(w, x.T @ x, 3, group_size=32)
    assert torch.equal(q[:, 0], rtn[:, 0])
    assert not torch.equal(q, rtn)


def test_gptq_dead_inputs_and_dtype():
    x = correlated_inputs(8, tokens=256, width=20)
    x[:, [2, 11]] = 0
    w = torch.randn(8, 20).to(torch.bfloat16)
    q = gptq_quantize(w, x.T @ x, 4, group_size=8, blocksize=4)
    assert q.dtype == torch.bfloat16 and torch.isfinite(q.float()).all()
    assert (q[:, [2, 11]] == 0).all()


def test_gptq_rejects_mismatched_gram():
    with pytest.raises(ValueError, match="gram must be"):
        gptq_quantize(torch.randn(4, 8), torch.eye(6), 4, 4)


# --- bit allocation -----------------------------------------------------------------------------

def test_average_bits_counts_group_scales_by_hand():
    layer = LayerSize("x", 4, 10)
    # groups of 4 over 10 columns: 3 per row (the last one short), 4 rows -> 12 groups
    assert layer.numel == 40 and layer.groups(4) == 12
    assert layer.cost(3, 4) == 40 * 3 + 12 * GROUP_OVERHEAD_BITS == 504
    assert average_bits([layer], [3], 4) == pytest.approx(12.6)
    # with a [8, 256] layer at 4 bits: group 128 -> 8·2 groups, 8192 + 512 bits; the [4, 10] layer
    # at 2 bits has one (short) group per row at group 128 -> 80 + 4·32 bits
    layers = [LayerSize("a", 8, 256), layer]
    assert total_cost(layers, [4, 2], 128) == (8192 + 512) + (80 + 128)
    assert average_bits(layers, [4, 2], 128) == pytest.approx(8912 / 2088)


def test_budget_is_floored_exactly():
    layers = [LayerSize("a", 1, 10)]
    assert budget_bits(layers, 4.3) == 43          # the binary float 4.3 is just below 43/10
    assert budget_bits(layers, Fraction(43, 10)) == 43
    assert budget_bits(layers, 4.35) == 43


def random_instance(rng, max_layers=12):
    n = int(rng.integers(1, max_layers + 1))
    layers = [LayerSize(f"l{i}", int(rng.integers(1, 40)), int(rng.integers(1, 70))) for i in range(n)]
    group_size = int(rng.choice([4, 16, 32]))
    if rng.random() < 0.8:   # the usual shape: damage falls with bits, at a layer-dependent rate
        sens = rng.lognormal(size=(n, 1)) * 4.0 ** -np.array(CHOICES) * rng.lognormal(0, 0.3, (n, len(CHOICES)))
    else:                    # arbitrary, non-monotone
        sens = rng.normal(size=(n, len(CHOICES)))
    low = average_bits(layers, [CHOICES[0]] * n, group_size)
    high = average_bits(layers, [CHOICES[-1]] * n, group_size)
    return sens, layers, float(rng.uniform(low, high + 0.5)), group_size


def objective(sens, bits):
    return sum(sens[i, CHOICES.index(b)] for i, b in enumerate(bits))


def test_ilp_fits_the_budget_and_is_never_worse_than_greedy():
    rng = np.random.default_rng(0)
    for _ in range(50):
        sens, layers, avg, group_size = random_instance(rng)
        ilp = allocate_ilp(sens, CHOICES, layers, avg, group_size)
        greedy = allocate_greedy(sens, CHOICES, layers, avg, group_size)
        budget = budget_bits(layers, avg)
        assert total_cost(layers, ilp, group_size) <= budget
        assert average_bits(layers, ilp, group_size) <= avg
        assert total_cost(layers, greedy, group_size) <= budget
        assert objective(sens, ilp) <= objective(sens, greedy) + 1e-9 * np.abs(sens).sum()
        uniform = uniform_bits(CHOICES, layers, avg, group_size)
        assert total_cost(layers, [uniform] * len(layers), group_size) <= budget
        assert uniform == CHOICES[-1] or total_cost(
            layers, [CHOICES[CHOICES.index(uniform) + 1]] * len(layers), group_size) > budget


def test_ilp_equals_brute_force_on_small_instances():
    rng = np.random.default_rng(1)
    for _ in range(30):
        sens, layers, avg, group_size = random_instance(rng, max_layers=5)
        budget = budget_bits(layers, avg)
        best = min(objective(sens, bits) for bits in itertools.product(CHOICES, repeat=len(layers))
                   if total_cost(layers, bits, group_size) <= budget)
        assert objective(sens, allocate("ilp", sens, CHOICES, layers, avg, group_size)) == pytest.approx(best, abs=1e-9)


def test_ilp_solves_tables_far_from_unit_scale():
    # Searched proxies write tables like 1e30 · (…) or −1e25 + (…); HiGHS treats magnitudes past
    # 1e20 as infinite. A constant per layer and a positive factor do not change the argmin, so
    # the answer must be brute force's on the unit-scale table (shifts small enough for float64).
    rng = np.random.default_rng(2)
    for scale, shift in ((1e30, 0.0), (1e-30, 0.0), (1e22, -1e25), (1e22, 1e24)):
        sens, layers, avg, group_size = random_instance(rng, max_layers=5)
        budget = budget_bits(layers, avg)
        best = min(objective(sens, bits) for bits in itertools.product(CHOICES, repeat=len(layers))
                   if total_cost(layers, bits, group_size) <= budget)
        bits = allocate_ilp(sens * scale + shift * rng.random((len(layers), 1)), CHOICES, layers, avg, group_size)
        assert objective(sens, bits) == pytest.approx(best, rel=1e-6, abs=1e-9)


def test_ilp_uses_a_budget_exactly_full():
    # 2 layers of 100 weights, group 100 (2 groups, 64 bits): 3 bits each costs 664 bits = 3.32 avg
    layers = [LayerSize("a", 1, 100), LayerSize("b", 1, 100)]
    sens = np.array([[4.0, 2.0, 1.0, 0.0], [4.0, 2.0, 1.0, 0.0]])
    assert allocate_ilp(sens, CHOICES, layers, 3.32, 100) == [3, 3]
    assert sorted(allocate_ilp(sens, CHOICES, layers, 3.315, 100)) == [2, 3]
    assert allocate_greedy(sens, CHOICES, layers, 3.32, 100) == [3, 3]
    assert uniform_bits(CHOICES, layers, 3.32, 100) == 3


def test_greedy_stops_when_nothing_improves():
    layers = [LayerSize("a", 4, 16), LayerSize("b", 4, 16)]
    sens = np.array([[1.0, 1.0, 1.0, 1.0], [3.0, 2.0, 2.0, 2.0]])
    assert allocate_greedy(sens, CHOICES, layers, 8.5, 16) == [2, 3]


@pytest.mark.parametrize("method", ["ilp", "greedy"])
def test_allocation_errors_are_clear(method):
    layers = [LayerSize("q", 4, 16), LayerSize("k", 4, 16)]
    sens = np.ones((2, 4))
    # 2 bits + 32 bits per group of 16 weights = 4 bits per weight at the least
    with pytest.raises(ValueError, match=r"below the minimum 4 "):
        allocate(method, sens, CHOICES, layers, 3.99, 16)
    with pytest.raises(ValueError, match="shape"):
        allocate(method, np.ones((2, 3)), CHOICES, layers, 4, 16)
    bad = sens.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"layer 1 \(k\) is not finite"):
        allocate(method, bad, CHOICES, layers, 4, 16)
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="layer 1"):
        allocate(method, bad, CHOICES, layers, 4, 16)
    for choices in ([3, 2, 4, 8], [2, 3, 3, 8]):
        with pytest.raises(ValueError, match="strictly increasing"):
            allocate(method, sens, choices, layers, 4, 16)


def test_unknown_method_and_uniform_below_minimum():
    layers = [LayerSize("q", 4, 16)]
    with pytest.raises(ValueError, match="unknown bit-allocation method"):
        allocate("dp", np.ones((1, 4)), CHOICES, layers, 4, 16)
    with pytest.raises(ValueError, match="below the minimum"):
        uniform_bits(CHOICES, layers, 2.0, 16)

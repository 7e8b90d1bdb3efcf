"""Per-linear allocation: the exact parameter-weighted budget, its inputs, and the baselines built on it."""
import math

import numpy as np
import pytest
import torch

from autoprune_ray.compress import allocation
from autoprune_ray.compress.allocation import AllocationError, allocate_sparsities
from autoprune_ray.compress.eval import reconstruction_error
from autoprune_ray.compress.masks import row_mask
from autoprune_ray.compress.models import block_linears, decoder_layers
from autoprune_ray.compress.prune import PruneConfig, prune_model
from autoprune_ray.compress.stats import calibration_stats
from autoprune_ray.operators.language import parse

UNEVEN = [1, 7, 10**9, 3, 576 * 1536, 2**40, 12, 5]


def random_case(seed: int, uneven: bool):
    g = torch.Generator().manual_seed(seed)
    n = len(UNEVEN) if uneven else 210
    raw = torch.randn(n, 1, generator=g) * 10 ** float(torch.randint(-3, 4, (1,), generator=g))
    sizes = torch.tensor(UNEVEN, dtype=torch.float64) if uneven else \
        torch.randint(1, 10**6, (n,), generator=g).double()
    return raw, sizes


def assert_exact_budget(values, sizes, sparsity):
    s = np.array(values, dtype=np.float64)
    n = np.asarray(sizes, dtype=np.float64)
    assert (s * n).sum() == pytest.approx(sparsity * n.sum(), rel=1e-12, abs=1e-9)
    # whole weights: each layer rounds its own count, so the model is off by at most one weight a layer
    assert abs(sum(round(si * ni) for si, ni in zip(s, n)) - sparsity * n.sum()) <= len(n)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("uneven", [False, True])
@pytest.mark.parametrize("sparsity, lam", [(0.5, 0.1), (0.7, 0.2), (0.6, 0.0), (0.2, 0.2)])
def test_budget_is_exact_and_band_holds(seed, uneven, sparsity, lam):
    raw, sizes = random_case(seed, uneven)
    values = allocate_sparsities(raw, sizes, sparsity, lam)
    assert len(values) == len(sizes)
    assert_exact_budget(values, sizes, sparsity)
    assert all(sparsity - lam <= v <= sparsity + lam and 0 <= v < 1 for v in values)
    assert max(values) - min(values) == pytest.approx(lam, abs=1e-12)   # the extremes span λ
    order = torch.argsort(raw.flatten())
    assert all(values[a] <= values[b] for a, b in zip(order[:-1], order[1:]))   # higher raw, more sparsity


def test_weighted_mean_not_plain_mean():
    """A big layer pulls the centre: with sizes 3 and 1 the values sit at S − λ/4 and S + 3λ/4."""
    values = allocate_sparsities(torch.tensor([[0.0], [1.0]]), [3, 1], 0.5, 0.2)
    assert values == pytest.approx([0.5 - 0.05, 0.5 + 0.15])


def test_constant_is_uniform():
    assert allocate_sparsities(torch.full((5, 1), 3.7), [1, 2, 3, 4, 5], 0.6, 0.1) == [0.6] * 5


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_refused_with_a_reason(bad):
    raw = torch.tensor([[1.0], [bad], [2.0]])
    with pytest.raises(AllocationError, match=r"1 non-finite values .* first at row 1"):
        allocate_sparsities(raw, [1, 1, 1], 0.5, 0.1)


@pytest.mark.parametrize("sparsity, lam", [(0.95, 0.1), (0.05, 0.1), (0.9, 0.1)])
def test_band_outside_unit_interval_is_refused(sparsity, lam):
    with pytest.raises(AllocationError, match=r"leaves \[0, 1\)"):
        allocate_sparsities(torch.tensor([[0.0], [1.0]]), [1, 1], sparsity, lam)
    with pytest.raises(ValueError, match=r"leaves \[0, 1\)"):   # a config fails before any work
        PruneConfig(sparsity=sparsity, allocation="alpha", alpha_lambda=lam).validate()


def test_other_refusals():
    with pytest.raises(AllocationError, match="λ = -0.1"):
        allocate_sparsities(torch.tensor([0.0, 1.0]), [1, 1], 0.5, -0.1)
    with pytest.raises(AllocationError, match="3 values for 2 layers"):
        allocate_sparsities(torch.tensor([0.0, 1.0, 2.0]), [1, 1], 0.5, 0.1)
    assert issubclass(AllocationError, ValueError)   # a search records it as a failed evaluation


def numpy_hill(w: np.ndarray) -> float:
    """The formula written out: eigenvalues of WᵀW ascending, x_min the ⌊N/2⌋-th, the tail from it up."""
    eigs = np.sort(np.linalg.svd(w.astype(np.float64), compute_uv=False) ** 2)
    i = len(eigs) // 2
    tail = eigs[i:]
    return 1 + len(tail) / np.sum(np.log(tail / eigs[i]))


def test_hill_alpha_by_hand():
    # eigenvalues 1, 2, 4, 8, 16: x_min = 4, tail 4, 8, 16, Σ ln = 0 + ln 2 + ln 4 = 3 ln 2
    w = torch.diag(torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0]).sqrt())
    assert allocation.hill_alpha(w) == pytest.approx(1 + 1 / math.log(2), rel=1e-6)
    g = torch.Generator().manual_seed(3)
    for shape in [(6, 4), (4, 6), (9, 9), (16, 7)]:
        w = torch.randn(shape, generator=g) * (1 + 4 * (torch.rand(shape, generator=g) > 0.9))
        assert allocation.hill_alpha(w) == pytest.approx(numpy_hill(w.numpy()), rel=1e-5), shape
    assert allocation.hill_alpha(torch.eye(4)) == math.inf    # a flat tail has no exponent


def test_role_indicators():
    assert [allocation.role_of(n) for n in ("self_attn.q_proj", "self_attn.out_proj", "mlp.gate_proj",
                                            "fc1", "fc2", "block_sparse_moe.experts.0.w2", "lm_head.weird")] == \
        ["q", "o", "gate", "up", "down", "down", None]
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj", "mystery"]
    weights = [{n: torch.zeros(2, 3) for n in names}] * 2
    inputs = allocation.linear_statistics(weights, None, allocation.ROLE_INPUTS)
    roles = torch.cat([inputs[f"is_{r}"] for r in allocation.ROLES], dim=1)    # [rows, 7]
    expected = torch.cat([torch.eye(7), torch.zeros(1, 7)]).repeat(2, 1)       # the unknown linear: all zeros
    assert torch.equal(roles, expected)
    for alias, role in [("q_proj", "is_q"), ("attn_out", "is_o"), ("mlp_down", "is_down")]:
        assert parse(f"def allocate({alias}): return {alias}", "allocate").inputs == [role]


@pytest.fixture
def dense(tiny_lm, tiny_data):
    stats = calibration_stats(tiny_lm, tiny_data, "one-pass", with_gram=True, use_cache=False)
    weights = [{n: lin.weight.data.clone() for n, lin in block_linears(b).items()} for b in decoder_layers(tiny_lm.model)]
    return weights, stats


def test_layout_depth_and_size(dense):
    weights, _ = dense
    keys = allocation.linear_keys(weights)
    assert keys[:7] == [(0, n) for n in weights[0]] and keys[7][0] == 1    # block-major
    inputs = allocation.linear_statistics(weights, None, ["depth", "size"])
    assert inputs["depth"].shape == (len(keys), 1)
    assert inputs["depth"].flatten().tolist() == [0.0] * 7 + [1.0] * 7
    numel = [weights[i][n].numel() for i, n in keys]
    assert inputs["size"].flatten().tolist() == pytest.approx([x / sum(numel) for x in numel])


def test_score_statistics_per_linear(dense):
    weights, stats = dense
    inputs = allocation.linear_statistics(weights, stats.blocks, ["skew", "kurt", "outlier"])
    row = allocation.linear_keys(weights).index((1, "mlp.up_proj"))
    w, st = weights[1]["mlp.up_proj"], stats.blocks[1]["mlp.up_proj"]
    scores = (w.abs() * st.wanda_norm).double().flatten().numpy()
    z = (scores - scores.mean()) / scores.std()
    assert float(inputs["skew"][row]) == pytest.approx((z ** 3).mean(), rel=1e-5)
    assert float(inputs["kurt"][row]) == pytest.approx((z ** 4).mean() - 3, rel=1e-5)
    assert float(inputs["outlier"][row]) == pytest.approx((scores > 5 * scores.mean()).mean())


def test_sens_is_the_reconstruction_error_of_wanda_alone(dense):
    weights, stats = dense
    inputs = allocation.linear_statistics(weights, stats.blocks, ["sens"], sparsity=0.6)
    row = allocation.linear_keys(weights).index((0, "mlp.down_proj"))
    w, st = weights[0]["mlp.down_proj"], stats.blocks[0]["mlp.down_proj"]
    pruned = w * ~row_mask(w.abs() * st.wanda_norm, 0.6)
    expected = reconstruction_error(w, pruned, st.gram) / reconstruction_error(w, torch.zeros_like(w), st.gram)
    assert float(inputs["sens"][row]) == pytest.approx(expected, rel=1e-5)
    assert 0 < float(inputs["sens"].min()) and float(inputs["sens"].max()) < 1


def test_only_requested_inputs_are_computed_and_the_cache_is_reused(dense, monkeypatch):
    weights, stats = dense
    cache = {}
    first = allocation.linear_statistics(weights, stats.blocks, ["alpha", "outlier"], cache=cache)
    assert set(first) == {"alpha", "outlier"} and ("sens", 0.5) not in cache
    calls = []
    monkeypatch.setattr(allocation, "hill_alpha", lambda w: calls.append(w) or 0.0)
    again = allocation.linear_statistics(weights, stats.blocks, ["alpha", "outlier"], cache=cache)
    assert not calls and again["alpha"] is first["alpha"]
    no_gram = calibration_stats_without_gram(stats)
    with pytest.raises(ValueError, match="Gram"):
        allocation.linear_statistics(weights, no_gram, ["sens"])
    with pytest.raises(ValueError, match="unknown allocation inputs"):
        allocation.linear_statistics(weights, stats.blocks, ["W"])


def calibration_stats_without_gram(stats):
    from autoprune_ray.compress.stats import BlockStats, InputStats
    return [BlockStats({n: InputStats(st.tokens, st.samples, st.sum, st.sq_sum) for n, st in b.inputs.items()})
            for b in stats.blocks]


def check_per_linear_targets(result, lm, sparsity, lam):
    shapes = {f"{i}.{n}": lin.weight.shape for i, b in enumerate(decoder_layers(lm.model))
              for n, lin in block_linears(b).items()}
    keys, sizes = list(shapes), {k: rows * cols for k, (rows, cols) in shapes.items()}
    assert list(result.layer_targets) == keys
    values = [result.layer_targets[k] for k in keys]
    assert_exact_budget(values, [sizes[k] for k in keys], sparsity)
    assert all(sparsity - lam <= v <= sparsity + lam for v in values)
    for key, target in result.layer_targets.items():   # each linear pruned to its own target, whole weights
        assert abs(result.per_layer[key] - target) <= 0.5 * shapes[key][0] / sizes[key] + 1e-12, key
    for index, block_target in enumerate(result.block_targets):
        mine = [k for k in keys if k.startswith(f"{index}.")]
        weighted = sum(result.layer_targets[k] * sizes[k] for k in mine) / sum(sizes[k] for k in mine)
        assert block_target == pytest.approx(weighted)
    return values


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "barber"])
def test_prune_with_a_program_gives_per_linear_targets(tiny_lm, tiny_data, method):
    program = parse("def allocate(depth, is_down, sens, alpha):\n    return depth + is_down - sens + 0.1 * alpha\n",
                    "allocate").tree
    cfg = PruneConfig(method=method, sparsity=0.6, allocation="program", allocation_program=program,
                      allocation_lambda=0.2)
    result = prune_model(tiny_lm, tiny_data, cfg)
    values = check_per_linear_targets(result, tiny_lm, 0.6, 0.2)
    assert len(set(values)) > 2   # not per block: the linears of a block differ
    assert result.to_dict()["layer_targets"] == result.layer_targets


def test_alpha_baseline_is_per_block_and_on_budget(tiny_lm, tiny_data):
    weights = [{n: lin.weight.data.clone() for n, lin in block_linears(b).items()} for b in decoder_layers(tiny_lm.model)]
    alphas = [np.mean([allocation.hill_alpha(w) for w in block.values()]) for block in weights]
    result = prune_model(tiny_lm, tiny_data, PruneConfig(method="wanda", sparsity=0.7, allocation="alpha"))
    assert result.config.label == "alpha-wanda"
    check_per_linear_targets(result, tiny_lm, 0.7, 0.1)
    for key, target in result.layer_targets.items():   # one sparsity per block
        assert target == result.block_targets[int(key.split(".")[0])]
    # the less heavy-tailed block (higher alpha) is pruned more; two blocks span the whole λ
    high, low = int(np.argmax(alphas)), int(np.argmin(alphas))
    assert result.block_targets[high] - result.block_targets[low] == pytest.approx(0.1)


def test_alpha_needs_no_calibration_data(tiny_lm):
    result = prune_model(tiny_lm, None, PruneConfig(method="magnitude", sparsity=0.5, allocation="alpha"))
    assert sum(result.block_targets) / 2 == pytest.approx(0.5)


def test_alpha_wanda_is_a_baseline_without_nm():
    from autoprune_ray.compress.baselines import BaselineRun, plan
    runs = plan(["alpha-wanda"], [0.6, 0.7], ["2:4"])
    assert [r.key for r in runs] == ["dense/None", "alpha-wanda/0.6", "alpha-wanda/0.7"]   # no 2:4 cell
    assert BaselineRun("alpha-wanda", 0.6, None).config().allocation == "alpha"
    with pytest.raises(ValueError, match="does not combine with N:M"):
        PruneConfig(allocation="alpha", pattern="2:4").validate()

"""Score seeds reproduce their compress/ baselines exactly; allocation seeds apply the published rules per linear."""
import pytest
import torch

from autoprune_ray.compress import allocation, scores
from autoprune_ray.compress.masks import select_mask
from autoprune_ray.compress.models import block_linears, decoder_layers
from autoprune_ray.compress.program import program_score, score_inputs
from autoprune_ray.compress.prune import PruneConfig, prune_model
from autoprune_ray.compress.stats import calibration_stats
from autoprune_ray.operators.seeds import allocation_seeds, score_seeds


@pytest.fixture
def layer_inputs(tiny_lm, tiny_data):
    stats = calibration_stats(tiny_lm, tiny_data, "one-pass", with_gram=True, use_cache=False)
    out = []
    for i, block in enumerate(decoder_layers(tiny_lm.model)):
        for name, lin in block_linears(block).items():
            torch.manual_seed(i)
            grad = torch.rand_like(lin.weight)
            out.append((lin.weight.data, stats.blocks[i][name], grad))
    return out


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_score_seeds_reproduce_baseline_masks(layer_inputs, sparsity):
    seeds = score_seeds()
    for weight, st, grad in layer_inputs:
        baseline = {"magnitude": (scores.magnitude(weight), "layer"), "wanda": (scores.wanda(weight, st), "row"),
                    "ria": (scores.ria(weight, st), "row"),
                    "weight-gradient": (scores.weight_gradient(weight, grad), "row")}
        env = score_inputs(weight, st, grad)
        for name, seed in seeds.items():
            expected, granularity = baseline[name]
            assert seed.granularity == granularity
            ours = program_score(seed.tree, env)
            assert torch.equal(ours, expected), name   # bit-identical scores
            assert torch.equal(select_mask(ours, sparsity, granularity=granularity),
                               select_mask(expected, sparsity, granularity=granularity)), name


def test_wanda_seed_prunes_the_model_like_wanda(tiny_lm, tiny_data, tiny_model_dir):
    from autoprune_ray.compress.models import load_model
    reference = load_model(str(tiny_model_dir), device="cpu")
    prune_model(reference, tiny_data, PruneConfig(method="wanda", sparsity=0.5))
    seed = score_seeds()["wanda"]
    prune_model(tiny_lm, tiny_data, PruneConfig(method="program", program=seed.tree, sparsity=0.5))
    for a, b in zip(decoder_layers(tiny_lm.model), decoder_layers(reference.model)):
        for la, lb in zip(block_linears(a).values(), block_linears(b).values()):
            assert torch.equal(la.weight, lb.weight)


def test_allocation_seeds_apply_their_rule_per_linear(tiny_lm, tiny_data):
    """Uniform is uniform; the OWL and AlphaPruning-style seeds are those rules per linear layer:
    the exact-budget map of −outlier and of alpha over the linears."""
    from autoprune_ray.compress.models import load_model
    stats = calibration_stats(tiny_lm, tiny_data, "one-pass", with_gram=False, use_cache=False)
    weights = [{n: lin.weight.data.clone() for n, lin in block_linears(b).items()} for b in decoder_layers(tiny_lm.model)]
    inputs = allocation.linear_statistics(weights, stats.blocks, ["outlier", "alpha"])
    sizes = allocation.linear_sizes(weights)
    keys = [f"{i}.{n}" for i, n in allocation.linear_keys(weights)]
    expected = {"uniform": [0.7] * len(keys),
                "owl": allocation.allocate_sparsities(-inputs["outlier"], sizes, 0.7, 0.1),
                "alpha": allocation.allocate_sparsities(inputs["alpha"], sizes, 0.7, 0.1)}
    seeds = allocation_seeds()
    assert set(seeds) == set(expected)
    for name, values in expected.items():
        lm = load_model(tiny_lm.path, device="cpu")
        got = prune_model(lm, tiny_data, PruneConfig(method="wanda", sparsity=0.7, allocation="program",
                                                     allocation_program=seeds[name].tree, allocation_lambda=0.1,
                                                     mode="one-pass"))
        assert [got.layer_targets[k] for k in keys] == pytest.approx(values, abs=1e-12), name
    assert len(set(expected["owl"])) > 1 and len(set(expected["alpha"])) > 1

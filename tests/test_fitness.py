import pytest
import torch

from autoprune_ray.compress.eval import perplexity
from autoprune_ray.compress.fitness import PruneEvaluator
from autoprune_ray.compress.prune import PruneConfig, prune_model
from autoprune_ray.operators.seeds import score_seeds


def program(tree, sparsity=0.5, **options) -> PruneConfig:
    return PruneConfig(method="program", program=tree, sparsity=sparsity, **options)


def test_program_fitness_matches_pruning_the_model(tiny_lm, tiny_data, tiny_model_dir):
    from autoprune_ray.compress.models import load_model
    evaluator = PruneEvaluator(tiny_lm, tiny_data)
    seeds = score_seeds()
    dense_ppl = perplexity(tiny_lm, tiny_data.validation, tiny_data.seqlen, progress=False)
    screened = evaluator.screen(program(seeds["wanda"].tree))
    ppl = evaluator.perplexity(screened.value)
    # the same masks as one-pass Wanda through prune_model
    reference = load_model(str(tiny_model_dir), device="cpu")
    prune_model(reference, tiny_data, PruneConfig(method="wanda", sparsity=0.5, mode="one-pass"))
    assert ppl == pytest.approx(perplexity(reference, tiny_data.validation, tiny_data.seqlen, progress=False),
                                rel=1e-6)
    assert screened.columns["sparsity"] == 0.5 and 0 < screened.proxy < 1
    # the evaluator restored the dense weights
    assert perplexity(tiny_lm, tiny_data.validation, tiny_data.seqlen, progress=False) == dense_ppl


@pytest.mark.parametrize("stride", [1, 4])
def test_the_proxy_is_the_mean_relative_error_over_the_rows_it_reads(tiny_lm, tiny_data, stride):
    """Hand computation: for each linear, Σ over rows r ≡ 0 (mod stride) of ΔW_r G ΔW_rᵀ, over
    the same sum for W; the proxy is the mean of these ratios over the linears."""
    evaluator = PruneEvaluator(tiny_lm, tiny_data, proxy_row_stride=stride)
    screened = evaluator.screen(program(score_seeds()["wanda"].tree))
    ratios = []
    for (index, name), mask in screened.value.items():
        w = evaluator.dense[index][name].double()
        gram = evaluator.stats.blocks[index][name].gram.double()
        pruned = w * mask
        rows = [r for r in range(w.shape[0]) if r % stride == 0]
        err = sum(float(pruned[r] @ gram @ pruned[r]) for r in rows)
        base = sum(float(w[r] @ gram @ w[r]) for r in rows)
        ratios.append(err / base)
    assert screened.proxy == pytest.approx(sum(ratios) / len(ratios), rel=1e-4)


def test_proxy_ranks_wanda_above_random_scores(tiny_lm, tiny_data):
    from autoprune_ray.operators.language import parse
    evaluator = PruneEvaluator(tiny_lm, tiny_data)
    wanda = evaluator.screen(program(score_seeds()["wanda"].tree)).proxy
    inverse = evaluator.screen(program(parse("def s(W, A): return 1 / (W.abs() * A)").tree)).proxy
    assert wanda < inverse


def test_non_finite_scores_are_reported(tiny_lm, tiny_data):
    from autoprune_ray.operators.language import parse
    evaluator = PruneEvaluator(tiny_lm, tiny_data)
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        evaluator.screen(program(parse("def s(W): return ((W * 10000) ** 4) ** 4 - ((W * 10000) ** 4) ** 4").tree))


def test_screening_keeps_no_state_and_applied_restores_the_dense_model(tiny_lm, tiny_data):
    """Two screened values measured in either order give the same perplexities: nothing is carried
    between calls; inside `applied` the model is pruned, after it (also after an error) dense."""
    evaluator = PruneEvaluator(tiny_lm, tiny_data)
    seeds = score_seeds()
    dense = [lin.weight.data.clone() for block in evaluator.layers for lin in block.values()]
    a = evaluator.screen(program(seeds["wanda"].tree))
    b = evaluator.screen(program(seeds["magnitude"].tree, granularity="layer"))
    ppl_b_first = evaluator.perplexity(b.value)
    ppl_a = evaluator.perplexity(a.value)
    assert evaluator.perplexity(b.value) == ppl_b_first and ppl_a != ppl_b_first
    with evaluator.applied(a.value):
        zeros = sum(int((lin.weight == 0).sum()) for block in evaluator.layers for lin in block.values())
        assert zeros == sum(int(m.sum()) for m in a.value.values())
    with pytest.raises(RuntimeError, match="boom"):
        with evaluator.applied(a.value):
            raise RuntimeError("boom")
    after = [lin.weight.data for block in evaluator.layers for lin in block.values()]
    assert all(torch.equal(x, y) for x, y in zip(dense, after))


def test_allocation_program_screens_through_the_pruning_driver(tiny_lm, tiny_data):
    """An allocation candidate is a PruneConfig with allocation 'program': its masks have the
    block sparsities the driver's block_targets gives, mean exactly the target."""
    from autoprune_ray.compress.prune import block_targets
    from autoprune_ray.operators.language import parse
    evaluator = PruneEvaluator(tiny_lm, tiny_data)
    cfg = PruneConfig(method="wanda", sparsity=0.5, allocation="program", mode="one-pass",
                      allocation_program=parse("def allocate(depth): return depth", "allocate").tree,
                      allocation_lambda=0.2)
    screened = evaluator.screen(cfg)
    targets = block_targets(tiny_lm, tiny_data, cfg, evaluator.stats)
    # s_l = S + λ·(depth − mean depth) / (max − min): 0.5 ∓ 0.2·0.5 at the first and last block
    assert targets[0] == pytest.approx(0.4) and targets[-1] == pytest.approx(0.6)
    for index, target in enumerate(targets):
        masks = [m for (i, _), m in screened.value.items() if i == index]
        share = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
        assert share == pytest.approx(target, abs=0.02)


def test_the_levels_of_one_program_share_its_scores_and_get_the_masks_of_separate_screens(tiny_lm, tiny_data,
                                                                                           monkeypatch):
    from autoprune_ray.compress import prune
    evaluator = PruneEvaluator(tiny_lm, tiny_data)
    tree = score_seeds()["wanda"].tree
    configs = [program(tree, sparsity) for sparsity in (0.4, 0.6)]
    separate = [evaluator.screen(config) for config in configs]
    calls = []
    monkeypatch.setattr(prune, "program_score", lambda t, env: calls.append(1) or prune_program_score(t, env))
    shared = evaluator.screen_levels(configs)
    assert len(calls) == len(separate[0].value)      # one score per linear, not one per level
    for level, alone in zip(shared.value, separate):
        assert level.keys() == alone.value.keys()
        assert all(torch.equal(level[key], alone.value[key]) for key in level)
    assert shared.proxy == pytest.approx(sum(s.proxy for s in separate) / 2)


def prune_program_score(tree, env):
    from autoprune_ray.compress.program import program_score
    return program_score(tree, env)

import pytest

from autoprune_ray.compress.eval import perplexity
from autoprune_ray.compress.fitness import ProgramEvaluator
from autoprune_ray.compress.prune import PruneConfig, prune_model
from autoprune_ray.operators.seeds import score_seeds


def test_program_fitness_matches_pruning_the_model(tiny_lm, tiny_data, tiny_model_dir):
    from autoprune_ray.compress.models import load_model
    evaluator = ProgramEvaluator(tiny_lm, tiny_data)
    seeds = score_seeds()
    dense_ppl = perplexity(tiny_lm, tiny_data.evaluation, tiny_data.seqlen, progress=False)
    result = evaluator.full(seeds["wanda"].tree, 0.5)
    # the same masks as one-pass Wanda through prune_model
    reference = load_model(str(tiny_model_dir), device="cpu")
    prune_model(reference, tiny_data, PruneConfig(method="wanda", sparsity=0.5, mode="one-pass"))
    assert result.perplexity == pytest.approx(perplexity(reference, tiny_data.evaluation, tiny_data.seqlen,
                                                         progress=False), rel=1e-6)
    assert result.sparsity == 0.5 and 0 < result.proxy < 1
    # the evaluator restored the dense weights
    assert perplexity(tiny_lm, tiny_data.evaluation, tiny_data.seqlen, progress=False) == dense_ppl


def test_proxy_ranks_wanda_above_random_scores(tiny_lm, tiny_data):
    from autoprune_ray.operators.language import parse
    evaluator = ProgramEvaluator(tiny_lm, tiny_data)
    wanda = evaluator.proxy(score_seeds()["wanda"].tree, 0.5).proxy
    inverse = evaluator.proxy(parse("def s(W, A): return 1 / (W.abs() * A)").tree, 0.5).proxy
    assert wanda < inverse


def test_non_finite_scores_are_reported(tiny_lm, tiny_data):
    from autoprune_ray.operators.language import parse
    evaluator = ProgramEvaluator(tiny_lm, tiny_data)
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        evaluator.proxy(parse("def s(W): return ((W * 10000) ** 4) ** 4 - ((W * 10000) ** 4) ** 4").tree, 0.5)

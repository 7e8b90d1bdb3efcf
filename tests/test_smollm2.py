"""The real embedded default: SmolLM2-135M-Instruct on the offline corpus (about a minute on 2 cores)."""
import math

import pytest

pytestmark = pytest.mark.slow


def test_gguf_default_loads_as_llama(user_cache):
    from autoprune_ray.compress.models import decoder_layers, load_model
    lm = load_model("smollm2", device="cpu")
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert len(decoder_layers(lm.model)) == 30
    assert sum(p.numel() for p in lm.model.parameters()) == 134_515_008
    assert lm.model.config.rope_parameters["rope_theta"] == 100000


def test_wanda_beats_magnitude_at_half_sparsity(user_cache):
    from autoprune_ray.compress.data import load_token_data
    from autoprune_ray.compress.eval import perplexity
    from autoprune_ray.compress.models import load_model
    from autoprune_ray.compress.prune import PruneConfig, prune_model

    lm = load_model("smollm2", device="cpu")
    data = load_token_data(lm.tokenizer, "austen", nsamples=16, seqlen=256, seed=0, eval_tokens=4096)
    dense = perplexity(lm, data.evaluation, data.seqlen, progress=False)
    assert math.isfinite(dense) and dense < 100
    ppl = {}
    for method in ("magnitude", "wanda"):
        lm = load_model("smollm2", device="cpu")
        result = prune_model(lm, data, PruneConfig(method=method, sparsity=0.5))
        assert result.sparsity == 0.5
        ppl[method] = perplexity(lm, data.evaluation, data.seqlen, progress=False)
    assert dense < ppl["wanda"] < ppl["magnitude"]


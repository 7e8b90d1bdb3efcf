"""LLaMA-, Qwen2-, Mistral- and OPT-style decoders all calibrate and prune through one walk."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

from autoprune_ray.compress.data import TokenData
from autoprune_ray.compress.eval import perplexity
from autoprune_ray.compress.models import LoadedModel, block_linears, decoder_layers
from autoprune_ray.compress.prune import PruneConfig, prune_model

COMMON = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
CONFIGS = {
    "llama": LlamaConfig(intermediate_size=64, num_key_value_heads=2, **COMMON),
    "qwen2": Qwen2Config(intermediate_size=64, num_key_value_heads=2, **COMMON),
    "mistral": MistralConfig(intermediate_size=64, num_key_value_heads=2, sliding_window=None, **COMMON),
    "opt": OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                     word_embed_proj_dim=32, max_position_embeddings=64),
}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_architecture_prunes_to_exact_sparsity(arch, method):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]).eval()
    model.requires_grad_(False)
    lm = LoadedModel(model=model, tokenizer=None, name=arch, path="")
    data = TokenData(calibration=torch.randint(0, 100, (4, 16)), evaluation=torch.randint(0, 100, (1, 64)),
                     seqlen=16, seed=0, calib_name="random", eval_name="random", calib_source_tokens=64)
    result = prune_model(lm, data, PruneConfig(method=method, sparsity=0.5))
    n_linears = sum(len(block_linears(b)) for b in decoder_layers(model))
    assert len(result.per_layer) == n_linears >= 12
    assert set(result.per_layer.values()) == {0.5}
    assert torch.isfinite(torch.tensor(perplexity(lm, data.evaluation, 16, progress=False)))


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_block_walk_matches_full_forward(arch):
    """Captured block arguments (rotary embeddings, masks) reproduce the model's own forward."""
    from autoprune_ray.compress.stats import walk
    from tests_support import explicit_linear_inputs
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]).eval()
    lm = LoadedModel(model=model, tokenizer=None, name=arch, path="")
    windows = torch.randint(0, 100, (3, 16))
    blocks = walk(lm, windows, with_gram=False, batch_size=2, progress=None)
    for (i, name), x in explicit_linear_inputs(lm, windows).items():
        torch.testing.assert_close(blocks[i][name].norm, x.norm(dim=0), rtol=1e-4, atol=1e-5)

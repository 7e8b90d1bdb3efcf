"""Shared fixtures: a tiny random LLaMA with a real tokenizer, saved as an HF directory."""
import os

# Triton reads this when @triton.jit runs, so it must be set before any kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests_support import pseudo_text  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Statistics written by tests never land in the user's cache."""
    old = os.environ.get("AUTOPRUNE_CACHE")
    os.environ["AUTOPRUNE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("AUTOPRUNE_CACHE", None)
    else:
        os.environ["AUTOPRUNE_CACHE"] = old


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for one module, or the one another module's fixture already started."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def user_cache():
    """The real cache, so the ~30 s GGUF conversion of SmolLM2 happens once per machine, not per run."""
    old = os.environ.get("AUTOPRUNE_CACHE")
    os.environ["AUTOPRUNE_CACHE"] = str(Path.home() / ".cache" / "autoprune-ray")
    yield
    os.environ["AUTOPRUNE_CACHE"] = old


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(pseudo_text(400, seed=1))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, corpus_file) -> Path:
    """A 2-block LLaMA (hidden 32, MLP 64) with a byte-level BPE tokenizer trained on the corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(corpus_file)], trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    # Give the random weights some outlier structure, as trained LLMs have.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 3 * (torch.rand_like(p) > 0.97))
    model.save_pretrained(out)
    return out


@pytest.fixture
def tiny_lm(tiny_model_dir):
    from autoprune_ray.compress.models import load_model
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture
def tiny_data(tiny_lm, corpus_file):
    from autoprune_ray.compress.data import load_token_data
    return load_token_data(tiny_lm.tokenizer, str(corpus_file), nsamples=6, seqlen=32, seed=0, eval_tokens=256, val_tokens=256)

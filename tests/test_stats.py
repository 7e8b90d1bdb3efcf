"""Calibration statistics against an explicit full-model forward pass."""
import numpy as np
import torch

from tests_support import explicit_linear_inputs
from autoprune_ray.compress.stats import CalibrationStats, calibration_stats, stats_path, walk


def test_one_pass_statistics_match_full_forward(tiny_lm, tiny_data):
    blocks = walk(tiny_lm, tiny_data.calibration, with_gram=True, batch_size=4, progress=None)
    inputs = explicit_linear_inputs(tiny_lm, tiny_data.calibration)
    for (i, name), x in inputs.items():
        st = blocks[i][name]
        assert st.tokens == x.shape[0] and st.samples == tiny_data.nsamples
        torch.testing.assert_close(st.norm, x.norm(dim=0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(st.mean, x.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(st.var, x.var(0, unbiased=False), rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(st.gram, x.T @ x, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(st.wanda_norm, x.norm(dim=0) / tiny_data.nsamples ** 0.5, rtol=1e-4, atol=1e-5)


def test_linears_fed_one_tensor_share_one_record(tiny_lm, tiny_data):
    block = walk(tiny_lm, tiny_data.calibration, with_gram=False, progress=None)[0]
    assert block["self_attn.q_proj"] is block["self_attn.k_proj"] is block["self_attn.v_proj"]
    assert block["mlp.gate_proj"] is block["mlp.up_proj"]
    assert block["mlp.down_proj"] is not block["mlp.up_proj"]


def test_batch_size_does_not_leak_between_samples(tiny_lm, tiny_data):
    """A KV cache reused across samples would make batch-of-one results depend on order."""
    a = walk(tiny_lm, tiny_data.calibration, with_gram=False, batch_size=1, progress=None)
    b = walk(tiny_lm, tiny_data.calibration, with_gram=False, batch_size=6, progress=None)
    torch.testing.assert_close(a[1]["mlp.down_proj"].sq_sum, b[1]["mlp.down_proj"].sq_sum, rtol=1e-4, atol=1e-6)


class ZeroFirstBlock:
    signature = "zero-block-0-o_proj"

    def __call__(self, index, block, stats, ctx):
        if index == 0:
            block.self_attn.o_proj.weight.data.zero_()


def test_sequential_mode_sees_pruned_inputs(tiny_lm, tiny_data):
    dense = calibration_stats(tiny_lm, tiny_data, "one-pass", with_gram=False, use_cache=False)
    seq = calibration_stats(tiny_lm, tiny_data, "sequential", hook=ZeroFirstBlock(), with_gram=False,
                            use_cache=False)
    # Block 0's statistics are taken before the hook prunes it; block 1 sees the pruned outputs.
    torch.testing.assert_close(seq.blocks[0]["mlp.down_proj"].sq_sum, dense.blocks[0]["mlp.down_proj"].sq_sum)
    assert not torch.allclose(seq.blocks[1]["self_attn.q_proj"].sq_sum, dense.blocks[1]["self_attn.q_proj"].sq_sum)


def test_statistics_cache_round_trip(tiny_lm, tiny_data):
    first = calibration_stats(tiny_lm, tiny_data, "one-pass", with_gram=True)
    path = stats_path(first.key)
    assert path.exists()
    loaded = CalibrationStats.load(path)
    assert loaded.blocks[1]["self_attn.q_proj"] is loaded.blocks[1]["self_attn.v_proj"]
    torch.testing.assert_close(loaded.blocks[1]["mlp.down_proj"].gram, first.blocks[1]["mlp.down_proj"].gram)
    # a different seed is a different key
    assert first.key["windows"] and stats_path({**first.key, "seed": 1}) != path


def test_shared_statistics_come_back_equal_and_without_a_copy(tiny_lm, tiny_data):
    """What evaluators read from Ray's object store: numpy arrays, viewed as tensors in place."""
    stats = calibration_stats(tiny_lm, tiny_data, with_gram=True, use_cache=False)
    payload = stats.to_shared()
    back = CalibrationStats.from_shared(payload)
    assert back.key == stats.key
    for dense, shared in zip(stats.blocks, back.blocks):
        for name, st in dense.inputs.items():
            for field in ("sum", "sq_sum", "gram"):
                torch.testing.assert_close(getattr(shared[name], field), getattr(st, field), rtol=0, atol=0)
            assert (shared[name].tokens, shared[name].samples) == (st.tokens, st.samples)
    block = back.blocks[0]
    assert block["self_attn.q_proj"] is block["self_attn.v_proj"]
    group = payload["blocks"][0]["groups"][payload["blocks"][0]["members"]["mlp.down_proj"]]
    assert np.shares_memory(block["mlp.down_proj"].gram.numpy(), group["gram"])

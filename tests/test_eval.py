"""Held-out perplexity by window, and the paired interval between two models on the same windows."""
import math

import pytest
import torch
from torch import nn

from autoprune_ray.compress.eval import perplexity, perplexity_ratio_interval, window_nll


def test_window_nll_is_each_windows_mean_nll_and_perplexity_their_exp_mean(tiny_lm, tiny_data):
    tokens, seqlen = tiny_data.evaluation, 32
    nll = window_nll(tiny_lm, tokens, seqlen, batch_size=3, progress=False)
    assert len(nll) == tokens.shape[1] // seqlen
    with torch.no_grad():   # the reference: one window at a time, the loss as the model computes it
        for i in (0, len(nll) - 1):
            window = tokens[:, i * seqlen:(i + 1) * seqlen]
            logits = tiny_lm.model(window).logits[0, :-1]
            expected = float(nn.functional.cross_entropy(logits, window[0, 1:]))
            assert nll[i] == pytest.approx(expected, rel=1e-5)
    assert perplexity(tiny_lm, tokens, seqlen, progress=False) == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-9)


def test_paired_interval_of_a_constant_shift_is_exact_and_of_identical_models_is_one():
    base = [2.0, 3.5, 1.0, 4.0, 2.5]
    assert perplexity_ratio_interval([x + 0.1 for x in base], base) == pytest.approx((math.exp(0.1),) * 3)
    assert perplexity_ratio_interval(base, base) == (1.0, 1.0, 1.0)


def test_paired_interval_brackets_the_ratio_and_narrows_with_more_windows():
    rng = torch.Generator().manual_seed(0)
    b = (torch.rand(400, generator=rng) * 3 + 1).tolist()
    a = [x + 0.05 + 0.2 * (float(torch.rand(1, generator=rng)) - 0.5) for x in b]
    ratio, low, high = perplexity_ratio_interval(a, b)
    assert ratio == pytest.approx(math.exp(sum(x - y for x, y in zip(a, b)) / len(a)))
    assert low < ratio < high and low > 1.0      # a shift of 0.05 with noise ±0.1: clearly above 1
    _, low16, high16 = perplexity_ratio_interval(a[:16], b[:16])
    assert high16 - low16 > high - low


def test_paired_interval_refuses_unpaired_windows():
    with pytest.raises(ValueError, match="paired"):
        perplexity_ratio_interval([1.0, 2.0], [1.0])

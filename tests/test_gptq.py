"""GPTQ checked against an independent, plainest-form computation of the same algorithm, and the
property it exists for: a smaller layer-output error than round-to-nearest."""
import pytest
import torch

from autoprune_ray.compress.data import load_token_data
from autoprune_ray.compress.eval import reconstruction_error
from autoprune_ray.compress.gptq import gptq_quantize
from autoprune_ray.compress.models import load_model
from autoprune_ray.compress.quantize import GPTQBlockHook, QuantConfig, quantize_model
from autoprune_ray.compress.sensitivity import quant_layers
from autoprune_ray.compress.stats import calibration_stats
from autoprune_ray.kernels.quant import fake_quant_reference
from tests_support import correlated_inputs


def plain_grid(group, bits):
    """Asymmetric min-max grid of one group (float64), written out: 0 is always representable."""
    maxq = 2 ** bits - 1
    lo = group.min(dim=1, keepdim=True).values.clamp(max=0)
    hi = group.max(dim=1, keepdim=True).values.clamp(min=0)
    scale = ((hi - lo) / maxq).clamp(min=1e-8)
    zero = torch.clamp(-torch.floor(lo / scale + 0.5), 0, maxq)
    return lambda w: (torch.clamp(torch.floor(w / scale + 0.5) + zero, 0, maxq) - zero) * scale


def reference_gptq(weight, gram, bits, group_size, damp=0.01, act_order=False):
    """OBQ/GPTQ one column at a time, in float64: H⁻¹ by a plain inverse, each column rounded on its
    group's grid (fixed at the group's first column from the error-updated weights), its error
    spread by the row j of H⁻¹, then index j eliminated from H⁻¹ by the Schur complement
    H⁻¹ ← H⁻¹ − H⁻¹[:, j] H⁻¹[j, :] / H⁻¹[j, j] (Frantar et al. 2022, eq. 3). No Cholesky factor,
    no lazy blocks. With `act_order`: columns visited by decreasing H diagonal, every group's grid
    taken from the untouched weights of its contiguous columns beforehand."""
    cols = weight.shape[1]
    order = torch.argsort(gram.diagonal(), descending=True, stable=True) if act_order else torch.arange(cols)
    static = [plain_grid(weight.double()[:, g:g + group_size], bits) for g in range(0, cols, group_size)]
    w = weight.double()[:, order].clone()
    h = gram.double() + damp * gram.diagonal().double().mean() * torch.eye(cols, dtype=torch.float64)
    h_inv = torch.linalg.inv(h[order][:, order])
    q = torch.zeros_like(w)
    for j in range(cols):
        if act_order:
            rounding = static[int(order[j]) // group_size]
        elif j % group_size == 0:
            rounding = plain_grid(w[:, j:j + group_size], bits)
        q[:, j] = rounding(w[:, j:j + 1]).squeeze(1)
        err = (w[:, j] - q[:, j]) / h_inv[j, j]
        w[:, j + 1:] -= err.unsqueeze(1) * h_inv[j, j + 1:].unsqueeze(0)
        h_inv = h_inv - torch.outer(h_inv[:, j], h_inv[j, :]) / h_inv[j, j]
    out = torch.empty_like(q)
    out[:, order] = q
    return out


@pytest.mark.parametrize("bits, group_size, blocksize", [(4, 16, 8), (3, 12, 8), (4, 128, 128), (2, 20, 32)])
def test_gptq_matches_the_plain_column_by_column_reference(bits, group_size, blocksize):
    """Group sizes that straddle blocks and leave a short last group (40 = 2·16 + 8, 3·12 + 4, a
    single group, 2·20). Ours runs the loop in float32 from a float64 Cholesky factor; the
    reference is all float64. Their gap is float32 round-off, ~1e-6 on O(1) weights; a rounding
    decision that flipped would move a weight by a whole grid step (≥ 0.02 here), so 1e-4 both
    tolerates round-off and would catch any flip."""
    x = correlated_inputs(10 + bits, tokens=512, width=40)
    gram = x.T @ x
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(bits))
    ours = gptq_quantize(w, gram, bits, group_size, blocksize=blocksize)
    expected = reference_gptq(w, gram, bits, group_size)
    assert (ours.double() - expected).abs().max() < 1e-4


@pytest.mark.parametrize("bits, group_size, blocksize", [(4, 16, 8), (3, 12, 8), (2, 20, 32)])
def test_act_order_gptq_matches_the_plain_reference(bits, group_size, blocksize):
    """Act-order visits the columns by decreasing XᵀX diagonal; the inputs are scaled so that order
    is far from left to right, and a group's columns are spread over several blocks."""
    x = correlated_inputs(20 + bits, tokens=512, width=40) * torch.linspace(0.2, 3.0, 40).flip(0)[torch.randperm(
        40, generator=torch.Generator().manual_seed(bits))]
    gram = x.T @ x
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(bits))
    ours = gptq_quantize(w, gram, bits, group_size, blocksize=blocksize, act_order=True)
    expected = reference_gptq(w, gram, bits, group_size, act_order=True)
    assert (ours.double() - expected).abs().max() < 1e-4
    assert (ours - gptq_quantize(w, gram, bits, group_size, blocksize=blocksize)).abs().max() > 1e-2


def test_act_order_with_uncorrelated_inputs_is_rtn():
    """A diagonal H moves no error whatever the order, and static grids are RTN's grids."""
    w = torch.randn(8, 24, generator=torch.Generator().manual_seed(2))
    rtn, _ = fake_quant_reference(w, 3, 8)
    gram = torch.diag(torch.linspace(1.0, 5.0, 24)[torch.randperm(24, generator=torch.Generator().manual_seed(3))])
    assert torch.allclose(gptq_quantize(w, gram, 3, 8, act_order=True), rtn, atol=1e-6)


def test_the_reference_is_rtn_when_inputs_are_uncorrelated():
    """A diagonal H moves no error, so the reference itself reduces to round-to-nearest."""
    w = torch.randn(8, 24, generator=torch.Generator().manual_seed(1))
    rtn, _ = fake_quant_reference(w, 3, 8)
    assert torch.allclose(reference_gptq(w, 4 * torch.eye(24), 3, 8).float(), rtn, atol=1e-6)


def test_gptq_output_error_is_below_rtn_on_average():
    """The property GPTQ exists for, at the model's setting (4-bit, group 128, two groups), over
    several seeds: every seed, and the mean ratio well below 1 (it is 0.10–0.22 on these inputs)."""
    ratios = []
    for seed in range(6):
        x = correlated_inputs(seed, tokens=2048, width=256)
        gram = x.T @ x
        w = torch.randn(64, 256, generator=torch.Generator().manual_seed(50 + seed))
        gptq = gptq_quantize(w, gram, 4, 128)
        rtn, _ = fake_quant_reference(w, 4, 128)
        ratios.append(reconstruction_error(w, gptq, gram) / reconstruction_error(w, rtn, gram))
    assert max(ratios) < 1
    assert sum(ratios) / len(ratios) < 0.4


# ---------------------------------------------------------------- the sequential protocol

GROUP = 16


class GramSpy:
    """Records each block's Gram matrices as the walk hands them to the GPTQ hook."""

    def __init__(self, hook):
        self.hook, self.signature, self.grams = hook, hook.signature, []

    def __call__(self, index, block, stats, ctx):
        self.grams.append({name: stats[name].gram.clone() for name in stats.inputs})
        self.hook(index, block, stats, ctx)


def test_sequential_gptq_feeds_quantized_outputs_forward(tiny_model_dir, corpus_file):
    """Block 0 sees the embeddings either way, so its Gram is the dense one and its weights are GPTQ
    of the dense Gram. Block 1's Gram is that of the quantized block 0's outputs: it equals a
    one-pass Gram taken on the model after quantization (q_proj's input is the normalised
    residual, which block 1's own weights do not touch) and differs from the dense one."""
    dense_lm = load_model(str(tiny_model_dir), device="cpu")
    data = load_token_data(dense_lm.tokenizer, str(corpus_file), None, 4, 32, 0, 256)
    dense = calibration_stats(dense_lm, data, "one-pass", with_gram=True, use_cache=False)
    lm = load_model(str(tiny_model_dir), device="cpu")
    layers = quant_layers(lm.model)
    dense_w = {layer.key: layer.linear.weight.data.clone() for layer in layers}
    cfg = QuantConfig(method="uniform", as_uniform=3, group_size=GROUP, quantizer="gptq").validate()
    spy = GramSpy(GPTQBlockHook(layers, [3] * len(layers), cfg))
    calibration_stats(lm, data, "sequential", hook=spy, with_gram=True, use_cache=False)
    after = calibration_stats(lm, data, "one-pass", with_gram=True, use_cache=False)

    assert torch.equal(spy.grams[0]["self_attn.q_proj"], dense.blocks[0]["self_attn.q_proj"].gram)
    q0 = lm.model.model.layers[0].self_attn.q_proj.weight.data
    assert torch.equal(q0, gptq_quantize(dense_w["0.self_attn.q_proj"], dense.blocks[0]["self_attn.q_proj"].gram,
                                         3, GROUP))
    seq1, dense1 = spy.grams[1]["self_attn.q_proj"], dense.blocks[1]["self_attn.q_proj"].gram
    assert torch.allclose(seq1, after.blocks[1]["self_attn.q_proj"].gram, rtol=1e-5, atol=1e-5)
    assert (seq1 - dense1).abs().max() > 1e-3 * dense1.abs().max()

    # quantize_model takes the same walk by default
    again = load_model(str(tiny_model_dir), device="cpu")
    quantize_model(again, data, cfg)
    for a, b in zip(quant_layers(again.model), layers):
        assert torch.equal(a.linear.weight.data, b.linear.weight.data)


@pytest.mark.parametrize("options, label", [({}, "uniform gptq one-pass"),
                                            ({"act_order": True, "damp": 0.05}, "uniform gptq act-order one-pass")])
def test_one_pass_gptq_stays_selectable(tiny_model_dir, corpus_file, options, label):
    """gptq_mode one-pass quantizes every layer from the dense model's Gram matrices, with the
    config's act-order and damping."""
    lm = load_model(str(tiny_model_dir), device="cpu")
    data = load_token_data(lm.tokenizer, str(corpus_file), None, 4, 32, 0, 256)
    dense = calibration_stats(lm, data, "one-pass", with_gram=True, use_cache=False)
    want = {layer.key: gptq_quantize(layer.linear.weight.data, dense.blocks[layer.block][layer.name].gram, 4, GROUP,
                                     **options)
            for layer in quant_layers(lm.model)}
    cfg = QuantConfig(method="uniform", as_uniform=4, group_size=GROUP, quantizer="gptq", gptq_mode="one-pass",
                      **{f"gptq_{k}": v for k, v in options.items()})
    result = quantize_model(lm, data, cfg)
    assert result.config.label == label
    assert all(torch.equal(layer.linear.weight.data, want[layer.key]) for layer in quant_layers(lm.model))
    with pytest.raises(ValueError, match="gptq_mode"):
        QuantConfig(quantizer="gptq", gptq_mode="greedy").validate()
    with pytest.raises(ValueError, match="gptq_damp"):
        QuantConfig(quantizer="gptq", gptq_damp=0.0).validate()

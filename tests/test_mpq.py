"""Mixed-precision quantization (task mpq): sensitivity programs, the expert sensitivities against
independent computations, quantize_model's budget, the `quantize` command, and a search of task mpq
on a real local Ray instance."""
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from autoprune_ray.compress import bits as bitalloc
from autoprune_ray.compress.data import load_token_data
from autoprune_ray.compress.models import block_linears, decoder_layers, load_model
from autoprune_ray.compress.mpq_fitness import MeasureConfig, SensitivityEvaluator
from autoprune_ray.compress.quantize import QuantConfig, quantize_model
from autoprune_ray.compress.sensitivity import (aptq_sensitivity, measured_sensitivity, program_sensitivity,
                                                quant_layers, rank_correlation)
from autoprune_ray.compress.stats import calibration_stats
from autoprune_ray.kernels.quant import fake_quant_reference
from autoprune_ray.operators import symbolic
from autoprune_ray.operators.language import CandidateError, parse
from autoprune_ray.operators.seeds import sensitivity_seeds

GROUP = 16          # the tiny model's widths are 32 and 64


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, corpus_file):
    lm = load_model(str(tiny_model_dir), device="cpu")
    data = load_token_data(lm.tokenizer, str(corpus_file), None, 4, 32, 0, 256)
    return lm, data


# ---------------------------------------------------------------- the language

def test_sensitivity_programs_reduce_to_one_number_and_read_the_error():
    cand = parse("def sensitivity(err, hdiag):\n    return (err ** 2 * hdiag).sum()\n", "mpq")
    assert cand.inputs == ["E", "H"] and cand.code.startswith("def sensitivity(E, H)")
    with pytest.raises(CandidateError, match="one number per layer"):
        parse("def s(E, H):\n    return E ** 2 * H\n", "mpq")
    with pytest.raises(CandidateError, match="depend on the quantization error"):
        parse("def s(W, A):\n    return (W.abs() * A).sum()\n", "mpq")
    assert parse("def s(E, b):\n    return E.abs().mean() * b\n", "mpq").inputs == ["E", "b"]


def test_compress_hawq_tree_is_the_hawq_seed():
    from autoprune_ray.compress.quantize import HAWQ_GRAM
    assert HAWQ_GRAM == sensitivity_seeds()["hawq"].tree


def test_symbolic_operators_give_valid_sensitivity_programs():
    import random
    rng, seeds = random.Random(0), list(sensitivity_seeds().values())
    children = [symbolic.random_candidate(rng, "mpq", 3, tries=1) for _ in range(60)]
    children += [symbolic.MUTATIONS[name](seeds[k % 3], rng) for k, name in enumerate(sorted(symbolic.MUTATIONS) * 5)]
    children += [symbolic.crossover(seeds[0], seeds[1], rng) for _ in range(10)]
    valid = [c for c in children if c is not None]
    assert len(valid) > 40
    for child in valid:   # valid means: it parses back to itself as an mpq program
        assert parse(child.code, "mpq").hash == child.hash


# ---------------------------------------------------------------- sensitivities

def test_program_sensitivity_equals_a_hand_computation(tiny):
    lm, data = tiny
    layers = quant_layers(lm.model)
    stats = calibration_stats(lm, data, "one-pass", with_gram=True)
    dense = [layer.linear.weight.data for layer in layers]
    seeds = sensitivity_seeds()
    got = program_sensitivity(seeds["output-error"].tree, layers, dense, stats, [2, 4], GROUP)
    hawq = program_sensitivity(seeds["hawq"].tree, layers, dense, stats, [2, 4], GROUP)
    for i, layer in enumerate(layers):
        gram = stats.blocks[layer.block][layer.name].gram
        for j, b in enumerate([2, 4]):
            err = fake_quant_reference(dense[i], b, GROUP)[0].float() - dense[i].float()
            assert got[i, j] == pytest.approx(float((err ** 2 * gram.diagonal()).sum()), rel=1e-4)
            assert hawq[i, j] == pytest.approx(float(gram.diagonal().mean() * (err ** 2).sum()), rel=1e-4)
    assert (got[:, 0] > got[:, 1]).all(), "2-bit errors exceed 4-bit errors in every layer"


def test_aptq_sensitivity_of_down_proj_is_its_error_on_the_mlp_output(tiny):
    """Independent check: quantizing down_proj alone changes the MLP output by act @ Eᵀ, where act is
    down_proj's input; the APTQ-style table averages its energy over tokens, each relative to the
    block input's."""
    lm, data = tiny
    windows = data.calibration
    layers = quant_layers(lm.model)
    table = aptq_sensitivity(lm, windows, [2, 3], GROUP)
    block = decoder_layers(lm.model)[0]
    down = block_linears(block)["mlp.down_proj"]
    caught = {}

    def keep(key, tensor):
        caught[key] = tensor.detach().clone()

    hooks = [down.register_forward_hook(lambda _m, a, _o: keep("act", a[0])),
             block.register_forward_pre_hook(lambda _m, a, kw: keep("h", a[0] if a else kw["hidden_states"]),
                                             with_kwargs=True)]
    with torch.no_grad():
        lm.model(windows, use_cache=False)
    for h in hooks:
        h.remove()
    k = [i for i, layer in enumerate(layers) if layer.key == "0.mlp.down_proj"][0]
    for j, b in enumerate([2, 3]):
        err = fake_quant_reference(down.weight.data, b, GROUP)[0].float() - down.weight.data.float()
        per_token = (caught["act"].float() @ err.T).pow(2).sum(-1) / caught["h"].float().pow(2).sum(-1)
        expected = float(per_token.mean())
        assert table[k, j] == pytest.approx(expected, rel=1e-3)
    assert np.isfinite(table).all() and (table >= 0).all()


def test_measured_sensitivity_and_rank_correlation(tiny):
    lm, data = tiny
    values = measured_sensitivity(lm, data.evaluation, data.seqlen, [0, 3, 6], 2, GROUP)
    assert len(values) == 3 and all(math.isfinite(v) for v in values)
    # the model is restored after each layer: the dense loss is unchanged
    again = measured_sensitivity(lm, data.evaluation, data.seqlen, [0], 2, GROUP)
    assert again[0] == pytest.approx(values[0], abs=1e-6)
    rho, tau = rank_correlation([1, 2, 3, 4], [10, 20, 40, 30])
    assert rho == pytest.approx(0.8) and tau == pytest.approx(4 / 6)   # 5 of 6 pairs concordant
    assert all(math.isnan(x) for x in rank_correlation([1, 1, 1], [1, 2, 3]))


# ---------------------------------------------------------------- quantize_model and the command

@pytest.mark.parametrize("cfg", [
    QuantConfig(method="uniform", avg_bits=6.5, group_size=GROUP),
    QuantConfig(method="hawq", avg_bits=4.5, group_size=GROUP),
    QuantConfig(method="hawq", hessian="hutchinson", hutchinson_windows=2, hutchinson_probes=1, avg_bits=4.5,
                group_size=GROUP),
    QuantConfig(method="aptq", avg_bits=4.5, group_size=GROUP, allocator="greedy"),
    QuantConfig(method="hawq", avg_bits=4.5, group_size=GROUP, quantizer="gptq"),
], ids=lambda c: c.label)
def test_quantize_model_meets_the_budget_and_puts_weights_on_the_grid(tiny_model_dir, corpus_file, cfg):
    lm = load_model(str(tiny_model_dir), device="cpu")
    data = load_token_data(lm.tokenizer, str(corpus_file), None, 4, 32, 0, 256)
    result = quantize_model(lm, data, cfg)
    scale_bits = bitalloc.GROUP_OVERHEAD_BITS / GROUP
    assert result.avg_bits <= cfg.avg_bits + 1e-12
    if cfg.method == "uniform":   # 4-bit weights + 2 bits of scales per weight fit 6.5; 8-bit does not
        assert set(result.bits) == {4} and result.avg_bits == pytest.approx(4 + scale_bits)
    else:
        assert len(set(result.bits)) > 1, "a mixed budget gives mixed bits"
    for layer, b in zip(quant_layers(lm.model), result.bits):
        groups = layer.linear.weight.data.float().reshape(layer.linear.out_features, -1, GROUP)
        distinct = max(len(torch.unique(g)) for row in groups for g in row)
        assert distinct <= 2 ** b


def test_quantize_command_prints_perplexity_bits_and_saves(tiny_model_dir, corpus_file, tmp_path):
    from autoprune_ray.engine.cli import main
    out = tmp_path / "q"
    res = CliRunner().invoke(main, ["quantize", "--method", "hawq", "--avg-bits", "4.5", "--group-size", str(GROUP),
                                    "--model", str(tiny_model_dir), "--data", str(corpus_file), "--nsamples", "4",
                                    "--seqlen", "32", "--eval-tokens", "128", "--save", str(out)])
    assert res.exit_code == 0, res.output
    assert "perplexity" in res.output and "bits per layer" in res.output and "q_proj" in res.output
    assert (out / "quantization.json").exists() and (out / "config.json").exists()
    bad = CliRunner().invoke(main, ["quantize", "--avg-bits", "1.0", "--group-size", str(GROUP), "--model",
                                    str(tiny_model_dir), "--data", str(corpus_file), "--protocol", "smoke"])
    assert bad.exit_code != 0 and "below the minimum" in bad.output


def test_sensitivity_evaluator_scores_a_program_and_restores_the_model(tiny):
    lm, data = tiny
    before = [layer.linear.weight.data.clone() for layer in quant_layers(lm.model)]
    ev = SensitivityEvaluator(lm, data, QuantConfig(method="uniform", avg_bits=4.5, group_size=GROUP),
                              MeasureConfig(layers=5, bits=2, tokens=128))
    screened = ev.screen(QuantConfig(method="program", program=sensitivity_seeds()["hawq"].tree))
    ppl = ev.perplexity(screened.value)
    assert screened.columns["avg_bits"] <= 4.5 and math.isfinite(ppl) and 0 < screened.proxy < 1
    assert -1 <= screened.columns["spearman"] <= 1 and -1 <= screened.columns["kendall"] <= 1
    assert all(torch.equal(a, layer.linear.weight.data) for a, layer in zip(before, quant_layers(lm.model)))


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_the_evaluators_rounding_cache_gives_what_recomputing_gives(tiny, quantizer):
    """The table, the first stage's errors and the applied weights come from weights rounded once
    per evaluator; each must equal a fresh computation (RTN for E, the fitness quantizer for the
    model), and scoring one candidate must not change what the next one gets."""
    from autoprune_ray.compress.eval import reconstruction_error
    from autoprune_ray.compress.gptq import gptq_quantize
    lm, data = tiny
    quant = QuantConfig(method="uniform", avg_bits=4.5, group_size=GROUP, quantizer=quantizer, gptq_mode="one-pass")
    ev = SensitivityEvaluator(lm, data, quant, MeasureConfig(layers=3, bits=2, tokens=128))
    layers, choices = quant_layers(lm.model), list(quant.choices)
    dense = [layer.linear.weight.data.clone() for layer in layers]
    stats = calibration_stats(lm, data, "one-pass", with_gram=True)
    programs = [sensitivity_seeds()[name].tree for name in ("output-error", "hawq")]
    for tree in programs:
        np.testing.assert_allclose(ev.table(tree), program_sensitivity(tree, layers, dense, stats, choices, GROUP),
                                   rtol=1e-6)
    for i, (layer, w) in enumerate(zip(layers, dense)):
        gram = stats.blocks[layer.block][layer.name].gram
        for j, b in enumerate(choices):
            fresh = gptq_quantize(w, gram, b, GROUP) if quantizer == "gptq" else fake_quant_reference(w, b, GROUP)[0]
            expected = reconstruction_error(w, fresh, gram) / reconstruction_error(w, torch.zeros_like(w), gram)
            assert ev.relative_error[i, j] == pytest.approx(expected, rel=1e-5)
    bits = [choices[i % len(choices)] for i in range(len(layers))]
    alone = ev.perplexity(bits)
    ev.perplexity(ev.screen(QuantConfig(method="program", program=programs[1])).value)
    assert ev.perplexity(bits) == alone
    ev._apply(bits)
    try:
        for i, (layer, w, b) in enumerate(zip(layers, dense, bits)):
            gram = stats.blocks[layer.block][layer.name].gram
            fresh = gptq_quantize(w, gram, b, GROUP) if quantizer == "gptq" else fake_quant_reference(w, b, GROUP)[0]
            torch.testing.assert_close(layer.linear.weight.data, fresh)
    finally:
        ev.restore()


def test_as_uniform_budget_is_exactly_what_uniform_costs(tiny_model_dir, corpus_file):
    """Group 24 does not divide the widths 32 and 64, so uniform 3-bit costs more than 3 + 32/24 bits;
    `as_uniform` makes the budget that exact size, which uniform fills and a mixed allocation respects."""
    lm = load_model(str(tiny_model_dir), device="cpu")
    data = load_token_data(lm.tokenizer, str(corpus_file), None, 4, 32, 0, 256)
    sizes = [bitalloc.LayerSize(layer.key, *layer.linear.weight.shape) for layer in quant_layers(lm.model)]
    # 32 wide: 2 groups per row (24 + 8); 64 wide: 3 (24 + 24 + 16)
    expected = sum(s.numel * 3 + s.rows * math.ceil(s.cols / 24) * 32 for s in sizes) / sum(s.numel for s in sizes)
    assert expected > 3 + 32 / 24
    mixed = quantize_model(lm, data, QuantConfig(method="hawq", as_uniform=3, group_size=24))
    assert mixed.budget == pytest.approx(expected) and mixed.avg_bits <= mixed.budget
    for width in (3, 4):   # uniform fills its own budget exactly (a float budget fell just short of 4)
        lm = load_model(str(tiny_model_dir), device="cpu")
        uniform = quantize_model(lm, None, QuantConfig(method="uniform", as_uniform=width, group_size=24))
        assert set(uniform.bits) == {width} and uniform.avg_bits == uniform.budget
    assert uniform.avg_bits == pytest.approx(expected + 1)
    with pytest.raises(ValueError, match="not one of the bit choices"):
        QuantConfig(as_uniform=5).validate()


def test_uniform_fills_its_own_budget_at_smollm2_shapes():
    """SmolLM2-135M's 210 linears: the budget of uniform 4-bit as a float (4.2708…) lies just below
    the exact cost, which once gave uniform 3-bit; the budget is now an exact fraction."""
    from autoprune_ray.compress.quantize import allocate_bits
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30
    sizes = [bitalloc.LayerSize(f"{i}", rows, cols) for i, (rows, cols) in enumerate(shapes)]
    for width in (2, 3, 4, 8):
        cfg = QuantConfig(method="uniform", as_uniform=width).validate()
        assert allocate_bits(None, cfg, sizes) == [width] * len(sizes)
        assert bitalloc.average_bits(sizes, [width] * len(sizes), 128) == pytest.approx(float(cfg.budget(sizes)))


def test_quantize_command_chooses_gptq_calibration(tiny_model_dir, corpus_file):
    import json
    from autoprune_ray.engine.cli import main
    for mode, extra in (("sequential", ["--act-order", "--gptq-damp", "0.05"]), ("one-pass", [])):
        res = CliRunner().invoke(main, ["quantize", "--as-uniform", "4", "--group-size", str(GROUP), "--quantizer",
                                        "gptq", "--gptq-mode", mode, "--model", str(tiny_model_dir), "--data",
                                        str(corpus_file), "--nsamples", "4", "--seqlen", "32", "--eval-tokens", "128",
                                        "--json", *extra])
        assert res.exit_code == 0, res.output
        result = json.loads(res.output[res.output.index("{"):])
        assert result["config"]["gptq_mode"] == mode
        assert (result["config"]["gptq_act_order"], result["config"]["gptq_damp"]) == (
            (True, 0.05) if extra else (False, 0.01))

"""The quantization benchmarks' row definitions: what each label on the command line measures."""
import click
import pytest
from tests_support import load_benchmark


def test_gptq_variants_name_their_options():
    options = load_benchmark("gptq_options")
    got = {v: options.variant_config(v, 4) for v in ("rtn", "gptq", "gptq+act", "gptq@0.1", "gptq+act@0.001")}
    assert {v: (c.quantizer, c.gptq_act_order, c.gptq_damp, c.as_uniform, c.method) for v, c in got.items()} == {
        "rtn": ("rtn", False, 0.01, 4, "uniform"), "gptq": ("gptq", False, 0.01, 4, "uniform"),
        "gptq+act": ("gptq", True, 0.01, 4, "uniform"), "gptq@0.1": ("gptq", False, 0.1, 4, "uniform"),
        "gptq+act@0.001": ("gptq", True, 0.001, 4, "uniform")}
    assert got["gptq"].gptq_mode == "sequential"
    for bad in ("rtn+act", "rtn@0.1", "gptq+desc", "awq"):
        with pytest.raises(click.BadParameter, match=bad.replace("+", r"\+")):
            options.variant_config(bad, 4)
    with pytest.raises(ValueError, match="gptq_damp"):
        options.variant_config("gptq@0", 4)


def test_mpq_rows_include_the_dense_model_on_request():
    mpq = load_benchmark("discovered_mpq")
    rows = mpq.configs([], ["uniform", "dense"], 3, "gptq")
    assert [label for label, _ in rows] == ["uniform", "dense"]
    assert rows[1][1] is None and rows[0][1].quantizer == "gptq"
    assert [label for label, _ in mpq.configs([], ["uniform"], 3, "gptq")] == ["uniform"]
    assert not rows[0][1].gptq_act_order and mpq.configs([], ["uniform"], 3, "gptq", True)[0][1].gptq_act_order

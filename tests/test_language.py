"""The candidate language: parsing LLM-style programs, canonical hashing, pretty-printing,
and the symbolic operators."""
import importlib.util
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autoprune_ray.tree import expr
from autoprune_ray.operators import symbolic
from autoprune_ray.operators.language import CandidateError, parse
from autoprune_ray.operators.seeds import score_seeds

ENV = {"W": torch.randn(5, 7), "G": torch.rand(5, 7), "A": torch.rand(1, 7) + 0.1, "M": torch.randn(1, 7),
       "V": torch.rand(1, 7), "H": torch.rand(1, 7), "d": torch.tensor(0.3)}


def value(src):
    return expr.evaluate(parse(src).tree, ENV)


def test_llm_style_completion_is_extracted_and_accepted():
    text = ("Here is an improved metric.\n```python\nimport torch\n\ndef score_new_new(weight, act, G):\n"
            "    \"\"\"Weight times activation.\"\"\"\n    s = torch.abs(weight)\n    s = s * act.sqrt()\n"
            "    return s + 0.1 * G\n```\nIt should work better.")
    cand = parse(text)
    assert cand.inputs == ["W", "G", "A"]
    torch.testing.assert_close(expr.evaluate(cand.tree, ENV), ENV["W"].abs() * ENV["A"].sqrt() + 0.1 * ENV["G"])


def test_torch_and_plain_styles_mean_the_same():
    a = parse("def score(W, A): return torch.sqrt(torch.abs(W)) * A.sum(dim=1, keepdim=True)")
    b = parse("def f(W, A):\n    return sqrt(abs(W)) * A.sum(1)")
    assert a.hash == b.hash


@pytest.mark.parametrize("src,reference", [
    ("def s(W): return W / W.abs().sum(dim=1, keepdim=True)", lambda e: e["W"] / e["W"].abs().sum(1, keepdim=True)),
    ("def s(W): return W - W.abs().max(dim=0)[0]", lambda e: e["W"] - e["W"].abs().amax(0, keepdim=True)),
    ("def s(W): return W * W.std(dim=1)", lambda e: e["W"] * e["W"].std(1, keepdim=True, unbiased=False)),
    ("def s(W): return W + W.norm(p=2, dim=0)", lambda e: e["W"] + e["W"].norm(dim=0, keepdim=True)),
    ("def s(W, V): return W / V.mean()", lambda e: e["W"] / e["V"].mean()),
    ("def s(W): return torch.clamp(W, min=-0.5, max=0.5)", lambda e: e["W"].clamp(-0.5, 0.5)),
    ("def s(W): return W.clamp(min=0)", lambda e: e["W"].clamp(min=0)),
    ("def s(W): return torch.clip(W, None, 0.25)", lambda e: e["W"].clamp(max=0.25)),
    ("def s(W): return torch.norm(W, 2, 1) * W", lambda e: e["W"].norm(dim=1, keepdim=True) * e["W"]),
    ("def s(W, M): return torch.maximum(W, M) - min(W, M)", lambda e: torch.maximum(e["W"], e["M"]) - torch.minimum(e["W"], e["M"])),
    ("def s(W, d): return torch.sigmoid(W) * torch.tanh(W) + d", lambda e: torch.sigmoid(e["W"]) * torch.tanh(e["W"]) + e["d"]),
    ("def s(W, eps=1e-3):\n    x = W ** 2\n    x += eps\n    return x.log1p()", lambda e: torch.log1p(e["W"] ** 2 + 1e-3)),
])
def test_semantics_against_hand_written_torch(src, reference):
    torch.testing.assert_close(value(src).expand(5, 7), reference(ENV).expand(5, 7), rtol=1e-5, atol=1e-6)


def test_guarded_operations_stay_finite():
    out = value("def s(W, M): return (W - W) / (M - M) + (-W).sqrt() + W ** -2")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("src,reason", [
    ("def s(W): return W.item()", "function `item` is not allowed"),
    ("def s(W): return W ** W", "exponent must be a number literal"),
    ("def s(W): return W.sum()", "one value per weight"),
    ("def s(W, Q): return W", "unknown parameter `Q`"),
    ("def s(W): return W + y", "unknown name `y`"),
    ("def s(W): return W.log()", "log1p"),
    ("def s(W):\n    x = W\n    return x\n    return W", "only one `return`"),
    ("def s(W): return W if W else W", "IfExp"),
    ("def s(W): return W.clamp(min=2, max=1)", "reversed"),
])
def test_rejections_say_why(src, reason):
    with pytest.raises(CandidateError, match=None) as info:
        parse(src)
    assert reason in str(info.value)


def test_reused_locals_cannot_blow_up():
    body = "\n".join("    x = x * x + x" for _ in range(40))
    with pytest.raises(CandidateError, match="too large"):
        parse(f"def s(W):\n    x = W\n{body}\n    return x")


# -- the reference evaluator: shared subtrees once, intermediates freed ----------------------

def _memory_benchmark():
    """benchmarks/expr_memory.py by path (benchmarks/ is no package): its live-bytes counter."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "expr_memory.py"
    spec = importlib.util.spec_from_file_location("_benchmarks_expr_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluation_frees_intermediates_and_computes_shared_subtrees_once():
    bench = _memory_benchmark()
    env = bench.layer_inputs(32, 48)
    tree = parse(bench.DEEP_PROGRAM).tree
    kept, _ = bench.peak_bytes(lambda: expr.evaluate(tree, env, memo={}))
    freed, _ = bench.peak_bytes(lambda: expr.evaluate(tree, env))
    matrix = 32 * 48 * 4
    assert freed <= 6 * matrix and kept >= 20 * matrix
    torch.testing.assert_close(expr.evaluate(tree, env), expr.evaluate(tree, env, memo={}))
    shared = parse("def s(W, A):\n    a = torch.sigmoid(W)\n    return a * A + a").tree   # sigmoid, mul, add
    assert bench.peak_bytes(lambda: expr.evaluate(shared, env))[1] == 3


# -- canonical form: names, order, grouping and parentheses do not change the hash ------------

INPUTS = ["W", "G", "A", "M"]


@st.composite
def programs(draw, depth=3):
    """(source, source with renamed parameters, reordered operands and extra parentheses)."""
    def build(d):
        if d == 0 or draw(st.booleans()) and d < 3:
            name = draw(st.sampled_from(INPUTS))
            return name, "p_" + name.lower()
        kind = draw(st.sampled_from(["add", "mul", "sub", "abs", "sqrt"]))
        if kind in ("abs", "sqrt"):
            a, ra = build(d - 1)
            return f"{kind}({a})", f"torch.{kind}((({ra})))"
        (a, ra), (b, rb) = build(d - 1), build(d - 1)
        sym = {"add": "+", "mul": "*", "sub": "-"}[kind]
        if kind == "sub":
            return f"({a} - {b})", f"(({ra}) - ({rb}))"
        return f"({a} {sym} {b})", f"(({rb}) {sym} ({ra}))"   # commuted
    src, renamed = build(depth)
    return (f"def score(W, G, A, M):\n    return W * {src}\n",
            f"def other(weight, grad, act, mean):\n    t = {renamed}\n    return t * weight\n")


@settings(max_examples=60, deadline=None)
@given(programs())
def test_hash_is_invariant_under_renaming_reordering_and_parentheses(pair):
    original, variant = pair
    variant = variant.replace("p_w", "weight").replace("p_g", "grad").replace("p_a", "act").replace("p_m", "mean")
    a, b = parse(original), parse(variant)
    assert a.hash == b.hash
    torch.testing.assert_close(expr.evaluate(a.tree, ENV), expr.evaluate(b.tree, ENV), rtol=1e-4, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(programs())
def test_pretty_print_round_trips(pair):
    cand = parse(pair[0])
    again = parse(cand.code)
    assert again.hash == cand.hash and again.tree == cand.tree


def test_associative_regrouping_hashes_the_same():
    assert parse("def s(W, A, G): return (W * A) * G").hash == parse("def s(W, A, G): return W * (G * A)").hash
    assert parse("def s(W, A): return W - A").hash != parse("def s(W, A): return A - W").hash


# -- symbolic operators --------------------------------------------------------------------

@pytest.mark.parametrize("op", sorted(symbolic.MUTATIONS))
def test_mutations_produce_valid_distinct_candidates(op):
    rng = random.Random(0)
    parents = list(score_seeds().values()) + [parse("def s(W, A): return W.abs() * A ** 0.5 + 0.1 * W ** 2")]
    children = [symbolic.MUTATIONS[op](p, rng) for p in parents for _ in range(10)]
    made = [c for c in children if c is not None]
    assert len(made) >= len(children) // 2 or op == "constant"   # seeds without constants have none to perturb
    assert made
    for child in made:
        again = parse(child.code)               # valid in the language, round-trips
        assert again.hash == child.hash
        assert child.hash not in {p.hash for p in parents}


def test_crossover_mixes_parents():
    rng = random.Random(1)
    seeds = score_seeds()
    kids = [symbolic.crossover(seeds["wanda"], seeds["weight-gradient"], rng) for _ in range(20)]
    kids = [k for k in kids if k is not None]
    assert kids and all(parse(k.code).hash == k.hash for k in kids)
    assert any("G" in k.inputs and "A" in k.inputs for k in kids)

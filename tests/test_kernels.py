"""The fused Triton pruning kernel against its torch reference (tree.expr + kernels.select).

Under TRITON_INTERPRET=1 (CI) the generated kernels run on the CPU. On a GPU machine run
`TRITON_INTERPRET=0 pytest tests/test_kernels.py` and the same tests run compiled on CUDA."""
import os
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoprune_ray.tree import expr
from autoprune_ray.tree.expr import call, inp
from autoprune_ray.kernels.fused import (compiled_count, prune_mask, reference_mask, reference_score,
                                         resolve_backend, triton_mask)
from autoprune_ray.kernels.select import nm_mask, row_mask
from autoprune_ray.operators.language import parse
from autoprune_ray.operators.seeds import score_seeds
from autoprune_ray.operators.symbolic import random_tree

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
SEEDS = score_seeds()


def expected_row_counts(rows: int, cols: int, sparsity: float) -> list[int]:
    """row_mask's contract: round(s·rows·cols) in all, the first T % rows rows one more."""
    total = round(rows * cols * sparsity)
    return [total // rows + (r < total % rows) for r in range(rows)]


def sorted_reference(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Each row's k_r lowest scores by a stable sort (equal scores left to right), -0.0 equal to 0.0."""
    rows, cols = score.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    order = torch.sort(score.cpu(), dim=1, stable=True)[1]
    for r, k in enumerate(expected_row_counts(rows, cols, sparsity)):
        mask[r, order[r, :k]] = True
    return mask.to(score.device)


def layer_env(rows: int, cols: int, seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    env = {"W": torch.randn(rows, cols, generator=g).to(dtype), "G": torch.rand(rows, cols, generator=g),
           "A": torch.rand(1, cols, generator=g) + 0.05, "M": torch.randn(1, cols, generator=g),
           "V": torch.rand(1, cols, generator=g), "H": torch.rand(1, cols, generator=g) * 10,
           "d": torch.tensor(0.25)}
    return {name: t.to(DEVICE) for name, t in env.items()}


@pytest.mark.parametrize("seed_name", sorted(SEEDS))
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_seed_masks_equal_reference_exactly(seed_name, sparsity):
    # the seeds use exactly rounded operations only, so the masks must agree bit for bit
    env = layer_env(5, 37, seed=len(seed_name))
    tree = SEEDS[seed_name].tree
    mask = triton_mask(tree, env, sparsity)
    assert torch.equal(mask, reference_mask(tree, env, sparsity))
    assert mask.sum(1).tolist() == expected_row_counts(5, 37, sparsity)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 2)])
def test_seed_nm_masks_equal_reference_and_write_pruned_weights(nm):
    env = layer_env(4, 32, seed=7, dtype=torch.float16)
    tree = SEEDS["wanda"].tree
    out = torch.empty_like(env["W"])
    mask = triton_mask(tree, env, 0.0, nm, out=out)
    assert torch.equal(mask, reference_mask(tree, env, 0.0, nm))
    assert (mask.reshape(4, -1, nm[1]).sum(-1) == nm[0]).all()
    assert torch.equal(out, env["W"].masked_fill(mask, 0))


def test_ties_are_pruned_left_to_right_like_a_stable_sort():
    env = {"W": torch.tensor([[1.0, -1.0, 0.0, -0.0, 1.0, 2.0], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]]).to(DEVICE)}
    tree = call("abs", inp("W"))
    # |W| = [1, 1, 0, 0, 1, 2]: both zeros (-0.0 equals 0.0), then the leftmost of the three 1s
    assert triton_mask(tree, env, 0.5).tolist() == [[True, False, True, True, False, False],
                                                   [True, True, True, False, False, False]]
    nm = triton_mask(tree, {"W": env["W"][:, :4].contiguous()}, 0.0, (2, 4))
    assert nm.tolist() == [[False, False, True, True], [True, True, False, False]]


@pytest.mark.parametrize("rows,cols,sparsity", [(3, 576, 0.7), (1, 7, 0.3), (4, 7, 0.3), (6, 9, 0.5),
                                                  (3, 3, 0.5), (5, 1, 0.5), (2, 40, 0.9)])
def test_per_row_counts_make_the_layer_total_exact(rows, cols, sparsity):
    env = layer_env(rows, cols, seed=rows + cols)
    tree = SEEDS["wanda"].tree
    score = torch.empty(rows, cols, device=DEVICE)
    mask = triton_mask(tree, env, sparsity, score_out=score)
    assert int(mask.sum()) == round(sparsity * rows * cols)
    assert mask.sum(1).tolist() == expected_row_counts(rows, cols, sparsity)
    assert torch.equal(mask, reference_mask(tree, env, sparsity))
    assert torch.equal(mask, sorted_reference(score, sparsity))


def test_ties_with_per_row_counts_are_pruned_left_to_right():
    # 3·5·0.5 = 7.5 rounds to 8: rows prune 3, 3, 2; every row ties, so the leftmost go
    env = {"W": torch.tensor([[1.0] * 5, [0.0, -0.0, 0.0, -0.0, 0.0], [2.0, 1.0, 1.0, 1.0, 1.0]]).to(DEVICE)}
    tree = call("abs", inp("W"))
    mask = triton_mask(tree, env, 0.5)
    assert mask.tolist() == [[True, True, True, False, False], [True, True, True, False, False],
                             [False, True, True, False, False]]
    assert torch.equal(mask, reference_mask(tree, env, 0.5))
    assert torch.equal(mask, sorted_reference(env["W"].abs(), 0.5))


def random_program(seed: int):
    """A random valid prune program from the language's own generator (canonical, checked)."""
    rng = random.Random(seed)
    while True:
        try:
            return parse_tree(random_tree(rng, "prune", depth=rng.randint(1, 4)))
        except ValueError:
            continue


def parse_tree(tree):
    from autoprune_ray.operators.canonical import canonicalize
    from autoprune_ray.operators.language import check_tree
    from autoprune_ray.operators.specs import PRUNE
    tree = canonicalize(tree)
    check_tree(tree, PRUNE)
    return tree


def run_both(tree, env, sparsity, nm=None):
    """(reference outcome, kernel outcome, kernel score); an outcome is a mask or 'non-finite'."""
    try:
        ref = reference_score(tree, env)
    except FloatingPointError:
        ref = "non-finite"
    score = torch.empty(env["W"].shape, device=DEVICE)
    try:
        got = triton_mask(tree, env, sparsity, nm, score_out=score)
    except FloatingPointError:
        got = "non-finite"
    return ref, got, score


@settings(max_examples=int(os.environ.get("KERNEL_EXAMPLES", 40)), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), rows=st.integers(1, 5), cols=st.integers(1, 48),
       sparsity=st.floats(0.0, 0.95))
def test_random_programs_match_the_reference(seed, rows, cols, sparsity):
    tree = random_program(seed)
    env = layer_env(rows, cols, seed)
    ref, got, score = run_both(tree, env, sparsity)
    assert (isinstance(ref, str)) == (isinstance(got, str)), f"NaN/Inf reported by one side only: {tree}"
    if isinstance(got, str):
        return
    scale = ref.abs().max().item() + 1e-30
    torch.testing.assert_close(score, ref, rtol=2e-5, atol=2e-6 * scale)
    # selection is exact on the kernel's own scores ...
    assert torch.equal(got, row_mask(score, sparsity))
    assert torch.equal(got, sorted_reference(score, sparsity))
    counts = expected_row_counts(rows, cols, sparsity)
    assert got.sum(1).tolist() == counts
    # ... and differs from the reference mask only among near-ties of the row's k-th score
    differ = got != reference_mask(tree, env, sparsity)
    for r, k in enumerate(counts):
        if differ[r].any():
            kth = ref[r].kthvalue(k).values
            assert torch.allclose(ref[r][differ[r]], kth.expand(int(differ[r].sum())), rtol=1e-4, atol=1e-5 * scale)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), rows=st.integers(1, 4), groups=st.integers(1, 6),
       nm=st.sampled_from([(1, 2), (2, 4), (3, 4), (4, 8)]))
def test_random_programs_give_valid_nm_masks(seed, rows, groups, nm):
    tree = random_program(seed)
    env = layer_env(rows, groups * nm[1], seed)
    ref, got, score = run_both(tree, env, 0.0, nm)
    assert (isinstance(ref, str)) == (isinstance(got, str))
    if not isinstance(got, str):
        assert torch.equal(got, nm_mask(score, *nm))
        assert (got.reshape(rows, groups, nm[1]).sum(-1) == nm[0]).all()


def test_non_finite_scores_are_reported_not_masked():
    env = layer_env(3, 16, seed=1)
    env["W"][1, 3] = 1e30
    env["A"] = env["A"].clone()
    env["A"][0, 3] = 1e30
    tree = call("sub", call("square", inp("W")), call("square", inp("A")))   # inf - inf
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        triton_mask(tree, env, 0.5)
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        prune_mask(tree, env, 0.5, backend="torch")


def test_a_candidate_compiles_once_per_process():
    env = layer_env(2, 8, seed=3)
    first = parse("def score(W, A):\n    return (A * W.abs()).sqrt()\n").tree
    renamed = parse("def metric(weight, act):\n    s = torch.sqrt(torch.abs(weight) * act)\n    return s\n").tree
    triton_mask(first, env, 0.5)
    before = compiled_count()
    triton_mask(renamed, env, 0.25)
    triton_mask(first, env, 0.0, (2, 4))
    assert compiled_count() == before


def test_backend_choice_and_fallbacks():
    env = layer_env(2, 12, seed=4)
    tree = SEEDS["wanda"].tree
    assert resolve_backend("auto", env["W"]) == ("triton" if env["W"].is_cuda else "torch")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        prune_mask(tree, env, 0.5, backend="cuda")
    # a group width that is not a power of two runs the reference, with the same result
    assert torch.equal(prune_mask(tree, env, 0.0, (1, 3), backend="triton"), reference_mask(tree, env, 0.0, (1, 3)))
    out = env["W"].clone()
    mask = prune_mask(tree, env, 0.5, backend="torch", out=out)
    assert torch.equal(out, env["W"].masked_fill(mask, 0))


def test_reductions_are_precomputed_on_the_host():
    env = layer_env(3, 10, seed=5)
    tree = parse("def score(W, H):\n    a = W.abs()\n    return a / a.norm(dim=0, keepdim=True) * H.max(dim=1, keepdim=True)\n").tree
    ref, got, score = run_both(tree, env, 0.4)
    torch.testing.assert_close(score, ref)
    assert expr.to_string(tree).count("_col") + expr.to_string(tree).count("_row") == 2

"""Clamps with one bound (x.clamp(min=0), x.clamp(max=c)) in the generated Triton kernel, against
the torch reference. Under TRITON_INTERPRET=1 the kernel runs on the CPU; shapes stay tiny."""
import os

import pytest
import torch

from autoprune_ray.kernels.fused import reference_mask, reference_score, triton_mask
from autoprune_ray.operators.language import parse

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

PROGRAMS = [
    "def score(W, A):\n    return (W * A).clamp(min=0)\n",
    "def score(W, A):\n    return torch.clamp(W.abs() * A, max=0.5)\n",
    "def score(W, M):\n    return W.clamp(min=-0.25) + M.clamp(max=0.0)\n",
    "def score(W):\n    return torch.clip(W, -0.5, 0.5)\n",
]


@pytest.mark.parametrize("program", PROGRAMS)
def test_clamps_match_the_reference(program):
    tree = parse(program).tree            # generating its kernel called float(None) for an absent bound
    g = torch.Generator().manual_seed(0)
    env = {"W": torch.randn(3, 16, generator=g), "A": torch.rand(1, 16, generator=g) + 0.1,
           "M": torch.randn(1, 16, generator=g)}
    env = {name: t.to(DEVICE) for name, t in env.items()}
    score = torch.empty(3, 16, device=DEVICE)
    mask = triton_mask(tree, env, 0.5, score_out=score)
    torch.testing.assert_close(score, reference_score(tree, env), rtol=0, atol=0)
    assert torch.equal(mask, reference_mask(tree, env, 0.5))   # ties at a bound pruned left to right alike

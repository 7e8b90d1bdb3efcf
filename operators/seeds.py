"""Expert seeds written in the candidate language. Each reproduces a compress/ baseline exactly:
the same mask for a score seed, the same block sparsities for an allocation seed."""
from __future__ import annotations

from autoprune_ray.operators.language import Candidate, parse

SCORE_SEEDS = {
    # magnitude thresholds the whole matrix, the others compare within each output row
    "magnitude": ("def score(W):\n    return W.abs()\n", "layer"),
    "wanda": ("def score(W, A):\n    return W.abs() * A\n", "row"),
    "ria": ("def score(W, A):\n"
            "    a = W.abs()\n"
            "    relative = a / a.sum(dim=0, keepdim=True) + a / a.sum(dim=1, keepdim=True)\n"
            "    return relative * A.sqrt()\n", "row"),
    "weight-gradient": ("def score(W, G):\n    return W.abs() * G\n", "row"),   # LLM-Barber's |W|·|∇W|
}

ALLOCATION_SEEDS = {
    "uniform": "def allocate(depth):\n    return 0 * depth\n",
    # OWL: blocks with more outliers keep more weights (λ here = 2 · OWL's λ)
    "owl": "def allocate(outlier):\n    return -outlier\n",
}


def score_seeds() -> dict[str, Candidate]:
    return {name: parse(src, "prune", granularity) for name, (src, granularity) in SCORE_SEEDS.items()}


def allocation_seeds() -> dict[str, Candidate]:
    return {name: parse(src, "allocate") for name, src in ALLOCATION_SEEDS.items()}

"""Expert seeds written in the candidate language. A score seed gives the same mask as its
compress/ baseline and a mixed-precision seed the same per-(layer, bits) sensitivities. The
allocation seeds are the published allocations' rules applied per linear layer (the rows of an
allocation program), so OWL and AlphaPruning-style seeds differ from the per-block baselines."""
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
    # OWL's rule per linear, not per block as published: layers with more outliers keep more weights
    # (with equal layer sizes the map is OWL's with λ here = 2 · OWL's λ)
    "owl": "def allocate(outlier):\n    return -outlier\n",
    # AlphaPruning's rule per linear (its layer-wise mapping): a higher alpha, a less heavy-tailed
    # spectrum (less well trained), is pruned more
    "alpha": "def allocate(alpha):\n    return alpha\n",
}


# Mixed-precision sensitivity proxies (task mpq): one number per (layer, bit width).
SENSITIVITY_SEEDS = {
    # HAWQ-v3's Ω = Tr(H)/n · ||Q(W) − W||², with the layer-output Hessian X Xᵀ standing in for Tr(H)/n
    "hawq": "def sensitivity(E, H):\n    return H.mean() * (E ** 2).sum()\n",
    # the diagonal of ||(Q(W) − W) X||²: each input channel's error weighted by its energy
    "output-error": "def sensitivity(E, H):\n    return (E ** 2 * H).sum()\n",
    "weight-error": "def sensitivity(E):\n    return (E ** 2).sum()\n",
}


def score_seeds() -> dict[str, Candidate]:
    return {name: parse(src, "prune", granularity) for name, (src, granularity) in SCORE_SEEDS.items()}


def allocation_seeds() -> dict[str, Candidate]:
    return {name: parse(src, "allocate") for name, src in ALLOCATION_SEEDS.items()}


def sensitivity_seeds() -> dict[str, Candidate]:
    return {name: parse(src, "mpq") for name, src in SENSITIVITY_SEEDS.items()}


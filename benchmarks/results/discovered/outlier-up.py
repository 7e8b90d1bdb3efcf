"""Found by a symbolic mutation of the OWL-Wanda seed in benchmarks/fitness_stages.py (task joint,
SmolLM2-135M, validation split of the Austen search corpus): prune linears with MORE Wanda-score
outliers more, per linear layer: the opposite of OWL's per-block rule. `allocate(outlier): return
tanh(outlier)` ranked alike. Applied with allocation.lam 0.16 (sparsities within target ± 0.16)."""


def score(W, A):
    return A * abs(W)


def allocate(outlier):
    return abs(outlier)

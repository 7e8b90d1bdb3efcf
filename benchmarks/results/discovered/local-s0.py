"""Found by `autoprune-ray run configs/local.yaml` (search seed 0, 80 evaluations in 22 minutes on
a 2-core CPU, 2026-11-30), candidate #79, a symbolic crossover: Wanda's metric, and an allocation
that prunes deeper layers more (sigmoid(depth) rises almost linearly over [0, 1]), scaled per
linear by the skewness of its Wanda scores. Applied with the default band, allocation.lam 0.25:
each linear's sparsity within the level ± 0.25, the parameter-weighted mean exact."""


def score(W, A):
    return A * abs(W)


def allocate(skew, depth):
    return 0.7768 * (0.6728 + sigmoid(depth)) * (1.0 + sigmoid(skew))

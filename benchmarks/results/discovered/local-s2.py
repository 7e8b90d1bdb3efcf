"""Found by `autoprune-ray run configs/local.yaml --set search.seed=2 --set run_dir=runs/local-s2`
(80 evaluations in 19 minutes on a 2-core CPU, 2026-11-30), candidate #69, a symbolic crossover.
Kept as found: the metric divides Wanda's |W| by its row sum, which keeps Wanda's order within a
row, and the allocation prunes deeper linears more, linearly in depth (the same allocation as
local-s1.py). Promoted best on two calibration seeds (validation perplexity 232.6, mean of 0.6
and 0.7). Applied with the default band, allocation.lam 0.25."""


def score(W, A):
    return A * abs(abs(W) / abs(W).sum(dim=1, keepdim=True))


def allocate(depth):
    return depth

"""Found by `autoprune-ray run configs/local.yaml --set search.seed=1 --set run_dir=runs/local-s1`
(68 evaluations in 26 minutes on a 2-core CPU shared with a test run, 2026-11-30), candidate #65,
written by the LLM (llm_init). Kept as found: the metric is Wanda's plus constants
(maximum(A, A) + A|W| + 48 - A = A|W| + 48, the same order within a row), and the allocation
prunes deeper linears more, linearly in depth. Promoted best on two calibration seeds (validation
perplexity 232.6, mean of 0.6 and 0.7). Applied with the default band, allocation.lam 0.25."""


def score(W, A):
    return maximum(A, A) + A * abs(W) + (48.0 - A)


def allocate(depth):
    return depth

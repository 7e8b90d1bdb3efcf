"""best-60.py and best-70.py: the best of `configs/discover.yaml` over search seeds 0 and 1,
chosen on validation data alone (the promotion's perplexity under two calibration seeds), at both
levels: seed 1's #401 (0.6: 128.6 / 129.3, 0.7: 264.2 / 277.3) against seed 0's #384
(discover-s0.py; 0.6: 139.1 / 138.1, 0.7: 294.8 / 308.3). The same program as discover-s1.py.

Found by `autoprune-ray run configs/discover.yaml --set search.seed=1 --set search.max_seconds=4800
--set run_dir=runs/discover-s1` (2-core CPU, 2026-12-01; stopped by max_seconds at 472
evaluations, short of seed 0's 600, because a baseline measurement shared the machine; 508
proposals, 100% valid, 172 measured by KL, 289 screened, 31 of them as another spelling of a
measured program, 11 failed on NaN/Inf scores), candidate #401: the fifth symbolic mutation in
a line that starts at #25, which the LLM wrote by crossing two seeds (llm_crossover). Promoted
best on two calibration seeds (validation perplexity 0.6: 128.6 / 129.3, 0.7: 264.2 / 277.3
under seeds 0 / 1; geometric mean 186.8, against 204.4 for seed 0's best, discover-s0.py).
Read as: H is the Gram diagonal, Σ x² over every calibration token, which is n·A² for n
calibration windows (A is Wanda's per-window norm), so the metric is
|W|·A·max(0.45, log(1 + n²A⁴)): Wanda's score with each input column weighted again, by a
factor that is flat (0.45) for small inputs and grows like 2·log n + 4·log A for large ones, so
that weights on the highest-norm inputs are kept more firmly than Wanda keeps them. The factor
depends on n (32 windows in the search, 64 under the cpu protocol): more windows lessen the
extra weighting. The allocation is depth^0.25 (depth · depth^-0.75), concave in depth, and at
least 0.551 for the value projections, within the default band allocation.lam 0.25."""


def score(W, A, H):
    return A * abs(W) * maximum(0.44999998807907104, log1p(square(H)))


def allocate(depth, is_v):
    return maximum(minimum(0.5511280298233032, 1.08 * is_v), depth * depth ** (-0.75))

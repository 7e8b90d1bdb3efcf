"""Layer-wise sparsity allocation: uniform, OWL (per block), AlphaPruning-style (per block), and
allocation programs, which give one value per linear layer.

Layout of an allocation program's rows: one row per prunable linear, block-major, the linears
of a block in `models.block_linears` order (for LLaMA: q, k, v, o, gate, up, down). Every
input is an [N, 1] float tensor in that order (`linear_keys` names the rows)."""
from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import contextmanager

import torch

from .eval import reconstruction_error
from .masks import select_mask
from .scores import wanda
from .stats import BlockStats

Weights = list[dict[str, torch.Tensor]]     # per block: linear name -> weight [out, in]

# A linear's role, from the last part of its name (LLaMA/Qwen2/Mistral, OPT, Mixtral-style w1/w2/w3).
ROLES = ("q", "k", "v", "o", "gate", "up", "down")
ROLE_OF_NAME = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "out_proj": "o",
                "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "fc1": "up", "fc2": "down",
                "w1": "gate", "w3": "up", "w2": "down"}
ROLE_INPUTS = tuple(f"is_{role}" for role in ROLES)
SCORE_INPUTS = ("skew", "kurt", "outlier")      # from each linear's Wanda scores
LAYOUT_INPUTS = ("depth", "size", *ROLE_INPUTS)  # from the model's shape alone
INPUTS = ("skew", "kurt", "outlier", "alpha", "depth", "size", "sens", *ROLE_INPUTS)

# A sparsity computed within the band may stray from it by float rounding, never by more.
_BAND_SLACK = 1e-9


class AllocationError(ValueError):
    """An allocation that cannot be used; the message says why (a search records it as a failure)."""


# ---------------------------------------------------------------- published per-block allocations

def layer_depth(index: int, n_blocks: int) -> float:
    """A block's depth fraction in [0, 1]: the `d` input of programs, the `depth` of allocations."""
    return index / max(n_blocks - 1, 1)


def uniform(sparsity: float, n_blocks: int) -> list[float]:
    return [float(sparsity)] * n_blocks


def outlier_ratio(weights: dict[str, torch.Tensor], stats: BlockStats, m: float) -> float:
    """OWL's D_l: the share of a block's Wanda scores above M times their mean."""
    scores = torch.cat([wanda(w, stats[name]).flatten() for name, w in weights.items()])
    return float((scores > m * scores.mean()).float().mean())


def owl(sparsity: float, ratios: list[float], lam: float) -> list[float]:
    """Blocks with more outliers keep more weights. Density_l = 1 − S + 2λ·(D_l − min)/(max − min),
    re-centred so the mean sparsity over blocks stays S (a band 2λ wide around it)."""
    d = torch.tensor(ratios, dtype=torch.float64)
    spread = d.max() - d.min()
    scaled = (d - d.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(d)
    density = scaled - scaled.mean() + (1 - sparsity)
    result = (1 - density).tolist()
    if min(result) < 0 or max(result) >= 1:
        raise AllocationError(f"OWL with sparsity {sparsity} and lambda {lam} leaves [0, 1): lower lambda")
    return result


def alpha_block_allocation(alphas: torch.Tensor, keys: list[tuple[int, str]], sizes: torch.Tensor,
                           sparsity: float, lam: float) -> list[float]:
    """AlphaPruning-style per-block sparsities (Lu et al. 2024, its "block_wise" mapping): each
    block's score is the plain mean of its linears' `hill_alpha`; blocks with a higher alpha (a
    less heavy-tailed spectrum, so less well trained) are pruned more. Returns one sparsity per
    linear (its block's), mapped by `allocate_sparsities`, so the parameter-weighted mean is S.

    AlphaPruning's own map is s_l = c·(s1 + (s2 − s1)·u_l), u_l the min-max normalised score,
    s1,2 = 1 ∓ ε, c fixing the weighted mean at S. That is this map with λ = 2cε =
    2εS / (1 − ε + 2ε·ū), ū the weighted mean of u: its ε (0.3 by default in its code, 0.2–0.5 per
    model and method in its scripts, e.g. 0.2 for Wanda on LLaMA-7B at 70%: λ ≈ 0.28) sets a band
    relative to S; here λ is absolute. Its default metric is "alpha_peak" (x_min at the peak of the
    log-spectrum histogram, chosen by a KS fit); `hill_alpha` is its fit-free "xmin_mid" variant."""
    blocks = torch.tensor([i for i, _ in keys])
    per_block = {int(b): float(alphas.flatten()[blocks == b].double().mean()) for b in blocks.unique()}
    raw = torch.tensor([per_block[i] for i, _ in keys], dtype=torch.float64)
    return allocate_sparsities(raw, sizes, sparsity, lam)


# ---------------------------------------------------------------- the exact-budget map

def check_band(sparsity: float, lam: float) -> None:
    if not (math.isfinite(lam) and lam >= 0):
        raise AllocationError(f"allocation range λ = {lam} must be a finite number ≥ 0")
    if not (0 <= sparsity - lam and sparsity + lam < 1):
        raise AllocationError(f"sparsity {sparsity} ± λ {lam} leaves [0, 1): lower λ")


def allocate_sparsities(raw, sizes, sparsity: float, lam: float) -> list[float]:
    """Per-layer sparsities from any per-layer values (higher = prune more), exact on budget:

        s_l = S + λ·(r_l − r̄)/(max r − min r),   r̄ = Σ n_l r_l / Σ n_l  (parameter-weighted)

    so Σ n_l s_l / Σ n_l = S (to float64 rounding) and every s_l lies within S ± λ, a spread of
    exactly λ between the extremes. A constant input is uniform. `raw` [N, 1] or [N], `sizes` [N]
    (parameters per layer). Raises AllocationError on non-finite values or a band outside [0, 1)."""
    raw = torch.as_tensor(raw).detach().double().flatten().cpu()
    sizes = torch.as_tensor(sizes).double().flatten().cpu()
    if raw.numel() != sizes.numel():
        raise AllocationError(f"the allocation gave {raw.numel()} values for {sizes.numel()} layers")
    if not (sizes > 0).all():
        raise AllocationError("every layer needs a positive parameter count")
    bad = ~torch.isfinite(raw)
    if bad.any():
        first = int(bad.nonzero()[0])
        raise AllocationError(f"the allocation gave {int(bad.sum())} non-finite values (NaN or inf) "
                              f"among {raw.numel()} layers, the first at row {first}")
    check_band(sparsity, lam)
    spread = raw.max() - raw.min()
    if spread == 0:
        return [float(sparsity)] * raw.numel()
    centre = (sizes * raw).sum() / sizes.sum()
    result = sparsity + lam * (raw - centre) / spread
    return _checked(result, sparsity, lam)


def _checked(result: torch.Tensor, sparsity: float, lam: float) -> list[float]:
    """The map keeps every value in the band by construction; this guards against a bug."""
    low, high = sparsity - lam, sparsity + lam
    if (result < low - _BAND_SLACK).any() or (result > high + _BAND_SLACK).any():
        raise AllocationError(f"allocated sparsities {float(result.min()):.6f}..{float(result.max()):.6f} "
                              f"leave the band {low:.6f}..{high:.6f}")
    result = result.clamp(low, high)     # only float rounding is clipped here
    if (result < 0).any() or (result >= 1).any():
        raise AllocationError(f"allocated sparsities {float(result.min())}..{float(result.max())} leave [0, 1)")
    return result.tolist()


# ---------------------------------------------------------------- per-linear statistics

def linear_keys(weights: Weights) -> list[tuple[int, str]]:
    """The rows of an allocation program: (block index, linear name), block-major."""
    return [(index, name) for index, block in enumerate(weights) for name in block]


def role_of(name: str) -> str | None:
    """'self_attn.q_proj' -> 'q'; a linear of unknown kind -> None (all role indicators 0)."""
    return ROLE_OF_NAME.get(name.rsplit(".", 1)[-1].lower())


def hill_alpha(weight: torch.Tensor) -> float:
    """AlphaPruning's heavy-tail exponent of the eigenvalues of WᵀW (WeightWatcher/TempBalance
    "PL_Alpha_Hill", fix_fingers='xmin_mid'): the Hill estimator over the top half of the spectrum.

    With λ_1 ≤ … ≤ λ_N the eigenvalues, λ = svdvals(W)² (N = min(out, in)), i = ⌊N/2⌋ (0-based),
    x_min = λ_i and k = N − i:   alpha = 1 + k / Σ_{j=i}^{N−1} ln(λ_j / x_min).
    The sum runs over the k largest eigenvalues, x_min itself included (its term is 0). A flat
    tail (all k equal) gives inf, which the allocation map rejects."""
    eigs = torch.linalg.svdvals(weight.detach().float()).double().pow(2).sort().values
    i = eigs.numel() // 2
    tail = eigs[i:]
    log_sum = torch.log(tail / tail[0]).sum()
    return float(1 + tail.numel() / log_sum) if log_sum > 0 else math.inf


@contextmanager
def one_thread():
    """LAPACK gains little from threads on matrices this small, and on a busy CPU their waiting
    costs far more: one 1536×576 SVD took 9.5 s on 2 threads and 0.08 s on one (load 8, 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def alpha_column(weights: Weights) -> torch.Tensor:
    """`hill_alpha` of every linear, [N, 1] in `linear_keys` order."""
    with one_thread():
        return _column(hill_alpha(weights[i][name]) for i, name in linear_keys(weights))


def score_moments(weight: torch.Tensor, stats, m: float) -> tuple[float, float, float]:
    """(skewness, excess kurtosis, OWL outlier share above m·mean) of one linear's Wanda scores."""
    scores = wanda(weight, stats).double().flatten()
    centred = scores - scores.mean()
    std = centred.pow(2).mean().sqrt().clamp_min(1e-30)
    z = centred / std
    outlier = (scores > m * scores.mean()).double().mean()
    return float(z.pow(3).mean()), float(z.pow(4).mean() - 3), float(outlier)


def wanda_sensitivity(weight: torch.Tensor, stats, sparsity: float) -> float:
    """||ΔW X||² / ||W X||² of this linear alone pruned by Wanda (row-wise) at `sparsity`, from the
    Gram matrix XᵀX; 0 for a layer whose output is zero anyway."""
    if stats.gram is None:
        raise ValueError("the allocation reads `sens`: it needs statistics collected with Gram matrices")
    w = weight.detach().float()
    mask = select_mask(wanda(w, stats), sparsity)
    base = reconstruction_error(w, torch.zeros_like(w), stats.gram)
    return reconstruction_error(w, w * ~mask, stats.gram) / base if base > 0 else 0.0


def _column(values: Iterable[float]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float32).unsqueeze(1)


def _layout_inputs(weights: Weights) -> dict[str, torch.Tensor]:
    keys = linear_keys(weights)
    numel = [weights[i][name].numel() for i, name in keys]
    roles = [role_of(name) for _, name in keys]
    out = {"depth": _column(layer_depth(i, len(weights)) for i, _ in keys),
           "size": _column(n / sum(numel) for n in numel)}
    for role in ROLES:
        out[f"is_{role}"] = _column(float(r == role) for r in roles)
    return out


def _score_inputs(weights: Weights, stats: list[BlockStats] | None, m: float) -> dict[str, torch.Tensor]:
    if stats is None:
        raise ValueError(f"the allocation reads {'/'.join(SCORE_INPUTS)}: it needs calibration statistics")
    moments = [score_moments(weights[i][name], stats[i][name], m) for i, name in linear_keys(weights)]
    return {key: _column(row[j] for row in moments) for j, key in enumerate(SCORE_INPUTS)}


def _sens_input(weights: Weights, stats: list[BlockStats] | None, sparsity: float) -> torch.Tensor:
    if stats is None:
        raise ValueError("the allocation reads `sens`: it needs calibration statistics with Gram matrices")
    return _column(wanda_sensitivity(weights[i][name], stats[i][name], sparsity) for i, name in linear_keys(weights))


def _cache_key(name: str, m: float, sparsity: float) -> tuple:
    """Inputs that depend on a setting are cached per setting."""
    if name == "outlier":
        return name, m
    if name == "sens":
        return name, sparsity
    return (name,)


def linear_statistics(weights: Weights, stats: list[BlockStats] | None = None, names: Iterable[str] | None = None,
                      sparsity: float = 0.5, m: float = 5.0, cache: dict | None = None) -> dict[str, torch.Tensor]:
    """The inputs of an allocation program, each an [N, 1] float32 tensor in `linear_keys` order:

    skew, kurt  skewness and excess kurtosis of the linear's Wanda scores |W|·||X||
    outlier     OWL's share of those scores above m·mean
    alpha       `hill_alpha` of the weight (weights only)
    depth       the block's depth fraction; size: the linear's share of all pruned parameters
    sens        `wanda_sensitivity` at `sparsity` (needs Gram matrices in `stats`)
    is_q … is_down  the linear's role, 0/1 (`role_of`)

    Only `names` are computed (all by default). `cache`: a dict the caller keeps for one set of
    dense weights and statistics (keys `(name,)`, `("outlier", m)`, `("sens", sparsity)`): what is
    in it is reused, what is computed is added. Alpha (one SVD per linear) and sens cost seconds."""
    names = list(INPUTS if names is None else names)
    unknown = sorted(set(names) - set(INPUTS))
    if unknown:
        raise ValueError(f"unknown allocation inputs {unknown}: choose from {', '.join(INPUTS)}")
    cache = {} if cache is None else cache
    for name in names:
        key = _cache_key(name, m, sparsity)
        if key in cache:
            continue
        if name in LAYOUT_INPUTS:
            cache.update({(k,): v for k, v in _layout_inputs(weights).items()})
        elif name in SCORE_INPUTS:
            found = _score_inputs(weights, stats, m)
            cache.update({_cache_key(k, m, sparsity): v for k, v in found.items()})
        elif name == "alpha":
            cache[key] = alpha_column(weights)
        else:
            cache[key] = _sens_input(weights, stats, sparsity)
    return {name: cache[_cache_key(name, m, sparsity)] for name in names}


def linear_sizes(weights: Weights) -> torch.Tensor:
    """Parameters per linear, in `linear_keys` order."""
    return torch.tensor([weights[i][name].numel() for i, name in linear_keys(weights)], dtype=torch.float64)


def block_means(targets: dict[str, float], weights: Weights) -> list[float]:
    """Each block's parameter-weighted mean sparsity, from per-linear targets keyed 'block.name'."""
    means = []
    for index, block in enumerate(weights):
        sizes = {name: w.numel() for name, w in block.items()}
        means.append(sum(targets[f"{index}.{n}"] * s for n, s in sizes.items()) / sum(sizes.values()))
    return means

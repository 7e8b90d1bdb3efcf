"""Layer-wise sparsity allocation: uniform, and OWL's outlier-weighted allocation."""
from __future__ import annotations

import torch

from .scores import wanda
from .stats import BlockStats


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
        raise ValueError(f"OWL with sparsity {sparsity} and lambda {lam} leaves [0, 1): lower lambda")
    return result


def layer_statistics(weights: list[dict[str, torch.Tensor]], stats: list[BlockStats], m: float = 5.0) -> dict:
    """Per-block inputs of an allocation program (SDSA), each a [L, 1] tensor: skewness and excess
    kurtosis of the block's Wanda scores, OWL's outlier ratio, depth fraction, parameter share."""
    rows = {"skew": [], "kurt": [], "outlier": [], "depth": [], "size": []}
    total = sum(w.numel() for block in weights for w in block.values())
    n = len(weights)
    for index, (block, block_stats) in enumerate(zip(weights, stats)):
        scores = torch.cat([wanda(w, block_stats[name]).flatten() for name, w in block.items()]).double()
        centred = scores - scores.mean()
        std = centred.pow(2).mean().sqrt().clamp_min(1e-30)
        rows["skew"].append(float((centred / std).pow(3).mean()))
        rows["kurt"].append(float((centred / std).pow(4).mean() - 3))
        rows["outlier"].append(float((scores > m * scores.mean()).double().mean()))
        rows["depth"].append(layer_depth(index, n))
        rows["size"].append(sum(w.numel() for w in block.values()) / total)
    return {k: torch.tensor(v, dtype=torch.float32).unsqueeze(1) for k, v in rows.items()}


def normalize_allocation(raw: torch.Tensor, sparsity: float, lam: float) -> list[float]:
    """Whatever an allocation program returns becomes block sparsities with mean exactly S and
    every block within S ± λ: s_l = S + λ·(r_l − mean r)/(max r − min r). A constant program is
    uniform. OWL is the program −D with λ = 2·λ_OWL."""
    raw = raw.double().flatten()
    if not torch.isfinite(raw).all():
        raise FloatingPointError(f"allocation program returned {int((~torch.isfinite(raw)).sum())} non-finite values")
    if not (0 <= sparsity - lam and sparsity + lam < 1):
        raise ValueError(f"sparsity {sparsity} ± λ {lam} leaves [0, 1)")
    spread = raw.max() - raw.min()
    if spread == 0:
        return [float(sparsity)] * raw.numel()
    return (sparsity + lam * (raw - raw.mean()) / spread).tolist()

"""Layer-wise sparsity allocation: uniform, and OWL's outlier-weighted allocation."""
from __future__ import annotations

import torch

from .scores import wanda
from .stats import BlockStats


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

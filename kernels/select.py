"""Exact-count selection within rows: the reference semantics every scoring kernel reproduces.
True marks a weight to prune."""
from __future__ import annotations

import torch


def check_sparsity(sparsity: float) -> float:
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity {sparsity} is outside [0, 1)")
    return float(sparsity)


def prune_count(total: int, sparsity: float) -> int:
    return int(round(total * sparsity))


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the `round(in·s)` lowest scores of every output row (Wanda, RIA).

    Equal scores are pruned left to right, exactly as Wanda's `torch.sort(stable=True)` does,
    but in O(in) per row: the k-th value by selection, then the leftmost ties up to the count."""
    k = prune_count(score.shape[1], check_sparsity(sparsity))
    if k == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    kth = score.kthvalue(k, dim=1, keepdim=True).values
    below = score < kth
    ties = score == kth
    room = k - below.sum(dim=1, keepdim=True)
    return below | (ties & (ties.cumsum(dim=1) <= room))


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the n lowest scores in every group of m consecutive inputs of each row."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M {n}:{m} does not divide the input width {cols}")
    groups = score.reshape(rows, cols // m, m)
    idx = torch.sort(groups, dim=2, stable=True)[1][..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(rows, cols)

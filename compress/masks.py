"""Turn a score into a pruning mask with an exact count. True marks a weight to prune."""
from __future__ import annotations

import re

import torch


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): prune N of every M consecutive input weights. None/'' -> unstructured."""
    if not pattern or pattern == "unstructured":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if not match:
        raise ValueError(f"bad N:M pattern {pattern!r}: write it like 2:4")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"bad N:M pattern {pattern!r}: need 0 < N < M")
    return n, m


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


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the `round(numel·s)` lowest scores of the whole matrix (magnitude pruning)."""
    k = prune_count(score.numel(), check_sparsity(sparsity))
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        mask[torch.sort(score.flatten(), stable=True)[1][:k]] = True
    return mask.view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the n lowest scores in every group of m consecutive inputs of each row."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M {n}:{m} does not divide the input width {cols}")
    groups = score.reshape(rows, cols // m, m)
    idx = torch.sort(groups, dim=2, stable=True)[1][..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(rows, cols)


def select_mask(score: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None = None,
                granularity: str = "row") -> torch.Tensor:
    if pattern is not None:
        return nm_mask(score, *pattern)
    if granularity == "row":
        return row_mask(score, sparsity)
    if granularity == "layer":
        return layer_mask(score, sparsity)
    raise ValueError(f"unknown granularity {granularity!r}: use row or layer")


def is_valid_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    rows, cols = mask.shape
    return bool((mask.reshape(rows, cols // m, m).sum(-1) == n).all())

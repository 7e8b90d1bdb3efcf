"""Turn a score into a pruning mask with an exact count. True marks a weight to prune."""
from __future__ import annotations

import re

import torch

from autoprune_ray.kernels.select import check_sparsity, nm_mask, prune_count, row_mask, row_split  # noqa: F401


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


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the `round(numel·s)` lowest scores of the whole matrix (magnitude pruning)."""
    k = prune_count(score.numel(), check_sparsity(sparsity))
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        mask[torch.sort(score.flatten(), stable=True)[1][:k]] = True
    return mask.view_as(score)


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

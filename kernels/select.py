"""Exact-count selection within rows: the reference semantics every scoring kernel reproduces.
True marks a weight to prune."""
from __future__ import annotations

import numpy as np
import torch


def check_sparsity(sparsity: float) -> float:
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity {sparsity} is outside [0, 1)")
    return float(sparsity)


def prune_count(total: int, sparsity: float) -> int:
    """round(total·s), halves to even (Python's round): the one rounding rule of every selection."""
    return int(round(total * sparsity))


def row_split(rows: int, cols: int, sparsity: float) -> tuple[int, int]:
    """(k, extra): the first `extra` rows of a [rows, cols] layer prune k + 1 weights, the rest k."""
    total = prune_count(rows * cols, check_sparsity(sparsity))
    return divmod(total, max(rows, 1))


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest scores of every output row (Wanda, RIA), exactly `round(rows·cols·s)` in all.

    The contract: the layer prunes T = prune_count(rows·cols, s) weights; row r prunes
    T // rows + (1 if r < T % rows else 0), so the first `T % rows` rows prune one more and no two
    rows differ by more than one. Where s·cols is whole (50% of an even width) every row prunes
    s·cols, as Wanda does. The fused kernel reproduces this mask bit for bit.

    Equal scores are pruned left to right, exactly as Wanda's `torch.sort(stable=True)` does,
    but in O(in) per row: the k-th value by selection, then the leftmost ties up to the count."""
    k, extra = row_split(score.shape[0], score.shape[1], sparsity)
    if extra == 0:
        return lowest_in_rows(score, k)
    return torch.cat([lowest_in_rows(score[:extra], k + 1), lowest_in_rows(score[extra:], k)])


def lowest_in_rows(score: torch.Tensor, k: int) -> torch.Tensor:
    """The k lowest scores of every row, equal scores left to right."""
    if k == 0 or score.shape[0] == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    kth = kth_in_rows(score, k)
    at_most = score <= kth
    if int(at_most.sum()) == k * score.shape[0]:   # every row holds exactly k: no tie to break
        return at_most
    below = score < kth
    ties = score == kth
    room = k - below.sum(dim=1, keepdim=True)
    return below | (ties & (ties.cumsum(dim=1) <= room))


def kth_in_rows(score: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th lowest value of every row ([rows, 1]), as `torch.kthvalue` gives it. On the CPU
    numpy's introselect (`np.partition`) is faster: a SmolLM2 candidate's whole selection takes
    2.6× less time (`benchmarks/throughput.py select`); elsewhere torch's."""
    if score.device.type == "cpu" and score.dtype in (torch.float32, torch.float64) and not score.requires_grad:
        return torch.from_numpy(np.partition(score.numpy(), k - 1, axis=1)[:, k - 1:k])
    return score.kthvalue(k, dim=1, keepdim=True).values


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the n lowest scores in every group of m consecutive inputs of each row."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M {n}:{m} does not divide the input width {cols}")
    groups = score.reshape(rows, cols // m, m)
    idx = torch.sort(groups, dim=2, stable=True)[1][..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(rows, cols)

"""Pruning scores of the baselines: higher means more important (kept)."""
from __future__ import annotations

import torch

from .stats import InputStats


def magnitude(weight: torch.Tensor, _stats: InputStats | None = None) -> torch.Tensor:
    return weight.abs().float()


def wanda(weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """|W_ij| · ||X_j||₂ (Sun et al. 2023), with Wanda's per-sample-averaged norm."""
    return weight.abs().float() * stats.wanda_norm.unsqueeze(0)


def ria(weight: torch.Tensor, stats: InputStats, alpha: float = 0.5) -> torch.Tensor:
    """Relative importance and activation (Zhang et al. 2024):
    (|W|/Σ_col|W| + |W|/Σ_row|W|) · ||X||^α."""
    a = weight.abs().float()
    relative = a / a.sum(dim=0, keepdim=True) + a / a.sum(dim=1, keepdim=True)
    # sqrt for the published α = 0.5: the same operation the candidate language's seed uses
    act = stats.wanda_norm.sqrt() if alpha == 0.5 else stats.wanda_norm.pow(alpha)
    return relative * act.unsqueeze(0)


def weight_gradient(weight: torch.Tensor, grad_rms: torch.Tensor) -> torch.Tensor:
    """LLM-Barber's importance |W| · sqrt(E[g²]) (GBLM-style when g comes from the LM loss)."""
    return weight.abs().float() * grad_rms.float()


SCORES = {"magnitude": magnitude, "wanda": wanda, "ria": ria}

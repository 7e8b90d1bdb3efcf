"""LLM-Barber (Su et al. 2024): rebuild a block's mask with weight × gradient scores.

The gradient is that of the block-output reconstruction loss ||f_dense(X) − f_sparse(X)||²
with respect to the masked block's weights (block-aware, so the mask of one linear accounts
for the others), averaged as sqrt(E[g²]) over calibration samples. Each row then swaps its
`swap` share of weights: the kept weights with the lowest new score are pruned and the pruned
weights with the highest new score are revived, pairwise only where that raises the score.
"""
from __future__ import annotations

import torch
from torch import nn

from .masks import prune_count


def reconstruction_grad_rms(block: nn.Module, linears: dict[str, nn.Linear], ctx) -> dict[str, torch.Tensor]:
    """sqrt(E[g²]) per weight of the block-output MSE between the dense and current block."""
    sq = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in linears.items()}
    for m in linears.values():
        m.weight.requires_grad_(True)
    try:
        batches = list(zip(ctx.walker.block_batches(ctx.inputs), ctx.walker.block_batches(ctx.dense_outputs)))
        for inputs, dense in batches:
            with torch.enable_grad():
                out = block(inputs, **ctx.kwargs)
                out = out[0] if isinstance(out, tuple) else out
                loss = torch.nn.functional.mse_loss(out.float(), dense.float(), reduction="sum")
                grads = torch.autograd.grad(loss, [m.weight for m in linears.values()])
            for name, g in zip(linears, grads):
                sq[name] += g.float() ** 2
    finally:
        for m in linears.values():
            m.weight.requires_grad_(False)
    return {n: (s / len(batches)).sqrt() for n, s in sq.items()}


def swap_rebuild(mask: torch.Tensor, score: torch.Tensor, swap: float) -> torch.Tensor:
    """Swap up to `round(in·swap)` pruned/kept pairs per row where the pruned one scores higher.
    Every row keeps its pruned count."""
    r = prune_count(mask.shape[1], swap)
    if r == 0:
        return mask
    neg_inf = torch.finfo(score.dtype).min
    pos_inf = torch.finfo(score.dtype).max
    revive_val, revive_idx = torch.where(mask, score, neg_inf).topk(r, dim=1)
    drop_val, drop_idx = torch.where(mask, pos_inf, score).topk(r, dim=1, largest=False)
    beneficial = revive_val > drop_val  # both sorted: the j-th best revival against the j-th worst kept
    new = mask.clone()
    rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(revive_idx)
    new[rows[beneficial], revive_idx[beneficial]] = False
    new[rows[beneficial], drop_idx[beneficial]] = True
    return new

"""SparseGPT (Frantar & Alistarh 2023): mask selection with OBS weight reconstruction."""
from __future__ import annotations

import torch

from .masks import prune_count


def inverse_hessian_cholesky(gram: torch.Tensor, weight: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (XXᵀ + damp·mean(diag)·I)⁻¹; dead inputs get unit curvature."""
    h = gram.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    weight[:, dead] = 0
    h.diagonal().add_(damp * h.diagonal().mean())
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(h_inv, upper=True).float()


def sparsegpt_prune(weight: torch.Tensor, gram: torch.Tensor, sparsity: float,
                    pattern: tuple[int, int] | None = None, blocksize: int = 128,
                    damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (updated weight, prune mask). The mask is chosen block by block of `blocksize`
    columns by W²/diag(H⁻¹)², and each pruned column's error is spread over the columns
    not yet visited. Block [a, b) prunes prune_count(rows·b) − prune_count(rows·a) weights
    (cumulative rounding), so the layer prunes exactly round(s·rows·cols), as row-wise masks do."""
    w = weight.detach().clone().float()
    rows, cols = w.shape
    hinv = inverse_hessian_cholesky(gram, w, damp)
    mask = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        w_blk, h_blk = w[:, start:end].clone(), hinv[start:end, start:end]
        m_blk = torch.zeros_like(w_blk, dtype=torch.bool)
        err_blk = torch.zeros_like(w_blk)
        d = h_blk.diagonal()
        if pattern is None:
            score = (w_blk ** 2 / d.unsqueeze(0) ** 2).flatten()
            k = prune_count(rows * end, sparsity) - prune_count(rows * start, sparsity)
            m_blk.view(-1)[torch.sort(score, stable=True)[1][:k]] = True
        for i in range(end - start):
            if pattern is not None and i % pattern[1] == 0:
                group = w_blk[:, i:i + pattern[1]] ** 2 / d[i:i + pattern[1]].unsqueeze(0) ** 2
                m_blk.scatter_(1, i + torch.topk(group, pattern[0], dim=1, largest=False)[1], True)
            col = w_blk[:, i]
            kept = torch.where(m_blk[:, i], torch.zeros_like(col), col)
            err = (col - kept) / d[i]
            w_blk[:, i:] -= err.unsqueeze(1) @ h_blk[i, i:].unsqueeze(0)
            w_blk[:, i] = kept
            err_blk[:, i] = err
        w[:, start:end] = w_blk
        mask[:, start:end] = m_blk
        w[:, end:] -= err_blk @ hinv[start:end, end:]
    w[mask] = 0
    return w.to(weight.dtype), mask

"""GPTQ (Frantar et al. 2022): column-by-column rounding onto the per-group grid of
kernels.quant, each column's rounding error spread over the columns not yet rounded through
the Cholesky factor of H⁻¹, H = XᵀX (+ damping). Errors are applied lazily per block of
`blocksize` columns, which changes the arithmetic order only, not the result."""
from __future__ import annotations

import torch

from autoprune_ray.kernels.quant import check_bits, check_group_size, group_params, quantize_dequantize

from .sparsegpt import inverse_hessian_cholesky


def _check_shapes(weight: torch.Tensor, gram: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"GPTQ takes a 2-D weight, got shape {tuple(weight.shape)}")
    cols = weight.shape[1]
    if tuple(gram.shape) != (cols, cols):
        raise ValueError(f"gram must be [{cols}, {cols}] for a weight of shape {tuple(weight.shape)}, "
                         f"got {tuple(gram.shape)}")


def _current_group(w: torch.Tensor, w_blk: torch.Tensor, err_blk: torch.Tensor, hinv: torch.Tensor,
                   start: int, col: int, group_end: int) -> torch.Tensor:
    """The group's columns col..group_end as they stand after every earlier column's error.
    Columns past the block have not received this block's errors yet (they are applied lazily
    at the block's end), so they are brought up to date here; otherwise the grid of a group that
    straddles a block boundary would depend on `blocksize`."""
    end = start + w_blk.shape[1]
    inside = w_blk[:, col - start:min(group_end, end) - start]
    if group_end <= end:
        return inside
    pending = err_blk @ hinv[start:end, end:group_end]
    return torch.cat([inside, w[:, end:group_end] - pending], dim=1)


def _dynamic_grids(w: torch.Tensor, hinv: torch.Tensor, bits: int, group_size: int):
    """Each group's (scale, zero) fixed when the loop reaches its first column, from the
    error-updated weights of its columns (the last group of a row may be short)."""
    current = []

    def grid_at(col, w_blk, err_blk, start):
        if col % group_size == 0:
            group_end = min(col + group_size, w.shape[1])
            current[:] = [group_params(_current_group(w, w_blk, err_blk, hinv, start, col, group_end), bits)]
        return current[0]
    return grid_at


def _static_grids(w: torch.Tensor, bits: int, group_size: int, perm: torch.Tensor):
    """Every group's (scale, zero) from the weights before any update, looked up through `perm`:
    with act-order a group's columns are visited out of order, so its grid cannot wait for them
    (upstream GPTQ's `static_groups`); groups stay 128 contiguous input columns, the kernel's layout."""
    grids = [group_params(w[:, g:g + group_size], bits) for g in range(0, w.shape[1], group_size)]
    return lambda col, *_: grids[int(perm[col]) // group_size]


def gptq_quantize(weight: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int,
                  blocksize: int = 128, damp: float = 0.01, act_order: bool = False) -> torch.Tensor:
    """Dequantized GPTQ weight in W's dtype. `gram` is XᵀX of the layer inputs ([in, in]). Columns
    are rounded left to right, or with `act_order` by decreasing XᵀX diagonal (upstream's
    `actorder`, static group grids). Inputs with a zero Gram diagonal are dead: their weights
    become 0, which every grid holds exactly."""
    bits, group_size = check_bits(bits), check_group_size(group_size)
    _check_shapes(weight, gram)
    w = weight.detach().clone().float()
    if not act_order:
        hinv = inverse_hessian_cholesky(gram, w, damp)
        return _gptq_loop(w, hinv, blocksize, bits, _dynamic_grids(w, hinv, bits, group_size)).to(weight.dtype)
    w[:, gram.diagonal() == 0] = 0
    perm = torch.argsort(gram.diagonal(), descending=True, stable=True)
    grid_at = _static_grids(w, bits, group_size, perm)
    w = w[:, perm]
    hinv = inverse_hessian_cholesky(gram[perm][:, perm], w, damp)
    deq = torch.empty_like(w)
    deq[:, perm] = _gptq_loop(w, hinv, blocksize, bits, grid_at)
    return deq.to(weight.dtype)


def _gptq_loop(w: torch.Tensor, hinv: torch.Tensor, blocksize: int, bits: int, grid_at) -> torch.Tensor:
    """Round `w` in place column by column, each column on `grid_at(col, ...)`, its error spread
    over the later columns through the Cholesky factor `hinv` (lazily per block)."""
    cols = w.shape[1]
    deq = torch.zeros_like(w)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        w_blk, h_blk = w[:, start:end].clone(), hinv[start:end, start:end]
        err_blk = torch.zeros_like(w_blk)
        for i in range(end - start):
            col = start + i
            scale, zero = grid_at(col, w_blk, err_blk, start)
            q = quantize_dequantize(w_blk[:, i:i + 1], scale, zero, bits).squeeze(1)
            err = (w_blk[:, i] - q) / h_blk[i, i]
            w_blk[:, i:] -= err.unsqueeze(1) @ h_blk[i, i:].unsqueeze(0)
            deq[:, col] = q
            err_blk[:, i] = err
        w[:, end:] -= err_blk @ hinv[start:end, end:]
    return deq

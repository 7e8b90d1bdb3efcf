"""Weight-only fake quantization: per-group asymmetric min-max round-to-nearest (RTN).

    deq, row_err = fake_quantize(W, bits=4, group_size=128)          # row_err[i] = Σ_j (deq − W)²_ij
    deq, row_err = fake_quantize(W, 3, 128, h=gram_diag)              # Σ_j (deq − W)²_ij · h_j

Groups are `group_size` contiguous input columns of one output row; the last group of a row is
shorter when `group_size` does not divide the width (SmolLM2's 576 = 4·128 + 64). Each group
stores a scale and a zero point (fp16 each in the size accounting of compress.bits):

    lo, hi = min(group ∪ {0}), max(group ∪ {0})     # GPTQ's range: 0 is always on the grid
    scale = max((hi − lo) / (2^b − 1), SCALE_FLOOR)
    zero  = clamp(−rnd(lo / scale), 0, 2^b − 1)
    deq   = (clamp(rnd(w / scale) + zero, 0, 2^b − 1) − zero) · scale

with rnd(x) = floor(x + 0.5), which the kernel reproduces operation for operation. The torch
reference is the ground truth; the Triton kernel fuses quantize-dequantize and the error
reduction in one pass over W.
"""
from __future__ import annotations

import math

import torch

BITS = (2, 3, 4, 8)
SCALE_FLOOR = 1e-8   # an all-zero group still gets a finite, non-zero scale


def check_bits(bits: int) -> int:
    if int(bits) != bits or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [1, 8], got {bits}")
    return int(bits)


def check_group_size(group_size: int) -> int:
    if int(group_size) != group_size or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size}")
    return int(group_size)


def group_count(in_features: int, group_size: int) -> int:
    """Groups per output row (the last one may be short)."""
    return math.ceil(in_features / group_size)


def _rnd(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x + 0.5)


def group_params(group: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of float32 values whose last axis is one group; reduced over that axis,
    kept as [..., 1]. GPTQ calls this with its error-updated columns."""
    maxq = 2 ** check_bits(bits) - 1
    lo = group.amin(dim=-1, keepdim=True).clamp_max(0)
    hi = group.amax(dim=-1, keepdim=True).clamp_min(0)
    scale = ((hi - lo) / maxq).clamp_min(SCALE_FLOOR)
    zero = (-_rnd(lo / scale)).clamp(0, maxq)
    return scale, zero


def quantize_dequantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round `w` (float32) onto the grid of (scale, zero), broadcast against it."""
    maxq = 2 ** check_bits(bits) - 1
    return ((_rnd(w / scale) + zero).clamp(0, maxq) - zero) * scale


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] float32 -> [out, groups, group_size]; a short last group is padded with its own
    last value, which leaves its min and max unchanged."""
    w = weight.float()
    rows, cols = w.shape
    pad = group_count(cols, group_size) * group_size - cols
    if pad:
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)
    return w.view(rows, -1, group_size)


def fake_quant_reference(weight: torch.Tensor, bits: int, group_size: int,
                         h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantized weight in W's dtype, float32 per-row error Σ_j (deq − W)²_ij · h_j)."""
    if weight.dim() != 2:
        raise ValueError(f"fake quantization takes a 2-D weight, got shape {tuple(weight.shape)}")
    check_group_size(group_size)
    rows, cols = weight.shape
    grouped = _grouped(weight, group_size)
    scale, zero = group_params(grouped, bits)
    deq = quantize_dequantize(grouped, scale, zero, bits).view(rows, -1)[:, :cols]
    sq = (deq - weight.float()) ** 2
    if h is not None:
        sq = sq * h.float().reshape(1, cols)
    return deq.to(weight.dtype), sq.sum(dim=1)

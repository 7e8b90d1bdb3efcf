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


# ---------------------------------------------------------------- fused Triton kernel

from .fused import resolve_backend  # noqa: E402  (below the reference, which needs neither)

try:
    import triton
    import triton.language as tl
except ImportError:   # the torch reference works without Triton
    triton = None

MAX_GROUP_BLOCK = 1 << 14   # widest group one program holds in registers; fake_quantize uses torch beyond
TILE_ELEMENTS = 2048        # columns one loop iteration quantizes: several short groups at once

if triton is not None:
    @triton.jit
    def _round_to(x, dtype: tl.constexpr):
        # The interpreter truncates fp32 to bf16 where the GPU rounds to nearest even; rounding the
        # bits here gives torch's `.to(bfloat16)` on both (finite x: deq of a finite W always is).
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(dtype)

    @triton.jit
    def _fake_quant_rows(w_ptr, h_ptr, deq_ptr, err_ptr, n_cols, n_groups,
                         MAXQ: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                         G_TILE: tl.constexpr, HAS_H: tl.constexpr):
        # One program per row; each iteration takes G_TILE whole groups as a [G_TILE, BLOCK_G] tile.
        row = tl.program_id(0).to(tl.int64)
        lane = tl.arange(0, BLOCK_G)
        acc = tl.zeros([G_TILE], dtype=tl.float32)
        for first in range(0, n_groups, G_TILE):
            cols = (first + tl.arange(0, G_TILE))[:, None] * GROUP + lane[None, :]
            valid = (lane[None, :] < GROUP) & (cols < n_cols)
            # Masked lanes read 0, which cannot move min or max: 0 is in every group's range anyway.
            w = tl.load(w_ptr + row * n_cols + cols, mask=valid, other=0.0).to(tl.float32)
            lo = tl.minimum(tl.min(w, axis=1), 0.0)[:, None]
            hi = tl.maximum(tl.max(w, axis=1), 0.0)[:, None]
            # IEEE division, as the reference's on the CPU: compiled, a plain `/` may be approximate
            scale = tl.maximum(tl.fdiv(hi - lo, MAXQ + 0.0, ieee_rounding=True), 1e-8)
            zero = tl.minimum(tl.maximum(-tl.floor(tl.fdiv(lo, scale, ieee_rounding=True) + 0.5), 0.0), MAXQ + 0.0)
            q = tl.floor(tl.fdiv(w, scale, ieee_rounding=True) + 0.5)
            q = tl.minimum(tl.maximum(q + zero, 0.0), MAXQ + 0.0)
            deq = (q - zero) * scale
            tl.store(deq_ptr + row * n_cols + cols, _round_to(deq, deq_ptr.dtype.element_ty), mask=valid)
            # the error is the fp32 deq's, before the cast to W's dtype, as in the reference
            diff = tl.where(valid, deq - w, 0.0)
            sq = diff * diff
            if HAS_H:
                sq = sq * tl.load(h_ptr + cols, mask=valid, other=0.0)
            acc += tl.sum(sq, axis=1)
        tl.store(err_ptr + row, tl.sum(acc, axis=0))


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"fake quantization takes a 2-D weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"fake quantization takes a floating-point weight, got {weight.dtype}")


def _check_h(h: torch.Tensor | None, weight: torch.Tensor) -> None:
    if h is not None and h.numel() != weight.shape[1]:
        raise ValueError(f"h has {h.numel()} values for a weight of {weight.shape[1]} inputs")


def _tile(group_size: int) -> tuple[int, int, int]:
    """(BLOCK_G, G_TILE, num_warps): power-of-two tile sizes for one loop iteration."""
    block_g = triton.next_power_of_2(group_size)
    g_tile = max(1, TILE_ELEMENTS // block_g)
    return block_g, g_tile, max(1, min(8, block_g * g_tile // 256))


def triton_fake_quantize(weight: torch.Tensor, bits: int, group_size: int, h: torch.Tensor | None = None,
                         out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel: `fake_quant_reference`'s result from one pass over W; with `out`, the
    dequantized weight is written there."""
    _check_weight(weight)
    maxq = 2 ** check_bits(bits) - 1
    rows, cols = weight.shape
    # a group wider than the row is the whole row, so the kernel never holds more than the row
    group = min(check_group_size(group_size), max(cols, 1))
    if triton.next_power_of_2(group) > MAX_GROUP_BLOCK:
        raise ValueError(f"groups of {group} columns exceed the kernel's limit of {MAX_GROUP_BLOCK}")
    _check_h(h, weight)
    hk = None if h is None else h.to(device=weight.device, dtype=torch.float32).reshape(-1).contiguous()
    if out is None:
        out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    elif out.shape != weight.shape or out.dtype != weight.dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor of W's shape and dtype")
    err = torch.empty(rows, dtype=torch.float32, device=weight.device)
    if rows and cols:
        block_g, g_tile, num_warps = _tile(group)
        w = weight.contiguous()
        _fake_quant_rows[(rows,)](w, w if hk is None else hk, out, err, cols, group_count(cols, group),
                                  MAXQ=maxq, GROUP=group, BLOCK_G=block_g, G_TILE=g_tile,
                                  HAS_H=hk is not None, num_warps=num_warps)
    else:
        err.zero_()
    return out, err


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int, h: torch.Tensor | None = None,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(deq in W's dtype, float32 per-row error): the kernel on CUDA tensors, else the reference."""
    _check_weight(weight)
    check_bits(bits)
    group = check_group_size(group_size)
    _check_h(h, weight)   # the reference would report a wrong-sized h as a reshape error
    too_wide = triton is not None and triton.next_power_of_2(min(group, weight.shape[1])) > MAX_GROUP_BLOCK
    if resolve_backend(backend, weight) == "triton" and not too_wide:
        return triton_fake_quantize(weight, bits, group_size, h)
    return fake_quant_reference(weight, bits, group_size, h)

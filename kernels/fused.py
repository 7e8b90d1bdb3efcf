"""Prune one linear layer by a candidate program: the torch reference, or one fused Triton kernel.

    mask = prune_mask(tree, env, sparsity=0.5)              # True marks a pruned weight
    mask = prune_mask(tree, env, 0.0, nm=(2, 4), out=W)     # N:M, and write the pruned weights

`env` maps input names to tensors that broadcast against the weight `W` [out, in]: per-weight
[out, in], per-input [1, in] or [in], per-output [out, 1], or scalars. `backend="auto"` runs the
generated kernel on CUDA tensors and the torch reference on the CPU (the Triton interpreter is
for tests, not speed). Both give the mask of `kernels.select`; a NaN/Inf score is an error.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import tempfile
from types import ModuleType

import torch

from autoprune_ray.tree import expr
from .codegen import Leaf, generate
from autoprune_ray.tree.expr import COLVEC, MATRIX, ROWVEC, SCALAR, Node, Shape
from .select import nm_mask, row_mask, row_split

BACKENDS = ("auto", "torch", "triton")
MAX_KERNEL_COLS = 1 << 20


# ---------------------------------------------------------------- torch reference

def reference_score(tree: Node, env: dict[str, torch.Tensor]) -> torch.Tensor:
    """The score as a full [out, in] matrix; a non-finite value is an error, never masked."""
    missing = expr.inputs_of(tree) - set(env)
    if missing:
        raise ValueError(f"program needs input(s) {sorted(missing)} that were not collected")
    score = expr.evaluate(tree, env).expand(env["W"].shape)
    bad = ~torch.isfinite(score)
    if bad.any():
        raise FloatingPointError(f"program score has {int(bad.sum())} NaN/Inf values of {score.numel()}")
    return score


def reference_mask(tree: Node, env: dict[str, torch.Tensor], sparsity: float,
                   nm: tuple[int, int] | None = None) -> torch.Tensor:
    score = reference_score(tree, env)
    return nm_mask(score, *nm) if nm else row_mask(score, sparsity)


# ---------------------------------------------------------------- generated kernels

_COMPILED: dict[str, tuple[ModuleType, tuple[Leaf, ...]]] = {}
_KERNEL_DIR: str | None = None


def compiled_count() -> int:
    """Kernels generated in this process: one per distinct (canonical tree, input shapes)."""
    return len(_COMPILED)


def _input_shape(t: torch.Tensor) -> Shape:
    if t.numel() == 1:
        return SCALAR
    t2 = t.reshape(1, -1) if t.dim() == 1 else t
    return Shape(t2.shape[0] != 1, t2.shape[1] != 1)


def _kernel_module(tree: Node, shapes: dict[str, Shape]) -> tuple[ModuleType, tuple[Leaf, ...]]:
    key = expr.to_string(tree) + "|" + ",".join(f"{n}:{int(s.rows)}{int(s.cols)}" for n, s in sorted(shapes.items()))
    if key not in _COMPILED:
        global _KERNEL_DIR
        generated = generate(tree, shapes)
        # @triton.jit reads its function's source file, so the module is written out, then imported.
        _KERNEL_DIR = _KERNEL_DIR or tempfile.mkdtemp(prefix="autoprune-kernels-")
        name = "autoprune_kernel_" + hashlib.sha1(key.encode()).hexdigest()[:16]
        path = os.path.join(_KERNEL_DIR, name + ".py")
        with open(path, "w") as f:
            f.write(generated.source)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _COMPILED[key] = (module, generated.leaves)
    return _COMPILED[key]


def _leaf_tensor(leaf: Leaf, env, memo, rows: int, cols: int, device) -> torch.Tensor:
    value = env[leaf.node.value] if not leaf.precomputed else expr.evaluate(leaf.node, env, memo)
    value = value.to(device)
    if leaf.shape == MATRIX:
        return value.expand(rows, cols).contiguous()
    if leaf.shape in (COLVEC, ROWVEC):
        return value.reshape(-1).float().contiguous()
    return value.reshape(1).float()


def _num_warps(block: int) -> int:
    # measured on an H200 (benchmarks/results): 64-128 row elements per thread are fastest
    return max(2, min(8, block // 4096))


def triton_mask(tree: Node, env: dict[str, torch.Tensor], sparsity: float, nm: tuple[int, int] | None = None,
                out: torch.Tensor | None = None, score_out: torch.Tensor | None = None,
                num_warps: int | None = None, bad_count: torch.Tensor | None = None) -> torch.Tensor:
    """The generated kernel's mask. NaN/Inf scores raise here, which waits for the GPU; a caller
    pruning many layers can pass its own int32 `bad_count` instead and check it once at the end."""
    import triton

    weight = env["W"]
    rows, cols = weight.shape
    if cols >= MAX_KERNEL_COLS:
        raise ValueError(f"rows of {cols} inputs exceed the kernel's limit of {MAX_KERNEL_COLS - 1}")
    module, leaves = _kernel_module(tree, {name: _input_shape(t) for name, t in env.items()})
    memo: dict = {}
    inputs = [_leaf_tensor(leaf, env, memo, rows, cols, weight.device) for leaf in leaves]
    mask = torch.empty((rows, cols), dtype=torch.int8, device=weight.device)
    bad = torch.zeros(1, dtype=torch.int32, device=weight.device) if bad_count is None else bad_count
    for t in (out, score_out):
        if t is not None and (t.shape != weight.shape or not t.is_contiguous()):
            raise ValueError("out and score_out must be contiguous tensors shaped like W")
    writes = dict(WRITE_OUT=out is not None, WRITE_SCORE=score_out is not None)
    tail = [mask, weight.contiguous(), mask if out is None else out, mask if score_out is None else score_out, bad]
    if nm:
        n, m = nm
        if cols % m:
            raise ValueError(f"N:M {n}:{m} does not divide the input width {cols}")
        block_g = triton.next_power_of_2(cols // m)
        module.prune_nm[(rows,)](*inputs, *tail, cols, cols // m, N=n, M=m, BLOCK_G=block_g,
                                 num_warps=num_warps or _num_warps(block_g * m), **writes)
    else:
        k, extra_rows = row_split(rows, cols, sparsity)
        block = triton.next_power_of_2(cols)
        module.prune_rows[(rows,)](*inputs, *tail, cols, k, extra_rows, BLOCK=block,
                                   num_warps=num_warps or _num_warps(block), **writes)
    n_bad = 0 if bad_count is not None else int(bad.item())
    if n_bad:
        raise FloatingPointError(f"program score has {n_bad} NaN/Inf values of {rows * cols}")
    return mask.view(torch.bool)


# ---------------------------------------------------------------- entry point

@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_usable(weight: torch.Tensor) -> bool:
    if not _triton_installed():
        return False
    return weight.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, weight: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}: use one of {BACKENDS}")
    if backend == "auto":
        return "triton" if weight.is_cuda and _triton_usable(weight) else "torch"
    if backend == "triton" and not _triton_usable(weight):
        raise RuntimeError("backend='triton' needs the triton package and a CUDA tensor "
                           "(or TRITON_INTERPRET=1 set before import, for tests)")
    return backend


def prune_mask(tree: Node, env: dict[str, torch.Tensor], sparsity: float, nm: tuple[int, int] | None = None,
               backend: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """Row-wise (or N:M) mask of a program's scores; with `out`, also the pruned weights."""
    cols = env["W"].shape[1]
    if (nm and nm[1] & (nm[1] - 1)) or cols >= MAX_KERNEL_COLS:
        backend = "torch"   # the kernel needs a power-of-two group width and 20-bit row counts
    if resolve_backend(backend, env["W"]) == "triton":
        return triton_mask(tree, env, sparsity, nm, out=out)
    mask = reference_mask(tree, env, sparsity, nm)
    if out is not None:
        out.copy_(env["W"].masked_fill(mask, 0))
    return mask

"""Per-layer quantization sensitivity: one value per (linear layer, bit width), lower = safer to
quantize. A bit allocator (compress.bits) turns the table into a mixed-precision model.

* program    a candidate program of the `mpq` task (TAP), evaluated on each layer's tensors with
             E = Q_b(W) − W; the expert proxies below that need no forward pass are such programs
             (operators.seeds.SENSITIVITY_SEEDS).
* hawq       HAWQ-v3's Ω = Tr(H)/n · ||Q_b(W) − W||². `gram`: the layer-output Hessian X Xᵀ stands
             in for H (the `hawq` seed); `hutchinson`: Tr(H) of the LM loss itself, estimated with
             Rademacher probes and Hessian-vector products.
* aptq       attention-aware (APTQ-style): the layer is quantized alone and the change is measured
             on its sub-block's output (the attention block for q/k/v/o, through the softmax; the MLP
             for gate/up/down), relative to the residual stream entering the block, token by token
             (mean of ||Δo_t||² / ||h_t||²). APTQ derives a
             Hessian trace of the attention output; measuring the output change directly is the
             approximation we make (it is exact for the quantized weights, not a second-order model).
* measured   the ground truth a proxy is ranked against: the held-out NLL increase when that one
             layer alone is quantized, for a sample of layers.

Layers are ordered (block index, linear name), as `quant_layers` lists them.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from autoprune_ray.tree import expr
from autoprune_ray.tree.expr import Node
from autoprune_ray.kernels.quant import fake_quantize

from .eval import perplexity
from .models import LoadedModel, block_linears, decoder_layers
from .program import score_inputs
from .stats import BlockWalker, CalibrationStats


@dataclass(frozen=True)
class QuantLayer:
    block: int
    name: str
    linear: nn.Linear

    @property
    def key(self) -> str:
        return f"{self.block}.{self.name}"


def quant_layers(model: nn.Module) -> list[QuantLayer]:
    return [QuantLayer(i, name, lin) for i, block in enumerate(decoder_layers(model))
            for name, lin in block_linears(block).items()]


def quant_error(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """E = Q_b(W) − W in float32."""
    deq, _ = fake_quantize(weight, bits, group_size)
    return deq.float() - weight.float()


def _finite(table: np.ndarray, layers: list[QuantLayer], what: str) -> np.ndarray:
    bad = ~np.isfinite(table)
    if bad.any():
        where = layers[int(np.argwhere(bad)[0][0])].key
        raise FloatingPointError(f"{what} gave {int(bad.sum())} non-finite sensitivities (first at layer {where})")
    return table


# ---------------------------------------------------------------- programs (and the gram HAWQ)

def program_sensitivity(tree: Node, layers: list[QuantLayer], dense: list[torch.Tensor], stats: CalibrationStats,
                        choices: list[int], group_size: int, error=None) -> np.ndarray:
    """[L, B]: the program on each layer's inputs (operators.language.MPQ) at each bit width;
    `error(i, bits)` gives E from a cache (compress.rounding), else it is computed here."""
    error = error or (lambda i, bits: quant_error(dense[i], bits, group_size))
    n_blocks = max(layer.block for layer in layers) + 1
    table = np.empty((len(layers), len(choices)))
    for i, (layer, weight) in enumerate(zip(layers, dense)):
        block = stats.blocks[layer.block]
        env = score_inputs(weight, block[layer.name], block.grad_rms.get(layer.name),
                           layer.block / max(n_blocks - 1, 1))
        for j, bits in enumerate(choices):
            env["E"], env["b"] = error(i, bits), torch.tensor(float(bits))
            table[i, j] = float(expr.evaluate(tree, env).reshape(-1)[0])
    return _finite(table, layers, "the sensitivity program")


# ---------------------------------------------------------------- HAWQ with Hutchinson's trace

def hutchinson_traces(lm: LoadedModel, windows: torch.Tensor, probes: int, seed: int = 0) -> list[float]:
    """Tr(∇²_W L)/n per layer: E[vᵀ H v] over Rademacher v, one Hessian-vector product per probe
    and window. The blocks of one joint v give every layer's trace at once (cross terms average
    out). SDPA has no double backward on the CPU, so attention runs eager meanwhile."""
    params = [layer.linear.weight for layer in quant_layers(lm.model)]
    sums = [0.0] * len(params)
    gen = torch.Generator().manual_seed(seed)
    previous = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("eager")
    for p in params:
        p.requires_grad_(True)
    try:
        for window in tqdm(windows.to(lm.device), desc="hutchinson", leave=False):
            batch = window.unsqueeze(0)
            loss = lm.model(batch, labels=batch, use_cache=False).loss
            grads = torch.autograd.grad(loss, params, create_graph=True)
            for _ in range(probes):
                v = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in params]
                hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
                for k, (a, b) in enumerate(zip(v, hv)):
                    sums[k] += float((a * b).sum())
    finally:
        for p in params:
            p.requires_grad_(False)
        lm.model.set_attn_implementation(previous)
    count = len(windows) * probes
    # away from a minimum the Hessian is indefinite and a few probes can give a negative trace
    return [max(s / count / p.numel(), 0.0) for s, p in zip(sums, params)]


def hawq_sensitivity(traces: list[float], dense: list[torch.Tensor], choices: list[int],
                     group_size: int) -> np.ndarray:
    return np.array([[t * float(quant_error(w, b, group_size).pow(2).sum()) for b in choices]
                     for t, w in zip(traces, dense)])


# ---------------------------------------------------------------- APTQ-style, attention-aware

def _sub_block_name(linear_name: str) -> str:
    """The module whose output a linear's error is measured on: `self_attn` for self_attn.q_proj
    ('' — the whole block — for a linear directly in it)."""
    return linear_name.rpartition(".")[0]


class _Calls:
    """Records a sub-module's (args, kwargs, output) per batch during a dense pass."""

    def __init__(self, module: nn.Module):
        self.calls: list[tuple[tuple, dict, torch.Tensor]] = []
        self.handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs, out):
        self.calls.append((args, kwargs, out[0] if isinstance(out, tuple) else out))


def _output_change(module: nn.Module, calls: list, token_norms: list[torch.Tensor]) -> float:
    """Mean over tokens of ||Δ output_t||² / ||h_t||², h_t the residual stream entering the block."""
    total, count = 0.0, 0
    with torch.no_grad():
        for (args, kwargs, dense_out), norms in zip(calls, token_norms):
            out = module(*args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            total += float(((out.float() - dense_out.float()).pow(2).sum(-1) / norms).sum())
            count += norms.numel()
    return total / count


def aptq_sensitivity(lm: LoadedModel, windows: torch.Tensor, choices: list[int], group_size: int,
                     batch_size: int = 8) -> np.ndarray:
    """[L, B]: the sub-block output change relative to the residual stream, per token, one layer
    quantized at a time, on the dense model's block inputs (one pass). Per token, because a few
    attention-sink tokens carry most of the residual stream's energy in later blocks."""
    walker = BlockWalker(lm, windows, batch_size)
    inputs, rows = walker.inputs, []
    for block in tqdm(walker.layers, desc="aptq", leave=False):
        linears = block_linears(block)
        recorders = {sub: _Calls(block.get_submodule(sub)) for sub in {_sub_block_name(n) for n in linears}}
        try:
            outputs = walker.run_block(block, inputs)
        finally:
            for r in recorders.values():
                r.handle.remove()
        norms = [b.float().pow(2).sum(-1).clamp_min(1e-30) for b in walker.block_batches(inputs)]
        for name, lin in linears.items():
            dense = lin.weight.data.clone()
            row = []
            for bits in choices:
                lin.weight.data.copy_(fake_quantize(dense, bits, group_size)[0])
                sub = _sub_block_name(name)
                row.append(_output_change(block.get_submodule(sub), recorders[sub].calls, norms))
            lin.weight.data.copy_(dense)
            rows.append(row)
        inputs = outputs
    return np.array(rows)


# ---------------------------------------------------------------- measured, and rank correlation

def sample_layers(n_layers: int, count: int, seed: int = 0) -> list[int]:
    """A fixed, sorted sample of layer indices (all of them when count >= n_layers)."""
    if count >= n_layers:
        return list(range(n_layers))
    return sorted(random.Random(seed).sample(range(n_layers), count))


def measured_sensitivity(lm: LoadedModel, tokens: torch.Tensor, seqlen: int, indices: list[int], bits: int,
                         group_size: int) -> list[float]:
    """Held-out NLL increase (nats per token) with one layer quantized at `bits`, the rest dense."""
    layers = quant_layers(lm.model)
    base = math.log(perplexity(lm, tokens, seqlen, progress=False))
    out = []
    for index in tqdm(indices, desc="measured sensitivity", leave=False):
        lin = layers[index].linear
        dense = lin.weight.data.clone()
        try:
            lin.weight.data.copy_(fake_quantize(dense, bits, group_size)[0])
            out.append(math.log(perplexity(lm, tokens, seqlen, progress=False)) - base)
        finally:
            lin.weight.data.copy_(dense)
    return out


def rank_correlation(proxy: list[float], measured: list[float]) -> tuple[float, float]:
    """(Spearman ρ, Kendall τ) between a proxy and the measured sensitivities; NaN when either
    is constant (no ranking to compare)."""
    from scipy import stats

    if len(set(proxy)) < 2 or len(set(measured)) < 2:
        return math.nan, math.nan
    return float(stats.spearmanr(proxy, measured).statistic), float(stats.kendalltau(proxy, measured).statistic)

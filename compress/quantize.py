"""Mixed-precision weight-only quantization of a model: sensitivities, a bit allocation under an
average-bits budget, then per-layer fake quantization (RTN or GPTQ), in place.

    result = quantize_model(lm, data, QuantConfig(method="hawq", avg_bits=3.25))
    result.avg_bits, result.bits            # achieved average (counting group scales), per layer

The budget counts each group's fp16 scale and zero (compress.bits): at group size 128, uniform
3-bit weights cost 3.25 bits (more where 128 does not divide a width); `as_uniform=3` sets the
budget to exactly what uniform 3-bit costs the model. Methods: uniform, hawq (gram | hutchinson), aptq, program (a TAP
proxy in the candidate language). See compress.sensitivity for what each one measures. GPTQ runs
its own sequential protocol by default (block by block, each block calibrated on the quantized
blocks' outputs); `gptq_mode="one-pass"` uses the dense model's cached Gram matrices instead.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import numpy as np
import torch
from torch import nn

from autoprune_ray.tree.expr import Node, call, inp
from autoprune_ray.kernels.quant import check_bits, check_group_size

from . import bits as bitalloc
from .data import TokenData
from .gptq import gptq_quantize
from .models import LoadedModel, block_linears
from .rounding import round_weight
from .sensitivity import (QuantLayer, aptq_sensitivity, hawq_sensitivity, hutchinson_traces, program_sensitivity,
                          quant_layers)
from .stats import BlockContext, BlockStats, CalibrationStats, calibration_stats

METHODS = ("uniform", "hawq", "aptq", "program")
# HAWQ with X Xᵀ for the Hessian, Tr(H)/n · ||Q(W) − W||², as an expression tree: the canonical form
# of operators.seeds' "hawq" seed (a test holds them equal; compress does not import operators).
HAWQ_GRAM = call("mul", call("mean_row", inp("H")), call("sum_row", call("sum_col", call("square", inp("E")))))
HESSIANS = ("gram", "hutchinson")
QUANTIZERS = ("rtn", "gptq")
GPTQ_MODES = ("sequential", "one-pass")


@dataclass
class QuantConfig:
    method: str = "hawq"
    avg_bits: float = 3.25                  # average bits per weight, group scale and zero included
    as_uniform: int | None = None           # instead: the budget is what uniform b-bit costs this model
    group_size: int = 128
    choices: tuple[int, ...] = (2, 3, 4, 8)
    allocator: str = "ilp"                  # ilp (exact, scipy milp) or greedy
    quantizer: str = "rtn"                  # rtn, or gptq
    hessian: str = "gram"                   # hawq: gram (X Xᵀ) or hutchinson (LM-loss Hessian)
    hutchinson_windows: int = 4
    hutchinson_probes: int = 2
    aptq_windows: int = 16                  # calibration windows the APTQ-style measurement uses
    program: Node | None = None             # method program: a sensitivity tree (task mpq)
    gptq_damp: float = 0.01
    gptq_blocksize: int = 128
    gptq_act_order: bool = False            # columns by decreasing XᵀX diagonal, static group grids
    # sequential: GPTQ's own protocol, each block calibrated on the outputs of the blocks already
    # quantized; one-pass: the dense model's cached Gram matrices (what a search's fitness uses)
    gptq_mode: str = "sequential"

    def validate(self) -> "QuantConfig":
        _choose("method", self.method, METHODS)
        _choose("hessian", self.hessian, HESSIANS)
        _choose("quantizer", self.quantizer, QUANTIZERS)
        _choose("gptq_mode", self.gptq_mode, GPTQ_MODES)
        _choose("allocator", self.allocator, bitalloc.METHODS)
        check_group_size(self.group_size)
        if not self.gptq_damp > 0:
            raise ValueError(f"gptq_damp must be positive (a share of the mean Hessian diagonal), got {self.gptq_damp}")
        for b in self.choices:
            check_bits(b)
        if list(self.choices) != sorted(set(self.choices)):
            raise ValueError(f"bit choices must be increasing and distinct, got {list(self.choices)}")
        if self.as_uniform is not None and self.as_uniform not in self.choices:
            raise ValueError(f"as_uniform {self.as_uniform} is not one of the bit choices {list(self.choices)}")
        if (self.method == "program") != (self.program is not None):
            raise ValueError("method 'program' and a sensitivity program go together")
        return self

    @property
    def needs_statistics(self) -> bool:
        """The dense one-pass Gram matrices feed one-pass GPTQ and the program/Gram-HAWQ tables;
        APTQ-style and Hutchinson measure on the model itself, sequential GPTQ collects its own,
        and uniform RTN needs nothing."""
        return self.one_pass_gptq or self.method == "program" or (self.method == "hawq" and self.hessian == "gram")

    @property
    def gptq_options(self) -> dict:
        return {"blocksize": self.gptq_blocksize, "damp": self.gptq_damp, "act_order": self.gptq_act_order}

    @property
    def one_pass_gptq(self) -> bool:
        return self.quantizer == "gptq" and self.gptq_mode == "one-pass"

    def budget(self, sizes: list[bitalloc.LayerSize]) -> float | Fraction:
        """Average bits allowed. A width the group size does not divide costs more scales (SmolLM2's
        576 = 4.5 groups of 128), so uniform 4-bit there is 4.27 bits, not 4.25: `as_uniform`
        compares mixed allocations with uniform ones at exactly the same size (an exact fraction:
        the float just below it would not fit uniform itself)."""
        if self.as_uniform is None:
            return self.avg_bits
        cost = bitalloc.total_cost(sizes, [self.as_uniform] * len(sizes), self.group_size)
        return Fraction(cost, bitalloc.total_numel(sizes))

    @property
    def label(self) -> str:
        name = "hawq-hutchinson" if self.method == "hawq" and self.hessian == "hutchinson" else self.method
        if self.quantizer == "rtn":
            return name
        name += " gptq act-order" if self.gptq_act_order else " gptq"
        return name + (" one-pass" if self.one_pass_gptq else "")


def _choose(key: str, value: str, options) -> None:
    if value not in options:
        raise ValueError(f"unknown {key} {value!r}: choose one of {', '.join(options)}")


@dataclass
class QuantResult:
    config: QuantConfig
    layers: list[str]
    bits: list[int]
    avg_bits: float
    sensitivity: np.ndarray | None = None
    seconds: float = 0.0
    histogram: dict[int, int] = field(default_factory=dict)
    budget: float | None = None

    def to_dict(self) -> dict:
        cfg = asdict(self.config) | {"program": None}
        return {"config": cfg, "label": self.config.label, "budget": self.budget, "avg_bits": self.avg_bits,
                "bits": dict(zip(self.layers, self.bits)), "histogram": self.histogram, "seconds": self.seconds}


def layer_sizes(layers: list[QuantLayer]) -> list[bitalloc.LayerSize]:
    return [bitalloc.LayerSize(layer.key, *layer.linear.weight.shape) for layer in layers]


def sensitivity_table(lm: LoadedModel, data: TokenData, cfg: QuantConfig, layers: list[QuantLayer],
                      stats: CalibrationStats | None = None) -> np.ndarray | None:
    """[L, B] sensitivities of `cfg.method` on the dense model (None for uniform)."""
    dense = [layer.linear.weight.data for layer in layers]
    choices = list(cfg.choices)
    if cfg.method == "uniform":
        return None
    if cfg.method == "aptq":
        return aptq_sensitivity(lm, data.calibration[:cfg.aptq_windows], choices, cfg.group_size)
    if cfg.method == "hawq" and cfg.hessian == "hutchinson":
        traces = hutchinson_traces(lm, data.calibration[:cfg.hutchinson_windows], cfg.hutchinson_probes, data.seed)
        return hawq_sensitivity(traces, dense, choices, cfg.group_size)
    tree = cfg.program if cfg.method == "program" else HAWQ_GRAM
    stats = stats or calibration_stats(lm, data, "one-pass", with_gram=True)   # one cache entry with quantize_model
    return program_sensitivity(tree, layers, dense, stats, choices, cfg.group_size)


def allocate_bits(table: np.ndarray | None, cfg: QuantConfig, sizes: list[bitalloc.LayerSize]) -> list[int]:
    budget = cfg.budget(sizes)
    if table is None:
        return [bitalloc.uniform_bits(list(cfg.choices), sizes, budget, cfg.group_size)] * len(sizes)
    return bitalloc.allocate(cfg.allocator, table, list(cfg.choices), sizes, budget, cfg.group_size)


def apply_bits(layers: list[QuantLayer], bits: list[int], cfg: QuantConfig, stats: CalibrationStats | None = None,
               dense: list[torch.Tensor] | None = None) -> None:
    """Fake-quantize every layer in place at its bit width, from `dense` weights when given. GPTQ
    here takes `stats` as they are (one-pass); quantize_model runs the sequential protocol."""
    for k, (layer, b) in enumerate(zip(layers, bits)):
        weight = dense[k] if dense is not None else layer.linear.weight.data
        gram = stats.blocks[layer.block][layer.name].gram if cfg.quantizer == "gptq" else None
        new = round_weight(weight, b, cfg.quantizer, cfg.group_size, gram, **cfg.gptq_options)
        layer.linear.weight.data.copy_(new)


class GPTQBlockHook:
    """The sequential walk's hook: GPTQ on each block's linears from the Gram matrices of inputs
    that already went through the quantized blocks before it (the walk then re-runs the block, so
    the next one sees this block's quantized outputs). Each Gram is released once used: a model's
    worth of them would otherwise stay in memory until the walk ends."""

    def __init__(self, layers: list[QuantLayer], bits: list[int], cfg: QuantConfig):
        self.bits = {(layer.block, layer.name): b for layer, b in zip(layers, bits)}
        self.cfg = cfg
        self.signature = f"gptq {cfg.group_size} {sorted(cfg.gptq_options.items())} {sorted(self.bits.items())}"

    def __call__(self, index: int, block: nn.Module, stats: BlockStats, ctx: BlockContext) -> None:
        for name, linear in block_linears(block).items():
            st = stats[name]
            new = gptq_quantize(linear.weight.data, st.gram, self.bits[(index, name)], self.cfg.group_size,
                                **self.cfg.gptq_options)
            linear.weight.data.copy_(new)
        for st in stats.inputs.values():
            st.gram = None


def gptq_sequential(lm: LoadedModel, data: TokenData, layers: list[QuantLayer], bits: list[int],
                    cfg: QuantConfig) -> None:
    """GPTQ's protocol, on the pruning's sequential walk; never cached, as it changes the model."""
    calibration_stats(lm, data, "sequential", hook=GPTQBlockHook(layers, bits, cfg), with_gram=True,
                      use_cache=False)


def quantize_model(lm: LoadedModel, data: TokenData | None, cfg: QuantConfig) -> QuantResult:
    """Quantize `lm` in place. Uniform RTN needs no data; everything else calibrates on `data`."""
    cfg.validate()
    if data is None and (cfg.method != "uniform" or cfg.quantizer == "gptq"):
        raise ValueError(f"{cfg.label} needs calibration data")
    start = time.perf_counter()
    layers = quant_layers(lm.model)
    sizes = layer_sizes(layers)
    stats = calibration_stats(lm, data, "one-pass", with_gram=True) if cfg.needs_statistics else None
    table = sensitivity_table(lm, data, cfg, layers, stats)
    chosen = allocate_bits(table, cfg, sizes)
    if cfg.quantizer == "gptq" and not cfg.one_pass_gptq:
        gptq_sequential(lm, data, layers, chosen, cfg)
    else:
        apply_bits(layers, chosen, cfg, stats)
    histogram = {b: chosen.count(b) for b in cfg.choices}
    return QuantResult(cfg, [layer.key for layer in layers], chosen,
                       bitalloc.average_bits(sizes, chosen, cfg.group_size), table,
                       time.perf_counter() - start, histogram, float(cfg.budget(sizes)))

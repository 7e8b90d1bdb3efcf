"""Fitness of a mixed-precision sensitivity program (task mpq, TAP) on one target model, without
Ray: the program's table → the bit allocation at the budget → the quantized model's held-out
perplexity. The forward-free first stage is the allocation's mean relative output error
||(Q(W) − W) X||² / ||W X||² over layers, from cached Gram matrices.

Each candidate also gets the rank correlation (Spearman, Kendall) between its sensitivities and
the measured ones (held-out NLL increase with one layer quantized) on a fixed sample of layers,
as EMQ and Auto-Prox report; the measurement is cached on disk, since it costs one forward pass
per sampled layer.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from autoprune_ray.kernels.expr import Node
from autoprune_ray.kernels.quant import fake_quantize

from .data import TokenData
from .eval import perplexity, reconstruction_error
from .models import LoadedModel, cache_root
from .quantize import QuantConfig, allocate_bits, apply_bits, layer_sizes
from .sensitivity import measured_sensitivity, program_sensitivity, quant_layers, rank_correlation, sample_layers
from . import bits as bitalloc
from .stats import CalibrationStats, calibration_stats


@dataclass
class MeasureConfig:
    """The ground truth proxies are ranked against: a sample of layers, each quantized alone."""
    layers: int = 16
    bits: int = 2
    tokens: int = 2048
    seed: int = 0


@dataclass
class SensitivityFitness:
    proxy: float                    # mean relative output error of the allocation (lower is better)
    avg_bits: float
    spearman: float
    kendall: float
    seconds: float
    bits: list[int] = field(default_factory=list)
    perplexity: float | None = None


class SensitivityEvaluator:
    def __init__(self, lm: LoadedModel, data: TokenData, quant: QuantConfig, measure: MeasureConfig | None = None,
                 stats: CalibrationStats | None = None, with_grad: bool = False):
        self.lm, self.data, self.quant = lm, data, quant.validate()
        self.stats = stats or calibration_stats(lm, data, "one-pass", with_gram=True, with_grad=with_grad)
        self.layers = quant_layers(lm.model)
        self.dense = [layer.linear.weight.data.clone() for layer in self.layers]
        self.sizes = layer_sizes(self.layers)
        self.relative_error = self._relative_errors()
        self.measure = measure or MeasureConfig()
        self.measured_layers, self.measured = self._measured()
        self._last_bits: list[int] | None = None

    def _relative_errors(self) -> np.ndarray:
        """[L, B] ||E X||² / ||W X||² of each layer at each bit width (program independent)."""
        table = np.empty((len(self.layers), len(self.quant.choices)))
        for i, (layer, w) in enumerate(zip(self.layers, self.dense)):
            gram = self.stats.blocks[layer.block][layer.name].gram
            base = reconstruction_error(w, torch.zeros_like(w), gram)
            for j, b in enumerate(self.quant.choices):
                quantized = fake_quantize(w, b, self.quant.group_size)[0]
                table[i, j] = reconstruction_error(w, quantized, gram) / max(base, 1e-30)
        return table

    def _measured(self) -> tuple[list[int], list[float]]:
        m = self.measure
        indices = sample_layers(len(self.layers), m.layers, m.seed)
        tokens = self.data.evaluation[:, :m.tokens]
        key = {"model": self.lm.name, "tokens": hashlib.sha1(tokens.numpy().tobytes()).hexdigest()[:16],
               "seqlen": self.data.seqlen, "layers": indices, "bits": m.bits, "group": self.quant.group_size}
        path = cache_root() / "sensitivity" / (hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
                                               + ".json")
        if path.exists():
            return indices, json.loads(path.read_text())["measured"]
        values = measured_sensitivity(self.lm, tokens, self.data.seqlen, indices, m.bits, self.quant.group_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        tmp.write_text(json.dumps({"key": key, "measured": values}))
        tmp.replace(path)
        return indices, values

    def table(self, tree: Node) -> np.ndarray:
        return program_sensitivity(tree, self.layers, self.dense, self.stats, list(self.quant.choices),
                                   self.quant.group_size)

    def proxy(self, tree: Node) -> SensitivityFitness:
        """Sensitivities, allocation, forward-free error and rank correlation; keeps the allocation
        for `perplexity_of_last`."""
        start = time.perf_counter()
        table = self.table(tree)
        chosen = allocate_bits(table, self.quant, self.sizes)
        column = {b: j for j, b in enumerate(self.quant.choices)}
        error = float(np.mean([self.relative_error[i, column[b]] for i, b in enumerate(chosen)]))
        at = column.get(self.measure.bits)
        proxy_values = [float(table[i, at]) for i in self.measured_layers] if at is not None else []
        rho, tau = rank_correlation(proxy_values, self.measured) if proxy_values else (float("nan"),) * 2
        self._last_bits = chosen
        return SensitivityFitness(error, bitalloc.average_bits(self.sizes, chosen, self.quant.group_size), rho, tau,
                                  time.perf_counter() - start, chosen)

    def perplexity_of_last(self, result: SensitivityFitness, eval_tokens: torch.Tensor | None = None):
        start = time.perf_counter()
        try:
            apply_bits(self.layers, self._last_bits, self.quant, self.stats, self.dense)
            tokens = self.data.evaluation if eval_tokens is None else eval_tokens
            result.perplexity = perplexity(self.lm, tokens, self.data.seqlen, progress=False)
        finally:
            self.restore()
        result.seconds += time.perf_counter() - start
        return result

    def restore(self) -> None:
        for layer, w in zip(self.layers, self.dense):
            layer.linear.weight.data.copy_(w)

    def describe(self) -> dict:
        return {"quant": asdict(self.quant) | {"program": None}, "measure": asdict(self.measure)}

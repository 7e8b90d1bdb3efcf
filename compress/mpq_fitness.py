"""Fitness of a mixed-precision sensitivity program (task mpq, TAP) on one target model, without
Ray: the program's table → the bit allocation at the budget → the quantized model's held-out
perplexity (validation split). The forward-free first stage is the allocation's mean relative output error
||(Q(W) − W) X||² / ||W X||² over layers, from cached Gram matrices.

Each candidate also gets the rank correlation (Spearman, Kendall) between its sensitivities and
the measured ones (validation NLL increase with one layer quantized) on a fixed sample of layers,
as EMQ and Auto-Prox report; the measurement is cached on disk, since it costs one forward pass
per sampled layer.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from autoprune_ray.tree.expr import Node

from .data import TokenData
from .eval import reconstruction_error
from .fitness import DenseEvaluator, Screened
from .models import LoadedModel, cache_root
from .quantize import QuantConfig, allocate_bits, layer_sizes
from .rounding import RoundedWeights
from .sensitivity import measured_sensitivity, program_sensitivity, quant_layers, rank_correlation, sample_layers
from . import bits as bitalloc
from .stats import CalibrationStats


@dataclass
class MeasureConfig:
    """The ground truth proxies are ranked against: a sample of layers, each quantized alone."""
    layers: int = 16
    bits: int = 2
    tokens: int = 2048
    seed: int = 0


class SensitivityEvaluator(DenseEvaluator):
    """Screens sensitivity programs (QuantConfig with method program) at the evaluator's budget;
    `screen(...).value` is the bit width of each quantizable layer."""

    def __init__(self, lm: LoadedModel, data: TokenData, quant: QuantConfig, measure: MeasureConfig | None = None,
                 stats: CalibrationStats | None = None, with_grad: bool = False):
        super().__init__(lm, data, stats, with_grad)
        self.quant = quant.validate()
        self.qlayers = quant_layers(lm.model)
        self.qdense = [self.dense[layer.block][layer.name] for layer in self.qlayers]
        self.sizes = layer_sizes(self.qlayers)
        self.rounded = RoundedWeights(self.qlayers, self.qdense, self.quant, self.stats)
        self.relative_error = self._relative_errors()
        self.ground_truth = measure or MeasureConfig()   # `measure` is the staged-fitness method
        self.measured_layers, self.measured = self._measured()

    def _relative_errors(self) -> np.ndarray:
        """[L, B] ||E X||² / ||W X||² of each layer at each bit width (program independent)."""
        table = np.empty((len(self.qlayers), len(self.quant.choices)))
        for i, (layer, w) in enumerate(zip(self.qlayers, self.qdense)):
            gram = self.stats.blocks[layer.block][layer.name].gram
            base = reconstruction_error(w, torch.zeros_like(w), gram)
            for j, b in enumerate(self.quant.choices):
                table[i, j] = reconstruction_error(w, self.rounded.fitted(i, b), gram) / max(base, 1e-30)
        return table
    def _measured(self) -> tuple[list[int], list[float]]:
        m = self.ground_truth
        indices = sample_layers(len(self.layers), m.layers, m.seed)
        tokens = self.data.validation[:, :m.tokens]
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
        return program_sensitivity(tree, self.qlayers, self.qdense, self.stats, list(self.quant.choices),
                                   self.quant.group_size, self.rounded.error)

    def screen(self, config: QuantConfig) -> Screened:
        """Sensitivities, the allocation at this evaluator's budget, forward-free error and rank
        correlation with the measured sample."""
        start = time.perf_counter()
        table = self.table(config.program)
        chosen = allocate_bits(table, self.quant, self.sizes)
        column = {b: j for j, b in enumerate(self.quant.choices)}
        error = float(np.mean([self.relative_error[i, column[b]] for i, b in enumerate(chosen)]))
        at = column.get(self.ground_truth.bits)
        proxy_values = [float(table[i, at]) for i in self.measured_layers] if at is not None else []
        rho, tau = rank_correlation(proxy_values, self.measured) if proxy_values else (float("nan"),) * 2
        columns = {"avg_bits": bitalloc.average_bits(self.sizes, chosen, self.quant.group_size),
                   "spearman": rho, "kendall": tau}
        return Screened(chosen, error, columns, time.perf_counter() - start)

    def _apply(self, bits: list[int]) -> None:
        for i, (layer, b) in enumerate(zip(self.qlayers, bits)):
            layer.linear.weight.data.copy_(self.rounded.fitted(i, b))

    def describe(self) -> dict:
        return {"quant": asdict(self.quant) | {"program": None}, "measure": asdict(self.ground_truth)}

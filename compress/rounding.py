"""Each quantizable layer's weights rounded at each bit width, computed once and then shared by
every candidate an evaluator scores (task mpq). A candidate only chooses bits, so neither the
proxies' input E = RTN(W) − W nor the fitness quantizer's weights depend on it: recomputing them
per candidate cost one RTN pass per (layer, width) for E, and a whole model of GPTQ for the fitness.

The program's input E stays the round-to-nearest error whatever the fitness quantizer is, so a
proxy means the same in a search with GPTQ fitness as in `quantize --program FILE`, which cannot
know sequential GPTQ's weights before its walk. Memory: the dense linears' size per bit width
(twice that with GPTQ), in the model's dtype, filled on first use.
"""
from __future__ import annotations

import torch

from autoprune_ray.kernels.quant import fake_quantize

from .gptq import gptq_quantize
from .stats import CalibrationStats


def round_weight(weight: torch.Tensor, bits: int, quantizer: str, group_size: int, gram: torch.Tensor | None = None,
                 **gptq_options) -> torch.Tensor:
    """`weight` on the `bits`-bit grid: round to nearest, or GPTQ on the inputs' Gram matrix
    (`gptq_options`: gptq_quantize's blocksize, damp and act_order)."""
    if quantizer == "gptq":
        return gptq_quantize(weight, gram, bits, group_size, **gptq_options)
    return fake_quantize(weight, bits, group_size)[0]


class RoundedWeights:
    """`rtn(i, b)` and `fitted(i, b)`: layer i's dense weights rounded to b bits by RTN and by the
    config's quantizer (one-pass: GPTQ reads `stats`' Gram matrices), each computed once."""

    def __init__(self, layers, dense: list[torch.Tensor], quant, stats: CalibrationStats | None):
        self.layers, self.dense, self.quant, self.stats = layers, dense, quant, stats
        self._rtn: dict[tuple[int, int], torch.Tensor] = {}
        self._fitted: dict[tuple[int, int], torch.Tensor] = {}

    def rtn(self, i: int, bits: int) -> torch.Tensor:
        if (i, bits) not in self._rtn:
            self._rtn[i, bits] = round_weight(self.dense[i], bits, "rtn", self.quant.group_size)
        return self._rtn[i, bits]

    def error(self, i: int, bits: int) -> torch.Tensor:
        """E = RTN(W) − W in float32, the proxies' input."""
        return self.rtn(i, bits).float() - self.dense[i].float()

    def fitted(self, i: int, bits: int) -> torch.Tensor:
        q = self.quant
        if q.quantizer == "rtn":
            return self.rtn(i, bits)
        if (i, bits) not in self._fitted:
            layer = self.layers[i]
            gram = self.stats.blocks[layer.block][layer.name].gram
            self._fitted[i, bits] = round_weight(self.dense[i], bits, q.quantizer, q.group_size, gram, **q.gptq_options)
        return self._fitted[i, bits]

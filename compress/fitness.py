"""Fitness of a compression config on one target model, without Ray, in two stages.

    screened = evaluator.screen(config)        # forward-free: masks or bits, plus the first-stage proxy
    ppl = evaluator.perplexity(screened.value) # the later stage measures that value

Nothing is kept between calls: `screen` returns what the later stages need, and `applied(value)`
is a context manager that puts it into the model and restores the dense weights on exit, so one
loaded model serves any number of candidates.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from .data import TokenData
from .eval import perplexity, reconstruction_error
from .models import LoadedModel, block_linears, decoder_layers
from .prune import PruneConfig, prune_model
from .stats import CalibrationStats, calibration_stats


@dataclass
class Screened:
    value: object                    # what later stages apply: masks {(block, name): bool} or bits [L]
    proxy: float                     # first-stage fitness, lower is better
    columns: dict = field(default_factory=dict)   # what the task records beside it (sparsity, avg_bits, ...)
    seconds: float = 0.0


class DenseEvaluator:
    """Holds the target model, its cached one-pass statistics and a copy of its dense weights."""

    def __init__(self, lm: LoadedModel, data: TokenData, stats: CalibrationStats | None = None,
                 with_grad: bool = False):
        self.lm, self.data = lm, data
        self.stats = stats or calibration_stats(lm, data, "one-pass", with_gram=True, with_grad=with_grad)
        self.layers = [block_linears(b) for b in decoder_layers(lm.model)]
        self.dense = [{n: l.weight.data.clone() for n, l in block.items()} for block in self.layers]

    def screen(self, config) -> Screened:
        raise NotImplementedError

    def _apply(self, value) -> None:
        raise NotImplementedError

    @contextmanager
    def applied(self, value):
        """The model compressed by `value` inside the block, dense again after it (also on error)."""
        try:
            self._apply(value)
            yield self.lm
        finally:
            self.restore()

    def perplexity(self, value, eval_tokens: torch.Tensor | None = None) -> float:
        with self.applied(value):
            tokens = self.data.evaluation if eval_tokens is None else eval_tokens
            return perplexity(self.lm, tokens, self.data.seqlen, progress=False)

    def restore(self) -> None:
        for block, dense in zip(self.layers, self.dense):
            for name, lin in block.items():
                lin.weight.data.copy_(dense[name])


class PruneEvaluator(DenseEvaluator):
    """Screens pruning configs (a program metric, a program allocation, or both) with the one
    pruning driver on cached statistics; the proxy is the mean over linears of
    ||ΔW X||² / ||W X||² (lower is better)."""

    def __init__(self, lm: LoadedModel, data: TokenData, stats: CalibrationStats | None = None,
                 with_grad: bool = False):
        super().__init__(lm, data, stats, with_grad)
        self._base: dict[tuple[int, str], float] = {}

    def _base_error(self, index: int, name: str) -> float:
        """||W X||², the error of pruning everything: the proxy's per-layer normaliser."""
        key = (index, name)
        if key not in self._base:
            w = self.dense[index][name]
            self._base[key] = reconstruction_error(w, torch.zeros_like(w), self.stats.blocks[index][name].gram)
        return self._base[key]

    def screen(self, config: PruneConfig) -> Screened:
        start = time.perf_counter()
        result = prune_model(self.lm, None, replace(config, mode="one-pass"), stats=self.stats, apply=False)
        total_rel = 0.0
        for (index, name), mask in result.masks.items():
            w = self.dense[index][name]
            base = self._base_error(index, name)
            err = reconstruction_error(w, w * ~mask, self.stats.blocks[index][name].gram)
            total_rel += err / base if base > 0 else 0.0
        proxy = total_rel / max(len(result.masks), 1)
        return Screened(result.masks, proxy, {"sparsity": result.sparsity}, time.perf_counter() - start)

    def _apply(self, masks: dict[tuple[int, str], torch.Tensor]) -> None:
        for (index, name), mask in masks.items():
            self.layers[index][name].weight.data[mask] = 0

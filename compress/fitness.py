"""Fitness of a compression config on one target model, without Ray, in stages.

    screened = evaluator.screen_levels(configs)          # forward-free: masks or bits per level, the proxy
    scores = evaluator.measure(screened.value, Stage("kl", 512))   # a later stage measures those values

A run may compress at several levels (sparsities 0.6 and 0.7): the proxy is the mean of the
levels' proxies, and the fitness is −mean over levels of log(measure), i.e. minus the log of the
geometric mean, so every level counts by its relative change. Measures, on the *validation*
split (a search never reads the held-out split):
  perplexity   exp(mean NLL) of the compressed model;
  kl           KL divergence to the dense model's next-token distribution (EvoPress), on cached
               dense log-probabilities (compress/kl.py): far less noisy than perplexity per token.

Nothing is kept between calls but what every call reads alike (dense weights, cached statistics,
the dense reference): `screen` returns what the later stages need, and `applied(value)` is a
context manager that puts it into the model and restores the dense weights on exit, so one loaded
model serves any number of candidates.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from .data import TokenData
from .eval import perplexity, reconstruction_error
from .kl import DenseReference
from .models import LoadedModel, block_linears, decoder_layers
from .prune import PruneConfig, prune_model
from .stats import CalibrationStats, calibration_stats


@dataclass
class Screened:
    value: object                    # what later stages apply: masks {(block, name): bool} or bits [L]
    proxy: float                     # first-stage fitness, lower is better
    columns: dict = field(default_factory=dict)   # what the task records beside it (sparsity, avg_bits, ...)
    seconds: float = 0.0


KINDS = ("perplexity", "kl")
_FLOOR = 1e-9   # a measure of exactly 0 (an unchanged model's KL) must not give an infinite fitness


@dataclass(frozen=True)
class Stage:
    """How screened values are measured: `kind` (perplexity or kl) on the first `tokens`
    validation tokens (None: all the evaluator's validation tokens)."""
    kind: str = "perplexity"
    tokens: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown measure {self.kind!r}: use {' or '.join(KINDS)}")


def geometric_fitness(values: list[float]) -> tuple[float, float]:
    """(fitness, geometric mean) of per-level measures; fitness = −mean log, higher is better."""
    if not values or not all(math.isfinite(v) for v in values):
        raise FloatingPointError(f"a level's measure is not finite: {values}")
    mean_log = sum(math.log(max(v, _FLOOR)) for v in values) / len(values)
    return -mean_log, math.exp(mean_log)


class DenseEvaluator:
    """Holds the target model, its cached one-pass statistics and a copy of its dense weights."""

    def __init__(self, lm: LoadedModel, data: TokenData, stats: CalibrationStats | None = None,
                 with_grad: bool = False):
        self.lm, self.data = lm, data
        self.stats = stats or calibration_stats(lm, data, "one-pass", with_gram=True, with_grad=with_grad)
        self.layers = [block_linears(b) for b in decoder_layers(lm.model)]
        self.dense = [{n: lin.weight.data.clone() for n, lin in block.items()} for block in self.layers]
        self._references: dict[int, DenseReference] = {}

    def screen(self, config) -> Screened:
        raise NotImplementedError

    def screen_levels(self, configs: list) -> Screened:
        """One screen per level: value is the list of the levels' values, the proxy their mean,
        each numeric column the mean over levels."""
        start = time.perf_counter()
        screened = self._screen_each(configs)
        columns = {key: sum(s.columns[key] for s in screened) / len(screened) for key in screened[0].columns}
        proxy = sum(s.proxy for s in screened) / len(screened)
        return Screened([s.value for s in screened], proxy, columns, time.perf_counter() - start)

    def _screen_each(self, configs: list) -> list[Screened]:
        return [self.screen(config) for config in configs]

    def measure(self, values: list, stage: Stage) -> dict:
        """Each level's value applied and measured at `stage`: {"fitness", stage.kind (the
        geometric mean over levels), "levels" (each level's measure)}."""
        tokens = self.validation_tokens(stage.tokens)
        reference = self._reference(tokens) if stage.kind == "kl" else None   # on the dense model
        per_level = []
        for value in values:
            with self.applied(value):
                per_level.append(reference.kl(self.lm) if reference else
                                 perplexity(self.lm, tokens, self.data.seqlen, progress=False))
        fitness, geometric = geometric_fitness(per_level)
        return {"fitness": fitness, stage.kind: geometric, "levels": per_level}

    def validation_tokens(self, count: int | None) -> torch.Tensor:
        tokens = self.data.validation
        if count is not None and count < self.data.seqlen:
            raise ValueError(f"a stage of {count} tokens is less than one window of seqlen {self.data.seqlen}")
        return tokens if count is None else tokens[:, :count]

    def _reference(self, tokens: torch.Tensor) -> DenseReference:
        if tokens.shape[1] not in self._references:
            self._references[tokens.shape[1]] = DenseReference.compute(self.lm, tokens, self.data.seqlen)
        return self._references[tokens.shape[1]]

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

    def perplexity(self, value, tokens: torch.Tensor | None = None) -> float:
        """Perplexity with `value` applied, on `tokens` (default: the validation split)."""
        with self.applied(value):
            tokens = self.data.validation if tokens is None else tokens
            return perplexity(self.lm, tokens, self.data.seqlen, progress=False)

    def restore(self) -> None:
        for block, dense in zip(self.layers, self.dense):
            for name, lin in block.items():
                lin.weight.data.copy_(dense[name])


class PruneEvaluator(DenseEvaluator):
    """Screens pruning configs (a program metric, a program allocation, or both) with the one
    pruning driver on cached statistics; the proxy is the mean over linears of
    ||ΔW X||² / ||W X||² (lower is better).

    Both norms are sums over output rows, and the proxy only screens (a cutoff at 1.5× the best),
    so it reads every `proxy_row_stride`-th row: a ratio estimate of each layer's relative error
    at a fraction of the cost of ΔW·G over every row (the largest cost of a screen otherwise)."""

    def __init__(self, lm: LoadedModel, data: TokenData, stats: CalibrationStats | None = None,
                 with_grad: bool = False, proxy_row_stride: int = 4):
        super().__init__(lm, data, stats, with_grad)
        self.proxy_row_stride = proxy_row_stride
        self._base: dict[tuple[int, str], float] = {}
        self._allocation_inputs: dict = {}   # an allocation program's per-linear inputs (alpha, sens: seconds)

    def _base_error(self, index: int, name: str) -> float:
        """||W X||², the error of pruning everything: the proxy's per-layer normaliser."""
        key = (index, name)
        if key not in self._base:
            w = self.dense[index][name][::self.proxy_row_stride]
            self._base[key] = reconstruction_error(w, torch.zeros_like(w), self.stats.blocks[index][name].gram)
        return self._base[key]

    def _screen_each(self, configs: list[PruneConfig]) -> list[Screened]:
        """One program at several levels differs only in its sparsities: its scores serve them all."""
        same = len({(c.method, id(c.program), c.nm, c.granularity) for c in configs}) == 1
        scores = {} if same and configs[0].method == "program" else None
        return [self.screen(config, scores) for config in configs]

    def screen(self, config: PruneConfig, score_cache: dict | None = None) -> Screened:
        start = time.perf_counter()
        result = prune_model(self.lm, None, replace(config, mode="one-pass"), stats=self.stats, apply=False,
                             allocation_cache=self._allocation_inputs, score_cache=score_cache)
        total_rel = 0.0
        rows = slice(None, None, self.proxy_row_stride)
        for (index, name), mask in result.masks.items():
            w = self.dense[index][name][rows]
            base = self._base_error(index, name)
            err = reconstruction_error(w, w * ~mask[rows], self.stats.blocks[index][name].gram)
            total_rel += err / base if base > 0 else 0.0
        proxy = total_rel / max(len(result.masks), 1)
        return Screened(result.masks, proxy, {"sparsity": result.sparsity}, time.perf_counter() - start)

    def _apply(self, masks: dict[tuple[int, str], torch.Tensor]) -> None:
        for (index, name), mask in masks.items():
            self.layers[index][name].weight.data[mask] = 0

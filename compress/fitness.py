"""Fitness of a candidate program on one target model, without Ray: the cheap forward-free
reconstruction proxy first, held-out perplexity second (the engine decides who gets the second).

The evaluator keeps the dense weights and restores them after every candidate, so one loaded
model serves any number of candidates."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from autoprune_ray.kernels.expr import Node

from .data import TokenData
from .eval import perplexity, reconstruction_error
from .masks import parse_pattern
from .models import LoadedModel, block_linears, decoder_layers
from .program import program_mask, score_inputs, uses_input
from .stats import CalibrationStats, calibration_stats


@dataclass
class ProgramFitness:
    proxy: float                     # mean over linears of ||ΔW X||² / ||W X||² (lower is better)
    sparsity: float
    seconds: float
    perplexity: float | None = None


class ProgramEvaluator:
    def __init__(self, lm: LoadedModel, data: TokenData, stats: CalibrationStats | None = None,
                 with_grad: bool = False):
        self.lm, self.data = lm, data
        self.stats = stats or calibration_stats(lm, data, "one-pass", with_gram=True, with_grad=with_grad)
        self.layers = [block_linears(b) for b in decoder_layers(lm.model)]
        self.dense = [{n: l.weight.data.clone() for n, l in block.items()} for block in self.layers]
        self._base: dict[tuple[int, str], float] = {}
        self._last_masks: list = []

    def _masks(self, tree: Node, sparsity: float, pattern: str | None, granularity: str):
        nm = parse_pattern(pattern)
        if uses_input(tree, "G") and not self.stats.blocks[0].grad_rms:
            raise ValueError("this program reads G (gradient RMS): start the evaluator with gradients")
        n = len(self.layers)
        for index, block in enumerate(self.layers):
            for name in block:
                env = score_inputs(self.dense[index][name], self.stats.blocks[index][name],
                                   self.stats.blocks[index].grad_rms.get(name), index / max(n - 1, 1))
                yield index, name, program_mask(tree, env, sparsity, nm, granularity)

    def _base_error(self, index: int, name: str) -> float:
        """||W X||², the error of pruning everything: the proxy's per-layer normaliser."""
        key = (index, name)
        if key not in self._base:
            w = self.dense[index][name]
            self._base[key] = reconstruction_error(w, torch.zeros_like(w), self.stats.blocks[index][name].gram)
        return self._base[key]

    def proxy(self, tree: Node, sparsity: float, pattern: str | None = None, granularity: str = "row",
              keep_masks: bool = False) -> ProgramFitness:
        start = time.perf_counter()
        total_rel, count, pruned, numel, masks = 0.0, 0, 0, 0, []
        for index, name, mask in self._masks(tree, sparsity, pattern, granularity):
            w = self.dense[index][name]
            err = reconstruction_error(w, w * ~mask, self.stats.blocks[index][name].gram)
            base = self._base_error(index, name)
            total_rel += err / base if base > 0 else 0.0
            count += 1
            pruned += int(mask.sum())
            numel += mask.numel()
            if keep_masks:
                masks.append((index, name, mask))
        result = ProgramFitness(total_rel / count, pruned / numel, time.perf_counter() - start)
        self._last_masks = masks
        return result

    def full(self, tree: Node, sparsity: float, pattern: str | None = None, granularity: str = "row",
             eval_tokens: torch.Tensor | None = None) -> ProgramFitness:
        """Proxy plus held-out perplexity of the model pruned by the program's masks."""
        result = self.proxy(tree, sparsity, pattern, granularity, keep_masks=True)
        return self.perplexity_of_last(result, eval_tokens)

    def perplexity_of_last(self, result: ProgramFitness, eval_tokens: torch.Tensor | None = None) -> ProgramFitness:
        """Held-out perplexity with the masks of the last `proxy(..., keep_masks=True)` call."""
        start = time.perf_counter()
        try:
            for index, name, mask in self._last_masks:
                self.layers[index][name].weight.data[mask] = 0
            tokens = self.data.evaluation if eval_tokens is None else eval_tokens
            result.perplexity = perplexity(self.lm, tokens, self.data.seqlen, progress=False)
        finally:
            self.restore()
            self._last_masks = []
        result.seconds += time.perf_counter() - start
        return result

    def restore(self) -> None:
        for block, dense in zip(self.layers, self.dense):
            for name, lin in block.items():
                lin.weight.data.copy_(dense[name])

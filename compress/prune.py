"""The one pruning driver: a baseline or a candidate program, block by block.

Used by the CLI, the baselines table, the report (sequential statistics, the Wanda protocol) and
the search's evaluators (masks only, on cached one-pass statistics of the dense model)."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from autoprune_ray.tree import expr
from autoprune_ray.tree.expr import Node

from . import allocation
from .barber import reconstruction_grad_rms, swap_rebuild
from .data import TokenData
from .masks import check_sparsity, parse_pattern, select_mask
from .models import LoadedModel, block_linears, decoder_layers
from .scores import SCORES
from .program import program_mask, score_inputs, uses_input
from .sparsegpt import sparsegpt_prune
from .stats import BlockContext, BlockStats, CalibrationStats, calibration_stats

METHODS = ("magnitude", "wanda", "ria", "sparsegpt", "barber", "program")
ALLOCATIONS = ("uniform", "owl", "program")
MODES = ("sequential", "one-pass")


@dataclass
class PruneConfig:
    method: str = "wanda"
    sparsity: float = 0.5
    pattern: str | None = None          # "2:4", "4:8"; None = unstructured
    allocation: str = "uniform"         # or "owl"
    mode: str = "sequential"            # statistics: sequential (Wanda protocol) or one-pass (dense)
    owl_m: float = 5.0                  # OWL outlier threshold M (score > M · mean)
    owl_lambda: float = 0.08            # OWL range: block sparsities lie within S ± λ
    barber_swap: float = 0.01           # LLM-Barber: share of each row's weights swapped
    sparsegpt_blocksize: int = 128
    sparsegpt_damp: float = 0.01
    program: Node | None = None          # method "program": a candidate score tree
    granularity: str = "row"             # its selection: per output row or whole layer
    allocation_program: Node | None = None  # allocation "program": a per-block tree (SDSA)
    allocation_lambda: float = 0.16      # its range: block sparsities within S ± λ
    kernel_backend: str = "auto"         # program scores: fused Triton kernel on CUDA, torch otherwise

    def validate(self) -> "PruneConfig":
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}: choose uniform or owl")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}: choose sequential or one-pass")
        check_sparsity(self.sparsity)
        nm = parse_pattern(self.pattern)
        if nm is not None and self.allocation == "owl":
            raise ValueError("OWL allocates unstructured sparsity per block; it does not combine with N:M")
        if nm is not None and self.method == "barber":
            raise ValueError("the LLM-Barber swap is defined for unstructured masks; drop --pattern")
        if (self.method == "program") != (self.program is not None):
            raise ValueError("method 'program' and a program tree go together")
        if (self.allocation == "program") != (self.allocation_program is not None):
            raise ValueError("allocation 'program' and an allocation tree go together")
        if self.granularity not in ("row", "layer"):
            raise ValueError(f"unknown granularity {self.granularity!r}: use row or layer")
        if self.method == "barber" and self.mode != "sequential":
            raise ValueError("LLM-Barber needs each block's dense outputs: use mode sequential")
        if nm is not None and self.method == "sparsegpt" and self.sparsegpt_blocksize % nm[1]:
            raise ValueError(f"SparseGPT block size {self.sparsegpt_blocksize} is not a multiple of M={nm[1]}")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        return self.nm[0] / self.nm[1] if self.nm else self.sparsity

    @property
    def label(self) -> str:
        name = f"{self.allocation}-{self.method}" if self.allocation != "uniform" else self.method
        return f"{name} {self.pattern}" if self.nm else name


@dataclass
class PruneResult:
    config: PruneConfig
    block_targets: list[float]
    per_layer: dict[str, float] = field(default_factory=dict)   # achieved sparsity per linear
    masks: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)   # only with apply=False
    pruned: int = 0
    total: int = 0
    seconds: float = 0.0

    @property
    def sparsity(self) -> float:
        return self.pruned / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {"config": asdict(self.config), "label": self.config.label, "sparsity": self.sparsity,
                "block_targets": self.block_targets, "per_layer": self.per_layer, "seconds": self.seconds}


def check_widths(model: nn.Module, nm: tuple[int, int] | None) -> None:
    if nm is None:
        return
    for index, block in enumerate(decoder_layers(model)):
        for name, linear in block_linears(block).items():
            if linear.in_features % nm[1]:
                raise ValueError(f"N:M {nm[0]}:{nm[1]} does not divide the input width "
                                 f"{linear.in_features} of block {index} {name}")


class BlockPruner:
    """Prunes one block given its statistics; a `stats.BlockHook` for the sequential walk. With
    apply=False it only computes the masks (into result.masks) and leaves the weights alone."""

    def __init__(self, cfg: PruneConfig, targets: list[float], result: PruneResult,
                 grad_rms: list[dict[str, torch.Tensor]] | None = None, apply: bool = True):
        if not apply and cfg.method in ("sparsegpt", "barber"):
            raise ValueError(f"{cfg.method} changes the weights while it prunes: it cannot give masks alone")
        self.cfg, self.targets, self.result = cfg, targets, result
        self.grad_rms, self.apply = grad_rms, apply
        self.signature = json.dumps(asdict(cfg), sort_keys=True, default=str) + json.dumps(targets)

    def __call__(self, index: int, block: nn.Module, stats: BlockStats | None,
                 ctx: BlockContext | None = None) -> None:
        linears = block_linears(block)
        sparsity = self.targets[index]
        if self.cfg.method == "sparsegpt":
            masks = self._sparsegpt(linears, stats, sparsity)
        else:
            masks = {name: self._score_mask(index, name, lin.weight, stats, sparsity)
                     for name, lin in linears.items()}
            if self.cfg.method == "barber":
                masks = self._barber(block, linears, masks, ctx)
            for name, lin in linears.items():
                if self.apply:
                    lin.weight.data[masks[name]] = 0
                else:
                    self.result.masks[(index, name)] = masks[name]
        for name, mask in masks.items():
            self._record(f"{index}.{name}", mask)

    def _score_mask(self, index, name, weight, stats, sparsity):
        if self.cfg.method == "program":
            grad = self.grad_rms[index][name] if self.grad_rms else None
            env = score_inputs(weight.data, stats[name], grad, allocation.layer_depth(index, len(self.targets)))
            return program_mask(self.cfg.program, env, sparsity, self.cfg.nm, self.cfg.granularity,
                                self.cfg.kernel_backend)
        method = "wanda" if self.cfg.method == "barber" else self.cfg.method
        score = SCORES[method](weight.data, stats[name] if stats is not None else None)
        granularity = "layer" if method == "magnitude" else "row"
        return select_mask(score, sparsity, self.cfg.nm, granularity)

    def _sparsegpt(self, linears, stats, sparsity):
        masks = {}
        for name, lin in linears.items():
            new_weight, masks[name] = sparsegpt_prune(lin.weight.data, stats[name].gram, sparsity, self.cfg.nm,
                                                      self.cfg.sparsegpt_blocksize, self.cfg.sparsegpt_damp)
            lin.weight.data.copy_(new_weight)
        return masks

    def _barber(self, block, linears, masks, ctx):
        dense = {name: lin.weight.data.clone() for name, lin in linears.items()}
        for name, lin in linears.items():
            lin.weight.data[masks[name]] = 0
        grad_rms = reconstruction_grad_rms(block, linears, ctx)
        for name, lin in linears.items():
            lin.weight.data.copy_(dense[name])
        return {name: swap_rebuild(masks[name], dense[name].abs().float() * grad_rms[name], self.cfg.barber_swap)
                for name in linears}

    def _record(self, key: str, mask: torch.Tensor) -> None:
        self.result.per_layer[key] = float(mask.float().mean())
        self.result.pruned += int(mask.sum())
        self.result.total += mask.numel()


def block_targets(lm: LoadedModel, data: TokenData | None, cfg: PruneConfig,
                  stats: CalibrationStats | None = None) -> list[float]:
    """Each block's sparsity; a non-uniform allocation reads one-pass statistics of the dense
    model (`stats` when the caller has them cached)."""
    n_blocks = len(decoder_layers(lm.model))
    if cfg.allocation == "uniform":
        return allocation.uniform(cfg.target_sparsity, n_blocks)
    stats = stats or calibration_stats(lm, data, "one-pass", with_gram=False)
    weights = [{n: l.weight.data for n, l in block_linears(b).items()} for b in decoder_layers(lm.model)]
    if cfg.allocation == "owl":
        ratios = [allocation.outlier_ratio(w, stats.blocks[i], cfg.owl_m) for i, w in enumerate(weights)]
        return allocation.owl(cfg.sparsity, ratios, cfg.owl_lambda)
    inputs = allocation.layer_statistics(weights, stats.blocks, cfg.owl_m)
    raw = expr.evaluate(cfg.allocation_program, inputs)
    return allocation.normalize_allocation(raw.expand(n_blocks, 1), cfg.sparsity, cfg.allocation_lambda)


def program_gradients(lm: LoadedModel, data: TokenData, cfg: PruneConfig,
                      stats: CalibrationStats | None = None):
    """LM-loss gradient RMS from the dense model, only for programs that read G."""
    if cfg.method != "program" or not uses_input(cfg.program, "G"):
        return None
    if stats is None or not stats.blocks[0].grad_rms:
        if stats is not None and data is None:
            raise ValueError("this program reads G (gradient RMS): start the evaluator with gradients")
        stats = calibration_stats(lm, data, "one-pass", with_gram=False, with_grad=True)
    return [block.grad_rms for block in stats.blocks]


def prune_model(lm: LoadedModel, data: TokenData | None, cfg: PruneConfig, stats: CalibrationStats | None = None,
                apply: bool = True) -> PruneResult:
    """Prune `lm` in place. Magnitude needs no data; every other method calibrates on `data`.

    `stats`: cached one-pass statistics of the dense model, used in mode one-pass instead of a new
    calibration pass. apply=False computes the masks into result.masks and leaves the weights dense."""
    cfg.validate()
    check_widths(lm.model, cfg.nm)
    if cfg.method != "magnitude" and data is None and stats is None:
        raise ValueError(f"{cfg.method} needs calibration data")
    start = time.perf_counter()
    targets = block_targets(lm, data, cfg, stats)
    result = PruneResult(cfg, targets)
    pruner = BlockPruner(cfg, targets, result, program_gradients(lm, data, cfg, stats), apply)
    if cfg.method == "magnitude":
        for index, block in enumerate(decoder_layers(lm.model)):
            pruner(index, block, None)
    elif cfg.mode == "sequential":
        calibration_stats(lm, data, "sequential", hook=pruner, with_gram=cfg.method == "sparsegpt",
                          use_cache=False)
    else:
        stats = stats or calibration_stats(lm, data, "one-pass", with_gram=cfg.method == "sparsegpt")
        for index, block in enumerate(decoder_layers(lm.model)):
            pruner(index, block, stats.blocks[index])
    result.seconds = time.perf_counter() - start
    return result


def model_sparsity(model: nn.Module) -> float:
    """Share of zero weights over all prunable linears of the decoder blocks (Wanda's check_sparsity)."""
    zeros = total = 0
    for block in decoder_layers(model):
        for lin in block_linears(block).values():
            zeros += int((lin.weight == 0).sum())
            total += lin.weight.numel()
    return zeros / total

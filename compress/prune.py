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
from .program import program_mask, program_score, score_inputs, uses_input
from .sparsegpt import sparsegpt_prune
from .stats import BlockContext, BlockStats, CalibrationStats, calibration_stats

METHODS = ("magnitude", "wanda", "ria", "sparsegpt", "barber", "program")
ALLOCATIONS = ("uniform", "owl", "alpha", "program")
MODES = ("sequential", "one-pass")


@dataclass
class PruneConfig:
    method: str = "wanda"
    sparsity: float = 0.5
    pattern: str | None = None          # "2:4", "4:8"; None = unstructured
    allocation: str = "uniform"         # "owl", "alpha" (per block) or "program" (per linear)
    mode: str = "sequential"            # statistics: sequential (Wanda protocol) or one-pass (dense)
    owl_m: float = 5.0                  # OWL outlier threshold M (score > M · mean)
    owl_lambda: float = 0.08            # OWL range: block sparsities lie within S ± λ
    barber_swap: float = 0.01           # LLM-Barber: share of each row's weights swapped
    sparsegpt_blocksize: int = 128
    sparsegpt_damp: float = 0.01
    program: Node | None = None          # method "program": a candidate score tree
    granularity: str = "row"             # its selection: per output row or whole layer
    allocation_program: Node | None = None  # allocation "program": a per-linear tree (SDSA)
    allocation_lambda: float = 0.25      # its range: linear sparsities within S ± λ (the search configs')
    alpha_lambda: float = 0.1            # AlphaPruning-style range: block sparsities within S ± λ
    kernel_backend: str = "auto"         # program scores: fused Triton kernel on CUDA, torch otherwise
    name: str = ""                       # what tables call it (a program file: "program <hash>")

    def validate(self) -> "PruneConfig":
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}: choose one of {', '.join(ALLOCATIONS)}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}: choose sequential or one-pass")
        check_sparsity(self.sparsity)
        nm = parse_pattern(self.pattern)
        if nm is not None and self.allocation != "uniform":
            raise ValueError(f"allocation {self.allocation!r} gives unstructured sparsities per layer "
                             "(OWL, AlphaPruning-style, a program); it does not combine with N:M")
        if self.allocation in ("alpha", "program"):
            allocation.check_band(self.sparsity, self.band)
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
    def band(self) -> float:
        """λ of the allocation map in use (allocation.allocate_sparsities)."""
        return self.alpha_lambda if self.allocation == "alpha" else self.allocation_lambda

    @property
    def target_sparsity(self) -> float:
        return self.nm[0] / self.nm[1] if self.nm else self.sparsity

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        name = f"{self.allocation}-{self.method}" if self.allocation != "uniform" else self.method
        return f"{name} {self.pattern}" if self.nm else name


@dataclass
class PruneResult:
    config: PruneConfig
    block_targets: list[float]        # per block; for a per-linear allocation the parameter-weighted mean
    layer_targets: dict[str, float] = field(default_factory=dict)   # "block.name" -> target sparsity
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
                "block_targets": self.block_targets, "layer_targets": self.layer_targets,
                "per_layer": self.per_layer, "seconds": self.seconds}


def check_widths(model: nn.Module, nm: tuple[int, int] | None) -> None:
    if nm is None:
        return
    for index, block in enumerate(decoder_layers(model)):
        for name, linear in block_linears(block).items():
            if linear.in_features % nm[1]:
                raise ValueError(f"N:M {nm[0]}:{nm[1]} does not divide the input width "
                                 f"{linear.in_features} of block {index} {name}")


class BlockPruner:
    """Prunes one block given its statistics, each linear to its own target in
    result.layer_targets; a `stats.BlockHook` for the sequential walk. With apply=False it only
    computes the masks (into result.masks) and leaves the weights alone."""

    def __init__(self, cfg: PruneConfig, result: PruneResult,
                 grad_rms: list[dict[str, torch.Tensor]] | None = None, apply: bool = True,
                 score_cache: dict | None = None):
        if not apply and cfg.method in ("sparsegpt", "barber"):
            raise ValueError(f"{cfg.method} changes the weights while it prunes: it cannot give masks alone")
        self.cfg, self.result = cfg, result
        self.targets, self.n_blocks = result.layer_targets, len(result.block_targets)
        self.grad_rms, self.apply, self.score_cache = grad_rms, apply, score_cache
        self.signature = json.dumps(asdict(cfg), sort_keys=True, default=str) + json.dumps(self.targets)

    def __call__(self, index: int, block: nn.Module, stats: BlockStats | None,
                 ctx: BlockContext | None = None) -> None:
        linears = block_linears(block)
        sparsity = {name: self.targets[f"{index}.{name}"] for name in linears}
        if self.cfg.method == "sparsegpt":
            masks = self._sparsegpt(linears, stats, sparsity)
        else:
            masks = {name: self._score_mask(index, name, lin.weight, stats, sparsity[name])
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
            return self._program_mask(index, name, weight, stats, sparsity)
        method = "wanda" if self.cfg.method == "barber" else self.cfg.method
        score = SCORES[method](weight.data, stats[name] if stats is not None else None)
        granularity = "layer" if method == "magnitude" else "row"
        return select_mask(score, sparsity, self.cfg.nm, granularity)

    def _program_mask(self, index, name, weight, stats, sparsity):
        grad = self.grad_rms[index][name] if self.grad_rms else None
        env = score_inputs(weight.data, stats[name], grad, allocation.layer_depth(index, self.n_blocks))
        # On a GPU the fused kernel scores and selects at once, faster than reading a cache.
        if self.score_cache is None or weight.is_cuda or self.cfg.kernel_backend == "triton":
            return program_mask(self.cfg.program, env, sparsity, self.cfg.nm, self.cfg.granularity,
                                self.cfg.kernel_backend)
        if (index, name) not in self.score_cache:
            self.score_cache[(index, name)] = program_score(self.cfg.program, env)
        return select_mask(self.score_cache[(index, name)], sparsity, self.cfg.nm, self.cfg.granularity)

    def _sparsegpt(self, linears, stats, sparsity):
        masks = {}
        for name, lin in linears.items():
            new_weight, masks[name] = sparsegpt_prune(lin.weight.data, stats[name].gram, sparsity[name], self.cfg.nm,
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


def dense_weights(lm: LoadedModel) -> list[dict[str, torch.Tensor]]:
    return [{n: lin.weight.data for n, lin in block_linears(b).items()} for b in decoder_layers(lm.model)]


def sparsity_targets(lm: LoadedModel, data: TokenData | None, cfg: PruneConfig,
                     stats: CalibrationStats | None = None,
                     allocation_cache: dict | None = None) -> tuple[list[float], dict[str, float]]:
    """(per-block targets, per-linear targets keyed "block.name") of the dense model. OWL and
    uniform are per block, broadcast to the block's linears; AlphaPruning-style and programs are
    per linear, and a block's target is then its linears' parameter-weighted mean.

    Non-uniform allocations read one-pass statistics of the dense model (`stats` when the caller
    has them cached); `allocation_cache` keeps a program's inputs between calls on the same
    dense weights and statistics (see allocation.linear_statistics)."""
    weights = dense_weights(lm)
    keys = allocation.linear_keys(weights)
    if cfg.allocation in ("uniform", "owl"):
        blocks = _block_allocation(lm, data, cfg, stats, weights)
        return blocks, {f"{i}.{name}": blocks[i] for i, name in keys}
    names = ["alpha"] if cfg.allocation == "alpha" else sorted(expr.inputs_of(cfg.allocation_program))
    stats = _allocation_stats(lm, data, names, stats)
    inputs = allocation.linear_statistics(weights, stats.blocks if stats else None, names, cfg.sparsity,
                                          cfg.owl_m, allocation_cache)
    sizes = allocation.linear_sizes(weights)
    if cfg.allocation == "alpha":
        values = allocation.alpha_block_allocation(inputs["alpha"], keys, sizes, cfg.sparsity, cfg.alpha_lambda)
    else:
        raw = _one_per_row(expr.evaluate(cfg.allocation_program, inputs), len(keys))
        values = allocation.allocate_sparsities(raw, sizes, cfg.sparsity, cfg.allocation_lambda)
    targets = {f"{i}.{name}": s for (i, name), s in zip(keys, values)}
    return allocation.block_means(targets, weights), targets


def block_targets(lm: LoadedModel, data: TokenData | None, cfg: PruneConfig,
                  stats: CalibrationStats | None = None) -> list[float]:
    """Each block's sparsity (see sparsity_targets)."""
    return sparsity_targets(lm, data, cfg, stats)[0]


def _block_allocation(lm, data, cfg, stats, weights) -> list[float]:
    if cfg.allocation == "uniform":
        return allocation.uniform(cfg.target_sparsity, len(weights))
    stats = _allocation_stats(lm, data, ["outlier"], stats)
    ratios = [allocation.outlier_ratio(w, stats.blocks[i], cfg.owl_m) for i, w in enumerate(weights)]
    return allocation.owl(cfg.sparsity, ratios, cfg.owl_lambda)


def _allocation_stats(lm, data, names, stats) -> CalibrationStats | None:
    """One-pass dense statistics when the allocation reads any (with Gram matrices for `sens`)."""
    with_gram = "sens" in names
    if not set(names) & {"skew", "kurt", "outlier", "sens"}:
        return None
    if stats is not None:
        if with_gram and any(st.gram is None for st in stats.blocks[0].inputs.values()):
            raise ValueError("the allocation reads `sens`: its statistics need Gram matrices")
        return stats
    if data is None:
        raise ValueError("this allocation reads calibration statistics: it needs calibration data")
    return calibration_stats(lm, data, "one-pass", with_gram=with_gram)


def _one_per_row(raw: torch.Tensor, rows: int) -> torch.Tensor:
    """A program's value per linear; one value for all (a constant) is uniform."""
    if raw.numel() == 1:
        return raw.reshape(1).expand(rows)
    if raw.numel() != rows:
        raise allocation.AllocationError(f"the allocation gave shape {tuple(raw.shape)} for {rows} linear layers")
    return raw.reshape(rows)


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
                apply: bool = True, allocation_cache: dict | None = None,
                score_cache: dict | None = None) -> PruneResult:
    """Prune `lm` in place. Magnitude needs no data; every other method calibrates on `data`.

    `stats`: cached one-pass statistics of the dense model, used in mode one-pass instead of a new
    calibration pass. apply=False computes the masks into result.masks and leaves the weights dense.
    `allocation_cache`: see sparsity_targets (a caller pruning the same dense model many times).
    `score_cache`: a program's per-linear scores, kept for a call at another sparsity with the same
    program, dense weights and statistics (CPU only; a GPU scores and selects in one kernel)."""
    cfg.validate()
    check_widths(lm.model, cfg.nm)
    if cfg.method != "magnitude" and data is None and stats is None:
        raise ValueError(f"{cfg.method} needs calibration data")
    start = time.perf_counter()
    blocks, layers = sparsity_targets(lm, data, cfg, stats, allocation_cache)
    result = PruneResult(cfg, blocks, layers)
    pruner = BlockPruner(cfg, result, program_gradients(lm, data, cfg, stats), apply, score_cache)
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

"""Task `allocate`: a layer-wise sparsity allocation (SDSA), one value per block from the blocks'
statistics, mapped to block sparsities with mean exactly the target within S ± λ; the weights
of each block are chosen by a fixed metric (`allocation.metric`, Wanda by default)."""
from __future__ import annotations

from autoprune_ray.compress.prune import METHODS, PruneConfig
from autoprune_ray.operators.prompts import TaskPrompts, preamble_text, system_prompt
from autoprune_ray.operators.seeds import allocation_seeds
from autoprune_ray.operators.specs import ALLOCATE
from autoprune_ray.tasks.prune import PruningTask

PROMPTS = TaskPrompts(
    preamble=preamble_text(
        "You design layer-wise sparsity allocations for pruning a language model. An allocation is one Python "
        "function that gives every decoder block one value from the block's statistics. Blocks with higher "
        "values are pruned more; the values are rescaled so that the average sparsity stays the target.",
        ALLOCATE, "The result must give one value per block, so use the per-block inputs.",
        ("allocation", "def allocate(outlier, depth):\n    return depth - outlier")),
    noun="allocation",
    from_scratch=("Invent a new allocation from scratch: decide which blocks can lose more weights without "
                  "hurting the model and write an allocation for it."),
    system=system_prompt("layer-wise sparsity allocations for pruning neural networks"),
)


class AllocateTask(PruningTask):
    name = "allocate"
    spec = ALLOCATE
    prompts = PROMPTS
    baselines = ("wanda", "owl-wanda")

    def seeds(self):
        return allocation_seeds()

    def validate(self, cfg) -> None:
        a = cfg.allocation
        if a.metric not in METHODS or a.metric in ("program", "sparsegpt", "barber"):
            raise ValueError(f"allocation.metric: {a.metric!r} is not a mask-only metric: use magnitude, wanda or ria")
        if cfg.target.pattern:
            raise ValueError("target.pattern: an allocation gives unstructured sparsities per block; drop the pattern")
        s, lam = cfg.target.sparsity, a.lam
        if not (lam > 0 and s - lam >= 0 and s + lam < 1):
            raise ValueError(f"allocation.lam: sparsity {s} ± {lam} must stay within [0, 1)")

    def compression_config(self, cand, cfg) -> PruneConfig:
        return PruneConfig(method=cfg.allocation.metric, sparsity=cfg.target.sparsity, allocation="program",
                           allocation_program=cand.tree, allocation_lambda=cfg.allocation.lam)

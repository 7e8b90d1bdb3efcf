"""Task `allocate`: a layer-wise sparsity allocation (SDSA), one value per linear layer from the
layers' statistics, mapped to sparsities whose parameter-weighted mean is exactly the target, each
within S ± λ (compress/allocation.py); the weights of each layer are chosen by a fixed metric
(`allocation.metric`, Wanda by default)."""
from __future__ import annotations

from autoprune_ray.compress.prune import METHODS, PruneConfig
from autoprune_ray.operators.prompts import Ideas, TaskPrompts, preamble_text, system_prompt
from autoprune_ray.operators.seeds import allocation_seeds
from autoprune_ray.operators.specs import ALLOCATE
from autoprune_ray.tasks.prune import PruningTask

# a statistic of the layer's weights or scores, with where the layer sits or another statistic
_STATISTICS = ("skew", "kurt", "outlier", "alpha", "sens")
ALLOCATION_IDEAS = Ideas(ALLOCATE, leads=_STATISTICS, others=_STATISTICS + ("depth", "size", "is_o", "is_down"))

PROMPTS = TaskPrompts(
    preamble=preamble_text(
        "You design layer-wise sparsity allocations for pruning a language model. An allocation is one Python "
        "function that gives every linear layer (q, k, v, o, gate, up, down of every block) one value from its "
        "statistics. Layers with higher values are pruned more; the values are rescaled so that the "
        "parameter-weighted average sparsity is exactly the target, each layer within target ± λ.",
        ALLOCATE, "The result must give one value per layer, so use the per-layer inputs."),
    noun="allocation",
    from_scratch=("Invent a new allocation from scratch: decide which blocks can lose more weights without "
                  "hurting the model and write an allocation for it."),
    system=system_prompt("layer-wise sparsity allocations for pruning neural networks"),
    example="def allocate(outlier, depth):\n    return depth - outlier",
    ideas=(ALLOCATION_IDEAS,),
)


def check_allocation_settings(cfg, metric_needed: bool) -> None:
    """The `allocation:` section: a mask-only metric (when the task fixes one), and a band that
    stays within [0, 1) at every level of the run."""
    a = cfg.allocation
    if metric_needed and (a.metric not in METHODS or a.metric in ("program", "sparsegpt", "barber")):
        raise ValueError(f"allocation.metric: {a.metric!r} is not a mask-only metric: use magnitude, wanda or ria")
    for s in cfg.target.levels:
        if not (a.lam > 0 and s - a.lam >= 0 and s + a.lam < 1):
            raise ValueError(f"allocation.lam: sparsity {s} ± {a.lam} must stay within [0, 1)")


class AllocateTask(PruningTask):
    name = "allocate"
    spec = ALLOCATE
    prompts = PROMPTS
    baselines = ("wanda", "owl-wanda", "alpha-wanda")
    reference_seed = "uniform"             # uniform allocation of the Wanda metric: Wanda

    def seeds(self):
        return allocation_seeds()

    def validate(self, cfg) -> None:
        if cfg.target.pattern:
            raise ValueError("target.pattern: an allocation gives unstructured sparsities per layer; drop the pattern")
        check_allocation_settings(cfg, metric_needed=True)

    def compression_config(self, cand, cfg) -> PruneConfig:
        return PruneConfig(method=cfg.allocation.metric, sparsity=cfg.target.sparsity, allocation="program",
                           allocation_program=cand.tree, allocation_lambda=cfg.allocation.lam)

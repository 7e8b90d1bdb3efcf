"""Task `joint`: a pruning algorithm as AutoPrune's SDSA frames it, a metric and a layer-wise
allocation in one program file:

    def score(W, A):              # compared within each output row of a linear layer
        return W.abs() * A
    def allocate(outlier, sens):  # one value per linear layer: higher means prune more
        return -outlier

The allocation's values become per-linear sparsities whose parameter-weighted mean is the target
exactly, each within target ± allocation.lam (compress/allocation.py). The LLM and the symbolic
operators may change either function or both."""
from __future__ import annotations

from itertools import product

from autoprune_ray.compress.prune import PruneConfig
from autoprune_ray.operators.language import Candidate
from autoprune_ray.operators.prompts import TaskPrompts, joint_preamble_text, system_prompt
from autoprune_ray.operators.seeds import allocation_seeds, score_seeds
from autoprune_ray.operators.specs import ALLOCATE, PRUNE
from autoprune_ray.tasks.allocate import ALLOCATION_IDEAS, check_allocation_settings
from autoprune_ray.tasks.prune import SCORE_IDEAS, PruningTask

_EXAMPLE = ("def score(W, A):\n    x = W.abs()\n    return x / x.mean(dim=1, keepdim=True) + 0.1 * A\n\n"
            "def allocate(outlier, depth):\n    return depth - 2 * outlier")

PROMPTS = TaskPrompts(
    preamble=joint_preamble_text(
        "You design pruning algorithms for a language model. An algorithm is TWO Python functions. "
        "`score` gives every weight of a linear layer a score (higher = keep); the lowest-scoring weights of "
        "each output row are pruned. `allocate` gives every linear layer one value from its statistics: "
        "layers with higher values are pruned more, and the values are rescaled so that the average "
        "sparsity stays the target.",
        [("score inputs", PRUNE, "score must vary per weight, so use W or G."),
         ("allocate inputs, one row per linear layer", ALLOCATE, "allocate must give one value per layer.")]),
    noun="algorithm",
    from_scratch=("Invent a new algorithm from scratch: decide which weights matter most inside a layer, and "
                  "which layers can lose more weights without hurting the model."),
    system=system_prompt("pruning algorithms (a metric and a layer-wise sparsity allocation)",
                         "two short Python functions, score and allocate"),
    output="Answer with BOTH functions, score and allocate, in one ```python fence. No prose needed.",
    example=_EXAMPLE,
    ideas=(SCORE_IDEAS, ALLOCATION_IDEAS),
)

SEED_METRICS = ("wanda", "ria")
SEED_ALLOCATIONS = ("uniform", "owl", "alpha")


def joint_seeds() -> dict[str, Candidate]:
    """The expert metrics crossed with the expert allocations (uniform Wanda, OWL-Wanda, ...)."""
    metrics, allocations = score_seeds(), allocation_seeds()
    seeds = {}
    for metric, alloc in product(SEED_METRICS, SEED_ALLOCATIONS):
        if metric in metrics and alloc in allocations:
            first = metrics[metric]
            base = Candidate("joint", first.tree, "", first.granularity, allocations[alloc].tree)
            seeds[f"{alloc}-{metric}"] = Candidate("joint", base.tree, base.code, base.granularity, base.allocation)
    return seeds


class JointTask(PruningTask):
    name = "joint"
    spec = PRUNE
    prompts = PROMPTS
    baselines = ("wanda", "ria", "owl-wanda", "alpha-wanda", "barber", "sparsegpt")
    reference_seed = "uniform-wanda"       # Wanda

    def seeds(self):
        return joint_seeds()

    def validate(self, cfg) -> None:
        if cfg.target.pattern:
            raise ValueError("target.pattern: a joint program allocates unstructured sparsity per layer; "
                             "drop the pattern (task prune searches N:M metrics)")
        check_allocation_settings(cfg, metric_needed=False)

    def compression_config(self, cand, cfg) -> PruneConfig:
        return PruneConfig(method="program", program=cand.tree, granularity=cand.granularity,
                           sparsity=cfg.target.sparsity, allocation="program", allocation_program=cand.allocation,
                           allocation_lambda=cfg.allocation.lam)

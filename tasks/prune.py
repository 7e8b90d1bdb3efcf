"""Task `prune`: a pruning metric, one score per weight, compared within each output row (or the
whole layer); every block pruned to the run's sparsity."""
from __future__ import annotations

import pyarrow as pa

from autoprune_ray.compress.baselines import BaselineRun
from autoprune_ray.compress.fitness import PruneEvaluator
from autoprune_ray.compress.prune import PruneConfig
from autoprune_ray.operators.prompts import Ideas, TaskPrompts, preamble_text, system_prompt
from autoprune_ray.operators.seeds import score_seeds
from autoprune_ray.operators.specs import PRUNE
from autoprune_ray.tasks.base import TaskPlugin

# a metric reads W with a statistic of its inputs (not G: a run collects it only with target.gradients)
SCORE_IDEAS = Ideas(PRUNE, leads=("W",), others=("A", "M", "V", "H", "d"))

PROMPTS = TaskPrompts(
    preamble=preamble_text(
        "You design pruning metrics for a language model. A metric is one Python function that gives every "
        "weight of a linear layer a score. Higher score = keep the weight. Scores are compared within each "
        "output row (each row of W): the lowest-scoring weights of a row are pruned.",
        PRUNE, "The result must vary per weight, so use W or G."),
    noun="metric",
    from_scratch=("Invent a new metric from scratch: decide which weights matter most for the layer's output "
                  "and write a score for it."),
    system=system_prompt("pruning metrics for neural networks"),
    example="def score(W, A):\n    x = W.abs()\n    return x / x.mean(dim=1, keepdim=True) + 0.1 * A",
    ideas=(SCORE_IDEAS,),
)


class PruningTask(TaskPlugin):
    """What every task that prunes shares: its record, baselines and evaluator."""
    columns = {"sparsity": pa.float64()}
    leveled = True

    def baseline_config(self, name: str, cfg) -> PruneConfig:
        return BaselineRun(name, cfg.target.sparsity, cfg.target.pattern).config()

    def make_evaluator(self, lm, data, cfg, stats=None) -> PruneEvaluator:
        return PruneEvaluator(lm, data, stats, with_grad=cfg.target.gradients)


class PruneTask(PruningTask):
    name = "prune"
    spec = PRUNE
    prompts = PROMPTS
    baselines = ("wanda", "magnitude")
    reference_seed = "wanda"

    def seeds(self):
        return score_seeds()

    def compression_config(self, cand, cfg) -> PruneConfig:
        return PruneConfig(method="program", program=cand.tree, granularity=cand.granularity,
                           sparsity=cfg.target.sparsity, pattern=cfg.target.pattern)

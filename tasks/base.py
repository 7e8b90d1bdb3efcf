"""What a task plug-in is: everything the engine, the report and the prompts need of one task.

A task (a pruning metric, a layer-wise allocation, a mixed-precision sensitivity proxy) is one
module in this room with one `TaskPlugin` subclass, listed in `tasks/__init__.py`. The engine
looks the run's task up there and never compares task names.
"""
from __future__ import annotations

import pyarrow as pa

from autoprune_ray.compress.fitness import DenseEvaluator
from autoprune_ray.compress.stats import CalibrationStats, calibration_stats
from autoprune_ray.operators.grammar import grammar_for
from autoprune_ray.operators.language import TASK_PARTS, Candidate
from autoprune_ray.operators.prompts import TaskPrompts
from autoprune_ray.operators.specs import LanguageSpec


class TaskPlugin:
    name: str                                  # the `task:` of a run config
    spec: LanguageSpec                         # the language its candidates are written in
    prompts: TaskPrompts                       # preamble, noun, from-scratch ask and system prompt
    columns: dict[str, pa.DataType] = {}       # evaluation columns it records beside the common ones
    baselines: tuple[str, ...] = ()            # what the report re-measures beside the best programs
    amount: str = "sparsity"                   # the report's column that says how much was compressed
    leveled: bool = False                      # measured at each of target.levels (a pruning sparsity)
    reference_seed: str | None = None          # the seed a run's closing table compares with
    apply_command: str = "prune"               # the CLI command that applies a program file

    def seeds(self) -> dict[str, Candidate]:
        """The expert programs a search starts from (search.seeds: true)."""
        return {}

    def grammar(self, without: frozenset[str] = frozenset()) -> str | None:
        """The EBNF grammar (xgrammar's dialect) of this task's programs that a policy's completions
        are constrained to, or None where its language has none; `without`: inputs no program may
        read (those a run collects no statistics for)."""
        return grammar_for(TASK_PARTS[self.name], without=without)

    def validate(self, cfg) -> None:
        """Task-specific checks of a RunConfig; raise ValueError("key: message")."""

    def compression_config(self, cand: Candidate, cfg):
        """The compress-room config (PruneConfig, QuantConfig) that applies a candidate."""
        raise NotImplementedError

    def baseline_config(self, name: str, cfg):
        """The compress-room config of one of `baselines`."""
        raise NotImplementedError

    def make_evaluator(self, lm, data, cfg, stats: CalibrationStats | None = None) -> DenseEvaluator:
        """The evaluator that screens and measures this task's compression configs, reading `stats`
        (from `statistics`) where given."""
        raise NotImplementedError

    def statistics(self, lm, data, cfg) -> CalibrationStats:
        """The cached statistics its evaluator reads: computed once per run and shared by the
        evaluators of a node through Ray's object store (engine/actors.py)."""
        return calibration_stats(lm, data, "one-pass", with_gram=True, with_grad=cfg.target.gradients)

    def unimplemented(self) -> list[str]:
        """The hooks a plug-in must provide but does not (a run config naming it fails validation)."""
        return [hook for hook in ("compression_config", "baseline_config", "make_evaluator")
                if getattr(type(self), hook) is getattr(TaskPlugin, hook)]

    def protocol_note(self, cfg) -> str:
        """How the report's comparison compresses, in a few words."""
        return "sequential statistics"

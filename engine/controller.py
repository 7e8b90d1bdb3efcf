"""The asynchronous search loop's state and decisions, behind one facade (`Search`).

Named Ray actors: `policy` (writes candidates), `population` (islands, elites, dedup and
evaluation cache) and `evaluator-<i>` (score candidates on the target model). The driver keeps
the policy generating while evaluators evaluate, through one bounded queue, with no
per-generation barrier. Every proposed candidate ends in exactly one recorded outcome:

    candidates.status   rejected (with reason) | duplicate (of an earlier id) | accepted
    evaluations.status  ok | screened (proxy only) | failed (with reason) | timeout

An accepted candidate without an evaluation row is pending: the run stopped first, and a resumed
run evaluates it.

A hung evaluation is killed at its time limit and the evaluator restarted; a candidate whose
evaluator died is re-queued and recorded once; a killed driver resumes from the tables.

`Search` wires four pieces, one concern each:

    engine/records.py     RunRecords       the tables, ids, queue, lineage, rejections; resume
    engine/proposals.py   Proposals        operator choice, prompts, symbolic children, propose
    engine/learning.py    PolicyLearning   preference pairs, prompt strategies, DPO rounds
    engine/stopping.py    stop_reason, proxy_cutoff, summary
    engine/promotion.py   the fittest programs measured again when the search stops
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from autoprune_ray.engine import promotion, stopping
from autoprune_ray.engine.config import RunConfig
from autoprune_ray.engine.database import Population
from autoprune_ray.engine.learning import LLM_OPERATORS, PolicyLearning
from autoprune_ray.engine.proposals import Proposals
from autoprune_ray.engine.records import RunRecords
from autoprune_ray.engine.storage import RunStore
from autoprune_ray.tasks import get_task

__all__ = ["LLM_OPERATORS", "Inflight", "RunExists", "Search"]
log = logging.getLogger("autoprune_ray.engine")


@dataclass
class Inflight:
    kind: str                  # "eval", "generate", "ping", "dpo" or "promote"
    worker: int | None
    started: float
    payload: dict = field(default_factory=dict)


class RunExists(RuntimeError):
    pass


def _forwarded(piece: str, name: str) -> property:
    """A facade attribute that lives in one of the pieces (read and assigned there)."""
    return property(lambda self: getattr(getattr(self, piece), name),
                    lambda self, value: setattr(getattr(self, piece), name, value))


class Search:
    """What the runner drives. `Search.open` creates or resumes a run directory; the constructor
    itself touches no file (`store` is given), so pieces can be built around any store."""

    store = _forwarded("records", "store")
    metrics = _forwarded("records", "metrics")
    queue = _forwarded("records", "queue")
    lineage = _forwarded("records", "lineage")
    rejections = _forwarded("records", "rejections")
    stats = _forwarded("records", "stats")
    next_id = _forwarded("records", "next_id")
    evaluated = _forwarded("records", "evaluated")
    dpo = _forwarded("learning", "dpo")

    def __init__(self, cfg: RunConfig, store: RunStore, progress: bool = True, population=None):
        self.cfg, self.progress = cfg, progress
        self.run_dir = cfg.resolved_run_dir
        self.task = get_task(cfg.task)
        self.rng = random.Random(cfg.search.seed)
        # a local Population, or a synchronous handle to the `population` actor (same methods)
        s = cfg.search
        self.population = population if population is not None else Population(
            s.islands, s.population_size, s.elites, s.migration_interval, s.seed)
        self.records = RunRecords(cfg, self.task, store, self.population)
        self.learning = PolicyLearning(cfg, self.task, self.records)
        self.proposals = Proposals(cfg, self.task, self.rng, self.records, self.learning, self.population)
        self.dispatched = 0        # evaluations handed to evaluators (the runner counts them)
        self.resumed = False

    @classmethod
    def open(cls, cfg: RunConfig, resume: bool = False, progress: bool = True, population=None) -> "Search":
        """Start a new run in cfg's run directory (refused when one is there), or resume it from its tables."""
        run_dir = cfg.resolved_run_dir
        store = RunStore(run_dir, evaluation_columns=get_task(cfg.task).columns)
        store.lock()   # one driver per run: a second gets RunLocked; the runner unlocks at the end
        if (run_dir / "config.yaml").exists() and not resume:
            store.unlock()
            raise RunExists(f"{run_dir} already holds a run: pass --resume to continue it, or another name")
        store.write_config(cfg.to_dict())
        search = cls(cfg, store, progress=progress, population=population)
        search.resumed = search.replay() if resume else False
        return search

    def replay(self) -> bool:
        """Resume: rebuild ids, dedup, population, queue, pairs and DPO state from the tables;
        False when they hold no candidate yet."""
        tables = self.records.replay()
        if tables is None:
            return False
        self.dispatched = self.evaluated
        self.learning.replay(*tables)
        log.info("resumed %s: %d candidates, %d evaluations, %d re-queued", self.run_dir, len(tables[0]),
                 self.evaluated, len(self.queue))
        return True

    # ------------------------------------------------------------------ records
    def tag(self, job: dict) -> str:
        return self.records.tag(job)

    def record_evaluation(self, job: dict, result: dict) -> None:
        row = self.records.record_evaluation(job, result)
        self.learning.measured(job["candidate_id"], row)

    # ------------------------------------------------------------------ proposals
    def propose(self, cand, **proposal) -> tuple[int, str, int | None]:
        """Keywords as `Proposals.propose`: source, operator, island, parents, reason, prompt_id, ..."""
        return self.proposals.propose(cand, **proposal)

    def seed_population(self) -> None:
        self.proposals.seed_population()

    def choose_operator(self) -> tuple[str, float | None]:
        return self.proposals.choose_operator()

    def symbolic_child(self, op: str) -> None:
        self.proposals.symbolic_child(op)

    def choose_symbolic(self) -> str | None:
        return self.proposals.choose_symbolic()

    def build_prompt(self, op: str) -> tuple[str, int, list[int]]:
        return self.proposals.build_prompt(op)

    def lineage_graph(self, root: int, limit: int = 8):
        return self.proposals.lineage_graph(root, limit)

    def next_prompt_id(self) -> int:
        return self.proposals.next_prompt_id()

    def handle_completions(self, meta: dict, completions: list[dict]) -> None:
        self.proposals.handle_completions(meta, completions)

    # ------------------------------------------------------------------ DPO
    def dpo_due(self) -> bool:
        return self.learning.dpo_due()

    def next_dpo_round(self) -> dict:
        return self.learning.next_dpo_round()

    def record_dpo_round(self, job: dict, metrics: dict | None, error: str = "") -> None:
        self.learning.record_dpo_round(job, metrics, error)

    # ------------------------------------------------------------------ stopping
    def stop_reason(self) -> str | None:
        return stopping.stop_reason(self.cfg.search, self.records, self.population, self.proposals.since_accepted)

    def proxy_cutoff(self) -> float | None:
        return stopping.proxy_cutoff(self.population, self.cfg.search.cascade)

    def summary(self) -> dict:
        return stopping.summary(self.cfg, self.records, self.learning, self.population)

    # ------------------------------------------------------------------ promotion
    def promotion_jobs(self) -> list[dict]:
        return promotion.promotion_jobs(self.cfg, self.store.read("candidates"), self.store.read("evaluations"),
                                        self.store.read("promotions"))

    def record_promotion(self, job: dict, result: dict) -> None:
        row = promotion.promotion_row(self.cfg, job, result, self.records.now())
        self.store.append("promotions", row)
        log.info("promotion of #%d, seed %d: %s, perplexity %s %s", job["candidate_id"], job["seed"], row["status"],
                 "-" if row["perplexity"] is None else f"{row['perplexity']:.3f}", row["levels"] or row["reason"])

    def promoted(self) -> dict | None:
        """The best program after promotion: candidate_id, fitness, perplexity; None before it."""
        if not self.cfg.fitness.promote:
            return None
        ranking = promotion.promoted_ranking(self.store.read("promotions"), promotion.promotion_seeds(self.cfg))
        return None if ranking.empty else {k: (int(v) if k == "candidate_id" else float(v))
                                           for k, v in ranking.iloc[0].items()}

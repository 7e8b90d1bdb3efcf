"""The population: islands with elites, an archive of every evaluated program, dedup by canonical
hash with an evaluation cache, parent selection and novelty.

It is a pure function of the recorded evaluations, replayed in order: resuming a run rebuilds
exactly the population an uninterrupted run would hold.

Every per-candidate operation costs the same at the 100,000th candidate as at the first: dedup and
the cache are hash lookups, islands are bounded, and novelty compares with a bounded window of
the newest archived programs (`NOVELTY_WINDOW`), not with the whole archive."""
from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

from autoprune_ray.operators.language import CandidateError, parse
from autoprune_ray.tree import expr
from autoprune_ray.tree.expr import Node

# Novelty is measured against this many of the newest archived programs. Against the whole archive
# it cost O(run length) per parent drawn; a window keeps it constant, and it still says how unlike
# the current search a program is, which is what the tie-break asks.
NOVELTY_WINDOW = 256


@dataclass
class Individual:
    candidate_id: int
    hash: str
    code: str
    fitness: float | None          # higher is better: −log(perplexity); None: proxy stage only
    proxy: float | None
    perplexity: float | None
    island: int
    operator: str
    parents: list[int] = field(default_factory=list)
    # None: not computed yet. Novelty is read only to break a tie in selection, so the program is
    # parsed for its features when first compared (`language`, `granularity`: how to parse it),
    # not on every evaluation.
    features: frozenset | None = None
    language: str = "prune"
    granularity: str = "row"


def fitness_from_perplexity(ppl: float | None) -> float | None:
    return None if ppl is None or not math.isfinite(ppl) else -math.log(ppl)


def subtree_features(tree: Node) -> frozenset:
    """Structural fingerprint for novelty: the set of the tree's subtrees."""
    return frozenset(expr.to_string(n) for n in expr.walk(tree))


def features_of(ind: Individual) -> frozenset:
    """`ind`'s features, computed once."""
    if ind.features is None:
        try:
            ind.features = subtree_features(parse(ind.code, ind.language, ind.granularity).tree)
        except CandidateError:
            ind.features = frozenset()
    return ind.features


class Population:
    def __init__(self, islands: int = 2, population_size: int = 12, elites: int = 2,
                 migration_interval: int = 10, seed: int = 0):
        self.n_islands, self.size, self.n_elites = islands, population_size, elites
        self.migration_interval = migration_interval
        self.islands: list[list[Individual]] = [[] for _ in range(islands)]
        self.archive: dict[str, Individual] = {}        # hash -> evaluated individual (the cache)
        self.seen: dict[str, int] = {}                  # hash -> first candidate id (dedup)
        self.evaluations = 0
        self.best: Individual | None = None
        self.best_proxy: float | None = None
        self.since_improvement = 0
        self.rng = random.Random(seed)
        self.recent: deque[Individual] = deque()        # the novelty window, oldest first

    # -- dedup and cache ------------------------------------------------------------
    def claim(self, hash_: str, candidate_id: int) -> int | None:
        """Register a proposed program; returns the id of an earlier identical one, if any."""
        if hash_ in self.seen:
            return self.seen[hash_]
        self.seen[hash_] = candidate_id
        return None

    def cached(self, hash_: str) -> Individual | None:
        return self.archive.get(hash_)

    # -- results ------------------------------------------------------------------------
    def add(self, ind: Individual) -> bool:
        """Record an evaluated individual; returns True when it is the new best."""
        self.evaluations += 1
        self.archive[ind.hash] = ind
        self._remember_recent(ind)
        if ind.proxy is not None and (self.best_proxy is None or ind.proxy < self.best_proxy):
            self.best_proxy = ind.proxy
        improved = ind.fitness is not None and (self.best is None or ind.fitness > self.best.fitness)
        if improved:
            self.best = ind
            self.since_improvement = 0
        else:
            self.since_improvement += 1
        if ind.fitness is not None:
            island = self.islands[ind.island % self.n_islands]
            island.append(ind)
            self._trim(island)
        if self.evaluations % self.migration_interval == 0:
            self.migrate()
        return improved

    def _remember_recent(self, ind: Individual) -> None:
        """Keep `ind` in the novelty window. A program leaving it drops its features (most of an
        individual's memory); should it be compared again (an island member), they are recomputed."""
        self.recent.append(ind)
        if len(self.recent) > NOVELTY_WINDOW:
            self.recent.popleft().features = None

    def _trim(self, island: list[Individual]) -> None:
        island.sort(key=lambda i: (-i.fitness, i.candidate_id))
        del island[self.size:]

    def elites(self, island: int) -> list[Individual]:
        return self.islands[island][: self.n_elites]

    def migrate(self) -> None:
        """Ring migration: each island's best elite joins the next island."""
        moving = [self.elites(i)[:1] for i in range(self.n_islands)]
        for i, group in enumerate(moving):
            target = self.islands[(i + 1) % self.n_islands]
            for ind in group:
                if all(other.hash != ind.hash for other in target):
                    target.append(ind)
                    self._trim(target)

    # -- selection and novelty --------------------------------------------------------------
    def sample_parents(self, island: int, k: int = 1, tournament: int = 3) -> list[Individual]:
        pool = self.islands[island % self.n_islands] or [i for isl in self.islands for i in isl]
        if not pool:
            return []
        chosen = []
        for _ in range(k):
            contenders = self.rng.sample(pool, min(tournament, len(pool)))
            chosen.append(self._fittest(contenders))
        return chosen

    def _fittest(self, contenders: list[Individual]) -> Individual:
        """The fittest contender; novelty breaks ties, and is computed only for a tie (it is the
        one selection step that reads more than the contenders)."""
        top = max(i.fitness for i in contenders)
        tied = [i for i in contenders if i.fitness == top]
        if len(tied) == 1:
            return tied[0]
        return max(tied, key=lambda i: self.novelty(features_of(i), exclude=i.hash))

    def novelty(self, features: frozenset, exclude: str | None = None) -> float:
        """1 − the highest Jaccard similarity to any program in the novelty window (1: nothing like it)."""
        best = 0.0
        for other in self.recent:
            if other.hash == exclude or not features or not features_of(other):
                continue
            best = max(best, len(features & other.features) / len(features | other.features))
        return 1.0 - best

    def record_failure(self) -> None:
        """A failed or timed-out evaluation still counts towards the budget and patience."""
        self.evaluations += 1
        self.since_improvement += 1

    def apply(self, calls: list[tuple[str, tuple]]) -> None:
        """Replay the driver's recorded updates in order (`claim`, `add`, `record_failure`): how
        the `population` actor mirrors the driver's population (engine/actors.py)."""
        for name, args in calls:
            getattr(self, name)(*args)

    def has_members(self) -> bool:
        return any(self.islands)

    def snapshot(self) -> dict:
        best = self.best
        return {"best_id": best.candidate_id if best else None, "best_fitness": best.fitness if best else None,
                "best_perplexity": best.perplexity if best else None, "best_code": best.code if best else None,
                "best_proxy": self.best_proxy, "since_improvement": self.since_improvement,
                "evaluations": self.evaluations}

    def next_island(self) -> int:
        return self.rng.randrange(self.n_islands)

    def summary(self) -> dict:
        return {"evaluations": self.evaluations, "archive": len(self.archive), "seen": len(self.seen),
                "best_fitness": self.best.fitness if self.best else None,
                "best_perplexity": self.best.perplexity if self.best else None,
                "best_id": self.best.candidate_id if self.best else None,
                "island_sizes": [len(i) for i in self.islands], "since_improvement": self.since_improvement}

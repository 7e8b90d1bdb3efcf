"""Records and resume: every proposal and evaluation as a table row, and what the driver keeps of
them in memory (ids, the evaluation queue, lineage for prompts, recent rejections for feedback,
counters). `replay` rebuilds all of that from the tables, so a killed driver resumes where the
tables end: the population is a function of the evaluation rows, in order.
"""
from __future__ import annotations

import bisect
import logging
import math
import time
from collections import deque

from autoprune_ray.engine.config import RunConfig
from autoprune_ray.engine.database import Individual, fitness_from_perplexity
from autoprune_ray.engine.metrics import EngineMetrics
from autoprune_ray.engine.storage import RunStore, split_orphan_evaluations
from autoprune_ray.tasks.base import TaskPlugin

log = logging.getLogger("autoprune_ray.engine")
OUTCOMES_EVALUATED = ("ok", "screened", "failed", "timeout")
REJECTIONS_KEPT = 24      # recent rejection reasons fed back into prompts
KNOWN_BEHAVIOURS = 256    # lowest measured proxies sent with each job, to skip re-spellings


def evaluation_job(candidate_id: int, hash_: str, code: str, island: int, granularity: str, operator: str,
                   parents: list[int]) -> dict:
    """What the queue holds for one accepted candidate (and an evaluator receives)."""
    return {"candidate_id": candidate_id, "hash": hash_, "code": code, "island": island,
            "granularity": granularity, "operator": operator, "parents": parents, "attempts": 0}


class RunRecords:
    """The run's tables and their in-memory state. `population` is a local Population or a
    synchronous handle to the `population` actor (same methods)."""

    def __init__(self, cfg: RunConfig, task: TaskPlugin, store: RunStore, population):
        self.cfg, self.task, self.store, self.population = cfg, task, store, population
        self.metrics = EngineMetrics(cfg.name)
        self.queue: deque[dict] = deque()
        self.lineage: dict[int, dict] = {}     # id -> code, fitness, parents, operator (for prompts)
        self.rejections: deque[tuple[str, str]] = deque(maxlen=REJECTIONS_KEPT)
        self.next_id, self.evaluated = 0, 0
        self.lowest_proxies: list[tuple[float, int]] = []   # (proxy, first candidate measured with it), sorted
        self.stats = {"proposed": 0, "valid": 0, "tokens": 0, "busy_seconds": 0.0, "overhead_seconds": 0.0}
        self.t0 = time.time()

    def now(self) -> float:
        """Seconds since the run (this driver) started: the time columns of every table."""
        return time.time() - self.t0

    def tag(self, job: dict) -> str:
        """What every per-candidate log record starts with: grep a run's logs by any of the three."""
        return f"run={self.cfg.name} island={job['island']} candidate={job['candidate_id']}"

    # ------------------------------------------------------------------ proposals
    def new_candidate(self, *, code: str, source: str, status: str, operator: str, island: int,
                      parents: list[int], reason: str = "", hash_: str = "", prompt_id: int | None = None,
                      adapter: str | None = None, duplicate_of: int | None = None, granularity: str = "row",
                      strategy: str | None = None) -> int:
        """One `candidates` row (and its `lineage` rows) under the next id; returns the id."""
        cid = self.next_id
        self.next_id += 1
        self.store.append("candidates", {
            "candidate_id": cid, "hash": hash_, "status": status, "reason": reason, "code": code,
            "source": source[:4000], "operator": operator, "island": island, "parents": parents,
            "prompt_id": prompt_id, "adapter": adapter, "duplicate_of": duplicate_of, "granularity": granularity,
            "created": self.now(), "strategy": strategy})
        for p in parents:
            self.store.append("lineage", {"child_id": cid, "parent_id": p, "operator": operator})
        self.stats["proposed"] += 1
        self.metrics.inc("proposed")
        if status == "rejected":
            self.rejections.append((source.strip()[:200], reason))
        return cid

    def remember(self, candidate_id: int, code: str, parents: list[int], operator: str) -> None:
        """Keep a valid candidate for lineage prompts; its fitness arrives with its evaluation."""
        self.lineage[candidate_id] = {"code": code, "fitness": None, "parents": parents, "operator": operator}

    # ------------------------------------------------------------------ evaluations
    def record_evaluation(self, job: dict, result: dict) -> dict:
        """One `evaluations` row; the population admits what succeeded. Returns the row."""
        row = self._evaluation_row(job, result)
        self.store.append("evaluations", row)
        self._log_outcome(job, row)
        self.evaluated += 1
        self.metrics.inc("evaluated")
        if row["status"] in ("failed", "timeout"):
            self.metrics.inc("failed")
            self.rejections.append((job["code"][:200], row["reason"]))
        if result.get("seconds"):
            self.metrics.observe_latency(result["seconds"])
        self.admit(job, row)
        return row

    def _evaluation_row(self, job: dict, result: dict) -> dict:
        """The columns every task records, then the task plug-in's own (its `columns`)."""
        status = result["status"]
        return {"candidate_id": job["candidate_id"], "hash": job["hash"], "status": status,
                "proxy": result.get("proxy"), "perplexity": result.get("perplexity"),
                "fitness": result_fitness(result) if status == "ok" else None,
                "kl": result.get("kl"), "levels": result.get("levels"),
                "seconds": result.get("seconds"), "worker": result.get("worker"),
                "reason": result.get("reason", ""), "attempts": job.get("attempts", 0),
                "finished": self.now(), "node": result.get("node"),
                **{k: result.get(k) for k in self.task.columns}}

    def _log_outcome(self, job: dict, row: dict) -> None:
        if row["status"] in ("failed", "timeout"):
            log.warning("%s: %s after %.1f s: %s", self.tag(job), row["status"], row["seconds"] or 0.0, row["reason"])
        else:
            measured = " ".join(f"{key} {row[key]:.4g}" for key in ("perplexity", "kl") if row.get(key) is not None)
            log.info("%s: %s, proxy %.4g, %s (%s, %.1f s)", self.tag(job), row["status"],
                     row["proxy"] if row["proxy"] is not None else math.nan, measured or "not measured",
                     job.get("operator", ""), row["seconds"] or 0.0)

    def admit(self, job: dict, row: dict) -> None:
        """Replayable: the population is a function of the evaluation rows, in order."""
        if row["status"] not in ("ok", "screened"):
            self.population.record_failure()
            return
        ind = Individual(job["candidate_id"], job["hash"], job["code"], row["fitness"], row["proxy"],
                         row["perplexity"], job["island"], job.get("operator", ""), list(job.get("parents", [])),
                         language=self.cfg.task, granularity=job.get("granularity", "row"))
        improved = self.population.add(ind)
        if row["status"] == "ok" and row["proxy"] is not None:
            self._remember_proxy(row["proxy"], job["candidate_id"])
        if job["candidate_id"] in self.lineage:
            self.lineage[job["candidate_id"]]["fitness"] = row["fitness"]
        if improved:   # the gauges change only with the best
            self.metrics.set("best_fitness", row["fitness"])
            self.metrics.set("best_perplexity", row["perplexity"])

    def _remember_proxy(self, proxy: float, candidate_id: int) -> None:
        """Keep the KNOWN_BEHAVIOURS lowest measured proxies: the good region, where re-spellings of
        the fittest programs land; a bounded list keeps each dispatch turn's cost flat."""
        at = bisect.bisect_left(self.lowest_proxies, (proxy, -1))
        if at < len(self.lowest_proxies) and self.lowest_proxies[at][0] == proxy:
            return
        self.lowest_proxies.insert(at, (proxy, candidate_id))
        del self.lowest_proxies[KNOWN_BEHAVIOURS:]

    def known_behaviours(self, cutoff: float | None) -> dict[float, int]:
        """Measured proxies (at most the cutoff: above it a candidate is screened anyway) and who
        had them. A bitwise-equal proxy means the same masks or bits: another spelling of a measured
        program, which an evaluator then does not measure again."""
        return {p: cid for p, cid in self.lowest_proxies if cutoff is None or p <= cutoff}

    # ------------------------------------------------------------------ resume
    def replay(self):
        """Rebuild ids, dedup, lineage, population and the queue from the tables. Returns the
        (candidates, evaluations) tables for the other pieces to replay, or None for a new run."""
        cands, evals = self.store.read("candidates"), self.store.read("evaluations")
        evals, orphans = split_orphan_evaluations(cands, evals)
        if len(orphans):   # their candidate rows were in a part that could not be read
            log.warning("resume %s: %d evaluations whose candidate rows are lost are skipped (ids %s)",
                        self.store.root, len(orphans), sorted(orphans.candidate_id.astype(int))[:10])
        if cands.empty:
            return None
        # ids of lost candidates are never reused: an id names one program in every table
        self.next_id = int(max(cands.candidate_id.max(), orphans.candidate_id.max() if len(orphans) else -1)) + 1
        self._replay_candidates(cands)
        done = self._replay_evaluations(cands, evals)
        for r in cands.itertuples():
            if r.status == "accepted" and int(r.candidate_id) not in done:   # pending when the run stopped
                self.queue.append(evaluation_job(int(r.candidate_id), r.hash, r.code, int(r.island), r.granularity,
                                                 r.operator, list(r.parents)))
        return cands, evals

    def _replay_candidates(self, cands) -> None:
        for r in cands.itertuples():
            if r.status in ("accepted", "duplicate") and r.hash:
                self.population.claim(r.hash, int(r.candidate_id))
            if r.status != "rejected":
                self.remember(int(r.candidate_id), r.code, list(r.parents), r.operator)

    def _replay_evaluations(self, cands, evals) -> set[int]:
        """Admit every recorded evaluation again, in order; returns the ids evaluated."""
        by_id = {int(r.candidate_id): r for r in cands.itertuples()}
        done = set()
        for e in evals.itertuples() if not evals.empty else []:
            c = by_id[int(e.candidate_id)]
            job = {"candidate_id": int(c.candidate_id), "hash": c.hash, "code": c.code, "island": int(c.island),
                   "operator": c.operator, "parents": list(c.parents), "granularity": c.granularity}
            row = {"status": e.status, "proxy": _num(e.proxy), "perplexity": _num(e.perplexity),
                   "fitness": _num(e.fitness)}
            self.admit(job, row)
            done.add(int(e.candidate_id))
            if e.status in OUTCOMES_EVALUATED:
                self.evaluated += 1
        return done


def result_fitness(result: dict) -> float | None:
    """An evaluator's own fitness (a staged measure), else −log of its perplexity."""
    value = result.get("fitness")
    if value is None:
        return fitness_from_perplexity(result.get("perplexity"))
    return float(value) if math.isfinite(value) else None


def _num(x):
    """A table's float cell: NaN (a null read back by pandas) is None."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)

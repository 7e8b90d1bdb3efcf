"""Evaluation jobs to evaluator actors, in batches, and what comes back.

An idle evaluator gets one call (`evaluate_batch`) with one or more jobs. How many: as many as
take about `BATCH_SECONDS` at the evaluations' measured speed, at most `MAX_BATCH` and at most
its share of the queue. Evaluations that take seconds go one per call, as they always did; a
batch only forms when an evaluation takes milliseconds and the Ray call itself would be the
cost. Every job still gets exactly one recorded outcome:

  * a batch's results are recorded one by one, in order;
  * an evaluator that dies (or is killed) mid-batch: with one job, it is re-queued with one more
    attempt (recorded failed after `MAX_ATTEMPTS`); with several, nobody knows which job it died
    on, so each is re-queued to run alone (`solo`), where the faulty one is found and the others
    finish;
  * a batch past the time limit is treated like a death: its evaluator is killed and restarted,
    a single job is recorded as a timeout, several are re-queued solo.
"""
from __future__ import annotations

import logging
import math
import time

from autoprune_ray.engine.controller import Inflight, Search

log = logging.getLogger("autoprune_ray.engine")
MAX_ATTEMPTS = 3          # a candidate whose evaluator died this often is recorded as failed
MAX_BATCH = 16
# A batch is sized to take about this long (at least one job): some ten times what a Ray call
# costs the driver (~1 ms), so the call is a small part of it. Evaluations of a real model take
# far longer than this and go one to a call.
BATCH_SECONDS = 0.01


class BatchSizer:
    """A running mean of evaluation seconds, and the batch size it implies."""

    def __init__(self):
        self.mean: float | None = None

    def observe(self, seconds: float | None) -> None:
        if seconds is not None and seconds >= 0:
            self.mean = seconds if self.mean is None else 0.9 * self.mean + 0.1 * seconds

    def size(self) -> int:
        if self.mean is None:   # nothing measured yet: one job per call
            return 1
        return max(1, min(MAX_BATCH, int(BATCH_SECONDS / max(self.mean, 1e-4))))


def dispatch(search: Search, pool) -> None:
    """One batch to every idle evaluator while jobs and budget last."""
    limit = search.cfg.search.max_evaluations
    cutoff = search.proxy_cutoff()   # once per turn: it changes only when outcomes are recorded
    known = search.records.known_behaviours(cutoff)
    while pool.idle and search.queue and search.dispatched < limit:
        share = math.ceil(len(search.queue) / len(pool.idle))
        jobs = _take(search, min(pool.sizer.size(), share, limit - search.dispatched), cutoff, known)
        worker = pool.idle.pop()
        ref = pool.evaluators[worker].evaluate_batch.remote(jobs)
        pool.inflight[ref] = Inflight("eval", worker, time.time(), {"jobs": jobs})
        search.dispatched += len(jobs)


def _take(search: Search, size: int, cutoff, known: dict[float, int]) -> list[dict]:
    """Up to `size` jobs from the queue's head; a solo job goes alone."""
    jobs = []
    while search.queue and len(jobs) < size:
        if search.queue[0].get("solo") and jobs:
            break
        jobs.append(search.queue.popleft() | {"proxy_cutoff": cutoff, "known_proxies": known})
        if jobs[-1].get("solo"):
            break
    return jobs


def record_batch(search: Search, pool, call: Inflight, results: list[dict]) -> int:
    """A finished batch: each job's outcome, in order; returns how many were recorded."""
    pool.idle.add(call.worker)
    search.stats["busy_seconds"] += time.time() - call.started
    for job, result in zip(call.payload["jobs"], results):
        pool.sizer.observe(result.get("seconds"))
        search.record_evaluation(job, result)
    return len(call.payload["jobs"])


def batch_failed(search: Search, call: Inflight, reason: str) -> int:
    """The evaluator raised (a bug in our code, not the program's): every job is a recorded failure."""
    for job in call.payload["jobs"]:
        search.record_evaluation(job, {"status": "failed", "reason": reason})
    return len(call.payload["jobs"])


def batch_died(search: Search, call: Inflight) -> int:
    """The evaluator died mid-batch; returns the outcomes recorded (a job out of attempts)."""
    jobs = call.payload["jobs"]
    search.dispatched -= len(jobs)
    if len(jobs) > 1:
        log.warning("evaluator-%d died mid-batch of %d jobs (candidates %s); each is re-queued to run alone",
                    call.worker, len(jobs), [j["candidate_id"] for j in jobs])
        requeue(search, jobs, solo=True)
        return 0
    job = jobs[0]
    job["attempts"] = job.get("attempts", 0) + 1
    if job["attempts"] >= MAX_ATTEMPTS:
        search.dispatched += 1
        search.record_evaluation(job, {"status": "failed", "reason": f"evaluator died {MAX_ATTEMPTS} times"})
        return 1
    log.warning("%s: evaluator-%d died mid-evaluation; re-queued (attempt %d)", search.tag(job),
                call.worker, job["attempts"])
    requeue(search, jobs)
    return 0


def batch_timed_out(search: Search, call: Inflight, now: float, limit: float) -> int:
    """The batch ran past the limit (its evaluator is being killed); returns the outcomes recorded."""
    jobs = call.payload["jobs"]
    if len(jobs) > 1:
        log.warning("evaluator-%d: a batch of %d jobs exceeded the %.0f s time limit; each is re-queued "
                    "to run alone", call.worker, len(jobs), limit)
        search.dispatched -= len(jobs)
        requeue(search, jobs, solo=True)
        return 0
    search.record_evaluation(jobs[0], {"status": "timeout", "seconds": now - call.started,
                                       "reason": f"exceeded the {limit:.0f} s time limit"})
    return 1


def requeue(search: Search, jobs: list[dict], solo: bool = False) -> None:
    """Back to the head of the queue, in their order."""
    for job in reversed(jobs):
        job = {k: v for k, v in job.items() if k not in ("proxy_cutoff", "known_proxies")}
        search.queue.appendleft(job | {"solo": True} if solo else job)

"""Stopping and summary: when the search ends, the screening cutoff evaluators apply, and the
numbers a run reports (progress display, checkpoints, the CLI's final JSON)."""
from __future__ import annotations

import time

from autoprune_ray.engine.config import RunConfig, SearchConfig
from autoprune_ray.engine.learning import PolicyLearning
from autoprune_ray.engine.records import RunRecords


def stop_reason(s: SearchConfig, records: RunRecords, population, since_accepted: int) -> str | None:
    """Why the search stops now, or None to go on."""
    if records.evaluated >= s.max_evaluations:
        return f"reached {s.max_evaluations} evaluations"
    if s.max_seconds is not None and time.time() - records.t0 >= s.max_seconds:
        return f"reached {s.max_seconds:.0f} s"
    if s.patience is not None and population.snapshot()["since_improvement"] >= s.patience:
        return f"no improvement for {s.patience} evaluations"
    if since_accepted >= s.stall_proposals and not records.queue:
        return f"{s.stall_proposals} proposals in a row were rejected or duplicates"
    return None


def proxy_cutoff(population, cascade: float) -> float | None:
    """Evaluators measure perplexity only when a candidate's proxy is at most this (the best proxy
    so far times `search.cascade`); above it the candidate is recorded as screened."""
    best = population.snapshot()["best_proxy"]
    return None if best is None else best * cascade


def summary(cfg: RunConfig, records: RunRecords, learning: PolicyLearning, population) -> dict:
    snap, stats, dpo = population.snapshot(), records.stats, learning.dpo
    elapsed = time.time() - records.t0
    return {"run_dir": str(cfg.resolved_run_dir), "evaluated": records.evaluated, "proposed": stats["proposed"],
            "valid_rate": stats["valid"] / max(stats["proposed"], 1),
            "pending": len(records.queue), "best_id": snap["best_id"], "best_fitness": snap["best_fitness"],
            "best_perplexity": snap["best_perplexity"],
            "best_code": snap["best_code"],
            "started": records.t0,   # epoch seconds: the tables' time columns count from it
            "seconds": elapsed, "tokens_per_second": stats["tokens"] / max(elapsed, 1e-9),
            "evaluator_utilization": stats["busy_seconds"] / max(elapsed * cfg.evaluators.num, 1e-9),
            "overhead_per_candidate": stats["overhead_seconds"] / max(stats["proposed"], 1),
            "preference_pairs": dpo["pairs"], "dpo_rounds": dpo["round"],
            "adapter": dpo["adapter"][0] if dpo["adapter"] else None}

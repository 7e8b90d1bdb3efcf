"""Promotion: before a program is called best, it is measured again.

A search ranks programs by a cheap stage (KL to the dense model, or perplexity, on a few hundred
validation tokens, with one calibration draw). Its top ranks are partly luck: of many programs,
the ones whose noise happened to favour them. So when the search stops, the `fitness.promote`
fittest distinct programs are measured again by perplexity on `fitness.promote_tokens`
validation tokens, once with the run's calibration seed and once with `fitness.second_seed`.
The best program is the one with the highest mean fitness over both seeds; a program that failed
under either seed is not eligible. Every measurement is a row of the `promotions` table, so a
resumed run promotes only what is missing.
"""
from __future__ import annotations

import math

import pandas as pd

from autoprune_ray.engine.config import RunConfig


def promotion_seeds(cfg: RunConfig) -> list[int]:
    return [cfg.target.seed, cfg.fitness.second_seed]


def promotion_candidates(evals: pd.DataFrame, count: int) -> list[int]:
    """The `count` fittest distinct programs with a measured search-stage fitness. Distinct by
    hash, and by behaviour: programs whose fitness is bitwise equal made the same masks (a
    search finds many spellings of one algorithm), so only the first of them is promoted and the
    promotion's measurements go to different algorithms."""
    if count <= 0 or evals.empty:
        return []
    ok = evals[(evals.status == "ok") & evals.fitness.notna()]
    ok = ok.sort_values(["fitness", "candidate_id"], ascending=[False, True])
    ok = ok.drop_duplicates("hash").drop_duplicates("fitness")
    return [int(c) for c in ok.candidate_id.head(count)]


def promotion_jobs(cfg: RunConfig, cands: pd.DataFrame, evals: pd.DataFrame, done: pd.DataFrame) -> list[dict]:
    """Evaluation jobs (stage "promote", one per program and seed) not yet in the promotions table."""
    measured = set() if done.empty else {(int(r.candidate_id), int(r.seed)) for r in done.itertuples()}
    by_id = cands.set_index("candidate_id")
    jobs = []
    for candidate_id in promotion_candidates(evals, cfg.fitness.promote):
        row = by_id.loc[candidate_id]
        for seed in promotion_seeds(cfg):
            if (candidate_id, seed) not in measured:
                jobs.append({"candidate_id": candidate_id, "hash": row.hash, "code": row.code,
                             "granularity": row.granularity or "row", "stage": "promote", "seed": seed,
                             "proxy_cutoff": None})
    return jobs


def promotion_row(cfg: RunConfig, job: dict, result: dict, finished: float) -> dict:
    ok = result.get("status") == "ok"
    fitness = result.get("fitness") if ok else None
    return {"candidate_id": job["candidate_id"], "hash": job["hash"], "seed": job["seed"],
            "tokens": cfg.fitness.promote_tokens or cfg.target.val_tokens or 0,
            "status": result.get("status", "failed"), "perplexity": result.get("perplexity") if ok else None,
            "fitness": fitness if fitness is not None and math.isfinite(fitness) else None,
            "levels": result.get("levels"), "seconds": result.get("seconds"),
            "reason": result.get("reason", ""), "finished": finished}


def promoted_ranking(promotions: pd.DataFrame, seeds: list[int]) -> pd.DataFrame:
    """Programs measured ok under every seed, best first: candidate_id, fitness (mean over the
    seeds), perplexity (geometric mean over seeds and levels)."""
    cols = ["candidate_id", "fitness", "perplexity"]
    if promotions.empty:
        return pd.DataFrame(columns=cols)
    ok = promotions[(promotions.status == "ok") & promotions.fitness.notna() & promotions.seed.isin(seeds)]
    ok = ok.drop_duplicates(["candidate_id", "seed"], keep="last")
    complete = ok.groupby("candidate_id").filter(lambda g: set(g.seed) >= set(seeds))
    if complete.empty:
        return pd.DataFrame(columns=cols)
    ranking = complete.groupby("candidate_id").fitness.mean().reset_index()
    ranking["perplexity"] = ranking.fitness.map(lambda f: math.exp(-f))
    return ranking.sort_values(["fitness", "candidate_id"], ascending=[False, True]).reset_index(drop=True)

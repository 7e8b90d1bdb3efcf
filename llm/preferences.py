"""Preference pairs from a run's tables: what DPO learns from.

Two kinds, both between completions of the *same prompt*, so the pair differs only in what the
policy wrote:
  * fitness: both programs were measured (perplexity) and one beat the other by more than
    `margin` in fitness (−log perplexity, so the margin is a relative perplexity gap);
  * validity: one completion parsed into a valid program and the other was rejected, which
    teaches the language itself.
A duplicate inherits the fitness of the program it duplicates.
"""
from __future__ import annotations

import itertools

import pandas as pd

COLUMNS = ["prompt_id", "prompt", "chosen", "rejected", "chosen_fitness", "rejected_fitness", "gap", "kind",
           "operator", "island", "chosen_adapter", "rejected_adapter", "chosen_id", "rejected_id"]


def _completions(cands: pd.DataFrame, evals: pd.DataFrame, prompts: pd.DataFrame) -> pd.DataFrame:
    """One row per policy completion: its prompt, text, validity and fitness (None if unmeasured)."""
    from_policy = cands[cands.prompt_id.notna()].copy()
    fitness = evals[evals.status == "ok"].set_index("candidate_id").fitness.to_dict()
    own = from_policy.candidate_id.map(fitness)
    inherited = from_policy.duplicate_of.map(lambda d: fitness.get(int(d)) if pd.notna(d) else None)
    from_policy["fitness"] = own.fillna(inherited)
    from_policy["valid"] = from_policy.status != "rejected"
    texts = prompts.drop_duplicates("prompt_id").set_index("prompt_id")[["prompt"]]
    return from_policy.join(texts, on="prompt_id")


def preference_pairs(cands: pd.DataFrame, evals: pd.DataFrame, prompts: pd.DataFrame,
                     margin: float = 0.01) -> pd.DataFrame:
    """All pairs of one run; `margin` is the least fitness gap of a fitness pair."""
    rows = []
    for prompt_id, group in _completions(cands, evals, prompts).groupby("prompt_id"):
        for a, b in itertools.combinations(group.itertuples(index=False), 2):
            pair = _pair(a, b, margin)
            if pair is not None:
                rows.append(pair | {"prompt_id": int(prompt_id)})
    return pd.DataFrame(rows, columns=COLUMNS)


def _pair(a, b, margin: float) -> dict | None:
    if a.valid != b.valid:
        good, bad = (a, b) if a.valid else (b, a)
        kind, gap = "validity", None
    elif pd.notna(a.fitness) and pd.notna(b.fitness) and abs(a.fitness - b.fitness) > margin:
        good, bad = (a, b) if a.fitness > b.fitness else (b, a)
        kind, gap = "fitness", float(good.fitness - bad.fitness)
    else:
        return None
    return {"prompt": good.prompt, "chosen": good.source, "rejected": bad.source,
            "chosen_fitness": _num(good.fitness), "rejected_fitness": _num(bad.fitness), "gap": gap, "kind": kind,
            "operator": good.operator, "island": int(good.island), "chosen_adapter": good.adapter,
            "rejected_adapter": bad.adapter, "chosen_id": int(good.candidate_id), "rejected_id": int(bad.candidate_id)}


def _num(x) -> float | None:
    return None if pd.isna(x) else float(x)

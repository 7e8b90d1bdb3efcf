"""Preference pairs: what DPO and the prompt-strategy controller learn from.

A pair is two policy completions written in the same context, where one measurably beat the
other. The context ("grouping") is either the same prompt, or prompts built from the same
parents (then the pair's prompt is the chosen completion's). Three kinds:
  * validity: one completion parsed into a valid program, the other was rejected; teaches the
    language itself;
  * failure: both valid, one measured and the other failed its evaluation (NaN, shape error, ...);
  * fitness: both measured (perplexity), and one beat the other by more than `margin` in fitness
    (−log perplexity, so the margin is a relative perplexity gap).
A duplicate inherits the outcome of the program it duplicates. A fitness pair records its chosen
program's rank among the run's programs measured so far (`chosen_rank`: the share that measured
worse), so that a round can train only on pairs whose chosen program is good in absolute terms,
as EvoTune (Surina et al. 2025) does (`trains_on`).

Only completions written close together (candidate ids at most `window` apart) are paired: the
two sides then come from nearly the same policy (adapter), and the log grows linearly with the
run, not quadratically (an elite that parents hundreds of prompts would otherwise pair every
rejected completion with every valid one).

`PreferenceLog` is incremental: the engine feeds it completions and evaluation outcomes as they
arrive and logs each new pair once. `preference_pairs` replays a run's tables through it, so the
pairs logged during a run and those derived afterwards are the same set.
"""
from __future__ import annotations

import bisect
import math
from collections import defaultdict
from dataclasses import dataclass, field

import pandas as pd

COLUMNS = ["prompt_id", "prompt", "chosen", "rejected", "chosen_fitness", "rejected_fitness", "gap", "kind",
           "grouping", "operator", "island", "chosen_adapter", "rejected_adapter", "chosen_strategy",
           "rejected_strategy", "chosen_id", "rejected_id", "time", "chosen_rank"]
_RANK = {"rejected": 0, "failed": 1, "ok": 2}   # a measured program beats a failed one beats a rejected one
_PENDING = "valid"                               # valid, not measured (yet): it only beats a rejected one


@dataclass
class Completion:
    candidate_id: int
    prompt_id: int
    prompt: str
    source: str
    operator: str
    island: int
    parents: tuple[int, ...]
    adapter: str | None
    strategy: str | None
    status: str                         # rejected | accepted | duplicate
    duplicate_of: int | None = None
    outcome: str = _PENDING             # rejected | valid (unmeasured) | failed | ok
    fitness: float | None = None
    groups: list[tuple] = field(default_factory=list)


class PreferenceLog:
    def __init__(self, margin: float = 0.01, groupings: tuple[str, ...] = ("prompt", "parents"), window: int = 16):
        unknown = set(groupings) - {"prompt", "parents"}
        if unknown:
            raise ValueError(f"unknown preference grouping(s) {sorted(unknown)}: use prompt and/or parents")
        self.margin, self.groupings, self.window = margin, tuple(groupings), window
        self.by_id: dict[int, Completion] = {}
        self.groups: dict[tuple, list[Completion]] = defaultdict(list)     # members, by candidate id
        self.group_ids: dict[tuple, list[int]] = defaultdict(list)         # their ids, for bisection
        self.outcomes: dict[int, tuple[str, float | None]] = {}   # any candidate's measured outcome
        self.copies: dict[int, list[Completion]] = defaultdict(list)  # original id -> duplicates of it
        self.emitted: set[tuple[int, int]] = set()
        self.fitnesses: list[float] = []   # every measured program's fitness, sorted: ranks chosen sides

    # ------------------------------------------------------------------ feeding
    def add(self, c: Completion, now: float = 0.0) -> list[dict]:
        """A new completion; returns the pairs it completes."""
        self.by_id[c.candidate_id] = c
        if c.status == "rejected":
            c.outcome = "rejected"
        else:
            original = c.duplicate_of if c.status == "duplicate" and c.duplicate_of is not None else c.candidate_id
            if original != c.candidate_id:
                self.copies[original].append(c)
            c.outcome, c.fitness = self.outcomes.get(original, (_PENDING, None))
        c.groups = [("prompt", c.prompt_id)] if "prompt" in self.groupings else []
        if "parents" in self.groupings and c.parents:
            c.groups.append(("parents", tuple(sorted(c.parents))))
        for g in c.groups:
            at = bisect.bisect_right(self.group_ids[g], c.candidate_id)   # an append when ids arrive in order
            self.group_ids[g].insert(at, c.candidate_id)
            self.groups[g].insert(at, c)
        return self._pairs_of(c, now)

    def measured(self, candidate_id: int, status: str, fitness: float | None, now: float = 0.0) -> list[dict]:
        """An evaluation outcome (ok / failed / timeout; screened counts as unmeasured)."""
        outcome = {"ok": "ok", "failed": "failed", "timeout": "failed"}.get(status)
        if outcome is None or (outcome == "ok" and (fitness is None or not math.isfinite(fitness))):
            return []
        if outcome == "ok" and self.outcomes.get(candidate_id, ("",))[0] != "ok":
            bisect.insort(self.fitnesses, fitness)
        self.outcomes[candidate_id] = (outcome, fitness if outcome == "ok" else None)
        touched = [c for c in [self.by_id.get(candidate_id), *self.copies.get(candidate_id, [])] if c is not None]
        pairs = []
        for c in touched:
            c.outcome, c.fitness = self.outcomes[candidate_id]
            pairs += self._pairs_of(c, now)
        return pairs

    # ------------------------------------------------------------------ pairing
    def _pairs_of(self, c: Completion, now: float) -> list[dict]:
        out = []
        for g in c.groups:
            ids = self.group_ids[g]
            lo = bisect.bisect_left(ids, c.candidate_id - self.window)
            hi = bisect.bisect_right(ids, c.candidate_id + self.window)
            for other in self.groups[g][lo:hi]:   # only neighbours within the window: no scan of a long group
                if other is c:
                    continue
                pair = self._pair(c, other, g[0], now)
                if pair is not None:
                    out.append(pair)
        return out

    def _pair(self, a: Completion, b: Completion, grouping: str, now: float) -> dict | None:
        if _PENDING in (a.outcome, b.outcome) and "rejected" not in (a.outcome, b.outcome):
            return None
        if a.outcome != b.outcome:
            good, bad = (a, b) if _RANK.get(a.outcome, 1) > _RANK.get(b.outcome, 1) else (b, a)
            kind, gap = ("validity" if bad.outcome == "rejected" else "failure"), None
        elif a.outcome == "ok" and abs(a.fitness - b.fitness) > self.margin:
            good, bad = (a, b) if a.fitness > b.fitness else (b, a)
            kind, gap = "fitness", float(good.fitness - bad.fitness)
        else:
            return None
        key = (good.candidate_id, bad.candidate_id)
        if key in self.emitted or (bad.candidate_id, good.candidate_id) in self.emitted:
            return None
        self.emitted.add(key)
        return {"prompt_id": good.prompt_id, "prompt": good.prompt, "chosen": good.source, "rejected": bad.source,
                "chosen_fitness": good.fitness, "rejected_fitness": bad.fitness, "gap": gap, "kind": kind,
                "grouping": grouping, "operator": good.operator, "island": int(good.island),
                "chosen_adapter": good.adapter, "rejected_adapter": bad.adapter, "chosen_strategy": good.strategy,
                "rejected_strategy": bad.strategy, "chosen_id": good.candidate_id, "rejected_id": bad.candidate_id,
                "time": float(now), "chosen_rank": self._rank(good.fitness) if kind == "fitness" else None}

    def _rank(self, fitness: float) -> float:
        """The share of the programs measured so far whose fitness is below `fitness`."""
        return bisect.bisect_left(self.fitnesses, fitness) / max(len(self.fitnesses), 1)


def trains_on(pair: dict, chosen_percentile: float) -> bool:
    """Whether a DPO round trains on `pair`: validity and failure pairs always; a fitness pair when
    its chosen program ranks at or above `chosen_percentile` of the run (pairs logged before ranks
    were recorded count as ranked)."""
    rank = pair.get("chosen_rank")
    if pair["kind"] != "fitness" or rank is None or (isinstance(rank, float) and math.isnan(rank)):
        return True
    return rank >= chosen_percentile


# ---------------------------------------------------------------- from a run's tables

def completions_from_tables(cands: pd.DataFrame, prompts: pd.DataFrame) -> list[Completion]:
    """The policy's completions in the order they were recorded."""
    texts = prompts.drop_duplicates("prompt_id").set_index("prompt_id").prompt.to_dict()
    rows = cands[cands.prompt_id.notna()].sort_values("candidate_id")
    return [Completion(candidate_id=int(r.candidate_id), prompt_id=int(r.prompt_id), prompt=texts.get(r.prompt_id, ""),
                       source=r.source, operator=r.operator, island=int(r.island),
                       parents=tuple(int(p) for p in _list(getattr(r, "parents", None))),
                       adapter=_str(r.adapter), strategy=_str(getattr(r, "strategy", None)), status=r.status,
                       duplicate_of=None if pd.isna(r.duplicate_of) else int(r.duplicate_of))
            for r in rows.itertuples(index=False)]


def replay(log: PreferenceLog, cands: pd.DataFrame, evals: pd.DataFrame, prompts: pd.DataFrame) -> list[dict]:
    """Feed a run's completions, then its evaluations in order, through `log`; the pairs, in order."""
    pairs = []
    for c in completions_from_tables(cands, prompts):
        pairs += log.add(c)
    for e in evals.itertuples(index=False):
        pairs += log.measured(int(e.candidate_id), e.status, None if pd.isna(e.fitness) else float(e.fitness))
    return pairs


def preference_pairs(cands: pd.DataFrame, evals: pd.DataFrame, prompts: pd.DataFrame, margin: float = 0.01,
                     groupings: tuple[str, ...] = ("prompt",)) -> pd.DataFrame:
    """All pairs of one run; `margin` is the least fitness gap of a fitness pair."""
    return pd.DataFrame(replay(PreferenceLog(margin, groupings), cands, evals, prompts), columns=COLUMNS)


def _list(x) -> list:
    return [] if x is None or (isinstance(x, float) and math.isnan(x)) else list(x)


def _str(x) -> str | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else str(x)

"""What the policy learns from the run: preference pairs between its completions, the
prompt-strategy controller they steer (LLM operator × temperature), and DPO rounds that train a
LoRA adapter on the newest pairs. Every pair is logged once, as it arises; resume rebuilds the
pair log, the controller and the DPO state from the tables.
"""
from __future__ import annotations

import dataclasses
from collections import deque

from autoprune_ray.engine.config import RunConfig
from autoprune_ray.engine.records import RunRecords
from autoprune_ray.llm import preferences as prefs
from autoprune_ray.llm.dpo_config import DPOConfig
from autoprune_ray.llm.strategy import StrategyController
from autoprune_ray.tasks.base import TaskPlugin

LLM_OPERATORS = ("llm_init", "llm_mutate", "llm_crossover", "gcot")


class PolicyLearning:
    def __init__(self, cfg: RunConfig, task: TaskPlugin, records: RunRecords):
        self.cfg, self.task, self.records = cfg, task, records
        d = cfg.dpo
        self.prefs = prefs.PreferenceLog(d.margin, tuple(d.groupings), d.window)
        self.strategies = self._strategy_controller()
        self.dpo = {"round": 0, "pairs": 0, "pairs_at_round": 0, "adapter": None}   # adapter: (version, path)
        self.recent_pairs: deque[dict] = deque(maxlen=d.max_pairs)   # what the next DPO round trains on

    # ------------------------------------------------------------------ strategies
    def temperatures(self) -> list[float]:
        return self.cfg.strategy.temperatures or [self.cfg.policy.temperature]

    def _strategy_controller(self) -> StrategyController:
        st, ops = self.cfg.strategy, self.cfg.search.operators
        rates = {op: ops.get(op, 0.0) for op in LLM_OPERATORS if ops.get(op, 0.0) > 0} or {"llm_init": 1.0}
        return StrategyController(rates, self.temperatures(), st.enabled, st.learning_rate, st.exploration)

    # ------------------------------------------------------------------ preference pairs
    def completed(self, completion: prefs.Completion) -> None:
        """A completion was proposed: pair it with its siblings whose outcome is known."""
        self.log_pairs(self.prefs.add(completion, self.records.now()))

    def measured(self, candidate_id: int, row: dict) -> None:
        """A candidate's evaluation row arrived: pair it with siblings measured before."""
        self.log_pairs(self.prefs.measured(candidate_id, row["status"], row["fitness"], row["finished"]))

    def log_pairs(self, pairs: list[dict]) -> None:
        changed = False
        for pair in pairs:
            self.records.store.append("preferences", pair)
            self._keep_for_training(pair)
            changed |= self.strategies.update(pair)
        self.dpo["pairs"] += len(pairs)
        if pairs:
            self.records.metrics.inc("preference_pairs", len(pairs))
        if changed:
            self._record_strategies()

    def _keep_for_training(self, pair: dict) -> None:
        if pair["grouping"] in self.cfg.dpo.groupings and prefs.trains_on(pair, self.cfg.dpo.chosen_percentile):
            self.recent_pairs.append({k: pair[k] for k in ("prompt", "chosen", "rejected")})

    def _record_strategies(self) -> None:
        """The controller's state after a change: one `strategies` row per strategy."""
        now, r = self.records.now(), self.records
        for row in self.strategies.snapshot():
            r.store.append("strategies", row | {"time": now, "evaluated": r.evaluated,
                                                "comparisons": self.strategies.comparisons})

    # ------------------------------------------------------------------ DPO rounds
    def dpo_due(self) -> bool:
        d = self.cfg.dpo
        return d.enabled and self.dpo["pairs"] - self.dpo["pairs_at_round"] >= d.every_pairs

    def next_dpo_round(self) -> dict:
        """The next round's job: the newest pairs, where its adapter goes, what it continues from."""
        self.dpo["round"] += 1
        self.dpo["pairs_at_round"] = self.dpo["pairs"]
        version = f"v{self.dpo['round']}"
        previous = self.dpo["adapter"]
        return {"version": version, "round": self.dpo["round"],
                "path": str(self.cfg.resolved_run_dir / "adapters" / version),
                "pairs": list(self.recent_pairs),
                "pairs_total": self.dpo["pairs"], "init_adapter": previous[1] if previous else None,
                "config": self._round_config(self.dpo["round"]),
                "started": self.records.now()}

    def _round_config(self, round_: int) -> DPOConfig:
        """The run's training settings (dpo: holds DPOConfig's fields and the engine's), a seed per
        round, and the system prompt the policy generates with for this task."""
        d = self.cfg.dpo
        training = DPOConfig(**{f.name: getattr(d, f.name) for f in dataclasses.fields(DPOConfig)})
        return dataclasses.replace(training, seed=d.seed + round_, system_prompt=self.task.prompts.system)

    def record_dpo_round(self, job: dict, metrics: dict | None, error: str = "") -> None:
        """One row per round; a good round's adapter becomes the one the policy serves."""
        train, held = (metrics or {}).get("train", {}), (metrics or {}).get("held_out", {})
        self.records.store.append("adapters", {
            "version": job["version"], "path": job["path"], "round": job["round"],
            "status": "failed" if metrics is None else "ok", "reason": error[:500],
            "pairs_total": job["pairs_total"], "train_pairs": (metrics or {}).get("train_pairs"),
            "heldout_pairs": held.get("pairs"), "train_loss": train.get("loss"),
            "train_accuracy": train.get("reward_accuracy"), "heldout_loss": held.get("loss"),
            "heldout_accuracy": held.get("reward_accuracy"), "heldout_margin": held.get("reward_margin"),
            "started": job["started"], "finished": self.records.now()})
        if metrics is not None:
            self.dpo["adapter"] = (job["version"], job["path"])
        self.records.store.flush()

    # ------------------------------------------------------------------ resume
    def replay(self, cands, evals) -> None:
        """Rebuild the pair log, the strategy controller and the DPO state; log pairs a crash lost."""
        store = self.records.store
        logged = store.read("preferences")
        replayed = prefs.replay(self.prefs, cands, evals, store.read("prompts"))
        known = set(zip(logged.chosen_id, logged.rejected_id))
        for pair in logged.to_dict("records"):
            self.strategies.update(pair)
            self._keep_for_training(pair)
        self.dpo["pairs"] = len(logged)
        self.log_pairs([p for p in replayed if (p["chosen_id"], p["rejected_id"]) not in known])
        self._replay_rounds()

    def _replay_rounds(self) -> None:
        rounds = self.records.store.read("adapters")
        if rounds.empty:
            return
        self.dpo["round"] = len(rounds)
        self.dpo["pairs_at_round"] = int(rounds.pairs_total.max())
        ok = rounds[rounds.status == "ok"]
        if not ok.empty:
            self.dpo["adapter"] = (ok.version.iloc[-1], ok.path.iloc[-1])
